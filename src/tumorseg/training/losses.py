"""The seed poster's combined Dice + focal loss, for binary (sigmoid) segmentation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.modules.loss import _Loss

__all__ = ["PosterDiceFocalLoss"]


class PosterDiceFocalLoss(_Loss):
    """
    Weighted sum of a soft Dice loss and a focal loss, exactly as in the poster
    "Brain Tumor Image Segmentation using Deep Learning" (Chalmers):

    .. math::

        \\text{Dice} = 1 - \\frac{2\\sum p y + s}{\\sum p + \\sum y + s}

        \\text{BCE} = -(y \\log p + (1 - y)\\log(1 - p)) \\quad \\text{(per pixel)}

        \\text{Focal} = \\alpha (1 - p_t)^{\\gamma}\\,\\text{BCE}, \\qquad p_t = e^{-\\text{BCE}}

        \\text{Loss} = w_{dice}\\,\\text{Dice} + w_{focal}\\,\\overline{\\text{Focal}}

    where :math:`p` is the predicted tumour probability, :math:`y` the target in [0, 1] and
    :math:`s` = ``smooth``. The focal term is averaged over pixels. Unlike MONAI's alpha-balanced
    focal loss, the poster's :math:`\\alpha` weighs both classes alike (it only scales the term).

    With ``logits=True`` (the default) the input is the network's raw output and every log is
    taken with ``logsigmoid``, so extreme logits neither overflow nor give infinite gradients.
    With ``logits=False`` the input must already be probabilities; they are clamped to
    ``[eps, 1 - eps]`` only inside the logs, since a probability of exactly 0 or 1 has no
    finite logarithm.

    Relation to MONAI: for ``logits=True`` and ``reduction="mean"`` this equals
    ``monai.losses.DiceFocalLoss(sigmoid=True, smooth_nr=smooth, smooth_dr=smooth,
    batch=batch, gamma=gamma, alpha=None, lambda_dice=w_dice, lambda_focal=w_focal * alpha)``
    (tested in ``tests/test_losses.py``).

    Shapes: ``input`` and ``target`` are ``(B, 1, H, W[, D])`` (any ``(B, C, ...)`` works; the
    Dice sums run over the spatial dims, and over the batch too when ``batch=True``).
    """

    def __init__(
        self,
        w_dice: float = 1.0,
        w_focal: float = 1.0,
        alpha: float = 0.25,
        gamma: float = 2.0,
        smooth: float = 1.0,
        batch: bool = True,
        logits: bool = True,
        reduction: str = "mean",
        eps: float = 1e-7,
    ) -> None:
        """
        Args:
            w_dice: weight of the Dice term, >= 0.
            w_focal: weight of the focal term, >= 0.
            alpha: constant factor of the focal term, >= 0.
            gamma: focusing exponent of the focal term, >= 0 (0 gives alpha * BCE).
            smooth: added to numerator and denominator of the Dice ratio, >= 0; keeps an empty
                target with an empty prediction at loss 0.
            batch: sum the Dice terms over the whole batch (one Dice per batch, as in the
                poster's Keras code) instead of one Dice per image and channel.
            logits: the input is raw network output (True) or probabilities (False).
            reduction: ``"mean"`` or ``"sum"`` over the per-image (or per-batch) Dice values and
                the per-pixel focal values, or ``"none"`` for the per-image-and-channel loss of
                shape ``(B, C)`` (``batch`` must then be False).
            eps: clamp for probabilities inside the logs when ``logits=False``.

        Raises:
            ValueError: when a weight or parameter is negative, both weights are 0, or the
                reduction is unknown or ``"none"`` with ``batch=True``.
        """
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f'reduction must be one of "mean", "sum", "none", got {reduction!r}.')
        super().__init__(reduction=reduction)
        for name, value in (("w_dice", w_dice), ("w_focal", w_focal), ("alpha", alpha), ("gamma", gamma), ("smooth", smooth)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}.")
        if w_dice == 0 and w_focal == 0:
            raise ValueError("w_dice and w_focal are both 0: the loss would be constant.")
        if reduction == "none" and batch:
            raise ValueError('reduction="none" gives one value per image, which needs batch=False.')
        if not 0 < eps < 0.5:
            raise ValueError(f"eps must be in (0, 0.5), got {eps}.")
        self.w_dice, self.w_focal = float(w_dice), float(w_focal)
        self.alpha, self.gamma, self.smooth = float(alpha), float(gamma), float(smooth)
        self.batch, self.logits, self.eps = batch, logits, eps

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input: logits (or probabilities if ``logits=False``), shape ``(B, C, spatial...)``.
            target: same shape, values in [0, 1].

        Raises:
            ValueError: when the shapes differ or have no spatial dimension.
        """
        if input.shape != target.shape:
            raise ValueError(f"input and target must have the same shape, got {tuple(input.shape)} and {tuple(target.shape)}.")
        if input.ndim < 3:
            raise ValueError(f"expected (B, C, spatial...) tensors, got shape {tuple(input.shape)}.")
        target = target.to(input.dtype)
        if self.logits:
            prob = torch.sigmoid(input)
            log_p, log_1mp = F.logsigmoid(input), F.logsigmoid(-input)
        else:
            prob = input
            clamped = input.clamp(self.eps, 1 - self.eps)
            log_p, log_1mp = torch.log(clamped), torch.log1p(-clamped)

        dims = list(range(2, input.ndim))
        if self.batch:
            dims = [0] + dims
        intersection = torch.sum(prob * target, dim=dims)
        denominator = torch.sum(prob, dim=dims) + torch.sum(target, dim=dims)
        dice = 1.0 - (2.0 * intersection + self.smooth) / (denominator + self.smooth)

        bce = -(target * log_p + (1.0 - target) * log_1mp)
        # (1 - p_t)^gamma with p_t = exp(-bce), computed as -expm1(-bce) to keep precision near 0
        focal = self.alpha * (-torch.expm1(-bce)).pow(self.gamma) * bce

        if self.reduction == "none":
            return self.w_dice * dice + self.w_focal * focal.mean(dim=dims)
        if self.reduction == "sum":
            return self.w_dice * dice.sum() + self.w_focal * focal.sum()
        return self.w_dice * dice.mean() + self.w_focal * focal.mean()
