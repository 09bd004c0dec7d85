"""Inference speed of tumorseg-predict's path: one 256x256 slice and the 197x233x189 MNI152
volume, with and without flip TTA, the network in eager PyTorch and in ONNX Runtime (the default
on CPU), on this machine's device; and the second stage's cost on the sample's tumour slices
(the healthy volume has no box to refine).

    python -m benchmarks.inference --checkpoint bundles/brain_tumor_mri_seg/models/model.pt

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
    from benchmarks.common import Row, seconds_per_call
    from tumorseg.inference.predictor import Predictor

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


def compute_limit(predictor, volume, matmul_size: int = 2048) -> tuple[int, float, float, str]:
    """What the volume costs at the very least on this machine: the network inputs it really
    runs (slices without foreground are skipped; flip TTA runs 4 views of each) times the
    forward FLOPs of one input (``FlopCounterMode`` on the eager network), over the FLOP/s of a
    large float32 matmul on this device (the best this machine does on dense arithmetic).
    ``predictor`` must run eager PyTorch (the FLOPs are counted on its network).
    Returns (inputs run, GFLOP per input, the limit in seconds, the input size)."""
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.common import seconds_per_call

    if predictor.runtime != "torch":
        raise ValueError("compute_limit counts FLOPs on an eager PyTorch predictor")
    eager = predictor
    inputs, shapes = [0], []

    def count(_module, args, _out):
        inputs[0] += args[0].shape[0]
        shapes.append(tuple(args[0].shape[1:]))

    hook = eager.network.register_forward_hook(count)
    with torch.no_grad():
        eager.predict_volume(volume, axis=2)
    hook.remove()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        eager.network(torch.zeros(1, *shapes[0], device=eager.device))
    per_input = counter.get_total_flops()
    a = torch.randn(matmul_size, matmul_size, device=eager.device)
    flops_per_s = 2 * matmul_size**3 / seconds_per_call(lambda: a @ a, eager.device, warmup=2, min_calls=5, min_seconds=1.0)
    return inputs[0], per_input / 1e9, inputs[0] * per_input / flops_per_s, "x".join(map(str, shapes[0][1:]))


def command_seconds(volume_path: Path, tta: bool, out: Path) -> float:
    """Wall time of the whole ``tumorseg-predict`` command on the volume file: start-up (imports,
    the bundle config, the weights, the cached ONNX graph), reading, predicting, writing."""
    import subprocess
    import sys

    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "tumorseg.inference.predict", str(volume_path), "-o", str(out), "--tta" if tta else "--no-tta"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - start


def main() -> None:
    import tempfile

    from benchmarks.common import seconds_per_call
    from tumorseg.inference.predictor import Predictor

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    import nilearn.datasets

    template = nilearn.datasets.load_mni152_template(resolution=1)
    volume = np.asarray(template.dataobj, dtype=np.float32)
    slice_ = np.random.default_rng(0).random((256, 256), dtype=np.float32)
    print(f"device: {'cuda' if torch.cuda.is_available() else 'cpu'}, torch threads: {torch.get_num_threads()}")
    runtimes = ("torch", "onnx") if not torch.cuda.is_available() else ("torch",)
    limits = {}

    def row(case: str, runtime: str, tta: bool, seconds: float) -> None:
        print(f"{case:34s} {runtime:>8s} {'on' if tta else 'off':>4s} {seconds:9.2f}  {seconds / limits[tta][2]:.2f}")

    print(f"{'case':34s} {'runtime':>8s} {'TTA':>4s} {'seconds':>9s}  ÷ compute limit")
    for runtime in runtimes:
        for tta in (False, True):
            predictor = Predictor.from_bundle(checkpoint=args.checkpoint, tta=tta, overrides={"runtime": runtime})
            if tta not in limits:  # runtimes[0] is torch: its network is the one to count FLOPs on
                limits[tta] = compute_limit(predictor, volume)
            t = seconds_per_call(
                lambda predictor=predictor: predictor.predict_volume(slice_), predictor.device, warmup=1, min_calls=args.repeat
            )
            print(f"{'one 256x256 slice':34s} {runtime:>8s} {'on' if tta else 'off':>4s} {t:9.4f}")
            t = seconds_per_call(
                lambda predictor=predictor: predictor.predict_volume(volume, axis=2), predictor.device, warmup=1, min_calls=1
            )
            row("MNI152 197x233x189 (189 slices)", runtime, tta, t)
    # the second stage runs only where the first put a box: the sample's tumour slices (640x640 JPG)
    from PIL import Image

    sample = Path(__file__).resolve().parents[1] / "data" / "brain-tumor-coco-sample" / "test"
    tumours = [np.asarray(Image.open(p).convert("L"), dtype=np.float32).T for p in sorted(sample.glob("*.jpg"))]
    print(f"\n{'case (TTA and box fit on)':34s} {'runtime':>8s} {'refine':>6s} {'s/slice':>9s}")
    for runtime in runtimes:
        for refine in (False, True):
            predictor = Predictor.from_bundle(checkpoint=args.checkpoint, tta=True, refine=refine, overrides={"runtime": runtime})

            def all_slices(predictor=predictor):
                return [predictor.predict_volume(s) for s in tumours]

            t = seconds_per_call(all_slices, predictor.device, warmup=1, min_calls=3) / len(tumours)
            case = f"{len(tumours)} sample tumour slices"
            print(f"{case:34s} {runtime:>8s} {'on' if refine else 'off':>6s} {t:9.4f}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mni152.nii.gz"
        template.to_filename(path)
        for tta in (False, True):
            t = command_seconds(path, tta, Path(tmp) / f"out_{tta}")
            row("tumorseg-predict mni152.nii.gz", "auto", tta, t)
    for tta, (inputs, gflop, limit, size) in limits.items():
        print(
            f"compute limit, TTA {'on' if tta else 'off'}: {inputs} network inputs ({size}) x {gflop:.2f} GFLOP "
            f"at this machine's float32 matmul rate = {limit:.2f} s"
        )


if __name__ == "__main__":
    main()
