"""Ignite handlers the bundle attaches to MONAI's evaluator.

They write files under an output folder and register them in ``engine.state.tracked_files``,
which :class:`tumorseg.tracking.tracker.MLflowTracker` uploads to the run at the end of the epoch.
Without tracking the files are simply kept on disk.
"""

from __future__ import annotations

import csv
import heapq
import io
import json
import os
import time
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import DiskSaver
from monai.handlers import CheckpointSaver

from tumorseg.evaluation import metrics
from tumorseg.evaluation.report import html_report
from tumorseg.evaluation.visualize import panel
from tumorseg.io.files import write_atomic

__all__ = [
    "TrainingError",
    "StopOnNonFiniteLoss",
    "AtomicCheckpointSaver",
    "MetricsLog",
    "ValidationPanels",
    "SegmentationReport",
    "register_file",
]


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The engine's scalar metrics as floats (arrays, such as per-class figures, left out)."""
    return {k: float(v) for k, v in metrics.items() if np.isscalar(v)}  # type: ignore[arg-type]


def register_file(engine: Engine, path: str | Path, artifact_path: str | None = None) -> None:
    """Mark a file for upload to the tracking run of this engine (see ``MLflowTracker``),
    into the run's ``artifact_path`` folder (its root when None)."""
    files = getattr(engine.state, "tracked_files", None)
    if files is None:
        files = []
        engine.state.tracked_files = files  # type: ignore[attr-defined]  # ignite's State takes new attributes
    files.append((str(path), artifact_path))


