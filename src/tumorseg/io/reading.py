"""Reading a case (PNG/JPG slice, NIfTI volume, DICOM file or series) into one MetaTensor, and
the canonical slice orientation every volume is put in before the network sees it.

The canonical orientation (``SLICE_AXCODES = "LPS"``, MONAI's ``Orientation``): the array's first
axis runs to the patient's left, the second to posterior, the third to superior. MONAI lays a
PNG/JPG out as ``(x, y)`` = (column, row), so an axial slice of such a volume, written as an
image, shows the patient as a radiologist reads it: anterior at the top, the patient's right on
the viewer's left. The Kaggle JPEGs are axial slices in all four quarter turns (face up, down,
left or right: a look at 48 random training slices), so this is one of the layouts the network
was trained on, and the conventional one. What matters most is that it is *one* layout: the same
anatomy stored in any voxel order reaches the network as the same slices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SLICE_AXCODES = "LPS"
SLICE_SUFFIXES = (".png", ".jpg", ".jpeg")
NIFTI_SUFFIXES = (".nii", ".nii.gz")


class InputError(Exception):
    """A case that cannot be predicted; reported as one line naming the file."""


def is_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def kind_of(path: Path) -> str:
    """``slice``, ``nifti`` or ``dicom`` (a folder is a DICOM series)."""
    name = path.name.lower()
    if path.is_dir():
        return "dicom"
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(SLICE_SUFFIXES):
        return "slice"
    if is_dicom_file(path):
        return "dicom"
    raise InputError(f"{path}: not a PNG/JPG, NIfTI or DICOM file")


@dataclass
class Case:
    """One input: ``image`` is a MetaTensor ``(1, x, y[, z])`` whose ``affine`` maps voxels to
    RAS millimetres (identity for PNG/JPG), in the file's own voxel order."""

    path: Path
    kind: str
    image: Any  # a MetaTensor
    datasets: list = field(default_factory=list)  # DICOM: the source datasets in slice order
    nifti: object = None  # NIfTI: the nibabel image (its header is kept for the mask)
    note: str | None = None  # something the user should know (e.g. which DICOM series was taken)

    @property
    def _orientation(self):  # one instance: MONAI inverts only the transform object that ran
        if "_orient" not in self.__dict__:
            from monai.transforms import Orientation

            # labels given, as MONAI's default for an RAS affine: its default is to change (a warning)
            labels = (("L", "R"), ("P", "A"), ("I", "S"))
            self.__dict__["_orient"] = Orientation(axcodes=SLICE_AXCODES[: self.image.ndim - 1], labels=labels)
        return self.__dict__["_orient"]

    @property
    def spacing(self) -> list[float] | None:
        if self.kind == "slice":
            return None
        import numpy as np

        affine = np.asarray(self.image.affine)
        return [float(np.linalg.norm(affine[:3, i])) for i in range(self.image.ndim - 1)]

    def canonical(self):
        """The image in ``SLICE_AXCODES`` (volumes and 2D NIfTI/DICOM); PNG/JPG slices as they are.
        Undo with :func:`from_canonical`."""
        if self.kind == "slice":
            return self.image
        return self._orientation(self.image)

    def from_canonical(self, canonical, array):
        """``array`` (spatial shape of ``canonical``) back in the file's voxel order, exactly."""
        import numpy as np
        import torch

        if self.kind == "slice":
            return np.asarray(array)
        from monai.data import MetaTensor

        mt = MetaTensor(
            torch.as_tensor(np.asarray(array))[None],
            meta=dict(canonical.meta),
            applied_operations=list(canonical.applied_operations),
        )
        back = self._orientation.inverse(mt)
        return np.asarray(back[0])


def read_case(path: Path, files: list[Path] | None = None) -> Case:
    """Read one case; a file that cannot be read raises :class:`InputError` naming it. ``files``:
    the files of one DICOM series in the folder ``path`` (:func:`read_dicom`)."""
    path = Path(path)
    kind = kind_of(path)
    if kind == "slice":
        import torch
        from monai.data import MetaTensor

        return Case(path, kind, MetaTensor(torch.as_tensor(read_slice(path))[None]))
    if kind == "nifti":
        return read_nifti(path)
    return read_dicom(path, files)


