"""Tuning rows: training images/s of a plain loop on one batch held on the device, for the
settings that commonly speed up convolution training; used by run_all.py.

Each row changes one thing from the baseline (the bundle's own setting: fp32 on CPU, fp16 AMP on
CUDA) so its ratio is that change's effect alone.
"""

from __future__ import annotations

import time

import torch

from benchmarks.common import Row, first_line
from benchmarks.training import fixed_batch_images_per_s


def variants(device: torch.device, batch_size: int, compile_skip_reason: str | None) -> list[tuple[str, dict]]:
    """(name, changes from the baseline). ``compile_skip_reason``: why torch.compile is not
    tried in this run (it is slow to compile on a few CPU cores), or None to try it."""
    rows = [
        ("channels_last", {"channels_last": True}),
        ("torch.compile (default mode)", {"compile": compile_skip_reason or True}),
    ]
    if device.type == "cuda":
        rows = [("fp32 (AMP off)", {"autocast_dtype": None}), *rows, ("bf16 autocast", {"autocast_dtype": torch.bfloat16})]
    else:
        rows.append(("bf16 autocast", {"autocast_dtype": torch.bfloat16}))
        if torch.get_num_threads() > 1:
            rows.append(("torch threads 1", {"threads": 1}))
    rows += [(f"batch {b}", {"batch_size": b}) for b in (8, 16, 32) if b != batch_size]
    return rows


def measure(
    template_network, loss_fn, learning_rate, get_batch, device, settings: dict, warmup: int, iterations: int
) -> tuple[float, float]:
    """(images/s, seconds spent in the warm-up, where torch.compile compiles)."""
    threads = torch.get_num_threads()
    if settings.get("threads"):
        torch.set_num_threads(settings["threads"])
    try:
        image, label = get_batch(settings["batch_size"])
        start = time.perf_counter()
        rate = fixed_batch_images_per_s(
            template_network,
            loss_fn,
            learning_rate,
            image,
            label,
            device,
            autocast_dtype=settings["autocast_dtype"],
            channels_last=settings.get("channels_last", False),
            compile=settings.get("compile", False),
            warmup=warmup,
            iterations=iterations,
        )
        warmup_seconds = time.perf_counter() - start - iterations * image.shape[0] / rate
        return rate, warmup_seconds
    finally:
        torch.set_num_threads(threads)


def tuning_rows(
    template_network,
    loss_fn,
    learning_rate,
    get_batch,
    device,
    bundle_autocast,
    batch_size: int,
    *,
    warmup: int,
    iterations: int,
    compile_skip_reason: str | None,
) -> list[Row]:
    base = {"autocast_dtype": bundle_autocast, "batch_size": batch_size}
    precision = "AMP fp16" if bundle_autocast == torch.float16 else "fp32"
    base_rate, _ = measure(template_network, loss_fn, learning_rate, get_batch, device, base, warmup, iterations)
    rows = [
        Row(
            "tuning",
            f"baseline: {precision}, {torch.get_num_threads()} threads, batch {batch_size}",
            base_rate,
            "images/s",
            1.0,
            f"fixed batch on {device.type}, {warmup} warm-up + {iterations} timed steps",
        )
    ]
    for name, changes in variants(device, batch_size, compile_skip_reason):
        if isinstance(changes.get("compile"), str):
            rows.append(Row("tuning", name, None, "images/s", None, f"skipped: {changes['compile']}"))
            continue
        try:
            rate, warmup_seconds = measure(
                template_network, loss_fn, learning_rate, get_batch, device, {**base, **changes}, warmup, iterations
            )
        except Exception as e:  # e.g. torch.compile without a working compiler: say why, go on
            rows.append(Row("tuning", name, None, "images/s", None, f"failed: {first_line(e)}"))
            continue
        note = "÷ baseline" + (f"; warm-up incl. compiling {warmup_seconds:.0f} s" if changes.get("compile") else "")
        rows.append(Row("tuning", name, rate, "images/s", rate / base_rate, note))
    return rows
