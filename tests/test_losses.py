"""The poster's loss: hand-computed values, MONAI equivalence, numerical stability, argument checks."""

from __future__ import annotations

import math

import pytest
import torch
from monai.losses import DiceFocalLoss

from tumorseg.training.losses import PosterDiceFocalLoss


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_hand_computed_value_on_two_pixels():
    # p = (0.8, 0.3), y = (1, 0); smooth = 1
    p, y = torch.tensor([0.8, 0.3]), torch.tensor([1.0, 0.0])
    dice = 1 - (2 * 0.8 + 1) / (0.8 + 0.3 + 1 + 1)  # 1 - 2.6 / 3.1
    bce = [-math.log(0.8), -math.log(0.7)]
    focal = [0.25 * (1 - math.exp(-b)) ** 2 * b for b in bce]  # p_t = exp(-bce)
    expected = 0.6 * dice + 2.0 * sum(focal) / 2
    loss = PosterDiceFocalLoss(w_dice=0.6, w_focal=2.0, alpha=0.25, gamma=2.0, smooth=1.0)
    as_logits = torch.tensor([logit(0.8), logit(0.3)]).view(1, 1, 2)
    assert loss(as_logits, y.view(1, 1, 2)).item() == pytest.approx(expected, rel=1e-6)
    as_probs = PosterDiceFocalLoss(w_dice=0.6, w_focal=2.0, alpha=0.25, gamma=2.0, smooth=1.0, logits=False)
    assert as_probs(p.view(1, 1, 2), y.view(1, 1, 2)).item() == pytest.approx(expected, rel=1e-6)


def test_gamma_zero_is_alpha_times_bce_and_perfect_prediction_is_zero():
    x = torch.randn(2, 1, 4, 4)
    y = (torch.rand(2, 1, 4, 4) > 0.5).float()
    focal_only = PosterDiceFocalLoss(w_dice=0.0, w_focal=1.0, alpha=0.5, gamma=0.0)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(x, y)
    assert focal_only(x, y).item() == pytest.approx(0.5 * bce.item(), rel=1e-6)
    perfect = (y * 2 - 1) * 50.0  # saturated logits of the right sign
    assert PosterDiceFocalLoss()(perfect, y).item() == pytest.approx(0.0, abs=1e-6)


def test_empty_target_with_empty_prediction_costs_nothing():
    y = torch.zeros(1, 1, 8, 8)
    assert PosterDiceFocalLoss(smooth=1.0)(torch.full_like(y, -30.0), y).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("batch", [True, False])
@pytest.mark.parametrize("w_dice, w_focal, alpha, gamma, smooth", [(1.0, 1.0, 0.25, 2.0, 1.0), (0.3, 4.0, 0.8, 1.5, 1e-5)])
def test_equals_monai_dice_focal_where_they_coincide(batch, w_dice, w_focal, alpha, gamma, smooth):
    # MONAI's scalar alpha balances the classes (alpha vs 1 - alpha); the poster's only scales
    # the focal term. They coincide with MONAI alpha=None and lambda_focal = w_focal * alpha.
    torch.manual_seed(0)
    x = torch.randn(3, 1, 16, 16) * 3
    y = (torch.rand(3, 1, 16, 16) > 0.8).float()
    ours = PosterDiceFocalLoss(w_dice=w_dice, w_focal=w_focal, alpha=alpha, gamma=gamma, smooth=smooth, batch=batch)
    monai = DiceFocalLoss(
        sigmoid=True,
        smooth_nr=smooth,
        smooth_dr=smooth,
        batch=batch,
        gamma=gamma,
        alpha=None,
        lambda_dice=w_dice,
        lambda_focal=w_focal * alpha,
    )
    assert ours(x, y).item() == pytest.approx(monai(x, y).item(), rel=1e-5)


