"""data_tools on hostile and unusual inputs, all derived from the real sample: clashing output
names, COCO RLE, an image listed twice, degenerate boxes, a root without splits, forged lines and
numbers that used to end in a traceback, 16-bit PNGs and EXIF orientation. Plus properties of the
label names."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLE, edit_json, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from data_tools.coco_to_monai import convert, label_paths, show

QUIET = {"progress": False, "log": lambda line: None}


def tree_digest(folder: Path) -> dict:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def coco(root: Path, split: str = "train") -> dict:
    return json.loads((root / split / "_annotations.coco.json").read_text())


def single(data: dict, nth: int = 0) -> tuple[dict, dict]:
    """The nth image with exactly one annotation, and that annotation."""
    found = []
    for im in data["images"]:
        anns = [a for a in data["annotations"] if a["image_id"] == im["id"]]
        if len(anns) == 1:
            found.append((im, anns[0]))
    return found[nth]


def add_image(data: dict, file_name: str, segmentation: list, width: int = 640, height: int = 640) -> int:
    """List ``file_name`` under a new image id with one annotation; returns the id."""
    iid = max(im["id"] for im in data["images"]) + 1
    aid = max(a["id"] for a in data["annotations"]) + 1
    data["images"].append({"id": iid, "file_name": file_name, "width": width, "height": height})
    xs, ys = segmentation[0][0::2], segmentation[0][1::2]
    data["annotations"].append(
        {
            "id": aid,
            "image_id": iid,
            "category_id": 1,
            "iscrowd": 0,
            "segmentation": segmentation,
            "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
        }
    )
    return iid


def label(out: Path, rel: str) -> np.ndarray:
    return np.asarray(Image.open(out / "labels" / "train" / rel))


def cli(root: Path, out: Path):
    return run_cli("-m", "data_tools", str(root), str(out), "--no-progress")


@pytest.fixture
def sample_copy(tmp_path) -> Path:
    dst = tmp_path / "kaggle"
    shutil.copytree(SAMPLE, dst)
    return dst


BOX = [[20, 30, 120, 30, 120, 90, 20, 90]]  # x 20-120, y 30-90


def box_mask(width=640, height=640) -> np.ndarray:
    m = np.zeros((height, width), np.uint8)
    m[30:90, 20:120] = 1
    return m


# ---- 1. output names never collide ---------------------------------------------------------


def test_same_stem_with_other_suffix_keeps_the_suffix(sample_copy, tmp_path, converted_sample):
    im, _ = single(coco(sample_copy))
    stem = Path(im["file_name"]).stem
    Image.open(sample_copy / "train" / im["file_name"]).save(sample_copy / "train" / f"{stem}.png")
    edit_json(sample_copy, "train", lambda d: add_image(d, f"{stem}.png", BOX))
    result = cli(sample_copy, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "out" / "datalist.json").read_text())["training"]
    assert len(rows) == 25 and len({r["label"] for r in rows}) == 25
    assert not (tmp_path / "out" / "labels" / "train" / f"{stem}.png").exists()
    assert np.array_equal(label(tmp_path / "out", f"{stem}_jpg.png"), label(converted_sample, f"{stem}.png"))
    assert np.array_equal(label(tmp_path / "out", f"{stem}_png.png"), box_mask())
    others = {r["label"] for r in rows} - {f"labels/train/{stem}_jpg.png", f"labels/train/{stem}_png.png"}
    assert others == {f"labels/train/{p.stem}.png" for p in (SAMPLE / "train").glob("*.jpg")} - {f"labels/train/{stem}.png"}
    before = tree_digest(tmp_path / "out")
    assert cli(sample_copy, tmp_path / "out").returncode == 0
    assert tree_digest(tmp_path / "out") == before  # byte-identical re-run


def test_image_in_a_subfolder_gets_its_own_label(sample_copy, tmp_path, converted_sample):
    im, _ = single(coco(sample_copy))
    (sample_copy / "train" / "sub").mkdir()
    shutil.copy(sample_copy / "train" / im["file_name"], sample_copy / "train" / "sub" / im["file_name"])
    edit_json(sample_copy, "train", lambda d: add_image(d, f"sub/{im['file_name']}", BOX))
    datalist = convert(sample_copy, tmp_path / "out", **QUIET)
    stem = Path(im["file_name"]).stem
    labels = [r["label"] for r in datalist["training"]]
    assert f"labels/train/{stem}.png" in labels and f"labels/train/sub/{stem}.png" in labels and len(set(labels)) == 25
    assert np.array_equal(label(tmp_path / "out", f"{stem}.png"), label(converted_sample, f"{stem}.png"))
    assert np.array_equal(label(tmp_path / "out", f"sub/{stem}.png"), box_mask())


def test_names_differing_only_in_case_get_a_hash(sample_copy, tmp_path, converted_sample):
    im, _ = single(coco(sample_copy))
    upper = im["file_name"][:-4] + ".JPG"
    shutil.copy(sample_copy / "train" / im["file_name"], sample_copy / "train" / upper)
    edit_json(sample_copy, "train", lambda d: add_image(d, upper, BOX))
    convert(sample_copy, tmp_path / "out", **QUIET)
    stem = Path(im["file_name"]).stem

    def hashed(name, suffix):
        return f"{stem}_{suffix}-{hashlib.sha256(name.encode()).hexdigest()[:8]}.png"

    assert np.array_equal(label(tmp_path / "out", hashed(im["file_name"], "jpg")), label(converted_sample, f"{stem}.png"))
    assert np.array_equal(label(tmp_path / "out", hashed(upper, "JPG")), box_mask())


# ---- 2. COCO RLE ---------------------------------------------------------------------------


def disc(width=640, height=640) -> np.ndarray:
    yy, xx = np.mgrid[:height, :width]
    return (((xx - 300) ** 2 + (yy - 200) ** 2) < 60**2).astype(np.uint8)


def rle_of(mask: np.ndarray, compressed: bool) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask))
    if compressed:
        return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}
    flat, runs, start = mask.flatten(order="F"), [], 0  # column-major runs, zeros first
    for i in np.flatnonzero(np.diff(flat)) + 1:
        runs.append(int(i - start))
        start = i
    runs.append(int(len(flat) - start))
    return {"size": list(mask.shape), "counts": runs if flat[0] == 0 else [0, *runs]}


@pytest.mark.parametrize("compressed", [True, False], ids=["compressed", "uncompressed"])
def test_rle_segmentation_is_decoded_not_boxed(sample_copy, tmp_path, compressed):
    im, ann = single(coco(sample_copy))

    def to_rle(d):
        a = next(a for a in d["annotations"] if a["id"] == ann["id"])
        a.update(iscrowd=1, segmentation=rle_of(disc(), compressed), bbox=[240, 140, 120, 120])

    edit_json(sample_copy, "train", to_rle)
    convert(sample_copy, tmp_path / "out", **QUIET)
    mask = label(tmp_path / "out", Path(im["file_name"]).stem + ".png")
    assert np.array_equal(mask, disc())  # the disc, pixel for pixel, not its 120x120 box


# ---- 3. one image under two ids ------------------------------------------------------------


def test_image_listed_twice_with_same_size_is_merged(sample_copy, tmp_path, converted_sample):
    im, _ = single(coco(sample_copy))
    edit_json(sample_copy, "train", lambda d: add_image(d, im["file_name"], BOX))
    result = cli(sample_copy, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and f"'{im['file_name']}' is listed under image ids {im['id']}, " in warnings[0]
    assert "merged" in warnings[0] and "_annotations.coco.json" in warnings[0]
    rows = json.loads((tmp_path / "out" / "datalist.json").read_text())["training"]
    assert len(rows) == 24  # one label for the one image
    stem = Path(im["file_name"]).stem
    expected = np.maximum(label(converted_sample, f"{stem}.png"), box_mask())
    assert np.array_equal(label(tmp_path / "out", f"{stem}.png"), expected)  # the annotations of both ids


# ---- 4. degenerate boxes and polygons --------------------------------------------------------


def _zero_width_box(a):
    a.pop("segmentation")
    a["bbox"][2] = 0


def _negative_height_box(a):
    a["bbox"][3] = -a["bbox"][3]


def _flat_polygon(a):
    a["segmentation"] = [[10, 10, 50, 50, 90, 90, 30, 30]]  # all on one line


@pytest.mark.parametrize(
    "breaker, reason",
    [
        (_zero_width_box, "zero or negative width or height"),
        (_negative_height_box, "zero or negative width or height"),
        (_flat_polygon, "polygons have zero area"),
    ],
    ids=["zero-width bbox", "negative-height bbox", "zero-area polygon"],
)
def test_degenerate_annotation_is_skipped_with_a_warning(sample_copy, tmp_path, breaker, reason):
    im, ann = single(coco(sample_copy))
    edit_json(sample_copy, "train", lambda d: breaker(next(a for a in d["annotations"] if a["id"] == ann["id"])))
    messages = []
    convert(sample_copy, tmp_path / "out", progress=False, log=messages.append)
    hits = [m for m in messages if f"annotation id {ann['id']} on '{im['file_name']}'" in m]
    assert len(hits) == 1 and hits[0].startswith("warning: ") and reason in hits[0] and hits[0].endswith("skipped")
    assert "train/_annotations.coco.json" in hits[0]
    assert not label(tmp_path / "out", Path(im["file_name"]).stem + ".png").any()


# ---- 5, 6 and more: refused with one clean line --------------------------------------------


def ann0(d):
    return d["annotations"][0]


def nested(depth):
    value = 1
    for _ in range(depth):
        value = [value]
    return value


def _no_split_folder(root):
    for split in ("train", "valid", "test"):
        shutil.rmtree(root / split)
    (root / "notes").mkdir()


def _deep_json(root):
    (root / "valid" / "_annotations.coco.json").write_text(
        '{"images": ' + "[" * 100_000 + "]" * 100_000 + ', "annotations": [], "categories": []}'
    )


def _file_name_with(char):
    def breaker(root):
        d = coco(root, "valid")
        name = d["images"][0]["file_name"]
        forged = name[:-4] + char + "error: forged.jpg"
        if char != "\x00":  # a real file of that name: refused for its name, not for being absent
            shutil.copy(root / "valid" / name, root / "valid" / forged)
        edit_json(root, "valid", lambda d: d["images"][0].update(file_name=forged))

    return breaker


def _listed_twice_other_size(root):
    im, _ = single(coco(root))
    edit_json(root, "train", lambda d: add_image(d, im["file_name"], BOX, width=320))


def _rle(change):
    def breaker(root):
        def edit(d):
            rle = rle_of(disc(), compressed=True)
            change(rle)
            ann0(d).update(iscrowd=1, segmentation=rle)

        edit_json(root, "train", edit)

    return breaker


def _exif_turned(root):
    im, _ = single(coco(root))
    path = root / "train" / im["file_name"]
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when displayed: 640x480 stored, 480x640 displayed
    Image.open(path).crop((0, 0, 640, 480)).save(path, exif=exif)
    edit_json(root, "train", lambda d: next(i for i in d["images"] if i["id"] == im["id"]).update(height=480))


def _sixteen_bit_wrong_size(root):
    im, _ = single(coco(root))
    grey16 = np.asarray(Image.open(root / "train" / im["file_name"]).convert("L"), np.uint16) * 257
    Image.fromarray(grey16).crop((0, 0, 640, 400)).save(root / "train" / "grey16.png")
    edit_json(root, "train", lambda d: next(i for i in d["images"] if i["id"] == im["id"]).update(file_name="grey16.png"))


HOSTILE = [
    ("no split folder", _no_split_folder, "kaggle: ", "none of the split folders (train, valid, test) is there"),
    ("deeply nested json", _deep_json, "valid/_annotations.coco.json: ", "nested too deeply"),
    (
        "deeply nested id",
        lambda r: edit_json(r, "train", lambda d: d["images"][0].update(id=nested(500))),
        "train/_annotations.coco.json: ",
        "needs an integer 'id'",
    ),
    (
        "huge int in bbox",
        lambda r: edit_json(r, "train", lambda d: ann0(d)["bbox"].__setitem__(2, 10**400)),
        "train/_annotations.coco.json: ",
        "bbox is not 4 finite numbers",
    ),
    (
        "huge int in polygon",
        lambda r: edit_json(r, "train", lambda d: ann0(d)["segmentation"][0].__setitem__(1, -(10**400))),
        "train/_annotations.coco.json: ",
        "finite x,y pairs",
    ),
    (
        "NaN in bbox",
        lambda r: edit_json(r, "train", lambda d: ann0(d)["bbox"].__setitem__(0, float("nan"))),
        "train/_annotations.coco.json: ",
        "bbox is not 4 finite numbers",
    ),
    (
        "Infinity in polygon",
        lambda r: edit_json(r, "train", lambda d: ann0(d)["segmentation"][0].__setitem__(2, float("inf"))),
        "train/_annotations.coco.json: ",
        "finite x,y pairs",
    ),
    (
        "Infinity as width",
        lambda r: edit_json(r, "test", lambda d: d["images"][0].update(width=float("inf"))),
        "test/",
        "but the json says infx640",
    ),
    (
        "list as annotation id",
        lambda r: edit_json(r, "train", lambda d: ann0(d).update(id=[1])),
        "train/_annotations.coco.json: ",
        "needs an integer 'id'",
    ),
    (
        "object as image_id",
        lambda r: edit_json(r, "train", lambda d: ann0(d).update(image_id={"a": 1})),
        "train/_annotations.coco.json: ",
        "unknown image_id {'a': 1}",
    ),
    (
        "string segmentation",
        lambda r: edit_json(r, "train", lambda d: ann0(d).update(segmentation="12 13")),
        "train/_annotations.coco.json: ",
        "neither polygons nor an RLE",
    ),
    ("NUL in file_name", _file_name_with("\x00"), "valid/_annotations.coco.json: ", "contains the control character \\x00"),
    (
        "newline in file_name",
        _file_name_with("\n"),
        "valid/_annotations.coco.json: ",
        "\\nerror: forged.jpg' contains the control character \\n",
    ),
    ("line separator in file_name", _file_name_with("\u2028"), "valid/_annotations.coco.json: ", "control character \\u2028"),
    (
        "listed twice, other size",
        _listed_twice_other_size,
        "train/_annotations.coco.json: ",
        "with different sizes (640x640 and 320x640)",
    ),
    (
        "RLE size not the image's",
        _rle(lambda r: r.update(size=[640, 600])),
        "train/_annotations.coco.json: ",
        "RLE size [height, width] [640, 600] does not match the 640x640 image",
    ),
    (
        "RLE counts too short",
        _rle(lambda r: r.update(counts=r["counts"][:-3])),
        "train/_annotations.coco.json: ",
        "RLE counts are not runs covering the 409600 pixels",
    ),
    (
        "RLE counts bad characters",
        _rle(lambda r: r.update(counts="~~~~")),
        "train/_annotations.coco.json: ",
        "RLE counts are not runs",
    ),
    (
        "RLE list counts too long",
        _rle(lambda r: r.update(counts=[409600, 10**400])),
        "train/_annotations.coco.json: ",
        "RLE counts are not runs",
    ),
    (
        "EXIF-turned image, json has stored size",
        _exif_turned,
        "train/",
        "is 480x640 as displayed (EXIF orientation 6) but the json says 640x480",
    ),
    ("16-bit PNG of another size", _sixteen_bit_wrong_size, "train/grey16.png: ", "is 640x400 but the json says 640x640"),
]


@pytest.mark.parametrize("breaker, where, problem", [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE])
def test_hostile_input_gives_one_clean_line(sample_copy, tmp_path, breaker, where, problem):
    breaker(sample_copy)
    before = tree_digest(sample_copy)
    out = tmp_path / "out"
    result = cli(sample_copy, out)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr  # nothing forged
    assert where in result.stderr and problem in result.stderr, result.stderr
    assert not out.exists()  # nothing written
    assert tree_digest(sample_copy) == before  # input untouched


def test_show_escapes_what_could_break_a_line():
    assert show("a\nerror: b") == "a\\nerror: b"
    assert show(Path("x\x00y\rz\u2028w\\v")) == "x\\x00y\\rz\\u2028w\\\\v"
    assert show("tumeur é 1.jpg") == "tumeur é 1.jpg"  # printable text as it is


# ---- 7. 16-bit PNGs and EXIF orientation ------------------------------------------------------


def test_sixteen_bit_png_converts_like_its_jpeg(sample_copy, tmp_path, converted_sample):
    im, _ = single(coco(sample_copy))
    jpg = sample_copy / "train" / im["file_name"]
    grey16 = np.asarray(Image.open(jpg).convert("L"), np.uint16) * 257
    Image.fromarray(grey16).save(jpg.with_suffix(".png"))
    jpg.unlink()
    assert Image.open(jpg.with_suffix(".png")).mode.startswith("I")  # really 16 bits
    edit_json(
        sample_copy,
        "train",
        lambda d: next(i for i in d["images"] if i["id"] == im["id"]).update(file_name=jpg.with_suffix(".png").name),
    )
    convert(sample_copy, tmp_path / "out", **QUIET)
    out = Image.open(tmp_path / "out" / "labels" / "train" / f"{jpg.stem}.png")
    assert out.mode == "L" and np.array_equal(np.asarray(out), label(converted_sample, f"{jpg.stem}.png"))


def test_exif_turned_image_gets_its_displayed_size_and_a_warning(sample_copy, tmp_path):
    im, ann = single(coco(sample_copy))
    path = sample_copy / "train" / im["file_name"]
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(path).crop((0, 0, 640, 480)).save(path, exif=exif)

    def displayed(d):
        next(i for i in d["images"] if i["id"] == im["id"]).update(width=480, height=640)
        next(a for a in d["annotations"] if a["id"] == ann["id"]).update(segmentation=BOX, bbox=[20, 30, 100, 60])

    edit_json(sample_copy, "train", displayed)
    messages = []
    convert(sample_copy, tmp_path / "out", progress=False, log=messages.append)
    mask = label(tmp_path / "out", path.stem + ".png")
    assert mask.shape == (640, 480) and np.array_equal(mask, box_mask(480, 640))
    assert any(m.startswith("warning: ") and im["file_name"] in m and "EXIF orientation 6" in m for m in messages)


# ---- properties of the label names ------------------------------------------------------------


FOLDERS = ["", "sub/", "Sub/", "x.png/", "sub/Sub/"]
STEMS = ["x", "X", "x_jpg", "x_JPG", "y"]
SUFFIXES = [".jpg", ".JPG", ".jpeg", ".Jpeg", ".png", ".PNG"]
file_names = st.sets(
    st.builds(lambda f, s, x: f + s + x, st.sampled_from(FOLDERS), st.sampled_from(STEMS), st.sampled_from(SUFFIXES)),
    min_size=1,
    max_size=8,
).filter(lambda names: not any(m.startswith(n + "/") for n in names for m in names))  # a file is no folder on disk


def fold(path: str) -> str:
    return unicodedata.normalize("NFD", unicodedata.normalize("NFD", path).casefold())


def convert_names(names: list[str], root: Path, out: Path, order) -> dict:
    """Convert a split holding crops of a sample image under ``names`` (the ith name
    ``8 + i`` pixels wide); returns image path -> label path."""
    source = Image.open(sorted((SAMPLE / "train").glob("*.jpg"))[0]).convert("L")
    (root / "train").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i, name in enumerate(names):
        file = root / "train" / name
        file.parent.mkdir(parents=True, exist_ok=True)
        crop = source.crop((200, 200, 208 + i, 208))
        if not file.exists():
            crop.save(file, format="PNG" if name.lower().endswith(".png") else "JPEG")
        images.append({"id": 100 + i, "file_name": name, "width": 8 + i, "height": 8})
        annotations.append({"id": i, "image_id": 100 + i, "category_id": 1, "bbox": [1, 1, 4, 4]})
    data = {"images": [images[i] for i in order], "annotations": annotations, "categories": [{"id": 1, "name": "t"}]}
    (root / "train" / "_annotations.coco.json").write_text(json.dumps(data))
    rows = convert(root, out, splits={"training": "train"}, **QUIET)["training"]
    return {r["image"]: r["label"] for r in rows}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(names=file_names)
def test_label_paths_are_distinct_on_real_files(names):
    names = sorted(names)
    with tempfile.TemporaryDirectory() as tmp:
        root, out = Path(tmp) / "in", Path(tmp) / "out"
        mapping = convert_names(names, root, out, order=range(len(names)))
        labels = list(mapping.values())
        assert len(labels) == len(names)
        assert len({fold(p) for p in labels}) == len(labels)  # distinct, also case-insensitively
        written = {p.relative_to(out).as_posix() for p in (out / "labels").rglob("*") if p.is_file()}
        assert written == set(labels)  # one file per image: none overwrote another
        inputs = {(root / "train" / n).resolve() for n in names}
        assert not {(out / p).resolve() for p in labels} & inputs  # no label is an input image
        for i, name in enumerate(names):  # each label belongs to its own image (the ith is 8 + i wide)
            rel = mapping[str(Path("..") / "in" / "train" / name)]
            assert np.asarray(Image.open(out / rel)).shape == (8, 8 + i)
        # the names depend on the set of file names only, not on the order of the json
        assert convert_names(names, root, Path(tmp) / "out2", order=reversed(range(len(names)))) == mapping


@settings(max_examples=300, deadline=None)
@given(
    names=st.sets(
        st.builds(
            lambda f, s, x: f + s + x,
            st.sampled_from(["", "a/", "A/", "é/", "e\u0301/", "x.png/", "a/b.PNG/"]),
            st.sampled_from(["x", "X", "É", "e\u0301", "x_png", "x_jpg", "b", "x.jpg"]),
            st.sampled_from(["", ".jpg", ".JPG", ".png", ".jpeg", ".PNG", ".tif"]),
        ),
        min_size=1,
        max_size=12,
    )
)
def test_label_paths_property(names):
    labels = label_paths(sorted(names))
    folded = [fold(p) for p in labels.values()]
    assert len(set(folded)) == len(folded)  # pairwise distinct, also case- and normalisation-insensitively
    folders = {str(parent) for f in folded for parent in Path(f).parents}
    assert not set(folded) & folders  # no label is where another label's folder must be
    assert all(p.endswith(".png") for p in labels.values())
    assert label_paths(sorted(names, reverse=True)) == labels  # predictable: order does not matter
