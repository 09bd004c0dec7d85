"""Post-processing of a stacked volume mask (x, y, slices): the 3D steps after the per-slice ones
of :mod:`tumorseg.postprocessing.transforms` (presence gate, box fit) and
:mod:`tumorseg.postprocessing.refine` (the second stage)."""

from __future__ import annotations

import numpy as np


def drop_short_tumours(mask, min_run: int):
    """``mask`` (x, y, slices) without the flagged regions that look like no 3D object.

    A tumour shows on neighbouring slices at the same place. A connected region of the stacked
    slice masks (``scipy.ndimage.label``, face connectivity: in-plane overlap from one slice to
    the next) is kept if it spans at least ``min_run`` slices, or if its slices lie in a run of
    more than ``min_run`` consecutive flagged slices (a tumour whose box shifts from slice to
    slice, or a stack of unrelated tumour slices); anything else (a lone flagged slice, boxes
    that jump around on a few slices) is cleared. Stacks of fewer than three slices have no 3D
    context and are left as they are."""
    import numpy as np
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    if min_run <= 1 or mask.shape[-1] < 3 or not mask.any():
        return mask
    flagged = mask.reshape(-1, mask.shape[-1]).any(0)
    in_long_run = np.zeros_like(flagged)
    start = None
    for k, f in enumerate([*flagged, False]):
        if f and start is None:
            start = k
        elif not f and start is not None:
            in_long_run[start:k] = k - start > min_run
            start = None
    labels, n = ndimage.label(mask)
    keep = np.zeros(n + 1, dtype=bool)
    for index, region in enumerate(ndimage.find_objects(labels), start=1):
        span = region[-1]
        keep[index] = span.stop - span.start >= min_run or in_long_run[span].all()
    return keep[labels]


def keep_largest(mask) -> np.ndarray:
    """``mask`` with only its largest connected tumour region (MONAI's
    ``KeepLargestConnectedComponent``; in 3D for a volume): ``tumorseg-predict --keep-largest``."""
    import torch
    from monai.transforms import KeepLargestConnectedComponent

    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask
    largest = KeepLargestConnectedComponent(applied_labels=[1])
    return largest(torch.as_tensor(mask[None].astype(np.uint8)))[0].numpy() > 0
