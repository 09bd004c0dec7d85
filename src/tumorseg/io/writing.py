"""Writing a case's outputs: the mask in the input's own format and geometry (PNG; NIfTI with the
input's affine and header; DICOM SEG referencing the source series), an overlay for a person,
and a JSON summary. Every file is written atomically (``tumorseg.io.files.write_atomic``)."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Set
from pathlib import Path

import numpy as np

from tumorseg.io.files import write_atomic
from tumorseg.io.reading import SLICE_AXCODES

# letters at the (top, bottom, left, right) of a canonical axial slice as panel() draws it
RADIOLOGICAL_LETTERS = ("A", "P", "R", "L")
assert SLICE_AXCODES == "LPS", "RADIOLOGICAL_LETTERS follow from SLICE_AXCODES"


def png_bytes(mask_xy: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(mask_xy.T).astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def nifti_gz_bytes(mask: np.ndarray, affine, header=None) -> bytes:
    import gzip

    import nibabel as nib

    img = nib.Nifti1Image(mask.astype(np.uint8), np.asarray(affine, dtype=np.float64), header=header)
    img.set_data_dtype(np.uint8)
    img.header.set_slope_inter(1, 0)
    return gzip.compress(img.to_bytes(), mtime=0)


def seg_bytes(mask: np.ndarray, datasets) -> bytes:
    """DICOM SEG (highdicom) of an (x, y, z) mask in the series' slice order."""
    import highdicom as hd
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


def overlay_png(volume: np.ndarray, mask: np.ndarray, title: str, letters=None) -> bytes:
    """The slice (or the up to three slices of a volume, along its last axis, with most tumour;
    the middle one if none) with the prediction outlined in red; ``letters`` as in ``panel``."""
    from tumorseg.evaluation.visualize import panel

    if volume.ndim == 2:
        picks = [(volume, mask, title)]
    else:
        area = mask.reshape(-1, mask.shape[-1]).sum(0)
        order = [int(k) for k in np.argsort(-area)[:3] if area[k] > 0] or [mask.shape[-1] // 2]
        picks = [(volume[..., k], mask[..., k], f"{title} slice {k}") for k in sorted(order)]
    cases = [(img, np.zeros_like(msk, dtype=bool), msk, caption[:40]) for img, msk, caption in picks]
    buf = io.BytesIO()
    panel(cases, letters=letters).save(buf, format="PNG")
    return buf.getvalue()


class OutputError(Exception):
    """An output that must not or cannot be written; reported as one line naming the file."""


# why a write failed, in a user's words (the errno's own text, "File too large", says less)
WRITE_PROBLEMS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EFBIG: "the file is too large for the file size limit (ulimit -f) or the file system",
    errno.EROFS: "the folder is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EEXIST: "a part of the path is a file, not a folder",
    errno.ENAMETOOLONG: "the name is too long",
}


def write_problem(e: OSError) -> str:
    """``e`` in plain words: "the disk is full", "the folder is read-only", "permission denied"."""
    return WRITE_PROBLEMS.get(e.errno or 0, e.strerror or e.__class__.__name__)


