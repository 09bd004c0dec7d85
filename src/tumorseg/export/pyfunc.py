"""The bundle as an MLflow pyfunc model: grey slices in, tumour masks out.

Logged from code (MLflow's "models from code", :func:`tumorseg.tracking.tracker.log_bundle_model`): MLflow
keeps this file with the model, whose artifact ``bundle`` is a copy of the bundle (configs, docs,
the run's weights as ``models/model.pt``; the code is the ``tumorseg`` package, a wheel among the
model's pip requirements) and whose ``model_config``
holds the run's network and post-processing settings (config overrides).

``predict`` takes a float array ``(N, 1, H, W)``: N grey slices as images are read (rows,
columns), any N, H, W and intensity range. It returns uint8 masks ``(N, 1, H, W)``, 0 background,
1 tumour. Each slice goes through the bundle's ``predictor`` (``inference.yaml``: the one
preprocessing, sliding windows of the training size, flip TTA, presence gate, box fit), so a mask
equals the bundle's inference on the same slice saved as a PNG.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import mlflow.pyfunc
import numpy as np


class BundleSegmenter(mlflow.pyfunc.PythonModel):  # type: ignore[name-defined]  # mlflow exports it lazily
    def load_context(self, context):
        from tumorseg.inference.predictor import Predictor  # the installed package (the model's pip requirements)

        bundle = Path(context.artifacts["bundle"]).resolve()
        self.predictor = Predictor.from_bundle(bundle, overrides=dict(context.model_config or {}))

    def predict(self, context, model_input, params=None):
        if isinstance(model_input, dict) and len(model_input) == 1:  # a named tensor, as a serving request may send
            model_input = next(iter(model_input.values()))
        slices = np.asarray(model_input, dtype=np.float32)
        if slices.ndim != 4 or slices.shape[1] != 1:
            raise ValueError(f"expected slices of shape (N, 1, H, W), got {slices.shape}")
        masks = np.zeros(slices.shape, dtype=np.uint8)
        for i, image in enumerate(slices[:, 0]):
            # MONAI's image readers give (x, y) = (columns, rows): the network was trained that way round
            mask, _ = self.predictor.predict_volume(image.T)
            masks[i, 0] = mask.T
        return masks


mlflow.models.set_model(BundleSegmenter())
