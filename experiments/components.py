"""Components only the experiments use (issue "Model quality II" and the screens), kept out of
the package that ships with the bundle. The overlays of ``configs/experiments/`` name them
``experiments.components.*``: run those from the repository root, where ``experiments`` imports.

- ``tumour_logit``, ``TumourFromCategories``, ``CategoryAwareLoss``: one logit per tumour
  category, run as one tumour logit (``configs/experiments/categories.yaml``).
- ``MeanEnsemble``: the mean of independently trained networks (``ensemble.yaml``).
- ``LowResolutionEpochs``: progressive resizing (``fast_cpu.yaml``).
- ``run_of_weights``: an analysis's MLflow run, nested under the training run of its weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from torch import nn
from torch.nn.modules.loss import _Loss

from tumorseg.io.files import file_digest
from tumorseg.tracking.tracker import open_store, training_run_id

__all__ = ["CategoryAwareLoss", "LowResolutionEpochs", "MeanEnsemble", "TumourFromCategories", "run_of_weights", "tumour_logit"]


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
    2: compact). Trained on the categories (:class:`tumorseg.training.losses.CategoryAwareLoss`), the network
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


class CategoryAwareLoss(_Loss):
    """
    The tumour loss on the merged tumour logit plus a cross-entropy on the tumour categories, for a
    network with one logit per class (:class:`TumourFromCategories` in training):

    .. math::

        L = L_{tumour}\\left(\\log \\sum_{c \\ge 1} e^{z_c} - z_0,\\; [y > 0]\\right)
            + w_{category}\\,\\overline{\\text{CE}(\\operatorname{softmax}(z), y)}

    where :math:`z` are the class logits (channel 0 background), :math:`y` the class of each pixel
    (0 background, ``c`` the category ``c``, as ``tumorseg-convert --keep-categories`` writes the
    masks) and the cross-entropy is averaged over pixels. The tumour term is exactly the loss the
    one-channel network is trained with, so the categories only add what telling them apart teaches.

    Shapes: ``input`` ``(B, C, spatial...)`` with ``C >= 2``; ``target`` ``(B, 1, spatial...)``
    holding class indices ``0 .. C-1``.
    """

    def __init__(self, tumour_loss: torch.nn.Module, w_category: float = 1.0) -> None:
        """
        Args:
            tumour_loss: the loss of the tumour logit against the 0/1 tumour mask
                (e.g. :class:`tumorseg.training.losses.PosterDiceFocalLoss`).
            w_category: weight of the cross-entropy, >= 0 (0: the categories teach nothing).

        Raises:
            ValueError: when ``w_category`` is negative.
        """
        super().__init__()
        if w_category < 0:
            raise ValueError(f"w_category must be >= 0, got {w_category}.")
        self.tumour_loss, self.w_category = tumour_loss, float(w_category)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Raises:
            ValueError: for fewer than 2 classes, a target that is not one channel of the input's
                batch and spatial shape, or class indices outside ``0 .. C-1``.
        """
        if input.ndim < 3 or input.shape[1] < 2:
            raise ValueError(f"input must be class logits (B, C >= 2, spatial...), got shape {tuple(input.shape)}.")
        if target.shape != (input.shape[0], 1, *input.shape[2:]):
            raise ValueError(
                f"target must be (B, 1, spatial...) class indices for input {tuple(input.shape)}, got {tuple(target.shape)}."
            )
        classes = target[:, 0].round().long()
        if classes.min() < 0 or classes.max() >= input.shape[1]:
            raise ValueError(f"target classes must be in 0..{input.shape[1] - 1}, got {classes.min()}..{classes.max()}.")
        tumour = self.tumour_loss(tumour_logit(input), (classes > 0)[:, None].to(input.dtype))
        if self.w_category == 0:
            return tumour
        return tumour + self.w_category * F.cross_entropy(input.float(), classes)


class LowResolutionEpochs:
    """Progressive resizing: the first ``epochs`` epochs train on images that ``transform`` shrinks
    (e.g. MONAI's ``Resized`` to 128 px), the later ones at the size the data are cached at.

    A convolutional network's step costs in proportion to the pixels, so early epochs, which only
    need the coarse picture, run several times faster; the last epochs, at full size, adapt the
    network to the scale it is evaluated at. ``transform`` is appended to the end of ``compose``
    (the training dataset's transforms, after the random augmentation) while the epoch about to
    run is a low-resolution one, and removed after. It is set when training starts (also when it
    resumes) and after every epoch, before the next epoch's loader workers start.

    Args:
        compose: the training dataset's ``Compose`` (``train#preprocessing``).
        transform: the shrinking transform (deterministic, on image and label).
        epochs: how many epochs, from the first, train shrunk; 0 disables it.
    """

    def __init__(self, compose, transform, epochs: int) -> None:
        if int(epochs) < 0:
            raise ValueError(f"epochs must be >= 0, got {epochs}.")
        self.compose, self.transform, self.epochs = compose, transform, int(epochs)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._set)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._set)

    def _set(self, engine: Engine) -> None:
        shrink = engine.state.epoch < self.epochs  # state.epoch: the epochs completed so far
        others = tuple(t for t in self.compose.transforms if t is not self.transform)
        self.compose.transforms = (*others, self.transform) if shrink else others


def run_of_weights(tracking_dir, experiment: str, checkpoint, workflow: str, run_name: str):
    """``(client, run)``: a new run in the store of ``tracking_dir`` about one set of weights
    (an analysis such as the post-processing table or the presence check), tagged with the
    weights' SHA-256 and nested under the training run that produced them, where there is one."""
    client, experiment_id = open_store(tracking_dir, experiment)
    digest = file_digest(checkpoint, None)
    tags = {"workflow": workflow, "bundle": "brain_tumor_mri_seg", "checkpoint_sha256": digest}
    parent = training_run_id(client, experiment_id, digest)
    if parent:
        tags["mlflow.parentRunId"] = parent
    return client, client.create_run(experiment_id, tags=tags, run_name=run_name)
