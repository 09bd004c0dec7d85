"""The second stage of a crop-and-refine cascade (nnU-Net's cascade idea, issue "Model quality
II"): the first stage's box is refined by a network that sees only a square window around it.

The window's geometry (``window``, ``cut``, ``paste``) is shared by the refiner's training
(:class:`BoxWindowd`: windows around the true boxes, jittered; ``configs/train_refiner.yaml`` and
``experiments/cascade.py``) and by :class:`BoxRefined`, the post-processing step that applies it
(``common.yaml``'s ``postprocessing``, after the box fit).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable
from monai.utils import convert_to_dst_type

__all__ = ["BoxRefined", "BoxWindowd", "bbox", "cut", "paste", "resized", "window"]


def bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """``(row0, col0, row1, col1)``, ends exclusive, of a 2D mask's foreground; None if empty."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if not rows.size:
        return None
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def window(box, context: float, shift=(0.0, 0.0), min_side: int = 48) -> tuple[int, int, int]:
    """The square window ``(row0, col0, side)`` around ``box``: its side is ``context`` times the
    box's longer side (at least ``min_side``), its centre the box's, moved by ``shift`` (fractions
    of the box's height and width; training jitters it)."""
    r0, c0, r1, c1 = box
    h, w = r1 - r0, c1 - c0
    side = max(min_side, int(round(context * max(h, w))))
    cr, cc = (r0 + r1) / 2 + shift[0] * h, (c0 + c1) / 2 + shift[1] * w
    return int(round(cr - side / 2)), int(round(cc - side / 2)), side


def cut(array: np.ndarray, win) -> np.ndarray:
    """The (H, W) ``array``'s square window, zero where it reaches past the slice."""
    r, c, side = win
    out = np.zeros((side, side), dtype=array.dtype)
    rs, cs = max(r, 0), max(c, 0)
    re, ce = min(r + side, array.shape[0]), min(c + side, array.shape[1])
    if re > rs and ce > cs:
        out[rs - r : re - r, cs - c : ce - c] = array[rs:re, cs:ce]
    return out


def paste(mask: np.ndarray, win, shape) -> np.ndarray:
    """A window's (side, side) mask placed back on a slice of ``shape`` (what falls outside is dropped)."""
    r, c, side = win
    out = np.zeros(shape, dtype=bool)
    rs, cs = max(r, 0), max(c, 0)
    re, ce = min(r + side, shape[0]), min(c + side, shape[1])
    if re > rs and ce > cs:
        out[rs:re, cs:ce] = mask[rs - r : re - r, cs - c : ce - c]
    return out


def checked_window(context: float, size: int) -> tuple[float, int]:
    """The window settings shared by training and inference, checked: ``context`` (window side
    over the box's longer side) at least 1, ``size`` (the refiner's input side) at least 16."""
    if not context >= 1.0:
        raise ValueError(f"context must be >= 1 (the window holds the box), got {context}.")
    if not size >= 16:
        raise ValueError(f"size must be >= 16 pixels, got {size}.")
    return float(context), int(size)


def resized(array: np.ndarray, size: int, nearest: bool = False) -> torch.Tensor:
    """A square (H, W) array as a (1, size, size) float tensor: bilinear with anti-aliasing
    (images) or nearest (masks). Torch's own anti-aliased interpolation, not MONAI's ``Resize``
    (a Gaussian pre-filter): the shipped refiner was trained on windows resized this way, and
    training and inference must resize alike."""
    import torch.nn.functional as F

    t = torch.as_tensor(np.ascontiguousarray(array), dtype=torch.float32)[None, None]
    if nearest:
        return F.interpolate(t, size=(size, size), mode="nearest")[0]
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]


