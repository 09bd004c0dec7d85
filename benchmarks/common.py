"""Helpers the benchmark scripts share: timing that is fair on CUDA, and one table row type."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "brain_tumor_mri_seg"


def sync(device: torch.device) -> None:
    """CUDA runs asynchronously: wait for queued kernels before reading the clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn, device: torch.device, warmup: int = 2, min_calls: int = 3, min_seconds: float = 0.0) -> float:
    """Mean wall time of ``fn()`` after ``warmup`` untimed calls, over at least ``min_calls``
    calls and ``min_seconds`` seconds (short calls are repeated until the clock's resolution and
    launch jitter no longer matter)."""
    for _ in range(warmup):
        fn()
    sync(device)
    calls, start = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - start < min_seconds:
        fn()
        calls += 1
    sync(device)
    return (time.perf_counter() - start) / calls


def first_line(error: BaseException) -> str:
    """A one-line reason for a table note."""
    text = str(error).strip().splitlines()
    return f"{error.__class__.__name__}: {text[0] if text else ''}"[:160]


@dataclass
class Row:
    """One line of the result table. ``ratio`` is this row's value over a reference named in ``note``."""

    section: str
    what: str
    value: float | None  # None: not measured (the note says why)
    unit: str
    ratio: float | None = None
    note: str = ""


def markdown_table(rows: list[Row]) -> str:
    cells = [["section", "measurement", "value", "unit", "ratio", "note"]]
    for r in rows:
        value = "n/a" if r.value is None else f"{r.value:.4g}" if abs(r.value) < 1e5 else f"{r.value:.3e}"
        ratio = "" if r.ratio is None else f"{r.ratio:.3g}"
        cells.append([r.section, r.what, value, r.unit, ratio, r.note.replace("|", "/")])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
