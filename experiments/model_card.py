"""Regenerate the model card's figures from the shipped weights and the recorded recipe runs.

    python -m experiments.model_card --dataset_dir <converted Kaggle download> [--tracking_dir mlflow]
    (make model-card DATA=<converted folder>)

1. imports the recipe runs of experiments/results/ into MLflow (once);
2. evaluates models/model.pt on `valid` with the bundle's evaluate config (real CLI, MLflow
   tracked) for each inference setting: plain threshold, flip TTA, box fit, both; then measures
   every post-processing rule on `valid` and on `train` (experiments/postprocessing.py, one
   MLflow run per split, tables in docs/postprocessing_<split>.md);
3. writes docs/figures/training_curves.svg (val Dice per epoch of every recipe),
   docs/figures/valid_examples.png (image | ground truth | prediction, like the poster's
   figure 5), docs/figures/valid_cases.png (worst and best cases), docs/eval_valid.json, and
   metadata.json's eval_metrics (the default setting's figures);
4. prints the tables the model card quotes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "brain_tumor_mri_seg"
RESULTS = REPO / "experiments" / "results"
RECIPE_COMPARISON = "h100-2026-11-26"  # the 40-epoch recipes drawn in training_curves.svg, with the runs that continued them
FIGURES = BUNDLE / "docs" / "figures"
SETTINGS = {  # name: (tta, box_fit, refine); the last is the evaluate/inference default
    "threshold": (False, False, False),
    "tta": (True, False, False),
    "box_fit": (False, True, False),
    "tta+box_fit": (True, True, False),
    "tta+box_fit+refine": (True, True, True),
}
POSTER = {"dice": 0.75, "poster_mean_iou": 0.98}


def evaluate(dataset_dir: Path, out: Path, tta: bool, box_fit: bool, refine: bool, tracking_dir: Path) -> dict:
    from tumorseg.bundle import config_files

    configs = config_files("evaluate", BUNDLE)
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        str(configs),
        "--bundle_root",
        str(BUNDLE),
        "--dataset_dir",
        str(dataset_dir),
        "--eval_list",
        "validation",
        "--eval_dir",
        str(out),
        "--tta",
        str(tta).lower(),
        "--box_fit",
        str(box_fit).lower(),
        "--refine",
        str(refine).lower(),
        "--tracking",
        str(REPO / "configs" / "mlflow.json"),
        "--tracking_dir",
        str(tracking_dir),
    ]
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "summary.json").read_text())


def curves_svg(runs: dict[str, list[dict]], width: int = 560, height: int = 300) -> str:
    """Validation Dice per epoch, one line per recipe."""
    colours = ["#3b7dd8", "#d8453b", "#2e9e4f", "#b06ad8", "#d89a3b", "#555555"]
    epochs = max(r["epoch"] for rows in runs.values() for r in rows)
    x = lambda e: 45 + (width - 160) * (e - 1) / max(epochs - 1, 1)  # noqa: E731
    y = lambda d: height - 30 - (height - 50) * d  # noqa: E731
    parts = [
        f'<line x1="45" y1="{y(t):.0f}" x2="{width - 115}" y2="{y(t):.0f}" stroke="#ddd"/>'
        f'<text x="5" y="{y(t) + 4:.0f}" font-size="11">{t:.1f}</text>'
        for t in np.linspace(0, 1, 6)
    ]
    parts += [
        f'<text x="{x(e):.0f}" y="{height - 12}" font-size="11" text-anchor="middle">{e}</text>'
        for e in range(0, epochs + 1, 10)
        if e
    ]
    for i, (name, rows) in enumerate(sorted(runs.items())):
        pts = " ".join(f"{x(r['epoch']):.1f},{y(r['val_mean_dice']):.1f}" for r in rows)
        c = colours[i % len(colours)]
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{c}" stroke-width="1.5"/>')
        parts.append(f'<text x="{width - 110}" y="{30 + 16 * i}" font-size="12" fill="{c}">{name}</text>')
    parts.append(
        f'<text x="{width / 2 - 60:.0f}" y="{height - 0}" font-size="11">epoch</text>'
        '<text x="45" y="14" font-size="12">validation Dice (per image, threshold 0.5)</text>'
    )
    svg = f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 4}" font-family="sans-serif">'
    return svg + "".join(parts) + "</svg>\n"


def examples_png(dataset_dir: Path, path: Path, count: int = 4) -> None:
    """Image | ground truth | prediction for evenly spaced `valid` cases, like the poster's figure 5."""
    from PIL import Image, ImageDraw

    from tumorseg.inference.predictor import Predictor

    items = json.loads((dataset_dir / "datalist.json").read_text())["validation"]
    picks = [items[i] for i in np.linspace(0, len(items) - 1, count).astype(int)]
    predictor = Predictor.from_bundle()
    size, rows = 256, []
    for item in picks:
        image = np.asarray(Image.open(dataset_dir / item["image"]).convert("L"), dtype=np.float32)
        label = np.asarray(Image.open(dataset_dir / item["label"])) > 0
        mask = predictor.predict_volume(image.T)[0].T  # (x, y) as MONAI reads it, back to (rows, cols)
        tiles = [image / max(image.max(), 1) * 255, label * 255.0, mask * 255.0]
        rows.append([Image.fromarray(t.astype(np.uint8)).resize((size, size)) for t in tiles])
    canvas = Image.new("L", (3 * size, count * size + 18), 0)
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(("image", "ground truth", "prediction")):
        draw.text((c * size + 5, 3), title, fill=255)
    for r, tiles in enumerate(rows):
        for c, tile in enumerate(tiles):
            canvas.paste(tile, (c * size, 18 + r * size))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, optimize=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset_dir", type=Path, required=True, help="output of python -m data_tools on the full download")
    ap.add_argument("--tracking_dir", type=Path, default=REPO / "mlflow")
    ap.add_argument("--work_dir", type=Path, default=REPO / "runs" / "model_card")
    args = ap.parse_args()
    dataset_dir, tracking_dir = args.dataset_dir.resolve(), args.tracking_dir.resolve()

    for results in sorted(p for p in RESULTS.iterdir() if p.is_dir()):
        subprocess.run(
            [
                sys.executable,
                str(REPO / "experiments" / "import_runs.py"),
                str(results),
                "--tracking_dir",
                str(tracking_dir),
                "--checkpoint",
                f"negatives_refine={BUNDLE / 'models' / 'model.pt'}",  # the shipped weights' recipe
            ],
            check=True,
        )

    summaries = {}
    for name, (tta, box_fit, refine) in SETTINGS.items():
        summaries[name] = evaluate(dataset_dir, args.work_dir / name, tta, box_fit, refine, tracking_dir)
        print(f"evaluated {name}: per-image Dice {summaries[name]['per_image']['dice']['mean']:.4f}", flush=True)
    for split in ("validation", "training"):
        subprocess.run(
            [
                sys.executable,
                str(REPO / "experiments" / "postprocessing.py"),
                "--dataset_dir",
                str(dataset_dir),
                "--split",
                split,
                "--tracking_dir",
                str(tracking_dir),
                "--output",
                str(BUNDLE / "docs" / f"postprocessing_{split}.md"),
            ],
            check=True,
        )
    # presence: healthy negatives built from the same download, then every presence setting
    negatives = args.work_dir / "negatives"
    subprocess.run([sys.executable, "-m", "data_tools.healthy", str(dataset_dir), str(negatives)], check=True, cwd=REPO)
    presence_md = BUNDLE / "docs" / "presence.md"
    subprocess.run(
        [sys.executable, str(REPO / "experiments" / "presence.py"), "--dataset_dir", str(negatives),
         "--tracking_dir", str(tracking_dir), "--output", str(presence_md)],
        check=True,
    )  # fmt: skip
    presence = json.loads(presence_md.with_suffix(".json").read_text())["default"]
    chosen = list(SETTINGS)[-1]
    best = summaries[chosen]

    runs = {}
    for metrics in sorted(RESULTS.glob("*/*/metrics.jsonl")):
        # a run that continued another (configs/experiments/restart.yaml) is drawn after its epochs
        offset = json.loads((metrics.parent / "recipe.json").read_text()).get("continues_epochs", 0)
        if metrics.parent.parent.name != RECIPE_COMPARISON and not offset:
            continue  # screens and time-to-Dice runs: their own tables (docs/README.md, benchmarks/README.md)
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        runs[metrics.parent.name] = [{**r, "epoch": r["epoch"] + offset} for r in rows]
    FIGURES.mkdir(parents=True, exist_ok=True)
    (FIGURES / "training_curves.svg").write_text(curves_svg(runs))
    examples_png(dataset_dir, FIGURES / "valid_examples.png")
    (FIGURES / "valid_cases.png").write_bytes((args.work_dir / chosen / "cases.png").read_bytes())
    (BUNDLE / "docs" / "eval_valid.json").write_text(json.dumps(summaries, indent=1) + "\n")

    eval_metrics = {f"valid_per_image_{k}": round(v["mean"], 4) for k, v in best["per_image"].items()}
    eval_metrics.update({f"valid_global_{k}": round(v, 4) for k, v in best["global"].items()})
    eval_metrics.update({f"valid_poster_{k}": round(v, 4) for k, v in best["poster"].items()})
    eval_metrics["valid_slice_sensitivity"] = round(presence["valid_sensitivity"], 4)
    eval_metrics["heldout_healthy_slice_specificity"] = round(presence["healthy_specificity"], 4)
    eval_metrics["healthy_volume_max_false_positive_cm3"] = round(presence["fp_cm3_max"], 3)
    meta_path = BUNDLE / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["eval_metrics"] = eval_metrics
    meta_path.write_text(json.dumps(meta, indent=4) + "\n")

    print("\n| recipe | epochs | best val Dice (epoch) | last val Dice |\n|---|---|---|---|")
    for name, rows in sorted(runs.items()):
        dice = [r["val_mean_dice"] for r in rows]
        print(f"| {name} | {len(rows)} | {max(dice):.4f} ({rows[int(np.argmax(dice))]['epoch']}) | {dice[-1]:.4f} |")
    print("\n| inference setting | per-image Dice | IoU | precision | recall | HD95 px | global Dice |")
    print("|---|---|---|---|---|---|---|")
    for name, s in summaries.items():
        p = s["per_image"]
        print(
            f"| {name} | {p['dice']['mean']:.4f} | {p['iou']['mean']:.4f} | {p['precision']['mean']:.4f} | "
            f"{p['recall']['mean']:.4f} | {p['hd95']['mean']:.2f} | {s['global']['dice']:.4f} |"
        )
    print("\n| poster metric (valid, default setting) | ours | poster (test) |\n|---|---|---|")
    for key, value in best["poster"].items():
        print(f"| {key} | {value:.4f} | {POSTER.get('poster_' + key, '')} |")
    print(f"| per-image tumour Dice | {best['per_image']['dice']['mean']:.4f} | {POSTER['dice']} |")
    print(f"\nfigures in {FIGURES}, metadata eval_metrics updated")


if __name__ == "__main__":
    main()