def pil_grey(im):
    """One grey channel of a PIL image as it is displayed: EXIF orientation applied, 16-bit and
    float images kept at their depth (``"F"``; MONAI's ``ScaleIntensity`` rescales them), colour
    and alpha dropped (``"L"``). The bundle's reader uses it as ``PILReader(converter=...)``."""
    from PIL import ImageOps

    im = ImageOps.exif_transpose(im)
    return im.convert("F") if im.mode in ("I", "I;16", "I;16B", "I;16L", "F") else im.convert("L")


def read_slice(path: Path):
    """(x, y) float32 array of a PNG/JPG in grey (``pil_grey``), as MONAI's PILReader lays it out."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return np.array(pil_grey(im), dtype=np.float32).T  # a copy: writable, as torch wants it
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise InputError(f"{path}: unreadable image ({e.__class__.__name__}: {e})") from None


def read_nifti(path: Path) -> Case:
    """A NIfTI (or other nibabel) volume through MONAI's ``NibabelReader``: RAS affine, float32.
    A 4D file must hold one volume (a time series is refused: which frame would be meant?)."""
    import numpy as np
    import torch
    from monai.data import MetaTensor, NibabelReader

    reader = NibabelReader()
    try:
        img = reader.read(str(path))
        data, meta = reader.get_data(img)
    except Exception as e:  # nibabel raises many types for broken files
        raise InputError(f"{path}: unreadable NIfTI ({e.__class__.__name__}: {e})") from None
    data = np.asarray(data, dtype=np.float32)
    while data.ndim > 3 and data.shape[-1] == 1:  # (x, y, z, 1)
        data = data[..., 0]
    if data.ndim not in (2, 3):
        raise InputError(f"{path}: {data.ndim}D image of shape {data.shape}; give a 2D slice or a 3D volume")
    affine = torch.as_tensor(np.asarray(meta["affine"], dtype=np.float64))
    return Case(path, "nifti", MetaTensor(torch.as_tensor(data)[None], affine=affine), nifti=img)


def is_dicom_file(path: Path) -> bool:
    """A DICOM file by its name (``.dcm``) or by its ``DICM`` marker (files named ``IM0001``)."""
    return path.name.lower().endswith(".dcm") or is_dicom(path)


@dataclass
class Series:
    """One DICOM series of a folder: its ``SeriesInstanceUID`` ("" where the files give none), its
    files, and what a person knows it by (``SeriesNumber``, ``SeriesDescription``)."""

    uid: str
    files: list[Path]
    number: int | None = None
    description: str = ""


# DICOM objects made of images, not images themselves (a segmentation, as tumorseg-predict writes
# beside a series, a structured report, a presentation state, a key-object selection, RT
# structures, a registration): left out of a folder's series, refused as an input of their own
DERIVED_MODALITIES = {"SEG", "SR", "PR", "KO", "RTSTRUCT", "RTPLAN", "RTRECORD", "REG", "DOC"}


def derived_modality(ds) -> str | None:
    """The ``Modality`` of a dataset that holds a derived object (``DERIVED_MODALITIES``), else None."""
    modality = str(ds.get("Modality", "") or "").upper()
    return modality if modality in DERIVED_MODALITIES else None


def dicom_series(files: list[Path]) -> tuple[list[Series], list[tuple[Path, str]]]:
    """``files`` grouped by ``SeriesInstanceUID`` (headers only, pixels are not decoded), in the
    order of each series' first file; and the files that hold a derived object (``Modality`` in
    ``DERIVED_MODALITIES``: a DICOM SEG beside its series) with their modality, left out. A file
    whose header is unreadable raises :class:`InputError` naming it: it could belong to any series."""
    import pydicom

    series: dict[str, Series] = {}
    derived: list[tuple[Path, str]] = []
    for f in files:
        try:
            ds = pydicom.dcmread(
                f,
                stop_before_pixels=True,
                specific_tags=["SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "Modality"],
            )
        except Exception as e:
            raise InputError(f"{f}: unreadable DICOM ({e.__class__.__name__}: {e})") from None
        modality = derived_modality(ds)
        if modality:
            derived.append((f, modality))
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if uid not in series:
            try:
                number = int(ds.get("SeriesNumber", None))
            except (TypeError, ValueError):
                number = None
            series[uid] = Series(uid, [], number, str(ds.get("SeriesDescription", "") or ""))
        series[uid].files.append(f)
    return list(series.values()), derived


# what placing the slices of a series in space needs: tag -> number of values
GEOMETRY_TAGS = {"ImagePositionPatient": 3, "ImageOrientationPatient": 6, "PixelSpacing": 2}
ASSUMED = {"ImagePositionPatient": [0.0, 0.0, 0.0], "ImageOrientationPatient": [1.0, 0, 0, 0, 1, 0], "PixelSpacing": [1.0, 1.0]}


def _geometry(ds, path: Path, tag: str):
    """The values of ``tag`` as floats (None where the file has none); malformed: InputError."""
    import numpy as np

    if tag not in ds or ds[tag].VM == 0:
        return None
    value = ds[tag].value
    try:
        numbers = np.array([float(v) for v in (value if ds[tag].VM > 1 else [value])])
    except (TypeError, ValueError):
        numbers = np.array([])
    if numbers.shape != (GEOMETRY_TAGS[tag],) or not np.isfinite(numbers).all():
        raise InputError(f"{path}: {tag} is {repr(value)[:80]}, not {GEOMETRY_TAGS[tag]} numbers")
    return numbers


def _read_dicom_file(path: Path):
    """One DICOM file, pixels decoded; refused in one line naming it where the image is not one
    grey slice: unreadable, colour (``SamplesPerPixel`` > 1) or multi-frame."""
    import pydicom

    try:
        ds = pydicom.dcmread(path)
        samples, frames = int(ds.get("SamplesPerPixel", 1) or 1), int(ds.get("NumberOfFrames", 1) or 1)
    except Exception as e:
        raise InputError(f"{path}: unreadable DICOM ({e.__class__.__name__}: {e})") from None
    modality = derived_modality(ds)
    if modality:
        raise InputError(f"{path}: a DICOM {modality} object, made of images but not one: only images are read")
    # a colour image is a screenshot, a secondary capture or a colour map: grey made of it is not
    # what the scanner measured, so it is refused rather than predicted silently wrong
    if samples > 1:
        colour = ds.get("PhotometricInterpretation", "colour")
        raise InputError(f"{path}: a colour DICOM image ({colour}, {samples} samples per pixel): only grey images are read")
    if frames > 1:
        raise InputError(f"{path}: a multi-frame DICOM ({frames} frames in one file): only one slice per file is read")
    try:
        ds.pixel_array  # noqa: B018  (decode now, so a broken file is reported by name)
    except Exception as e:
        raise InputError(f"{path}: unreadable DICOM ({e.__class__.__name__}: {e})") from None
    return ds


def read_dicom(path: Path, files: list[Path] | None = None) -> Case:
    """A DICOM file or series: (x, y, z) float32 volume in slice order (by position along the
    slice normal, not by file name) with its RAS affine (as ITK and MONAI define it).

    ``files``: the series' files (:func:`dicom_series`; ``tumorseg-predict`` makes each series of a
    folder a case of its own). Without them, a folder's DICOM files are read (other files beside
    them, a README, are left alone) and, where they hold several series, the one with the most
    slices is taken and ``Case.note`` says which were left out. Refused with a line naming the
    problem: a file missing ``ImagePositionPatient``, ``ImageOrientationPatient`` or
    ``PixelSpacing`` in a series of several slices (a single slice without them is read with 1 mm
    axial pixels, and a note says so), slices of different sizes or orientations, a degenerate
    orientation, two slices at one position, or uneven slice spacing (a slice missing)."""
    import numpy as np
    import torch
    from monai.data import MetaTensor

    if files is None and path.is_dir():  # a DICOM SEG or report beside the series is not a slice of it
        found = sorted(p for p in path.iterdir() if p.is_file() and is_dicom_file(p))
        files = [f for s in dicom_series(found)[0] for f in s.files]
    elif files is None:
        files = [path]
    loaded = [(f, _read_dicom_file(f)) for f in files]
    if not loaded:
        raise InputError(f"{path}: no DICOM files")
    series: dict[str, list] = {}
    for f, ds in loaded:
        series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((f, ds))
    chosen = max(series, key=lambda uid: len(series[uid]))
    note = None
    if len(series) > 1:
        left = ", ".join(f"{uid or '(none)'} ({len(v)} files)" for uid, v in series.items() if uid != chosen)
        taken = f"{chosen or '(none)'} ({len(series[chosen])} files)"
        note = f"{len(series)} series in the folder: predicted {taken}, left out {left}"
    loaded = series[chosen]
    geometry = {tag: [_geometry(ds, f, tag) for f, ds in loaded] for tag in GEOMETRY_TAGS}
    missing = [tag for tag, values in geometry.items() if any(v is None for v in values)]
    if missing and len(loaded) > 1:  # without them the slices cannot be ordered, spaced or placed
        tag = missing[0]
        f = next(f for (f, _), v in zip(loaded, geometry[tag]) if v is None)
        raise InputError(f"{f}: no {tag}, which placing the slices of a series needs")
    if missing:
        assumed = ", ".join(missing)
        note = "; ".join(filter(None, [note, f"no {assumed}: read as one slice of 1 mm pixels, axial"]))
        geometry = {tag: [v if v is not None else np.array(ASSUMED[tag]) for v in values] for tag, values in geometry.items()}
    orientations = {tuple(np.round(v, 4)) for v in geometry["ImageOrientationPatient"]}
    if len(orientations) != 1:
        raise InputError(f"{path}: slices of {len(orientations)} different orientations in one series (a localiser?)")
    orientation = np.array(next(iter(orientations)), dtype=float)
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    if np.linalg.norm(normal) < 0.5:
        raise InputError(f"{loaded[0][0]}: degenerate ImageOrientationPatient {list(orientation)}")
    position = {id(ds): p for (_, ds), p in zip(loaded, geometry["ImagePositionPatient"])}
    spacing = {id(ds): s for (_, ds), s in zip(loaded, geometry["PixelSpacing"])}
    datasets = [ds for _, ds in loaded]
    datasets.sort(key=lambda ds: (float(position[id(ds)] @ normal), int(ds.get("InstanceNumber", 0) or 0)))
    first = datasets[0]
    shapes = {ds.pixel_array.shape for ds in datasets}
    if len(shapes) != 1:
        raise InputError(f"{path}: slices of different sizes {sorted(shapes)} in one series")
    if len(datasets) > 1:
        gaps = np.diff([float(position[id(ds)] @ normal) for ds in datasets])
        if gaps.min() <= 1e-3:
            raise InputError(f"{path}: two slices at one position (duplicates, or several acquisitions in one series)")
        if gaps.max() - gaps.min() > 0.1 * gaps.mean():
            spread = f"{gaps.min():.3g} to {gaps.max():.3g} mm"
            raise InputError(f"{path}: uneven slice spacing ({spread}): a slice is missing, or the series is not one volume")
    volume = np.stack([_rescaled(ds).T for ds in datasets], axis=-1)  # (cols=x, rows=y, z)
    dy, dx = spacing[id(first)]
    if len(datasets) > 1:
        step = (position[id(datasets[-1])] - position[id(first)]) / (len(datasets) - 1)
    else:
        step = normal * float(first.get("SliceThickness", 1) or 1)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row_dir * dx, col_dir * dy, step, position[id(first)]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # LPS (DICOM) -> RAS (NIfTI, MONAI)
    image = MetaTensor(torch.as_tensor(volume)[None], affine=torch.as_tensor(affine))
    return Case(path, "dicom", image, datasets=datasets, note=note)


def _rescaled(ds):
    import numpy as np

    arr = ds.pixel_array.astype(np.float32)
    return arr * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)


def datalist_items(path: str | Path, key: str, base_dir: str | Path, negatives: bool = True) -> list[dict]:
    """The items of list ``key`` of a MONAI datalist (``monai.data.load_decathlon_datalist``),
    checked before any engine starts: the datalist readable, the list there, every image and
    label file present. ``negatives`` false leaves out the items marked ``"tumour": 0``; the
    mark itself is dropped from every item (a batch collates only keys that all its items share,
    and only the negatives carry it).
    Raises :class:`InputError` naming the file and the problem (the first missing files and
    how many)."""
    import json

    from monai.data import load_decathlon_datalist

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no datalist (convert the data first: tumorseg-convert, or give --dataset_dir)")
    try:
        listed = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not a JSON datalist ({e.__class__.__name__})") from None
    if not isinstance(listed, dict) or not isinstance(listed.get(key), list):
        found = sorted(k for k, v in listed.items() if isinstance(v, list)) if isinstance(listed, dict) else []
        raise InputError(f"{path}: no list {key!r} (lists there: {', '.join(found) or 'none'})")
    try:
        items = load_decathlon_datalist(str(path), data_list_key=key, base_dir=str(base_dir))
    except (TypeError, ValueError, AttributeError) as e:
        raise InputError(f"{path}: list {key!r} is not a list of items with an image ({e})") from None
    missing = [f for item in items for k in ("image", "label") if k in item for f in [item[k]] if not Path(f).is_file()]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise InputError(f"{path}: {len(missing)} file(s) of list {key!r} missing: {shown}")
    return [{k: v for k, v in item.items() if k != "tumour"} for item in items if negatives or item.get("tumour", 1)]
