"""The bundle's model applied to slices and volumes: network, weights, and the one preprocessing
and post-processing definition of the bundle config (``slice_preprocessing`` and
``postprocessing`` in ``train.yaml``, the inferer of ``inference.yaml``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .bundle import BUNDLE
from .reading import InputError


def load_weights(network, checkpoint: Path, device) -> None:
    """Load a state dict into ``network`` with ``weights_only=True`` (a pickle that is not plain
    weights is refused, never executed); accepts a training checkpoint ``{"model": state}``.
    Raises :class:`InputError` naming the file and the problem."""
    import torch

    try:
        state = torch.load(checkpoint, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise InputError(f"{checkpoint}: no model weights (train first, or give --checkpoint)") from None
    except Exception as e:
        raise InputError(f"{checkpoint}: not loadable as weights ({e.__class__.__name__})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise InputError(f"{checkpoint}: not a state dict of the network")
    try:
        network.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0][:200]
        raise InputError(f"{checkpoint}: weights of another network ({first})") from None


def drop_short_tumours(mask, min_run: int):
    """``mask`` (x, y, slices) without the flagged regions that look like no 3D object.

    A tumour shows on neighbouring slices at the same place. A connected region of the stacked
    slice masks (``scipy.ndimage.label``, face connectivity: in-plane overlap from one slice to
    the next) is kept if it spans at least ``min_run`` slices, or if its slices lie in a run of
    more than ``min_run`` consecutive flagged slices (a tumour whose box shifts from slice to
    slice, or a stack of unrelated tumour slices); anything else (a lone flagged slice, boxes
    that jump around on a few slices) is cleared. Stacks of fewer than three slices have no 3D
    context and are left as they are."""
    import numpy as np
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    if min_run <= 1 or mask.shape[-1] < 3 or not mask.any():
        return mask
    flagged = mask.reshape(-1, mask.shape[-1]).any(0)
    in_long_run = np.zeros_like(flagged)
    start = None
    for k, f in enumerate([*flagged, False]):
        if f and start is None:
            start = k
        elif not f and start is not None:
            in_long_run[start:k] = k - start > min_run
            start = None
    labels, n = ndimage.label(mask)
    keep = np.zeros(n + 1, dtype=bool)
    for index, region in enumerate(ndimage.find_objects(labels), start=1):
        span = region[-1]
        keep[index] = span.stop - span.start >= min_run or in_long_run[span].all()
    return keep[labels]


class Predictor:
    """The bundle's network, weights and inference settings, applied to batches of slices.

    Args:
        bundle: the bundle folder (configs/train.yaml and configs/inference.yaml are read).
        checkpoint: weights (a state dict); default the bundle's models/model.pt.
        overrides: config overrides (e.g. ``{"image_size": 128}``).
        tta: average the probabilities of the slice and its flips (None: the config's ``tta``).
        box_fit: predict one rectangle per slice (None: the config's ``box_fit``).
        batch_size: slices of a volume run through the network together.
    """

    def __init__(
        self,
        bundle: Path = BUNDLE,
        checkpoint: Path | None = None,
        overrides: dict | None = None,
        tta: bool | None = None,
        box_fit: bool | None = None,
        batch_size: int = 8,
    ):
        import torch
        from monai.transforms import Compose

        from .bundle import inference_parser
        from .transforms import PresenceGate

        overrides = dict(overrides or {})
        for key, value in (("tta", tta), ("box_fit", box_fit)):
            if value is not None:
                overrides[key] = value
        parser = inference_parser(bundle, overrides)
        try:
            self.image_size = int(parser.get_parsed_content("image_size"))
            self.threshold = float(parser.get_parsed_content("threshold"))
            self.min_run = int(parser.get_parsed_content("min_run"))
            self.inferer = parser.get_parsed_content("infer#inferer")  # FlipTTAInferer around the sliding window
            self.tta = bool(parser.get_parsed_content("tta_enabled"))
            self.box_fit = bool(parser.get_parsed_content("box_fit_enabled"))
            self.preprocess = Compose(parser.get_parsed_content("slice_preprocessing"))
            self.postprocess = parser.get_parsed_content("postprocessing")
            self.gate = PresenceGate(
                float(parser.get_parsed_content("min_peak")), float(parser.get_parsed_content("min_foreground"))
            )
            self.network_def = parser.get_parsed_content("network_def")
        except (ValueError, TypeError) as e:
            raise InputError(f"bundle config: {e.__class__.__name__}: {str(e).splitlines()[0][:200]}") from None
        self.image_key, self.pred_key = parser.get_parsed_content("image_key"), parser.get_parsed_content("pred_key")
        self.checkpoint = Path(checkpoint or parser.get_parsed_content("checkpoint"))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.network = self.network_def.to(self.device).eval()
        load_weights(self.network, self.checkpoint, self.device)
        self.batch_size = batch_size

    def _batch(self, slices: list[np.ndarray]) -> tuple[list[np.ndarray], list[float]]:
        """Masks (each at its slice's size) and peak probabilities of same-shape (x, y) slices."""
        import torch
        from monai.transforms import Resize

        items = [self.preprocess({self.image_key: torch.as_tensor(s, dtype=torch.float32)[None]}) for s in slices]
        batch = torch.stack([torch.as_tensor(d[self.image_key]) for d in items]).to(self.device)
        with torch.no_grad():
            logits = self.inferer(batch, self.network).float().cpu()
        back = Resize(spatial_size=tuple(slices[0].shape), mode="nearest")
        masks, peaks = [], []
        for d, logit in zip(items, logits):
            peaks.append(float(torch.sigmoid(logit).max()))
            out = self.postprocess({self.image_key: torch.as_tensor(d[self.image_key]), self.pred_key: logit})
            masks.append(np.asarray(back(torch.as_tensor(out[self.pred_key]).float()))[0] > 0.5)
        return masks, peaks

    def predict_volume(self, volume, axis: int = -1, reference: tuple[float, float] | None = None):
        """Mask and per-slice peak probabilities of a 2D slice, or of a 3D volume slice by slice
        along ``axis``. Slices with too little foreground (relative to ``reference``, the case's
        intensity range; default the volume's) are not run through the network; in a volume,
        tumours spanning fewer than ``min_run`` slices are cleared (config ``min_run``,
        :func:`drop_short_tumours`)."""
        volume = np.asarray(volume, dtype=np.float32)
        if not np.isfinite(volume).all():
            raise InputError("contains NaN or infinite values")
        lo, hi = reference or (float(volume.min()), float(volume.max()))
        if volume.ndim == 2:
            masks, peaks = self.predict_slices([volume], (lo, hi))
            return masks[0], peaks
        moved = np.moveaxis(volume, axis, -1)
        masks, peaks = self.predict_slices([moved[..., k] for k in range(moved.shape[-1])], (lo, hi))
        stacked = drop_short_tumours(np.stack(masks, axis=-1), self.min_run)
        return np.moveaxis(stacked, -1, axis), peaks

    def predict_slices(self, slices: list[np.ndarray], reference: tuple[float, float]):
        """Masks and peaks of (x, y) slices of one shape; skipped slices: empty mask, peak 0."""
        lo, hi = reference
        masks = [np.zeros(s.shape, dtype=bool) for s in slices]
        peaks = [0.0] * len(slices)
        if not hi > lo:  # a constant case: nothing to see
            return masks, peaks
        keep = [
            k
            for k, s in enumerate(slices)
            if float(((s - lo) > self.gate.foreground_level * (hi - lo)).mean()) >= self.gate.min_foreground
        ]
        for start in range(0, len(keep), self.batch_size):
            ks = keep[start : start + self.batch_size]
            got, top = self._batch([slices[k] for k in ks])
            for k, m, p in zip(ks, got, top):
                masks[k], peaks[k] = m, p
        return masks, peaks
