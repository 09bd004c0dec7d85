"""Test-time augmentation as a MONAI inferer, so every workflow switches it the same way."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.inferers import Inferer, SimpleInferer

__all__ = ["FlipTTAInferer"]


class FlipTTAInferer(Inferer):
    """Runs ``inferer`` on the batch and on its flips, and averages the sigmoid probabilities.

    Returns the logit of the average, so the post-processing that follows (sigmoid, threshold)
    is the same with and without test-time augmentation.

    Args:
        inferer: the inferer to wrap (default ``SimpleInferer``; the bundle's inference uses
            ``SlidingWindowInferer``).
        enabled: False passes straight through to ``inferer`` (one config switch, ``tta``).
        flips: spatial dims of the (B, C, H, W) batch to flip, one tuple per view; ``()`` is the
            unflipped view. Default: the slice and its flips along each axis and both.
    """

    def __init__(
        self, inferer: Inferer | None = None, enabled: bool = True, flips: Sequence[Sequence[int]] = ((), (2,), (3,), (2, 3))
    ) -> None:
        if not flips:
            raise ValueError("flips must name at least one view, e.g. [[]] for the slice itself.")
        self.inferer = inferer or SimpleInferer()
        self.enabled = bool(enabled)
        self.flips = [tuple(f) for f in flips]

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs) -> torch.Tensor:
        if not self.enabled:
            return self.inferer(inputs, network, *args, **kwargs)
        prob = None
        for dims in self.flips:
            view = inputs.flip(dims) if dims else inputs
            out = torch.sigmoid(self.inferer(view, network, *args, **kwargs).float())
            out = out.flip(dims) if dims else out
            prob = out if prob is None else prob + out
        return torch.logit(prob / len(self.flips), eps=1e-6)
