"""The bundle as a model-zoo user meets it: checked by MONAI's own bundle tools, run from any
directory with ``--bundle_root`` (a copy of it, outside the repository), and one preprocessing:
its inference and ``tumorseg-predict`` give the same masks on PNG/JPG, NIfTI and DICOM inputs."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import BUNDLE, CONFIGS, INFERENCE, QUICK, REPO, SAMPLE, check, run_cli
from PIL import Image

import tumorseg
from data_tools.nifti_to_dicom import write_series

SCHEMA = REPO / "tests" / "data" / "meta_schema_20240725.json"  # the official schema (SOURCE.md beside it)
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # voxel (x, y, z) -> RAS of an LPS-stored volume, 1 mm
NETWORK = QUICK[:8]  # the small network's settings (image_size, channels, strides, res units)


def digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_metadata_passes_verify_metadata(tmp_path):
    meta = CONFIGS / "metadata.json"
    check(run_cli("-m", "monai.bundle", "verify_metadata", "--meta_file", str(meta), "--filepath", str(SCHEMA), cwd=tmp_path))
    metadata = json.loads(meta.read_text())
    pred = metadata["network_data_format"]["outputs"]["pred"]
    assert pred["num_channels"] == len(pred["channel_def"]) == 1  # one tumour logit
    assert metadata["required_packages_version"]["tumorseg"] == tumorseg.__version__ == metadata["version"]


def test_network_passes_verify_net_in_out(tmp_path):
    args = ["verify_net_in_out", "network_def", "--meta_file", str(CONFIGS / "metadata.json"), "--config_file", INFERENCE]
    result = check(run_cli("-m", "monai.bundle", *args, "--bundle_root", str(BUNDLE), cwd=tmp_path))
    assert "verified with no error" in result.stdout + result.stderr


@pytest.mark.slow
def test_training_evaluate_and_inference_run_from_another_directory(converted_sample, tmp_path):
    copy = tmp_path / "elsewhere" / BUNDLE.name
    shutil.copytree(BUNDLE, copy, ignore=shutil.ignore_patterns("eval", "last", "__pycache__"))
    before = digests(BUNDLE / "configs") | {"model.pt": digests(BUNDLE / "models")["model.pt"]}
    cwd = tmp_path / "cwd"
    cwd.mkdir()

    def bundle(*args, configs):
        config_file = str([str(copy / "configs" / name) for name in configs])
        args = (*args, "--config_file", config_file, "--bundle_root", str(copy))
        return check(run_cli("-m", "monai.bundle", "run", *args, cwd=cwd))

    shipped = (copy / "models" / "model.pt").read_bytes()
    bundle("run", "--dataset_dir", str(converted_sample), "--max_epochs", "1", *QUICK, configs=["common.yaml", "train.yaml"])
    assert (copy / "models" / "model.pt").read_bytes() != shipped  # trained into the copy, from bundle_root
    assert (copy / "eval" / "metrics.jsonl").is_file()
    bundle(
        "--dataset_dir", str(converted_sample), "--eval_list", "validation", *QUICK,
        configs=["common.yaml", "train.yaml", "evaluate.yaml"],
    )  # fmt: skip
    summary = json.loads((copy / "eval" / "evaluate_validation" / "summary.json").read_text())
    assert summary["images"] == len(json.loads((converted_sample / "datalist.json").read_text())["validation"])
    bundle("inference", "--input_dir", str(SAMPLE / "test"), *NETWORK, configs=["common.yaml", "inference.yaml"])
    masks = sorted((copy / "eval" / "inference").glob("*_seg.png"))
    assert len(masks) == len(list((SAMPLE / "test").glob("*.jpg")))
    assert list(cwd.iterdir()) == []  # nothing written relative to the working directory
    assert digests(BUNDLE / "configs") | {"model.pt": digests(BUNDLE / "models")["model.pt"]} == before


@pytest.mark.slow
def test_bundle_inference_and_tumorseg_predict_give_identical_masks(tmp_path):
    """The shipped weights, TTA and box fit on: JPG slices (one cut to a non-square PNG), a NIfTI
    volume of tumour slices, the same volume as a DICOM series."""
    slices = sorted((SAMPLE / "test").glob("*.jpg"))[:3]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for path in slices[:2]:
        shutil.copy(path, inputs / path.name)
    with Image.open(slices[2]) as im:
        im.convert("L").crop((40, 100, 600, 500)).save(inputs / "wide.png")
    xy = [np.asarray(Image.open(p).convert("L"), dtype=np.float32).T for p in slices]
    nib.save(nib.Nifti1Image(np.stack(xy, axis=-1), LPS), inputs / "stack.nii.gz")
    series = tmp_path / "series"
    write_series(np.stack(xy, axis=-1), LPS, series)

    bundle_out, predict_out = tmp_path / "bundle", tmp_path / "predict"
    for folder, out in ((inputs, bundle_out), (series, bundle_out / "series")):
        check(
            run_cli(
                "-m", "monai.bundle", "run", "inference", "--config_file", INFERENCE, "--bundle_root", str(BUNDLE),
                "--input_dir", str(folder), "--output_dir", str(out), cwd=tmp_path,
            )
        )  # fmt: skip
    check(run_cli("-m", "tumorseg.inference.predict", str(inputs), str(series), "-o", str(predict_out), "--no-progress"))

    pairs = [(bundle_out / f"{p.stem}_seg.png", predict_out / f"{p.stem}_seg.png") for p in slices[:2]]
    pairs += [(bundle_out / "wide_seg.png", predict_out / "wide_seg.png")]
    pairs += [(bundle_out / "stack_seg.nii.gz", predict_out / "stack_seg.nii.gz")]
    pairs += [(bundle_out / "series" / "series_seg.nii.gz", predict_out / "series_seg.nii.gz")]
    total = 0
    for ours, theirs in pairs:
        if ours.suffix == ".png":
            a, b = np.asarray(Image.open(ours)), np.asarray(Image.open(theirs))
        else:
            a, b = np.asarray(nib.load(ours).dataobj), np.asarray(nib.load(theirs).dataobj)
        assert a.shape == b.shape and np.array_equal(a, b), ours.name
        total += int(a.sum())
    assert total > 0  # tumour slices: the masks compared hold tumour
    assert (bundle_out / "series" / "series_seg.dcm").is_file()  # DICOM SEG from the bundle too
