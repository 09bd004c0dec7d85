"""Training throughput: the bundle's SupervisedTrainer (with its handlers) against a plain PyTorch
loop over the same network, loss, optimiser and data loader, and the loader alone.

    python benchmarks/training.py [--dataset_dir <converted folder>] [--epochs 3]

Without --dataset_dir the embedded sample is converted into a temporary folder. The trainer runs
with validation off (val_interval beyond the last epoch) so both sides do the same work.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def parts(dataset_dir: Path, epochs: int, out: Path, overrides: dict):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / "brain_tumor_mri_seg" / "configs" / "train.yaml"))
    parser.update({"dataset_dir": str(dataset_dir), "max_epochs": epochs, "val_interval": epochs + 1,
                   "ckpt_dir": str(out / "models"), "output_dir": str(out / "eval"), **overrides})
    return parser


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset_dir", type=Path)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--image_size", type=int, default=256)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--num_workers", type=int, default=0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dataset_dir = args.dataset_dir
        if dataset_dir is None:
            from data_tools.coco_to_monai import convert

            dataset_dir = tmp / "sample"
            convert(REPO / "data" / "brain-tumor-coco-sample", dataset_dir, progress=False, log=lambda s: None)
        overrides = {"image_size": args.image_size, "batch_size": args.batch_size, "num_workers": args.num_workers}

        parser = parts(dataset_dir, args.epochs, tmp / "a", overrides)
        loader = parser.get_parsed_content("train#dataloader")
        n_images = len(loader.dataset)
        for _ in loader:  # warm-up: fills nothing (cache is built at construction), warms the workers
            break
        start = time.perf_counter()
        seen = sum(batch["image"].shape[0] for _ in range(args.epochs) for batch in loader)
        loader_rate = seen / (time.perf_counter() - start)

        # plain loop
        torch.manual_seed(0)
        network, loss_fn = parser.get_parsed_content("network"), parser.get_parsed_content("loss")
        optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)
        device = parser.get_parsed_content("device")
        amp = bool(parser.get_parsed_content("amp"))  # as the trainer: mixed precision on CUDA
        scaler = torch.amp.GradScaler(device.type, enabled=amp)
        network.train()
        start = time.perf_counter()
        seen = 0
        for _ in range(args.epochs):
            for batch in loader:
                image, label = batch["image"].to(device), batch["label"].to(device)
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast(device.type, enabled=amp):
                    loss = loss_fn(network(image), label)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                seen += image.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
        plain_rate = seen / (time.perf_counter() - start)

        # the bundle's trainer, its handlers attached as in `run`
        parser = parts(dataset_dir, args.epochs, tmp / "b", overrides)
        torch.manual_seed(0)
        trainer = parser.get_parsed_content("train#trainer")
        parser.get_parsed_content("train#last_checkpoint").attach(trainer)
        start = time.perf_counter()
        trainer.run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        trainer_rate = args.epochs * n_images / (time.perf_counter() - start)

    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), amp {amp}, torch threads {torch.get_num_threads()}, {n_images} images of "
          f"{args.image_size}x{args.image_size}, batch {args.batch_size}, {args.epochs} epochs")
    print(f"{'what':40s} {'images/s':>9s}")
    print(f"{'data loader alone':40s} {loader_rate:9.1f}")
    print(f"{'plain PyTorch loop':40s} {plain_rate:9.1f}")
    print(f"{'bundle SupervisedTrainer + handlers':40s} {trainer_rate:9.1f}")
    print(f"framework overhead ratio (trainer / plain): {trainer_rate / plain_rate:.3f}")
    print(f"loader headroom (loader / plain): {loader_rate / plain_rate:.1f}x")


if __name__ == "__main__":
    main()
