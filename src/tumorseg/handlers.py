"""Ignite handlers the bundle attaches to MONAI's evaluator.

Both write files under an output folder and register them in ``engine.state.tracked_files``,
which :class:`tumorseg.tracking.MLflowTracker` uploads to the run at the end of the epoch.
Without tracking the files are simply kept on disk.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events

from tumorseg import metrics
from tumorseg.files import write_atomic
from tumorseg.visualize import panel

__all__ = ["ValidationPanels", "SegmentationReport", "register_file"]


def register_file(engine: Engine, path: str | Path, artifact_path: str | None = None) -> None:
    """Mark a file for upload to the tracking run of this engine (see ``MLflowTracker``),
    into the run's ``artifact_path`` folder (its root when None)."""
    files = getattr(engine.state, "tracked_files", None)
    if files is None:
        files = engine.state.tracked_files = []
    files.append((str(path), artifact_path))


def _is_rank0() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_rank() == 0


def _items(engine: Engine) -> list[dict]:
    """The decollated per-image dicts of the last iteration (MONAI's engine output)."""
    out = engine.state.output
    return out if isinstance(out, list) else [out]


def _as_mask(x) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return arr[0] > 0.5 if arr.ndim == 3 else arr > 0.5  # (1, H, W) channel-first


def _name(item: dict, index: int) -> str:
    meta = getattr(item.get("image"), "meta", {}) or {}
    src = meta.get("filename_or_obj")
    return os.path.basename(str(src)) if src else f"case_{index:05d}"


class ValidationPanels:
    """After each validation epoch, draw a few cases (image, ground truth in green, prediction in
    red, the case's Dice in the caption) into ``<output_dir>/panels/epoch_<N>.png``.

    The cases are the first ``num_images`` of the validation loader, so the same images are
    shown at every epoch and progress can be followed.

    Args:
        output_dir: folder for the panels.
        num_images: how many cases per panel.
        image_key, label_key, pred_key: keys of the evaluator's output dicts.
    """

    def __init__(self, output_dir: str, num_images: int = 6, image_key="image", label_key="label", pred_key="pred"):
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}.")
        self.output_dir = Path(output_dir)
        self.num_images = num_images
        self.keys = (image_key, label_key, pred_key)
        self._cases: list = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self._cases = []

    def _collect(self, engine: Engine) -> None:
        image_key, label_key, pred_key = self.keys
        for item in _items(engine):
            if len(self._cases) >= self.num_images:
                return
            image = item[image_key].detach().cpu().numpy()[0]
            label, pred = _as_mask(item[label_key]), _as_mask(item[pred_key])
            dice = metrics.from_counts(**{k: v for k, v in metrics.confusion(pred, label).items() if k != "tn"})["dice"]
            self._cases.append((image, label, pred, f"{_name(item, len(self._cases))[:18]}  Dice {dice:.2f}"))

    def _write(self, engine: Engine) -> None:
        if not self._cases or not _is_rank0():
            return
        buf = io.BytesIO()
        panel(self._cases).save(buf, format="PNG")
        path = self.output_dir / "panels" / f"epoch_{engine.state.epoch:03d}.png"
        write_atomic(path, buf.getvalue())
        register_file(engine, path, "panels")


class SegmentationReport:
    """Per-image tumour metrics of an evaluation run, written as ``per_image.csv`` and a
    ``summary.json`` (mean, median and pooled Dice, IoU, precision, recall, HD95 in pixels, and
    the poster's two-class metric set), and put into ``engine.state.metrics`` so trackers log them.

    See :mod:`tumorseg.metrics` for how empty masks count.

    Args:
        output_dir: folder for the two files.
        prefix: prefix of the names put into ``engine.state.metrics``.
        label_key, pred_key: keys of the evaluator's output dicts (binary masks, channel first).
    """

    def __init__(self, output_dir: str, prefix: str = "eval_", label_key: str = "label", pred_key: str = "pred"):
        self.output_dir = Path(output_dir)
        self.prefix = prefix
        self.label_key, self.pred_key = label_key, pred_key
        self.rows: list[dict] = []
        self.summary: dict | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _collect(self, engine: Engine) -> None:
        for item in _items(engine):
            row = {"image": _name(item, len(self.rows))}
            row.update(metrics.image_metrics(_as_mask(item[self.pred_key]), _as_mask(item[self.label_key])))
            self.rows.append(row)

    def _write(self, engine: Engine) -> None:
        if not self.rows:
            return
        self.summary = metrics.summarize(self.rows)
        for key, stats in self.summary["per_image"].items():
            engine.state.metrics[f"{self.prefix}{key}"] = stats["mean"]
        for group in ("global", "poster"):
            for key, value in self.summary[group].items():
                engine.state.metrics[f"{self.prefix}{group}_{key}"] = value
        if not _is_rank0():
            return
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(self.rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        csv_path, json_path = self.output_dir / "per_image.csv", self.output_dir / "summary.json"
        write_atomic(csv_path, text.getvalue().encode())
        write_atomic(json_path, (json.dumps(self.summary, indent=1) + "\n").encode())
        register_file(engine, csv_path, "evaluation")
        register_file(engine, json_path, "evaluation")
