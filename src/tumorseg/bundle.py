"""Finding the bundle and reading its configs from Python, from any working directory."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# The bundle this package serves: TUMORSEG_BUNDLE where set (an installed package, e.g. in MONAI
# Label's environment, next to an exported bundle), else the repository's own bundle beside src/.
_REPOSITORY_BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "brain_tumor_mri_seg"
BUNDLE = Path(os.environ.get("TUMORSEG_BUNDLE") or _REPOSITORY_BUNDLE)

# the config files each workflow layers, in order (as `python -m monai.bundle run --config_file`):
# the one definition of the layers; `python -m tumorseg.bundle WORKFLOW [FILE ...]` prints them for
# the shell (the Makefile's commands take them from there)
WORKFLOWS = {
    "train": ("common.yaml", "train.yaml"),
    "train_negatives": ("common.yaml", "train.yaml", "train_negatives.yaml"),  # a stage of the recipe
    "train_refiner": ("common.yaml", "train.yaml", "train_refiner.yaml"),  # the second stage
    "train_poster": ("common.yaml", "train.yaml", "train_poster.yaml"),  # the poster's recipe
    "evaluate": ("common.yaml", "train.yaml", "evaluate.yaml"),
    "inference": ("common.yaml", "inference.yaml"),
    "multi_gpu_train": ("common.yaml", "train.yaml", "multi_gpu_train.yaml"),
}


def config_files(workflow: str, bundle: Path = BUNDLE) -> list[str]:
    """The config files of ``workflow`` (a key of ``WORKFLOWS``) in ``bundle``, in layering order."""
    return [str(Path(bundle) / "configs" / name) for name in WORKFLOWS[workflow]]


def parser(workflow: str, bundle: Path = BUNDLE, overrides: dict | None = None):
    """``ConfigParser`` of ``workflow``'s configs with ``bundle_root`` set to ``bundle``."""
    from monai.bundle import ConfigParser

    root = str(Path(bundle).resolve())
    config = ConfigParser()
    config.read_config(config_files(workflow, bundle))
    config.update({"bundle_root": root, **(overrides or {})})
    return config


def inference_parser(bundle: Path = BUNDLE, overrides: dict | None = None):
    """``ConfigParser`` of the bundle's inference workflow (``common.yaml`` + ``inference.yaml``)."""
    return parser("inference", bundle, overrides)


def parse_overrides(items: list[str]) -> dict:
    """``KEY=VALUE`` command-line overrides; values are JSON where they parse (numbers, lists)."""
    import json

    overrides = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def _shown(path: Path | str) -> str:
    """``path`` as a person types it here: relative where it lies under the working directory."""
    return os.path.relpath(Path(path).resolve()) if Path(path).resolve().is_relative_to(Path.cwd()) else str(path)


def command(workflow: str, bundle: Path | str = BUNDLE, run_id: str | None = None) -> str:
    """The ``python -m monai.bundle run`` command line of ``workflow``, with its config layers."""
    root = _shown(bundle)
    files = ",".join(f"'{root}/configs/{name}'" for name in WORKFLOWS[workflow])
    default_id = {
        "train": "training",
        "train_poster": "training",
        "train_negatives": "run",
        "train_refiner": "run",
        "multi_gpu_train": "training",
        "inference": "inference",
    }
    words = ["python -m monai.bundle run", run_id or default_id.get(workflow, ""), f"--bundle_root {root}"]
    return " ".join(w for w in words if w) + f' --config_file "[{files}]"'