class _AtomicSaver(DiskSaver):
    """Ignite's atomic disk saver (temporary file, then rename) with MONAI's fixed file names.

    With ``keep_only_newest`` every other ``*.pt`` in the folder is removed after a save: ignite
    counts ``n_saved`` only over the files of its own process, so a resumed run would otherwise
    keep the interrupted run's last checkpoint forever."""

    def __init__(self, dirname: str, filename: str | None = None, keep_only_newest: bool = False):
        super().__init__(dirname=dirname, require_empty=False, atomic=True)
        self.filename = filename
        self.keep_only_newest = keep_only_newest

    def __call__(self, checkpoint, filename: str, metadata=None) -> None:
        name = self.filename or filename
        super().__call__(checkpoint, name, metadata)
        if self.keep_only_newest and idist.get_rank() == self.save_on_rank:
            for stale in Path(self.dirname).glob("*.pt"):
                if stale.name != name:
                    stale.unlink(missing_ok=True)

    def remove(self, filename: str) -> None:
        if self.filename is None:  # a fixed name is replaced by the rename: never delete it first
            super().remove(filename)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` whose files are never left half-written: each is written to a
    temporary file in the same folder and renamed over the old one, so a run killed at any
    moment leaves the previous complete ``model.pt`` (MONAI's own saver writes in place).
    Takes the same arguments as ``monai.handlers.CheckpointSaver``."""

    def __init__(self, save_dir: str, **kwargs) -> None:
        super().__init__(save_dir, **kwargs)
        # the interval checkpoint alone in its folder (as train.yaml's ckpt_dir/last) keeps one file
        only_interval = not (kwargs.get("save_final") or kwargs.get("save_key_metric"))
        for checkpoint, filename, keep_only_newest in (
            (getattr(self, "_final_checkpoint", None), kwargs.get("final_filename"), False),
            (getattr(self, "_key_metric_checkpoint", None), kwargs.get("key_metric_filename"), False),
            (getattr(self, "_interval_checkpoint", None), None, only_interval and kwargs.get("n_saved") == 1),
        ):
            if checkpoint is not None:
                checkpoint.save_handler = _AtomicSaver(save_dir, filename, keep_only_newest)


def _batch_loss(engine: Engine) -> torch.Tensor | float:
    """The trainer's loss of its last batch, detached (a float where a tracker has made it one)."""
    out: Any = engine.state.output  # ignite types it as an int; SupervisedTrainer gives a dict or a list of them
    loss = out[0]["loss"] if isinstance(out, list) else out["loss"]
    return loss.detach() if isinstance(loss, torch.Tensor) else float(loss)


class TrainingError(Exception):
    """A training that cannot go on; the bundle tells it in one line (tumorseg.bundle)."""


class StopOnNonFiniteLoss:
    """Stops the training with :class:`TrainingError` at the end of an epoch in which the loss was
    not a finite number (NaN or inf) at any iteration, before that epoch's validation and checkpoints.

    Once the loss is NaN, so are the weights after the next step. ignite's ``TerminateOnNan``
    ends the run as if it were complete: the best-model saver keeps the NaN weights of the first
    validation (its Dice 0 is still a "best"), and a recipe publishes them and trains its next
    stage on them. Here the stage fails instead: its MLflow run ends FAILED, the last good epoch's
    checkpoint stays, and ``--resume true`` starts from it once the cause is mended. The check
    stays on the device (no GPU sync per iteration). Attach it before the ValidationHandler.
    """

    def __init__(self) -> None:
        self._bad: Any = 0
        self._steps = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch)

    def _iteration(self, engine: Engine) -> None:
        self._bad = self._bad + (~torch.isfinite(torch.as_tensor(_batch_loss(engine)))).sum()
        self._steps += 1

    def _epoch(self, engine: Engine) -> None:
        bad, steps = int(self._bad), self._steps
        self._bad, self._steps = 0, 0
        if bad:
            raise TrainingError(
                f"training loss not finite (NaN or inf) in {bad} of {steps} iterations of epoch {engine.state.epoch}: "
                "stopped before its validation and checkpoints (lower learning_rate, or look at the augmentation "
                "and the data; --resume true carries on from the last good epoch)"
            )


class MetricsLog:
    """One JSON line per training epoch in ``path``: epoch, iteration, wall seconds since the
    start, learning rate, mean training loss of the epoch and the validator's latest metrics.

    A plain record of the run that needs no tracking server (it is how runs on machines without
    MLflow are compared and imported, see ``experiments/``). Attach it after the
    ``ValidationHandler`` so the epoch's validation is already done. The file is rewritten
    atomically each epoch; a resumed run appends to it.

    Args:
        path: the JSON-lines file.
        validator: the evaluator whose ``state.metrics`` are logged (None: training only).
        optimizer: its first parameter group's ``lr`` is logged.
    """

    def __init__(self, path: str, validator: Engine | None = None, optimizer=None) -> None:
        self.path = Path(path)
        self.validator = validator
        self.optimizer = optimizer
        self._loss_sum: Any = None  # kept on the device: no GPU sync per iteration
        self._steps = 0
        self._start = 0.0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch)

    def _started(self, engine: Engine) -> None:
        self._start = time.perf_counter()

    def _iteration(self, engine: Engine) -> None:
        loss = _batch_loss(engine)
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
        self._steps += 1

    def _epoch(self, engine: Engine) -> None:
        record = {
            "epoch": engine.state.epoch,
            "iteration": engine.state.iteration,
            "time_s": round(time.perf_counter() - self._start, 3),
        }
        if self.optimizer is not None:
            record["lr"] = float(self.optimizer.param_groups[0]["lr"])
        if self._steps:
            record["train_loss"] = float(self._loss_sum) / self._steps
        self._loss_sum, self._steps = None, 0
        if self.validator is not None and self.validator.state.epoch == engine.state.epoch:
            metrics: dict[str, Any] = self.validator.state.metrics
            record.update(_scalars(metrics))
        if not _is_rank0():
            return
        old = self.path.read_bytes() if self.path.is_file() else b""
        write_atomic(self.path, old + (json.dumps(record) + "\n").encode())


def _is_rank0() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_rank() == 0


def _as_mask(x) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return arr[0] > 0.5 if arr.ndim == 3 else arr > 0.5  # (1, H, W) channel-first


def _name(item: dict, index: int) -> str:
    meta = getattr(item.get("image"), "meta", {}) or {}
    src = meta.get("filename_or_obj")
    return os.path.basename(str(src)) if src else f"case_{index:05d}"


class _CaseCollector:
    """Per-image metrics of every case of an epoch, and the pictures of the worst and best ones."""

    def __init__(self, output_dir: str, num_images: int = 6, image_key="image", label_key="label", pred_key="pred"):
        if num_images < 0:
            raise ValueError(f"num_images must be >= 0, got {num_images}.")
        self.output_dir = Path(output_dir)
        self.num_worst = (num_images + 1) // 2
        self.num_best = num_images // 2
        self.keys = (image_key, label_key, pred_key)
        self.rows: list[dict] = []
        self._worst: list = []  # max-heap on Dice via negation, keeps the lowest
        self._best: list = []  # min-heap, keeps the highest

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self.rows, self._worst, self._best = [], [], []

    def case_metrics(self, pred: np.ndarray, label: np.ndarray) -> dict:
        counts = metrics.confusion(pred, label)
        return {**counts, **metrics.from_counts(counts["tp"], counts["fp"], counts["fn"])}

    def _collect(self, engine: Engine) -> None:
        image_key, label_key, pred_key = self.keys
        out: Any = engine.state.output  # the evaluator's list of decollated items (or one)
        for item in out if isinstance(out, list) else [out]:
            pred, label = _as_mask(item[pred_key]), _as_mask(item[label_key])
            row = {"image": _name(item, len(self.rows)), **self.case_metrics(pred, label)}
            self.rows.append(row)
            # keep pictures only of cases that may end up in the panel
            case = lambda item=item, label=label, pred=pred, row=row: (  # noqa: E731  (built only when kept)
                item[image_key].detach().cpu().numpy()[0],
                label,
                pred,
                row,
            )
            key = (row["dice"], len(self.rows))
            for heap, size, sign in ((self._worst, self.num_worst, -1), (self._best, self.num_best, 1)):
                entry = (sign * key[0], sign * key[1])
                if len(heap) < size:
                    heapq.heappush(heap, (entry, case()))
                elif size and entry > heap[0][0]:
                    heapq.heapreplace(heap, (entry, case()))

    def panel_png(self) -> bytes | None:
        worst = [c for _, c in sorted(self._worst, reverse=True)]  # lowest Dice first
        best = [c for _, c in sorted(self._best, reverse=True)]  # highest Dice first
        chosen = worst + [c for c in best if all(c[3] is not w[3] for w in worst)]
        if not chosen:
            return None
        cases = [(img, lab, prd, f"{Path(row['image']).stem[:14]}  Dice {row['dice']:.2f}") for img, lab, prd, row in chosen]
        buf = io.BytesIO()
        panel(cases).save(buf, format="PNG")
        return buf.getvalue()

    def _write(self, engine: Engine) -> None:
        raise NotImplementedError


class ValidationPanels(_CaseCollector):
    """After each validation: ``panels/epoch_<N>.png`` with the worst and the best cases of the
    epoch (image, ground truth in green, prediction in red, the case's Dice in the caption), and
    ``report/validation.html`` (the epoch's metrics, the per-image Dice histogram, the worst
    cases). In multi-process runs they show rank 0's share of the validation set.

    Args:
        output_dir: folder for the panels and the report.
        num_images: cases per panel, half worst (rounded up) and half best.
        image_key, label_key, pred_key: keys of the evaluator's output dicts.
    """

    def _write(self, engine: Engine) -> None:
        if not self.rows or not _is_rank0():
            return
        png = self.panel_png()
        if png is not None:
            path = self.output_dir / "panels" / f"epoch_{engine.state.epoch:03d}.png"
            write_atomic(path, png)
            register_file(engine, path, "panels")
        metrics: dict[str, Any] = engine.state.metrics
        figures = _scalars(metrics)
        page = html_report(f"Validation after epoch {engine.state.epoch}", figures, self.rows, png)
        path = self.output_dir / "report" / "validation.html"
        write_atomic(path, page.encode())
        register_file(engine, path, "report")


class SegmentationReport(_CaseCollector):
    """Per-image tumour metrics of an evaluation, written as ``per_image.csv``, a
    ``summary.json`` (mean, median and pooled Dice, IoU, precision, recall, HD95 in pixels, and
    the poster's two-class metric set), a ``report.html`` and a ``cases.png`` of the worst and
    best cases, and put into ``engine.state.metrics`` so trackers log them.

    See :mod:`tumorseg.evaluation.metrics` for how empty masks count.

    Args:
        output_dir: folder for the files.
        prefix: prefix of the names put into ``engine.state.metrics``.
        num_images: cases in ``cases.png``, half worst and half best.
        image_key, label_key, pred_key: keys of the evaluator's output dicts (binary masks, channel first).
    """

    def __init__(
        self, output_dir: str, prefix: str = "eval_", num_images: int = 6, image_key="image", label_key="label", pred_key="pred"
    ):
        super().__init__(output_dir, num_images, image_key, label_key, pred_key)
        self.prefix = prefix
        self.summary: dict | None = None

    def case_metrics(self, pred: np.ndarray, label: np.ndarray) -> dict:
        return metrics.image_metrics(pred, label)

    def _write(self, engine: Engine) -> None:
        if not self.rows:
            return
        self.summary = metrics.summarize(self.rows)
        figures = {f"{self.prefix}{key}": stats["mean"] for key, stats in self.summary["per_image"].items()}
        for group in ("global", "poster"):
            figures.update({f"{self.prefix}{group}_{key}": value for key, value in self.summary[group].items()})
        figures.update(
            {
                f"{self.prefix}slice_{key}": float(value)
                for key, value in self.summary["presence"].items()
                if key in ("sensitivity", "specificity") and value == value
            }
        )  # NaN: no such slices
        engine.state.metrics.update(figures)
        if not _is_rank0():
            return
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(self.rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        png = self.panel_png()
        files = {
            "per_image.csv": text.getvalue().encode(),
            "summary.json": (json.dumps(self.summary, indent=1) + "\n").encode(),
            "report.html": html_report(f"Evaluation of {self.summary['images']} images", figures, self.rows, png).encode(),
        }
        if png is not None:
            files["cases.png"] = png
        for name, data in files.items():
            write_atomic(self.output_dir / name, data)
            register_file(engine, self.output_dir / name, "evaluation")
