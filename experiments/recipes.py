"""Train several recipes side by side with the bundle's own CLI, each in its own process.

    python -m experiments.recipes --dataset_dir <converted folder> --out runs/recipes \
        --recipes default,rotate_aug --max_epochs 50 [--deadline_s 3600] [--set num_workers=2]

A recipe is train.yaml plus the override files of configs/experiments/ it names (see RECIPES).
Each run writes <out>/<recipe>/{models/model.pt, eval/metrics.jsonl, train.log, recipe.json};
``experiments/import_runs.py`` turns them into MLflow runs. A run still going at the deadline
is stopped (its best checkpoint and metrics so far are kept, and recipe.json says so).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from tumorseg.bundle import config_files

REPO = Path(__file__).resolve().parents[1]
BUNDLE = "bundles/brain_tumor_mri_seg"
TRAIN = config_files("train", Path(BUNDLE))  # the bundle's training layers (tumorseg.bundle.WORKFLOWS)
RECIPES = {  # name: override files, applied in order on train.yaml
    "default": [],
    "rotate_aug": ["rotate_aug"],
    "wide": ["wide"],
    "dynunet_ds": ["dynunet_ds"],
    "dice_only": ["dice_only"],
    "restart": ["restart"],  # continues from the shipped weights: a schedule probe, not from scratch
    "negatives": ["restart", "negatives"],  # shipped weights fine-tuned with healthy negatives (data_tools/healthy.py)
    "negatives_refine": ["restart", "negatives", "negatives_refine"],  # its second stage (--set init_weights=...)
    "negatives_with_mirrors": ["restart", "negatives"],  # the first try: mirrored Kaggle slices trained on too
    "fast_cpu": ["fast_cpu"],  # time to Dice on 2 CPU cores (per-image Dice, bf16, one-cycle, 20 epochs at 128 px + 24 at 192)
    "per_image_dice": ["per_image_dice"],  # the poster's Dice per image, not per batch
    "categories": ["per_image_dice", "categories"],  # one logit per tumour category (tumorseg-convert --keep-categories)
    "quarter_turns": ["per_image_dice", "quarter_turns"],  # + 90-degree turns in the augmentation (boxes stay boxes)
    # per_image_dice weights (--set init_weights=...) fine-tuned with the healthy negatives in one stage
    "per_image_negatives": ["restart", "negatives", "per_image_dice"],
    # the shipped chain (per_image_dice -> per_image_negatives -> negatives_refine) with quarter turns
    "quarter_turns_negatives": ["restart", "negatives", "per_image_dice", "quarter_turns"],
    # the second negatives stage with the batch and the per-image Dice terms summed
    "dice_both_refine": ["restart", "negatives", "negatives_refine", "dice_both"],
    "quarter_turns_refine": ["restart", "negatives", "negatives_refine", "quarter_turns"],
    "attention_unet": ["attention_unet"],  # the poster's stronger network: attention gates on the skips
}


def config_files(recipe: str) -> list[str]:
    return TRAIN + [f"configs/experiments/{name}.yaml" for name in RECIPES[recipe]]


def mark_killed(run_dir: Path, overrides: dict[str, str]) -> None:
    """A run stopped at the deadline never reaches its own end, so its MLflow run would stay
    RUNNING: end it as KILLED (its metrics and best checkpoint so far stay logged)."""
    record = run_dir / "models" / "last" / "mlflow_run_name"  # the tracker's run_record
    if "tracking" not in overrides or not record.is_file():
        return
    from mlflow import MlflowClient

    store = (REPO / overrides.get("tracking_dir", "mlflow")).resolve() / "mlruns.db"
    client = MlflowClient(os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{store}")
    name = record.read_text().strip()
    experiments = [e.experiment_id for e in client.search_experiments()]
    for run in client.search_runs(experiments, filter_string=f"attributes.run_name = '{name}'"):
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, "KILLED")
            print(f"MLflow run {name} ended as KILLED", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset_dir", required=True)
    ap.add_argument("--out", type=Path, default=Path("runs/recipes"))
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--max_epochs", type=int, default=None, help="override every recipe's own max_epochs")
    ap.add_argument("--deadline_s", type=float, default=None, help="stop runs still going after this many seconds")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra bundle override for every run")
    args = ap.parse_args()
    names = [r for r in args.recipes.split(",") if r]
    unknown = [r for r in names if r not in RECIPES]
    if unknown:
        sys.exit(f"error: unknown recipe(s) {unknown}; known: {list(RECIPES)}")

    procs = {}
    for name in names:
        run_dir = (args.out / name).resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        overrides = {"ckpt_dir": str(run_dir / "models"), "output_dir": str(run_dir / "eval")}
        if args.max_epochs is not None:
            overrides["max_epochs"] = str(args.max_epochs)
        overrides.update(kv.split("=", 1) for kv in args.set)
        cmd = [
            sys.executable,
            "-m",
            "monai.bundle",
            "run",
            "run",  # one stage: train.yaml plus the recipe's overrides
            "--config_file",
            str(config_files(name)),
            "--bundle_root",
            BUNDLE,
            "--dataset_dir",
            str(Path(args.dataset_dir).resolve()),
        ]
        for key, value in overrides.items():
            cmd += [f"--{key}", value]
        record = {
            "recipe": name,
            "config_files": config_files(name),
            "overrides": overrides,
            "command": cmd,
            "host": platform.node(),
            "python": platform.python_version(),
        }
        (run_dir / "recipe.json").write_text(json.dumps(record, indent=1))
        log = open(run_dir / "train.log", "w")
        procs[name] = (subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT), record, run_dir, time.time())
        print(f"started {name}: pid {procs[name][0].pid}", flush=True)

    start = time.time()
    while any(p.poll() is None for p, *_ in procs.values()):
        if args.deadline_s is not None and time.time() - start > args.deadline_s:
            for name, (p, *_rest) in procs.items():
                if p.poll() is None:
                    print(f"deadline: stopping {name}", flush=True)
                    p.kill()
                    p.wait()
                    mark_killed(procs[name][2], procs[name][1]["overrides"])
            break
        time.sleep(2)
    summary = {}
    for name, (p, record, run_dir, t0) in procs.items():
        p.wait()
        lines = (
            (run_dir / "eval" / "metrics.jsonl").read_text().splitlines()
            if (run_dir / "eval" / "metrics.jsonl").is_file()
            else []
        )
        epochs = [json.loads(line) for line in lines]
        dice = [e.get("val_mean_dice", float("nan")) for e in epochs]
        dice = [d if d == d else -1.0 for d in dice]  # epochs without validation never count as best
        record.update(
            returncode=p.returncode,
            wall_s=round(time.time() - t0, 1),
            epochs_done=len(epochs),
            completed=p.returncode == 0,
        )
        (run_dir / "recipe.json").write_text(json.dumps(record, indent=1))
        summary[name] = {
            "epochs": len(epochs),
            "best_val_dice": max(dice) if dice else None,
            "best_epoch": 1 + dice.index(max(dice)) if dice else None,
            "returncode": p.returncode,
            "wall_s": record["wall_s"],
        }
        print(
            f"{name:22s} epochs {len(epochs):3d}  best val Dice {summary[name]['best_val_dice']}  "
            f"(epoch {summary[name]['best_epoch']})  rc {p.returncode}  {record['wall_s']} s",
            flush=True,
        )
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
