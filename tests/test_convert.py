"""data_tools: Kaggle COCO -> PNG masks + MONAI datalist, on the real sample and crafted inputs."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLE, edit_json, run_cli
from PIL import Image

from data_tools.coco_to_monai import ConversionError, convert

EMPTY_IMAGE = "2369_jpg.rf.8b8afa9d79c61fa42ca128c940b9cbc0.jpg"
TWO_BOXES = "176_jpg.rf.23ef40c30986ba54b865d55a934bfa72.jpg"


def tree_digest(folder: Path) -> dict:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def mask_of(out: Path, split: str, image_name: str) -> np.ndarray:
    return np.array(Image.open(out / "labels" / split / (Path(image_name).stem + ".png")))


@pytest.fixture
def sample_copy(tmp_path) -> Path:
    """A writable copy of the sample to break in various ways."""
    dst = tmp_path / "kaggle"
    shutil.copytree(SAMPLE, dst)
    return dst


def test_sample_converts_to_monai_datalist(converted_sample):
    from monai.data import load_decathlon_datalist

    datalist = converted_sample / "datalist.json"
    counts = {}
    for key in ("training", "validation", "test"):
        items = load_decathlon_datalist(datalist, data_list_key=key, base_dir=converted_sample)
        counts[key] = len(items)
        for item in items:
            image, label = Image.open(item["image"]), Image.open(item["label"])
            assert label.mode == "L" and label.size == image.size
            assert set(np.unique(np.array(label))) <= {0, 1}
    assert counts == {"training": 24, "validation": 8, "test": 8}


def test_masks_are_the_annotated_boxes(converted_sample):
    coco = json.loads((SAMPLE / "train" / "_annotations.coco.json").read_text())
    images = {im["id"]: im for im in coco["images"]}
    for ann in coco["annotations"][:10]:
        im = images[ann["image_id"]]
        if sum(a["image_id"] == im["id"] for a in coco["annotations"]) > 1:
            continue
        mask = mask_of(converted_sample, "train", im["file_name"])
        ys, xs = np.nonzero(mask)
        x, y, w, h = ann["bbox"]
        # pycocotools fills the pixels whose centres lie inside the polygon: within a pixel of the box
        assert abs(xs.min() - x) <= 1 and abs(ys.min() - y) <= 1
        assert abs(xs.max() + 1 - (x + w)) <= 1 and abs(ys.max() + 1 - (y + h)) <= 1
        assert mask.sum() == pytest.approx(w * h, rel=0.05)


def test_image_without_annotation_gives_empty_mask(converted_sample):
    assert mask_of(converted_sample, "train", EMPTY_IMAGE).max() == 0


def test_tiny_second_box_is_kept(converted_sample):
    # a 2.5 x 7.5 px box at x 471.25-473.75, y 326.25-333.75, just under the big box (y < 327.5)
    mask = mask_of(converted_sample, "train", TWO_BOXES)
    assert mask[328:334, 471:474].all()
    assert not mask[328:334, 474:480].any() and not mask[334:340, 471:474].any()


def test_overlaps_union_by_default_and_highest_category_when_kept(sample_copy, tmp_path):
    def add_overlap(data):
        first = data["annotations"][0]
        x, y, w, h = first["bbox"]
        data["annotations"].append(
            {
                "id": 9999,
                "image_id": first["image_id"],
                "category_id": 2 if first["category_id"] == 1 else 1,
                "bbox": [x + w / 2, y, w, h],
                "segmentation": [[x + w / 2, y, x + 1.5 * w, y, x + 1.5 * w, y + h, x + w / 2, y + h]],
            }
        )

    edit_json(sample_copy, "train", add_overlap)
    coco = json.loads((sample_copy / "train" / "_annotations.coco.json").read_text())
    name = next(im["file_name"] for im in coco["images"] if im["id"] == coco["annotations"][0]["image_id"])
    convert(sample_copy, tmp_path / "binary", progress=False, log=lambda s: None)
    convert(sample_copy, tmp_path / "cats", keep_categories=True, progress=False, log=lambda s: None)
    binary, cats = mask_of(tmp_path / "binary", "train", name), mask_of(tmp_path / "cats", "train", name)
    assert set(np.unique(binary)) == {0, 1}
    assert set(np.unique(cats)) == {0, 1, 2}
    assert np.array_equal(binary > 0, cats > 0)
    x, y, w, h = coco["annotations"][0]["bbox"]
    overlap = cats[int(y + h / 2), int(x + w * 0.75)]
    assert overlap == 2  # the highest category id wins where boxes overlap


def test_rerun_is_byte_identical_and_input_untouched(tmp_path):
    before = tree_digest(SAMPLE)
    convert(SAMPLE, tmp_path / "a", progress=False, log=lambda s: None)
    first = tree_digest(tmp_path / "a")
    convert(SAMPLE, tmp_path / "a", progress=False, log=lambda s: None)
    assert tree_digest(tmp_path / "a") == first
    convert(SAMPLE, tmp_path / "b", progress=False, log=lambda s: None)
    assert tree_digest(tmp_path / "b") == first  # same bytes in another folder too
    assert tree_digest(SAMPLE) == before


def test_other_split_folder_names(sample_copy, tmp_path):
    (sample_copy / "valid").rename(sample_copy / "val")
    result = run_cli("-m", "data_tools", str(sample_copy), str(tmp_path / "out"), "--split", "validation=val", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert len(json.loads((tmp_path / "out" / "datalist.json").read_text())["validation"]) == 8


def test_missing_split_folder_gives_empty_list(sample_copy, tmp_path):
    shutil.rmtree(sample_copy / "test")
    result = run_cli("-m", "data_tools", str(sample_copy), str(tmp_path / "out"), "--no-progress")
    assert result.returncode == 0
    assert "the 'test' list is empty" in result.stderr
    assert json.loads((tmp_path / "out" / "datalist.json").read_text())["test"] == []


def _break_missing_json(root):
    (root / "valid" / "_annotations.coco.json").unlink()


def _break_malformed_json(root):
    (root / "valid" / "_annotations.coco.json").write_text('{"images": [')


def _break_missing_image(root):
    next((root / "test").glob("*.jpg")).unlink()


def _break_escaping_name(root):
    edit_json(root, "valid", lambda d: d["images"][0].update(file_name="../train/" + d["images"][0]["file_name"]))


def _break_unknown_category(root):
    edit_json(root, "train", lambda d: d["annotations"][3].update(category_id=7))


def _break_not_json_object(root):
    (root / "train" / "_annotations.coco.json").write_text("[1, 2]")


def _break_wrong_size(root):
    edit_json(root, "train", lambda d: d["images"][0].update(width=320))


@pytest.mark.parametrize(
    "breaker, where, problem",
    [
        (_break_missing_json, "valid/_annotations.coco.json", "annotation file not found"),
        (_break_malformed_json, "valid/_annotations.coco.json", "malformed JSON"),
        (_break_missing_image, "test/", "listed in the annotations but not found"),
        (_break_escaping_name, "valid/_annotations.coco.json", "escapes the split folder"),
        (_break_unknown_category, "train/_annotations.coco.json", "unknown category_id 7"),
        (_break_not_json_object, "train/_annotations.coco.json", "not a JSON object"),
        (_break_wrong_size, "train/", "but the json says 320x640"),
    ],
)
def test_bad_input_is_refused_with_one_line(sample_copy, tmp_path, breaker, where, problem):
    breaker(sample_copy)
    before = tree_digest(sample_copy)
    out = tmp_path / "out"
    result = run_cli("-m", "data_tools", str(sample_copy), str(out), "--no-progress")
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert where in lines[0] and problem in lines[0]
    assert not out.exists()  # nothing written
    assert tree_digest(sample_copy) == before  # input untouched


def test_output_inside_input_is_refused(sample_copy):
    result = run_cli("-m", "data_tools", str(sample_copy), str(sample_copy / "converted"), "--no-progress")
    assert result.returncode == 1 and "separate from the input" in result.stderr
    assert not (sample_copy / "converted").exists()


def test_coordinates_outside_the_image_are_clipped_and_reported(sample_copy, tmp_path):
    def push_out(data):
        ann = data["annotations"][0]
        ann["segmentation"] = [[-20, -10, 700, -10, 700, 50, -20, 50]]

    edit_json(sample_copy, "train", push_out)
    messages = []
    convert(sample_copy, tmp_path / "out", progress=False, log=messages.append)
    assert any("reaches outside the 640x640 image; clipped" in m for m in messages)
    coco = json.loads((sample_copy / "train" / "_annotations.coco.json").read_text())
    name = next(im["file_name"] for im in coco["images"] if im["id"] == coco["annotations"][0]["image_id"])
    mask = mask_of(tmp_path / "out", "train", name)
    assert mask[:50].all() and not mask[51:].any()


def test_console_script_help_is_light():
    result = run_cli("-X", "importtime", "-m", "data_tools", "--help")
    assert result.returncode == 0 and "KEY=FOLDER" in result.stdout
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in result.stderr.splitlines() if "|" in line}
    assert not imported & {"torch", "monai", "numpy", "PIL"}  # no heavy import for --help


def test_conversion_error_names_file():
    with pytest.raises(ConversionError, match="input folder not found"):
        convert("/nonexistent/kaggle", "/tmp/never", progress=False)
