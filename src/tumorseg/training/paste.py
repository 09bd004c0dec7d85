"""Tumours transplanted into the batch's tumour-free slices: the negatives stage's counterfactual.

The real tumour-free slices come from other collections than the Kaggle tumours, so a network
trained on both can learn "this collection's look means no tumour" instead of the tumour itself
(experiments/results/cpu-2026-12-06/real_slices.md: it then misses the tumours of those same
collections). :class:`PasteTumours` breaks that shortcut: some tumour-free slices of each batch
receive a tumour box cut from a tumour slice of the same batch, with its label, so every
collection's look comes with both answers and only the tumour itself tells them apart.

The donor's box (with a margin of context) is flipped and zoomed at random, its intensities are
moved to the host's brain statistics (the patch's standardised values ``(x - m_d) / s_d`` take the
host's ``m_h + s_h (x - m_d) / s_d``), and it is blended in with a feathered edge
``a = clip(1 - d / feather, 0, 1)`` (``d``: distance outside the box in the margin), where the
patch's centre lands on the host's brain. The label takes the zoomed box.

It runs as the trainer's ``prepare_batch`` (after the per-item augmentation, on the batch):
``train#trainer#prepare_batch`` in ``train_negatives.yaml``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms.utils import generate_spatial_bounding_box

__all__ = ["PasteTumours"]


class PasteTumours:
    """``prepare_batch`` of a :class:`monai.engines.SupervisedTrainer` that pastes tumours into
    the batch's tumour-free slices.

    Args:
        prob: probability that a tumour-free slice of the batch receives a tumour (0 switches it off).
        zoom: range of the donor box's random zoom.
        margin: context around the donor box, as a fraction of its size, blended in with a feathered edge.
        brain_level: a host pixel at or above this fraction of the host's 99th percentile is brain
            (the patch's centre is drawn among those pixels; images are scaled to [0, 1]).
        seed: seed of the pasting's own random draws.

    Shapes: the batch's ``image`` and ``label`` are ``(B, 1, H, W)``; the labels are binary.
    """

    def __init__(
        self,
        prob: float = 0.5,
        zoom: tuple[float, float] = (0.7, 1.3),
        margin: float = 0.25,
        brain_level: float = 0.15,
        seed: int = 0,
    ) -> None:
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob}")
        if len(zoom) != 2 or not 0 < zoom[0] <= zoom[1]:
            raise ValueError(f"zoom must be a range (low, high) with 0 < low <= high, got {zoom}")
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self.prob = float(prob)
        self.zoom = (float(zoom[0]), float(zoom[1]))
        self.margin = float(margin)
        self.brain_level = float(brain_level)
        self.rng = np.random.default_rng(seed)

    def __call__(self, batchdata, device=None, non_blocking: bool = False, **kwargs):
        from monai.engines.utils import default_prepare_batch

        image, label = default_prepare_batch(batchdata, device, non_blocking, **kwargs)
        if self.prob == 0 or label is None:
            return image, label
        has_tumour = label.flatten(1).amax(1) > 0
        donors = torch.nonzero(has_tumour).flatten().tolist()
        hosts = [i for i in torch.nonzero(~has_tumour).flatten().tolist() if self.rng.random() < self.prob]
        if not donors or not hosts:
            return image, label
        image, label = image.clone(), label.clone()  # the collated batch may share the cache's memory
        for host in hosts:
            donor = donors[int(self.rng.integers(len(donors)))]
            self.paste_into(image[host, 0], label[host, 0], image[donor, 0], label[donor, 0])
        return image, label

    def paste_into(self, host: torch.Tensor, host_label: torch.Tensor, donor: torch.Tensor, donor_label: torch.Tensor) -> None:
        """Paste ``donor``'s tumour box (``donor_label``: its binary label, not empty) into ``host``
        and its box into ``host_label``; all ``(H, W)``, the host's changed in place."""
        # brain pixels of both slices: too few in either (a blank slice), nothing is pasted
        donor_brain = donor[donor >= self.brain_level * torch.quantile(donor, 0.99)]
        on_brain = host >= self.brain_level * torch.quantile(host, 0.99)
        host_brain = host[on_brain]
        if donor_brain.numel() < 16 or host_brain.numel() < 16:
            return
        (y0, x0), (y1, x1) = generate_spatial_bounding_box(donor_label[None])
        my, mx = round(self.margin * (y1 - y0)), round(self.margin * (x1 - x0))
        cy0, cy1 = max(0, y0 - my), min(donor.shape[0], y1 + my)
        cx0, cx1 = max(0, x0 - mx), min(donor.shape[1], x1 + mx)
        patch = donor[cy0:cy1, cx0:cx1]
        box = torch.zeros_like(patch)
        box[y0 - cy0 : y1 - cy0, x0 - cx0 : x1 - cx0] = 1
        # feathered edge: 1 in the box, falling to 0 across the margin with the (chessboard)
        # distance d outside the box: a = clip(1 - d / feather, 0, 1)
        feather = max(1, max(my, mx))
        rows = torch.arange(cy0, cy1, dtype=patch.dtype)[:, None]
        cols = torch.arange(cx0, cx1, dtype=patch.dtype)[None, :]
        distance = torch.maximum((y0 - rows).clamp_min(0) + (rows - (y1 - 1)).clamp_min(0),
                                 (x0 - cols).clamp_min(0) + (cols - (x1 - 1)).clamp_min(0))  # fmt: skip
        alpha = (1 - distance / feather).clamp(0, 1)
        # the intensities of the donor's patch moved to the host's brain statistics
        patch = (patch - donor_brain.mean()) / donor_brain.std().clamp_min(1e-3)
        patch = patch * host_brain.std() + host_brain.mean()
        # random flips and zoom of the patch
        if self.rng.random() < 0.5:
            patch, box, alpha = patch.flip(0), box.flip(0), alpha.flip(0)
        if self.rng.random() < 0.5:
            patch, box, alpha = patch.flip(1), box.flip(1), alpha.flip(1)
        zoom = float(self.rng.uniform(*self.zoom))
        size = [max(2, min(int(round(n * zoom)), m)) for n, m in zip(patch.shape, host.shape)]
        stack = F.interpolate(torch.stack([patch, alpha, box])[None].float(), size=size, mode="bilinear", align_corners=False)[0]
        patch, alpha, box = stack[0].to(host.dtype), stack[1].clamp(0, 1).to(host.dtype), (stack[2] > 0.5).to(host_label.dtype)
        # the patch's centre on a brain pixel of the host, the patch inside the slice
        centres = torch.nonzero(on_brain)
        cy, cx = (int(v) for v in centres[int(self.rng.integers(len(centres)))])
        h, w = size
        ty = min(max(0, cy - h // 2), host.shape[0] - h)
        tx = min(max(0, cx - w // 2), host.shape[1] - w)
        region = host[ty : ty + h, tx : tx + w]
        lo, hi = float(host.min()), float(host.max())
        region.copy_((1 - alpha) * region + alpha * patch.clamp(lo, hi))
        host_label[ty : ty + h, tx : tx + w] = torch.maximum(host_label[ty : ty + h, tx : tx + w], box)
