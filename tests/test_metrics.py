"""Tumour metrics on cases whose answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tumorseg.evaluation import metrics


def box(shape=(64, 64), y0=10, y1=30, x0=10, x1=30) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[y0:y1, x0:x1] = True
    return m


def test_perfect_prediction():
    r = metrics.image_metrics(box(), box())
    assert (r["dice"], r["iou"], r["precision"], r["recall"], r["hd95"]) == (1.0, 1.0, 1.0, 1.0, 0.0)


def test_both_empty_is_perfect_and_one_empty_is_worst():
    empty = np.zeros((64, 64), bool)
    both = metrics.image_metrics(empty, empty)
    assert both["dice"] == 1.0 and both["hd95"] == 0.0
    missed = metrics.image_metrics(empty, box())
    assert missed["dice"] == 0.0 and missed["recall"] == 0.0 and missed["precision"] == 0.0
    assert missed["hd95"] == pytest.approx(math.hypot(64, 64))
    false_alarm = metrics.image_metrics(box(), empty)
    assert false_alarm["dice"] == 0.0 and false_alarm["precision"] == 0.0 and false_alarm["iou"] == 0.0


def test_half_overlap():
    label = box(x0=10, x1=30)
    pred = box(x0=20, x1=40)  # same size, shifted by half its width
    r = metrics.image_metrics(pred, label)
    assert r["dice"] == pytest.approx(0.5)
    assert r["iou"] == pytest.approx(1 / 3)
    assert r["precision"] == pytest.approx(0.5) and r["recall"] == pytest.approx(0.5)
    assert r["hd95"] == pytest.approx(10.0)


def test_pooled_and_poster_figures():
    rows = [metrics.image_metrics(box(), box()), metrics.image_metrics(box(x0=20, x1=40), box())]
    s = metrics.summarize(rows)
    assert s["per_image"]["dice"]["mean"] == pytest.approx(0.75)
    tp, fp, fn = 400 + 200, 200, 200
    assert s["global"]["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    tn = 2 * 64 * 64 - tp - fp - fn
    poster = s["poster"]
    assert poster["global_accuracy"] == pytest.approx((tp + tn) / (2 * 64 * 64))
    iou_t, iou_b = tp / (tp + fp + fn), tn / (tn + fp + fn)
    assert poster["mean_iou"] == pytest.approx((iou_t + iou_b) / 2)
    assert poster["mean_iou"] > s["global"]["iou"] + 0.1  # why background-averaged IoU flatters


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.confusion(np.zeros((4, 4)), np.zeros((4, 5)))


def test_presence_counts_slices_not_pixels():
    empty = np.zeros((64, 64), bool)
    rows = [
        metrics.image_metrics(box(), box()),
        metrics.image_metrics(empty, box()),  # found, missed
        metrics.image_metrics(empty, empty),
        metrics.image_metrics(box(x0=50, x1=52), empty),
    ]  # clean, false alarm
    assert metrics.presence(rows) == {"sensitivity": 0.5, "specificity": 0.5, "tumour_slices": 2, "healthy_slices": 2}
    only_tumour = metrics.presence(rows[:2])
    assert only_tumour["sensitivity"] == 0.5 and math.isnan(only_tumour["specificity"])
