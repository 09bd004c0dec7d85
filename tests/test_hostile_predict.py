"""Hostile inputs for tumorseg-predict and the bundle's inference config: outputs never collide
or overwrite what the command did not write, one bad case is one line and the batch goes on,
nothing is silently wrong (real JPG/PNG/NIfTI/DICOM files)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from conftest import INFERENCE, QUICK, REPO, check, run_cli
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from data_tools.nifti_to_dicom import write_series
from tumorseg.inference.predict import output_stems

pytestmark = pytest.mark.slow

SMALL_NET = ["--set", "image_size=64", "--set", "channels=[8,16,32]", "--set", "strides=[2,2]", "--set", "num_res_units=1"]
GOOD_JPG = sorted((REPO / "data" / "brain-tumor-coco-sample" / "test").glob("*.jpg"))[0]
ANATOMICAL = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"


def predict(trained, *args, extra=(), checkpoint=None):
    ckpt = checkpoint or trained / "models" / "model.pt"
    return run_cli(
        "-m", "tumorseg.inference.predict", *map(str, args), "--checkpoint", str(ckpt), *SMALL_NET, "--no-progress", *extra
    )


def errors(result) -> list[str]:
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def outputs(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != ".tumorseg-predict.json"}


# ---- names ----------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["A", "B", "a", "A/B", "B/A", "x/y/A"]),
            st.sampled_from(["s", "S", "s_jpg", "s_seg", "scan.v2", "t"]),
            st.sampled_from([".jpg", ".JPG", ".png", ".nii.gz", ".nii", ".dcm", ""]),
        ),
        min_size=1,
        max_size=12,
        unique=True,
    )
)
def test_output_names_are_unique_and_never_an_input(names):
    cases = [Path("/data") / folder / (stem + suffix) for folder, stem, suffix in names]
    inputs = {c.relative_to("/data").as_posix() for c in cases}  # the output folder is the inputs' folder
    stems = output_stems(cases, inputs)
    suffixes = ("_seg.png", "_seg.nii.gz", "_seg.dcm", "_overlay.png", ".json")
    paths = [f"/out/{stem}{suffix}" for stem in stems for suffix in suffixes]
    assert len({p.casefold() for p in paths}) == len(paths)  # no two inputs share an output
    assert not {p.casefold() for p in paths} & {f"/out/{i}".casefold() for i in inputs}
    assert all(".." not in Path(s).parts and not Path(s).is_absolute() for s in stems)
    assert output_stems(cases, inputs) == stems  # predictable: the same inputs give the same names


def test_same_names_in_two_folders_and_two_formats_keep_apart(trained, tmp_path):
    for folder in ("A", "B"):
        (tmp_path / folder).mkdir()
        Image.open(GOOD_JPG).save(tmp_path / folder / "s.jpg")
    Image.open(GOOD_JPG).convert("L").save(tmp_path / "A" / "s.png")
    nib.save(nib.load(ANATOMICAL), tmp_path / "A" / "s.nii.gz")
    result = predict(trained, tmp_path / "A", tmp_path / "B", "-o", tmp_path / "out")
    assert result.returncode == 0 and not errors(result)
    assert "4 of 4 inputs predicted" in result.stdout
    written = outputs(tmp_path / "out")
    summaries = [json.loads((tmp_path / "out" / p).read_text()) for p in written if p.endswith(".json")]
    assert sorted(s["input"] for s in summaries) == sorted(
        str(tmp_path / p) for p in ("A/s.jpg", "B/s.jpg", "A/s.png", "A/s.nii.gz")
    )
    assert len(written) == 4 * 3


def test_the_same_file_named_twice_is_predicted_once(trained, tmp_path):
    result = predict(trained, GOOD_JPG, GOOD_JPG, GOOD_JPG.parent, "-o", tmp_path / "out")
    assert result.returncode == 0
    assert len([p for p in outputs(tmp_path / "out") if p.endswith(".json")]) == len(list(GOOD_JPG.parent.glob("*.jpg")))


def test_outputs_never_overwrite_inputs_or_foreign_files(trained, tmp_path):
    anat = tmp_path / "anat"
    anat.mkdir()
    nib.save(nib.load(ANATOMICAL), anat / "sub-01_T1w.nii.gz")
    (anat / "sub-01_T1w.json").write_text('{"RepetitionTime": 2.0}')  # a BIDS sidecar
    Image.open(GOOD_JPG).convert("L").save(anat / "x.png")
    Image.open(GOOD_JPG).convert("L").save(anat / "x_seg.png")  # an input named like an output
    before = {p.name: p.read_bytes() for p in anat.iterdir()}
    result = predict(trained, anat, "-o", anat)
    lines = errors(result)
    assert result.returncode == 1
    assert any("sub-01_T1w.json" in line and "not overwritten" in line for line in lines)
    assert {p.name: p.read_bytes() for p in anat.iterdir() if p.name in before} == before
    # a re-run may replace what the command wrote itself, and nothing else
    again = predict(trained, anat / "x_seg.png", "-o", tmp_path / "out")
    assert again.returncode == 0
    assert predict(trained, anat / "x_seg.png", "-o", tmp_path / "out").returncode == 0
    (tmp_path / "out" / "x_seg.json").write_text("edited by a person")
    third = predict(trained, anat / "x_seg.png", "-o", tmp_path / "out")
    assert third.returncode == 1 and (tmp_path / "out" / "x_seg.json").read_text() == "edited by a person"


# ---- one case is one line, the batch goes on -----------------------------------------------


def dicom_series(folder: Path) -> Path:
    img = nib.load(ANATOMICAL)
    write_series(np.asarray(img.dataobj, dtype=np.float32), img.affine, folder, shuffle_names=False)
    return folder


def test_bad_cases_are_one_line_each_and_the_rest_is_predicted(trained, tmp_path):
    bad = tmp_path / "in"
    bad.mkdir()
    Image.open(GOOD_JPG).convert("L").save(bad / "good.png")
    noise = np.random.default_rng(0).integers(0, 256, (8, 10000), dtype=np.uint8)
    Image.fromarray(noise).save(bad / "thin.png")  # extreme aspect ratio
    # a series with a missing slice
    gap = dicom_series(tmp_path / "gap")
    sorted(gap.iterdir())[5].unlink()
    # slices without positions
    nopos = dicom_series(tmp_path / "nopos")
    for f in nopos.iterdir():
        ds = pydicom.dcmread(f)
        del ds.ImagePositionPatient
        ds.save_as(f)
    # a zero orientation
    zero = dicom_series(tmp_path / "zero")
    for f in zero.iterdir():
        ds = pydicom.dcmread(f)
        ds.ImageOrientationPatient = [0, 0, 0, 0, 0, 0]
        ds.save_as(f)
    # an anonymised series without what the DICOM SEG writer copies
    anon = dicom_series(tmp_path / "anon")
    for f in anon.iterdir():
        ds = pydicom.dcmread(f)
        for keyword in ("StudyInstanceUID", "FrameOfReferenceUID", "PatientID", "StudyDate"):
            delattr(ds, keyword)
        ds.save_as(f)
    result = predict(trained, bad, gap, nopos, zero, anon, "-o", tmp_path / "out")
    lines = errors(result)
    assert result.returncode == 1
    assert any("/gap" in line and "uneven slice spacing" in line for line in lines), lines
    assert any("/nopos" in line and "ImagePositionPatient" in line for line in lines), lines
    assert any("/zero" in line and "ImageOrientationPatient" in line for line in lines), lines
    written = outputs(tmp_path / "out")
    assert "good_seg.png" in written
    if not any("/thin.png" in line for line in lines):  # predicted, at its own size
        assert Image.open(tmp_path / "out" / "thin_seg.png").size == (10000, 8)
    for name in ("gap", "nopos", "zero"):
        assert not any(p.startswith(name) for p in outputs(tmp_path / "out")), name  # nothing partial
    anon_lines = [line for line in lines if "/anon" in line]
    assert len(anon_lines) <= 1  # either predicted, or one clear line
    if anon_lines:
        assert not any(p.startswith("anon") for p in outputs(tmp_path / "out"))


def test_a_folder_of_several_series_predicts_each_and_says_so(trained, tmp_path):
    folder = dicom_series(tmp_path / "study")
    localiser = pydicom.dcmread(pydicom.data.get_testdata_file("MR_small.dcm"))
    localiser.save_as(folder / "zz_localiser.dcm")
    (folder / "README").write_text("a sidecar: left out")
    result = predict(trained, folder, "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr[-2000:]
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    assert any("2 DICOM series" in line and "study_series1" in line and "study_series2" in line for line in notes)
    assert any("README" in line and "left out" in line for line in notes)
    volume, localised = (json.loads((tmp_path / "out" / f"study_series{k}.json").read_text()) for k in (1, 2))
    assert volume["shape"] == list(nib.load(ANATOMICAL).shape) and localised["shape"] == [64, 64, 1]
    assert localised["series_instance_uid"] == localiser.SeriesInstanceUID != volume["series_instance_uid"]


def test_checkpoints_of_training_dicts_load_and_other_networks_are_refused(trained, tmp_path):
    state = torch.load(trained / "models" / "model.pt", weights_only=True)
    torch.save({"model": state, "epoch": 3}, tmp_path / "training.pt")
    ok = predict(trained, GOOD_JPG, "-o", tmp_path / "out", checkpoint=tmp_path / "training.pt")
    assert ok.returncode == 0, ok.stderr[-2000:]
    from monai.networks.nets import UNet

    other = UNet(spatial_dims=2, in_channels=1, out_channels=1, channels=(4, 8), strides=(2,), num_res_units=1)
    torch.save(other.state_dict(), tmp_path / "other.pt")
    refused = predict(trained, GOOD_JPG, "-o", tmp_path / "out2", checkpoint=tmp_path / "other.pt")
    assert refused.returncode == 2 and len(errors(refused)) == 1 and "another network" in errors(refused)[0]
    assert not (tmp_path / "out2").exists()


def test_write_failures_and_bad_settings_are_one_line(trained, tmp_path):
    (tmp_path / "file").write_text("x")
    as_file = predict(trained, GOOD_JPG, "-o", tmp_path / "file")
    assert as_file.returncode == 2 and len(errors(as_file)) == 1
    under_file = predict(trained, GOOD_JPG, "-o", tmp_path / "file" / "out")  # nothing can be written: nothing runs
    assert under_file.returncode == 2 and len(errors(under_file)) == 1 and "cannot write: a part of" in errors(under_file)[0]
    bad_setting = run_cli("-m", "tumorseg.inference.predict", str(GOOD_JPG), "-o", str(tmp_path / "o"), "--set", "image_size=abc")
    assert bad_setting.returncode == 2 and len(errors(bad_setting)) == 1


def test_a_newline_in_a_file_name_cannot_forge_a_line(trained, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "x\nerror: forged.png").write_bytes(b"not an image")
    result = predict(trained, folder, "-o", tmp_path / "out")
    lines = errors(result)
    assert len(lines) == 1 and "\\nerror: forged" in lines[0]


# ---- nothing silently wrong -------------------------------------------------------------------


def test_sixteen_bit_and_exif_rotated_slices_read_as_displayed(trained, tmp_path):
    from tumorseg.io.reading import read_slice

    grey = np.asarray(Image.open(GOOD_JPG).convert("L"), dtype=np.uint16)
    Image.fromarray(grey * 257).save(tmp_path / "sixteen.png")
    assert np.corrcoef(read_slice(tmp_path / "sixteen.png").ravel(), grey.T.ravel().astype(float))[0, 1] > 0.999
    rotated = Image.fromarray(grey.astype(np.uint8)[:, :320])  # 640 rows, 320 columns
    exif = rotated.getexif()
    exif[0x0112] = 6  # displayed turned by 90 degrees: 320 rows, 640 columns
    rotated.save(tmp_path / "exif.jpg", exif=exif)
    assert read_slice(tmp_path / "exif.jpg").shape == (640, 320)  # (x, y) as displayed
    result = predict(trained, tmp_path / "exif.jpg", "-o", tmp_path / "out")
    assert result.returncode == 0
    assert Image.open(tmp_path / "out" / "exif_seg.png").size == (640, 320)


def test_bundle_inference_goes_on_past_a_corrupt_slice_and_keeps_names_apart(trained, tmp_path):
    images = tmp_path / "in"
    images.mkdir()
    Image.open(GOOD_JPG).convert("L").save(images / "a.png")
    Image.open(GOOD_JPG).save(images / "a.jpg")
    grey16 = np.asarray(Image.open(GOOD_JPG).convert("L"), dtype=np.uint16) * 257
    Image.fromarray(grey16).save(images / "deep.png")
    data = GOOD_JPG.read_bytes()
    (images / "broken.jpg").write_bytes(data[: len(data) // 3])
    result = run_cli(
        "-m", "monai.bundle", "run", "inference", "--config_file", INFERENCE,
        "--dataset_dir", str(images), "--ckpt_dir", str(trained / "models"), "--output_dir", str(tmp_path / "out"),
        *QUICK, "--tta", "false", "--box_fit", "false",
    )  # fmt: skip
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "broken.jpg" in lines[0]
    written = sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.endswith("_seg.png"))
    assert written == ["a_jpg_seg.png", "a_png_seg.png", "deep_seg.png"]
    assert not any(p.name.startswith("broken") for p in (tmp_path / "out").iterdir())
    # the 16-bit copy is read at its depth: the same mask as its 8-bit original
    (tmp_path / "in8").mkdir()
    Image.open(GOOD_JPG).convert("L").save(tmp_path / "in8" / "a.png")
    check(run_cli(
        "-m", "monai.bundle", "run", "inference", "--config_file", INFERENCE,
        "--dataset_dir", str(tmp_path / "in8"), "--ckpt_dir", str(trained / "models"),
        "--output_dir", str(tmp_path / "out8"), *QUICK, "--tta", "false", "--box_fit", "false",
    ))  # fmt: skip
    m16 = np.asarray(Image.open(tmp_path / "out" / "deep_seg.png"))
    m8 = np.asarray(Image.open(tmp_path / "out8" / "a_seg.png"))
    assert (m16 == m8).mean() > 0.999


def test_bundle_inference_never_overwrites_what_it_did_not_write(trained, tmp_path):
    images, out = tmp_path / "in", tmp_path / "out"
    images.mkdir()
    out.mkdir()
    Image.open(GOOD_JPG).convert("L").save(images / "a.png")
    (out / "a_seg.png").write_bytes(b"somebody's file")
    command = ["-m", "monai.bundle", "run", "inference", "--config_file", INFERENCE,
               "--dataset_dir", str(images), "--ckpt_dir", str(trained / "models"), "--output_dir", str(out), *QUICK]  # fmt: skip
    refused = run_cli(*command)
    assert refused.returncode == 1 and (out / "a_seg.png").read_bytes() == b"somebody's file"
    assert [line for line in refused.stderr.splitlines() if line.startswith("error:")][0].endswith("not overwritten")
    (out / "a_seg.png").unlink()
    check(run_cli(*command))
    check(run_cli(*command))  # its own output, recorded: a re-run replaces it
