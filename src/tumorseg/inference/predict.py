"""``tumorseg-predict``: the bundle's model on new scans, one case at a time.

Inputs: PNG/JPG slices of any size, NIfTI volumes (2D or 3D, ``.nii``/``.nii.gz``), a DICOM
file, or a folder of DICOM files: each series in it (``SeriesInstanceUID``) is a case of its own
(``study_series3`` for ``SeriesNumber`` 3, where a folder holds several; a note lists them), and
other files beside them (a README) are left out with a note. Any other folder is expanded into
the files directly in it. A file named twice (or also through a link or its folder) is predicted
once, with a note. A colour (RGB) or multi-frame DICOM file is refused in one line: grey made of
a colour image is not what the scanner measured. A series of several slices needs
``ImagePositionPatient``, ``ImageOrientationPatient`` and ``PixelSpacing`` in every file (else one
line naming the file and the tag); a lone slice without them is read with 1 mm axial pixels.

Before anything runs, the output names of all cases are planned together (unique across every
kind of input: ``scan.nii.gz`` beside the DICOM folder ``scan/`` gives ``scan_nii_gz`` and
``scan``) and printed, one ``plan:`` line per case.

Volumes are first put in the canonical slice orientation (MONAI's ``Orientation`` to ``LPS``,
``tumorseg.io.reading``): whatever the order in which a file stores its voxels, the network sees
axial slices laid out as a radiologist reads them (anterior up, the patient's right on the left),
and the mask goes back to the file's own voxel order and affine exactly. ``--axis K`` instead
slices along voxel axis K as stored. PNG/JPG slices are taken as they are displayed.

Each slice goes through the bundle's ``slice_preprocessing`` (scaled to [0, 1], zoomed so that its
longer side is ``image_size``), the inferer of ``inference.yaml`` (sliding window, flip TTA) and
the bundle's ``postprocessing`` (the presence gate, then the box fit or the threshold), and is
zoomed back (nearest neighbour). Slices with almost no foreground are not run at all.

Outputs per case, in the input's geometry, written atomically: the mask (PNG for PNG/JPG, NIfTI
with the input's affine for NIfTI and DICOM), for DICOM also a DICOM SEG referencing the source
series, an overlay PNG (volumes: axial slices with orientation letters), and a JSON summary. A
case's outputs are written all or none (``tumorseg.io.writing.OutputFolder``); a write that fails
(the disk is full, the folder is read-only, permission denied) is one line saying so and what was
kept, and the batch goes on. An output folder that cannot be written at all stops the run before
any case (exit status 2); any case that failed gives exit status 1 at the end.

A study or series on a PACS is given by its DICOMweb URL (``http://host/dicom-web/studies/<UID>``,
optionally ``/series/<UID>``): each MR series is fetched, predicted as a DICOM series folder, and
its DICOM SEG stored back on the server (``tumorseg.inference.dicomweb``: credentials from the environment
or netrc, never on the command line).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence, Set
from dataclasses import dataclass
from pathlib import Path

from tumorseg.bundle import BUNDLE
from tumorseg.io.files import show
from tumorseg.io.reading import (
    NIFTI_SUFFIXES,
    SLICE_AXCODES,
    SLICE_SUFFIXES,
    InputError,
    Series,
    dicom_series,
    is_dicom,
    is_dicom_file,
    read_case,
)


@dataclass(frozen=True)
class Input:
    """One case of a run: a file or a folder ``path``; for a DICOM folder, the ``series``
    (``SeriesInstanceUID``) and its ``files``. Where a folder holds several series, ``label``
    (``series3`` for ``SeriesNumber`` 3) tells them apart in names and messages. ``str()`` names the
    case in messages and keys its output stem."""

    path: Path
    series: str | None = None
    files: tuple[Path, ...] = ()
    label: str | None = None
    description: str = ""

    def __str__(self) -> str:
        return str(self.path) if self.label is None else f"{self.path} ({self.label})"


def _as_input(case) -> Input:
    return case if isinstance(case, Input) else Input(Path(case))


def _series_labels(series: list[Series]) -> list[str | None]:
    """``series<SeriesNumber>`` where the folder's series have distinct numbers, else ``series1``,
    ``series2``... in the order of their first file; None for a folder's only series."""
    if len(series) == 1:
        return [None]
    numbers = [s.number for s in series]
    if None in numbers or len(set(numbers)) < len(numbers):
        numbers = list(range(1, len(series) + 1))
    return [f"series{n}" for n in numbers]


