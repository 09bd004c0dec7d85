"""Measure the post-processing choices on one split with the shipped weights: one MLflow run.

    python -m experiments.postprocessing --dataset_dir <converted Kaggle download> \
        [--split validation] [--tracking_dir mlflow] [--checkpoint <model.pt>] [--output table.md]

The network runs once per slice, with and without flip TTA (the bundle's preprocessing,
network and ``tumorseg.inference.inferers.FlipTTAInferer``); every rule below then turns the same
probabilities into a mask, and each is scored by per-image tumour Dice and IoU at network
resolution (what ``evaluate`` reports):

- ``threshold_<t>``: ``p > t``;
- ``largest_component``: MONAI's ``KeepLargestConnectedComponent`` after ``p > 0.5``;
- ``largest_component_bbox``: the bounding box of that component (the labels are boxes);
- ``expected_dice_box``: ``tumorseg.postprocessing.transforms.ExpectedDiceBox`` (the bundle's ``box_fit``);
- ``expected_dice_box_x<f>``: that box with its sides scaled by ``f`` about its centre, a probe
  of whether the boxes have a systematic size error.

Slices are also split by the annotation's COCO category (read from the
``_annotations.coco.json`` beside the source images), since the two kinds of box differ.
The run (name ``postprocessing_<split>``) carries the checkpoint's SHA-256, so the UI nests it
under the training run of those weights; the table is also printed and logged as an artifact.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "brain_tumor_mri_seg"
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
BOX_SCALES = (0.9, 0.95, 1.05)


def probabilities(dataset_dir: Path, split: str, checkpoint: Path) -> tuple[dict, np.ndarray, list[str]]:
    """Sigmoid maps (N, H, W) without and with flip TTA, binary labels, and source image paths."""
    import torch
    from monai.data import DataLoader, Dataset, load_decathlon_datalist
    from monai.inferers import SimpleInferer
    from monai.transforms import Compose

    from tumorseg.bundle import parser as bundle_parser
    from tumorseg.inference.inferers import FlipTTAInferer

    parser = bundle_parser("train", BUNDLE)
    items = load_decathlon_datalist(str(dataset_dir / "datalist.json"), data_list_key=split, base_dir=str(dataset_dir))
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    network.eval()
    inferers = {"plain": SimpleInferer(), "tta": FlipTTAInferer(SimpleInferer())}
    loader = DataLoader(Dataset(items, Compose(parser.get_parsed_content("preprocessing"))), batch_size=16, num_workers=2)
    probs, labels, sources = {k: [] for k in inferers}, [], []
    with torch.no_grad():
        for batch in loader:
            for name, inferer in inferers.items():
                probs[name].append(torch.sigmoid(inferer(batch["image"], network))[:, 0].numpy())
            labels.append(batch["label"][:, 0].numpy() > 0.5)
            sources += list(batch["image"].meta["filename_or_obj"])
            print(f"\r{len(sources)}/{len(items)} slices", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return {k: np.concatenate(v) for k, v in probs.items()}, np.concatenate(labels), sources


def categories(sources: list[str]) -> list[int]:
    """The COCO category of each slice's annotation (0 where it has none)."""
    found, tables = [], {}
    for source in map(Path, sources):
        if source.parent not in tables:
            coco = json.loads((source.parent / "_annotations.coco.json").read_text())
            names = {im["id"]: im["file_name"] for im in coco["images"]}
            tables[source.parent] = {names[a["image_id"]]: a["category_id"] for a in coco["annotations"]}
        found.append(tables[source.parent].get(source.name, 0))
    return found


def scaled_box(mask: np.ndarray, factor: float = 1.0) -> np.ndarray:
    """The bounding box of ``mask`` (MONAI's ``generate_spatial_bounding_box``), its sides scaled
    by ``factor`` about the centre; empty stays empty."""
    from monai.transforms.utils import generate_spatial_bounding_box

    out = np.zeros_like(mask)
    if mask.any():
        (r0, c0), (r1, c1) = generate_spatial_bounding_box(mask[None])
        h, w = (r1 - r0) * factor / 2, (c1 - c0) * factor / 2
        rc, cc = (r0 + r1) / 2, (c0 + c1) / 2
        out[max(0, round(rc - h)) : round(rc + h), max(0, round(cc - w)) : round(cc + w)] = True
    return out


