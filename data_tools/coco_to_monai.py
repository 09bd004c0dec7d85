"""Convert the Kaggle "Brain Tumor Image DataSet: Semantic Segmentation" (COCO) to MONAI's format.

Input: the download root, one folder per split (``train/``, ``valid/``, ``test/``), each with its
images and an ``_annotations.coco.json``. Output, into a separate folder:

- ``labels/<split>/<label path>``: one 8-bit single-channel mask per image file, at the image's
  own size as displayed. The label path is the image's ``file_name`` (subfolders kept) with its
  suffix replaced by ``.png``: ``sub/a.jpg`` -> ``labels/train/sub/a.png``. Where two images of a
  split would get the same label path, also when the paths differ only in letter case (``x.jpg``
  and ``x.png``, ``X.jpg`` and ``x.jpg``) or when one label path is the folder of another, each of
  them keeps its suffix in the name (``x_jpg.png``, ``x_png.png``); where that still clashes, the
  first 8 hex digits of the SHA-256 of the ``file_name`` follow (``x_JPG-1a2b3c4d.png``). So no two
  images share a label, even on a case-insensitive file system, no label is an input image, and
  the names depend only on the split's set of file names. Binary by default: 0 = background,
  1 = tumour (every annotation is tumour; the dataset's categories 1 and 2 are two kinds of tumour
  box). With ``--keep-categories`` the pixel value is the COCO ``category_id``; where annotations
  of different categories overlap, the highest id wins.
- ``datalist.json``: a MONAI (Decathlon-style) dataset JSON with ``training``, ``validation``
  and ``test`` lists of ``{"image", "label"}``, paths relative to the output folder, readable by
  ``monai.data.load_decathlon_datalist(path, data_list_key=..., base_dir=<output folder>)``.

An annotation is drawn from its ``segmentation``: polygons, or a COCO RLE (``{"counts", "size"}``
with compressed string or uncompressed list counts, as ``iscrowd=1`` annotations have), both
rasterised with pycocotools; an annotation without a segmentation is drawn as its ``bbox``.

Identity: a label belongs to an image FILE, not to an image id. Every image id whose
``file_name`` names one file (the same device and inode: ``a.jpg``, ``./a.jpg``, a symlink or a
hard link to it) adds its annotations to that file's one label, with a warning; the label is
named after the smallest of those file names.

Validation, by COCO's own rules, comes before anything is written. Each problem is one line
``error: <file>: <problem>``, naming the json and the image file name or annotation id. All
problems of all splits are listed (a problem with one image or annotation does not stop the
checking of the others), then the command exits with status 1 and writes nothing: a datalist
with an image or a box left out looks complete to training, so no problem only drops its image.
A split whose json cannot be read (or lacks its lists) is not checked further. The problems:

- a root without any of the split folders (a root with only some of them gives a note each and
  empty lists for the others);
- a json missing, unreadable, malformed, nested too deeply, or without ``images``,
  ``annotations`` and ``categories`` lists;
- a category without an integer ``id``, or an id listed twice;
- an image entry without an integer ``id`` and a ``file_name``; an image id listed twice (its
  annotations could belong to either file: they are not drawn, and while either problem stands,
  no ``image_id`` is reported unknown: it may be that image's own); a ``file_name``
  holding a control character (NUL, newline...) or escaping its split folder; an image listed but
  absent, not fully decodable, larger than 65535 pixels a side, or whose ``width`` and ``height``
  are not the integers of its size as displayed (for EXIF orientations 5-8 width and height
  swap);
- one file under several image ids with different width or height (one line for the file);
- an annotation without an integer ``id``, or an id listed twice; each of its other problems is
  a line of its own: an unknown ``image_id``; an unknown ``category_id``; a ``bbox`` that is not 4
  finite numbers; a segmentation that is not polygons of at least 3 finite x,y pairs, nor an RLE
  whose ``size`` is the image's ``[height, width]`` and whose counts are runs covering exactly its
  pixels; neither a segmentation nor a bbox.
  NaN, Infinity and integers beyond the float range are no finite numbers; a coordinate beyond
  1000000 pixels in magnitude, or an integer of more than 20 digits anywhere (parsed as such,
  never as a number), is refused too.

Handled with a ``warning:`` line naming the json, the annotation id and the image, going on (the
annotation covers no pixel of the image, or the part outside it: nothing of the data is lost):

- polygon coordinates outside the image are clipped;
- an annotation whose ``bbox`` has a zero or negative width or height (COCO wants both > 0), or
  whose segmentation covers no area (polygons of zero area, an RLE without a foreground pixel),
  is skipped;
- an image with an EXIF orientation other than 1: its mask follows the image as displayed, which
  readers that ignore EXIF (MONAI's ``PILReader``) do not see.

Writing is all or nothing: the output is written into a temporary folder beside it
(``.<name>.converting-*``) and renamed into place at the end, so that the output folder is at
any moment absent, as it was, or complete, also when the run is killed or the disk fills up; a
temporary folder left by a killed run is removed by the next run. An output folder that exists
is replaced only when it is empty or an earlier output of this converter (its ``datalist.json``
and the labels listed there, nothing else); any other is refused, so that no output overwrites
what the command did not create. A failed write is one line in plain words, ``<path>: cannot
write: the disk is full; nothing was written to <output>``.

Every path and name in a message goes through :func:`show`, which escapes control characters, so
that a file name cannot break a message over lines or forge one. Re-running on the same input
gives byte-identical output; the input is never written.
"""

