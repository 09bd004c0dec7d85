"""``tumorseg-predict``: the bundle's model on new scans, one case at a time.

Inputs: PNG/JPG slices of any size, NIfTI volumes (2D or 3D, ``.nii``/``.nii.gz``), a DICOM
file, or a folder holding one DICOM series; a folder of such files is expanded. What the model
expects: one grey channel, intensity scaled to [0, 1] over the whole case (min-max), and
slices at the framing of the training data (a head filling a ``image_size`` square): each slice
is zoomed isotropically so its longer side is ``image_size`` (no stretching), predicted by
sliding-window inference (overlap, Gaussian blending), thresholded, and zoomed back (nearest
neighbour, as the bundle's inference config and MONAI Label do).
Volumes are predicted slice by slice along ``--axis``.

Outputs per case, in the input's geometry, written atomically: the mask (PNG for PNG/JPG, NIfTI
with the input's affine for NIfTI and DICOM), for DICOM also a DICOM SEG referencing the source
series, an overlay PNG for a person to look at, and a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SLICE_SUFFIXES = (".png", ".jpg", ".jpeg")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
from .bundle import BUNDLE


class InputError(Exception):
    """A case that cannot be predicted; reported as one line naming the file."""


def _is_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _kind(path: Path) -> str:
    name = path.name.lower()
    if path.is_dir():
        return "dicom"
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(SLICE_SUFFIXES):
        return "slice"
    if name.endswith(".dcm") or _is_dicom(path):
        return "dicom"
    raise InputError(f"{path}: not a PNG/JPG, NIfTI or DICOM file")


def find_cases(inputs: list[Path]) -> tuple[list[Path], list[str]]:
    """Cases in the order given, and one error line per input that yields none: a file is a
    case; a folder of DICOM files is one series; any other folder contributes the
    PNG/JPG/NIfTI/DICOM files directly inside it (not its subfolders)."""
    cases, errors = [], []
    for path in inputs:
        if not path.exists():  # also a dangling link or a symlink loop
            errors.append(f"{path}: no such file or folder")
        elif path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file())
            if files and all(p.name.lower().endswith(".dcm") or _is_dicom(p) for p in files):
                cases.append(path)
                continue
            found = [p for p in files if p.name.lower().endswith(SLICE_SUFFIXES + NIFTI_SUFFIXES + (".dcm",))]
            if not found:
                errors.append(f"{path}: a folder with no PNG/JPG/NIfTI/DICOM files in it")
            cases.extend(found)
        else:
            cases.append(path)
    return cases, errors


# ---- reading ---------------------------------------------------------------------------------


def read_slice(path: Path):
    """(x, y) float32 array of a PNG/JPG in grey, as MONAI's PILReader lays it out."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            grey = im.convert("F") if im.mode in ("I", "I;16", "F") else im.convert("L")
            return np.asarray(grey, dtype=np.float32).T
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"{path}: unreadable image ({e.__class__.__name__}: {e})") from None


def read_nifti(path: Path):
    import nibabel as nib
    import numpy as np

    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as e:  # nibabel raises many types for broken files
        raise InputError(f"{path}: unreadable NIfTI ({e.__class__.__name__}: {e})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim not in (2, 3):
        raise InputError(f"{path}: {data.ndim}D image of shape {data.shape}; give a 2D slice or a 3D volume")
    return data, img


def read_dicom(path: Path):
    """(x, y, z) float32 volume of a DICOM file or series folder, its datasets in slice order,
    and the RAS affine of that volume (as ITK and MONAI define it)."""
    import numpy as np
    import pydicom

    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    datasets = []
    for f in files:
        try:
            ds = pydicom.dcmread(f)
            ds.pixel_array  # noqa: B018  (decode now, so a broken file is reported by name)
        except Exception as e:
            raise InputError(f"{f}: unreadable DICOM ({e.__class__.__name__}: {e})") from None
        datasets.append(ds)
    if not datasets:
        raise InputError(f"{path}: no DICOM files")
    orientation = datasets[0].get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])
    row_dir = np.array(orientation[:3], dtype=float)
    col_dir = np.array(orientation[3:], dtype=float)
    normal = np.cross(row_dir, col_dir)
    position = lambda ds: np.array(ds.get("ImagePositionPatient", [0, 0, 0]), dtype=float)  # noqa: E731
    # slice order by position along the normal, not by file name
    datasets.sort(key=lambda ds: (float(position(ds) @ normal), int(ds.get("InstanceNumber", 0) or 0)))
    first = datasets[0]
    shapes = {ds.pixel_array.shape for ds in datasets}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise InputError(f"{path}: slices of different or multi-frame shapes {sorted(shapes)}")
    volume = np.stack([_rescaled(ds).T for ds in datasets], axis=-1)  # (cols=x, rows=y, z)
    dy, dx = (float(v) for v in first.get("PixelSpacing", [1, 1]))
    if len(datasets) > 1:
        step = (position(datasets[-1]) - position(datasets[0])) / (len(datasets) - 1)
    else:
        step = normal * float(first.get("SliceThickness", 1) or 1)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row_dir * dx, col_dir * dy, step, position(first)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # LPS (DICOM) -> RAS (NIfTI)
    return volume, datasets, affine