def rules() -> dict:
    """Name -> function from one (H, W) probability map to a boolean mask."""
    from monai.transforms import KeepLargestConnectedComponent

    from tumorseg.postprocessing.transforms import ExpectedDiceBox

    largest = KeepLargestConnectedComponent(applied_labels=[1], connectivity=2)
    box_fit = ExpectedDiceBox()

    def largest_component(p):
        return np.asarray(largest((p > 0.5)[None].astype(np.uint8))[0]) > 0

    table = {f"threshold_{t}": (lambda p, t=t: p > t) for t in THRESHOLDS}
    table["largest_component"] = largest_component
    table["largest_component_bbox"] = lambda p: scaled_box(largest_component(p))
    table["expected_dice_box"] = box_fit.box
    table.update({f"expected_dice_box_x{f}": (lambda p, f=f: scaled_box(box_fit.box(p), f)) for f in BOX_SCALES})
    return table


def dice_iou(pred: np.ndarray, label: np.ndarray) -> tuple[float, float]:
    inter, total = float((pred & label).sum()), float(pred.sum() + label.sum())
    if total == 0:  # nothing to find and nothing found
        return 1.0, 1.0
    return 2 * inter / total, inter / (total - inter)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset_dir", type=Path, required=True, help="output of python -m data_tools on the full download")
    ap.add_argument("--split", default="validation", help="datalist key (select on validation; never on test)")
    ap.add_argument("--checkpoint", type=Path, default=BUNDLE / "models" / "model.pt")
    ap.add_argument("--tracking_dir", type=Path, default=REPO / "mlflow")
    ap.add_argument("--experiment", default="brain_tumor_mri_seg")
    ap.add_argument("--output", type=Path, help="also write the table to this Markdown file")
    args = ap.parse_args()

    probs, labels, sources = probabilities(args.dataset_dir.resolve(), args.split, args.checkpoint)
    cats = np.array(categories(sources))
    rules_by_name = rules()
    rows = []
    for setting, maps in probs.items():
        for name, rule in rules_by_name.items():
            scores = np.array([dice_iou(rule(p.astype(np.float32)), y) for p, y in zip(maps, labels)])
            row = {
                "tta": setting == "tta",
                "rule": name,
                "dice": scores[:, 0].mean(),
                "iou": scores[:, 1].mean(),
                "dice_zero": float((scores[:, 0] == 0).mean()),
            }
            row.update({f"dice_category_{c}": scores[cats == c, 0].mean() for c in np.unique(cats)})
            rows.append(row)
            print(f"{setting:5s} {name:28s} Dice {row['dice']:.4f}", file=sys.stderr, flush=True)

    header = ["tta", "rule", "dice", "iou", "dice_zero"] + sorted(k for k in rows[0] if k.startswith("dice_category"))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(f"{r[k]:.4f}" if isinstance(r[k], float) else str(r[k]) for k in header) + " |" for r in rows]
    counts = ", ".join(
        f"{f'category {c}' if c else 'no annotation (category 0)'}: {int((cats == c).sum())} slices" for c in np.unique(cats)
    )
    table = (
        f"Post-processing on `{args.split}` ({len(labels)} slices; {counts}), weights {args.checkpoint.name}\n\n"
        + "\n".join(lines)
        + "\n"
    )
    print(table)
    if args.output:
        args.output.write_text(table)

    from mlflow.entities import Metric, Param

    from experiments.components import run_of_weights

    client, run = run_of_weights(
        args.tracking_dir, args.experiment, args.checkpoint, "postprocessing", f"postprocessing_{args.split}"
    )
    params = {
        "split": args.split,
        "slices": len(labels),
        "checkpoint": str(args.checkpoint),
        "thresholds": str(THRESHOLDS),
        "box_scales": str(BOX_SCALES),
    }
    now = int(time.time() * 1000)
    metrics = [
        Metric(f"{'tta_' if r['tta'] else ''}{r['rule'].replace('.', '_')}.{key}", float(r[key]), now, 0)
        for r in rows
        for key in header[2:]
    ]
    client.log_batch(run.info.run_id, metrics=metrics, params=[Param(k, str(v)) for k, v in params.items()])
    client.log_text(run.info.run_id, table, "postprocessing.md")
    client.log_text(run.info.run_id, json.dumps(rows, indent=1, default=float), "postprocessing.json")
    client.set_terminated(run.info.run_id)
    print(f"MLflow run postprocessing_{args.split}: {run.info.run_id}")


if __name__ == "__main__":
    main()
