"""tumorseg-convert by property and by fault: generated COCO files (ids and file names with
duplicates, one file under several names, boxes zero, negative, huge, NaN) either convert with
every valid box of every file in that file's one label, or are refused with one line per problem,
no traceback and no output; and real runs that hit a full disk (``ulimit -f``), a read-only
folder or SIGKILL midway leave the output absent, as it was or complete, never partial."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from data_tools.coco_to_monai import convert, main

QUIET = {"progress": False, "log": lambda line: None}
SIZES = {"a.png": (12, 10), "b.png": (9, 11), "sub/c.png": (8, 8), "d.png": (12, 10)}  # the files, width x height
FILE_OF = {**{n: n for n in SIZES}, "./b.png": "b.png", "alias.png": "a.png"}  # file_name -> file (alias.png: a symlink)
CANONICAL = {n: "alias.png" if n == "alias.png" else FILE_OF[n] for n in FILE_OF}  # file_name as normalised
HUGE = "<HUGE>"  # stands for an integer of 5000 digits in the json text
SIZE_KINDS = {  # how an image entry gives its width and height
    "right": lambda w, h: (w, h),
    "zero": lambda w, h: (0, h),
    "negative": lambda w, h: (-w, h),
    "huge": lambda w, h: (HUGE, h),
    "float": lambda w, h: (w + 0.5, h),
    "off": lambda w, h: (w, h + 1),
}
BAD_BOXES = {
    "nan": [float("nan"), 1, 3, 3],
    "infinite": [1, 1, float("inf"), 3],
    "huge": [1, HUGE, 3, 3],
    "far": [1e300, 1, 3, 3],
    "short": [1, 1, 3],
    "text": "1 1 3 3",
}


def write_split(split: Path, images: list[dict], annotations: list[dict]) -> None:
    """The image files (a symlink too) and the json, HUGE written as a 5000-digit integer."""
    for name, size in SIZES.items():
        (split / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", size, 60).save(split / name)
    (split / "alias.png").symlink_to("a.png")
    data = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "0"}, {"id": 2, "name": "1"}]}
    (split / "_annotations.coco.json").write_text(json.dumps(data).replace(f'"{HUGE}"', "1" + "0" * 5000))


@st.composite
def coco(draw):
    """A COCO split: a clean one (unique ids, true sizes, known references, valid or degenerate
    boxes; file names repeated) or one with anything wrong. Boxes are integers: pycocotools
    fills exactly the pixels [x, x + w) x [y, y + h) of an integer box."""
    clean = draw(st.booleans())
    ids = st.integers(1, 40) if clean else st.integers(1, 5)
    image_ids = draw(st.lists(ids, min_size=1, max_size=6, unique=clean))
    images = []
    for iid in image_ids:
        name = draw(st.sampled_from(sorted(FILE_OF)))
        kind = "right" if clean else draw(st.sampled_from(["right"] * 4 + sorted(SIZE_KINDS)))
        width, height = SIZE_KINDS[kind](*SIZES[FILE_OF[name]])
        images.append({"id": iid, "file_name": name, "width": width, "height": height})
    annotations = []
    ann_ids = draw(st.lists(st.integers(1, 60) if clean else st.integers(1, 8), max_size=8, unique=clean))
    for aid in ann_ids:
        x, y, w, h = draw(st.tuples(st.integers(-3, 12), st.integers(-3, 12), st.integers(-2, 12), st.integers(-2, 12)))
        box = draw(st.sampled_from([[x, y, w, h]] * 3 + ([] if clean else list(BAD_BOXES.values()))))
        annotations.append(
            {
                "id": aid,
                "image_id": draw(st.sampled_from(image_ids if clean else [*image_ids, 0, 9])),
                "category_id": draw(st.sampled_from([1, 2] if clean else [1, 2, 7])),
                "bbox": box,
            }
        )
    return images, annotations


def expected(images: list[dict], annotations: list[dict]) -> tuple[Counter, dict]:
    """The problems (a text each line must hold -> how many lines) and, per file, its valid boxes."""
    problems: Counter = Counter()
    counts = Counter(im["id"] for im in images)
    repeated = {i for i, n in counts.items() if n > 1}
    problems.update(f"image id {i} is listed" for i in repeated)
    files: dict[str, list[dict]] = {}
    for im in images:
        files.setdefault(FILE_OF[im["file_name"]], []).append(im)
    kept = {}  # image id -> its file
    for file, entries in files.items():
        name = min(CANONICAL[e["file_name"]] for e in entries)
        if len({repr((e["width"], e["height"])) for e in entries}) > 1:
            problems[f"'{name}' is listed under image ids"] += 1
        elif (entries[0]["width"], entries[0]["height"]) != SIZES[file]:
            problems[f"/{name}: is "] += 1
        else:
            kept.update({e["id"]: file for e in entries if e["id"] not in repeated})
    problems.update(f"annotation id {i} is listed" for i, n in Counter(a["id"] for a in annotations).items() if n > 1)
    boxes: dict[str, list] = {file: [] for file in files}
    for a in annotations:
        wrong = []
        if a["image_id"] not in counts and not repeated:  # a repeated id may have hidden its image's own
            wrong.append(f"annotation id {a['id']} refers to unknown image_id")
        if a["category_id"] not in (1, 2):
            wrong.append(f"annotation id {a['id']} has unknown category_id")
        if a["bbox"] in BAD_BOXES.values() or (isinstance(a["bbox"][0], float) and math.isnan(a["bbox"][0])):
            wrong.append(f"annotation id {a['id']}: bbox")
        problems.update(wrong)
        if not wrong and a["image_id"] in kept and min(a["bbox"][2:]) > 0:
            boxes[kept[a["image_id"]]].append(a["bbox"])
    return problems, boxes


def box_mask(size: tuple[int, int], boxes: list) -> np.ndarray:
    width, height = size
    mask = np.zeros((height, width), np.uint8)
    for x, y, w, h in boxes:
        mask[max(y, 0) : max(y + h, 0), max(x, 0) : max(x + w, 0)] = 1
    return mask


def run_main(*args: str) -> tuple[int, list[str]]:
    """The command's own entry point in this process: exit status and stderr lines."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = main([*args, "--no-progress"])
    return status, err.getvalue().splitlines()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(coco())
