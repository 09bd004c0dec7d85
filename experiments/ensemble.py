"""Pack independently trained weights into the one state dict of a mean ensemble.

    python -m experiments.ensemble A.pt B.pt C.pt -o ensemble.pt

Each input is a state dict of the bundle's network or a training checkpoint ``{"model": state}``
(loaded with ``weights_only=True``). The output holds member ``m``'s parameters as
``members.m.*``: the state dict of ``experiments.components.MeanEnsemble`` built by
``configs/experiments/ensemble.yaml`` (its ``ensemble_size`` must equal the number of inputs).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def pack(paths: list[Path]) -> dict:
    from experiments.average_weights import load_states  # beside this script: one reader, one same-network check

    return {f"members.{m}.{k}": v for m, state in enumerate(load_states(paths)) for k, v in state.items()}


def main() -> None:
    import io

    import torch

    from tumorseg.io.files import write_atomic

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("weights", nargs="+", type=Path)
    ap.add_argument("-o", "--output", type=Path, required=True)
    args = ap.parse_args()
    if args.output.exists():  # never over a file this command did not write
        raise SystemExit(f"error: {args.output}: exists; give another output name")
    buffer = io.BytesIO()
    torch.save(pack(args.weights), buffer)
    write_atomic(args.output, buffer.getvalue())
    print(f"wrote {args.output}: a mean ensemble of {len(args.weights)} networks")


if __name__ == "__main__":
    main()
