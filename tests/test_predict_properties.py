"""Properties of ``tumorseg-predict`` over generated inputs, with the real command on real files:
every DICOM series is a case of its own, no two inputs share an output (whatever their kind),
a file named twice is predicted once, every refusal is one line naming the file and the reason,
and a failed write (a full disk, a read-only folder, a run killed midway) loses nothing and mixes
nothing: each case's outputs are that case's alone, or absent.

Small images and ``--no-tta`` keep it fast; the shipped model gives real masks.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from data_tools.nifti_to_dicom import write_series
from tumorseg.inference.predict import OUTPUT_SUFFIXES, find_cases, output_plan
from tumorseg.io.writing import write_problem

REPO = Path(__file__).resolve().parents[1]
COMMAND = Path(sys.executable).with_name("tumorseg-predict")
FAST = ["--no-progress", "--no-tta"]
JPGS = sorted((REPO / "data" / "brain-tumor-coco-sample" / "test").glob("*.jpg"))
MANIFEST = ".tumorseg-predict.json"


# ---- inputs ---------------------------------------------------------------------------------


def grey(k: int, size: int) -> np.ndarray:
    """The sample's k-th test slice in grey, ``size`` x ``size``, as (x, y)."""
    return np.asarray(Image.open(JPGS[k % len(JPGS)]).convert("L").resize((size, size)), dtype=np.float32).T


def series(folder: Path, first: int, size: int, origin_z: float, number: int, prefix: str = "", n: int = 3) -> tuple:
    """A DICOM series of ``n`` sample slices written into ``folder`` (which may hold others); its
    SeriesInstanceUID and its SOPInstanceUIDs in slice order."""
    volume = np.stack([grey(first + k, size) for k in range(n)], axis=-1)
    affine = np.diag([-1.0, -1.0, 2.0, 1.0])
    affine[2, 3] = origin_z
    with tempfile.TemporaryDirectory() as tmp:
        files = write_series(volume, affine, Path(tmp) / "s", shuffle_names=False, series_description=f"sequence {number}")
        folder.mkdir(parents=True, exist_ok=True)
        uids = []
        for k, f in enumerate(files):
            ds = pydicom.dcmread(f)
            ds.SeriesNumber = number
            ds.save_as(folder / f"{prefix}{k:03d}.dcm")
            uids.append(ds.SOPInstanceUID)
    return ds.SeriesInstanceUID, uids


def colour(path: Path) -> None:
    """A secondary-capture-like RGB DICOM file."""
    ds = pydicom.dcmread(pydicom.data.get_testdata_file("MR_small.dcm"))
    rgb = np.repeat(np.asarray(Image.open(JPGS[0]).resize((ds.Columns, ds.Rows)).convert("RGB"))[..., :1], 3, axis=-1)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = rgb.astype(np.uint8).tobytes()
    ds.save_as(path)


def multi_frame(path: Path) -> None:
    ds = pydicom.dcmread(pydicom.data.get_testdata_file("MR_small.dcm"))
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    ds.save_as(path)


def make_inputs(root: Path) -> dict:
    """Hostile but valid inputs (and three refusals); returns what each case must come from."""
    study = root / "study"  # two series of one size in one folder, and sidecars
    a = series(study, 0, 40, 0.0, 4, "a")
    b = series(study, 3, 40, 50.0, 7, "b")
    (study / "README.txt").write_text("two sequences")
    (study / "checksums.md5").write_text("0 a000.dcm")
    nib.save(nib.Nifti1Image(np.stack([grey(k, 32) for k in (6, 7, 0)], -1), np.eye(4)), root / "scan.nii.gz")
    scan = series(root / "scan", 1, 36, -10.0, 1)  # the DICOM folder beside scan.nii.gz
    Image.fromarray(grey(2, 48).T.astype(np.uint8)).save(root / "dup.png")
    (root / "link.png").symlink_to(root / "dup.png")
    colour(root / "rgb.dcm")
    multi_frame(root / "frames.dcm")
    series(root / "notag", 4, 32, 0.0, 2)
    ds = pydicom.dcmread(root / "notag" / "001.dcm")
    del ds.PixelSpacing
    ds.save_as(root / "notag" / "001.dcm")
    good = [study, root / "scan.nii.gz", root / "scan", root / "dup.png", root / "dup.png", root / "link.png"]
    bad = {root / "rgb.dcm": "colour DICOM", root / "frames.dcm": "multi-frame", root / "notag" / "001.dcm": "PixelSpacing"}
    expected = {  # stem -> (input, (SeriesInstanceUID, SOPInstanceUIDs in slice order) of DICOM, shape)
        "study_series4": (study, a, [40, 40, 3]),
        "study_series7": (study, b, [40, 40, 3]),
        "scan": (root / "scan", scan, [36, 36, 3]),
        "scan_nii_gz": (root / "scan.nii.gz", None, [32, 32, 3]),
        "dup": (root / "dup.png", None, [48, 48]),
    }
    return {"good": good, "bad": bad, "expected": expected, "all": [*good, root / "rgb.dcm", root / "frames.dcm", root / "notag"]}


