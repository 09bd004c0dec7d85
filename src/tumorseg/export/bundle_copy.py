"""``tumorseg-export``: a copy of the bundle (and a zip), for MONAI Label or any bundle user.

The export is the bundle folder as it is (configs, docs, LICENSE), with the weights chosen
(``--checkpoint``, default ``models/model.pt``) as ``models/model.pt``; what training and
evaluation write into the bundle (``eval/``, ``models/last/``, the second stage's
``models/refiner/``) and Python's caches stay out. Nothing
in it is rewritten: the configs name their components ``tumorseg.*``, the installed package
(``metadata.json``'s ``required_packages_version``; ``build_wheel`` makes its wheel), and take
every path from ``bundle_root``. MONAI Label's app (``monailabel_app/main.py``) layers
``common.yaml`` under the workflow it loads.

A re-export replaces the previous one only once the new one is built and checked beside it (its
weights loaded into ``network_def``), never touches the source bundle, and keeps what others
(MONAI Label) saved inside the export since: see ``export``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import sys
import warnings
import zipfile
from pathlib import Path

from tumorseg.bundle import BUNDLE
from tumorseg.io.files import file_digest

# written into the bundle by its workflows, never part of an export
LEFT_OUT = shutil.ignore_patterns("__pycache__", "*.pyc", "eval", "last", "refiner", ".tumorseg-*")
# what an export wrote ({relative path: sha256}): a re-export replaces those files only, and keeps
# any other file (or changed one) found in the export, e.g. weights MONAI Label saved there
MANIFEST = ".tumorseg-export.json"


class ExportError(Exception):
    """A refusal or a failed check, about one path; ``main`` prints it as one ``error:`` line."""

    def __init__(self, path: Path | str, problem: str):
        super().__init__(f"{path}: {' '.join(str(problem).split())}")


def _files(root: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of the files under ``root``, without the manifest and without
    Python's byte-code caches (``__pycache__``), which are not worth keeping."""
    return {
        path.relative_to(root).as_posix(): file_digest(path, None)
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.relative_to(root).as_posix() != MANIFEST and "__pycache__" not in path.relative_to(root).parts
    }


REPOSITORY = Path(__file__).resolve().parents[3]  # pyproject.toml and src/, where this is a source checkout


def build_wheel(dest: Path) -> Path:
    """The wheel of this package (``tumorseg-<version>-py3-none-any.whl``), built by pip from the
    repository into ``dest``: what MONAI Label's environment and the MLflow model install, instead
    of a copy of source files. Raises ``ExportError`` where there is no source checkout."""
    import subprocess

    if not (REPOSITORY / "pyproject.toml").is_file() or not (REPOSITORY / "src" / "tumorseg").is_dir():
        raise ExportError(REPOSITORY, "no source checkout of tumorseg to build its wheel from (pip wheel <repository>)")
    import tempfile

    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:  # a copy: builds running at once never share setuptools' build/
        source = Path(tmp) / "source"
        for folder in ("src", "data_tools"):
            shutil.copytree(REPOSITORY / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        for name in ("pyproject.toml", "README.md"):
            shutil.copy(REPOSITORY / name, source / name)
        command = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dest), str(source)]
        done = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(dest.glob("tumorseg-*.whl"))
    if done.returncode != 0 or not wheels:
        raise ExportError(REPOSITORY, f"pip wheel failed: {(done.stderr.strip().splitlines() or ['no wheel'])[-1]}")
    return wheels[-1]