from __future__ import annotations

import argparse
import errno
import glob
import hashlib
import io
import json
import math
import os
import posixpath
import reprlib
import shutil
import sys
import tempfile
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from tumorseg.io.files import show

DATALIST_NAME = "datalist.json"
ANNOTATION_NAME = "_annotations.coco.json"
DATASET_NAME = "Brain Tumor Image DataSet: Semantic Segmentation (Kaggle, pkdarabi; Roboflow export)"
DEFAULT_SPLITS = {"training": "train", "validation": "valid", "test": "test"}
EXIF_ORIENTATION = 0x0112  # 274
MIN_POLYGON_AREA = 1e-6  # square pixels; below it a polygon counts as of zero area (rounding)
MAX_SIDE = 65535  # pixels: the largest width or height of an image (JPEG's limit)
MAX_COORD = 1_000_000  # pixels: a coordinate beyond it in magnitude is no position in any image
MAX_DIGITS = 20  # an integer literal longer than this is no sane COCO number
_BAD_NAME_CHARS = {"Cc", "Cs", "Zl", "Zp"}  # controls (NUL, newline...), lone surrogates, line/paragraph separators
_WRITE_FAILURES = {  # errno -> the reason in plain words
    errno.ENOSPC: "the disk is full",
    errno.EFBIG: "the disk is full (a file size limit, ulimit -f, is reached)",
    errno.EDQUOT: "the disk quota is used up",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}


_short = reprlib.Repr()
_short.maxlevel, _short.maxstring, _short.maxlong, _short.maxother = 2, 40, 40, 40


def _brief(value) -> str:
    """A JSON value in a message: short, one line, safe on deeply nested or huge values."""
    return _short.repr(value)


class ConversionError(Exception):
    """Problems with the input or the output, each reported as one line ``<file>: <problem>``."""

    def __init__(self, path: Path | str | None = None, problem: str = "", lines: list[str] | None = None):
        self.lines = lines or [f"{show(path)}: {problem}"]
        super().__init__("\n".join(self.lines))


@dataclass(frozen=True)
class LongInteger:
    """An integer literal of more than MAX_DIGITS digits in a json, kept as its length: no sane
    COCO number, and too long to print (Python refuses to print integers of over 4300 digits)."""

    digits: int

    def __repr__(self) -> str:
        return f"<integer of {self.digits} digits>"


@dataclass
class ImageEntry:
    file: Path  # the image on disk
    name: str  # its file_name, normalised (posix, relative to the split folder)
    width: int
    height: int
    ids: list[int] = field(default_factory=list)  # the image ids listing it (more than one: merged)
    annotations: list[dict] = field(default_factory=list)
    label: str = ""  # label path relative to labels/<split>/