def test_gradients_stay_finite_on_extreme_logits():
    x = torch.tensor([[[[-1e4, -100.0, 0.0, 100.0, 1e4, 88.0, -88.0, 30.0]]]], requires_grad=True)
    y = torch.tensor([[[[1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0]]]])
    loss = PosterDiceFocalLoss()(x, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    # a confidently wrong pixel still gets a gradient that pushes it the right way
    assert x.grad[0, 0, 0, 0] < 0 and x.grad[0, 0, 0, 3] > 0


def test_probability_input_is_clamped_inside_the_logs():
    p = torch.tensor([[[[0.0, 1.0, 1.0, 0.0]]]], requires_grad=True)
    y = torch.tensor([[[[1.0, 0.0, 1.0, 0.0]]]])
    loss = PosterDiceFocalLoss(logits=False)(p, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(p.grad).all()


def test_reduction_none_gives_one_value_per_image():
    x, y = torch.randn(4, 1, 8, 8), (torch.rand(4, 1, 8, 8) > 0.5).float()
    per_image = PosterDiceFocalLoss(batch=False, reduction="none")(x, y)
    assert per_image.shape == (4, 1)
    assert per_image.mean().item() == pytest.approx(PosterDiceFocalLoss(batch=False)(x, y).item(), rel=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"w_dice": -1.0}, "w_dice must be >= 0"),
        ({"gamma": -0.5}, "gamma must be >= 0"),
        ({"w_dice": 0.0, "w_focal": 0.0}, "both 0"),
        ({"reduction": "max"}, "reduction must be one of"),
        ({"reduction": "none"}, "needs batch=False"),
    ],
)
def test_bad_arguments_say_what_is_wrong(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PosterDiceFocalLoss(**kwargs)


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="same shape"):
        PosterDiceFocalLoss()(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))


def test_tumour_logit_of_class_logits_is_the_softmax_tumour_probability():
    from experiments.components import TumourFromCategories, tumour_logit

    z = torch.randn(2, 3, 5, 4) * 4
    merged = tumour_logit(z)
    assert merged.shape == (2, 1, 5, 4)
    assert torch.allclose(torch.sigmoid(merged)[:, 0], torch.softmax(z, dim=1)[:, 1:].sum(1), atol=1e-6)
    with pytest.raises(ValueError, match="C >= 2"):
        tumour_logit(torch.zeros(2, 1, 5, 4))

    network = TumourFromCategories(torch.nn.Conv2d(1, 3, 3, padding=1))
    x = torch.randn(2, 1, 8, 8)
    assert network.train()(x).shape == (2, 3, 8, 8)  # class logits for the category-aware loss
    assert network.eval()(x).shape == (2, 1, 8, 8)  # one tumour logit for everything downstream


def test_category_aware_loss_is_the_tumour_loss_plus_cross_entropy():
    from experiments.components import CategoryAwareLoss, tumour_logit

    z = torch.randn(2, 3, 6, 6, requires_grad=True)
    classes = torch.zeros(2, 1, 6, 6)
    classes[0, 0, 1:3, 1:4], classes[1, 0, 2:5, 2:5] = 1, 2
    poster = PosterDiceFocalLoss(batch=False)
    tumour_only = poster(tumour_logit(z), (classes > 0).float())
    assert CategoryAwareLoss(poster, w_category=0)(z, classes).item() == pytest.approx(tumour_only.item(), rel=1e-6)
    expected = tumour_only + 0.5 * torch.nn.functional.cross_entropy(z, classes[:, 0].long())
    loss = CategoryAwareLoss(poster, w_category=0.5)(z, classes)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0

    with pytest.raises(ValueError, match="w_category must be >= 0"):
        CategoryAwareLoss(poster, w_category=-1)
    with pytest.raises(ValueError, match="classes must be in 0..2"):
        CategoryAwareLoss(poster)(z, classes * 2)  # a category the network has no logit for
    with pytest.raises(ValueError, match=r"target must be \(B, 1"):
        CategoryAwareLoss(poster)(z, classes[:, 0])
