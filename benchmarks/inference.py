"""Inference speed of tumorseg-predict's path: one 256x256 slice and the 197x233x189 MNI152
volume, with and without flip TTA, on this machine's device.

    python benchmarks/inference.py --checkpoint bundles/brain_tumor_mri_seg/models/model.pt

Speed, not correctness: the weights only need to match the bundle's network.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch


def timed(fn, repeat: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    from tumorseg.predict import Predictor

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    import nilearn.datasets

    volume = np.asarray(nilearn.datasets.load_mni152_template(resolution=1).dataobj, dtype=np.float32)
    slice_ = np.random.default_rng(0).random((256, 256), dtype=np.float32)
    print(f"device: {'cuda' if torch.cuda.is_available() else 'cpu'}, torch threads: {torch.get_num_threads()}")
    print(f"{'case':34s} {'TTA':>4s} {'seconds':>9s}")
    for tta in (False, True):
        predictor = Predictor(checkpoint=args.checkpoint, tta=tta)
        t = timed(lambda: predictor.predict_volume(slice_), args.repeat)
        print(f"{'one 256x256 slice':34s} {'on' if tta else 'off':>4s} {t:9.4f}")
        t = timed(lambda: predictor.predict_volume(volume, axis=2), 1)
        print(f"{'MNI152 197x233x189 (189 slices)':34s} {'on' if tta else 'off':>4s} {t:9.2f}")


if __name__ == "__main__":
    main()