@dataclass
class SplitPlan:
    key: str  # datalist key: training / validation / test
    folder: str  # split folder name under the input root
    images: list[ImageEntry] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # one line each; any refuses the conversion
    sha256: str | None = None  # of the json


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    """A finite JSON number: not NaN, not Infinity, not an integer beyond the float range."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:  # an int too large for a float
        return False


def _times(n: int) -> str:
    return "twice" if n == 2 else f"{n} times"


def _reason(e: Exception) -> str:
    return getattr(e, "strerror", None) or e.__class__.__name__


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError) as e:  # name too long, permission denied...
        raise ConversionError(path, f"cannot be accessed ({_reason(e)})") from None


def _parse_int(text: str):
    return int(text) if len(text.lstrip("-")) <= MAX_DIGITS else LongInteger(len(text.lstrip("-")))


def _load_json(path: Path) -> tuple[dict, str]:
    """The COCO json of a split, and the SHA-256 of its bytes."""
    if not _is_file(path):
        raise ConversionError(path, "annotation file not found")
    try:
        raw = path.read_bytes()
        data = json.loads(raw.decode("utf-8"), parse_int=_parse_int)
    except UnicodeDecodeError:
        raise ConversionError(path, "not UTF-8 text") from None
    except OSError as e:
        raise ConversionError(path, f"cannot be read ({_reason(e)})") from None
    except json.JSONDecodeError as e:
        raise ConversionError(path, f"malformed JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except RecursionError:
        raise ConversionError(path, "JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise ConversionError(path, "top level is not a JSON object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ConversionError(path, f"missing or invalid '{key}' list")
    return data, hashlib.sha256(raw).hexdigest()


def _image_size(path: Path) -> tuple[int, int, int]:
    """Width and height as displayed, and the EXIF orientation (1 when none), of a fully decodable
    image (a truncated file is caught here, not in training). Orientations 5-8 swap width and
    height, as ``PIL.ImageOps.exif_transpose`` does."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            width, height = im.size
            try:
                orientation = im.getexif().get(EXIF_ORIENTATION, 1)
            except Exception as e:  # a damaged EXIF block; Pillow raises various errors for it
                raise ConversionError(path, f"unreadable EXIF data ({e.__class__.__name__})") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise ConversionError(path, f"not a readable image ({e.__class__.__name__})") from None
    if not _is_int(orientation) or not 1 <= orientation <= 8:
        orientation = 1  # exif_transpose ignores values it does not know
    return (height, width, orientation) if orientation >= 5 else (width, height, orientation)


def _split_name(name: str, split_dir: Path, json_path: Path) -> str:
    """The ``file_name`` checked (no control character, inside the split folder) and normalised."""
    bad = next((c for c in name if unicodedata.category(c) in _BAD_NAME_CHARS), None)
    if bad is not None:
        raise ConversionError(json_path, f"file_name '{show(name)}' contains the control character {show(bad)}")
    try:
        inside = split_dir.resolve() in (split_dir / name).resolve().parents
    except (OSError, RuntimeError, ValueError) as e:  # a symlink loop, a name too long
        raise ConversionError(json_path, f"file_name '{show(name)}' cannot be resolved ({_reason(e)})") from None
    if PurePosixPath(name).is_absolute() or not inside:
        raise ConversionError(json_path, f"file_name '{show(name)}' escapes the split folder {show(split_dir)}")
    return posixpath.normpath(name)


def _read_image(file: Path, name: str, img: dict, warnings: list[str]) -> ImageEntry:
    """The entry of an image file, its size checked against the json's ``width`` and ``height``."""
    width, height, orientation = _image_size(file)
    turned = f" as displayed (EXIF orientation {orientation})" if orientation != 1 else ""
    w, h = img.get("width"), img.get("height")
    if not (_is_int(w) and _is_int(h) and (w, h) == (width, height)):
        raise ConversionError(file, f"is {width}x{height}{turned} but the json says {_brief(w)}x{_brief(h)}")
    if max(width, height) > MAX_SIDE:
        raise ConversionError(file, f"is {width}x{height}: larger than {MAX_SIDE} pixels a side")
    if orientation != 1:
        warnings.append(
            f"{show(file)}: EXIF orientation {orientation}: the mask follows the image as displayed, "
            "which readers that ignore EXIF (MONAI's PILReader) do not see"
        )
    return ImageEntry(file=file, name=name, width=width, height=height)


def _label_name(name: str, level: int) -> str:
    """Label path of ``name`` at a clash level: 0 plain, 1 with the suffix kept, 2 with a hash too."""
    p = PurePosixPath(name)
    if level == 0:
        return str(p.with_suffix(".png"))
    stem = f"{p.stem}_{p.suffix[1:]}" if p.suffix else p.name
    if level == 2:
        stem += "-" + hashlib.sha256(name.encode("utf-8")).hexdigest()[:8]
    return str(p.with_name(stem + ".png"))


