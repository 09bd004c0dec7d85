"""MONAI Label on a real PACS: the real MONAI Label server (`make monailabel-venv`) started with
``--studies`` on the DICOMweb root of a real Orthanc (``tests/pacs_server.py``), as ``make
pacs-label`` runs them. One server for the module: it lists the server's MR series (not its CT
series); /infer predicts a series as a volume, equal voxel for voxel to the ``_seg.nii.gz`` that
``tumorseg-predict`` writes for that series, in the series' geometry; a final label saved with
PUT /datastore/label is stored on the PACS as a DICOM SEG of the series, in its study (QIDO-RS);
/train trains the bundle's recipe on that label's slices. A server that is unreachable or refuses
the login stops MONAI Label at start with one ``error:`` line. Outside CI a machine without
Orthanc or the MONAI Label venv skips these tests; under ``CI=true`` it fails them."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import IN_CI, free_port, run_cli
from pacs_server import available, orthanc, store_sample_series
from pydicom.uid import CTImageStorage
from test_monailabel import ML_VENV, MODEL, call, export_app, monai_label

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not available() and not IN_CI, reason="no Orthanc (apt-get install orthanc orthanc-dicomweb)"),
    pytest.mark.skipif(
        not (ML_VENV / "bin" / "monailabel").exists() and not IN_CI, reason="no MONAI Label venv (make monailabel-venv)"
    ),
]
# the series stored transposed: its voxel axes are (rows -> posterior, columns -> left), so the
# canonical orientation the predictor reads is not the stored order and the mask must come back
AFFINE = [[0.0, -1.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    with orthanc(tmp_path_factory.mktemp("pacs") / "orthanc", free_port(), free_port()) as server:
        yield server


@pytest.fixture(scope="module")
def study(pacs, tmp_path_factory):
    """A study with an MR series (4 slices, stored transposed) and a CT series:
    (StudyInstanceUID, MR SeriesInstanceUID, CT SeriesInstanceUID)."""
    folder, login = tmp_path_factory.mktemp("study"), (pacs.user, pacs.password)
    study_uid, mr = store_sample_series(pacs.root, login, folder / "mr", affine=AFFINE)
    ct_attributes = {"StudyInstanceUID": study_uid, "Modality": "CT", "SOPClassUID": CTImageStorage}
    _, ct = store_sample_series(pacs.root, login, folder / "ct", slices=2, **ct_attributes)
    return study_uid, mr, ct


@pytest.fixture(scope="module")
def server(pacs, study, tmp_path_factory):
    """MONAI Label on the PACS (its login in MONAI Label's settings), its DICOM cache in a
    temporary folder; yields (URL, app folder, server log)."""
    tmp = tmp_path_factory.mktemp("monailabel")
    app, log = export_app(tmp), tmp / "server.log"
    env = {
        "MONAI_LABEL_DICOMWEB_USERNAME": pacs.user,
        "MONAI_LABEL_DICOMWEB_PASSWORD": pacs.password,
        "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(tmp / "cache"),
        "MONAI_LABEL_AUTO_UPDATE_SCORING": "false",
    }
    with monai_label(app, pacs.root, log, env=env) as url:
        yield url, app, log


@pytest.fixture(scope="module")
def served(server, study, tmp_path_factory) -> Path:
    """/infer's mask of the MR series, a NIfTI."""
    url, _, _ = server
    _, _, mask = call(f"{url}/infer/{MODEL}?image={study[1]}&output=image", "POST")
    path = tmp_path_factory.mktemp("served") / "mask.nii.gz"
    path.write_bytes(mask)
    return path


def test_lists_the_mr_series_of_the_server(server, study):
    url, _, _ = server
    _, _, listed = call(f"{url}/datastore/?output=all")
    assert set(listed["objects"]) == {study[1]}  # the MR series, not the CT one
    _, _, info = call(f"{url}/info/")
    assert info["datastore"]["total"] == 1 and info["datastore"]["completed"] == 0
    assert set(info["strategies"]) == {"random", "first"} and info["scoring"] == {}
    _, _, pick = call(f"{url}/activelearning/first", "POST", {})
    assert pick["id"] == study[1]


def test_infer_equals_tumorseg_predict_in_the_series_geometry(pacs, study, served, tmp_path):
    study_uid, mr, _ = study
    folder = tmp_path / "series"  # the series downloaded as a local DICOM folder
    folder.mkdir()
    datasets = pacs.client().retrieve_series(study_uid, mr)
    for i, ds in enumerate(datasets):
        ds.save_as(folder / f"{i:03d}.dcm", enforce_file_format=True)
    done = run_cli("-m", "tumorseg.inference.predict", str(folder), "--output", str(tmp_path / "out"), "--no-progress")
    assert done.returncode == 0, done.stdout + done.stderr
    expected = nib.load(tmp_path / "out" / "series_seg.nii.gz")
    got = nib.load(served)
    assert got.shape == expected.shape == (256, 256, 4)
    assert np.allclose(got.affine, expected.affine)
    # the series' geometry: the in-plane axes as stored, and slice k where an instance lies
    assert np.allclose(got.affine[:3, :2], np.asarray(AFFINE)[:3, :2])
    lps_to_ras = np.array([-1.0, -1.0, 1.0])
    placed = {tuple(np.round(lps_to_ras * [float(v) for v in ds.ImagePositionPatient], 3)) for ds in datasets}
    assert {tuple(np.round(got.affine @ [0, 0, k, 1], 3)[:3]) for k in range(4)} == placed
    got_mask, expected_mask = np.asarray(got.dataobj), np.asarray(expected.dataobj)
    assert expected_mask.any()  # tumour found: the comparison means something
    assert got.get_data_dtype() == np.uint8 and set(np.unique(got_mask)) <= {0, 1}
    assert np.array_equal(got_mask, expected_mask)


def segs(pacs, study_uid: str) -> set[str]:
    return {s["0020000E"]["Value"][0] for s in pacs.client().search_for_series(study_uid, search_filters={"Modality": "SEG"})}


def test_a_saved_label_is_a_dicom_seg_on_the_pacs_and_trains(pacs, study, server, served):
    url, app, log = server
    study_uid, mr, _ = study
    before = segs(pacs, study_uid)
    label = np.asarray(nib.load(served).dataobj) > 0
    call(
        f"{url}/datastore/label?image={mr}&tag=final",
        "PUT",
        files={"label": ("label.nii.gz", served.read_bytes()), "params": (None, b"{}")},
    )
    new = segs(pacs, study_uid) - before
    assert len(new) == 1  # one DICOM SEG series, in the study of the series (QIDO-RS)
    (seg_series,) = new
    instance = pacs.client().search_for_instances(study_uid, seg_series)[0]["00080018"]["Value"][0]
    seg = pacs.client().retrieve_instance(study_uid, seg_series, instance)
    assert seg.Modality == "SEG" and seg.ReferencedSeriesSequence[0].SeriesInstanceUID == mr
    # its frames are the label, each on its slice (the label's affine says which)
    to_voxel = np.linalg.inv(nib.load(served).affine)
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    on_slices = np.zeros_like(label)
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        ras = np.array([-1.0, -1.0, 1.0]) * [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        voxel = to_voxel @ [*ras, 1.0]
        assert np.allclose(voxel[:2], 0, atol=1e-3)  # the frame's first pixel: voxel (0, 0, k)
        on_slices[:, :, int(round(voxel[2]))] = frame.T > 0
    assert len(frames) == label.shape[2] and np.array_equal(on_slices, label)
    _, _, info = call(f"{url}/info/")
    assert info["datastore"]["completed"] == 1
    _, _, datalist = call(f"{url}/datastore/?output=train")
    assert [Path(d["image"]).name for d in datalist] == [mr]

    # the recipe, one epoch per stage, on the label's axial slices with tumour
    _, _, task = call(f"{url}/train/{MODEL}", "POST", {"max_epochs": 1, "device": "cpu"})
    deadline = time.time() + 400
    while task["status"] in ("SUBMITTED", "RUNNING") and time.time() < deadline:
        time.sleep(2)
        _, _, task = call(f"{url}/train/")
    assert task["status"] == "DONE", "\n".join(task.get("details", [])) + log.read_text()[-3000:]
    bundle = app / "model" / MODEL
    trained = bundle / "models" / "monailabel" / "model.pt"
    assert trained.is_file()
    tumour_slices = int(label.reshape(-1, label.shape[2]).any(0).sum())
    slices = sorted((bundle / "models" / "monailabel" / "slices" / mr).glob("slice????.png"))
    assert len(slices) == tumour_slices
    config = json.loads((bundle / "models" / "monailabel" / "train_config.json").read_text())
    assert sorted(d["image"] for d in config["train"]["dataset"]["data"]) == [str(p) for p in slices]
    _, _, info = call(f"{url}/info/")
    stats = info["train_stats"][MODEL]
    assert stats["epochs"] == 1 and stats["train_images"] == tumour_slices and 0 <= stats["best_metric"] <= 1

    # /infer now serves the trained weights, still in the series' geometry
    _, _, mask = call(f"{url}/infer/{MODEL}?image={mr}&output=json", "POST")
    assert mask["checkpoint"] == "models/monailabel/model.pt" and mask["shape"] == [256, 256, 4]


def test_a_series_the_server_does_not_have_is_one_line(server):
    url, _, _ = server
    request = urllib.request.Request(f"{url}/infer/{MODEL}?image=1.2.3.4&output=image", method="POST")
    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(request, timeout=60)
    assert answer.value.code == 404
    assert json.loads(answer.value.read())["detail"].endswith("no series 1.2.3.4 on the server (QIDO-RS found none)")


@pytest.mark.parametrize("case", ["unreachable", "wrong password"])
def test_an_unusable_pacs_stops_monai_label_in_one_line(pacs, tmp_path, case):
    root = f"http://127.0.0.1:{free_port()}/dicom-web" if case == "unreachable" else pacs.root
    # the login of tumorseg's DICOMweb settings (MONAI Label's own unset)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("MONAI_LABEL_")}
    env.update({"TUMORSEG_DICOMWEB_USER": pacs.user, "TUMORSEG_DICOMWEB_PASSWORD": "not-the-password"})
    env.update({"PATH": f"{ML_VENV / 'bin'}:{env['PATH']}", "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(tmp_path / "cache")})
    app = tmp_path / "app"  # an app folder: main.py and a bundle's configs (never loaded: it stops before)
    (app / "model" / MODEL / "configs").mkdir(parents=True)
    (app / "main.py").write_bytes((Path(__file__).parents[1] / "monailabel_app" / "main.py").read_bytes())
    command = [str(ML_VENV / "bin" / "monailabel"), "start_server", "--app", str(app), "--studies", root]
    command += ["--host", "127.0.0.1", "--port", str(free_port()), "--conf", "models", MODEL]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode != 0 and "Traceback" not in output, output[-3000:]
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    expected = "server unreachable (Connection refused)" if case == "unreachable" else "authentication refused (HTTP 401)"
    assert len(lines) == 1 and root in lines[0] and expected in lines[0], output[-3000:]
    assert pacs.password not in output and "not-the-password" not in output
