"""Turn the runs of experiments/recipes.py into MLflow runs: the recipe's hyper-parameters,
val Dice / IoU / train loss / lr per epoch (step = epoch, timestamps from the run's clock),
and tags saying where and at which commit the run trained.

    python -m experiments.import_runs experiments/results/h100-2026-11-26 \
        [--tracking_dir mlflow] [--checkpoint default=bundles/brain_tumor_mri_seg/models/model.pt]

Used for runs made on machines without MLflow (the recipe runs on the device GPU). A run whose
checkpoint is given gets its SHA-256 as ``checkpoint_sha256``, so evaluate runs of that model
nest under it in the UI (tumorseg.tracking.tracker), and the checkpoint as its MLflow model, registered
as ``brain_tumor_mri_seg`` (as a tracked training run does). Re-importing the same folder adds nothing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def hyper_parameters(recipe: str, overrides: dict) -> dict:
    """The recipe's run parameters that need no data: ``model_config`` and ``training_params`` of
    its configs (the bundle's own lists of what defines a run)."""
    from monai.bundle import ConfigParser

    from experiments.recipes import config_files

    parser = ConfigParser()
    parser.read_config([str(REPO / f) for f in config_files(recipe)])
    parser.update({k: v for k, v in overrides.items() if k not in ("ckpt_dir", "output_dir")})
    params = {}
    for group in ("model_config", "training_params"):
        for key in parser[group]:
            try:
                value = parser.get_parsed_content(f"{group}#{key}")
            except Exception:  # needs the dataset (datalist digest, image counts): not at hand here
                continue
            params[key] = str(value)
    return params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, help="folder with one <recipe>/{recipe.json,metrics.jsonl} per run")
    ap.add_argument("--tracking_dir", type=Path, default=Path("mlflow"))
    ap.add_argument("--experiment", default="brain_tumor_mri_seg")
    ap.add_argument("--checkpoint", action="append", default=[], metavar="RECIPE=PATH")
    args = ap.parse_args()

    from mlflow.entities import Metric, Param

    from tumorseg.io.files import file_digest
    from tumorseg.tracking.tracker import open_store

    checkpoints = dict(kv.split("=", 1) for kv in args.checkpoint)
    client, experiment_id = open_store(args.tracking_dir, args.experiment)

    for run_dir in sorted(p.parent for p in args.results.glob("*/recipe.json")):
        record = json.loads((run_dir / "recipe.json").read_text())
        if record.get("overrides", {}).get("tracking"):
            print(f"{run_dir.name}: tracked in MLflow while it trained, nothing to import")
            continue
        name = f"train_{record['recipe']}_{args.results.name}"
        if client.search_runs([experiment_id], f"attributes.run_name = '{name}'"):
            print(f"{name}: already imported")
            continue
        epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        start_ms = int((run_dir / "metrics.jsonl").stat().st_mtime * 1000 - 1000 * epochs[-1]["time_s"])
        tags = {
            "workflow": "train",
            "bundle": "brain_tumor_mri_seg",
            "recipe": record["recipe"],
            "imported_from": str(run_dir.relative_to(REPO) if run_dir.is_absolute() else run_dir),
            "trained_at_commit": record.get("trained_at_commit", ""),
            "device": record.get("device", ""),
            "data": record.get("data", ""),
            "completed": str(record.get("completed", "")),
        }
        if record["recipe"] in checkpoints:
            tags["checkpoint_sha256"] = file_digest(checkpoints[record["recipe"]], None)
        run = client.create_run(experiment_id, start_time=start_ms, tags=tags, run_name=name)
        params = {
            **hyper_parameters(record["recipe"], record["overrides"]),
            "epochs_done": str(len(epochs)),
            "config_files": str(record["config_files"]),
        }
        metrics = [
            Metric(key, float(value), start_ms + int(1000 * e["time_s"]), e["epoch"])
            for e in epochs
            for key, value in e.items()
            if key not in ("epoch", "iteration", "time_s")
        ]
        for i in range(0, len(metrics), 1000):
            client.log_batch(
                run.info.run_id,
                metrics=metrics[i : i + 1000],
                params=[Param(k, v) for k, v in params.items()] if i == 0 else [],
                tags=[],
            )
        for f in ("recipe.json", "metrics.jsonl"):
            client.log_artifact(run.info.run_id, str(run_dir / f), "record")
        if record["recipe"] in checkpoints:  # the shipped weights: an MLflow model, registered like a tracked run's
            from monai.bundle import ConfigParser

            from experiments.recipes import config_files
            from tumorseg.tracking.tracker import log_bundle_model

            parser = ConfigParser()
            parser.read_config([str(REPO / f) for f in config_files(record["recipe"])])
            parser.update({"bundle_root": str(REPO / "bundles" / "brain_tumor_mri_seg")})
            log_bundle_model(client, run.info.run_id, checkpoints[record["recipe"]], "brain_tumor_mri_seg",
                             parser.get_parsed_content("model_config"))  # fmt: skip
        client.set_terminated(
            run.info.run_id,
            "FINISHED" if record.get("completed") else "KILLED",
            end_time=start_ms + int(1000 * epochs[-1]["time_s"]),
        )
        best = max(e.get("val_mean_dice", 0) for e in epochs)
        print(f"{name}: {len(epochs)} epochs, best val Dice {best:.4f}, run {run.info.run_id}")


if __name__ == "__main__":
    main()