def test_conversion_keeps_every_valid_box_or_refuses_one_line_per_problem(split):
    images, annotations = split
    problems, boxes = expected(images, annotations)
    with tempfile.TemporaryDirectory() as tmp:
        root, out = Path(tmp) / "in", Path(tmp) / "outputs" / "out"
        (root / "train").mkdir(parents=True)
        out.parent.mkdir()
        write_split(root / "train", images, annotations)
        status, lines = run_main(str(root), str(out))  # an exception here is a traceback for users
        errors = [line for line in lines if line.startswith("error: ")]
        assert all(line.startswith(("error: ", "warning: ", "note: ")) for line in lines), lines
        if problems:
            assert status == 1 and not out.exists()
            assert not list(out.parent.iterdir())  # no partial output, no temporary folder left
            assert all(line.startswith(f"error: {root / 'train'}/") for line in errors), errors  # names the json or image
            assert len(errors) == sum(problems.values()), (problems, errors)
            for text, n in problems.items():
                assert sum(text in line for line in errors) == n, (text, errors)
            return
        assert status == 0 and not errors, lines
        rows = json.loads((out / "datalist.json").read_text())["training"]
        by_file = {Path(os.path.normpath(out / r["image"])).relative_to(root / "train").as_posix(): r["label"] for r in rows}
        by_file = {FILE_OF.get(f, f): label for f, label in by_file.items()}
        assert sorted(by_file) == sorted(boxes) and len(rows) == len(boxes)  # one label per file
        for file, label in by_file.items():  # every valid box of every id naming the file, nothing else
            assert np.array_equal(np.asarray(Image.open(out / label)), box_mask(SIZES[file], boxes[file])), file