class BoxWindowd(Randomizable, MapTransform):
    """The refiner's training input: image and label cut to a square window around the label's box.

    The window is :func:`window` of the label's bounding box with ``context``, moved by
    ``U(-jitter, jitter)`` of the box's height and width and scaled by ``exp(U(-scale_jitter,
    scale_jitter))``, as a first stage's box is off in place and size; both keys are cut from it
    and resized to ``size`` (:func:`resized`: the image bilinear with anti-aliasing, masks nearest,
    as :class:`BoxRefined` resizes at inference). With both jitters 0 the window is the one
    :class:`BoxRefined` would cut around a perfect first box (validation). A slice without a box
    is taken whole (the refiner never sees one at inference: there it keeps the first stage's "no
    tumour").

    Args:
        keys: the (1, H, W) arrays to cut (image and label), on one grid.
        box_key: the label whose foreground's bounding box is refined.
        context, size: as :class:`BoxRefined` (the window's side over the box's longer side; the
            side the window is resized to).
        jitter: largest shift of the window's centre, in box heights and widths.
        scale_jitter: largest log-scale change of the window's side.
        nearest_keys: keys resized with nearest neighbour (default: ``box_key``).
    """

    def __init__(
        self,
        keys: KeysCollection,
        box_key: str,
        context: float = 2.0,
        size: int = 128,
        jitter: float = 0.0,
        scale_jitter: float = 0.0,
        nearest_keys: KeysCollection | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.context, self.size = checked_window(context, size)
        if not (0.0 <= jitter < 0.5 and 0.0 <= scale_jitter < 1.0):
            raise ValueError(f"jitter must be in [0, 0.5) and scale_jitter in [0, 1), got {jitter} and {scale_jitter}.")
        self.box_key = box_key
        self.jitter, self.scale_jitter = float(jitter), float(scale_jitter)
        if nearest_keys is None:
            nearest_keys = [box_key]
        self.nearest = {nearest_keys} if isinstance(nearest_keys, str) else set(nearest_keys)  # type: ignore[arg-type]
        self._shift: tuple[float, ...] = (0.0, 0.0)
        self._scale = 1.0

    def randomize(self, data=None) -> None:
        self._scale = float(np.exp(self.R.uniform(-self.scale_jitter, self.scale_jitter)))
        self._shift = tuple(float(v) for v in self.R.uniform(-self.jitter, self.jitter, 2))

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        self.randomize()
        label = np.asarray(torch.as_tensor(d[self.box_key]).detach().cpu())
        if label.ndim != 3 or label.shape[0] != 1:
            raise ValueError(f"expected a (1, H, W) {self.box_key}, got shape {label.shape}.")
        box = bbox(label[0] > 0.5)
        if box is None:  # no tumour: the whole slice
            box, context, shift = (0, 0, *label.shape[1:]), 1.0, (0.0, 0.0)
        else:
            context, shift = self.context * self._scale, self._shift  # type: ignore[assignment]
        win = window(box, context, shift)
        for key in self.key_iterator(d):
            array = np.asarray(torch.as_tensor(d[key]).detach().cpu().float())
            if array.ndim != 3 or array.shape[1:] != label.shape[1:]:
                raise ValueError(f"expected (C, H, W) {key} on the {self.box_key}'s grid, got shape {array.shape}.")
            out = torch.cat([resized(cut(channel, win), self.size, nearest=key in self.nearest) for channel in array])
            d[key] = convert_to_dst_type(out, dst=d[key])[0]
        return d


class BoxRefined(MapTransform):
    """Replaces each slice's box by the box a second network finds in a window around it.

    For a (1, H, W) box mask (the output of :class:`tumorseg.postprocessing.transforms.ExpectedDiceBoxd`) and its
    (1, H, W) image on the same grid: the window of :func:`window` (``context`` times the box's
    longer side, centred on it) is cut from the image, resized to ``size`` and run through
    ``network`` with its three flips (:class:`tumorseg.inference.inferers.FlipTTAInferer`); the mean
    probability goes through the same box fit (:class:`tumorseg.postprocessing.transforms.ExpectedDiceBox`), and
    that box, mapped back, replaces the first.
    An empty mask stays empty and a window in which the refiner finds nothing keeps the first box:
    the cascade changes a tumour's extent and place, never whether a slice holds one (so the
    presence gate's healthy-scan figures hold as they are).

    Args:
        keys: the box masks to refine.
        image_key: the image the masks were predicted on (same grid).
        network: the refiner, one tumour logit, input ``(B, 1, size, size)``.
        checkpoint: its weights (a state dict).
        context: window side over the box's longer side (as in the refiner's training).
        size: the side the window is resized to (the refiner's training size).
        threshold: probability the refiner must reach for its box to be used.
        runtime: ``"onnx"``: the refiner runs in ONNX Runtime (:mod:`tumorseg.inference.onnx_runtime`),
            ``"torch"``: eager PyTorch, ``"auto"``: ONNX Runtime on a CPU where it is installed.
    """

    def __init__(
        self,
        keys: KeysCollection,
        image_key: str,
        network: torch.nn.Module,
        checkpoint: str | Path,
        context: float = 2.0,
        size: int = 128,
        threshold: float = 0.5,
        runtime: str = "torch",
        allow_missing_keys: bool = False,
    ) -> None:
        from tumorseg.inference import onnx_runtime
        from tumorseg.inference.inferers import FlipTTAInferer
        from tumorseg.inference.predictor import load_weights
        from tumorseg.postprocessing.transforms import ExpectedDiceBox

        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key
        self.context, self.size = checked_window(context, size)
        self.network = network.eval()
        self.device = next(network.parameters()).device
        load_weights(self.network, Path(checkpoint), self.device)
        self.runtime = onnx_runtime.resolve(runtime, self.device)
        if self.runtime == "onnx":
            self.network = onnx_runtime.OnnxNetwork(self.network, self.size)
        self.box_fit = ExpectedDiceBox(threshold=threshold)
        self.inferer = FlipTTAInferer()  # the window and its three flips, as the first stage's TTA

    def refine(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """The refined (H, W) mask of one (H, W) image and its box mask."""
        box = bbox(mask)
        if box is None:
            return mask
        win = window(box, self.context)
        x = resized(cut(image, win), self.size)[None].to(self.device)
        with torch.no_grad():
            prob = torch.sigmoid(self.inferer(x, self.network).float())
        inside = self.box_fit(prob[0].cpu().numpy())[0]
        if not inside.any():
            return mask
        return paste(resized(inside, win[2], nearest=True)[0].numpy() > 0.5, win, mask.shape)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        image = np.asarray(torch.as_tensor(d[self.image_key]).detach().cpu().float())
        for key in self.key_iterator(d):
            masks = np.asarray(torch.as_tensor(d[key]).detach().cpu()) > 0.5
            if masks.ndim != 3 or image.shape[-2:] != masks.shape[-2:]:
                raise ValueError(f"expected (C, H, W) masks on the image's grid, got {masks.shape} and {image.shape}.")
            out = np.stack([self.refine(image[0], m) for m in masks]).astype(np.float32)
            d[key] = convert_to_dst_type(out, dst=d[key])[0]
        return d
