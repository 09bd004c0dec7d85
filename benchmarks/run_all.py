"""Every speed figure of the bundle in one markdown table: training (bundle trainer against a
plain loop, and the loader alone), FLOP/s against the machine's ceiling for the same
convolutions, inference (sliding window against a plain forward, a volume's latency),
TorchScript and ONNX exports, and tuning rows.

    python -m benchmarks.run_all [--dataset_dir <converted folder>] [--quick]

Without --dataset_dir the embedded sample is converted into a temporary folder. --quick shrinks
everything (64 px, few iterations, a 24-slice volume, no torch.compile) to check that it runs. The device is the
bundle's (CUDA when available, with its AMP). On CPUs shared with other work, OpenMP threads
spin while waiting and every multi-threaded row can be many times slower;
`OMP_WAIT_POLICY=PASSIVE` avoids that (the header shows the load and the policy).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from benchmarks.common import BUNDLE, Row, first_line, markdown_table
from benchmarks.exports import export_rows
from benchmarks.flops import flops_rows
from benchmarks.inference import inference_rows
from benchmarks.training import autocast_dtype_of, dataset_or_sample, fixed_batch, train_parser, training_rows
from benchmarks.tuning import tuning_rows

FULL = dict(
    image_size=256,
    epochs=3,
    warmup_epochs=1,
    step_warmup=2,
    step_iterations=5,
    min_seconds=0.2,
    repeat=20,
    matmul_cpu=2048,
    matmul_cuda=8192,
    volume_slices=189,
    compile_skip=None,
)
QUICK = dict(
    image_size=64,
    epochs=2,
    warmup_epochs=1,
    step_warmup=1,
    step_iterations=3,
    min_seconds=0.02,
    repeat=5,
    matmul_cpu=512,
    matmul_cuda=4096,
    volume_slices=24,
    compile_skip="--quick (compiling takes minutes)",
)


SECTIONS = ("training", "FLOP/s", "inference", "export", "tuning")
WANTED = set(SECTIONS)  # --sections narrows it


def section(name: str, rows: list[Row], fn) -> None:
    """Run one section; a failure becomes a row (with the traceback on stderr) so the rest still runs."""
    if name not in WANTED:
        return
    print(f"[run_all] {name} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    before = len(rows)
    try:
        rows.extend(fn())
    except Exception as e:
        traceback.print_exc()
        rows.append(Row(name, "section failed", None, "", None, first_line(e)))
    print(markdown_table(rows[before:]), file=sys.stderr, flush=True)  # partial results survive a time limit
    print(f"[run_all] {name} done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)


def print_header(device, autocast, size: int, batch_size: int, data: str, weights: Path, quick: bool) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    # the load tells whether other work shared the CPU while this ran
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    print(
        f"device: {device} ({name}){load}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"
    )
    print(
        f"image size {size}x{size}, batch {batch_size}, {data}, bundle precision "
        f"{'AMP fp16' if autocast else 'fp32'}, weights {weights}{' (--quick)' if quick else ''}\n",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset_dir", type=Path)
    ap.add_argument("--quick", action="store_true", help="tiny settings: checks that everything runs")
    ap.add_argument("--image_size", type=int, help="default 256 (64 with --quick)")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--epochs", type=int, help="timed epochs after one warm-up epoch; default 3 (2 with --quick)")
    ap.add_argument("--num_workers", type=int, default=0)
    ap.add_argument("--skip_compile", action="store_true", help="no torch.compile row (compiling takes minutes)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    args = ap.parse_args()
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; known: {', '.join(SECTIONS)}")
    WANTED.intersection_update(args.sections.split(","))
    cfg = dict(QUICK if args.quick else FULL)
    cfg.update({k: v for k, v in (("image_size", args.image_size), ("epochs", args.epochs)) if v is not None})
    if args.skip_compile:
        cfg["compile_skip"] = "--skip_compile"
    size, batch_size = cfg["image_size"], args.batch_size
    overrides = {"image_size": size, "batch_size": batch_size, "num_workers": args.num_workers}
    started = time.perf_counter()
    rows: list[Row] = []

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dataset_dir = dataset_or_sample(args.dataset_dir, tmp)
        parser = train_parser(dataset_dir, 1, tmp / "probe", overrides)
        device, autocast = parser.get_parsed_content("device"), autocast_dtype_of(parser)
        n_images = len(parser.get_parsed_content("train#dataset"))
        torch.manual_seed(0)
        template = parser.get_parsed_content("network_def")  # on the CPU; every section copies it
        loss_fn, learning_rate = parser.get_parsed_content("loss"), float(parser.get_parsed_content("learning_rate"))
        weights = BUNDLE / "models" / "model.pt"
        if not weights.exists():  # speed does not depend on the weights' values
            weights = tmp / "initial_weights.pt"
            torch.save(template.state_dict(), weights)
        data = f"{n_images} training images ({args.dataset_dir or 'converted sample'})"
        print_header(device, autocast, size, batch_size, data, weights, args.quick)
        batches = {}

        def get_batch(b):
            if b not in batches:
                batches[b] = fixed_batch(parser, b, device)
            return batches[b]

        section("training", rows, lambda: training_rows(dataset_dir, tmp, cfg["epochs"], cfg["warmup_epochs"], overrides))
        section(
            "FLOP/s",
            rows,
            lambda: flops_rows(
                template,
                loss_fn,
                learning_rate,
                *get_batch(batch_size),
                device,
                autocast,
                iterations=cfg["step_iterations"],
                min_seconds=cfg["min_seconds"],
                matmul_size=cfg["matmul_cuda" if device.type == "cuda" else "matmul_cpu"],
            ),
        )
        section(
            "inference",
            rows,
            lambda: inference_rows(
                weights, size, cfg["repeat"], cfg["min_seconds"], volume_shape=(197, 233, cfg["volume_slices"])
            ),
        )
        section(
            "export",
            rows,
            lambda: export_rows(copy.deepcopy(template), weights, size, device, tmp, cfg["repeat"], cfg["min_seconds"]),
        )
        section(
            "tuning",
            rows,
            lambda: tuning_rows(
                template,
                loss_fn,
                learning_rate,
                get_batch,
                device,
                autocast,
                batch_size,
                warmup=cfg["step_warmup"],
                iterations=cfg["step_iterations"],
                compile_skip_reason=cfg["compile_skip"],
            ),
        )

    print(markdown_table(rows))
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