def _weights(path: Path, network=None) -> tuple[object, dict]:
    """What ``torch.load(path, weights_only=True)`` gives, and the state dict in it, after checking
    that the state dict loads into ``network`` (when given): a file of the wrong kind or of another
    architecture would otherwise be exported and only fail later, inside MONAI Label. A training
    checkpoint (``{"model": state_dict, "optimizer": ...}``, as in ``models/last``) gives its model."""
    import torch

    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols: the error line says enough
            warnings.simplefilter("ignore")
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as e:  # pickle, zip and weights_only errors: the file is not plain weights
        found = re.search(r"WeightsUnpickler error:\s*(.+?)\n\n", str(e), re.S)
        detail = found.group(1) if found else (str(e).splitlines() or [""])[0]
        raise ExportError(path, f"not loadable with torch.load(weights_only=True) ({type(e).__name__}: {detail})") from None
    state = loaded["model"] if isinstance(loaded, dict) and isinstance(loaded.get("model"), dict) else loaded
    if not isinstance(state, dict):
        raise ExportError(path, f"not a state dict (a {type(state).__name__})")
    try:
        if network is not None:
            network.load_state_dict(state)
    except RuntimeError as e:
        text = " ".join(str(e).split())
        raise ExportError(
            path, f"weights do not fit the bundle's network_def: {text[:200]}{'...' if len(text) > 200 else ''}"
        ) from None
    return loaded, state


def _previous_export(target: Path) -> dict[str, str] | None:
    """The manifest (``{relative path: sha256}``) of the export at ``target``, ``None`` when there
    is nothing to replace. A non-empty folder without a manifest was not made by this command, so
    replacing it could destroy someone's work: refused."""
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise ExportError(target, "exists and is not a folder; move it away or choose another output folder")
    if not target.exists():
        return None
    manifest = target / MANIFEST
    if not manifest.is_file():
        if any(target.iterdir()):
            raise ExportError(
                target,
                f"exists and was not made by tumorseg-export (no {MANIFEST}); move it away or choose another output folder",
            )
        return {}
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise ExportError(manifest, f"unreadable export manifest ({e}); move the export away or repair it") from None
    return dict(files)


def write_bundle(stage: Path, bundle: Path, checkpoint: Path, weights: tuple | None = None) -> None:
    """The bundle copied into ``stage`` (which must not exist yet), with the weights of
    ``checkpoint`` as ``models/model.pt`` (``weights``: what ``_weights`` gave for it, if at hand)."""
    loaded, state = weights or _weights(checkpoint)
    shutil.copytree(bundle, stage, ignore=LEFT_OUT)
    target = stage / "models" / "model.pt"
    target.parent.mkdir(exist_ok=True)
    if loaded is state:
        shutil.copy(checkpoint, target)
    else:  # a training checkpoint: only its model, as a plain state dict
        import torch

        torch.save(state, target)


def _verify(stage: Path, network) -> None:
    """The built export, read back before it replaces anything."""
    _weights(stage / "models" / "model.pt", network)


def _carry_over(previous: Path, stage: Path, manifest: dict[str, str], own: dict[str, str]) -> tuple[list[str], list[str]]:
    """Copy into ``stage`` every file of the previous export that this command did not write
    there (not in its manifest, or changed since): e.g. weights MONAI Label trained and saved in
    ``models/``. Where such a file sits at a path the new export also writes (MONAI Label's
    retrained ``models/model.pt``), the file found there is kept and the new version is dropped:
    the new export never overwrites work it did not make. Removes those paths from ``own`` (the
    new manifest) so the next export keeps them too. Returns (kept files, kept instead of ours)."""
    kept, conflicts = [], []
    for rel, sha in _files(previous).items():
        if manifest.get(rel) == sha or own.get(rel) == sha:
            continue
        dst = stage / rel
        if dst.is_dir():
            raise ExportError(previous / rel, "a file where the new export has a folder; move it away")
        if rel in own:
            conflicts.append(rel)
            del own[rel]
        kept.append(rel)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(previous / rel, dst, follow_symlinks=False)
    for folder in previous.rglob("*"):  # empty folders others made
        if folder.is_dir() and "__pycache__" not in folder.relative_to(previous).parts:
            (stage / folder.relative_to(previous)).mkdir(parents=True, exist_ok=True)
    return kept, conflicts


def _zip(stage: Path, name: str, path: Path) -> None:
    with zipfile.ZipFile(path, "x", zipfile.ZIP_DEFLATED) as zf:
        for file in sorted(stage.rglob("*")):
            zf.write(file, Path(name) / file.relative_to(stage))