def folder_cases(folder: Path) -> tuple[list[Input], list[str], list[str]]:
    """The cases of one folder, error lines and notes (:func:`find_cases`)."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    images = {p for p in files if p.name.lower().endswith(SLICE_SUFFIXES + NIFTI_SUFFIXES)}
    # a hidden file is a DICOM file only if it says so (a write interrupted leaves ``.x.dcm.*.tmp``);
    # a DICOMDIR is an index of the files, not an image
    dicoms = {
        p
        for p in files
        if p not in images
        and p.name.upper() != "DICOMDIR"
        and (p.name.lower().endswith(".dcm") or (not p.name.startswith(".") and is_dicom(p)))
    }
    others = [p.name for p in files if p not in images | dicoms and not p.name.startswith(".")]
    notes = []
    if others:
        listed = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        notes.append(f"{folder}: {len(others)} file(s) neither PNG/JPG, NIfTI nor DICOM left out ({listed})")
    if not images and not dicoms:
        return [], [f"{folder}: a folder with no PNG/JPG/NIfTI/DICOM files in it"], []
    if images:  # a folder of files: each file its own case
        return [Input(p) for p in files if p in images | dicoms], [], notes
    try:  # a DICOM study: one case per series
        series, derived = dicom_series(sorted(dicoms))
    except InputError as e:
        return [], [str(e)], notes
    listed = ", ".join(f"{p.name} ({modality})" for p, modality in derived[:5]) + (", ..." if len(derived) > 5 else "")
    if not series:
        return [], [f"{folder}: no DICOM images in it, only derived objects ({listed})"], notes
    if derived:  # e.g. the DICOM SEG of an earlier prediction, copied beside its series
        notes.append(f"{folder}: {len(derived)} DICOM file(s) of derived objects, not images, left out ({listed})")
    labels = _series_labels(series)
    return [Input(folder, s.uid, tuple(s.files), label, s.description) for s, label in zip(series, labels)], [], notes


def find_cases(inputs: list[Path]) -> tuple[list[Input], list[str], list[str]]:
    """Cases in the order given, one error line per input that yields none, and notes.

    A file is a case. A folder holding DICOM files and no PNG/JPG/NIfTI is a DICOM study: one case
    per series (``SeriesInstanceUID``), other files beside them (a README) left out with a note.
    Any other folder contributes the PNG/JPG/NIfTI/DICOM files directly inside it (not its
    subfolders). A case named more than once (twice, through a link, or as a file and inside its
    folder) is predicted once, and a note says so."""
    found, errors, notes = [], [], []
    folders: dict[tuple, list[Input]] = {}  # a folder named twice is looked at (and noted on) once
    for path in inputs:
        if not path.exists():  # also a dangling link or a symlink loop
            errors.append(f"{path}: no such file or folder")
        elif path.is_dir():
            st = path.stat()
            if (st.st_dev, st.st_ino) not in folders:
                cases, problems, remarks = folder_cases(path)
                folders[st.st_dev, st.st_ino] = cases
                errors += problems
                notes += remarks
            found += folders[st.st_dev, st.st_ino]
        else:
            found.append(Input(path))
    named: dict[tuple, list[Input]] = {}
    for case in found:
        st = case.path.stat()  # the file itself, however it is named
        named.setdefault((st.st_dev, st.st_ino, case.series), []).append(case)
    for group in named.values():
        if len(group) > 1:
            also = sorted({str(c) for c in group} - {str(group[0])})
            also_as = f" (also as {', '.join(also)})" if also else ""
            notes.append(f"{group[0]}: named {len(group)} times{also_as}: predicted once")
    return [group[0] for group in named.values()], errors, notes


def _stem(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES + SLICE_SUFFIXES + (".dcm",):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


OUTPUT_SUFFIXES = ("_seg.png", "_seg.nii.gz", "_seg.dcm", "_overlay.png", ".json")


def output_stems(cases: list, taken: Set[str] = frozenset()) -> list[str]:
    """One output stem (a relative path without suffix) per case (a path or an :class:`Input`),
    unique (also ignoring case, for case-insensitive file systems) across all inputs of a run,
    whatever their kind, and predictable: the file's stem (``scan`` for ``scan.nii.gz``, a series
    of a folder holding several: ``study_series3``); where stems clash, the suffix is kept
    (``scan.png`` -> ``scan_png``, ``scan.nii.gz`` -> ``scan_nii_gz`` beside the DICOM folder
    ``scan/``); where that still clashes (the same name in several folders), the smallest tail of
    the parent folders that tells them apart becomes subfolders (``A/s.jpg`` -> ``A/s``,
    ``B/s.jpg`` -> ``B/s``); anything left (only contrived names), or a stem one of whose outputs
    would be a path in ``taken`` (the inputs, relative to the output folder), gets ``-2``,
    ``-3``... in input order."""
    inputs = [_as_input(c) for c in cases]
    resolved = [c.path.resolve() for c in inputs]
    if len(set(zip(resolved, (c.label for c in inputs)))) != len(resolved):
        raise ValueError("the same case is listed twice")
    key = str.casefold

    def clashes(stems):
        seen: dict[str, int] = {}
        for s in stems:
            seen[key(s)] = seen.get(key(s), 0) + 1
        return {k for k, n in seen.items() if n > 1}

    def labelled(name: str, case: Input) -> str:
        return f"{name}_{case.label}" if case.label else name

    stems = [labelled(_stem(p), c) for p, c in zip(resolved, inputs)]
    clash = clashes(stems)
    stems = [labelled(p.name.replace(".", "_"), c) if key(s) in clash else s for p, c, s in zip(resolved, inputs, stems)]
    clash = clashes(stems)
    if clash:
        groups: dict[str, list[int]] = {}
        for i, s in enumerate(stems):
            if key(s) in clash:
                groups.setdefault(key(s), []).append(i)
        for members in groups.values():
            folders = [resolved[i].parent.parts[1:] for i in members]
            for depth in range(1, max(map(len, folders)) + 1):
                tails = ["/".join((*f[-depth:], stems[i])) for i, f in zip(members, folders)]
                if len(set(map(key, tails))) == len(tails):
                    for i, t in zip(members, tails):
                        stems[i] = t
                    break
    used = {t.casefold() for t in taken}
    for i, stem in enumerate(stems):
        candidate, n = stem, 1
        while any(key(candidate + suffix) in used for suffix in OUTPUT_SUFFIXES):
            n += 1
            candidate = f"{stem}-{n}"
        stems[i] = candidate
        used.update(key(candidate + suffix) for suffix in OUTPUT_SUFFIXES)
    return stems


def case_mask(predictor, case, axis: int | None = None):
    """The mask of a case read by :func:`~tumorseg.io.reading.read_case`, in its own voxel order,
    with the per-slice peak probabilities and what the overlay shows: ``(mask, peaks, shown,
    shown_mask, orientation, letters)``; ``axis`` as in :func:`predict_case`. MONAI Label's app
    predicts the series of a PACS through it, as ``tumorseg-predict`` does."""
    import numpy as np

    from tumorseg.io.writing import RADIOLOGICAL_LETTERS

    stored = case.image[0].numpy()
    reference = (float(np.nanmin(stored)), float(np.nanmax(stored))) if stored.size else (0.0, 0.0)
    letters = None
    if case.kind == "slice" or axis is not None:
        view = stored
        mask, peaks = predictor.predict_volume(view, axis=-1 if axis is None else axis, reference=reference)
        stored_axis = -1 if axis is None else axis
        shown, shown_mask = (
            (view, mask) if view.ndim == 2 else (np.moveaxis(view, stored_axis, -1), np.moveaxis(mask, stored_axis, -1))
        )
        orientation = "as displayed" if case.kind == "slice" else f"voxel axis {axis} as stored"
    else:
        canonical = case.canonical()
        view = canonical[0].numpy()
        if view.ndim == 3 and 1 in view.shape[:2]:  # one sagittal or coronal slice: its own plane, as stored
            plane = stored.squeeze(axis=tuple(k for k in range(stored.ndim) if stored.shape[k] == 1) or None)
            if plane.ndim != 2:
                raise InputError(f"{stored.shape} holds no 2D plane")
            m, peaks = predictor.predict_volume(plane, reference=reference)
            mask, shown, shown_mask = m.reshape(stored.shape), plane, m
            orientation = "single slice, as stored"
        else:
            mask_c, peaks = predictor.predict_volume(view, axis=-1, reference=reference)
            mask = case.from_canonical(canonical, mask_c)
            shown, shown_mask, letters = view, mask_c, RADIOLOGICAL_LETTERS
            orientation = f"canonical {SLICE_AXCODES[: view.ndim]}, axial slices"
    return mask, peaks, shown, shown_mask, orientation, letters


def predict_case(
    predictor, path: Path | Input, output, axis: int | None = None, keep_largest: bool = False, stem: str | None = None
) -> dict:
    """Predict one case (a path or an :class:`Input`) and write its outputs; returns the JSON
    summary.

    ``axis`` None: volumes in the canonical orientation, axial slices; an int: slices along that
    voxel axis as stored. ``keep_largest`` keeps only the largest connected tumour region (in 3D
    for volumes)."""
    import numpy as np

    from tumorseg.io.writing import OutputFolder, encode_outputs, overlay_png

    given = _as_input(path)
    path = given.path
    case = read_case(path, list(given.files) or None)
    if case.note:
        print(f"note: {show(f'{given}: {case.note}')}", file=sys.stderr)
    stored = case.image[0].numpy()
    try:
        mask, peaks, shown, shown_mask, orientation, letters = case_mask(predictor, case, axis)
    except InputError as e:
        raise InputError(f"{given}: {e}") from None
    if keep_largest and mask.any():
        from tumorseg.postprocessing.volume import keep_largest as largest

        mask, shown_mask = largest(mask), largest(shown_mask)
    folder = output if isinstance(output, OutputFolder) else OutputFolder(Path(output), {path})
    output = folder.root
    stem = stem or _stem(path)
    outputs = {
        "mask": output / f"{stem}_seg.{'png' if case.kind == 'slice' else 'nii.gz'}",
        "dicom_seg": output / f"{stem}_seg.dcm",
        "overlay": output / f"{stem}_overlay.png",
        "summary": output / f"{stem}.json",
    }
    spacing = case.spacing
    pixels = int(mask.sum())
    unit = float(np.prod(spacing[: mask.ndim])) if spacing else None
    summary = {
        "input": str(path),
        "series_instance_uid": str(case.datasets[0].get("SeriesInstanceUID", "")) if case.datasets else None,
        "kind": case.kind,
        "shape": list(stored.shape),
        "spacing": spacing,
        "slicing": orientation,
        "tumour_pixels": pixels,
        ("tumour_area_mm2" if stored.ndim == 2 else "tumour_volume_mm3"): pixels * unit if unit else None,
        "slices_with_tumour": [int(k) for k in np.flatnonzero(shown_mask.reshape(-1, shown_mask.shape[-1]).any(0))]
        if shown_mask.ndim == 3
        else None,
        "max_probability": max(peaks, default=0.0),
        "threshold": predictor.threshold,
        "tta": predictor.tta,
        "box_fit": predictor.box_fit,
        "refine": predictor.refine,
        "runtime": predictor.runtime,
        "keep_largest": keep_largest,
        "checkpoint": str(predictor.checkpoint),
        "note": case.note,
    }
    files, summary = encode_outputs(case, mask, outputs, overlay_png(shown, shown_mask, Path(stem).name, letters), summary)
    folder.write(files)
    return summary


def predict_or_say_why(predictor, case, output, stem=None, axis=None, keep_largest=False, write=print) -> bool:
    """:func:`predict_case`, and a case that fails gets one ``error:`` line (through ``write``)
    instead of an exception, so a batch goes on. Returns whether the case was predicted."""
    from tumorseg.io.writing import OutputError

    try:
        predict_case(predictor, case, output, axis=axis, keep_largest=keep_largest, stem=stem)
        return True
    except (InputError, OutputError) as e:
        write(f"error: {show(e)}", file=sys.stderr)
    except Exception as e:  # anything else one case raises: its line, and the batch goes on
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        write(f"error: {show(f'{case}: {e.__class__.__name__}: {detail}')}", file=sys.stderr)
    return False


def predict_cases(predictor, cases: list, output, stems: dict | None = None, axis=None, keep_largest=False, progress=False):
    """Predict each case (a path or an :class:`Input`) into ``output`` (an :class:`OutputFolder`);
    a case that fails gets one ``error:`` line and the others go on. ``stems``: output stem per
    case (``str(case)`` keys). Returns the number of cases that failed."""
    from tqdm import tqdm

    stems = stems or {}
    ran = tqdm(cases, unit="case", disable=not progress or None)
    return sum(not predict_or_say_why(predictor, c, output, stems.get(str(c)), axis, keep_largest, tqdm.write) for c in ran)


def case_engine(predictor, output, stems: dict, handlers: Sequence = ()):
    """The bundle inference's engine: an ignite ``Engine`` that predicts one case per iteration
    (:func:`predict_or_say_why`), so MONAI's and MLflow's handlers attach to it as to an
    evaluator; ``engine.state.failed`` counts the cases that failed."""
    from ignite.engine import Engine, Events

    def step(engine, case) -> bool:
        done = predict_or_say_why(predictor, case, output, stems.get(str(case)))
        engine.state.failed += not done
        return done

    engine = Engine(step)
    engine.add_event_handler(Events.STARTED, lambda e: setattr(e.state, "failed", 0))
    for handler in handlers:
        handler.attach(engine)
    return engine


def output_plan(cases: list, output_dir: str | Path | None) -> tuple[set[Path], dict[str, str]]:
    """What an output folder must never overwrite (the cases, and the files of series folders),
    and a unique output stem per case (keyed by ``str(case)``), planned for all cases together
    before any runs, that avoids the inputs lying inside ``output_dir``."""
    paths = {_as_input(c).path for c in cases}
    protected = paths | {f for p in paths if p.is_dir() for f in p.iterdir()}
    inside = set()
    if output_dir is not None:
        root = Path(output_dir).resolve()
        inside = {p.resolve().relative_to(root).as_posix() for p in protected if p.resolve().is_relative_to(root)}
    return protected, dict(zip(map(str, cases), output_stems(cases, inside)))


def series_notes(cases: list, stems: dict[str, str]) -> list[str]:
    """One note per folder holding several DICOM series: how many, and the output name of each."""
    folders: dict[Path, list[str]] = {}
    for case in map(_as_input, cases):
        if case.label:
            described = f" {case.description!r}" if case.description else ""
            folders.setdefault(case.path, []).append(f"{stems[str(case)]} = {case.series}{described} ({len(case.files)} files)")
    return [
        f"{folder}: {len(named)} DICOM series (SeriesInstanceUID) in one folder, each a case of its own: {'; '.join(named)}"
        for folder, named in folders.items()
    ]


def plan_lines(cases: list, stems: dict[str, str], output: Path) -> list[str]:
    """The run's plan, printed before anything runs: each case and the outputs it will get."""
    lines = []
    for case in map(_as_input, cases):
        slice_ = case.path.name.lower().endswith(SLICE_SUFFIXES)
        dicom = case.series is not None or (case.path.is_file() and is_dicom_file(case.path))
        suffixes = ["_seg.png" if slice_ else "_seg.nii.gz", *(["_seg.dcm"] if dicom else []), "_overlay.png", ".json"]
        lines.append(f"plan: {show(case)} -> {show(output / stems[str(case)])} ({', '.join(suffixes)})")
    return lines


