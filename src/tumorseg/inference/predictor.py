"""The bundle's model applied to slices and volumes: network, weights, and the one preprocessing
and post-processing definition of the bundle config (``slice_preprocessing`` and
``postprocessing`` in ``common.yaml``, the ``inferer`` of ``inference.yaml``), assembled by the
``predictor`` of ``inference.yaml``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tumorseg.bundle import BUNDLE
from tumorseg.io.reading import InputError
from tumorseg.postprocessing.volume import drop_short_tumours


def read_state(checkpoint: Path, device="cpu") -> dict:
    """The state dict in ``checkpoint``, loaded with ``weights_only=True`` (a pickle that is not
    plain weights is refused, never executed); a training checkpoint ``{"model": state}`` gives
    its model. Raises :class:`InputError` naming the file and the problem."""
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
    return state


def load_weights(network, checkpoint: Path, device) -> None:
    """Load the weights of ``checkpoint`` (:func:`read_state`) into ``network``. Raises
    :class:`InputError` naming the file and the problem."""
    state = read_state(checkpoint, device)
    try:
        network.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0][:200]
        raise InputError(f"{checkpoint}: weights of another network ({first})") from None


def checked_checkpoint(checkpoint: str | Path, network) -> str:
    """``checkpoint``, once its weights load into a copy of ``network`` (a bundle workflow's
    ``CheckpointLoader`` reads it next): truncated, text, pickled code or another network's
    weights are refused before the engine starts. Raises :class:`InputError`."""
    import copy

    load_weights(copy.deepcopy(network).cpu(), Path(checkpoint), "cpu")
    return str(checkpoint)


class Predictor:
    """The bundle's network, weights and inference settings, applied to batches of slices.

    The bundle's ``inference.yaml`` assembles it (id ``predictor``) from the one definition of each
    part in ``common.yaml``; :meth:`from_bundle` reads it from there, so that ``tumorseg-predict``
    and the bundle's own inference predict with the same object.

    Args:
        network: the network (its weights are loaded from ``checkpoint``).
        checkpoint: weights (a state dict, or a training checkpoint ``{"model": state dict}``).
        preprocessing: dict transform taking ``{image_key: (1, x, y) slice}`` to the network's input.
        inferer: called as ``inferer(batch, network)``; logits of shape (N, 1, H, W).
        postprocessing: dict transform from ``{image_key, pred_key: logits}`` to a 0/1 mask.
        min_peak, min_foreground: the presence gate's settings (slices with too little foreground
            are not run at all).
        min_run: volumes: tumours spanning fewer slices are cleared (:func:`~tumorseg.postprocessing.volume.drop_short_tumours`).
        threshold, tta, box_fit, refine: recorded in each case's summary (``refine``: the box fit's
            boxes refined by the second stage, a step of ``postprocessing``).
        batch_size: slices of a volume run through the network together.
        image_size: the network's input size (the preprocessing and inferer use it).
        runtime: ``"onnx"``: the network runs in ONNX Runtime (:mod:`tumorseg.inference.onnx_runtime`),
            ``"torch"``: eager PyTorch, ``"auto"``: ONNX Runtime on a CPU where it is installed.
    """

    def __init__(
        self,
        network,
        checkpoint,
        preprocessing,
        inferer,
        postprocessing,
        min_peak: float = 0.5,
        min_foreground: float = 0.02,
        min_run: int = 2,
        threshold: float = 0.5,
        tta: bool = False,
        box_fit: bool = False,
        refine: bool = False,
        image_key: str = "image",
        pred_key: str = "pred",
        batch_size: int = 8,
        image_size: int | None = None,
        runtime: str = "torch",
    ):
        from tumorseg.postprocessing.transforms import PresenceGate

        settings = {"image_size": image_size, "min_peak": min_peak, "min_foreground": min_foreground, "min_run": min_run}
        for name, value in settings.items():
            if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0):
                raise InputError(f"bundle config: {name} must be a non-negative number, not {value!r}")

        self.preprocess, self.inferer, self.postprocess = preprocessing, inferer, postprocessing
        self.gate = PresenceGate(float(min_peak), float(min_foreground))
        self.min_run, self.threshold = int(min_run), float(threshold)
        self.tta, self.box_fit, self.refine = bool(tta), bool(box_fit), bool(refine)
        self.image_key, self.pred_key = image_key, pred_key
        self.checkpoint = Path(checkpoint)
        self.device = next(network.parameters()).device
        self.network = network.eval()
        load_weights(self.network, self.checkpoint, self.device)
        self.batch_size = batch_size
        from tumorseg.inference import onnx_runtime

        try:
            runtime = onnx_runtime.resolve(runtime, self.device)
        except ValueError as e:
            raise InputError(f"bundle config: {e}") from None
        if runtime == "onnx":
            from tumorseg.inference.onnx_runtime import OnnxNetwork

            if image_size is None:
                raise InputError("bundle config: the ONNX runtime needs the network's image_size")
            self.network = OnnxNetwork(self.network, int(image_size))
        self.runtime = runtime

    @classmethod
    def from_bundle(
        cls,
        bundle: Path = BUNDLE,
        checkpoint: Path | None = None,
        overrides: dict | None = None,
        tta: bool | None = None,
        box_fit: bool | None = None,
        refine: bool | None = None,
    ) -> Predictor:
        """The ``predictor`` of the bundle's inference config (``common.yaml`` + ``inference.yaml``),
        with config ``overrides`` (e.g. ``{"image_size": 128}``); ``tta``/``box_fit``/``refine`` None keep
        the config's. Raises :class:`InputError` for a config or weights that do not build."""
        from tumorseg.bundle import inference_parser

        overrides = dict(overrides or {})
        for key, value in (("tta", tta), ("box_fit", box_fit), ("refine", refine), ("checkpoint", checkpoint)):
            if value is not None:
                overrides[key] = str(value) if isinstance(value, Path) else value
        parser = inference_parser(bundle, overrides)
        try:
            return parser.get_parsed_content("predictor")
        except RuntimeError as e:  # MONAI wraps what the component raised
            chain, cause = [], e.__cause__ or e.__context__
            while cause is not None:
                chain.append(cause)
                cause = cause.__cause__ or cause.__context__
            ours = [c for c in chain if isinstance(c, InputError)]
            if ours:
                raise InputError(str(ours[0])) from None
            if chain and isinstance(chain[-1], ValueError):  # a component's argument check
                raise InputError(f"bundle config: {chain[-1]}") from None
            raise InputError(f"bundle config: {e.__class__.__name__}: {str(e).splitlines()[0][:200]}") from None
        except (ValueError, TypeError, KeyError) as e:
            raise InputError(f"bundle config: {e.__class__.__name__}: {str(e).splitlines()[0][:200]}") from None

    def _logits(self, slices: list[np.ndarray]) -> tuple[list[dict], Any]:
        """The preprocessed items and the network's logits (N, 1, H, W) of same-shape (x, y) slices."""
        import torch

        items = [self.preprocess({self.image_key: torch.as_tensor(s, dtype=torch.float32)[None]}) for s in slices]
        batch = torch.stack([torch.as_tensor(d[self.image_key]) for d in items]).to(self.device)
        with torch.no_grad():
            return items, self.inferer(batch, self.network).float().cpu()

    def _batch(self, slices: list[np.ndarray]) -> tuple[list[np.ndarray], list[float]]:
        """Masks (each at its slice's size) and peak probabilities of same-shape (x, y) slices."""
        import torch
        from monai.transforms import Resize

        items, logits = self._logits(slices)
        back = Resize(spatial_size=tuple(slices[0].shape), mode="nearest")
        masks, peaks = [], []
        for d, logit in zip(items, logits):
            peaks.append(float(torch.sigmoid(logit).max()))
            out = self.postprocess({self.image_key: torch.as_tensor(d[self.image_key]), self.pred_key: logit})
            masks.append(np.asarray(back(torch.as_tensor(out[self.pred_key]).float()))[0] > 0.5)
        return masks, peaks

    def probability_maps(self, slices: list[np.ndarray]) -> list[np.ndarray]:
        """The network's tumour probability (sigmoid, after the inferer's TTA) of (x, y) slices
        of one shape, at the network's resolution, before any post-processing: what the presence
        decision and the box fit read."""
        import torch

        _, logits = self._logits(slices)
        return [torch.sigmoid(logit).numpy()[0] for logit in logits]

    def predict_volume(self, volume, axis: int = -1, reference: tuple[float, float] | None = None):
        """Mask and per-slice peak probabilities of a 2D slice, or of a 3D volume slice by slice
        along ``axis``. Slices with too little foreground (relative to ``reference``, the case's
        intensity range; default the volume's) are not run through the network; in a volume,
        tumours spanning fewer than ``min_run`` slices are cleared (config ``min_run``,
        :func:`~tumorseg.postprocessing.volume.drop_short_tumours`)."""
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
