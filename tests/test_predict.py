"""tumorseg-predict on real files shipped inside packages: geometry and formats (broken inputs:
tests/test_bad_inputs.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import INFERENCE, REPO, run_cli
from PIL import Image

from data_tools.nifti_to_dicom import write_series as write_dicom_series

pytestmark = pytest.mark.slow

SMALL_NET = ["--set", "image_size=64", "--set", "channels=[8,16,32]", "--set", "strides=[2,2]", "--set", "num_res_units=1"]
SAMPLE_JPG = sorted((REPO / "data" / "brain-tumor-coco-sample" / "test").glob("*.jpg"))[0]
ANATOMICAL = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"


def predict(trained, *args, extra=()):
    return run_cli(
        "-m",
        "tumorseg.inference.predict",
        *map(str, args),
        "--checkpoint",
        str(trained / "models" / "model.pt"),
        *SMALL_NET,
        "--no-progress",
        *extra,
    )


def ok(result):
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def write_series(volume: np.ndarray, folder: Path, spacing=(0.9, 0.8, 2.5), origin=(10.0, -20.0, 30.0)) -> None:
    """A DICOM MR series of an (x, y, z) volume stored LPS (axial), names shuffled against slice order."""
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])  # LPS voxel axes in RAS
    affine[:3, 3] = [-origin[0], -origin[1], origin[2]]
    write_dicom_series(volume, affine, folder)


def test_nifti_geometry_round_trips_exactly(trained, tmp_path):
    ok(predict(trained, ANATOMICAL, "-o", tmp_path, extra=["--keep-largest"]))
    src, out = nib.load(ANATOMICAL), nib.load(tmp_path / "anatomical_seg.nii.gz")
    assert out.shape == src.shape
    assert np.array_equal(out.affine, src.affine)
    assert nib.aff2axcodes(out.affine) == nib.aff2axcodes(src.affine)
    assert set(np.unique(np.asarray(out.dataobj))) <= {0, 1}
    summary = json.loads((tmp_path / "anatomical.json").read_text())
    assert summary["shape"] == list(src.shape) and summary["spacing"] == [2.0, 2.0, 2.0]
    assert summary["tumour_volume_mm3"] == pytest.approx(summary["tumour_pixels"] * 8.0)
    assert summary["keep_largest"] is True
    assert Image.open(tmp_path / "anatomical_overlay.png").size[0] >= 64


def test_mni152_template_volume(trained, tmp_path):
    nilearn_datasets = pytest.importorskip("nilearn.datasets")
    template = nilearn_datasets.load_mni152_template(resolution=1)
    path = tmp_path / "mni152.nii.gz"
    nib.save(template, path)
    ok(predict(trained, path, "-o", tmp_path / "out", extra=["--tta"]))
    out = nib.load(tmp_path / "out" / "mni152_seg.nii.gz")
    assert out.shape == (197, 233, 189) and np.array_equal(out.affine, template.affine)
    assert json.loads((tmp_path / "out" / "mni152.json").read_text())["tta"] is True


def test_dicom_series_ordered_by_position_with_seg(trained, tmp_path):
    volume = np.asarray(nib.load(ANATOMICAL).dataobj, dtype=np.float32)
    write_series(volume, tmp_path / "series")
    ok(predict(trained, tmp_path / "series", "-o", tmp_path / "out"))
    out = nib.load(tmp_path / "out" / "series_seg.nii.gz")
    assert out.shape == volume.shape
    expected = np.diag([-0.9, -0.8, 2.5, 1.0])  # LPS -> RAS of the written geometry
    expected[:3, 3] = [-10.0, 20.0, 30.0]
    assert np.allclose(out.affine, expected)
    seg = pydicom.dcmread(tmp_path / "out" / "series_seg.dcm")
    source = pydicom.dcmread(next((tmp_path / "series").iterdir()))
    assert seg.Modality == "SEG"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    assert int(seg.NumberOfFrames) == volume.shape[2]
    # the slice order came from positions: a series predicted from sorted names gives the same mask
    sorted_dir = tmp_path / "sorted"
    sorted_dir.mkdir()
    for f in (tmp_path / "series").iterdir():
        k = int(pydicom.dcmread(f, stop_before_pixels=True).InstanceNumber)
        shutil.copy(f, sorted_dir / f"{k:03d}.dcm")
    ok(predict(trained, sorted_dir, "-o", tmp_path / "out2"))
    assert np.array_equal(np.asarray(out.dataobj), np.asarray(nib.load(tmp_path / "out2" / "sorted_seg.nii.gz").dataobj))


def test_one_slice_gives_the_same_mask_as_png_nifti_and_dicom(trained, tmp_path):
    grey = np.asarray(Image.open(SAMPLE_JPG).convert("L"), dtype=np.float32)  # (rows=y, cols=x)
    xy = grey.T
    # a slice as displayed is an axial slice stored LPS (x to the patient's left, y posterior)
    nib.save(nib.Nifti1Image(xy, np.diag([-1.0, -1.0, 1.0, 1.0])), tmp_path / "slice.nii")
    write_series(xy[:, :, None], tmp_path / "dicom")
    ok(predict(trained, SAMPLE_JPG, tmp_path / "slice.nii", tmp_path / "dicom", "-o", tmp_path / "out"))
    from_png = np.asarray(Image.open(tmp_path / "out" / f"{SAMPLE_JPG.stem}_seg.png")).T
    from_nifti = np.asarray(nib.load(tmp_path / "out" / "slice_seg.nii.gz").dataobj)
    from_dicom = np.asarray(nib.load(tmp_path / "out" / "dicom_seg.nii.gz").dataobj)[:, :, 0]
    assert from_png.shape == from_nifti.shape == from_dicom.shape == xy.shape
    assert np.array_equal(from_png, from_nifti)
    # DICOM stores 12-bit rescaled intensities: after min-max scaling they match to rounding
    agreement = (from_png == from_dicom).mean()
    assert agreement > 0.999


def test_standalone_bundle_inference_uses_sliding_windows_on_any_aspect_ratio(trained, tmp_path):
    from conftest import QUICK, check

    wide = tmp_path / "in"
    wide.mkdir()
    Image.open(SAMPLE_JPG).convert("L").resize((640, 400)).save(wide / "wide.png")
    check(
        run_cli(
            "-m",
            "monai.bundle",
            "run",
            "inference",
            "--config_file",
            INFERENCE,
            "--dataset_dir",
            str(wide),
            "--ckpt_dir",
            str(trained / "models"),
            "--output_dir",
            str(tmp_path / "out"),
            *QUICK,
        )
    )
    assert Image.open(tmp_path / "out" / "wide_seg.png").size == (640, 400)