def _fold(path: str) -> str:
    """The key under which a case-insensitive (and normalisation-insensitive) file system sees a path."""
    return unicodedata.normalize("NFD", unicodedata.normalize("NFD", path).casefold())


def _clashes(paths) -> set[str]:
    """Folded label paths that two images would share, or that are also the folder of another label."""
    folded = [_fold(p) for p in paths]
    counts = Counter(folded)
    folders = {str(parent) for f in folded for parent in PurePosixPath(f).parents}
    return {f for f in folded if counts[f] > 1 or f in folders}


def label_paths(names: list[str], split_dir: Path | str = "") -> dict[str, str]:
    """The label path (relative to ``labels/<split>/``) of each normalised ``file_name`` of a split;
    pairwise distinct, also case-insensitively (see the module docstring)."""
    labels = {n: _label_name(n, 0) for n in names}
    for level in (1, 2):
        clashing = _clashes(labels.values())
        labels = {n: _label_name(n, level) if _fold(p) in clashing else p for n, p in labels.items()}
    if _clashes(labels.values()):  # a clash of 32-bit hashes: not expected, but never overwrite
        raise ConversionError(split_dir, "two images would share one label path; rename one of them")
    return labels


def _rle_string_counts(text: str) -> list[int] | None:
    """The runs of a compressed COCO RLE string (pycocotools' ``rleFrString``), None if malformed."""
    counts: list[int] = []
    p = 0
    while p < len(text):
        x = k = 0
        more = True
        while more:
            if p >= len(text):
                return None  # truncated in the middle of a number
            c = ord(text[p]) - 48
            if not 0 <= c < 64:
                return None
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def _rle(seg: dict, entry: ImageEntry, json_path: Path, aid: int) -> tuple[dict, bool]:
    """A validated COCO RLE segmentation, and whether it has no foreground pixel."""
    size, counts = seg.get("size"), seg.get("counts")
    if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) for v in size)):
        raise ConversionError(json_path, f"annotation id {aid}: RLE 'size' is not [height, width] ({_brief(size)})")
    if size != [entry.height, entry.width]:
        raise ConversionError(
            json_path,
            f"annotation id {aid}: RLE size [height, width] {_brief(size)} does not match "
            f"the {entry.width}x{entry.height} image '{show(entry.name)}'",
        )
    if isinstance(counts, str):
        runs = _rle_string_counts(counts)
    elif isinstance(counts, list) and all(_is_int(c) for c in counts):
        runs = counts
    else:
        runs = None
    pixels = entry.height * entry.width
    if runs is None or any(r < 0 for r in runs) or sum(runs) != pixels:
        raise ConversionError(
            json_path, f"annotation id {aid}: RLE counts are not runs covering the {pixels} pixels of the image"
        )
    return {"size": size, "counts": counts}, sum(runs[1::2]) == 0


def _polygon_area(poly: list[float]) -> float:
    xs, ys = poly[0::2], poly[1::2]
    return abs(sum(xs[i - 1] * ys[i] - xs[i] * ys[i - 1] for i in range(len(xs)))) / 2


def _bbox_problem(bbox) -> str | None:
    """What is wrong with a ``bbox`` by COCO's rules ([x, y, width, height]), None if nothing
    (a zero or negative width or height is no error: the annotation is skipped)."""
    if bbox is None:
        return None
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
        return "bbox is not 4 finite numbers"
    if max(abs(v) for v in bbox) > MAX_COORD:
        return f"bbox has a coordinate beyond {MAX_COORD} pixels in magnitude"
    return None


