"""Crafted bad inputs for data_tools and tumorseg-predict: each gets one clear line (or the
documented handling), never a traceback, never a partial output. Plus property-based tests of
the COCO conversion."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import SAMPLE, edit_json, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from data_tools.coco_to_monai import ConversionError, convert

GOOD_JPG = sorted((SAMPLE / "test").glob("*.jpg"))[0]


def ann0(d):
    return d["annotations"][0]


# (name, how to break a copy of the sample, text expected in the one error line)
CONVERSION_CASES = [
    ("missing json", lambda r: (r / "valid" / "_annotations.coco.json").unlink(), "annotation file not found"),
    ("malformed json", lambda r: (r / "valid" / "_annotations.coco.json").write_text("{"), "malformed JSON"),
    ("binary json", lambda r: (r / "valid" / "_annotations.coco.json").write_bytes(b"\xff\xfe\x00"), "not UTF-8"),
    ("json not an object", lambda r: (r / "train" / "_annotations.coco.json").write_text("[]"), "not a JSON object"),
    ("images wrong type", lambda r: edit_json(r, "train", lambda d: d.update(images={})), "'images' list"),
    ("categories missing", lambda r: edit_json(r, "train", lambda d: d.pop("categories")), "'categories' list"),
    ("image id wrong type", lambda r: edit_json(r, "train", lambda d: d["images"][0].update(id="7")), "needs an integer 'id'"),
    (
        "file_name missing",
        lambda r: edit_json(r, "train", lambda d: d["images"][0].pop("file_name")),
        "needs an integer 'id' and a 'file_name'",
    ),
    (
        "duplicate image id",
        lambda r: edit_json(r, "train", lambda d: d["images"][1].update(id=d["images"][0]["id"])),
        "listed twice",
    ),
    (
        "duplicate annotation id",
        lambda r: edit_json(r, "train", lambda d: d["annotations"][1].update(id=ann0(d)["id"])),
        "is listed twice",
    ),
    ("image missing on disk", lambda r: next((r / "test").glob("*.jpg")).unlink(), "listed in the annotations but not found"),
    ("zero-byte image", lambda r: next((r / "test").glob("*.jpg")).write_bytes(b""), "not a readable image"),
    (
        "truncated image",
        lambda r: (lambda p: p.write_bytes(p.read_bytes()[:2000]))(next((r / "test").glob("*.jpg"))),
        "not a readable image",
    ),
    (
        "path escapes split",
        lambda r: edit_json(r, "valid", lambda d: d["images"][0].update(file_name="../train/x.jpg")),
        "escapes the split folder",
    ),
    (
        "absolute path",
        lambda r: edit_json(r, "valid", lambda d: d["images"][0].update(file_name="/etc/passwd")),
        "escapes the split folder",
    ),
    ("unknown category", lambda r: edit_json(r, "train", lambda d: ann0(d).update(category_id=9)), "unknown category_id 9"),
    ("unknown image_id", lambda r: edit_json(r, "train", lambda d: ann0(d).update(image_id=99999)), "unknown image_id 99999"),
    (
        "NaN coordinate",
        lambda r: edit_json(r, "train", lambda d: ann0(d)["segmentation"][0].__setitem__(0, float("nan"))),
        "finite x,y pairs",
    ),
    (
        "string coordinate",
        lambda r: edit_json(r, "train", lambda d: ann0(d)["segmentation"][0].__setitem__(0, "12")),
        "finite x,y pairs",
    ),
    ("two-point polygon", lambda r: edit_json(r, "train", lambda d: ann0(d).update(segmentation=[[1, 1, 5, 5]])), "at least 3"),
    (
        "no polygon, no bbox",
        lambda r: edit_json(r, "train", lambda d: [ann0(d).pop(k) for k in ("segmentation", "bbox")]),
        "no polygon segmentation and no bbox",
    ),
    ("size differs from json", lambda r: edit_json(r, "train", lambda d: d["images"][0].update(height=100)), "but the json says"),
]


@pytest.fixture
def broken(tmp_path):
    root = tmp_path / "kaggle"
    shutil.copytree(SAMPLE, root)
    return root


@pytest.mark.parametrize("name, breaker, problem", CONVERSION_CASES, ids=[c[0] for c in CONVERSION_CASES])
def test_conversion_refuses_bad_input(broken, tmp_path, name, breaker, problem):
    breaker(broken)
    out = tmp_path / "out"
    messages = []
    with pytest.raises(ConversionError, match=None) as caught:
        convert(broken, out, progress=False, log=messages.append)
    line = f"error: {caught.value}"
    assert problem in line and "\n" not in line
    assert str(broken) in line  # names the file
    assert not out.exists()


def test_bbox_only_annotation_is_drawn_as_its_box(broken, tmp_path):
    edit_json(broken, "train", lambda d: ann0(d).pop("segmentation"))
    convert(broken, tmp_path / "out", progress=False, log=lambda s: None)  # documented: the bbox is used


def test_cli_refusal_is_one_line_without_traceback(broken, tmp_path):
    edit_json(broken, "train", lambda d: ann0(d).update(category_id=9))
    result = run_cli("-m", "data_tools", str(broken), str(tmp_path / "out"), "--no-progress")
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


# ---- tumorseg-predict -----------------------------------------------------------------------


def make_bad_inputs(folder: Path) -> dict[str, str]:
    """Files that must each fail with one line; returns name -> expected text."""
    folder.mkdir()
    data = GOOD_JPG.read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.png").write_text("not an image")
    Image.new("L", (32, 32), 9).save(folder / "flat.png")
    Image.new("1", (20000, 20000)).save(folder / "enormous.png")  # past Pillow's decompression-bomb limit
    nan = np.ones((16, 16, 4), np.float32)
    nan[3, 3, 1] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), folder / "nan.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((8, 8, 4, 3), np.float32), np.eye(4)), folder / "four_d.nii.gz")
    full = (Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii").read_bytes()
    (folder / "broken_header.nii").write_bytes(full[:200])
    ds = pydicom.dcmread(pydicom.data.get_testdata_file("MR_small.dcm"))
    del ds.PixelData
    ds.save_as(folder / "no_pixels.dcm")
    shutil.copy(pydicom.data.get_testdata_file("MR_truncated.dcm"), folder / "truncated.dcm")
    (folder / "notes.txt").write_text("ignored: not an image suffix")
    return {
        "truncated.jpg": "unreadable image",
        "zero.jpg": "unreadable image",
        "text.png": "unreadable image",
        "enormous.png": "DecompressionBomb",
        "nan.nii.gz": "NaN",
        "four_d.nii.gz": "4D image",
        "broken_header.nii": "unreadable NIfTI",
        "no_pixels.dcm": "unreadable DICOM",
        "truncated.dcm": "unreadable DICOM",
    }


@pytest.mark.slow
def test_predict_bad_inputs(trained, tmp_path):
    bad = tmp_path / "bad"
    expected = make_bad_inputs(bad)
    # more ways to be wrong, given on the command line
    (tmp_path / "folder.png").mkdir()  # a folder named like an image (empty)
    (tmp_path / "loop").symlink_to(tmp_path / "loop")  # a symlink loop
    (tmp_path / "explicit.txt").write_text("x")
    shutil.copy(GOOD_JPG, bad / "good.jpg")
    rgba = Image.open(GOOD_JPG).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(bad / "alpha.png")  # documented: alpha is dropped, the grey image is used
    grey16 = np.asarray(Image.open(GOOD_JPG).convert("L"), dtype=np.uint16) * 257
    Image.fromarray(grey16).save(bad / "sixteen_bit.png")  # documented: 16-bit grey is read as is
    from test_predict import SMALL_NET

    result = run_cli(
        "-m",
        "tumorseg.inference.predict",
        str(bad),
        str(tmp_path / "folder.png"),
        str(tmp_path / "loop"),
        str(tmp_path / "explicit.txt"),
        str(tmp_path / "missing.jpg"),
        "-o",
        str(tmp_path / "out"),
        "--checkpoint",
        str(trained / "models" / "model.pt"),
        *SMALL_NET,
        "--no-progress",
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    expected.update(
        {
            "folder.png": "no PNG/JPG/NIfTI/DICOM files",
            "loop": "no such file or folder",
            "explicit.txt": "not a PNG/JPG, NIfTI or DICOM file",
            "missing.jpg": "no such file or folder",
        }
    )
    for name, problem in expected.items():
        assert any(f"/{name}:" in e and problem in e for e in errors), (name, problem, errors)
    assert len(errors) == len(expected)
    assert "4 of 17 inputs predicted" in result.stdout  # 13 cases found (4 good), 4 inputs that were none
    out = sorted(
        p.name for p in (tmp_path / "out").iterdir() if p.name != ".tumorseg-predict.json"
    )  # the record of what it wrote
    stems = {"good", "alpha", "sixteen_bit", "flat"}  # a flat image is no error: it holds no tumour
    assert {n.split("_seg")[0].split("_overlay")[0].split(".json")[0] for n in out} == stems  # nothing partial
    assert Image.open(tmp_path / "out" / "sixteen_bit_seg.png").size == Image.open(GOOD_JPG).size
    assert not np.asarray(Image.open(tmp_path / "out" / "flat_seg.png")).any()


# ---- property-based: the COCO conversion ----------------------------------------------------


@st.composite
def coco_split(draw):
    images, annotations = [], []
    for i in range(draw(st.integers(1, 3))):
        w, h = draw(st.integers(8, 40)), draw(st.integers(8, 40))
        images.append({"id": i, "file_name": f"img{i}.png", "width": w, "height": h})
        for _ in range(draw(st.integers(0, 3))):
            x0, y0 = draw(st.floats(-5, w + 5)), draw(st.floats(-5, h + 5))
            bw, bh = draw(st.floats(0.5, w)), draw(st.floats(0.5, h))
            poly = [x0, y0, x0 + bw, y0, x0 + bw, y0 + bh, x0, y0 + bh]
            annotations.append(
                {
                    "id": len(annotations),
                    "image_id": i,
                    "category_id": draw(st.sampled_from([1, 2])),
                    "bbox": [x0, y0, bw, bh],
                    "segmentation": [poly],
                }
            )
    return {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 0, "name": "Tumor"}, {"id": 1, "name": "0"}, {"id": 2, "name": "1"}],
    }


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(coco=coco_split(), keep=st.booleans())
def test_conversion_properties(coco, keep):
    with tempfile.TemporaryDirectory() as tmp:
        root, out = Path(tmp) / "in", Path(tmp) / "out"
        (root / "train").mkdir(parents=True)
        for im in coco["images"]:
            Image.new("L", (im["width"], im["height"]), 50).save(root / "train" / im["file_name"])
        (root / "train" / "_annotations.coco.json").write_text(json.dumps(coco))
        datalist = convert(root, out, splits={"training": "train"}, keep_categories=keep, progress=False, log=lambda s: None)
        assert len(datalist["training"]) == len(coco["images"])
        first = {p: p.read_bytes() for p in out.rglob("*.png")}
        convert(root, out, splits={"training": "train"}, keep_categories=keep, progress=False, log=lambda s: None)
        assert first == {p: p.read_bytes() for p in out.rglob("*.png")}  # deterministic
        for im in coco["images"]:
            mask = np.asarray(Image.open(out / "labels" / "train" / f"img{im['id']}.png"))
            assert mask.shape == (im["height"], im["width"])  # the image's own size
            allowed = {0, 1, 2} if keep else {0, 1}
            assert set(np.unique(mask)) <= allowed
            boxes = [a["bbox"] for a in coco["annotations"] if a["image_id"] == im["id"]]
            inside = np.zeros_like(mask, dtype=bool)
            for x, y, w, h in boxes:  # every labelled pixel lies in some box (to a pixel)
                inside[
                    max(0, int(np.floor(y)) - 1) : int(np.ceil(y + h)) + 1, max(0, int(np.floor(x)) - 1) : int(np.ceil(x + w)) + 1
                ] = True
            assert not (mask.astype(bool) & ~inside).any()
            if not boxes:
                assert not mask.any()