class OutputFolder:
    """The output folder of ``tumorseg-predict`` (and of the bundle's inference config): writes a
    case's files only where that overwrites nothing the command did not create, all of them or
    none, and records what it wrote.

    ``.tumorseg-predict.json`` in the folder lists every file written (relative path -> SHA-256;
    while a case's files are being put in place, a list of the old and the new SHA-256). A file
    may be replaced only if it is listed there with its current content (a re-run, or a resumed
    one, also after a run was killed); anything else already there (a BIDS sidecar, a file edited
    since, an input) is refused, as is any path in ``protected`` (the inputs).
    """

    MANIFEST = ".tumorseg-predict.json"

    def __init__(self, root: Path, protected: Set[Path] = frozenset()):
        self.root = Path(root)
        self.protected = {Path(p).resolve() for p in protected}
        self.done: list[str] = []  # the cases written by this object, by their summary's name
        path = self.root / self.MANIFEST
        try:
            self.written = json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, ValueError):
            self.written = {}  # unreadable: nothing counts as ours, so nothing is overwritten
        self._remove_stale_temporaries()

    def _remove_stale_temporaries(self) -> None:
        """The temporary files a killed run left beside files it was writing (``.x_seg.png.*.tmp``)."""
        names: dict[Path, set[str]] = {self.root: {self.MANIFEST}}
        for rel in self.written:
            names.setdefault((self.root / rel).parent, set()).add(Path(rel).name)
        for folder, ours in names.items():
            try:
                for p in folder.iterdir():
                    if p.name.endswith(".tmp") and p.name[1:].rsplit(".", 2)[0] in ours:
                        p.unlink()
            except OSError:
                pass  # a folder gone or unreadable: nothing to tidy there

    @staticmethod
    def _digest(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    def _ours(self, rel: str, digest: str) -> bool:
        recorded = self.written.get(rel)
        return digest in recorded if isinstance(recorded, list) else digest == recorded

    def _check(self, path: Path) -> None:
        if path.resolve() in self.protected:
            raise OutputError(f"{path}: is an input; not overwritten")
        if path.is_symlink() or path.exists():
            rel = path.relative_to(self.root).as_posix()
            if not path.is_file() or path.is_symlink() or not self._ours(rel, self._digest(path)):
                raise OutputError(f"{path}: exists and was not written by tumorseg-predict; not overwritten")

    def _save(self, written: dict) -> None:
        write_atomic(self.root / self.MANIFEST, (json.dumps(written, indent=0, sort_keys=True) + "\n").encode())

    def prepare(self) -> None:
        """Create the folder and try a file in it: a folder that cannot be written at all is one
        :class:`OutputError` in plain words, before anything is predicted."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=self.root).close()
        except OSError as e:
            problem = f"{self.root}: cannot write: {write_problem(e)}"
            raise OutputError(f"{problem}; nothing was predicted, nothing there changed") from None

    def claim(self, paths: list) -> None:
        """Before a writer that is not ours (the bundle's ``SaveImaged``) runs: one ``error:`` line
        per path it must not overwrite, then exit status 1 with nothing written."""
        import sys

        from tumorseg.io.files import show

        refused = []
        for path in map(Path, paths):
            try:
                self._check(path)
            except OutputError as e:
                refused.append(e)
        for problem in refused:
            print(f"error: {show(problem)}", file=sys.stderr)
        if refused:
            raise SystemExit(1)

    def record(self, paths: list) -> None:
        """Record files another writer made for this command, so that a re-run may replace them."""
        for path in map(Path, paths):
            if path.is_file():
                self.written[path.relative_to(self.root).as_posix()] = self._digest(path)
        self._save(self.written)

    def write(self, files: dict[Path, bytes]) -> None:
        """Write one case's files, all or none: each is written in full to a temporary file beside
        it first (where a full disk, a read-only folder or a missing permission shows; on failure
        the temporary files go and nothing of the case has changed), then all are renamed into
        place. A failure is one :class:`OutputError` saying what happened and what was kept."""
        for path in files:
            self._check(path)
        rel = {path: path.relative_to(self.root).as_posix() for path in files}
        new = {path: hashlib.sha256(data).hexdigest() for path, data in files.items()}
        staged: dict[Path, Path] = {}
        renamed, where = 0, self.root / self.MANIFEST
        try:
            # old and new content both count as ours until the renames are done: a run killed
            # among them leaves files that a re-run may replace
            pending = {rel[p]: [d for d in (self._current(p), new[p]) if d] for p in files}
            self._save({**self.written, **pending})
            for where, data in files.items():
                if self._current(where) != new[where]:  # an identical file is left untouched
                    staged[where] = _stage(where, data)
            for where, tmp in staged.items():
                os.replace(tmp, where)
                renamed += 1
        except OSError as e:
            for tmp in list(staged.values())[renamed:]:
                tmp.unlink(missing_ok=True)
            raise OutputError(self._failure(e, where, renamed)) from None
        self.written.update({rel[p]: new[p] for p in files})
        try:
            self._save(self.written)
        except OSError:
            pass  # the files are in place, and the manifest already counts them as ours
        self.done.append(rel[list(files)[-1]].removesuffix(".json"))  # the summary comes last

    def _current(self, path: Path) -> str | None:
        return self._digest(path) if path.is_file() else None

    def _failure(self, e: OSError, where: Path, renamed: int) -> str:
        what = "some outputs of this case were replaced: run it again" if renamed else "nothing of this case was written"
        kept = ""
        if self.done:
            names = ", ".join(self.done[:3]) + (", ..." if len(self.done) > 3 else "")
            kept = f"; the {len(self.done)} case(s) written before it are complete ({names})"
        return f"{where}: cannot write: {write_problem(e)}; {what}{kept}"


def _stage(path: Path, data: bytes) -> Path:
    """``data`` in a new temporary file beside ``path`` (``.name.XXXXXXXX.tmp``), to rename later."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def mask_bytes(case, mask: np.ndarray) -> bytes:
    """The mask file of ``case`` (:class:`~tumorseg.io.reading.Case`), uint8 0/1 in its voxel
    order: a PNG for a slice (``<name>_seg.png``), else a NIfTI (``<name>_seg.nii.gz``) with the
    input's affine (and, for a NIfTI input, its header; a 4D file of one volume keeps its shape)."""
    if case.kind == "slice":
        return png_bytes(mask)
    if case.kind == "nifti":
        shape = case.nifti.shape
        data = mask.reshape(shape) if int(np.prod(shape)) == mask.size else mask
        return nifti_gz_bytes(data, case.nifti.affine, case.nifti.header.copy())
    return nifti_gz_bytes(mask, np.asarray(case.image.affine))


def encode_outputs(case, mask: np.ndarray, outputs: dict[str, Path], overlay: bytes, summary: dict) -> tuple[dict, dict]:
    """The bytes of every output of a case (mask in ``case``'s format and voxel order, DICOM SEG
    for DICOM, ``overlay``, the ``summary`` with the paths added), keyed by path; and the summary."""
    files = {outputs["mask"]: mask_bytes(case, mask)}
    if case.kind == "dicom":
        try:
            files[outputs["dicom_seg"]] = seg_bytes(mask if mask.ndim == 3 else mask[..., None], case.datasets)
        except Exception as e:  # highdicom checks the source series: say what it missed
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else e.__class__.__name__
            raise OutputError(f"{case.path}: no DICOM SEG could be made from this series ({first})") from None
    files[outputs["overlay"]] = overlay
    kinds = {path: key for key, path in outputs.items()}
    summary = {**summary, "outputs": {kinds[p]: str(p) for p in files}}
    files[outputs["summary"]] = (json.dumps(summary, indent=1) + "\n").encode()
    return files, summary
