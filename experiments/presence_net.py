"""Screen a presence decision that sees the image: a small CNN on (slice, probability map).

    python -m experiments.presence_net --dataset_dir runs/kaggle-real --checkpoint <model.pt> --out runs/presence_net

The map comes from the frozen first stage (``Predictor.probability_maps``, TTA); the CNN
(``monai.networks.nets.Classifier``) reads both at 128 px and says tumour / no tumour. Trained on
``training`` (Kaggle tumour slices, every tumour-free item) plus half of ``other_tumours`` (by a
hash of each file: tumour slices of the healthy slices' own collections, so that the look of a
collection does not tell the answer), the threshold chosen on ``validation`` and
``healthy_select``; the other half of ``other_tumours`` and ``healthy_real`` are only reported.
With ``--paste P`` the CNN reads the slice alone, and a tumour-free training slice gets a Kaggle
tumour pasted in with probability P (``tumorseg.training.paste.PasteTumours``, labelled tumour).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "brain_tumor_mri_seg"
SIZE = 128


def other_part(path: str, share: float = 0.5) -> str:
    u = int(hashlib.md5(Path(path).read_bytes()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "train" if u < share else "heldout"


def to_frame(mode: str):
    """The CNN's frame: the longer side to SIZE (``mode``: the interpolation), padded square."""
    from monai.transforms import Compose, Resize, ResizeWithPadOrCrop

    return Compose([Resize(SIZE, size_mode="longest", mode=mode), ResizeWithPadOrCrop((SIZE, SIZE))])


