"""Crop-and-refine cascade: train the bundle's second stage and measure it on `valid`.

    python -m experiments.cascade --dataset_dir runs/kaggle-full --out runs/refiner [--epochs 40]
    python -m experiments.cascade --dataset_dir runs/kaggle-full --out runs/screen --refiner <weights>

Issue "Model quality II"; nnU-Net's cascade idea. Stage 1 is the bundle's model as shipped
(``tumorseg.inference.predictor.Predictor``: flip TTA, box fit, presence gate, the refinement off): it says
whether a slice holds a tumour and where. Stage 2 (``refiner_def`` of ``common.yaml``) sees only a
square window around stage 1's box (``tumorseg.postprocessing.refine``), cut from the slice at the network's
``image_size`` and resized to ``--crop_size``: the tumour fills a fixed share of its input whatever
its size. It is trained by the bundle itself (``configs/train_refiner.yaml`` through
``python -m monai.bundle run training``: windows around the true boxes, jittered in place and size
as stage 1's boxes are, flips and quarter turns, the poster's loss with the Dice per image); its
probability map, through the same box fit, gives the final box (``tumorseg.postprocessing.refine.BoxRefined``, as
in the bundle). ``--refiner`` screens weights trained before instead.

Written to ``--out``: ``models/`` and ``eval/`` (the bundle training's checkpoints, metrics and
panels), ``stage2.pt`` (the weights screened; a later run evaluates them again), ``stage1.json``
(stage 1's box per `valid` slice, reused by later runs) and ``summary.json``: per-image Dice on
`valid` of stage 1 alone, of the cascade, and of stage 2 on windows centred on the true boxes (a
bound, not a result: such a window gives the box's centre and size away), with the shares of
slices each leaves under 0.1 (misses: no box, or a box on something else) and under 0.5.
``--split training`` measures the same on the training slices (``stage1_training.json``,
``summary_training.json``; stage 1 and the refiner learned from them: a measure of fit).
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

from tumorseg.io.files import write_atomic  # noqa: E402
from tumorseg.postprocessing.refine import BoxRefined, bbox, resized  # noqa: E402  (the bundle's code, one definition)


def load_split(dataset_dir: Path, key: str, source_size: int):
    """The split's slices scaled to [0, 1] and resized to ``source_size``, with their labels."""
    from monai.data import load_decathlon_datalist

    from tumorseg.io.reading import read_slice

    items = load_decathlon_datalist(str(dataset_dir / "datalist.json"), data_list_key=key, base_dir=str(dataset_dir))
    out = []
    for item in items:
        image = read_slice(Path(item["image"])).astype(np.float32)
        lo, hi = float(image.min()), float(image.max())
        image = (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)  # ScaleIntensity, per slice
        label = read_slice(Path(item["label"])) > 0
        # the slice at the network's resolution, as evaluate sees it (square slices)
        image = resized(image, source_size)[0].numpy()
        label = resized(label.astype(np.float32), source_size, nearest=True)[0].numpy() > 0.5
        out.append({"name": Path(item["image"]).name, "image": image, "label": label})
    return out


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = float(a.sum() + b.sum())
    return 1.0 if total == 0 else 2.0 * float((a & b).sum()) / total