def test_one_file_under_several_names_and_ids_gets_one_label_with_all_boxes(tmp_path):
    images = [
        {"id": 1, "file_name": "a.png", "width": 12, "height": 10},
        {"id": 2, "file_name": "alias.png", "width": 12, "height": 10},  # a symlink to a.png
        {"id": 3, "file_name": "./a.png", "width": 12, "height": 10},
    ]
    boxes = [[0, 0, 2, 2], [5, 5, 3, 2], [9, 1, 3, 3]]
    anns = [{"id": i, "image_id": i, "category_id": 1, "bbox": b} for i, b in enumerate(boxes, 1)]
    (tmp_path / "in" / "train").mkdir(parents=True)
    write_split(tmp_path / "in" / "train", images, anns)
    status, lines = run_main(str(tmp_path / "in"), str(tmp_path / "out"))
    assert status == 0
    assert [line for line in lines if line.startswith("warning: ")] == [
        f"warning: {tmp_path / 'in' / 'train' / '_annotations.coco.json'}: 'a.png' (also as 'alias.png') is listed "
        "under image ids 1, 2, 3; their annotations are merged into its one label"
    ]
    rows = json.loads((tmp_path / "out" / "datalist.json").read_text())["training"]
    assert [r["label"] for r in rows if "a.png" in r["image"]] == ["labels/train/a.png"]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "labels/train/a.png")), box_mask((12, 10), boxes))


def test_thousands_of_digits_are_one_line(tmp_path):
    images = [{"id": HUGE, "file_name": "a.png", "width": 12, "height": 10}]
    (tmp_path / "in" / "train").mkdir(parents=True)
    write_split(tmp_path / "in" / "train", images, [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, HUGE, 2]}])
    status, lines = run_main(str(tmp_path / "in"), str(tmp_path / "out"))
    errors = [line for line in lines if line.startswith("error: ")]
    assert status == 1 and len(errors) == 2, lines
    assert "<integer of 5001 digits>" in errors[0] and "needs an integer 'id'" in errors[0]
    assert errors[1].endswith("annotation id 1: bbox is not 4 finite numbers")


def test_an_output_folder_the_converter_did_not_make_is_refused(tmp_path):
    (tmp_path / "in" / "train").mkdir(parents=True)
    write_split(tmp_path / "in" / "train", [{"id": 1, "file_name": "a.png", "width": 12, "height": 10}], [])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    status, lines = run_main(str(tmp_path / "in"), str(tmp_path / "out"))
    assert status == 1 and lines[-1].startswith(f"error: {tmp_path / 'out'}: exists and is not an earlier output")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]
    (tmp_path / "out" / "notes.txt").unlink()  # an empty folder, then an earlier output: replaced
    assert run_main(str(tmp_path / "in"), str(tmp_path / "out"))[0] == 0
    assert run_main(str(tmp_path / "in"), str(tmp_path / "out"))[0] == 0


# ---- faults injected into real runs -----------------------------------------------------------


def make_input(root: Path, n: int, box: int = 4) -> Path:
    """``n`` 16x16 images with one box each: a datalist of about 130 bytes per image."""
    split = root / "train"
    split.mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(n):
        Image.new("L", (16, 16), i % 250).save(split / f"img{i:04d}.png")
        images.append({"id": i, "file_name": f"img{i:04d}.png", "width": 16, "height": 16})
        anns.append({"id": i, "image_id": i, "category_id": 1, "bbox": [2, 2, box, box]})
    data = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "t"}]}
    (split / "_annotations.coco.json").write_text(json.dumps(data))
    return root


def converter(root: Path, out: Path, prefix: str = "") -> list[str]:
    """The command line of a real run, under ``bash -c`` after ``prefix`` (a ulimit)."""
    command = f'{prefix} exec "{sys.executable}" -m data_tools "{root}" "{out}" --no-progress'
    return ["bash", "-c", command]


def run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)