def run(
    *args, limit_kb: int | None = None, read_only: Path | None = None, full_disk: tuple[Path, int, Path] | None = None
) -> subprocess.CompletedProcess:
    """``tumorseg-predict`` as a user runs it, optionally under ``ulimit -f``, with ``read_only``
    mounted read-only, or with ``full_disk = (folder, KiB, copy)``: a file system of that size
    (tmpfs) mounted on the folder, whose content is copied to ``copy`` once the run ends (the
    last two in a mount namespace of their own)."""
    command = " ".join(f"'{a}'" for a in [COMMAND, *map(str, args), *FAST])
    if limit_kb is not None:
        command = f"ulimit -f {limit_kb}; exec {command}"
    if read_only is not None:
        command = f"mount --bind -o ro '{read_only}' '{read_only}' && exec {command}"
    if full_disk is not None:
        folder, size_kb, copy = full_disk
        mount = f"mount -t tmpfs -o size={size_kb}k tmpfs '{folder}'"
        command = f"{mount} && {{ {command}; }}; s=$?; cp -a '{folder}/.' '{copy}/'; exit $s"
    prefix = ["unshare", "-rm"] if read_only is not None or full_disk is not None else []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([*prefix, "bash", "-c", command], capture_output=True, text=True, timeout=300, env=env)


def lines(result, kind: str) -> list[str]:
    """Lines of stderr starting with ``kind:``; every stderr line is one such line, no traceback."""
    stderr = result.stderr.splitlines()
    assert all(line.startswith(("error: ", "note: ")) for line in stderr), result.stderr[-3000:]
    return [line for line in stderr if line.startswith(f"{kind}: ")]


def outputs(folder: Path) -> dict[str, bytes]:
    """Every file in ``folder`` but the manifest, by relative path."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST}


def stem_of(name: str) -> str:
    """The case an output file belongs to (``scan_nii_gz_overlay.png`` -> ``scan_nii_gz``)."""
    for suffix in OUTPUT_SUFFIXES:
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    raise AssertionError(f"{name}: not an output")


def content(folder: Path, stem: str) -> dict:
    """What a case's outputs say, comparable between runs: masks, SEG frames and references,
    the summary without its output paths."""
    said = json.loads((folder / f"{stem}.json").read_text())
    said.pop("outputs")
    if (folder / f"{stem}_seg.png").exists():
        said["mask"] = np.asarray(Image.open(folder / f"{stem}_seg.png")).tolist()
    else:
        mask = nib.load(folder / f"{stem}_seg.nii.gz")
        said["mask"], said["affine"] = np.asarray(mask.dataobj).tolist(), mask.affine.tolist()
    if (folder / f"{stem}_seg.dcm").exists():
        seg = pydicom.dcmread(folder / f"{stem}_seg.dcm")
        said["seg"] = seg.pixel_array.tolist()
        said["seg_sources"] = [i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence]
    return said


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The inputs, and one run over all of them (the reference the other runs are compared with)."""
    root = tmp_path_factory.mktemp("inputs")
    inputs = make_inputs(root)
    result = run(*inputs["all"], "-o", root / "out")
    return inputs, root / "out", result


# ---- identity and refusals ------------------------------------------------------------------