def _rescaled(ds):
    import numpy as np

    arr = ds.pixel_array.astype(np.float32)
    return arr * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)


# ---- the model -------------------------------------------------------------------------------


class Predictor:
    """The bundle's network, weights and inference settings, applied slice by slice.

    Args:
        bundle: the bundle folder (configs/train.yaml and configs/inference.yaml are read).
        checkpoint: weights (a state dict, loaded with ``weights_only=True``); default the bundle's models/model.pt.
        overrides: config overrides (e.g. ``{"image_size": 128}``).
        tta: average the probabilities of the slice and its flips (None: the config's ``tta``).
        box_fit: predict one rectangle per slice (None: the config's ``box_fit``).
    """

    def __init__(self, bundle: Path = BUNDLE, checkpoint: Path | None = None, overrides: dict | None = None,
                 tta: bool | None = None, box_fit: bool | None = None):
        import torch

        from .bundle import inference_parser
        from .transforms import ExpectedDiceBox

        overrides = dict(overrides or {})
        for key, value in (("tta", tta), ("box_fit", box_fit)):
            if value is not None:
                overrides[key] = value
        parser = inference_parser(bundle, overrides)
        self.image_size = int(parser.get_parsed_content("image_size"))
        self.threshold = float(parser.get_parsed_content("threshold"))
        self.inferer = parser.get_parsed_content("infer#inferer")  # FlipTTAInferer around the sliding window
        self.tta = bool(parser.get_parsed_content("tta_enabled"))
        self.box_fit = bool(parser.get_parsed_content("box_fit_enabled"))
        self.box = ExpectedDiceBox(self.threshold) if self.box_fit else None
        self.checkpoint = Path(checkpoint or parser.get_parsed_content("checkpoint"))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.network = parser.get_parsed_content("network_def").to(self.device).eval()
        try:
            state = torch.load(self.checkpoint, map_location=self.device, weights_only=True)
        except FileNotFoundError:
            raise InputError(f"{self.checkpoint}: no model weights (train first, or give --checkpoint)") from None
        except Exception as e:  # a pickle that is not a plain state dict is refused, never executed
            raise InputError(f"{self.checkpoint}: not loadable as weights ({e.__class__.__name__})") from None
        self.network.load_state_dict(state)

    def slice_probability(self, image):
        """Tumour probability of one (x, y) slice already scaled to [0, 1], at the network's
        resolution (longer side ``image_size``)."""
        import torch
        from monai.transforms import Resize

        x = torch.as_tensor(image, dtype=torch.float32)[None]  # (1, x, y)
        zoom = Resize(spatial_size=self.image_size, size_mode="longest", mode="bilinear", anti_aliasing=True)
        batch = torch.as_tensor(zoom(x))[None].to(self.device)  # (1, 1, x', y')
        with torch.no_grad():
            return torch.sigmoid(self.inferer(batch, self.network))[0].cpu()  # (1, x', y')

    def slice_mask(self, image):
        """Thresholded at the network's resolution, then zoomed back to the slice's size with
        nearest neighbour: the same as the bundle's inference config and MONAI Label."""
        import torch
        from monai.transforms import Resize

        prob = self.slice_probability(image)
        mask = torch.as_tensor(self.box(prob.numpy())).float() if self.box else (prob >= self.threshold).float()
        back = Resize(spatial_size=tuple(image.shape), mode="nearest")(mask)
        return torch.as_tensor(back)[0].numpy() > 0.5, float(prob.max())

    def predict_volume(self, volume, axis: int = 2):
        """Mask and maximum probability of a 2D slice, or of a 3D volume slice by slice along ``axis``."""
        import numpy as np

        lo, hi = float(np.min(volume)), float(np.max(volume))
        if not np.isfinite(lo) or not np.isfinite(hi):
            raise InputError("contains NaN or infinite values")
        if hi <= lo:
            raise InputError("empty image (every pixel has the same value)")
        scaled = (volume - lo) / (hi - lo)
        if scaled.ndim == 2:
            return self.slice_mask(scaled)
        moved = np.moveaxis(scaled, axis, -1)
        masks, peak = [], 0.0
        for k in range(moved.shape[-1]):  # one slice at a time: memory stays that of one slice
            mask, p = self.slice_mask(moved[..., k])
            masks.append(mask)
            peak = max(peak, p)
        return np.moveaxis(np.stack(masks, axis=-1), -1, axis), peak