def _argument(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _refuse_in_one_line(kind, value, traceback) -> None:
    """``sys.excepthook`` of the bundle's workflows: an error whose chain holds an
    :class:`~tumorseg.io.reading.InputError`, :class:`~tumorseg.io.writing.OutputError` or
    :class:`~tumorseg.training.handlers.TrainingError` (MONAI wraps it in "Failed to instantiate
    ...") is told as the one line ``tumorseg-predict`` prints; anything else as Python tells it.
    Either way the MLflow runs the workflow left open end FAILED."""
    from tumorseg.io.reading import InputError
    from tumorseg.io.writing import OutputError

    # looked up, not imported: only a training has loaded the handlers (and torch with them)
    TrainingError = getattr(sys.modules.get("tumorseg.training.handlers"), "TrainingError", InputError)
    tracker = sys.modules.get("tumorseg.tracking.tracker")
    if tracker is not None:  # the workflow's MLflow runs end FAILED, not RUNNING
        tracker.fail_open_runs()

    cause, seen = value, set()
    while cause is not None and id(cause) not in seen and not isinstance(cause, (InputError, OutputError, TrainingError)):
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        sys.__excepthook__(kind, value, traceback)
    else:
        print(f"error: {cause}", file=sys.stderr)


def check_invocation(argv: list[str] | None = None) -> None:
    """The first step of every workflow's ``initialize``: under ``python -m monai.bundle run``, a
    workflow file given without the files it is layered on (``common.yaml`` ...), or a bundle's
    own paths taken from a ``bundle_root`` that is no bundle (no ``--bundle_root`` outside the
    bundle folder), ends in one line saying what to run instead, not in MONAI's traceback of an
    undefined reference. Elsewhere (MONAI Label, Python) it does nothing: their callers layer the
    files. Written to run before any reference is resolved: it reads only the command line."""
    import ast

    argv = sys.argv if argv is None else argv
    if not argv or Path(argv[0]).parent.name != "bundle" or Path(argv[0]).parent.parent.name != "monai":
        return
    sys.excepthook = _refuse_in_one_line  # bad inputs found later (datalist, weights): one line too
    given = _argument(argv, "--config_file")
    if given is None:
        return
    try:
        listed = ast.literal_eval(given) if given.strip().startswith("[") else given.split(",")
    except (ValueError, SyntaxError):
        listed = [given]
    files = [Path(str(f).strip()) for f in (listed if isinstance(listed, (list, tuple)) else [listed])]
    names = [f.name for f in files]
    # the workflow: the longest layering whose last file was given
    workflow = max((w for w, layers in WORKFLOWS.items() if layers[-1] in names), key=lambda w: len(WORKFLOWS[w]), default=None)
    bundle = files[-1].resolve().parent.parent if files else BUNDLE
    root = _argument(argv, "--bundle_root")
    merged = any(f.suffix == ".json" for f in files)  # one exported config holding the layers (MONAI Label's)
    if workflow is not None and not merged and not set(WORKFLOWS[workflow]) <= set(names):
        missing = ", ".join(n for n in WORKFLOWS[workflow] if n not in names)
        raise SystemExit(
            f"error: {files[-1]}: a layer of the bundle's configs, not a workflow on its own (missing {missing}); "
            f"run: {command(workflow, Path(root) if root else bundle)}"
        )
    where = Path(root or ".")
    # training with its outputs placed elsewhere reads nothing of the bundle's own; evaluate and
    # inference read its weights (the second stage's among them)
    placed = _argument(argv, "--ckpt_dir") is not None and _argument(argv, "--output_dir") is not None
    reads_bundle = workflow in ("evaluate", "inference", None) or not placed
    if reads_bundle and not (where / "configs" / "metadata.json").is_file():
        shown = f"--bundle_root {root}" if root else "no --bundle_root"
        raise SystemExit(
            f"error: {where.resolve()}: not a bundle folder ({shown}; the bundle's paths, models/ and eval/, "
            f"come from it); run: {command(workflow or 'inference', bundle)}"
        )


def main(argv: list[str] | None = None) -> None:
    """``python -m tumorseg.bundle WORKFLOW [FILE ...] [--bundle DIR]``: the ``--config_file``
    value of ``WORKFLOW`` (its layers, then each ``FILE``: a user's settings on top), as a list
    literal for ``python -m monai.bundle run --config_file``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tumorseg.bundle", description=main.__doc__)
    parser.add_argument("workflow", choices=sorted(WORKFLOWS))
    parser.add_argument("files", nargs="*", help="config files layered on top, in order")
    parser.add_argument("--bundle", default=None, help="the bundle folder (default: this package's bundle)")
    args = parser.parse_args(argv)
    bundle = Path(args.bundle) if args.bundle else BUNDLE
    layers = [_shown(f) for f in config_files(args.workflow, bundle)]
    print("[" + ",".join(f"'{f}'" for f in [*layers, *args.files]) + "]")


if __name__ == "__main__":
    main()
