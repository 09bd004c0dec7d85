"""A tumour network trained on the dataset's tumour categories (issue "Model quality II")."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["TumourFromCategories", "tumour_logit"]


def tumour_logit(class_logits: torch.Tensor) -> torch.Tensor:
    """The one tumour logit of softmax class logits whose channel 0 is background.

    .. math::

        \\operatorname{logit} P(\\text{tumour}) = \\log \\sum_{c \\ge 1} e^{z_c} - z_0,
        \\qquad P(\\text{tumour}) = \\sum_{c \\ge 1} \\operatorname{softmax}(z)_c

    Shapes: ``(B, C, H, W)`` with ``C >= 2`` -> ``(B, 1, H, W)``.
    """
    if class_logits.dim() < 3 or class_logits.shape[1] < 2:
        raise ValueError(f"class logits must be (B, C >= 2, ...), got shape {tuple(class_logits.shape)}.")
    return torch.logsumexp(class_logits[:, 1:], dim=1, keepdim=True) - class_logits[:, :1]


class TumourFromCategories(nn.Module):
    """A network with one logit per class (background, category 1, category 2, ...) that runs as a
    one-channel tumour network.

    The Kaggle boxes carry two tumour categories that look different (1: diffuse, larger boxes;
    2: compact). Trained on the categories (:class:`tumorseg.losses.CategoryAwareLoss`), the network
    learns them apart; everything downstream (the sigmoid post-processing, presence gate, box fit,
    metrics, ONNX export, MONAI Label) keeps seeing the one tumour logit of :func:`tumour_logit`.
    As MONAI's ``DynUNet`` does with its deep-supervision heads, the extra outputs exist in training
    mode only: ``forward`` returns the class logits ``(B, C, H, W)`` while training and the tumour
    logit ``(B, 1, H, W)`` in eval mode.

    Args:
        network: any network with ``C >= 2`` output channels, channel 0 background.
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.network(x)
        return logits if self.training else tumour_logit(logits)
