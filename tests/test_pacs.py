"""The PACS loop against a real server: Debian's Orthanc with its DICOMweb plugin
(``tests/pacs_server.py``). A DICOM series made from the sample's slices is stored with STOW-RS,
``tumorseg-predict`` runs on its series URL and on its study URL, and the DICOM
SEG it stores back is looked up by QIDO-RS and compared with the local mask. Every failure (server
unreachable, slow or refusing the login, a study or series that does not exist, a non-MR or
unreadable series, a STOW-RS the server does not honour) is one line naming the URL, exit status 1,
and leaves the server's store as it was. Outside CI a machine without Orthanc skips these tests;
under ``CI=true`` it fails them."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import IN_CI, SAMPLE, free_port, run_cli
from pacs_server import DROP_SEG, REFUSE_SEG, Pacs, available, orthanc
from PIL import Image
from pydicom.uid import CTImageStorage, generate_uid

from data_tools.nifti_to_dicom import write_series

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not available() and not IN_CI, reason="no Orthanc (apt-get install orthanc orthanc-dicomweb)"),
]
USER, PASSWORD, TIMEOUT = "TUMORSEG_DICOMWEB_USER", "TUMORSEG_DICOMWEB_PASSWORD", "TUMORSEG_DICOMWEB_TIMEOUT"


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    with orthanc(tmp_path_factory.mktemp("pacs") / "orthanc", free_port(), free_port()) as server:
        yield server


def upload(pacs: Pacs, folder: Path, slices: int = 4, **attributes) -> tuple[str, str]:
    """The sample's first test slices (256 px) as a DICOM series, each instance changed by
    ``attributes``, stored by STOW-RS; returns (StudyInstanceUID, SeriesInstanceUID)."""
    paths = sorted((SAMPLE / "test").glob("*.jpg"))[:slices]
    volume = np.stack([np.asarray(Image.open(p).convert("L").resize((256, 256)), dtype=np.float32).T for p in paths], -1)
    datasets = [pydicom.dcmread(f) for f in write_series(volume, np.diag([-1.0, -1.0, 1.0, 1.0]), folder)]
    for ds in datasets:
        for name, value in attributes.items():
            setattr(ds, name, value)
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    answer = pacs.client().store_instances(datasets)
    assert len(answer.ReferencedSOPSequence) == len(datasets)
    return str(datasets[0].StudyInstanceUID), str(datasets[0].SeriesInstanceUID)


@pytest.fixture(scope="module")
def study(pacs, tmp_path_factory):
    """A study with an MR series and a CT series; returns (StudyUID, MR SeriesUID, CT SeriesUID)."""
    folder = tmp_path_factory.mktemp("study")
    study_uid, mr = upload(pacs, folder / "mr")
    _, ct = upload(pacs, folder / "ct", slices=2, StudyInstanceUID=study_uid, Modality="CT", SOPClassUID=CTImageStorage)
    return study_uid, mr, ct


def predict(pacs: Pacs, *args, env: dict | None = None):
    login = {USER: pacs.user, PASSWORD: pacs.password}
    return run_cli(
        "-m", "tumorseg.inference.predict", *map(str, args), "--no-progress", env={**login, **(env or {})}, timeout=300
    )


def series_url(pacs: Pacs, study_uid: str, series_uid: str) -> str:
    return f"{pacs.root}/studies/{study_uid}/series/{series_uid}"


def stored_segs(pacs: Pacs, study_uid: str) -> set[str]:
    """SOPInstanceUIDs of the SEG series of the study, found by QIDO-RS."""
    web = pacs.client()
    segs = web.search_for_series(study_uid, search_filters={"Modality": "SEG"})
    return {
        item["00080018"]["Value"][0]
        for series in segs
        for item in web.search_for_instances(study_uid, series["0020000E"]["Value"][0])
    }


def assert_seg_on_server(pacs: Pacs, out: Path, study_uid: str, series_uid: str) -> dict:
    """The case's summary says its SEG was stored; QIDO-RS finds it under the study; its frames
    are the local mask; no credentials in the summary."""
    text = (out / f"{series_uid}.json").read_text()
    assert pacs.password not in text and "Authorization" not in text
    summary = json.loads(text)
    record = summary["dicomweb"]
    assert record == {
        "source": series_url(pacs, study_uid, series_uid),
        "server": pacs.root,
        "stored": True,
        "seg_sop_instance_uid": record["seg_sop_instance_uid"],
    }
    assert summary["input"] == record["source"]
    uid = record["seg_sop_instance_uid"]
    assert uid in stored_segs(pacs, study_uid)
    found = pacs.client().search_for_instances(study_uid, search_filters={"SOPInstanceUID": uid})
    seg = pacs.client().retrieve_instance(study_uid, found[0]["0020000E"]["Value"][0], uid)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    mask = np.asarray(nib.load(out / f"{series_uid}_seg.nii.gz").dataobj)  # (x, y, z), slices in position order
    assert mask.any()
    # highdicom stores the frames in an order of its own (here from the top slice down), each with
    # its position; the series is axial with slice k at z = k mm, so z puts them in the mask's order
    z = [float(f.PlanePositionSequence[0].ImagePositionPatient[2]) for f in seg.PerFrameFunctionalGroupsSequence]
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)[np.argsort(z)]
    assert np.array_equal(frames, np.stack([mask[:, :, k].T for k in range(mask.shape[2])]))
    return summary


def test_series_url_predicted_and_seg_stored_back(pacs, study, tmp_path):
    study_uid, mr, _ = study
    done = predict(pacs, series_url(pacs, study_uid, mr), "--output", tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert pacs.password not in done.stdout + done.stderr
    assert "1 of 1 DICOM SEGs stored" in done.stdout
    assert_seg_on_server(pacs, tmp_path, study_uid, mr)


def test_study_url_predicts_its_mr_series_and_skips_the_ct(pacs, study, tmp_path):
    study_uid, mr, ct = study
    before = stored_segs(pacs, study_uid)
    done = predict(pacs, f"{pacs.root}/studies/{study_uid}", "--output", tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"series/{ct}: skipped, a CT series (not MR)" in done.stderr
    assert not (tmp_path / f"{ct}.json").exists()
    summary = assert_seg_on_server(pacs, tmp_path, study_uid, mr)
    assert stored_segs(pacs, study_uid) - before == {summary["dicomweb"]["seg_sop_instance_uid"]}


def test_a_url_and_local_files_in_one_run(pacs, study, tmp_path):
    """A series URL beside a local slice: one plan, both predicted, only the series' SEG stored;
    the options may stand between the inputs."""
    study_uid, mr, _ = study
    local = sorted((SAMPLE / "test").glob("*.jpg"))[0]
    done = predict(pacs, local, "--output", tmp_path, series_url(pacs, study_uid, mr))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 of 2 inputs predicted" in done.stdout and "1 of 1 DICOM SEGs stored" in done.stdout
    assert (tmp_path / f"{local.stem}_seg.png").is_file()
    assert json.loads((tmp_path / f"{local.stem}.json").read_text())["input"] == str(local)
    assert_seg_on_server(pacs, tmp_path, study_uid, mr)


def one_error_line(done, *words: str) -> str:
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and all(w in lines[0] for w in words), done.stderr
    return lines[0]


def test_a_stow_the_server_does_not_honour_keeps_the_local_outputs(pacs, tmp_path):
    urls = [series_url(pacs, *upload(pacs, tmp_path / p, slices=2, PatientID=p)) for p in (REFUSE_SEG, DROP_SEG)]
    counts = pacs.counts()
    done = predict(pacs, *urls, "--output", tmp_path / "out")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "0 of 2 DICOM SEGs stored" in done.stdout
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert [url in line and "the DICOM SEG was not stored" in line for url, line in zip(urls, errors)] == [True, True]
    assert "did not confirm" in errors[0] and "does not hold" in errors[1]
    for url in urls:
        stem = url.rsplit("/", 1)[1]
        for suffix in ("_seg.dcm", "_seg.nii.gz", "_overlay.png"):
            assert (tmp_path / "out" / f"{stem}{suffix}").is_file()
        record = json.loads((tmp_path / "out" / f"{stem}.json").read_text())["dicomweb"]
        assert record["stored"] is False and url in record["error"]
    assert pacs.counts() == counts


def test_login_from_a_netrc_file(pacs, study, tmp_path):
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine 127.0.0.1 login {pacs.user} password {pacs.password}\n")
    netrc.chmod(0o600)
    env = {USER: "", PASSWORD: "", "NETRC": str(netrc)}
    done = predict(pacs, series_url(pacs, study[0], generate_uid()), "--output", tmp_path / "out", env=env)
    one_error_line(done, "no such series on the server")  # past the login
    netrc.write_text(f"machine 127.0.0.1 login {pacs.user} password wrong\n")
    one_error_line(predict(pacs, f"{pacs.root}/studies/{study[0]}", "--output", tmp_path / "out", env=env), "HTTP 401")


@pytest.fixture
def silent_server():
    """A server that accepts connections and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield f"http://127.0.0.1:{s.getsockname()[1]}/dicom-web"


