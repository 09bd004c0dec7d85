"""Convert the Kaggle "Brain Tumor Image DataSet: Semantic Segmentation" (COCO) to MONAI's format.

Input: the download root, one folder per split (``train/``, ``valid/``, ``test/``), each with its
images and an ``_annotations.coco.json``. Output, into a separate folder:

- ``labels/<split>/<label path>``: one 8-bit single-channel mask per image, at the image's own
  size as displayed. The label path is the image's ``file_name`` (subfolders kept) with its suffix
  replaced by ``.png``: ``sub/a.jpg`` -> ``labels/train/sub/a.png``. Where two images of a split
  would get the same label path, also when the paths differ only in letter case (``x.jpg`` and
  ``x.png``, ``X.jpg`` and ``x.jpg``) or when one label path is the folder of another, each of
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

Everything is validated before anything is written. Each problem is one line
``error: <file>: <problem>`` and the command exits with status 1, writing nothing:

- a root without any of the split folders (a root with only some of them gives a note each and
  empty lists for the others);
- a json missing, unreadable, malformed, nested too deeply, or without ``images``,
  ``annotations`` and ``categories`` lists;
- an image entry without an integer ``id`` (or with one listed twice) and a ``file_name``; a
  ``file_name`` holding a control character (NUL, newline...) or escaping its split folder; an
  image listed but absent, not fully decodable, or of another size than the json's ``width`` x
  ``height``, the size as displayed: for EXIF orientations 5-8 width and height swap;
- one ``file_name`` under two image ids with different width or height (with the same width and
  height the two entries are merged: the label holds the annotations of both, and a warning
  says so);
- an annotation without an integer ``id`` (or with one listed twice), with an unknown
  ``image_id`` or ``category_id``, a ``bbox`` that is not 4 finite numbers, a polygon that is not
  at least 3 finite x,y pairs, an RLE whose ``size`` is not the image's ``[height, width]`` or
  whose counts are not runs covering exactly its pixels, or a segmentation of any other form.
  NaN, Infinity and integers beyond the float range are no finite numbers.

Handled with a ``warning:`` line naming the json, the annotation id and the image, going on:

- polygon coordinates outside the image are clipped;
- an annotation whose ``bbox`` has a zero or negative width or height, or whose segmentation
  covers no area (polygons of zero area, an RLE without a foreground pixel), is skipped;
- an image with an EXIF orientation other than 1: its mask follows the image as displayed, which
  readers that ignore EXIF (MONAI's ``PILReader``) do not see.

Every path and name in a message goes through :func:`show`, which escapes control characters, so
that a file name cannot break a message over lines or forge one. Re-running on the same input
gives byte-identical output; the input is never written.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import posixpath
import reprlib
import sys
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from tumorseg.files import show, write_atomic

DATALIST_NAME = "datalist.json"
ANNOTATION_NAME = "_annotations.coco.json"
DEFAULT_SPLITS = {"training": "train", "validation": "valid", "test": "test"}
EXIF_ORIENTATION = 0x0112  # 274
MIN_POLYGON_AREA = 1e-6  # square pixels; below it a polygon counts as of zero area (rounding)
_BAD_NAME_CHARS = {"Cc", "Cs", "Zl", "Zp"}  # controls (NUL, newline...), lone surrogates, line/paragraph separators


_short = reprlib.Repr()
_short.maxlevel, _short.maxstring, _short.maxlong, _short.maxother = 2, 40, 40, 40


def _brief(value) -> str:
    """A JSON value in a message: short, one line, safe on deeply nested or huge values."""
    return _short.repr(value)


class ConversionError(Exception):
    """A problem with the input, reported as ``<file>: <problem>``."""

    def __init__(self, path: Path | str, problem: str):
        super().__init__(f"{show(path)}: {problem}")


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


def _reason(e: Exception) -> str:
    return getattr(e, "strerror", None) or e.__class__.__name__


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError) as e:  # name too long, permission denied...
        raise ConversionError(path, f"cannot be accessed ({_reason(e)})") from None


def _load_json(path: Path) -> dict:
    if not _is_file(path):
        raise ConversionError(path, "annotation file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
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
    return data


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


def _read_image(split_dir: Path, name: str, img: dict, warnings: list[str]) -> ImageEntry:
    """The image entry for a file listed first, its size checked against the json."""
    file = split_dir / name
    if not _is_file(file):
        raise ConversionError(file, "listed in the annotations but not found")
    width, height, orientation = _image_size(file)
    turned = f" as displayed (EXIF orientation {orientation})" if orientation != 1 else ""
    if (img.get("width"), img.get("height")) != (width, height):
        raise ConversionError(
            file, f"is {width}x{height}{turned} but the json says {_brief(img.get('width'))}x{_brief(img.get('height'))}"
        )
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


def _shape(ann: dict, entry: ImageEntry, json_path: Path) -> tuple[dict, str | None]:
    """What to draw for an annotation (``{"polygons": ...}`` or ``{"rle": ...}``) and, when it
    covers nothing, why."""
    aid = ann["id"]
    bbox = ann.get("bbox")
    if bbox is not None and not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
        raise ConversionError(json_path, f"annotation id {aid}: bbox is not 4 finite numbers")
    empty = "its bbox has a zero or negative width or height" if bbox is not None and min(bbox[2:]) <= 0 else None
    seg = ann.get("segmentation")
    if isinstance(seg, dict):
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
    if not empty and sum(_polygon_area(p) for p in polys) < MIN_POLYGON_AREA:  # NaN (inf - inf) is drawn
        empty = "its polygons have zero area"
    return {"polygons": polys}, empty


def _read_images(data: dict, split_dir: Path, json_path: Path, plan: SplitPlan) -> dict[int, ImageEntry]:
    """Image id -> entry; a file_name listed under several ids of one size shares one entry."""
    by_id: dict[int, ImageEntry] = {}
    by_name: dict[str, ImageEntry] = {}
    for img in data["images"]:
        if not isinstance(img, dict):
            raise ConversionError(json_path, "an 'images' entry is not an object")
        iid, name = img.get("id"), img.get("file_name")
        if not _is_int(iid) or not isinstance(name, str) or not name:
            raise ConversionError(json_path, f"image entry {_brief(img)}: needs an integer 'id' and a 'file_name'")
        if iid in by_id:
            raise ConversionError(json_path, f"image id {iid} is listed twice")
        name = _split_name(name, split_dir, json_path)
        entry = by_name.get(name)
        if entry is None:
            entry = by_name[name] = _read_image(split_dir, name, img, plan.warnings)
        elif (img.get("width"), img.get("height")) != (entry.width, entry.height):
            raise ConversionError(
                json_path,
                f"'{show(name)}' is listed under image ids {entry.ids[0]} and {iid} with different sizes "
                f"({entry.width}x{entry.height} and {_brief(img.get('width'))}x{_brief(img.get('height'))})",
            )
        entry.ids.append(iid)
        by_id[iid] = entry
    for entry in by_name.values():
        if len(entry.ids) > 1:
            plan.warnings.append(
                f"{show(json_path)}: '{show(entry.name)}' is listed under image ids "
                f"{', '.join(map(str, entry.ids))}; their annotations are merged into its one label"
            )
    return by_id


def plan_split(root: Path, folder: str, key: str) -> SplitPlan:
    """Read and validate one split; raises ConversionError on the first problem."""
    split_dir = root / folder
    json_path = split_dir / ANNOTATION_NAME
    data = _load_json(json_path)
    plan = SplitPlan(key=key, folder=folder)

    categories = set()
    for cat in data["categories"]:
        if not isinstance(cat, dict) or not _is_int(cat.get("id")):
            raise ConversionError(json_path, "a category without an integer 'id'")
        categories.add(cat["id"])

    by_id = _read_images(data, split_dir, json_path, plan)
    seen_ann: set[int] = set()
    for ann in data["annotations"]:
        if not isinstance(ann, dict):
            raise ConversionError(json_path, "an 'annotations' entry is not an object")
        aid, iid, cat = ann.get("id"), ann.get("image_id"), ann.get("category_id")
        if not _is_int(aid):
            raise ConversionError(json_path, f"annotation {_brief(ann)}: needs an integer 'id'")
        if aid in seen_ann:
            raise ConversionError(json_path, f"annotation id {aid} is listed twice")
        seen_ann.add(aid)
        if not _is_int(iid) or iid not in by_id:
            raise ConversionError(json_path, f"annotation id {aid} refers to unknown image_id {_brief(iid)}")
        if not _is_int(cat) or cat not in categories:
            raise ConversionError(json_path, f"annotation id {aid} has unknown category_id {_brief(cat)}")
        entry = by_id[iid]
        shape, empty = _shape(ann, entry, json_path)
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

    plan.images = sorted({id(e): e for e in by_id.values()}.values(), key=lambda e: e.name)
    labels = label_paths([e.name for e in plan.images], split_dir)
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
        out: the output folder; must not lie inside ``root`` (nor contain it).
        splits: datalist key -> split folder name; default training=train, validation=valid,
            test=test. A split whose folder is absent gives an empty list (reported); none of
            them present is an error.
        keep_categories: write the COCO ``category_id`` as mask value instead of 1.
        progress: show a progress bar; ``None`` shows one only on a terminal.
        log: where notes and warnings go (one line each).

    Raises:
        ConversionError: on the first problem found; nothing has been written then.
    """
    from tqdm import tqdm

    root, out = Path(root), Path(out)
    splits = dict(DEFAULT_SPLITS if splits is None else splits)
    if not root.is_dir():
        raise ConversionError(root, "input folder not found")
    root_real, out_real = root.resolve(), out.resolve()
    if _inside(out_real, root_real) or _inside(root_real, out_real):
        raise ConversionError(out, f"output folder must be separate from the input folder {show(root)}")
    if out.exists() and not out.is_dir():
        raise ConversionError(out, "exists and is not a folder")
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

    datalist: dict = {
        "name": "Brain Tumor Image DataSet: Semantic Segmentation (Kaggle, pkdarabi; Roboflow export)",
        "license": "CC BY 4.0",
        "labels": {"0": "background", "1": "tumour"}
        if not keep_categories
        else {"0": "background", "1": "tumour (COCO category 1)", "2": "tumour (COCO category 2)"},
        "source": {},
    }
    total = sum(len(p.images) for p in plans)
    bar = tqdm(
        total=total, unit="img", desc="converting", disable=(not sys.stderr.isatty()) if progress is None else not progress
    )
    with bar:
        for plan in plans:
            for w in plan.warnings:
                log(f"warning: {w}")
            rows = []
            for entry in plan.images:
                label = out / "labels" / plan.folder / entry.label
                write_atomic(label, _png_bytes(rasterise(entry, keep_categories)))
                rows.append(
                    {
                        "image": os.path.relpath(entry.file.resolve(), out_real),
                        "label": label.relative_to(out).as_posix(),
                    }
                )
                bar.update(1)
            datalist[plan.key] = rows
            json_path = root / plan.folder / ANNOTATION_NAME
            datalist["source"][plan.key] = {
                "folder": plan.folder,
                "annotations_sha256": hashlib.sha256(json_path.read_bytes()).hexdigest() if json_path.is_file() else None,
                "images": len(rows),
            }
    write_atomic(out / DATALIST_NAME, (json.dumps(datalist, indent=1) + "\n").encode())
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
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # the output could not be written (disk full, permission denied)
        print(f"error: {show(e.filename or args.output)}: cannot be written ({_reason(e)})", file=sys.stderr)
        return 1
    counts = ", ".join(f"{k} {len(datalist[k])}" for k in splits)
    print(f"wrote {show(args.output / DATALIST_NAME)} ({counts})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
