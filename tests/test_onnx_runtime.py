"""The network in ONNX Runtime (the inference default on CPU) against eager PyTorch: the same
logits within 1e-4, the same masks, an export cached once per set of weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SAMPLE
from PIL import Image

from tumorseg.inference.predictor import Predictor
from tumorseg.io.reading import InputError


@pytest.fixture(scope="module")
def predictors(tmp_path_factory):
    import os

    os.environ["TUMORSEG_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        yield {runtime: Predictor.from_bundle(overrides={"runtime": runtime}) for runtime in ("torch", "onnx")}
    finally:
        os.environ.pop("TUMORSEG_CACHE")


def test_logits_equal_eager_within_1e4(predictors):
    eager, onnx = predictors["torch"], predictors["onnx"]
    assert (eager.runtime, onnx.runtime) == ("torch", "onnx")
    x = torch.rand(5, 1, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        difference = (eager.network(x) - onnx.network(x)).abs().max().item()
    assert difference < 1e-4
    with torch.no_grad():  # through the configured inferer too: sliding windows and flip TTA
        wide = torch.rand(2, 1, 256, 400, generator=torch.Generator().manual_seed(1))
        assert (eager.inferer(wide, eager.network) - onnx.inferer(wide, onnx.network)).abs().max().item() < 1e-4


def refiner_of(predictor):
    (refiner,) = [t for t in predictor.postprocess.transforms if type(t).__name__ == "BoxRefined"]
    return refiner


def test_masks_equal_eager_on_slices_and_a_volume(predictors):
    """Both stages: the second (the refiner) runs in the predictor's runtime too."""
    assert {runtime: refiner_of(p).runtime for runtime, p in predictors.items()} == {"torch": "torch", "onnx": "onnx"}
    slices = [np.asarray(Image.open(p).convert("L"), dtype=np.float32).T for p in sorted((SAMPLE / "test").glob("*.jpg"))[:4]]
    volume = np.stack(slices, axis=-1)
    masks = {runtime: p.predict_volume(volume)[0] for runtime, p in predictors.items()}
    assert masks["torch"].any() and np.array_equal(masks["torch"], masks["onnx"])
    for image in (slices[0], slices[1][:, 40:600]):  # a square and a wide slice
        assert np.array_equal(predictors["torch"].predict_volume(image)[0], predictors["onnx"].predict_volume(image)[0])


def test_the_export_is_cached_per_weights(predictors):
    path = predictors["onnx"].network.path
    before = path.stat().st_mtime_ns
    again = Predictor.from_bundle(overrides={"runtime": "onnx"})
    assert again.network.path == path and path.stat().st_mtime_ns == before  # loaded, not exported again
    other = Predictor.from_bundle(overrides={"runtime": "onnx", "image_size": 128})  # another graph
    assert other.network.path != path
    refiner = refiner_of(predictors["onnx"]).network.path  # the second stage's graph, one for both
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, other.network.path.name, refiner.name])


def test_an_unknown_runtime_is_one_clear_error():
    with pytest.raises(InputError, match="runtime must be auto, onnx or torch"):
        Predictor.from_bundle(overrides={"runtime": "tensorrt"})
