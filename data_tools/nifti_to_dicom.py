"""Write a NIfTI volume as a DICOM MR series (one file per slice along its third voxel axis),
with the geometry of its affine: the same anatomy in DICOM, to check that a reader places it
where the NIfTI says (tests, the healthy-scan check of ``experiments/healthy_check.py``).

    python -m data_tools.nifti_to_dicom volume.nii.gz series_folder/
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def write_series(
    volume: np.ndarray,
    affine: np.ndarray,
    folder: Path,
    shuffle_names: bool = True,
    series_description: str = "tumorseg test series",
) -> list[Path]:
    """One MR Image Storage file per slice ``volume[:, :, k]`` (``x`` = columns, ``y`` = rows),
    positioned by ``affine`` (voxel -> RAS mm, as nibabel and MONAI give it). Intensities are
    scaled to 0..4000 (uint16) with a rescale slope and intercept that restore them. File names
    are shuffled against slice order unless ``shuffle_names`` is False (readers must sort by
    position)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    volume = np.asarray(volume, dtype=np.float64)
    if volume.ndim == 2:
        volume = volume[:, :, None]
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine, dtype=np.float64)  # RAS -> LPS (DICOM)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    row_dir, col_dir = lps[:3, 0] / spacing[0], lps[:3, 1] / spacing[1]
    lo, hi = float(volume.min()), float(volume.max())
    slope = (hi - lo) / 4000 if hi > lo else 1.0
    data = np.round((volume - lo) / slope).clip(0, 4000).astype(np.uint16)
    folder.mkdir(parents=True, exist_ok=False)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    n = volume.shape[2]
    order = np.random.default_rng(0).permutation(n) if shuffle_names else np.arange(n)
    written = []
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientName, ds.PatientID = "MR", "Test^Phantom", "TEST001"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.ReferringPhysicianName = "20260101", "120000", "", ""
        ds.StudyID, ds.SeriesNumber, ds.InstanceNumber, ds.PatientBirthDate, ds.PatientSex = "1", 1, k + 1, "", "O"
        ds.Manufacturer, ds.SeriesDescription = "tumorseg", series_description
        ds.ImageOrientationPatient = [float(v) for v in (*row_dir, *col_dir)]
        ds.ImagePositionPatient = [float(v) for v in lps[:3, :3] @ np.array([0, 0, k]) + lps[:3, 3]]
        ds.PixelSpacing, ds.SliceThickness = [float(spacing[1]), float(spacing[0])], float(spacing[2])
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.10g}"[:16], f"{lo:.10g}"[:16]
        ds.PixelData = np.ascontiguousarray(data[:, :, k].T).tobytes()  # rows = y, columns = x
        path = folder / f"slice_{order[k]:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data_tools.nifti_to_dicom", description=__doc__.splitlines()[0])
    ap.add_argument("nifti", type=Path)
    ap.add_argument("folder", type=Path, help="new folder for the series (must not exist)")
    args = ap.parse_args(argv)
    import nibabel as nib

    try:
        img = nib.load(args.nifti)
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as e:
        print(f"error: {args.nifti}: unreadable NIfTI ({e.__class__.__name__}: {e})", file=sys.stderr)
        return 1
    if args.folder.exists():
        print(f"error: {args.folder}: already exists", file=sys.stderr)
        return 1
    while data.ndim > 3:
        data = data[..., 0]
    files = write_series(data, img.affine, args.folder)
    print(f"wrote {len(files)} slices to {args.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