def pairs(predictor, items: list[dict]) -> np.ndarray:
    """(N, 2, SIZE, SIZE) float16: the preprocessed slice and its probability map, padded square."""
    import torch

    from tumorseg.io.reading import read_slice

    out = np.zeros((len(items), 2, SIZE, SIZE), np.float16)
    frame = to_frame("area")
    for k, item in enumerate(items):
        image = read_slice(Path(item["image"]))
        pre, logits = predictor._logits([image])  # one network pass: the slice as fed and its logits
        prob = torch.sigmoid(logits[0][0]).float()
        x = torch.stack([torch.as_tensor(pre[0][predictor.image_key])[0], prob])
        out[k] = np.asarray(frame(x), np.float16)
        print(f"\r{k + 1}/{len(items)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return out


def label_boxes(items: list[dict]) -> np.ndarray:
    """(N, 1, SIZE, SIZE) uint8: each item's label in the frame of :func:`pairs` (zeros without one)."""
    import torch

    from tumorseg.io.reading import read_slice

    out = np.zeros((len(items), 1, SIZE, SIZE), np.uint8)
    frame = to_frame("nearest")
    for k, item in enumerate(items):
        if "label" in item:
            label = torch.as_tensor(read_slice(Path(item["label"])) > 0, dtype=torch.float32)[None]
            out[k] = np.asarray(frame(label) > 0.5, np.uint8)
    return out


def look_of_another_collection(image):
    """A batch of (N, 1, H, W) slices in [0, 1]-ish, each given another collection's look: a
    random gamma (0.5 to 2), inverted contrast for a quarter of them (a T2-like look), and for half
    of them a lower resolution (down to 0.35x, back up)."""
    import torch
    import torch.nn.functional as F

    n, size = len(image), image.shape[-1]
    x = image.clamp(0, 1)
    x = x ** torch.exp(torch.empty(n, 1, 1, 1).uniform_(-0.7, 0.7))
    inverted = torch.rand(n, 1, 1, 1) < 0.25
    x = torch.where(inverted, (1 - x) * (x > 0.05), x)  # the background stays dark
    if torch.rand(1) < 0.5:
        low = int(size * float(torch.empty(1).uniform_(0.35, 1.0)))
        x = F.interpolate(F.interpolate(x, size=low, mode="area"), size=size, mode="bilinear", align_corners=False)
    return x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset_dir", type=Path, required=True)
    ap.add_argument("--checkpoint", type=Path, default=BUNDLE / "models" / "model.pt")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--other_repeat", type=int, default=10)
    ap.add_argument("--min_sensitivity", type=float, default=0.98)
    ap.add_argument(
        "--collection_aug",
        action="store_true",
        help="blur the look of a collection in training: random gamma, inverted contrast, lower resolution",
    )
    ap.add_argument(
        "--paste",
        type=float,
        default=0.0,
        help="probability that a tumour-free training slice gets a Kaggle tumour pasted in "
        "(tumorseg.training.paste.PasteTumours; the CNN then reads the slice alone, no map)",
    )
    args = ap.parse_args()
    import torch
    from monai.data import load_decathlon_datalist
    from monai.networks.nets import Classifier

    from tumorseg.inference.predictor import Predictor

    args.out.mkdir(parents=True, exist_ok=True)
    datalist = str(args.dataset_dir / "datalist.json")
    lists = {
        key: load_decathlon_datalist(datalist, data_list_key=key, base_dir=str(args.dataset_dir))
        for key in ("training", "validation", "healthy_select", "healthy_real", "other_tumours")
    }
    unique = list({item["image"]: item for item in lists["training"]}.values())
    for item in unique:
        item.setdefault("tumour", 1)
    others = {"train": [], "heldout": []}
    for item in lists["other_tumours"]:
        others[other_part(item["image"])].append(item)
    sets = {
        "train": unique + others["train"],
        "validation": lists["validation"],
        "healthy_select": lists["healthy_select"],
        "healthy_real": lists["healthy_real"],
        "other_heldout": others["heldout"],
    }
    cache = args.out / f"pairs_{args.checkpoint.stem}.npz"
    if cache.is_file():
        data = dict(np.load(cache))
    else:
        predictor = Predictor.from_bundle(BUNDLE, args.checkpoint, {"runtime": "torch"}, tta=True)
        data = {key: pairs(predictor, items) for key, items in sets.items()}
        np.savez(cache, **data)
    boxes = None
    if args.paste:  # the donors' boxes, in the frame of the cached slices
        boxes = torch.as_tensor(label_boxes(sets["train"]))
        from tumorseg.training.paste import PasteTumours

        paste, draws = PasteTumours(prob=args.paste), np.random.default_rng(0)
    labels = {key: np.array([int(i.get("tumour", 1)) for i in items]) for key, items in sets.items()}
    # the other-collection tumours repeated, so a handful weigh against hundreds of real negatives
    x = np.concatenate([data["train"]] + [data["train"][-len(others["train"]) :]] * (args.other_repeat - 1))
    y = np.concatenate([labels["train"]] + [labels["train"][-len(others["train"]) :]] * (args.other_repeat - 1))
    torch.manual_seed(0)
    channels_in = 1 if args.paste else 2
    if boxes is not None:
        boxes = torch.cat([boxes] + [boxes[-len(others["train"]) :]] * (args.other_repeat - 1))
    net = Classifier(in_shape=(channels_in, SIZE, SIZE), classes=1, channels=(16, 32, 64, 128), strides=(2, 2, 2, 2),
                     num_res_units=1, dropout=0.2)  # fmt: skip
    opt = torch.optim.Adam(net.parameters(), 1e-3, weight_decay=1e-4)
    steps = args.epochs * (len(y) // 32 + 1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    xt, yt = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32)
    start = time.time()
    for epoch in range(args.epochs):
        net.train()
        order = torch.randperm(len(yt))
        total = 0.0
        for i in range(0, len(order), 32):
            idx = order[i : i + 32]
            xb, yb = xt[idx], yt[idx].clone()
            if boxes is not None:  # the slice and its box, turned together
                xb = torch.cat([xb[:, :1], boxes[idx].float()], 1)
            if torch.rand(1) < 0.5:
                xb = xb.flip(-1)
            if torch.rand(1) < 0.5:
                xb = xb.flip(-2)
            xb = torch.rot90(xb, int(torch.randint(4, (1,))), (-2, -1))
            xb = xb.clone()
            xb[:, :1] = xb[:, :1] * (1 + 0.1 * torch.randn(len(idx), 1, 1, 1)) + 0.1 * torch.randn(len(idx), 1, 1, 1)
            if boxes is not None:
                xb, box = xb[:, :1].contiguous(), xb[:, 1]
                donors = [int(i) for i in torch.nonzero(box.flatten(1).amax(1) > 0).flatten()]
                for host in torch.nonzero(yb == 0).flatten().tolist():
                    if donors and draws.random() < args.paste:
                        donor = donors[int(draws.integers(len(donors)))]
                        paste.paste_into(xb[host, 0], box[host], xb[donor, 0], box[donor])
                        yb[host] = 1.0
            if args.collection_aug:  # the healthy slices' collections: other sequences, web-sized
                xb[:, :1] = look_of_another_collection(xb[:, :1])
            loss = loss_fn(net(xb)[:, 0], yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss) * len(idx)
        print(f"epoch {epoch + 1}: loss {total / len(yt):.4f} ({time.time() - start:.0f} s)", flush=True)
    net.eval()
    scores = {}
    with torch.no_grad():
        for key in ("validation", "healthy_select", "healthy_real", "other_heldout"):
            xb = torch.as_tensor(data[key][:, :channels_in], dtype=torch.float32)
            views = [xb, xb.flip(-1), xb.flip(-2), xb.flip(-1).flip(-2)]
            scores[key] = torch.stack([torch.sigmoid(net(v)[:, 0]) for v in views]).mean(0).numpy()
    candidates = np.linspace(0.01, 0.99, 99)
    allowed = [t for t in candidates if np.mean(scores["validation"] >= t) >= args.min_sensitivity] or [0.01]
    chosen = max(allowed, key=lambda t: (np.mean(scores["healthy_select"] < t), -t))
    rows = {}
    for t in sorted({round(float(chosen), 2), 0.5}):
        rows[t] = {
            "valid_sensitivity": float(np.mean(scores["validation"] >= t)),
            "select_specificity": float(np.mean(scores["healthy_select"] < t)),
            "heldout_specificity": f"{int(np.sum(scores['healthy_real'] < t))}/{len(scores['healthy_real'])}",
            "other_heldout_sensitivity": f"{int(np.sum(scores['other_heldout'] >= t))}/{len(scores['other_heldout'])}",
        }
        print(t, rows[t], flush=True)
    torch.save(net.state_dict(), args.out / "presence_net.pt")
    (args.out / "result.json").write_text(
        json.dumps({"chosen": float(chosen), "rows": {str(k): v for k, v in rows.items()}}, indent=1)
    )


if __name__ == "__main__":
    main()
