"""Per-image tumour Dice of weights on `valid` as stored and turned a quarter (image and box alike).

    python -m experiments.quarter_turns --dataset_dir runs/kaggle-full [--checkpoint a.pt b.pt] [--output rows.jsonl]

The Kaggle slices come in every quarter turn, and PNG/JPG slices are predicted as they come, so a
model should not depend on how a slice is turned. Each slice of the ``validation`` list is
predicted upright and turned by 90 degrees (``numpy.rot90``, its box turned with it) through
``tumorseg.inference.predictor.Predictor`` at the inference defaults (flip TTA, box fit, presence gate), and
scored at its own size. One JSON row per checkpoint and turn: Dice and slice sensitivity.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "brain_tumor_mri_seg"


def measure(dataset_dir: Path, checkpoint: Path, limit: int | None = None) -> list[dict]:
    from monai.data import load_decathlon_datalist

    from experiments.presence import slice_records  # experiments/presence.py: the same per-slice Dice
    from tumorseg.inference.predictor import Predictor

    items = load_decathlon_datalist(dataset_dir / "datalist.json", data_list_key="validation", base_dir=dataset_dir)[:limit]
    predictor = Predictor.from_bundle(BUNDLE, checkpoint, {"runtime": "torch"}, tta=True, box_fit=True)
    rows = []
    for turns in (0, 1):
        slices = slice_records(predictor, items, quarter_turns=turns)
        rows.append({"checkpoint": str(checkpoint), "quarter_turns": turns, "slices": len(slices),
                     "dice": float(np.mean([r["dice_if_kept"] for r in slices])),
                     "slice_sensitivity": float(np.mean([r["found"] for r in slices]))})  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset_dir", type=Path, required=True, help="tumorseg-convert output")
    ap.add_argument("--checkpoint", type=Path, nargs="+", default=[BUNDLE / "models" / "model.pt"])
    ap.add_argument("--limit", type=int, help="only the first N slices (a quick look)")
    ap.add_argument("--output", type=Path, help="also write the rows to this JSON-lines file (at the end, atomically)")
    args = ap.parse_args()
    lines = []
    for checkpoint in args.checkpoint:
        for row in measure(args.dataset_dir, checkpoint, args.limit):
            lines.append(json.dumps(row))
            print(lines[-1], flush=True)
    if args.output:
        from tumorseg.io.files import write_atomic

        write_atomic(args.output, "".join(line + "\n" for line in lines).encode())


if __name__ == "__main__":
    main()