def stage1_boxes(dataset_dir: Path, valid, path: Path) -> dict:
    """Stage 1's box per slice of ``valid`` (the shipped predictor), cached in ``path``."""
    if path.is_file():
        return json.loads(path.read_text())
    from tumorseg.inference.predictor import Predictor

    predictor = Predictor.from_bundle(BUNDLE, overrides={"refine": False})
    boxes = {}
    for k, case in enumerate(valid):
        mask, _ = predictor.predict_volume(case["image"])
        boxes[case["name"]] = bbox(mask)
        print(f"\rstage 1: {k + 1}/{len(valid)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    write_atomic(path, json.dumps(boxes).encode())
    return boxes


def network_config(key: str = "refiner_def"):
    """A definition of the bundle's inference config (``refiner_def``: the refiner, instantiated)."""
    from tumorseg.bundle import parser

    return parser("inference", BUNDLE).get_parsed_content(key, instantiate=True)


def network():
    """The refiner as the bundle defines it (``refiner_def`` of ``common.yaml``)."""
    return network_config("refiner_def")


def train_in_bundle(args) -> Path:
    """Stage 2 trained by ``python -m monai.bundle run training`` with ``configs/train_refiner.yaml``
    into ``--out`` (resumed where a stopped run left its last checkpoint); its best weights."""
    import subprocess

    from tumorseg.bundle import config_files

    configs = config_files("train_refiner", BUNDLE)
    settings = {"max_epochs": args.epochs, "refine_size": args.crop_size, "refine_context": args.context,
                "refine_jitter": args.jitter, "refine_scale_jitter": args.scale_jitter, "batch_size": args.batch_size,
                "learning_rate": args.learning_rate, "seed": args.seed, "cpu_bf16": "auto" if args.bf16 else "false",
                "num_workers": args.num_workers}  # fmt: skip
    out = args.out.resolve()
    command = [sys.executable, "-m", "monai.bundle", "run", "run", "--bundle_root", str(BUNDLE),
               "--config_file", str(configs), "--dataset_dir", str(args.dataset_dir.resolve()),
               "--ckpt_dir", str(out / "models"), "--output_dir", str(out / "eval")]  # fmt: skip
    for key, value in settings.items():
        command += [f"--{key}", str(value)]
    if any((args.out / "models" / "last").glob("*.pt")):
        command += ["--resume", "true"]
    if args.tracking_dir:
        tracking_dir = str(Path(args.tracking_dir).resolve())
        command += ["--tracking", str(REPO / "configs" / "mlflow.json"), "--tracking_dir", tracking_dir]
    subprocess.run(command, check=True)
    return args.out / "models" / "model.pt"


def history_of(out: Path) -> list[float]:
    """Mean training loss per epoch of the bundle training in ``out`` (its metrics.jsonl)."""
    path = out / "eval" / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["train_loss"] for line in path.read_text().splitlines() if line.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset_dir", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--refiner", type=Path, default=None, help="screen these weights (default: train them)")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--crop_size", type=int, default=128)
    ap.add_argument("--context", type=float, default=2.0, help="window side / the box's longer side")
    ap.add_argument("--jitter", type=float, default=0.1, help="largest shift of the window, in box sizes")
    ap.add_argument("--scale_jitter", type=float, default=0.15, help="window side times exp(U(-s, s))")
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--learning_rate", type=float, default=3e-3)
    ap.add_argument("--level", type=float, default=0.5, help="stage 2's box fit threshold (stage 1 decided presence)")
    ap.add_argument("--rounds", type=int, default=1, help="stage 2 again on the window around its own box")
    ap.add_argument("--summary", default="summary.json", help="file name of the summary in --out")
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num_workers", type=int, default=1, help="the bundle training's loader workers")
    ap.add_argument("--tracking_dir", default=str(REPO / "mlflow"), help="MLflow store folder ('' for none)")
    ap.add_argument("--experiment", default="brain_tumor_mri_seg")
    ap.add_argument("--name", default="cascade", help="MLflow run name")
    ap.add_argument("--split", default="validation", help="the datalist key of the slices measured")
    ap.add_argument("--limit", type=int, default=None, help="the first N slices measured (a quick check)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    image_size = int(network_config("image_size"))
    valid = load_split(args.dataset_dir, args.split, image_size)[: args.limit]  # as evaluate sees them
    suffix = "" if args.split == "validation" else f"_{args.split}"
    if args.summary == "summary.json":
        args.summary = f"summary{suffix}.json"
    boxes = stage1_boxes(args.dataset_dir, valid, args.out / f"stage1{suffix}.json")
    weights = args.out / "stage2.pt"
    if not weights.is_file():  # trained before: evaluate it again (other --context, --rounds)
        source = args.refiner or train_in_bundle(args)
        write_atomic(weights, Path(source).read_bytes())  # last: a run stopped before this trains again
    history = history_of(args.out)
    net = network()
    refiner = BoxRefined("pred", "image", net, weights, context=args.context, size=args.crop_size, threshold=args.level)
    rows = []
    for case in valid:
        box = boxes[case["name"]]
        first = np.zeros(case["image"].shape, dtype=bool)
        if box is not None:
            first[box[0] : box[2], box[1] : box[3]] = True
        cascade = first
        for _ in range(args.rounds):
            cascade = refiner.refine(case["image"], cascade)
        oracle = refiner.refine(case["image"], case["label"])
        rows.append({"image": case["name"], "stage1": dice(first, case["label"]), "cascade": dice(cascade, case["label"]),
                     "stage2_on_true_window": dice(oracle, case["label"])})  # fmt: skip
    summary = {key: float(np.mean([r[key] for r in rows])) for key in ("stage1", "cascade", "stage2_on_true_window")}
    for key in ("stage1", "cascade"):
        for level in (0.1, 0.5):
            summary[f"{key}_under_{level}"] = float(np.mean([r[key] < level for r in rows]))
    summary.update(slices=len(rows), settings={k: str(v) for k, v in vars(args).items()})
    write_atomic(args.out / args.summary, json.dumps({**summary, "rows": rows}, indent=1).encode())
    print(json.dumps({k: v for k, v in summary.items() if k != "settings"}, indent=1))
    if args.tracking_dir:
        log_run(args, summary, history, weights)


def log_run(args, summary: dict, history: list[float], weights: Path) -> None:
    """One MLflow run, nested under the training run of stage 1's weights (the shipped model)."""
    from mlflow.entities import Metric, Param

    from experiments.components import run_of_weights
    from tumorseg.io.files import file_digest

    client, run = run_of_weights(args.tracking_dir, args.experiment, BUNDLE / "models" / "model.pt", "cascade", args.name)
    now = int(time.time() * 1000)
    split = "valid" if args.split == "validation" else args.split
    metrics = [Metric(f"{split}_dice_{k}", summary[k], now, 0) for k in ("stage1", "cascade", "stage2_on_true_window")]
    metrics += [Metric(f"{split}_{k}", v, now, 0) for k, v in summary.items() if "_under_" in k]
    metrics += [Metric("train_loss", loss, now, epoch) for epoch, loss in enumerate(history, start=1)]
    params = {**summary["settings"], "stage2_sha256": file_digest(weights, None), f"{split}_slices": summary["slices"]}
    record = args.out / "models" / "last" / "mlflow_run_name"
    if args.refiner is None and record.is_file():  # the bundle training run that made stage 2
        params["refiner_training_run"] = record.read_text().strip()
    params.pop("tracking_dir")
    client.log_batch(run.info.run_id, metrics=metrics, params=[Param(k, str(v)) for k, v in params.items()])
    client.log_artifact(run.info.run_id, str(args.out / args.summary))
    client.set_terminated(run.info.run_id)
    print(f"MLflow run {args.name}: {run.info.run_id}")


if __name__ == "__main__":
    main()
