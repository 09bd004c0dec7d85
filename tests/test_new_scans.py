"""New scans with the shipped weights: healthy brains get no tumour, images without anatomy get
nothing, and the mask does not depend on how a file stores its voxels (real files that ship
inside packages, and the embedded Kaggle sample)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import SAMPLE, run_cli
from PIL import Image

from data_tools.nifti_to_dicom import write_series

pytestmark = pytest.mark.slow

# every axis order with every flip: 48 ways to store one volume (a nibabel orientation array each)
ORIENTATIONS = [
    np.array([[axis, flip] for axis, flip in zip(perm, flips)])
    for perm in itertools.permutations(range(3))
    for flips in itertools.product((1, -1), repeat=3)
]
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # voxel (x, y, z) -> RAS of an LPS-stored volume, 1 mm


def predict(*args, extra=()):
    result = run_cli("-m", "tumorseg.inference.predict", *map(str, args), "--no-progress", *extra)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def in_patient_space(path: Path) -> np.ndarray:
    """A mask file's data in one fixed voxel order (nibabel's closest canonical, RAS)."""
    return np.asarray(nib.as_closest_canonical(nib.load(path)).dataobj) > 0


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * (a & b).sum() / total


@pytest.fixture(scope="module")
def tumour_volume(tmp_path_factory) -> tuple[Path, list[Path]]:
    """Kaggle slices of the embedded sample stacked into an LPS volume (NIfTI), and the slices."""
    slices = sorted((SAMPLE / "test").glob("*.jpg"))[:5]
    xy = [np.asarray(Image.open(p).convert("L"), dtype=np.float32).T for p in slices]  # (x, y) as MONAI reads
    folder = tmp_path_factory.mktemp("tumour")
    path = folder / "stack.nii.gz"
    nib.save(nib.Nifti1Image(np.stack(xy, axis=-1), LPS), path)
    return path, slices


def test_mask_does_not_depend_on_storage_order(tumour_volume, tmp_path):
    """Without the flip TTA, whose average over flips could hide a flipped axis."""
    path, slices = tumour_volume
    img = nib.load(path)
    rng = np.random.default_rng(0)
    picks = [ORIENTATIONS[i] for i in rng.choice(len(ORIENTATIONS), size=5, replace=False)]
    inputs = []
    for i, ornt in enumerate(picks):
        stored = img.as_reoriented(ornt)
        inputs.append(tmp_path / f"order{i}.nii.gz")
        nib.save(stored, inputs[-1])
    stored = img.as_reoriented(picks[0])
    write_series(np.asarray(stored.dataobj), stored.affine, tmp_path / "dicom")
    predict(path, *inputs, tmp_path / "dicom", *slices, "-o", tmp_path / "out", extra=["--no-tta"])
    reference = in_patient_space(tmp_path / "out" / "stack_seg.nii.gz")
    assert reference.sum() > 1000, "the tumour slices must get a tumour"
    for name in [f"order{i}" for i in range(len(picks))] + ["dicom"]:
        other = in_patient_space(tmp_path / "out" / f"{name}_seg.nii.gz")
        assert dice(reference, other) >= 0.99, name
    # the PNG/JPG path gives the same slices as the volume stored as displayed (LPS)
    stacked = np.asarray(nib.load(tmp_path / "out" / "stack_seg.nii.gz").dataobj) > 0
    for k, jpg in enumerate(slices):
        png = np.asarray(Image.open(tmp_path / "out" / f"{jpg.stem}_seg.png")).T > 0
        assert dice(png, stacked[..., k]) >= 0.99, jpg.name


@pytest.mark.parametrize("resolution", [1, 2])
def test_healthy_template_gets_no_tumour(tmp_path, resolution):
    nilearn_datasets = pytest.importorskip("nilearn.datasets")
    template = nilearn_datasets.load_mni152_template(resolution=resolution)
    inputs = [tmp_path / "mni.nii.gz"]
    nib.save(template, inputs[0])
    # other voxel orders, among them sagittal- and coronal-first ones (at 1 mm one, to keep the suite short)
    for i in (5, 17, 42) if resolution == 2 else (5,):
        inputs.append(tmp_path / f"mni_{i}.nii.gz")
        nib.save(template.as_reoriented(ORIENTATIONS[i]), inputs[-1])
    if resolution == 2:
        write_series(np.asarray(template.dataobj, dtype=np.float32), template.affine, tmp_path / "mni_dicom")
        inputs.append(tmp_path / "mni_dicom")
    predict(*inputs, "-o", tmp_path / "out")
    for path in inputs:
        stem = path.name.split(".")[0]
        summary = json.loads((tmp_path / "out" / f"{stem}.json").read_text())
        assert summary["tumour_volume_mm3"] <= 1000.0, (stem, summary["tumour_volume_mm3"], summary["slices_with_tumour"])


def test_images_without_anatomy_get_nothing(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "in"
    folder.mkdir()
    Image.new("L", (256, 256), 0).save(folder / "black.png")
    Image.new("L", (300, 200), 140).save(folder / "constant.png")
    Image.fromarray(rng.integers(0, 256, (256, 256), dtype=np.uint8)).save(folder / "noise.png")
    Image.fromarray(np.clip(rng.normal(128, 40, (240, 320)), 0, 255).astype(np.uint8)).save(folder / "gaussian.jpg")
    nib.save(nib.Nifti1Image(np.zeros((64, 64, 20), np.float32), np.eye(4)), folder / "black.nii.gz")
    nib.save(nib.Nifti1Image(np.full((64, 64, 20), 7.0, np.float32), np.eye(4)), folder / "constant.nii.gz")
    nib.save(nib.Nifti1Image(rng.random((96, 96, 20)).astype(np.float32), np.eye(4)), folder / "noise.nii.gz")
    predict(folder, "-o", tmp_path / "out")
    summaries = [p for p in (tmp_path / "out").glob("*.json") if p.name != ".tumorseg-predict.json"]
    assert len(summaries) == 7
    for path in summaries:
        assert json.loads(path.read_text())["tumour_pixels"] == 0, path.name


def test_overlay_shows_axial_slices_with_orientation_letters(tumour_volume, tmp_path):
    path, _ = tumour_volume
    out = tmp_path / "out"
    predict(path, "-o", out)
    summary = json.loads((out / "stack.json").read_text())
    assert summary["slicing"].startswith("canonical LPS")
    assert Image.open(out / "stack_overlay.png").size[0] >= 256


def test_axis_override_slices_as_stored(tumour_volume, tmp_path):
    """``--axis`` slices the voxel array as stored, with no reorientation, for a header that lies:
    here the slices of the stored axis 1 are the volume's own (x, y) slices, while the affine
    (identity) calls axis 2 the axial one. The override gives the stack's own mask, in the stored
    voxel order."""
    path, _ = tumour_volume
    img = nib.load(path)
    stored = img.as_reoriented(np.array([[0, 1], [2, 1], [1, 1]]))  # x, y, z stored as x, z, y
    assert stored.shape == (640, 5, 640)
    nib.save(nib.Nifti1Image(np.asarray(stored.dataobj), np.eye(4)), tmp_path / "xzy.nii.gz")
    predict(path, "-o", tmp_path / "canonical")
    predict(tmp_path / "xzy.nii.gz", "-o", tmp_path / "out", extra=["--axis", "1"])
    summary = json.loads((tmp_path / "out" / "xzy.json").read_text())
    assert summary["slicing"] == "voxel axis 1 as stored"
    reference = np.asarray(nib.load(tmp_path / "canonical" / "stack_seg.nii.gz").dataobj) > 0
    assert reference.sum() > 1000, "the tumour slices must get a tumour"
    mask = np.asarray(nib.load(tmp_path / "out" / "xzy_seg.nii.gz").dataobj) > 0  # in the stored voxel order
    assert mask.shape == (640, 5, 640)
    assert dice(np.moveaxis(mask, 1, 2), reference) >= 0.99  # the same five slices, reached through the override


def test_healthy_builder_reports_its_sources(tmp_path):
    """data_tools.healthy on the embedded sample: negatives with empty labels, held-out lists."""
    from data_tools.coco_to_monai import convert

    convert(SAMPLE, tmp_path / "sample", progress=False, log=lambda line: None)
    result = run_cli(
        "-m", "data_tools.healthy", str(tmp_path / "sample"), str(tmp_path / "neg"), "--variants", "1", "--synthetic", "5"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    datalist = json.loads((tmp_path / "neg" / "datalist.json").read_text())
    assert set(datalist["negatives"]) >= {"mni_t1", "epi", "synthetic", "mirror_validation", "heldout_tlrc"}
    healthy = {Path(item["image"]).parent.name for item in datalist["healthy"]}
    trained = {Path(item["image"]).parent.name for item in datalist["training"]}
    assert not healthy & trained, "held-out sources must never be trained on"
    for item in datalist["healthy"][:5] + datalist["training"][-5:]:
        assert not np.asarray(Image.open(tmp_path / "neg" / item["label"])).any()
    assert len(datalist["presence"]) == len(datalist["validation"]) + len(datalist["healthy"])
