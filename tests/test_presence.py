"""The presence rules on cases whose answer is known: the per-slice gate and the 3D rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tumorseg.postprocessing.transforms import PresenceGate, PresenceGated
from tumorseg.postprocessing.volume import drop_short_tumours


def test_gate_clears_slices_without_foreground_or_confidence():
    gate = PresenceGate(min_peak=0.6, min_foreground=0.02)
    prob = np.zeros((1, 32, 32), np.float32)
    prob[0, 10:20, 10:20] = 0.9
    head = np.zeros((1, 32, 32), np.float32)
    head[0, 4:28, 4:28] = 1.0
    assert gate(prob, head).max() == pytest.approx(0.9)  # a head and a confident peak: kept
    assert gate(prob * 0.5, head).max() == 0  # peak 0.45 < 0.6
    assert gate(prob, np.zeros_like(head)).max() == 0  # black: no foreground
    assert gate(prob, np.full_like(head, 7.0)).max() == 0  # constant: no structure
    speck = np.zeros_like(head)
    speck[0, 0, 0] = 1.0  # one bright pixel is 0.1 % of the slice
    assert gate(prob, speck).max() == 0
    assert gate(prob).max() == pytest.approx(0.9)  # without an image only the peak counts


def test_gate_checks_its_arguments():
    for kwargs in ({"min_peak": 0.0}, {"min_peak": 1.5}, {"min_foreground": 1.0}, {"foreground_level": -0.1}):
        with pytest.raises(ValueError):
            PresenceGate(**kwargs)


def test_dictionary_gate_keeps_type_and_reads_the_image_key():
    prob = torch.full((1, 8, 8), 0.3)
    out = PresenceGated(keys="pred", image_key="image", min_peak=0.5)({"pred": prob, "image": torch.rand(1, 16, 16)})
    assert isinstance(out["pred"], torch.Tensor) and out["pred"].max() == 0


def test_tumours_shorter_than_min_run_slices_are_dropped():
    mask = np.zeros((16, 16, 10), bool)
    mask[2:6, 2:6, 1:4] = True  # a tumour on three slices
    mask[10:12, 10:12, 6] = True  # a lone flagged slice
    mask[2:4, 12:14, 8] = True  # two boxes on neighbouring slices that do not overlap in-plane
    mask[12:14, 2:4, 9] = True
    kept = drop_short_tumours(mask, 2)
    assert kept[2:6, 2:6, 1:4].all() and kept.sum() == 4 * 4 * 3
    assert np.array_equal(drop_short_tumours(mask, 1), mask)
    assert not drop_short_tumours(mask, 4).any()


def test_a_long_run_of_flagged_slices_is_kept_even_where_boxes_shift():
    """Unrelated tumour slices stacked into a volume (or a box that moves from slice to slice):
    every slice flagged, no overlap; kept, so a stack and its slices give the same masks."""
    mask = np.zeros((20, 20, 5), bool)
    for k in range(5):
        mask[4 * k : 4 * k + 3, 4 * k : 4 * k + 3, k] = True
    assert np.array_equal(drop_short_tumours(mask, 2), mask)
    two = np.zeros((20, 20, 6), bool)  # two flagged neighbours that do not overlap: cleared
    two[0:3, 0:3, 2] = two[10:13, 10:13, 3] = True
    assert not drop_short_tumours(two, 2).any()
    single = mask[..., :1]  # one slice: no 3D context
    assert np.array_equal(drop_short_tumours(single, 2), single)
