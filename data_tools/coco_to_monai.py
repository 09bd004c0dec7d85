"""Convert the Kaggle "Brain Tumor Image DataSet: Semantic Segmentation" (COCO) to MONAI's format.

Input: the download root, one folder per split (``train/``, ``valid/``, ``test/``), each with its
images and an ``_annotations.coco.json``. Output, into a separate folder:

- ``labels/<split>/<image stem>.png``: one 8-bit single-channel mask per image, at the image's
  own size. Binary by default: 0 = background, 1 = tumour (every annotation is tumour; the
  dataset's categories 1 and 2 are two kinds of tumour box). With ``--keep-categories`` the
  pixel value is the COCO ``category_id``; where annotations of different categories overlap,
  the highest id wins.
- ``datalist.json``: a MONAI (Decathlon-style) dataset JSON with ``training``, ``validation``
  and ``test`` lists of ``{"image", "label"}``, paths relative to the output folder, readable by
  ``monai.data.load_decathlon_datalist(path, data_list_key=..., base_dir=<output folder>)``.

Everything is validated before anything is written: a missing or malformed json, an image listed
but absent or of another size than the json says, a ``file_name`` that escapes its split folder
and an unknown ``category_id`` are each reported on one line naming the file, and the command
exits with status 1, writing nothing. Polygon coordinates outside the image are clipped and
reported. Re-running on the same input gives byte-identical output; the input is never written.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tumorseg.files import write_atomic

DATALIST_NAME = "datalist.json"
ANNOTATION_NAME = "_annotations.coco.json"
DEFAULT_SPLITS = {"training": "train", "validation": "valid", "test": "test"}


class ConversionError(Exception):
    """A problem with the input, reported as ``<file>: <problem>``."""

    def __init__(self, path: Path | str, problem: str):
        super().__init__(f"{path}: {problem}")


@dataclass
class ImageEntry:
    file: Path  # the image on disk
    width: int
    height: int
    annotations: list[dict] = field(default_factory=list)


@dataclass
class SplitPlan:
    key: str  # datalist key: training / validation / test
    folder: str  # split folder name under the input root
    images: list[ImageEntry] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _load_json(path: Path) -> dict:
    if not path.is_file():
        raise ConversionError(path, "annotation file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConversionError(path, "not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise ConversionError(path, f"malformed JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(data, dict):
        raise ConversionError(path, "top level is not a JSON object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ConversionError(path, f"missing or invalid '{key}' list")
    return data


def _image_size(path: Path) -> tuple[int, int]:
    """Width and height of a fully decodable image (a truncated file is caught here, not in training)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return im.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise ConversionError(path, f"not a readable image ({e.__class__.__name__})") from None


def _polygons(ann: dict, json_path: Path) -> list[list[float]]:
    """The annotation's polygons (COCO ``segmentation``), or its ``bbox`` as one rectangle."""
    seg = ann.get("segmentation")
    if isinstance(seg, list) and seg:
        polys = seg
    elif "bbox" in ann:
        b = ann["bbox"]
        if not (isinstance(b, list) and len(b) == 4 and all(_is_number(v) for v in b)):
            raise ConversionError(json_path, f"annotation id {ann.get('id')}: bbox is not 4 finite numbers")
        x, y, w, h = b
        polys = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    else:
        raise ConversionError(json_path, f"annotation id {ann.get('id')}: no polygon segmentation and no bbox")
    for poly in polys:
        if not (isinstance(poly, list) and len(poly) >= 6 and len(poly) % 2 == 0 and all(_is_number(v) for v in poly)):
            raise ConversionError(
                json_path, f"annotation id {ann.get('id')}: a polygon must be a list of at least 3 finite x,y pairs"
            )
    return polys


