"""Inference speed of tumorseg-predict's path: one 256x256 slice and the 197x233x189 MNI152
volume, with and without flip TTA, the network in eager PyTorch and in ONNX Runtime (the default
on CPU), on this machine's device.

    python benchmarks/inference.py --checkpoint bundles/brain_tumor_mri_seg/models/model.pt

Speed, not correctness: the weights only need to match the bundle's network. ``inference_rows``
(sliding window against a plain forward, and a random volume's latency) is used by run_all.py.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch


def inference_rows(checkpoint: Path, image_size: int, repeat: int, min_seconds: float, volume_shape=(197, 233, 189)) -> list:
    """Slices/s of the SlidingWindowInferer configured in inference.yaml against a bare forward
    of the same network on the same image_size square slice; the configured inferer as a whole
    (flip TTA around the window, when inference.yaml enables it); and the latency of a random
    volume through tumorseg-predict's whole path (zoom, inferer, threshold, zoom back)."""
    from common import Row, seconds_per_call

    from tumorseg.predictor import Predictor

    predictor = Predictor.from_bundle(checkpoint=checkpoint, overrides={"image_size": image_size})
    device, network, configured = predictor.device, predictor.network, predictor.inferer
    window = getattr(configured, "inferer", configured)  # the SlidingWindowInferer inside FlipTTAInferer
    slice_ = torch.rand(1, 1, image_size, image_size, device=device)

    def per_s(fn):
        with torch.no_grad():
            return 1 / seconds_per_call(fn, device, min_calls=repeat, min_seconds=min_seconds)

    forward = per_s(lambda: network(slice_))
    sliding = per_s(lambda: window(slice_, network))
    rows = [
        Row("inference", f"plain forward, 1 slice {image_size}x{image_size}", forward, "slices/s", 1.0, "no_grad, fp32"),
        Row(
            "inference",
            "SlidingWindowInferer (inference.yaml)",
            sliding,
            "slices/s",
            sliding / forward,
            f"÷ plain forward; roi {getattr(window, 'roi_size', '?')}, overlap {getattr(window, 'overlap', '?')}, "
            f"sw_batch {getattr(window, 'sw_batch_size', '?')}",
        ),
    ]
    if configured is not window and predictor.tta:
        whole = per_s(lambda: configured(slice_, network))
        rows.append(
            Row(
                "inference",
                "configured inferer: flip TTA + sliding window",
                whole,
                "slices/s",
                whole / forward,
                f"÷ plain forward; {len(configured.flips)} views (inference.yaml tta: true)",
            )
        )
    volume = np.random.default_rng(0).random(volume_shape, dtype=np.float32)
    predictor.predict_volume(volume[..., :2])  # warm-up
    start = time.perf_counter()
    predictor.predict_volume(volume, axis=2)
    seconds = time.perf_counter() - start
    rows.append(
        Row(
            "inference",
            f"random volume {'x'.join(map(str, volume_shape))}, tumorseg-predict",
            seconds,
            "s / volume",
            None,
            f"{volume_shape[-1] / seconds:.1f} slices/s; TTA {'on' if predictor.tta else 'off'}, "
            f"box fit {'on' if predictor.box_fit else 'off'} (config defaults)",
        )
    )
    return rows


def main() -> None:
    from common import seconds_per_call

    from tumorseg.predictor import Predictor

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    import nilearn.datasets

    volume = np.asarray(nilearn.datasets.load_mni152_template(resolution=1).dataobj, dtype=np.float32)
    slice_ = np.random.default_rng(0).random((256, 256), dtype=np.float32)
    print(f"device: {'cuda' if torch.cuda.is_available() else 'cpu'}, torch threads: {torch.get_num_threads()}")
    runtimes = ("torch", "onnx") if not torch.cuda.is_available() else ("torch",)
    print(f"{'case':34s} {'runtime':>8s} {'TTA':>4s} {'seconds':>9s}")
    for runtime in runtimes:
        for tta in (False, True):
            predictor = Predictor.from_bundle(checkpoint=args.checkpoint, tta=tta, overrides={"runtime": runtime})
            t = seconds_per_call(
                lambda predictor=predictor: predictor.predict_volume(slice_), predictor.device, warmup=1, min_calls=args.repeat
            )
            print(f"{'one 256x256 slice':34s} {runtime:>8s} {'on' if tta else 'off':>4s} {t:9.4f}")
            t = seconds_per_call(
                lambda predictor=predictor: predictor.predict_volume(volume, axis=2), predictor.device, warmup=1, min_calls=1
            )
            print(f"{'MNI152 197x233x189 (189 slices)':34s} {runtime:>8s} {'on' if tta else 'off':>4s} {t:9.2f}")


if __name__ == "__main__":
    main()
