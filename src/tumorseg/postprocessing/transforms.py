"""Post-processing that fits the labels of this dataset: each tumour is annotated as one
axis-aligned rectangle."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform
from monai.utils import convert_data_type, convert_to_dst_type

__all__ = ["ExpectedDiceBox", "ExpectedDiceBoxd", "PresenceGate", "PresenceGated"]


class ExpectedDiceBox(Transform):
    """Replaces a probability map by the one rectangle with the highest expected Dice.

    Candidates are the bounding boxes of the most probable connected component of ``p > t`` for
    each level ``t`` in ``levels``; each box ``B`` is scored by the Dice it is expected to reach
    if the label is drawn from ``p``::

        E[Dice](B) ~= 2 * sum_{B} p / (|B| + sum p)

    A channel whose probability never reaches ``threshold`` stays empty, as plain thresholding
    would leave it.

    Args:
        threshold: probability a pixel must reach for anything to be predicted.
        levels: the levels at which candidate boxes are cut.

    Input: probabilities, channel first (C, H, W), numpy or torch. Output: binary (0/1) masks of
    the same shape and type.
    """

    def __init__(self, threshold: float = 0.5, levels: Sequence[float] = tuple(np.linspace(0.1, 0.9, 17))) -> None:
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}.")
        if not levels or not all(0.0 <= t < 1.0 for t in levels):
            raise ValueError(f"levels must be values in [0, 1), got {levels}.")
        self.threshold = threshold
        self.levels = sorted(float(t) for t in levels)

    def box(self, prob: np.ndarray) -> np.ndarray:
        """The best rectangle of one (H, W) probability map, as a boolean mask."""
        from scipy import ndimage

        best_mask = np.zeros(prob.shape, dtype=bool)
        if prob.max() < self.threshold:
            return best_mask
        total, best = float(prob.sum()), -1.0
        for level in self.levels:
            mask = prob > level
            if not mask.any():
                break
            components, n = ndimage.label(mask)
            if n > 1:  # the component holding the most probability
                mass = ndimage.sum(prob, components, range(1, n + 1))
                mask = components == 1 + int(np.argmax(mass))
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
            area = (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
            expected = 2.0 * float(prob[box].sum()) / (area + total)
            if expected > best:
                best = expected
                best_mask[:] = False
                best_mask[box] = True
        return best_mask

    def __call__(self, img):
        arr = convert_data_type(img, np.ndarray)[0]
        if arr.ndim != 3:
            raise ValueError(f"expected a channel-first 2D probability map (C, H, W), got shape {arr.shape}.")
        out = np.stack([self.box(channel.astype(np.float32)) for channel in arr])
        return convert_to_dst_type(out, dst=img, dtype=arr.dtype)[0]


class ExpectedDiceBoxd(MapTransform):
    """Dictionary version of :class:`ExpectedDiceBox`."""

    def __init__(
        self,
        keys: KeysCollection,
        threshold: float = 0.5,
        levels: Sequence[float] = tuple(np.linspace(0.1, 0.9, 17)),
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = ExpectedDiceBox(threshold, levels)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key])
        return d


class PresenceGate(Transform):
    """Decides, per slice, whether there is tumour at all, before any pixel is thresholded.

    A slice is declared tumour-free (its probability map set to 0) when

    - its image has almost no foreground: fewer than ``min_foreground`` of its pixels reach
      ``foreground_level`` of the image's maximum (a black, constant or nearly empty slice: no
      head, nothing to segment); or
    - its peak tumour probability is below ``min_peak`` (the network's own presence decision,
      calibrated on healthy and tumour slices: ``docs/README.md``); or
    - ``classifier`` is given and says no: the learned decision of
      :class:`tumorseg.postprocessing.presence.PresenceClassifier` (a JSON file), on the map's shape.

    Otherwise the probability map passes unchanged, so the box fit or the threshold that follows
    works as before on tumour slices.

    Args:
        min_peak: peak probability a slice needs to hold tumour, in (0, 1].
        min_foreground: fraction of the slice that must be foreground, in [0, 1).
        foreground_level: intensity, relative to the image's maximum, counted as foreground.
        classifier: path of a presence classifier's JSON, or None for the peak rule alone.

    Input: probability map (C, H, W) and the image (C', H', W'), numpy or torch; the image may
    have another size (only its foreground fraction is used). Output: the map, same type.
    """

    def __init__(
        self, min_peak: float = 0.5, min_foreground: float = 0.02, foreground_level: float = 0.1, classifier: str | None = None
    ) -> None:
        if not 0.0 < min_peak <= 1.0:
            raise ValueError(f"min_peak must be in (0, 1], got {min_peak}.")
        if not 0.0 <= min_foreground < 1.0:
            raise ValueError(f"min_foreground must be in [0, 1), got {min_foreground}.")
        if not 0.0 <= foreground_level < 1.0:
            raise ValueError(f"foreground_level must be in [0, 1), got {foreground_level}.")
        self.min_peak, self.min_foreground, self.foreground_level = (
            float(min_peak),
            float(min_foreground),
            float(foreground_level),
        )
        self.classifier = None
        if classifier:
            from tumorseg.postprocessing.presence import PresenceClassifier

            self.classifier = PresenceClassifier.load(classifier)

    def foreground_fraction(self, image) -> float:
        arr = convert_data_type(image, np.ndarray)[0].astype(np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        if not hi > lo:  # constant (or all-NaN) image: no structure at all
            return 0.0
        return float(((arr - lo) > self.foreground_level * (hi - lo)).mean())

    def present(self, prob, image=None) -> bool:
        if image is not None and self.foreground_fraction(image) < self.min_foreground:
            return False
        arr = convert_data_type(prob, np.ndarray)[0]
        if float(arr.max()) < self.min_peak:
            return False
        return self.classifier is None or self.classifier.present(arr)

    def __call__(self, prob, image=None):
        return prob if self.present(prob, image) else prob * 0


class PresenceGated(MapTransform):
    """Dictionary version of :class:`PresenceGate`: gates ``keys`` (probabilities) by
    ``image_key`` (the network's input image)."""

    def __init__(
        self,
        keys: KeysCollection,
        image_key: str = "image",
        min_peak: float = 0.5,
        min_foreground: float = 0.02,
        foreground_level: float = 0.1,
        classifier: str | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key
        self.gate = PresenceGate(min_peak, min_foreground, foreground_level, classifier)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.gate(d[key], d.get(self.image_key))
        return d