def test_each_series_and_each_name_is_a_case_of_its_own(reference):
    inputs, out, result = reference
    assert result.returncode == 1  # three refusals, the rest predicted
    errors, notes = lines(result, "error"), lines(result, "note")
    assert len(errors) == len(inputs["bad"])
    for path, reason in inputs["bad"].items():
        assert any(line.startswith(f"error: {path}:") and reason in line for line in errors), (path, errors)
    assert any("study: 2 DICOM series" in n and "study_series4" in n and "study_series7" in n for n in notes), notes
    assert any("README.txt" in n and "checksums.md5" in n for n in notes), notes
    assert any("dup.png: named 3 times" in n for n in notes), notes
    planned = [line.split(" -> ")[1] for line in result.stdout.splitlines() if line.startswith("plan: ")]
    assert len(planned) == len(inputs["expected"]) + len(inputs["bad"]) == len(set(planned))  # all, before any ran
    assert f"{len(inputs['expected'])} of {len(inputs['expected']) + 3} inputs predicted" in result.stdout

    written = outputs(out)
    assert {stem_of(name) for name in written} == set(inputs["expected"])
    for stem, (source, uids, shape) in inputs["expected"].items():
        said = content(out, stem)
        assert said["input"] == str(source) and said["shape"] == shape, stem
        assert np.asarray(said["mask"]).shape == tuple(shape if len(shape) == 3 else shape[::-1])
        if uids is not None:  # the SEG references exactly this series, in its slice order
            assert (said["series_instance_uid"], said["seg_sources"]) == uids, stem
    series4, series7 = content(out, "study_series4"), content(out, "study_series7")
    assert (series4["affine"][2][3], series7["affine"][2][3]) == (0.0, 50.0)  # each where its own slices are


def test_a_dicom_seg_beside_its_series_is_left_out_not_a_case(reference, tmp_path):
    """The SEG tumorseg-predict wrote, copied into its series' folder (as a PACS export holds
    both): the folder is still one case of its images, the SEG named in a note; the SEG on its
    own, or a folder of SEGs only, is refused in one line."""
    inputs, out, _ = reference
    folder = tmp_path / "scan"
    shutil.copytree(inputs["expected"]["scan"][0], folder)
    seg = shutil.copy(out / "scan_seg.dcm", folder / "scan_seg.dcm")
    assert pydicom.dcmread(seg).Modality == "SEG"
    cases, errors, notes = find_cases([folder])
    assert not errors and len(cases) == 1 and Path(seg) not in cases[0].files
    assert [pydicom.dcmread(f).SOPInstanceUID for f in cases[0].files] == inputs["expected"]["scan"][1][1]
    assert any("scan_seg.dcm (SEG)" in n and "left out" in n for n in notes), notes
    only = tmp_path / "only"
    only.mkdir()
    shutil.copy(seg, only / "a.dcm")
    result = run(folder, only, only / "a.dcm", "-o", tmp_path / "out")
    errors = lines(result, "error")
    assert result.returncode == 1 and len(errors) == 2, result.stderr
    assert any(line.startswith(f"error: {only}:") and "only derived objects" in line for line in errors), errors
    assert any(line.startswith(f"error: {only / 'a.dcm'}:") and "DICOM SEG object" in line for line in errors), errors
    assert "Traceback" not in result.stderr
    assert "1 of 3 inputs predicted" in result.stdout
    assert content(tmp_path / "out", "scan")["shape"] == content(out, "scan")["shape"]


# ---- write failures -------------------------------------------------------------------------


def test_a_full_disk_loses_and_mixes_nothing(reference, tmp_path):
    """Under ``ulimit -f`` (EFBIG, as a full disk) the cases whose files fit are written whole and
    are what they were in another batch (the reference's), the others get one line each and leave
    nothing."""
    inputs, out, _ = reference
    sizes: dict[str, int] = {}  # the largest output of each case
    for name, data in outputs(out).items():
        sizes[stem_of(name)] = max(sizes.get(stem_of(name), 0), len(data))
    small, large = sorted(sizes, key=sizes.get)[0], sorted(sizes, key=sizes.get)[-1]
    limit = (sizes[small] + sizes[large]) // 2 // 1024
    assert sizes[small] < limit * 1024 < sizes[large]
    full = run(*inputs["good"], "-o", tmp_path, limit_kb=limit)
    assert full.returncode == 1
    errors = lines(full, "error")
    too_big = {s for s in sizes if sizes[s] > limit * 1024}
    assert len(errors) == len(too_big) and all("cannot write: the file is too large" in e for e in errors), errors
    for line in errors:  # each names the file that did not fit, and says nothing of its case was written
        path = Path(line.removeprefix("error: ").split(": cannot write")[0])
        assert path.parent == tmp_path and len((out / path.name).read_bytes()) > limit * 1024, line
        assert "nothing of this case was written" in line
    assert any("1 case(s) written before it are complete (scan_nii_gz)" in line for line in errors), errors
    written = outputs(tmp_path)
    for stem in inputs["expected"]:
        if stem in too_big:
            assert not any(stem_of(name) == stem for name in written), stem  # nothing partial
        else:
            assert content(tmp_path, stem) == content(out, stem)


