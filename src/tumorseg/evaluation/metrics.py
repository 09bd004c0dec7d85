"""Segmentation metrics for one binary tumour mask per image, and their summaries.

Conventions (applied by every function here, and by the bundle's validation metrics):

- Tumour-only: every figure is about the tumour class; the background class enters only the
  poster's metric set, which is reported separately for comparison.
- Empty masks: a ratio whose denominator is 0 happens only when the reference and the
  prediction agree on "no tumour" in the relevant pixels; Dice, IoU, precision and recall of
  an image with an empty reference and an empty prediction are 1. An empty reference with a
  non-empty prediction scores Dice = IoU = precision = 0 (the false positives count), and an
  image with tumour but an empty prediction scores Dice = IoU = recall = 0, precision 0.
- HD95 is in pixels of the evaluated grid (these JPEGs carry no spacing): 0 when both masks are
  empty, the grid's diagonal when exactly one is empty (the worst possible distance).
- Per-image figures are averaged over images ("mean"); pooled ("global") figures sum TP, FP
  and FN over all images first, weighting large tumours more.
- Presence, per slice: sensitivity is the share of slices with tumour that get any prediction,
  specificity the share of slices without tumour that get none (NaN where a list has no such
  slice: the ``presence`` list of ``data_tools.healthy`` holds both kinds).
"""

from __future__ import annotations

import math

import numpy as np

PER_IMAGE_KEYS = ("dice", "iou", "precision", "recall", "hd95")


def _ratio(num: float, den: float) -> float:
    return 1.0 if den == 0 else num / den


def confusion(pred: np.ndarray, label: np.ndarray) -> dict[str, int]:
    """Pixel counts TP, FP, FN, TN of two binary masks of the same shape."""
    pred, label = np.asarray(pred).astype(bool), np.asarray(label).astype(bool)
    if pred.shape != label.shape:
        raise ValueError(f"prediction and label shapes differ: {pred.shape} vs {label.shape}")
    tp = int(np.count_nonzero(pred & label))
    fp = int(np.count_nonzero(pred & ~label))
    fn = int(np.count_nonzero(~pred & label))
    return {"tp": tp, "fp": fp, "fn": fn, "tn": int(pred.size) - tp - fp - fn}


def hd95(pred: np.ndarray, label: np.ndarray) -> float:
    """95th-percentile symmetric Hausdorff distance in pixels (MONAI's implementation)."""
    import torch
    from monai.metrics import compute_hausdorff_distance

    pred, label = np.asarray(pred).astype(bool), np.asarray(label).astype(bool)
    if not pred.any() and not label.any():
        return 0.0
    if not pred.any() or not label.any():
        return float(math.hypot(*pred.shape))
    to_t = lambda a: torch.as_tensor(a[None, None])  # noqa: E731  (B, C, spatial...)
    return float(compute_hausdorff_distance(to_t(pred), to_t(label), percentile=95).item())


def from_counts(tp: int, fp: int, fn: int) -> dict[str, float]:
    """Dice, IoU, precision and recall from pixel counts, with the empty-mask rules above."""
    if tp + fp + fn == 0:
        return {"dice": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0}
    return {
        "dice": 2 * tp / (2 * tp + fp + fn),
        "iou": tp / (tp + fp + fn),
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
    }


def image_metrics(pred: np.ndarray, label: np.ndarray) -> dict[str, float]:
    """All per-image figures of one case: counts, Dice, IoU, precision, recall, HD95."""
    counts = confusion(pred, label)
    return {**counts, **from_counts(counts["tp"], counts["fp"], counts["fn"]), "hd95": hd95(pred, label)}


def poster_metrics(tp: int, fp: int, fn: int, tn: int) -> dict[str, float]:
    """The poster's two-class set from pooled counts (MATLAB ``evaluateSemanticSegmentation`` style).

    Background is a class here, which is why "mean IoU" comes out near 0.98 on images that are
    mostly background: use the tumour-only figures to judge a model.
    """
    n = tp + fp + fn + tn
    acc_t, acc_b = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    iou_t, iou_b = _ratio(tp, tp + fp + fn), _ratio(tn, tn + fn + fp)
    f_t, f_b = _ratio(2 * tp, 2 * tp + fp + fn), _ratio(2 * tn, 2 * tn + fn + fp)
    freq_t = (tp + fn) / n if n else 0.0
    return {
        "global_accuracy": _ratio(tp + tn, n),
        "mean_accuracy": (acc_t + acc_b) / 2,
        "mean_iou": (iou_t + iou_b) / 2,
        "weighted_iou": freq_t * iou_t + (1 - freq_t) * iou_b,
        "mean_fscore": (f_t + f_b) / 2,
    }


def presence(rows: list[dict]) -> dict[str, float]:
    """Slice-level sensitivity and specificity of per-image rows (counts ``tp``, ``fp``, ``fn``)."""
    tumour = [r["tp"] + r["fp"] > 0 for r in rows if r["tp"] + r["fn"] > 0]
    healthy = [r["fp"] == 0 for r in rows if r["tp"] + r["fn"] == 0]
    return {
        "sensitivity": float(np.mean(tumour)) if tumour else float("nan"),
        "specificity": float(np.mean(healthy)) if healthy else float("nan"),
        "tumour_slices": len(tumour),
        "healthy_slices": len(healthy),
    }


def summarize(rows: list[dict]) -> dict:
    """Summary of per-image rows (as made by :func:`image_metrics`): mean, median and pooled figures."""
    if not rows:
        raise ValueError("no images to summarise")
    totals = {k: sum(int(r[k]) for r in rows) for k in ("tp", "fp", "fn", "tn")}
    per_image = {}
    for key in PER_IMAGE_KEYS:
        values = np.array([r[key] for r in rows], dtype=float)
        per_image[key] = {"mean": float(values.mean()), "median": float(np.median(values)), "std": float(values.std())}
    return {
        "images": len(rows),
        "images_with_tumour": sum(1 for r in rows if r["tp"] + r["fn"] > 0),
        "per_image": per_image,
        "global": from_counts(totals["tp"], totals["fp"], totals["fn"]),
        "presence": presence(rows),
        "poster": poster_metrics(**totals),
        "pixel_counts": totals,
    }
