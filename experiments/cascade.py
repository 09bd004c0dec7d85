"""Crop-and-refine cascade: train the bundle's second stage and measure it on `valid`.

    python experiments/cascade.py --dataset_dir runs/kaggle-full --out runs/cascade --source_size 256 [--epochs 30]

The shipped ``models/refiner.pt`` is ``stage2.pt`` of that command (docs/README.md, "Cascade").

Issue "Model quality II"; nnU-Net's cascade idea. Stage 1 is the bundle's model as shipped
(``tumorseg.predictor.Predictor``: flip TTA, box fit, presence gate, the refinement off): it says
whether a slice holds a tumour and where. Stage 2 (``refiner_def`` of ``common.yaml``) sees only a
square window around stage 1's box (``tumorseg.refine``), cut from the slice as stored or resized to
``--source_size`` (the shipped refiner: 256, the grid the bundle's post-processing works on) and
resized to ``--crop_size``: the tumour fills a fixed share of its input whatever its size. It is
trained with the poster's loss (Dice per image) on windows around the true boxes, jittered in place
and size as stage 1's boxes are, with flips and quarter turns; its probability map, through the
same box fit, gives the final box (``tumorseg.refine.BoxRefined``, as in the bundle).

Written to ``--out``: ``stage2.pt`` (weights; a later run evaluates them again), ``history.json``
(training loss per epoch), ``stage1.json`` (stage 1's box per `valid` slice,
reused by later runs) and ``summary.json``: per-image Dice on `valid` of stage 1 alone, of the
cascade, and of stage 2 on windows centred on the true boxes (a bound, not a result: such a window
gives the box's centre and size away).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "brain_tumor_mri_seg"
sys.path.insert(0, str(BUNDLE / "scripts"))

from tumorseg.files import write_atomic  # noqa: E402
from tumorseg.refine import BoxRefined, bbox, cut, resized, window  # noqa: E402  (the bundle's code, one definition)


def load_split(dataset_dir: Path, key: str, source_size: int | None = None):
    from monai.data import load_decathlon_datalist

    from tumorseg.reading import read_slice

    items = load_decathlon_datalist(str(dataset_dir / "datalist.json"), data_list_key=key, base_dir=str(dataset_dir))
    out = []
    for item in items:
        image = read_slice(Path(item["image"])).astype(np.float32)
        lo, hi = float(image.min()), float(image.max())
        image = (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)  # ScaleIntensity, per slice
        label = read_slice(Path(item["label"])) > 0
        if source_size:  # the slice at the network's resolution, as evaluate sees it (square slices)
            image = resized(image, source_size)[0].numpy()
            label = resized(label.astype(np.float32), source_size, nearest=True)[0].numpy() > 0.5
        out.append({"name": Path(item["image"]).name, "image": image, "label": label})
    return out


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = float(a.sum() + b.sum())
    return 1.0 if total == 0 else 2.0 * float((a & b).sum()) / total


def stage1_boxes(dataset_dir: Path, valid, path: Path) -> dict:
    """Stage 1's box per `valid` slice (the shipped predictor), cached in ``path``."""
    if path.is_file():
        return json.loads(path.read_text())
    from tumorseg.predictor import Predictor

    predictor = Predictor.from_bundle(BUNDLE, overrides={"refine": False})
    boxes = {}
    for k, case in enumerate(valid):
        mask, _ = predictor.predict_volume(case["image"])
        boxes[case["name"]] = bbox(mask)
        print(f"\rstage 1: {k + 1}/{len(valid)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    write_atomic(path, json.dumps(boxes).encode())
    return boxes


def network():
    """The refiner as the bundle defines it (``refiner_def`` of ``common.yaml``)."""
    from tumorseg.bundle import parser

    return parser("inference", BUNDLE).get_parsed_content("refiner_def", instantiate=True)


def train(train_set, args, rng):
    """Stage 2 on jittered windows around the true boxes, flips and quarter turns."""
    import torch

    from tumorseg.losses import PosterDiceFocalLoss

    torch.manual_seed(args.seed)
    net = network()
    opt = torch.optim.Adam(net.parameters(), lr=args.learning_rate)
    steps = math.ceil(len(train_set) / args.batch_size) * args.epochs
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.learning_rate, total_steps=steps)
    loss_fn = PosterDiceFocalLoss(batch=False)
    boxes = [bbox(case["label"]) for case in train_set]
    history = []  # mean training loss per epoch
    for epoch in range(args.epochs):
        net.train()
        order, losses, start = rng.permutation(len(train_set)), [], time.time()
        for b in range(0, len(order), args.batch_size):
            images, labels = [], []
            for i in order[b : b + args.batch_size]:
                case = train_set[i]
                scale = math.exp(rng.uniform(-args.scale_jitter, args.scale_jitter))  # the box drawn too small or too large
                win = window(boxes[i], args.context * scale, rng.uniform(-args.jitter, args.jitter, 2))
                image = resized(cut(case["image"], win), args.crop_size)
                label = resized(cut(case["label"], win), args.crop_size, nearest=True)
                turns, flip = int(rng.integers(4)), bool(rng.integers(2))
                image, label = torch.rot90(image, turns, (1, 2)), torch.rot90(label, turns, (1, 2))
                if flip:
                    image, label = image.flip(2), label.flip(2)
                images.append(image * rng.uniform(0.9, 1.1) + rng.uniform(-0.1, 0.1))
                labels.append(label)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                logits = net(torch.stack(images))
            loss = loss_fn(logits.float(), torch.stack(labels))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        history.append(float(np.mean(losses)))
        print(f"epoch {epoch + 1}/{args.epochs}: loss {history[-1]:.4f} ({time.time() - start:.0f} s)", flush=True)
    return net.eval(), history


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset_dir", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--crop_size", type=int, default=128)
    ap.add_argument("--context", type=float, default=2.0, help="window side / the box's longer side")
    ap.add_argument("--jitter", type=float, default=0.15, help="largest shift of the window, in box sizes")
    ap.add_argument("--scale_jitter", type=float, default=0.22, help="window side times exp(U(-s, s))")
    ap.add_argument(
        "--source_size", type=int, default=None, help="cut the windows from slices resized to this (default: as stored)"
    )
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--learning_rate", type=float, default=3e-3)
    ap.add_argument("--level", type=float, default=0.3, help="stage 2's box fit threshold (stage 1 decided presence)")
    ap.add_argument("--rounds", type=int, default=1, help="stage 2 again on the window around its own box")
    ap.add_argument("--summary", default="summary.json", help="file name of the summary in --out")
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tracking_dir", default=str(REPO / "mlflow"), help="MLflow store folder ('' for none)")
    ap.add_argument("--experiment", default="brain_tumor_mri_seg")
    ap.add_argument("--name", default="cascade", help="MLflow run name")
    ap.add_argument("--limit", type=int, default=None, help="first N slices of each split (a quick check)")
    args = ap.parse_args()
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    train_set = load_split(args.dataset_dir, "training", args.source_size)[: args.limit]
    train_set = [case for case in train_set if case["label"].any()]
    valid = load_split(args.dataset_dir, "validation", args.source_size)[: args.limit]
    boxes = stage1_boxes(args.dataset_dir, valid, args.out / "stage1.json")
    weights, history = args.out / "stage2.pt", []
    if weights.is_file():  # trained before: evaluate it again (other --context, --rounds)
        net = network()
        net.load_state_dict(torch.load(weights, weights_only=True))
        net.eval()
        if (args.out / "history.json").is_file():
            history = json.loads((args.out / "history.json").read_text())
    else:
        net, history = train(train_set, args, rng)
        buffer = io.BytesIO()
        torch.save(net.state_dict(), buffer)
        write_atomic(args.out / "history.json", json.dumps(history).encode())
        write_atomic(weights, buffer.getvalue())  # last: a run stopped before this trains again
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
    summary.update(slices=len(rows), settings={k: str(v) for k, v in vars(args).items()})
    write_atomic(args.out / args.summary, json.dumps({**summary, "rows": rows}, indent=1).encode())
    print(json.dumps({k: v for k, v in summary.items() if k != "settings"}, indent=1))
    if args.tracking_dir:
        log_run(args, summary, history, weights)


def log_run(args, summary: dict, history: list[float], weights: Path) -> None:
    """One MLflow run, nested under the training run of stage 1's weights (the shipped model)."""
    from mlflow.entities import Metric, Param

    from tumorseg.tracking import file_digest, run_of_weights

    client, run = run_of_weights(args.tracking_dir, args.experiment, BUNDLE / "models" / "model.pt", "cascade", args.name)
    now = int(time.time() * 1000)
    metrics = [Metric(f"valid_dice_{k}", summary[k], now, 0) for k in ("stage1", "cascade", "stage2_on_true_window")]
    metrics += [Metric("train_loss", loss, now, epoch) for epoch, loss in enumerate(history, start=1)]
    params = {**summary["settings"], "stage2_sha256": file_digest(weights, None), "valid_slices": summary["slices"]}
    params.pop("tracking_dir")
    client.log_batch(run.info.run_id, metrics=metrics, params=[Param(k, str(v)) for k, v in params.items()])
    client.log_artifact(run.info.run_id, str(args.out / args.summary))
    client.set_terminated(run.info.run_id)
    print(f"MLflow run {args.name}: {run.info.run_id}")


if __name__ == "__main__":
    main()