def _shape(aid: int, bbox, seg, entry: ImageEntry | None, json_path: Path) -> tuple[dict, str | None]:
    """What to draw for an annotation of a valid (or no) ``bbox`` (``{"polygons": ...}`` or
    ``{"rle": ...}``) and, when it covers nothing, why. Without an entry (its image is refused)
    an RLE is not checked against the image."""
    empty = "its bbox has a zero or negative width or height" if bbox is not None and min(bbox[2:]) <= 0 else None
    if isinstance(seg, dict):
        if entry is None:
            return {}, None
        rle, no_pixel = _rle(seg, entry, json_path, aid)
        return {"rle": rle}, empty or ("its RLE mask has no foreground pixel" if no_pixel else None)
    if isinstance(seg, list) and seg:
        polys = seg
    elif seg is None or seg == []:
        if bbox is None:
            raise ConversionError(json_path, f"annotation id {aid}: no polygon segmentation and no bbox")
        x, y, w, h = bbox
        polys = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    else:
        raise ConversionError(json_path, f"annotation id {aid}: segmentation is neither polygons nor an RLE object")
    for poly in polys:
        if not (isinstance(poly, list) and len(poly) >= 6 and len(poly) % 2 == 0 and all(_is_number(v) for v in poly)):
            raise ConversionError(json_path, f"annotation id {aid}: a polygon must be a list of at least 3 finite x,y pairs")
        if max(abs(v) for v in poly) > MAX_COORD:
            raise ConversionError(json_path, f"annotation id {aid}: a polygon has a coordinate beyond {MAX_COORD} pixels")
    if not empty and sum(_polygon_area(p) for p in polys) < MIN_POLYGON_AREA:
        empty = "its polygons have zero area"
    return {"polygons": polys}, empty


def _repeated_ids(entries: list, what: str, problem) -> set[int]:
    """The integer ids listed more than once in ``entries``, each one problem line."""
    counts = Counter(e["id"] for e in entries if isinstance(e, dict) and _is_int(e.get("id")))
    for i, n in counts.items():
        if n > 1:
            problem(f"{what} id {i} is listed {_times(n)}")
    return {i for i, n in counts.items() if n > 1}


def _read_images(data: dict, split_dir: Path, json_path: Path, plan: SplitPlan, problem) -> dict[int | None, ImageEntry | None]:
    """Image id -> the entry of its FILE, or None where the id or its file is refused. The ids
    naming one file (same device and inode, under any file_name) share its one entry. Where an
    entry has no integer id, or an id is listed twice (one image's own id lost), None maps to
    None: an unknown image_id may be that image's."""
    repeated = _repeated_ids(data["images"], "image", problem)
    by_id: dict[int | None, ImageEntry | None] = {None: None} if repeated else {}
    by_file: dict[tuple[int, int], list[tuple[int, str, dict]]] = {}  # (device, inode) -> (id, name, entry)
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict):
            problem(f"images[{i}] is not an object")
            by_id[None] = None
            continue
        iid, name = img.get("id"), img.get("file_name")
        if not _is_int(iid) or not isinstance(name, str) or not name:
            problem(f"image entry {_brief(img)}: needs an integer 'id' and a 'file_name'")
            by_id[None] = None
            continue
        by_id[iid] = None
        try:
            name = _split_name(name, split_dir, json_path)
            if not _is_file(split_dir / name):
                raise ConversionError(split_dir / name, "listed in the annotations but not found")
            st = (split_dir / name).stat()
        except ConversionError as e:
            plan.errors += e.lines
            continue
        by_file.setdefault((st.st_dev, st.st_ino), []).append((iid, name, img))
    for listed in by_file.values():
        ids = list(dict.fromkeys(iid for iid, _, _ in listed))
        names = sorted({name for _, name, _ in listed})
        sizes = list(dict.fromkeys(f"{_brief(img.get('width'))}x{_brief(img.get('height'))}" for _, _, img in listed))
        if len(sizes) > 1:
            problem(
                f"'{show(names[0])}' is listed under image ids {', '.join(map(str, ids))} with different sizes "
                f"({', '.join(sizes[:-1])} and {sizes[-1]})"
            )
            continue
        try:
            entry = _read_image(split_dir / names[0], names[0], listed[0][2], plan.warnings)
        except ConversionError as e:
            plan.errors += e.lines
            continue
        entry.ids = ids
        by_id.update({iid: entry for iid in ids if iid not in repeated})
        if len(ids) > 1:
            also = f" (also as {', '.join(repr(show(n)) for n in names[1:])})" if len(names) > 1 else ""
            plan.warnings.append(
                f"{show(json_path)}: '{show(names[0])}'{also} is listed under image ids "
                f"{', '.join(map(str, ids))}; their annotations are merged into its one label"
            )
    return by_id


