"""``tumorseg-runs``: list the tracked runs of the MLflow store, with their key figures."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

EXPERIMENT = "brain_tumor_mri_seg"
KEY_METRICS = ("val_mean_dice", "val_mean_iou", "eval_dice", "eval_iou", "eval_hd95", "train_loss")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tumorseg-runs", description=__doc__.split(":", 1)[1].strip())
    p.add_argument("--tracking-dir", type=Path, default=Path("mlflow"), help="folder of mlruns.db (default: mlflow)")
    p.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI"),
        help="an MLflow server instead, e.g. http://127.0.0.1:5000 (default: MLFLOW_TRACKING_URI)",
    )
    p.add_argument("--experiment", default=EXPERIMENT, help=f"experiment name (default: {EXPERIMENT})")
    p.add_argument("--last", type=int, default=10, help="how many of the newest runs to show")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    db = args.tracking_dir.resolve() / "mlruns.db"
    if not args.tracking_uri and not db.is_file():
        print(f"error: {db}: no MLflow store here (train with --tracking configs/mlflow.json first)", file=sys.stderr)
        return 1
    import mlflow

    uri = args.tracking_uri or f"sqlite:///{db}"
    client = mlflow.MlflowClient(uri)
    try:
        experiment = client.get_experiment_by_name(args.experiment)
    except Exception as e:  # a server that does not answer
        print(f"error: {uri}: {e.__class__.__name__}: {str(e).splitlines()[0][:200]}", file=sys.stderr)
        return 1
    if experiment is None:
        print(f"error: {uri}: no experiment named {args.experiment!r}", file=sys.stderr)
        return 1
    ui_base = uri.rstrip("/") if uri.startswith("http") else "http://127.0.0.1:5000"
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=args.last)
    print(f"MLflow store: {uri}  (experiment {args.experiment!r}, id {experiment.experiment_id})")
    for run in reversed(runs):
        figures = "  ".join(f"{k}={run.data.metrics[k]:.4f}" for k in KEY_METRICS if k in run.data.metrics)
        stage = " second stage (refiner)" if run.data.params.get("stage") == "refiner" else ""
        print(f"- {run.info.run_name} [{run.info.status.lower()}]{stage} run_id={run.info.run_id}")
        if "val_mean_dice" in run.data.metrics:
            history = client.get_metric_history(run.info.run_id, "val_mean_dice")
            best = max(history, key=lambda m: m.value)
            figures += f"  (best val_mean_dice={best.value:.4f} at epoch {best.step})"
        print(f"    {figures or 'no metrics yet'}")
        print(f"    artifacts: {run.info.artifact_uri}")
    if uri.startswith("http"):
        print(f"The server's UI: {ui_base}")
    else:
        ui = f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"
        print(f"Open the UI with `make mlflow-ui` (or `{ui}`), then {ui_base}")
    trained = [r for r in runs if r.data.tags.get("workflow") == "train"]
    trained = [r for r in trained if r.data.params.get("stage") == trained[0].data.params.get("stage")][:2]  # like with like
    if len(trained) == 2:
        ids = ",".join(f'"{r.info.run_id}"' for r in trained)
        print(
            f"  compare the last two training runs: {ui_base}/#/compare-runs?runs=[{ids}]"
            f'&experiments=["{experiment.experiment_id}"]'
        )
    if runs:
        print(f"  last run page: {ui_base}/#/experiments/{experiment.experiment_id}/runs/{runs[0].info.run_id}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "1")
    sys.exit(main())
