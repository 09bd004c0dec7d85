"""A learned slice-level presence decision: tumour or not, from the first stage's probability map.

The peak-probability gate (:class:`tumorseg.postprocessing.transforms.PresenceGate`, ``min_peak``) asks one
number of the map. This classifier asks several, each about the shape of what the network drew,
never about the image itself (so it cannot learn a collection's look, only the network's
behaviour on it):

=================  =================================================================================
``peak``           the highest probability
``box_dice``       the expected Dice of the best rectangle (:class:`ExpectedDiceBox`'s score):
                   how box-like and how confident the most probable region is
``fill``           share of that rectangle's pixels above 0.5: tumour boxes are filled, a false
                   positive on a ventricle or gyrus is a thin or ragged shape
``mass_in_top``    share of the map's probability mass inside the top component (p > 0.5)
``log_area``       log of the share of the slice above 0.5
``components``     log(1 + number of components above 0.5)
``mean_in_top``    mean probability inside the top component
=================  =================================================================================

A logistic regression on the standardised features (L2-penalised, Newton's method)::

    P(tumour | x) = sigmoid(w . (x - mu) / sigma + b)

A slice holds tumour when ``P >= threshold``; ``threshold`` is chosen on slices the network and
the regression never saw (``experiments.presence``). Stored as JSON beside the weights
(``models/presence.json``), a few hundred bytes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

FEATURES = ("peak", "box_dice", "fill", "mass_in_top", "log_area", "components", "mean_in_top")


def presence_features(prob) -> np.ndarray:
    """The :data:`FEATURES` of one probability map, ``(H, W)`` or ``(1, H, W)``, in [0, 1]."""
    from scipy import ndimage

    p = np.asarray(prob, dtype=np.float32).reshape(np.shape(prob)[-2:])
    peak = float(p.max()) if p.size else 0.0
    above = p > 0.5
    labels, n = ndimage.label(above)
    total = float(p.sum())
    if n == 0:
        return np.array([peak, 0.0, 0.0, 0.0, np.log(1.0 / p.size), 0.0, 0.0], dtype=np.float64)
    mass = ndimage.sum(p, labels, range(1, n + 1))
    top = labels == 1 + int(np.argmax(mass))
    rows, cols = np.flatnonzero(top.any(1)), np.flatnonzero(top.any(0))
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    box_area = float((rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1))
    return np.array(
        [
            peak,
            2.0 * float(p[box].sum()) / (box_area + total),
            float(above[box].mean()),
            float(p[top].sum()) / max(total, 1e-6),
            float(np.log(max(above.mean(), 1.0 / p.size))),
            float(np.log1p(n)),
            float(p[top].mean()),
        ],
        dtype=np.float64,
    )


@dataclass
class PresenceClassifier:
    """Logistic regression over :data:`FEATURES` (see the module's docstring).

    Args:
        mean, scale: the standardisation of each feature.
        coef, intercept: the regression.
        threshold: the probability from which a slice holds tumour, in (0, 1).
    """

    mean: list[float]
    scale: list[float]
    coef: list[float]
    intercept: float
    threshold: float = 0.5
    features: list[str] = field(default_factory=lambda: list(FEATURES))
    note: str = ""

    def __post_init__(self) -> None:
        if list(self.features) != list(FEATURES):
            raise ValueError(f"presence classifier: features {self.features} are not this version's {list(FEATURES)}.")
        if not (len(self.mean) == len(self.scale) == len(self.coef) == len(FEATURES)):
            raise ValueError(f"presence classifier: expected {len(FEATURES)} values per field.")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"presence classifier: threshold must be in (0, 1), got {self.threshold}.")

    def probability(self, features: np.ndarray) -> np.ndarray:
        """P(tumour) of feature rows ``(N, F)`` (or one row ``(F,)``)."""
        x = (np.asarray(features, dtype=np.float64) - np.asarray(self.mean)) / np.asarray(self.scale)
        return 1.0 / (1.0 + np.exp(-(x @ np.asarray(self.coef) + self.intercept)))

    def present(self, prob) -> bool:
        return bool(self.probability(presence_features(prob)) >= self.threshold)

    @classmethod
    def fit(cls, features: np.ndarray, tumour: np.ndarray, l2: float = 1.0, note: str = "") -> PresenceClassifier:
        """Fit on feature rows ``(N, F)`` and slice labels ``(N,)`` (1 tumour, 0 none); classes are
        weighted to equal total weight, so a few hundred negatives count as much as the tumours."""
        x = np.asarray(features, dtype=np.float64)
        y = np.asarray(tumour, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != len(FEATURES) or len(x) != len(y):
            raise ValueError(f"expected features (N, {len(FEATURES)}) and N labels, got {x.shape} and {y.shape}.")
        if not (0 < y.sum() < len(y)):
            raise ValueError("need slices of both kinds, with and without tumour.")
        mean, scale = x.mean(0), x.std(0) + 1e-6
        z = np.hstack([(x - mean) / scale, np.ones((len(x), 1))])
        weight = np.where(y > 0, 0.5 / y.sum(), 0.5 / (len(y) - y.sum())) * len(y)
        beta = np.zeros(z.shape[1])
        penalty = np.diag([l2] * len(FEATURES) + [0.0])  # the intercept is not penalised
        for _ in range(50):  # Newton / IRLS: converges in a handful of steps
            p = 1.0 / (1.0 + np.exp(-z @ beta))
            gradient = z.T @ (weight * (p - y)) + penalty @ beta
            hessian = (z * (weight * p * (1 - p))[:, None]).T @ z + penalty
            step = np.linalg.solve(hessian, gradient)
            beta -= step
            if np.abs(step).max() < 1e-8:
                break
        return cls(mean.tolist(), scale.tolist(), beta[:-1].tolist(), float(beta[-1]), note=note)

    def save(self, path: Path | str) -> None:
        from tumorseg.io.files import write_atomic

        write_atomic(Path(path), (json.dumps(asdict(self), indent=1) + "\n").encode())

    @classmethod
    def load(cls, path: Path | str) -> PresenceClassifier:
        from tumorseg.io.reading import InputError

        try:
            return cls(**json.loads(Path(path).read_text()))
        except (OSError, ValueError, TypeError) as e:
            raise InputError(f"{path}: not a presence classifier ({e})") from None
