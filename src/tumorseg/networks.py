"""Networks beyond MONAI's ``UNet`` (issue "Model quality II"): a tumour network trained on the
dataset's tumour categories, and a mean ensemble of independently trained networks."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MeanEnsemble", "TumourFromCategories", "tumour_logit"]


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


class MeanEnsemble(nn.Module):
    """Independently trained one-logit tumour networks run as one network: the logit of their
    mean sigmoid probability.

    .. math::

        z = \\operatorname{logit} \\Big( \\frac{1}{M} \\sum_{m=1}^{M} \\sigma(z_m) \\Big)

    This is MONAI's ``MeanEnsemble`` (``monai.transforms.MeanEnsembled``) taken inside the network,
    so that one state dict (``members.0.*``, ``members.1.*``, ...; ``experiments/ensemble.py`` packs
    it) goes through everything that loads the bundle's weights unchanged: evaluate, inference,
    ``tumorseg-predict``, the ONNX export, MONAI Label and the MLflow model; and the flip TTA and
    post-processing that follow see one logit, as for a single network.

    Shapes: ``(B, 1, H, W)`` -> ``(B, 1, H, W)``.

    Args:
        members: the networks, each with one output channel (the tumour logit).
    """

    def __init__(self, members) -> None:
        super().__init__()
        members = list(members)
        if not members:
            raise ValueError("members must hold at least one network.")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prob = torch.stack([torch.sigmoid(m(x).float()) for m in self.members]).mean(0)
        return torch.logit(prob, eps=1e-6)
