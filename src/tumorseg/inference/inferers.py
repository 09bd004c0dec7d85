"""Inferers that wrap another MONAI inferer: flip test-time augmentation, and bf16 autocast on CPUs
(so every workflow switches them the same way, from the configs)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.inferers import Inferer, SimpleInferer

__all__ = ["CPUAutocastInferer", "FlipTTAInferer"]


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
        prob: torch.Tensor | None = None
        for dims in self.flips:
            view = inputs.flip(dims) if dims else inputs
            out = torch.sigmoid(self.inferer(view, network, *args, **kwargs).float())
            out = out.flip(dims) if dims else out
            prob = out if prob is None else prob + out
        assert prob is not None  # self.flips holds the identity at least
        return torch.logit(prob / len(self.flips), eps=1e-6)


def cpu_bf16_supported() -> bool:
    """True where oneDNN runs bfloat16 natively (AVX512-BF16 or AMX): elsewhere bf16 is emulated
    and many times slower than float32 (0.08x measured on a CPU without it)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class CPUAutocastInferer(Inferer):
    """Runs ``inferer`` under ``torch.autocast("cpu", bfloat16)`` and returns float32 logits.

    MONAI's engines only autocast on CUDA (``amp``); on a CPU with native bfloat16 this is the
    CPU's mixed precision (its speed-up: ``benchmarks/README.md``, "Time to Dice"). bfloat16 keeps
    float32's exponent range, so no gradient scaler is needed; the loss is computed on the
    float32 output.

    Args:
        inferer: the inferer to wrap (default ``SimpleInferer``).
        enabled: ``"auto"`` (default) turns it on only for CPU inputs on a CPU with native
            bfloat16; True forces it on CPU inputs, False passes straight through. Inputs on
            another device always pass straight through (``amp`` covers CUDA).
    """

    def __init__(self, inferer: Inferer | None = None, enabled: bool | str = "auto") -> None:
        if isinstance(enabled, str):
            if enabled.lower() not in ("auto", "true", "false"):
                raise ValueError(f'enabled must be "auto", true or false, got {enabled!r}.')
            enabled = cpu_bf16_supported() if enabled.lower() == "auto" else enabled.lower() == "true"
        self.inferer = inferer or SimpleInferer()
        self.enabled = bool(enabled)

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs) -> torch.Tensor:
        if not self.enabled or inputs.device.type != "cpu":
            return self.inferer(inputs, network, *args, **kwargs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = self.inferer(inputs, network, *args, **kwargs)
        return out.float()