FAILURES = {
    "unreachable": ("server unreachable (Connection refused)", {}),
    "wrong password": ("authentication refused (HTTP 401)", {PASSWORD: "not-the-password"}),
    "no such study": ("no such study on the server", {}),
    "no such series": ("no such series on the server", {}),
    "CT series": ("a CT series, not MR", {}),
    "unreadable series": ("unreadable instance", {}),
    "slow server": (f"no answer within 1 s while searching the series (QIDO-RS) (a slow server? {TIMEOUT})", {TIMEOUT: "1"}),
    "credentials in the URL": ("credentials in a URL are refused", {}),
    "malformed URL": ("not a valid URL (Invalid IPv6 URL)", {}),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_failures_are_one_line_and_leave_the_server_as_it_was(pacs, study, silent_server, tmp_path, case):
    study_uid, mr, ct = study
    url = {
        "unreachable": f"http://127.0.0.1:{free_port()}/dicom-web/studies/{study_uid}",
        "wrong password": f"{pacs.root}/studies/{study_uid}",
        "no such study": f"{pacs.root}/studies/{generate_uid()}",
        "no such series": series_url(pacs, study_uid, generate_uid()),
        "CT series": series_url(pacs, study_uid, ct),
        "slow server": f"{silent_server}/studies/{study_uid}",
        "credentials in the URL": f"http://{pacs.user}:{pacs.password}@{pacs.root.split('://')[1]}/studies/{study_uid}",
        "malformed URL": f"http://[::1/dicom-web/studies/{study_uid}",
    }.get(case)
    if case == "unreadable series":  # pixel data cut to half its length
        study_uid, series_uid = upload(pacs, tmp_path / "bad", slices=2)
        instance = pacs.client().search_for_instances(study_uid, series_uid)[0]["00080018"]["Value"][0]
        ds = pacs.client().retrieve_instance(study_uid, series_uid, instance)
        ds.PixelData, ds.SOPInstanceUID = ds.PixelData[: len(ds.PixelData) // 2], generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        pacs.client().store_instances([ds])
        url = series_url(pacs, study_uid, series_uid)
    expected, env = FAILURES[case]
    counts = pacs.counts()
    done = predict(pacs, url, "--output", tmp_path / "out", env=env)
    line = one_error_line(done, expected)
    assert url.split("://")[1].split("@")[-1] in line
    assert pacs.password not in done.stdout + done.stderr
    assert not (tmp_path / "out").exists()
    assert pacs.counts() == counts


def test_an_output_that_is_a_file_is_refused_before_any_request(pacs, study, tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("somebody's file")
    counts = pacs.counts()
    done = predict(pacs, f"{pacs.root}/studies/{study[0]}", "--output", taken)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == f"error: {taken}: the output must be a folder, and this is a file"
    assert "fetched" not in done.stdout and taken.read_text() == "somebody's file" and pacs.counts() == counts