def _read_annotations(data: dict, by_id: dict, categories: set, json_path: Path, plan: SplitPlan, problem) -> None:
    """Each annotation checked and, when its image is kept, added to its image's entry. Where an
    image or category has no integer id (None), unknown ids are not reported: they may be its."""
    _repeated_ids(data["annotations"], "annotation", problem)
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            problem(f"annotations[{i}] is not an object")
            continue
        aid, iid, cat = ann.get("id"), ann.get("image_id"), ann.get("category_id")
        if not _is_int(aid):
            problem(f"annotation {_brief(ann)}: needs an integer 'id'")
            continue
        found = len(plan.errors)
        if not (_is_int(iid) and iid in by_id) and None not in by_id:
            problem(f"annotation id {aid} refers to unknown image_id {_brief(iid)}")
        if not (_is_int(cat) and cat in categories) and None not in categories:
            problem(f"annotation id {aid} has unknown category_id {_brief(cat)}")
        bbox, seg = ann.get("bbox"), ann.get("segmentation")
        bad_box = _bbox_problem(bbox)
        if bad_box:
            problem(f"annotation id {aid}: {bad_box}")
            if seg is None or seg == []:
                continue  # nothing else to check
        entry = by_id.get(iid) if _is_int(iid) else None
        try:
            shape, empty = _shape(aid, None if bad_box else bbox, seg, entry, json_path)
        except ConversionError as e:
            plan.errors += e.lines
            continue
        if entry is None or len(plan.errors) > found:
            continue
        where = f"{show(json_path)}: annotation id {aid} on '{show(entry.name)}'"
        if empty:
            plan.warnings.append(f"{where}: {empty}; skipped")
            continue
        if "polygons" in shape:
            xs = [v for p in shape["polygons"] for v in p[0::2]]
            ys = [v for p in shape["polygons"] for v in p[1::2]]
            if min(xs) < 0 or min(ys) < 0 or max(xs) > entry.width or max(ys) > entry.height:
                plan.warnings.append(f"{where} reaches outside the {entry.width}x{entry.height} image; clipped")
        entry.annotations.append({"category_id": cat, **shape})


def plan_split(root: Path, folder: str, key: str) -> SplitPlan:
    """Read and validate one split; its problems are in ``errors``, one line each."""
    split_dir = root / folder
    json_path = split_dir / ANNOTATION_NAME
    plan = SplitPlan(key=key, folder=folder)
    try:
        data, plan.sha256 = _load_json(json_path)
    except ConversionError as e:
        plan.errors += e.lines
        return plan

    def problem(text: str) -> None:
        plan.errors.append(f"{show(json_path)}: {text}")

    for cat in data["categories"]:
        if not isinstance(cat, dict) or not _is_int(cat.get("id")):
            problem(f"category {_brief(cat)}: needs an integer 'id'")
    _repeated_ids(data["categories"], "category", problem)
    categories = {c.get("id") if isinstance(c, dict) and _is_int(c.get("id")) else None for c in data["categories"]}
    by_id = _read_images(data, split_dir, json_path, plan, problem)
    _read_annotations(data, by_id, categories, json_path, plan, problem)
    if plan.errors:
        return plan
    plan.images = sorted({id(e): e for e in by_id.values() if e is not None}.values(), key=lambda e: e.name)
    try:
        labels = label_paths([e.name for e in plan.images], split_dir)
    except ConversionError as e:
        plan.errors += e.lines
        return plan
    for entry in plan.images:
        entry.label = labels[entry.name]
    return plan


def _annotation_mask(ann: dict, entry: ImageEntry, mask_utils):
    """One annotation as a boolean mask: its RLE decoded, or its polygons (clipped) filled."""
    h, w = entry.height, entry.width
    if "rle" in ann:
        counts = ann["rle"]["counts"]
        if isinstance(counts, str):  # compressed: pycocotools decodes it as is
            rle = {"size": [h, w], "counts": counts.encode("ascii")}
        else:  # uncompressed list of runs
            rle = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
        return mask_utils.decode(rle).astype(bool)
    clipped = [[min(max(v, 0.0), float(w if i % 2 == 0 else h)) for i, v in enumerate(poly)] for poly in ann["polygons"]]
    rles = mask_utils.frPyObjects(clipped, h, w)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def rasterise(entry: ImageEntry, keep_categories: bool):
    """The mask of one image (uint8, height x width), drawn with pycocotools."""
    import numpy as np
    from pycocotools import mask as mask_utils

    out = np.zeros((entry.height, entry.width), dtype=np.uint8)
    for ann in entry.annotations:
        m = _annotation_mask(ann, entry, mask_utils)
        value = ann["category_id"] if keep_categories else 1
        out[m] = np.maximum(out[m], value)
    return out