def _can_mount(*how: str) -> bool:
    probe = tempfile.mkdtemp()
    try:
        command = ["unshare", "-rm", "mount", *(probe if word == "PROBE" else word for word in how), probe]
        return subprocess.run(command, capture_output=True).returncode == 0
    except OSError:
        return False
    finally:
        os.rmdir(probe)


def test_a_disk_that_fills_up_loses_and_mixes_nothing(reference, tmp_path):
    """A real full disk (ENOSPC: a small tmpfs as the output folder): the cases written before it
    filled are whole and what they were in the reference run, the case that did not fit gets one
    line saying the disk is full and leaves no file, not even a temporary one."""
    if not (shutil.which("unshare") and _can_mount("-t", "tmpfs", "-o", "size=64k", "tmpfs")):
        pytest.skip("no mount namespaces to mount a small file system")
    inputs, out, _ = reference
    total = sum(len(data) for data in outputs(out).values())
    mounted, copy = tmp_path / "disk", tmp_path / "copy"
    mounted.mkdir(), copy.mkdir()
    full = run(*inputs["good"], "-o", mounted, full_disk=(mounted, total // 2 // 1024, copy))
    assert full.returncode == 1
    errors = lines(full, "error")
    assert errors and all("cannot write: the disk is full" in e for e in errors), errors
    written = outputs(copy)
    complete = {stem_of(name) for name in written}
    assert complete and len(complete) + len(errors) <= len(inputs["expected"])
    for stem in complete:
        assert content(copy, stem) == content(out, stem), stem
    assert all(any(name == stem + suffix for suffix in OUTPUT_SUFFIXES) for name in written for stem in [stem_of(name)])
    assert sorted(written) == sorted(name for name in written if (out / name).exists())  # no temporary file left


def test_an_output_folder_that_cannot_be_written_is_one_line_and_keeps_what_is_there(reference, tmp_path):
    """Read-only (a read-only mount, as root) or without permission (as anyone else)."""
    inputs, out, _ = reference
    kept = tmp_path / "out"
    shutil.copytree(out, kept)
    before = outputs(kept)
    if os.geteuid() != 0:
        kept.chmod(0o555)
        result, words = run(*inputs["good"], "-o", kept), "permission denied"
        kept.chmod(0o755)
    elif shutil.which("unshare") and _can_mount("--bind", "-o", "ro", "PROBE"):
        result, words = run(*inputs["good"], "-o", kept, read_only=kept), "the folder is read-only"
    else:
        pytest.skip("root, and no mount namespaces to make a folder read-only")
    assert result.returncode == 2
    assert lines(result, "error") == [f"error: {kept}: cannot write: {words}; nothing was predicted, nothing there changed"]
    assert outputs(kept) == before


def test_a_run_killed_midway_is_completed_by_a_rerun(reference, tmp_path):
    inputs, out, _ = reference
    command = [str(COMMAND), *map(str, inputs["good"]), "-o", str(tmp_path), *FAST]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120

    def summaries() -> list[Path]:
        return [p for p in tmp_path.glob("*.json") if p.name != MANIFEST]

    while not summaries() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # as the OOM killer or a power cut would, in the next case
    process.wait()
    for path in summaries():  # a case whose summary is there is whole (the summary is put in place last)
        stem = path.name.removesuffix(".json")
        assert content(tmp_path, stem) == content(out, stem)
    recorded = json.loads((tmp_path / MANIFEST).read_text())
    (tmp_path / f".{sorted(recorded)[0]}.k1ll3d00.tmp").write_bytes(b"half")  # as a kill mid-write leaves
    again = run(*inputs["good"], "-o", tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert set(outputs(tmp_path)) == set(outputs(out))  # no temporary file left behind either
    assert all(content(tmp_path, stem) == content(out, stem) for stem in inputs["expected"])


@pytest.mark.parametrize(
    "code, words",
    [
        (errno.ENOSPC, "the disk is full"),
        (errno.EFBIG, "the file is too large"),
        (errno.EROFS, "the folder is read-only"),
        (errno.EACCES, "permission denied"),
    ],
)
def test_write_problems_are_told_in_plain_words(code, words):
    assert write_problem(OSError(code, os.strerror(code), "/out/x.json")).startswith(words)


# ---- by property: folders of series, sidecars and names -------------------------------------


@settings(max_examples=15, deadline=None)
@given(
    counts=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    sidecars=st.lists(st.sampled_from(["README", "notes.txt", "DICOMDIR.md5", ".DS_Store"]), unique=True, max_size=3),
    twin=st.sampled_from([None, "nifti", "png", "dcm"]),
    repeats=st.integers(1, 3),
    derived=st.lists(st.sampled_from(["SEG", "SR", "PR", "KO", "RTSTRUCT"]), max_size=2),
)
def test_folders_give_one_case_per_series_and_unique_names(tmp_path_factory, counts, sidecars, twin, repeats, derived):
    root = tmp_path_factory.mktemp("prop")
    study = root / "scan"
    uids = [series(study, k, 8, 100.0 * k, k + 1, prefix=f"{k}_", n=n) for k, n in enumerate(counts)]
    for name in sidecars:
        (study / name).write_text("not an image")
    for k, modality in enumerate(derived):  # a derived object of the first series (its header says so)
        ds = pydicom.dcmread(study / "0_000.dcm")
        ds.Modality, ds.SOPInstanceUID = modality, pydicom.uid.generate_uid()
        ds.save_as(study / f"derived_{k}.dcm")
    inputs = [study] * repeats
    if twin == "nifti":
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 2), np.float32), np.eye(4)), root / "scan.nii.gz")
        inputs.append(root / "scan.nii.gz")
    elif twin == "png":
        Image.new("L", (4, 4)).save(root / "scan.png")
        inputs.append(root / "scan.png")
    elif twin == "dcm":
        shutil.copy(study / "0_000.dcm", root / "scan.dcm")
        inputs.append(root / "scan.dcm")
    cases, errors, notes = find_cases(inputs)
    assert not errors
    series_cases = [c for c in cases if c.path == study]
    assert len(series_cases) == len(counts)  # one case per series, each with exactly its files
    for case, k in zip(series_cases, range(len(counts))):
        assert [pydicom.dcmread(f).SOPInstanceUID for f in case.files] == uids[k][1]
    visible = [s for s in sidecars if not s.startswith(".")]
    left_out = [n for n in notes if "neither" in n]  # one note for the sidecars, naming each
    assert len(left_out) == bool(visible) and all(s in left_out[0] for s in visible)
    not_images = [n for n in notes if "derived objects" in n]  # and one for the derived objects
    assert len(not_images) == bool(derived) and all(f"derived_{k}.dcm ({m})" in not_images[0] for k, m in enumerate(derived))
    assert any("named" in n and "predicted once" in n for n in notes) == (repeats > 1)
    protected, stems = output_plan(cases, root)  # the output folder holds the inputs
    names = [f"{stems[str(c)]}{suffix}".casefold() for c in cases for suffix in OUTPUT_SUFFIXES]
    assert len(set(names)) == len(names)  # no two cases share an output
    assert not set(names) & {p.relative_to(root).as_posix().casefold() for p in protected}
    assert output_plan(cases, root)[1] == stems  # the same inputs, the same names


def test_geometry_tags_missing_or_malformed_are_named(tmp_path):
    from tumorseg.io.reading import InputError, read_case

    series(tmp_path / "one", 0, 8, 0.0, 1, n=1)
    lone = tmp_path / "one" / "000.dcm"
    ds = pydicom.dcmread(lone)
    del ds.PixelSpacing, ds.ImageOrientationPatient
    ds.save_as(lone)
    assert "no ImageOrientationPatient, PixelSpacing: read as one slice of 1 mm pixels" in read_case(lone).note
    series(tmp_path / "three", 0, 8, 0.0, 1)
    bad = tmp_path / "three" / "002.dcm"
    ds = pydicom.dcmread(bad)
    ds.ImagePositionPatient = [0, 0]
    ds.save_as(bad)
    with pytest.raises(InputError, match=f"^{bad}: ImagePositionPatient is .*, not 3 numbers$"):
        read_case(tmp_path / "three")