# ---- writing ---------------------------------------------------------------------------------


def _overlay_png(volume, mask, axis: int, title: str) -> bytes:
    """The slice (or up to three slices with most tumour; the middle one if none) with the
    prediction outlined in red."""
    import io

    import numpy as np

    from .visualize import panel

    if volume.ndim == 2:
        picks = [(volume, mask, title)]
    else:
        v, m = np.moveaxis(volume, axis, -1), np.moveaxis(mask, axis, -1)
        area = m.reshape(-1, m.shape[-1]).sum(0)
        order = [int(k) for k in np.argsort(-area)[:3] if area[k] > 0] or [m.shape[-1] // 2]
        picks = [(v[..., k], m[..., k], f"{title} slice {k}") for k in sorted(order)]
    cases = [(img, np.zeros_like(msk, dtype=bool), msk, caption[:40]) for img, msk, caption in picks]
    buf = io.BytesIO()
    panel(cases).save(buf, format="PNG")
    return buf.getvalue()


def _nifti_bytes(mask, affine, header=None) -> bytes:
    import nibabel as nib
    import numpy as np

    img = nib.Nifti1Image(mask.astype(np.uint8), affine, header=header)
    img.set_data_dtype(np.uint8)
    img.header.set_slope_inter(1, 0)
    return img.to_bytes()


def _gz(data: bytes) -> bytes:
    import gzip

    return gzip.compress(data, mtime=0)


def _seg_bytes(mask, datasets) -> bytes:
    """DICOM SEG (highdicom) of the mask, referencing the source series."""
    import io

    import highdicom as hd
    import numpy as np
    from pydicom.sr.codedict import codes

    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="tumour",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="tumorseg brain_tumor_mri_seg", version="0.1.0", family=codes.DCM.ArtificialIntelligence
        ),
    )
    frames = np.stack([mask[:, :, k].T for k in range(mask.shape[2])]).astype(bool)  # (slices, rows, cols)
    seg = hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=hd.UID(),
        series_number=999,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="tumorseg",
        manufacturer_model_name="brain_tumor_mri_seg",
        software_versions="0.1.0",
        device_serial_number="none",
        omit_empty_frames=False,
    )
    buf = io.BytesIO()
    seg.save_as(buf)
    return buf.getvalue()


