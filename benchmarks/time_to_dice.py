"""Time to Dice: train recipes one after the other on this machine, each alone on it, and report
when each reached validation Dice 0.70 and 0.75, and its Dice through the bundle's ``evaluate``.

    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.time_to_dice --dataset_dir <converted folder> \
        --recipes fast_cpu,default --deadline_s 1500 --out runs/time_to_dice [--tracking]

Each recipe trains through ``experiments/recipes.py`` (the bundle's own ``monai.bundle run
training``; a run still going at ``--deadline_s`` is stopped, keeping its best weights), then its
best weights are evaluated on the validation list with ``evaluate.yaml``'s defaults (flip TTA and
the box fit on), layered on the same recipe configs. Two clocks:

- *trainer seconds*: ``time_s`` of the epoch in ``metrics.jsonl`` (the trainer's own clock, from
  its first iteration) at the first validation at or above each Dice; that Dice is the one
  validation computes while training (threshold 0.5, no TTA);
- *wall seconds*: the training command from start to exit (start-up, caching the data, every
  epoch, the last checkpoint), and the same plus the evaluation.

Speed, not a test: the figures depend on the machine, and on nothing else running on it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TARGETS = (0.70, 0.75)


def first_reaching(epochs: list[dict], target: float) -> dict | None:
    """The first epoch whose validation Dice is at least ``target``, or None."""
    return next((e for e in epochs if e.get("val_mean_dice", -1) >= target), None)


def evaluate(recipe: str, run_dir: Path, dataset_dir: Path, tracking: bool, overrides: dict) -> tuple[float | None, float]:
    """The validation Dice of the run's best weights through evaluate.yaml (its defaults) with the
    recipe's own files and the same ``--set`` overrides as its training, and the seconds it took."""
    from experiments.recipes import BUNDLE, config_files

    cmd = [
        sys.executable, "-m", "monai.bundle", "run",
        "--bundle_root", BUNDLE,
        "--config_file", str(config_files(recipe) + [f"{BUNDLE}/configs/evaluate.yaml"]),
        "--dataset_dir", str(dataset_dir),
        "--eval_list", "validation",
        "--checkpoint", str(run_dir / "models" / "model.pt"),
        "--output_dir", str(run_dir / "evaluate"),
    ]  # fmt: skip
    for key, value in overrides.items():
        cmd += [f"--{key}", value]
    if tracking:
        cmd += ["--tracking", "configs/mlflow.json"]
    start = time.time()
    with open(run_dir / "evaluate.log", "w") as log:
        rc = subprocess.call(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.time() - start
    summary = run_dir / "evaluate" / "evaluate_validation" / "summary.json"
    if rc != 0 or not summary.is_file():
        return None, seconds
    return json.loads(summary.read_text())["per_image"]["dice"]["mean"], seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset_dir", type=Path, required=True)
    ap.add_argument("--recipes", default="fast_cpu,default", help="recipe names of experiments/recipes.py, in order")
    ap.add_argument("--out", type=Path, default=Path("runs/time_to_dice"))
    ap.add_argument("--deadline_s", type=float, default=None, help="stop a training still going after this many seconds")
    ap.add_argument("--tracking", action="store_true", help="track training and evaluation in MLflow (configs/mlflow.json)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra bundle override for every run")
    args = ap.parse_args()
    sets = list(args.set) + (["tracking=configs/mlflow.json"] if args.tracking else [])
    overrides = dict(kv.split("=", 1) for kv in args.set)

    import platform

    import torch

    print(
        f"{platform.node()}: {os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, CUDA {torch.cuda.is_available()}",
        flush=True,
    )
    rows = []
    for recipe in [r for r in args.recipes.split(",") if r]:
        cmd = [sys.executable, "-m", "experiments.recipes", "--dataset_dir", str(args.dataset_dir.resolve()),
               "--out", str(args.out.resolve()), "--recipes", recipe]  # fmt: skip
        if args.deadline_s is not None:
            cmd += ["--deadline_s", str(args.deadline_s)]
        for kv in sets:
            cmd += ["--set", kv]
        print(f"training {recipe} ...", flush=True)
        start = time.time()
        subprocess.run(cmd, cwd=REPO, check=False)
        train_s = time.time() - start
        run_dir = (args.out / recipe).resolve()
        metrics = run_dir / "eval" / "metrics.jsonl"
        epochs = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
        record = json.loads((run_dir / "recipe.json").read_text())
        dice, eval_s = evaluate(recipe, run_dir, args.dataset_dir.resolve(), args.tracking, overrides)
        row = {"recipe": recipe, "epochs": len(epochs), "completed": record.get("completed"), "train_wall_s": round(train_s),
               "evaluate_s": round(eval_s), "evaluate_dice": dice,
               "best_val_dice": max((e.get("val_mean_dice", -1) for e in epochs), default=None)}  # fmt: skip
        for target in TARGETS:
            hit = first_reaching(epochs, target)
            row[f"to_{target:.2f}"] = None if hit is None else {"epoch": hit["epoch"], "trainer_s": round(hit["time_s"])}
        (run_dir / "time_to_dice.json").write_text(json.dumps(row, indent=1))
        rows.append(row)

    def reached(hit):
        return "not reached" if hit is None else f"{hit['trainer_s']} s (epoch {hit['epoch']})"

    print(
        "\n| recipe | epochs | val Dice 0.70 at | val Dice 0.75 at | best val Dice | training, wall "
        "| evaluate Dice (TTA + box fit) | training + evaluate, wall |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        done = "" if r["completed"] else " (stopped at the deadline)"
        dice = "failed" if r["evaluate_dice"] is None else f"{r['evaluate_dice']:.4f}"
        best = "n/a" if r["best_val_dice"] is None else f"{r['best_val_dice']:.4f}"
        print(
            f"| {r['recipe']} | {r['epochs']}{done} | {reached(r['to_0.70'])} | {reached(r['to_0.75'])} | {best} | "
            f"{r['train_wall_s'] / 60:.1f} min | {dice} | {(r['train_wall_s'] + r['evaluate_s']) / 60:.1f} min |"
        )


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