def _png_bytes(mask) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(mask, mode="L").save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _earlier_output(out: Path) -> bool:
    """Whether ``out`` exists, to be replaced; raises unless it is an empty folder or an earlier
    output of this converter: its datalist.json and the labels listed there, nothing else."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise ConversionError(out, "exists and is not a folder")
    entries = {p.name for p in out.iterdir()}
    if not entries:
        return True
    try:
        datalist = json.loads((out / DATALIST_NAME).read_text(encoding="utf-8"))
        listed = {row["label"] for rows in datalist.values() if isinstance(rows, list) for row in rows}
        files = {p.relative_to(out).as_posix() for p in (out / "labels").rglob("*") if not p.is_dir()}
        ours = datalist.get("name") == DATASET_NAME and isinstance(datalist.get("source"), dict) and files == listed
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        ours = False
    if not ours or entries - {DATALIST_NAME, "labels"}:
        raise ConversionError(
            out, "exists and is not an earlier output of this converter (datalist.json and its labels/ only); give a new folder"
        )
    return True


def _remove_if_abandoned(folder: Path) -> None:
    """Remove a temporary folder of a conversion that no running process holds (a killed one)."""
    import fcntl

    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        shutil.rmtree(folder, ignore_errors=True)
    except OSError:
        pass  # held: a conversion into the same folder is running
    finally:
        os.close(fd)


def _publish(out: Path, out_real: Path, write) -> None:
    """Run ``write(folder)`` into a new folder beside ``out_real`` and rename that into place: the
    output folder is absent, as it was, or complete, never partial, also when the run is killed.

    Raises:
        ConversionError: a write failed (disk full, read-only, permission denied), in plain words
            and saying what was kept; the temporary folder is removed.
    """
    import fcntl

    existed = out_real.exists()
    parent, prefix = out_real.parent, f".{out_real.name[:50]}.converting-"
    work = None
    try:
        parent.mkdir(parents=True, exist_ok=True)
        for stale in parent.glob(glob.escape(prefix) + "*"):
            _remove_if_abandoned(stale)
        work = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        lock = os.open(work, os.O_RDONLY)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # held until the end: this folder is not abandoned
            (work / "new").mkdir()
            write(work / "new")
            if existed:
                os.rename(out_real, work / "old")
            try:
                os.rename(work / "new", out_real)
            except OSError:
                if existed:
                    os.rename(work / "old", out_real)
                raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
            os.close(lock)
    except OSError as e:
        path = Path(os.fsdecode(e.filename)) if e.filename is not None else out
        if work is not None and _inside(path, work / "new"):
            path = out / path.relative_to(work / "new")  # where the file was going
        elif path.name.startswith(prefix) or (work is not None and _inside(path, work)):
            path = out.parent  # the temporary folder beside the output could not be made or moved
        elif path == out_real:
            path = out
        kept = f"{show(out)} is as it was" if existed and out_real.exists() else f"nothing was written to {show(out)}"
        raise ConversionError(path, f"cannot write: {_write_failure(e)}; {kept}") from None


def _write_file(path: Path, data: bytes) -> None:
    try:
        path.write_bytes(data)
    except OSError as e:  # a failed write() names no file: name it
        e.filename = e.filename or str(path)
        raise


def _write_failure(e: OSError) -> str:
    return _WRITE_FAILURES.get(e.errno, (e.strerror or e.__class__.__name__).lower())


def convert(
    root: Path | str,
    out: Path | str,
    splits: dict[str, str] | None = None,
    keep_categories: bool = False,
    progress: bool | None = None,
    log=print,
) -> dict:
    """Convert the download at ``root`` into ``out``; returns the datalist written.

    Args:
        root: the Kaggle download root, holding one folder per split.
        out: the output folder; must not lie inside ``root`` (nor contain it); when it exists, it
            must be empty or an earlier output of this converter, which is then replaced.
        splits: datalist key -> split folder name; default training=train, validation=valid,
            test=test. A split whose folder is absent gives an empty list (reported); none of
            them present is an error.
        keep_categories: write the COCO ``category_id`` as mask value instead of 1.
        progress: show a progress bar; ``None`` shows one only on a terminal.
        log: where notes and warnings go (one line each).

    Raises:
        ConversionError: with one line per problem (``lines``); nothing has been written then.
    """
    from tqdm import tqdm

    root, out = Path(root), Path(out)
    splits = dict(DEFAULT_SPLITS if splits is None else splits)
    if not root.is_dir():
        raise ConversionError(root, "input folder not found")
    root_real, out_real = root.resolve(), out.resolve()
    if _inside(out_real, root_real) or _inside(root_real, out_real):
        raise ConversionError(out, f"output folder must be separate from the input folder {show(root)}")
    _earlier_output(out)
    if not any((root / folder).is_dir() for folder in splits.values()):
        folders = ", ".join(show(f) for f in splits.values())
        raise ConversionError(root, f"none of the split folders ({folders}) is there; is this the download root?")

    plans = []
    for key, folder in splits.items():
        if not (root / folder).is_dir():
            log(f"note: {show(root / folder)}: no such split folder; the '{key}' list is empty")
            plans.append(SplitPlan(key=key, folder=folder))
            continue
        plans.append(plan_split(root, folder, key))
    problems = [line for plan in plans for line in plan.errors]
    if problems:
        raise ConversionError(lines=problems)

    datalist: dict = {
        "name": DATASET_NAME,
        "license": "CC BY 4.0",
        "labels": {"0": "background", "1": "tumour"}
        if not keep_categories
        else {"0": "background", "1": "tumour (COCO category 1)", "2": "tumour (COCO category 2)"},
        "source": {},
    }
    for plan in plans:
        for w in plan.warnings:
            log(f"warning: {w}")
        datalist[plan.key] = [
            {"image": os.path.relpath(e.file.resolve(), out_real), "label": f"labels/{plan.folder}/{e.label}"}
            for e in plan.images
        ]
        datalist["source"][plan.key] = {"folder": plan.folder, "annotations_sha256": plan.sha256, "images": len(plan.images)}

    def write(folder: Path) -> None:
        total = sum(len(p.images) for p in plans)
        hidden = (not sys.stderr.isatty()) if progress is None else not progress
        with tqdm(total=total, unit="img", desc="converting", disable=hidden) as bar:
            for plan in plans:
                for entry in plan.images:
                    label = folder / "labels" / plan.folder / entry.label
                    label.parent.mkdir(parents=True, exist_ok=True)
                    _write_file(label, _png_bytes(rasterise(entry, keep_categories)))
                    bar.update(1)
        _write_file(folder / DATALIST_NAME, (json.dumps(datalist, indent=1) + "\n").encode())

    _publish(out, out_real, write)
    return datalist


def _parse_split(text: str) -> tuple[str, str]:
    key, sep, folder = text.partition("=")
    if not sep or key not in DEFAULT_SPLITS or not folder or "/" in folder:
        raise argparse.ArgumentTypeError(f"expected KEY=FOLDER with KEY one of {', '.join(DEFAULT_SPLITS)}, got {text!r}")
    return key, folder


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tumorseg-convert",
        description="Convert the Kaggle brain-tumour COCO download into PNG masks and a MONAI datalist.",
    )
    p.add_argument("input", type=Path, help="download root holding train/ valid/ test/ with _annotations.coco.json")
    p.add_argument("output", type=Path, help="output folder (separate from the input); gets labels/ and datalist.json")
    p.add_argument(
        "--split",
        action="append",
        type=_parse_split,
        default=[],
        metavar="KEY=FOLDER",
        help="split folder for a datalist key (training, validation, test); default training=train validation=valid test=test",
    )
    p.add_argument("--keep-categories", action="store_true", help="mask value = COCO category_id instead of 1")
    p.add_argument("--no-progress", action="store_true", help="never show the progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    splits = dict(DEFAULT_SPLITS)
    splits.update(dict(args.split))
    try:
        datalist = convert(
            args.input,
            args.output,
            splits=splits,
            keep_categories=args.keep_categories,
            progress=False if args.no_progress else None,
            log=lambda line: print(line, file=sys.stderr),
        )
    except ConversionError as e:
        for line in e.lines:
            print(f"error: {line}", file=sys.stderr)
        return 1
    except OSError as e:  # reading the input or the output folder failed (permission denied...)
        print(f"error: {show(e.filename or args.output)}: {_write_failure(e)}", file=sys.stderr)
        return 1
    counts = ", ".join(f"{k} {len(datalist[k])}" for k in splits)
    print(f"wrote {show(args.output / DATALIST_NAME)} ({counts})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
