"""Training throughput: the bundle's SupervisedTrainer (with its handlers) against a plain PyTorch
loop over the same network, loss, optimiser and data loader, and the loader alone.

    python -m benchmarks.training [--dataset_dir <converted folder>] [--epochs 3]

Without --dataset_dir the embedded sample is converted into a temporary folder. The trainer runs
with validation off (val_interval beyond the last epoch) so both sides do the same work. Each side
first runs untimed warm-up epochs (one by default), then the timed ones. The functions here are
also used by run_all.py.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import BUNDLE, REPO, Row, sync


def dataset_or_sample(dataset_dir: Path | None, tmp: Path) -> Path:
    """The converted dataset to use: the one given, else the embedded sample converted into tmp."""
    if dataset_dir is not None:
        return dataset_dir
    from data_tools.coco_to_monai import convert

    convert(REPO / "data" / "brain-tumor-coco-sample", tmp / "sample", progress=False, log=lambda s: None)
    return tmp / "sample"


def train_parser(dataset_dir: Path, max_epochs: int, out: Path, overrides: dict):
    """train.yaml with validation off and every file it writes kept under ``out``."""
    from tumorseg.bundle import parser as bundle_parser

    parser = bundle_parser("train", BUNDLE)
    parser.update(
        {
            "dataset_dir": str(dataset_dir),
            "max_epochs": max_epochs,
            "val_interval": max_epochs + 1,
            "ckpt_dir": str(out / "models"),
            "output_dir": str(out / "eval"),
            **overrides,
        }
    )
    return parser


def autocast_dtype_of(parser) -> torch.dtype | None:
    """What the bundle's trainer autocasts to: fp16 when ``amp`` (its default on CUDA), else nothing."""
    return torch.float16 if bool(parser.get_parsed_content("amp")) else None


def train_step(network, loss_fn, optimizer, device: torch.device, autocast_dtype: torch.dtype | None):
    """One optimisation step as SupervisedTrainer does it: zero grads, forward and loss under
    autocast, backward (loss-scaled for fp16), optimiser step."""
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)

    def step(image, label):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = loss_fn(network(image), label)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return step


def loader_images_per_s(loader, device: torch.device, epochs: int, warmup_epochs: int) -> float:
    for _ in range(warmup_epochs):  # the cache is built at construction; this warms workers and allocators
        for _ in loader:
            pass
    start = time.perf_counter()
    seen = sum(batch["image"].shape[0] for _ in range(epochs) for batch in loader)
    return seen / (time.perf_counter() - start)


def plain_loop_images_per_s(parser, epochs: int, warmup_epochs: int) -> float:
    """The same network, loss, Adam and loader as the trainer, in a bare loop."""
    torch.manual_seed(0)
    loader = parser.get_parsed_content("train#dataloader")
    network, loss_fn = parser.get_parsed_content("network"), parser.get_parsed_content("loss")
    optimizer = parser.get_parsed_content("optimizer")
    device = parser.get_parsed_content("device")
    step = train_step(network, loss_fn, optimizer, device, autocast_dtype_of(parser))
    network.train()

    def epoch() -> int:
        seen = 0
        for batch in loader:
            step(batch["image"].to(device), batch["label"].to(device))
            seen += batch["image"].shape[0]
        return seen

    for _ in range(warmup_epochs):
        epoch()
    sync(device)
    start = time.perf_counter()
    seen = sum(epoch() for _ in range(epochs))
    sync(device)
    return seen / (time.perf_counter() - start)


def trainer_images_per_s(parser, epochs: int, warmup_epochs: int) -> float:
    """The bundle's trainer with its handlers attached as in `run`; ``parser`` must have
    max_epochs = warmup_epochs + epochs. The clock starts when the warm-up epochs (and their
    epoch-end handlers) are done, so the timed epochs carry the same per-epoch work as in use."""
    from ignite.engine import Events

    torch.manual_seed(0)
    device = parser.get_parsed_content("device")
    trainer = parser.get_parsed_content("train#trainer")
    parser.get_parsed_content("train#last_checkpoint").attach(trainer)
    marks = {}

    def mark(name):
        def handler(_engine):
            sync(device)
            marks[name] = time.perf_counter()

        return handler

    if warmup_epochs:
        trainer.add_event_handler(Events.EPOCH_COMPLETED(once=warmup_epochs), mark("start"))
    else:
        trainer.add_event_handler(Events.STARTED, mark("start"))
    trainer.add_event_handler(Events.COMPLETED, mark("end"))
    trainer.run()
    n_images = len(parser.get_parsed_content("train#dataset"))
    return epochs * n_images / (marks["end"] - marks["start"])