def _stem(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES + SLICE_SUFFIXES + (".dcm",):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def predict_case(predictor: Predictor, path: Path, output: Path, axis: int = 2, keep_largest: bool = False) -> dict:
    """Predict one case and write its outputs; returns the JSON summary.

    ``keep_largest`` keeps only the largest connected tumour region (in 3D for volumes)."""
    import numpy as np

    from .files import write_atomic

    kind = _kind(path)
    spacing = None
    if kind == "slice":
        volume = read_slice(path)
    elif kind == "nifti":
        volume, img = read_nifti(path)
        spacing = [float(s) for s in img.header.get_zooms()[: volume.ndim]]
    else:
        volume, datasets, affine = read_dicom(path)
        spacing = [float(np.linalg.norm(affine[:3, i])) for i in range(3)]
    try:
        mask, max_probability = predictor.predict_volume(volume, axis=axis)
    except InputError as e:
        raise InputError(f"{path}: {e}") from None
    if keep_largest and mask.any():
        import torch
        from monai.transforms import KeepLargestConnectedComponent

        mask = KeepLargestConnectedComponent(applied_labels=[1])(torch.as_tensor(mask[None].astype(np.uint8)))[0].numpy() > 0
    stem = _stem(path)
    written = {}

    if kind == "slice":
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(mask.T.astype(np.uint8), mode="L").save(buf, format="PNG")
        written["mask"] = output / f"{stem}_seg.png"
        write_atomic(written["mask"], buf.getvalue())
    elif kind == "nifti":
        header = img.header.copy()
        data = _nifti_bytes(mask.reshape(img.shape), img.affine, header)
        written["mask"] = output / f"{stem}_seg.nii.gz"
        write_atomic(written["mask"], _gz(data))
    else:
        written["mask"] = output / f"{stem}_seg.nii.gz"
        write_atomic(written["mask"], _gz(_nifti_bytes(mask, affine)))
        written["dicom_seg"] = output / f"{stem}_seg.dcm"
        write_atomic(written["dicom_seg"], _seg_bytes(mask, datasets))
    written["overlay"] = output / f"{stem}_overlay.png"
    write_atomic(written["overlay"], _overlay_png(volume, mask, axis, stem))

    pixels = int(mask.sum())
    unit = float(np.prod(spacing)) if spacing else None
    summary = {
        "input": str(path),
        "kind": kind,
        "shape": list(volume.shape),
        "spacing": spacing,
        "tumour_pixels": pixels,
        ("tumour_area_mm2" if volume.ndim == 2 else "tumour_volume_mm3"): pixels * unit if unit else None,
        "slices_with_tumour": [int(k) for k in np.nonzero(np.moveaxis(mask, axis, -1).reshape(-1, mask.shape[axis]).any(0))[0]]
        if volume.ndim == 3
        else None,
        "max_probability": max_probability,
        "threshold": predictor.threshold,
        "tta": predictor.tta,
        "box_fit": predictor.box_fit,
        "keep_largest": keep_largest,
        "checkpoint": str(predictor.checkpoint),
        "outputs": {k: str(v) for k, v in written.items()},
    }
    write_atomic(output / f"{stem}.json", (json.dumps(summary, indent=1) + "\n").encode())
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tumorseg-predict", description=__doc__.splitlines()[0].split(": ", 1)[1])
    p.add_argument("inputs", nargs="+", type=Path, help="PNG/JPG/NIfTI/DICOM files, DICOM series folders, or folders of files")
    p.add_argument("--output", "-o", type=Path, required=True, help="folder for the outputs (created)")
    p.add_argument("--bundle", type=Path, default=BUNDLE, help="bundle folder (default: the repository's)")
    p.add_argument("--checkpoint", type=Path, help="weights (default: <bundle>/models/model.pt)")
    p.add_argument("--axis", type=int, default=2, choices=(0, 1, 2), help="slice axis of 3D volumes (default 2)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="test-time augmentation, averaging over the slice's flips (default: the inference config's tta)")
    p.add_argument("--box-fit", action=argparse.BooleanOptionalAction, default=None,
                   help="one rectangle per slice, of highest expected Dice (default: the inference config's box_fit)")
    p.add_argument("--keep-largest", action="store_true", help="keep only the largest connected tumour region")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="bundle config override, e.g. --set image_size=128 (JSON values)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .bundle import parse_overrides

    overrides = parse_overrides(args.set)
    cases, errors = find_cases(args.inputs)
    for line in errors:
        print(f"error: {line}", file=sys.stderr)
    from tqdm import tqdm

    try:
        predictor = Predictor(args.bundle, args.checkpoint, overrides, tta=args.tta, box_fit=args.box_fit)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failed = 0
    for case in tqdm(cases, unit="case", disable=args.no_progress or None):
        try:
            predict_case(predictor, case, args.output, axis=args.axis, keep_largest=args.keep_largest)
        except InputError as e:
            failed += 1
            tqdm.write(f"error: {e}", file=sys.stderr)
    print(f"{len(cases) - failed} of {len(cases) + len(errors)} inputs predicted into {args.output}")
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