def export(
    out: Path,
    bundle: Path = BUNDLE,
    checkpoint: Path | None = None,
    make_zip: bool = False,
    report=print,
) -> Path:
    """Write ``<out>/<bundle name>/`` (and ``<out>/<bundle name>.zip`` with ``make_zip``).

    The export is built and checked in a temporary sibling folder, then swapped in by renames
    (old aside, new in place, old deleted): a failure before the swap (bad weights, full disk,
    killed process) leaves the previous export exactly as it was. Files others wrote into the
    previous export are carried over (see ``_carry_over``) and reported through ``report``.
    Raises ``ExportError`` for refusals and failed checks, ``OSError`` for file system errors.
    """
    out, bundle = Path(out), Path(bundle)
    checkpoint = Path(checkpoint or bundle / "models" / "model.pt")
    target = out / bundle.name
    if not checkpoint.is_file():
        raise ExportError(checkpoint, "no model weights to export (train first, or give --checkpoint)")
    if out.exists() and not out.is_dir():
        raise ExportError(out, "the output folder is an existing file")
    source, resolved = bundle.resolve(), target.resolve()
    if resolved == source or source in resolved.parents or resolved in source.parents:
        raise ExportError(target, f"would replace or lie inside the source bundle {bundle}; choose another output folder")
    manifest = _previous_export(target)

    from tumorseg.bundle import inference_parser

    try:
        network = inference_parser(bundle).get_parsed_content("network_def")
    except Exception as e:  # MONAI's config errors come in many types
        raise ExportError(bundle / "configs", f"network_def does not build: {e}") from None
    weights = _weights(checkpoint, network)  # before anything is written
    out.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(4)
    stage, aside = out / f".{bundle.name}.tmp-{token}", out / f".{bundle.name}.old-{token}"
    zip_path, zip_tmp = out / f"{bundle.name}.zip", out / f".{bundle.name}.zip.tmp-{token}"
    swapped = False
    try:
        write_bundle(stage, bundle, checkpoint, weights)  # not mkdtemp: its 0700 mode would stay on the export
        _verify(stage, network)
        own = _files(stage)
        kept, conflicts = _carry_over(target, stage, manifest, own) if manifest is not None else ([], [])
        (stage / MANIFEST).write_text(json.dumps({"tool": "tumorseg-export", "files": own}, indent=1) + "\n")
        if make_zip:
            _zip(stage, bundle.name, zip_tmp)
        if manifest is not None:
            os.rename(target, aside)
            try:
                os.rename(stage, target)
            except OSError:
                os.rename(aside, target)
                raise
        else:
            os.rename(stage, target)
        swapped = True
        if make_zip:
            os.replace(zip_tmp, zip_path)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        zip_tmp.unlink(missing_ok=True)
        if swapped and aside.exists():
            try:
                shutil.rmtree(aside)
            except OSError as e:  # the new export is in place; only the old copy is left over
                print(f"warning: {aside}: the previous export could not be removed ({e.strerror or e})", file=sys.stderr)
    if kept:
        line = f"kept {len(kept)} file(s) added or changed in the export since it was made: {', '.join(kept)}"
        if conflicts:
            line += f"; the new {', '.join(conflicts)} was not written over them (move them away to export yours)"
        report(line)
    return target


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tumorseg-export", description=__doc__.splitlines()[0].split(": ", 1)[1])
    p.add_argument("output", type=Path, help="folder to write <bundle name>/ into (e.g. monailabel_app/model)")
    p.add_argument("--bundle", type=Path, default=BUNDLE)
    p.add_argument("--checkpoint", type=Path, help="weights (default: <bundle>/models/model.pt)")
    p.add_argument("--zip", action="store_true", help="also write <bundle name>.zip")
    args = p.parse_args(argv)
    try:
        target = export(args.output, args.bundle, args.checkpoint, args.zip)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # full disk, read-only or forbidden folder, missing bundle file...
        problem = " ".join(str(e.strerror or e).split())[:300]
        print(f"error: {e.filename or args.output}: {problem}", file=sys.stderr)
        return 1
    print(f"exported {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