def training_rows(dataset_dir: Path, tmp: Path, epochs: int, warmup_epochs: int, overrides: dict) -> list[Row]:
    """Loader alone, plain loop and bundle trainer, each with its own parser (own network and
    loader) so that no side inherits the other's warm state."""
    parser = train_parser(dataset_dir, epochs, tmp / "plain", overrides)
    device = parser.get_parsed_content("device")
    loader_rate = loader_images_per_s(parser.get_parsed_content("train#dataloader"), device, epochs, warmup_epochs)
    plain_rate = plain_loop_images_per_s(parser, epochs, warmup_epochs)
    parser = train_parser(dataset_dir, warmup_epochs + epochs, tmp / "trainer", overrides)
    trainer_rate = trainer_images_per_s(parser, epochs, warmup_epochs)
    timed = f"{warmup_epochs} warm-up + {epochs} timed epochs"
    return [
        Row("training", "plain PyTorch loop (same net, loss, Adam, loader)", plain_rate, "images/s", 1.0, timed),
        Row(
            "training",
            "bundle SupervisedTrainer + handlers",
            trainer_rate,
            "images/s",
            trainer_rate / plain_rate,
            "÷ plain loop: framework overhead",
        ),
        Row("data", "training loader alone", loader_rate, "images/s", loader_rate / plain_rate, "÷ plain loop: loader headroom"),
    ]


# ---- a fixed batch: the model's speed without the loader (tuning rows, FLOP/s) ---------------


def fixed_batch(parser, batch_size: int, device: torch.device):
    """``batch_size`` augmented training images and labels on ``device``, repeating the dataset
    when it is smaller than the batch."""
    batches = list(parser.get_parsed_content("train#dataloader"))
    plain = lambda t: t.as_tensor() if hasattr(t, "as_tensor") else t  # noqa: E731  (MetaTensor -> Tensor)
    images = torch.cat([plain(b["image"]) for b in batches])
    labels = torch.cat([plain(b["label"]) for b in batches])
    index = torch.arange(batch_size) % images.shape[0]
    return images[index].to(device), labels[index].to(device)


def fixed_batch_images_per_s(
    template_network,
    loss_fn,
    learning_rate: float,
    image,
    label,
    device: torch.device,
    *,
    autocast_dtype=None,
    channels_last=False,
    compile=False,
    warmup=2,
    iterations=5,
) -> float:
    """Training images/s on one batch held on the device, for a copy of ``template_network``
    (so every variant starts from the same weights); compilation happens in the warm-up."""
    network = copy.deepcopy(template_network).to(device).train()
    if channels_last:
        network = network.to(memory_format=torch.channels_last)
        image, label = image.contiguous(memory_format=torch.channels_last), label.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(network.parameters(), lr=learning_rate)
    model = torch.compile(network) if compile else network
    step = train_step(model, loss_fn, optimizer, device, autocast_dtype)
    for _ in range(warmup):
        step(image, label)
    sync(device)
    start = time.perf_counter()
    for _ in range(iterations):
        step(image, label)
    sync(device)
    return iterations * image.shape[0] / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset_dir", type=Path)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--warmup_epochs", type=int, default=1)
    ap.add_argument("--image_size", type=int, default=256)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--num_workers", type=int, default=0)
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="ID=VALUE",
        help="config override, VALUE read as JSON where it parses (e.g. train#trainer#decollate=true)",
    )
    args = ap.parse_args()
    overrides = {"image_size": args.image_size, "batch_size": args.batch_size, "num_workers": args.num_workers}
    for kv in args.set:
        key, value = kv.split("=", 1)
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dataset_dir = dataset_or_sample(args.dataset_dir, tmp)
        rows = training_rows(dataset_dir, tmp, args.epochs, args.warmup_epochs, overrides)
        parser = train_parser(dataset_dir, 1, tmp, overrides)
        device, amp = parser.get_parsed_content("device"), bool(parser.get_parsed_content("amp"))
        n_images = len(parser.get_parsed_content("train#dataset"))
    print(
        f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
        f"amp {amp}, torch threads {torch.get_num_threads()}, {n_images} images of "
        f"{args.image_size}x{args.image_size}, batch {args.batch_size}, {args.warmup_epochs} warm-up + {args.epochs} timed epochs"
    )
    print(f"{'what':52s} {'images/s':>9s} {'ratio':>6s}  note")
    if args.set:
        print("overrides:", ", ".join(args.set))
    for r in rows:
        print(f"{r.what:52s} {r.value:9.1f} {r.ratio:6.2f}  {r.note}")


if __name__ == "__main__":
    main()
