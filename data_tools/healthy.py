"""Healthy (tumour-free) slices for training and checking the model's sense of absence.

The Kaggle set has no slice without tumour, so a network trained on it alone paints a box on
every brain it sees. This stage adds negatives, each with an all-zero label, from the only
healthy MRI to be had offline:

- ``mni_t1``, ``mni_gm``, ``mni_wm``, ``epi``, ``phantom`` (training): every axial slice holding
  brain (or phantom) of nilearn's MNI152 2009a template (T1 and its grey/white-matter maps, read
  as other contrasts), of both frames of nibabel's real EPI series ``example4d``, of its Philips
  phantom EPI and of nilearn's sample statistical map, each drawn ``--variants`` times (the tissue
  maps, the phantom and the map: once) with random framing (zoomed out or cropped), quarter turns
  (the Kaggle slices come in all four), a coarser acquisition (smooth or blocky), a linear or
  blotchy bias field, gamma, inversion (T2-like), noise, blur, and a bright ring standing in for
  the skull.
- ``synthetic`` (training): black, constant, gradient and noise images.
- ``heldout_*`` (checking only, never trained on): nibabel's real T1 volumes (a crop at 2 mm and
  a Talairach-space head at 3 mm); see ``HELDOUT``.
- ``real_healthy`` (``--real DIR``, any number of times): real tumour-free slices of your own
  (PNG/JPG), e.g. ``../shared/data/healthy-slices/images``. Each file goes, by a hash of its
  bytes (so a file keeps its part whatever else is in the folder), to training (``--real-split``
  shares, default 55 %), to ``healthy_select`` (15 %: where the presence decision is chosen) or
  to ``healthy_real`` (30 %: held out, reported, never trained or selected on). Training copies
  are zoomed to the network's square; the two checking lists name the original files, so they
  are measured as a user's files are. ``--real-repeat`` lists each training copy that many times
  (the augmentation draws each anew), so a few hundred real negatives are not swamped.
- ``other_tumours`` (``--other-tumours DIR``, checking only): tumour slices of other collections
  with slice labels only (no mask): sensitivity where the healthy slices came from.
- ``mirror_validation`` (checking only): Kaggle ``valid`` slices whose tumour box lies in one
  half of the head, with that half replaced by the mirror image of the other (the axis of
  symmetry is the one of the two image axes about which the slice is most symmetric): scans with
  the skull, contrast and framing of the training data, and no tumour. Trained on, such slices
  cost Dice (``docs/README.md``), so they only measure in-domain specificity.

Every volume is put in the canonical slice orientation first (``tumorseg.io.reading``), so its
slices look like the ones the predictor will feed the network.

Output (``OUT``): ``images/<source>/*.png``, ``labels/<source>/*.png`` (8-bit) and
``datalist.json`` holding the Kaggle lists of ``--dataset_dir`` (paths rebased) with the
training negatives appended to ``training`` (marked ``"tumour": 0``, as any tumour-free slice of
your own should be: the recipe's first stage leaves them to its negatives stage), and more lists: ``healthy`` (the held-out
negatives), ``presence`` (``validation`` plus ``healthy``: tumour and healthy slices for
sensitivity and specificity) and, with ``--real`` and ``--other-tumours``, ``healthy_select``,
``healthy_real`` and ``other_tumours`` (items ``{"image": ..., "tumour": 0 or 1}``, no label).

    python -m data_tools.healthy runs/kaggle-full runs/kaggle-negatives \
        --real ../shared/data/healthy-slices/images --other-tumours ../shared/data/other-tumour-slices/images
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
from pathlib import Path

import numpy as np

from tumorseg.io.files import write_atomic

SIZE = 256  # negatives are written at the network's resolution; the bundle zooms anyway


def _nilearn_data() -> Path:
    import nilearn.datasets

    return Path(nilearn.datasets.__file__).parent / "data"


def _nibabel_data() -> Path:
    from nibabel.testing import data_path

    return Path(data_path)


TRAIN_VOLUMES = {  # source name: (path of the volume, frames of a 4D series, random views per slice)
    "mni_t1": (lambda: _nilearn_data() / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz", (0,), None),
    "mni_gm": (lambda: _nilearn_data() / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz", (0,), 1),
    "mni_wm": (lambda: _nilearn_data() / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz", (0,), 1),
    "epi": (lambda: _nibabel_data() / "example4d.nii.gz", (0, 1), None),
    "phantom": (lambda: _nibabel_data() / "phantom_EPI_asc_CLEAR_2_1.PAR", (0,), 1),
    "statmap": (lambda: _nilearn_data() / "image_10426.nii.gz", (0,), 1),  # a brain-shaped statistical map
}
HELDOUT = {  # never trained on: the check of generalisation to other scanners and contrasts
    "heldout_t1crop": lambda: _nibabel_data() / "anatomical.nii",
    "heldout_tlrc": lambda: _nibabel_data() / "scaled+tlrc.HEAD",
}


def _png(array_xy: np.ndarray) -> bytes:
    """8-bit PNG of an (x, y) array in [0, 1] (PIL's layout is (rows, cols): transposed)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.round(np.clip(array_xy, 0, 1) * 255).astype(np.uint8).T, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _fit(slice_xy: np.ndarray, size: int = SIZE) -> np.ndarray:
    """Zoom (no stretching) so the longer side is ``size`` and pad to a square."""
    import torch
    from monai.transforms import Resize, SpatialPad

    x = torch.as_tensor(np.ascontiguousarray(slice_xy), dtype=torch.float32)[None]
    x = Resize(spatial_size=size, size_mode="longest", mode="bilinear", anti_aliasing=True)(x)
    return np.asarray(SpatialPad(spatial_size=(size, size))(x))[0]


def canonical_volume(path: Path, frame: int = 0) -> np.ndarray:
    """(x, y, z) float32 volume (``frame`` of a 4D series) of any file nibabel reads, in the
    canonical slice orientation, scaled to [0, 1]."""
    import tempfile

    import nibabel as nib

    from tumorseg.io.reading import read_case

    img = nib.load(path)
    if len(img.shape) > 3 or not path.name.endswith((".nii", ".nii.gz")):  # through a 3D NIfTI copy
        data = np.asarray(img.dataobj, dtype=np.float32)
        data = data.reshape(*data.shape[:3], -1)[..., frame]
        with tempfile.TemporaryDirectory() as tmp:
            nib.save(nib.Nifti1Image(data, img.affine), f"{tmp}/v.nii.gz")
            return canonical_volume(Path(tmp) / "v.nii.gz")
    volume = read_case(path).canonical()[0].numpy().astype(np.float32)
    lo, hi = float(volume.min()), float(volume.max())
    return (volume - lo) / (hi - lo) if hi > lo else np.zeros_like(volume)


def brain_slices(volume: np.ndarray, min_fraction: float = 0.05) -> list[np.ndarray]:
    """Axial slices whose head covers at least ``min_fraction`` of the slice."""
    fg = volume > 0.1
    return [volume[..., k] for k in range(volume.shape[-1]) if fg[..., k].mean() >= min_fraction]


def augment(slice_xy: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One random view of a healthy slice: skull ring, framing (zoomed out or a crop), quarter
    turn, a coarser acquisition (smooth or blocky), a linear or blotchy bias field, contrast
    (gamma, inversion), blur and noise."""
    from scipy import ndimage

    s = slice_xy.astype(np.float32)
    if rng.random() < 0.5:  # a skull: bright ring a few pixels outside the brain
        brain = ndimage.binary_fill_holes(s > 0.1)
        gap, width = rng.integers(1, 6), rng.integers(3, 9)
        outer = ndimage.binary_dilation(brain, iterations=int(gap + width))
        inner = ndimage.binary_dilation(brain, iterations=int(gap))
        s = np.where(outer & ~inner, rng.uniform(0.6, 1.0), s)
    if rng.random() < 0.7:  # the head fills between 60 % and 100 % of the frame
        zoom_out = rng.uniform(1.0, 1.7)
        pad = [(int(n * (zoom_out - 1) / 2),) * 2 for n in s.shape]
        s = np.pad(s, pad)
        shift = [int(rng.integers(-p[0] // 2 - 1, p[0] // 2 + 1)) for p in pad]
        s = np.roll(s, shift, axis=(0, 1))
    else:  # a crop: part of the brain fills the frame
        size = [max(8, int(n * rng.uniform(0.5, 0.9))) for n in s.shape]
        start = [int(rng.integers(0, n - m + 1)) for n, m in zip(s.shape, size)]
        s = s[start[0] : start[0] + size[0], start[1] : start[1] + size[1]]
    s = np.rot90(s, k=int(rng.integers(4)))
    if rng.random() < 0.5:  # a coarser acquisition (1.5-5 mm voxels), seen at the network's size
        small = _fit(s, max(12, int(max(s.shape) / rng.uniform(1.5, 5.0))))
        if rng.random() < 0.3:  # blocky, as nearest-neighbour viewers show it
            reps = -(-SIZE // max(small.shape))
            s = _fit(np.kron(small, np.ones((reps, reps), np.float32)))
        else:
            s = _fit(small)
    else:
        s = _fit(s)
    s = np.clip(s, 0, None)
    if rng.random() < 0.5:  # a bias field: linear (surface coils) or blotchy (EPI, poor shimming)
        if rng.random() < 0.5:
            xs = np.linspace(-1, 1, s.shape[0])[:, None] * rng.uniform(-1, 1)
            ys = np.linspace(-1, 1, s.shape[1])[None, :] * rng.uniform(-1, 1)
            field = xs + ys
        else:
            field = ndimage.gaussian_filter(rng.normal(size=s.shape), sigma=rng.uniform(8, 30))
            field = field / (np.abs(field).max() + 1e-8) * rng.uniform(0.3, 1.0)
        s = s * np.exp(0.7 * field)
    if rng.random() < 0.15:  # inverted contrast inside the head (fluid bright, as in T2)
        inside = ndimage.binary_fill_holes(s > 0.05 * s.max())
        s = np.where(inside, s.max() - s + 0.05, s)
    s = np.clip(s, 0, None)
    s = (s / s.max() if s.max() > 0 else s) ** rng.uniform(0.6, 1.6)
    if rng.random() < 0.3:
        s = ndimage.gaussian_filter(s, sigma=rng.uniform(0.5, 1.5))
    if rng.random() < 0.6:
        s = s + rng.normal(0, rng.uniform(0.005, 0.1), s.shape)
    s = np.clip(s, 0, None)
    return s / s.max() if s.max() > 0 else s


def synthetic(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    """Images with no anatomy at all: black, constant, gradients, uniform and Gaussian noise."""
    xs = np.linspace(0, 1, SIZE, dtype=np.float32)
    out = []
    for i in range(n):
        kind = i % 5
        if kind == 0:
            out.append(np.zeros((SIZE, SIZE), np.float32))
        elif kind == 1:
            out.append(np.full((SIZE, SIZE), rng.uniform(0.05, 1), np.float32))
        elif kind == 2:
            out.append(np.add.outer(xs * rng.uniform(-1, 1), xs * rng.uniform(-1, 1)) % 1)
        elif kind == 3:
            out.append(rng.random((SIZE, SIZE)).astype(np.float32))
        else:
            out.append(np.clip(rng.normal(0.5, 0.2, (SIZE, SIZE)), 0, 1).astype(np.float32))
    return out


def mirrored(image_path: Path, label_path: Path, margin: float = 0.02) -> np.ndarray | None:
    """The Kaggle slice with its tumour half replaced by the mirror of the healthy half, or
    None where the box crosses the axis of symmetry. Arrays are (x, y), like MONAI reads them."""
    from PIL import Image

    with Image.open(image_path) as im:
        img = np.asarray(im.convert("L"), dtype=np.float32).T / 255.0
    with Image.open(label_path) as im:
        box = np.asarray(im, dtype=np.uint8).T > 0
    if not box.any():
        return None
    head = img > 0.1
    best = None
    for axis in (0, 1):
        idx = np.flatnonzero(head.any(1 - axis))
        if idx.size == 0:
            return None
        centre = (idx[0] + idx[-1]) / 2
        n = img.shape[axis]
        src = np.clip(np.round(2 * centre - np.arange(n)).astype(int), 0, n - 1)  # mirror index
        flipped = np.take(img, src, axis=axis)
        keep = ~box & ~np.take(box, src, axis=axis) & head
        if keep.sum() < 100:
            continue
        score = float(np.corrcoef(img[keep], flipped[keep])[0, 1])
        if best is None or score > best[0]:
            best = (score, axis, centre, flipped)
    if best is None:
        return None
    _, axis, centre, flipped = best
    b = np.flatnonzero(box.any(1 - axis))
    n = img.shape[axis]
    pos = np.arange(n).reshape((-1, 1) if axis == 0 else (1, -1))
    if b[-1] < centre - margin * n:  # tumour in the low half: take the high half mirrored
        return np.where(pos < centre, flipped, img)
    if b[0] > centre + margin * n:
        return np.where(pos > centre, flipped, img)
    return None


def real_part(path: Path, split: tuple[float, float]) -> str:
    """``training``, ``healthy_select`` or ``healthy_real`` for a real healthy slice, from the MD5 of
    its bytes (uniform in [0, 1)): a file's part depends on nothing else in its folder."""
    u = int(hashlib.md5(path.read_bytes()).hexdigest(), 16) / 16**32
    return "training" if u < split[0] else "healthy_select" if u < split[0] + split[1] else "healthy_real"


def slice_files(folder: Path) -> list[Path]:
    """The PNG/JPG files of a folder, sorted; an unreadable folder is one line and exit 1."""
    from tumorseg.io.reading import SLICE_SUFFIXES

    if not folder.is_dir():
        raise SystemExit(f"error: {folder}: not a folder of PNG/JPG slices")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(SLICE_SUFFIXES))
    if not files:
        raise SystemExit(f"error: {folder}: holds no PNG/JPG slices")
    return files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data_tools.healthy", description=__doc__.splitlines()[0])
    ap.add_argument("dataset_dir", type=Path, help="output folder of tumorseg-convert (datalist.json)")
    ap.add_argument("out", type=Path, help="folder for the negatives and the merged datalist")
    ap.add_argument("--variants", type=int, default=2, help="random views per MNI T1 slice (default 2)")
    ap.add_argument("--synthetic", type=int, default=60, help="images without anatomy (default 60)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--real", type=Path, action="append", default=[], metavar="DIR", help="a folder of real tumour-free PNG/JPG slices"
    )
    ap.add_argument(
        "--real-split", default="0.55,0.15", help="shares of --real for training and for selection (the rest is held out)"
    )
    ap.add_argument("--real-repeat", type=int, default=3, help="times each real training negative is listed (default 3)")
    ap.add_argument("--other-tumours", type=Path, action="append", default=[], metavar="DIR", help="tumour slices, no masks")
    args = ap.parse_args(argv)
    try:
        split = tuple(float(v) for v in args.real_split.split(","))
        if len(split) != 2 or min(split) < 0 or sum(split) > 1:
            raise ValueError
    except ValueError:
        print(
            f"error: --real-split {args.real_split}: want two shares 'training,selection' summing to at most 1", file=sys.stderr
        )
        return 1
    datalist_path = args.dataset_dir / "datalist.json"
    try:
        datalist = json.loads(datalist_path.read_text())
    except (OSError, ValueError) as e:
        print(f"error: {datalist_path}: {e.__class__.__name__}: {e}", file=sys.stderr)
        return 1
    if args.out.resolve() == args.dataset_dir.resolve():
        print(f"error: {args.out}: must differ from the dataset folder", file=sys.stderr)
        return 1
    rng = np.random.default_rng(args.seed)
    out = args.out
    zero = _png(np.zeros((SIZE, SIZE), np.float32))

    def rebase(items):
        return [{k: os.path.relpath((args.dataset_dir / v).resolve(), out.resolve()) for k, v in item.items()} for item in items]

    def write(source: str, name: str, image: np.ndarray, label: bytes | None = None) -> dict:
        rel_img, rel_lab = f"images/{source}/{name}.png", f"labels/{source}/{name}.png"
        write_atomic(out / rel_img, _png(image))
        write_atomic(out / rel_lab, label if label is not None else _png(np.zeros(image.shape, np.float32)))
        return {"image": rel_img, "label": rel_lab}

    negatives, heldout, counts = [], [], {}
    for source, (locate, frames, views) in TRAIN_VOLUMES.items():
        views = views or args.variants
        step = 3 if source.startswith("mni_") and source != "mni_t1" else 1  # tissue maps: a contrast variant
        items = []
        for frame in frames:
            slices = brain_slices(canonical_volume(locate(), frame))
            items += [
                write(source, f"{source}_{frame}_{k:03d}_{v}", augment(s, rng), zero)
                for k, s in enumerate(slices[::step])
                for v in range(views)
            ]
        negatives += items
        counts[source] = len(items)
    items = [write("synthetic", f"synthetic_{i:03d}", s, zero) for i, s in enumerate(synthetic(rng, args.synthetic))]
    negatives += items
    counts["synthetic"] = len(items)
    n = 0
    for item in datalist.get("validation", []):
        m = mirrored(args.dataset_dir / item["image"], args.dataset_dir / item["label"])
        if m is not None:
            heldout.append(write("mirror_validation", "mirror_" + Path(item["image"]).stem, m))
            n += 1
    counts["mirror_validation"] = n
    for source, locate in HELDOUT.items():
        slices = brain_slices(canonical_volume(locate()))
        items = [write(source, f"{source}_{k:03d}", _fit(s)) for k, s in enumerate(slices)]
        heldout += items
        counts[source] = len(items)

    from tumorseg.io.reading import InputError, read_slice

    real: dict[str, list] = {"training": [], "healthy_select": [], "healthy_real": []}
    for folder in args.real:
        for path in slice_files(folder):
            part = real_part(path, split)
            if part == "training":
                try:
                    image = read_slice(path)
                except InputError as e:
                    print(f"warning: {e}; left out", file=sys.stderr)
                    continue
                lo, hi = float(image.min()), float(image.max())
                image = (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)
                real["training"] += [write("real_healthy", path.stem, _fit(image), zero)] * args.real_repeat
            else:
                real[part].append({"image": os.path.relpath(path.resolve(), out.resolve()), "tumour": 0})
    negatives += real["training"]
    counts["real_healthy"] = len(real["training"]) // max(args.real_repeat, 1)
    counts["healthy_select"], counts["healthy_real"] = len(real["healthy_select"]), len(real["healthy_real"])
    other = [
        {"image": os.path.relpath(p.resolve(), out.resolve()), "tumour": 1} for d in args.other_tumours for p in slice_files(d)
    ]
    counts["other_tumours"] = len(other)

    merged = {k: v for k, v in datalist.items() if not isinstance(v, list) or k in ("labels",)}
    merged["name"] = str(datalist.get("name", "")) + " + healthy negatives (data_tools/healthy.py)"
    merged["negatives"] = counts
    for key in ("training", "validation", "test"):
        merged[key] = rebase(datalist.get(key, []))
    # tumour-free items say so: train.yaml's segmentation stage leaves them to the negatives stage
    merged["training"] += [{**item, "tumour": 0} for item in negatives]
    merged["healthy"] = heldout
    merged["presence"] = merged["validation"] + heldout
    if args.real:
        merged["healthy_select"], merged["healthy_real"] = real["healthy_select"], real["healthy_real"]
    if other:
        merged["other_tumours"] = other
    write_atomic(out / "datalist.json", (json.dumps(merged, indent=1) + "\n").encode())
    print(f"wrote {out / 'datalist.json'}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