def plan_split(root: Path, folder: str, key: str) -> SplitPlan:
    """Read and validate one split; raises ConversionError on the first problem."""
    split_dir = root / folder
    json_path = split_dir / ANNOTATION_NAME
    data = _load_json(json_path)
    plan = SplitPlan(key=key, folder=folder)

    categories = set()
    for cat in data["categories"]:
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int):
            raise ConversionError(json_path, "a category without an integer 'id'")
        categories.add(cat["id"])

    by_id: dict[int, ImageEntry] = {}
    split_real = split_dir.resolve()
    for img in data["images"]:
        if not isinstance(img, dict):
            raise ConversionError(json_path, "an 'images' entry is not an object")
        iid, name = img.get("id"), img.get("file_name")
        if not isinstance(iid, int) or not isinstance(name, str) or not name:
            raise ConversionError(json_path, f"image entry {img!r:.80}: needs an integer 'id' and a 'file_name'")
        if iid in by_id:
            raise ConversionError(json_path, f"image id {iid} is listed twice")
        file = split_dir / name
        if Path(name).is_absolute() or split_real not in file.resolve().parents:
            raise ConversionError(json_path, f"file_name {name!r} escapes the split folder {split_dir}")
        if not file.is_file():
            raise ConversionError(file, "listed in the annotations but not found")
        width, height = _image_size(file)
        if (img.get("width"), img.get("height")) != (width, height):
            raise ConversionError(
                file, f"is {width}x{height} but the json says {img.get('width')}x{img.get('height')}"
            )
        by_id[iid] = ImageEntry(file=file, width=width, height=height)

    seen_ann: set = set()
    for ann in data["annotations"]:
        if not isinstance(ann, dict):
            raise ConversionError(json_path, "an 'annotations' entry is not an object")
        aid = ann.get("id")
        if aid in seen_ann:
            raise ConversionError(json_path, f"annotation id {aid} is listed twice")
        seen_ann.add(aid)
        if ann.get("image_id") not in by_id:
            raise ConversionError(json_path, f"annotation id {aid} refers to unknown image_id {ann.get('image_id')!r}")
        if ann.get("category_id") not in categories:
            raise ConversionError(json_path, f"annotation id {aid} has unknown category_id {ann.get('category_id')!r}")
        entry = by_id[ann["image_id"]]
        polys = _polygons(ann, json_path)
        xs = [v for p in polys for v in p[0::2]]
        ys = [v for p in polys for v in p[1::2]]
        if min(xs) < 0 or min(ys) < 0 or max(xs) > entry.width or max(ys) > entry.height:
            plan.warnings.append(
                f"{json_path}: annotation id {aid} on {entry.file.name} reaches outside the "
                f"{entry.width}x{entry.height} image; clipped"
            )
        entry.annotations.append({"category_id": ann["category_id"], "polygons": polys})

    plan.images = sorted(by_id.values(), key=lambda e: e.file.name)
    return plan


def rasterise(entry: ImageEntry, keep_categories: bool):
    """The mask of one image (uint8, height x width); polygons filled with pycocotools."""
    import numpy as np
    from pycocotools import mask as mask_utils

    out = np.zeros((entry.height, entry.width), dtype=np.uint8)
    for ann in entry.annotations:
        clipped = [
            [min(max(v, 0.0), float(entry.width if i % 2 == 0 else entry.height)) for i, v in enumerate(poly)]
            for poly in ann["polygons"]
        ]
        rles = mask_utils.frPyObjects(clipped, entry.height, entry.width)
        m = mask_utils.decode(mask_utils.merge(rles)).astype(bool)
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
            test=test. A split whose folder is absent gives an empty list (reported).
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
        raise ConversionError(out, f"output folder must be separate from the input folder {root}")

    plans = []
    for key, folder in splits.items():
        if not (root / folder).is_dir():
            log(f"note: {root / folder}: no such split folder; the '{key}' list is empty")
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
    bar = tqdm(total=total, unit="img", desc="converting", disable=(not sys.stderr.isatty()) if progress is None else not progress)
    with bar:
        for plan in plans:
            for w in plan.warnings:
                log(f"warning: {w}")
            rows = []
            for entry in plan.images:
                label = out / "labels" / plan.folder / f"{entry.file.stem}.png"
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
        help="split folder for a datalist key (training, validation, test); "
        "default training=train validation=valid test=test",
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
    counts = ", ".join(f"{k} {len(datalist[k])}" for k in splits)
    print(f"wrote {args.output / DATALIST_NAME} ({counts})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