def digest(folder: Path) -> dict:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def one_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if not line.startswith("note: ")]  # no valid/, test/
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_full_disk_leaves_nothing_or_the_earlier_output(tmp_path):
    root, out = make_input(tmp_path / "in", 60), tmp_path / "outputs" / "out"
    line = one_error(run(converter(root, out, "ulimit -f 4;")))  # 4 KiB a file: the datalist does not fit
    assert line == (
        f"error: {out / 'datalist.json'}: cannot write: the disk is full (a file size limit, ulimit -f, is reached); "
        f"nothing was written to {out}"
    )
    assert not list(out.parent.iterdir())  # no labels/, no datalist, no temporary folder
    convert(root, out, **QUIET)
    before = digest(out)
    make_input(root, 60, box=6)  # other masks: a rerun would change every label
    line = one_error(run(converter(root, out, "ulimit -f 4;")))
    assert line.endswith(f"cannot write: the disk is full (a file size limit, ulimit -f, is reached); {out} is as it was")
    assert digest(out) == before and [p.name for p in out.parent.iterdir()] == ["out"]
    assert run(converter(root, out)).returncode == 0 and digest(out) != before


def test_read_only_folder_is_told_in_plain_words(tmp_path):
    root, parent = make_input(tmp_path / "in", 3), tmp_path / "outputs"
    drop = []
    if os.geteuid() == 0:  # root writes anywhere: run without the capabilities that override permissions
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv")
        drop = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--"]
    parent.mkdir()
    convert(root, parent / "earlier", **QUIET)
    before = digest(parent / "earlier")
    (parent / "earlier").chmod(0o555)  # a folder can only move into another folder when writable
    parent.chmod(0o555)
    try:
        line = one_error(run(drop + converter(root, parent / "new")))
        assert line == f"error: {parent}: cannot write: permission denied; nothing was written to {parent / 'new'}"
        parent.chmod(0o755)
        line = one_error(run(drop + converter(root, parent / "earlier")))
        assert line.endswith(f"cannot write: permission denied; {parent / 'earlier'} is as it was")
    finally:
        parent.chmod(0o755)
        (parent / "earlier").chmod(0o755)
    assert sorted(p.name for p in parent.iterdir()) == ["earlier"] and digest(parent / "earlier") == before


def kill_midway(root: Path, out: Path) -> None:
    """Start a real run and SIGKILL it once it has written its first labels."""
    proc = subprocess.Popen(converter(root, out), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list(out.parent.glob(f".{out.name}.converting-*/new/labels/train/*.png")):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before writing a label"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL


def test_sigkill_midway_leaves_the_output_absent_or_complete_and_a_rerun_succeeds(tmp_path):
    root, out = make_input(tmp_path / "in", 300), tmp_path / "outputs" / "out"
    kill_midway(root, out)
    assert not out.exists()  # absent, not partial
    convert(root, tmp_path / "reference" / "out", **QUIET)  # at the same depth: the same relative paths
    assert run(converter(root, out)).returncode == 0  # the rerun starts clean ...
    assert digest(out) == digest(tmp_path / "reference" / "out")
    assert [p.name for p in out.parent.iterdir()] == ["out"]  # ... and removes the killed run's folder
    before = digest(out)
    make_input(root, 300, box=6)
    kill_midway(root, out)
    assert digest(out) == before  # the earlier output, whole
    assert run(converter(root, out)).returncode == 0 and digest(out) != before
    assert [p.name for p in out.parent.iterdir()] == ["out"]


def test_a_real_full_disk_leaves_nothing(tmp_path):
    """ENOSPC, not a file size limit: the outputs' folder is a 64 KiB file system (tmpfs, in a
    mount namespace of its own) that 300 images' labels do not fit; the listing afterwards is
    copied out of the namespace."""
    if not shutil.which("unshare") or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("no mount namespaces to mount a small file system")
    root, disk, listing = make_input(tmp_path / "in", 300), tmp_path / "disk", tmp_path / "listing.txt"
    disk.mkdir()
    command = " ".join(converter(root, disk / "out")[2:]).removeprefix(" exec ")
    script = f"mount -t tmpfs -o size=64k tmpfs '{disk}' && {{ {command}; }}; s=$?; ls -A '{disk}' > '{listing}'; exit $s"
    line = one_error(run(["unshare", "-rm", "bash", "-c", script]))
    assert line.startswith("error: ") and line.endswith(f"cannot write: the disk is full; nothing was written to {disk / 'out'}")
    assert listing.read_text() == ""  # no labels/, no datalist, no temporary folder