def inference_inputs(input_dir: str | Path, output_dir: str | Path | None = None) -> dict:
    """The cases the bundle's ``inference.yaml`` predicts from ``input_dir`` (as ``find_cases``):
    ``cases``, ``stems`` (a unique output stem per case, keyed by ``str(case)``), ``protected``
    (the inputs, never overwritten), ``refused`` (inputs refused before any case runs, each with
    its ``error:`` line printed here) and ``found`` (all inputs)."""
    cases, errors, notes = find_cases([Path(input_dir)])
    for line in errors:
        print(f"error: {show(line)}", file=sys.stderr)
    protected, stems = output_plan(cases, output_dir)
    for line in notes + series_notes(cases, stems):
        print(f"note: {show(line)}", file=sys.stderr)
    return {"cases": cases, "stems": stems, "protected": protected, "refused": len(errors), "found": len(cases) + len(errors)}


def report_inference(inputs: dict, output_dir, failures: int = 0) -> None:
    """The bundle inference's last line; exit status 1 if any input failed (after the others)."""
    failed = inputs["refused"] + failures
    print(f"{inputs['found'] - failed} of {inputs['found']} inputs predicted into {output_dir}")
    if failed:
        raise SystemExit(1)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tumorseg-predict", description=__doc__.splitlines()[0].split(": ", 1)[1])
    p.add_argument(
        "inputs",
        nargs="+",
        type=Path,
        help="PNG/JPG/NIfTI/DICOM files, DICOM series folders, folders of files, or DICOMweb study/series URLs",
    )
    p.add_argument("--output", "-o", type=Path, required=True, help="folder for the outputs (created)")
    p.add_argument("--bundle", type=Path, default=BUNDLE, help="bundle folder (default: the repository's)")
    p.add_argument("--checkpoint", type=Path, help="weights (default: <bundle>/models/model.pt)")
    p.add_argument(
        "--axis",
        type=int,
        choices=(0, 1, 2),
        help="slice 3D volumes along this voxel axis as stored (default: axial slices of the canonical orientation)",
    )
    p.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="test-time augmentation, averaging over the slice's flips (default: the inference config's tta)",
    )
    p.add_argument(
        "--box-fit",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="one rectangle per slice, of highest expected Dice (default: the inference config's box_fit)",
    )
    p.add_argument(
        "--refine",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="refine the box fit's box by the second stage, on a window around it (default: the inference config's refine)",
    )
    p.add_argument("--keep-largest", action="store_true", help="keep only the largest connected tumour region")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="bundle config override, e.g. --set image_size=128 (JSON values)",
    )
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from tumorseg.inference.dicomweb import is_url

    if any(map(is_url, argv)):  # studies or series on a PACS among the inputs (tumorseg.inference.dicomweb)
        from tumorseg.inference.dicomweb import predict_with_urls

        return predict_with_urls(argv)
    args = build_parser().parse_intermixed_args(argv)
    from tumorseg.bundle import parse_overrides

    overrides = parse_overrides(args.set)
    cases, errors, notes = find_cases(args.inputs)
    for line in errors:
        print(f"error: {show(line)}", file=sys.stderr)
    from tumorseg.inference.predictor import Predictor
    from tumorseg.io.writing import OutputError, OutputFolder

    if args.output.exists() and not args.output.is_dir():
        print(f"error: {args.output}: the output must be a folder, and this is a file", file=sys.stderr)
        return 2
    try:
        predictor = Predictor.from_bundle(
            args.bundle, args.checkpoint, overrides, tta=args.tta, box_fit=args.box_fit, refine=args.refine
        )
    except InputError as e:
        print(f"error: {show(e)}", file=sys.stderr)
        return 2
    protected, stems = output_plan(cases, args.output)
    for line in notes + series_notes(cases, stems):
        print(f"note: {show(line)}", file=sys.stderr)
    folder = OutputFolder(args.output, protected)
    try:  # a folder that cannot be written at all: one line, before any case is predicted
        folder.prepare()
    except OutputError as e:
        print(f"error: {show(e)}", file=sys.stderr)
        return 2
    for line in plan_lines(cases, stems, args.output):
        print(line, flush=True)
    failed = predict_cases(predictor, cases, folder, stems, args.axis, args.keep_largest, progress=not args.no_progress)
    print(f"{len(cases) - failed} of {len(cases) + len(errors)} inputs predicted into {args.output}")
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
