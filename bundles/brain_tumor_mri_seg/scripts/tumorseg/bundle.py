"""Finding the bundle and reading its configs from Python, from any working directory."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from pathlib import Path

# This package is the bundle's own code (<bundle>/scripts/tumorseg): the bundle is two levels up.
BUNDLE = Path(__file__).resolve().parents[2]

# the config files each workflow layers, in order (as `python -m monai.bundle run --config_file`)
WORKFLOWS = {
    "train": ("common.yaml", "train.yaml"),
    "train_refiner": ("common.yaml", "train.yaml", "train_refiner.yaml"),  # the second stage
    "evaluate": ("common.yaml", "train.yaml", "evaluate.yaml"),
    "inference": ("common.yaml", "inference.yaml"),
    "multi_gpu_train": ("common.yaml", "train.yaml", "multi_gpu_train.yaml"),
}


def config_files(workflow: str, bundle: Path = BUNDLE) -> list[str]:
    """The config files of ``workflow`` (a key of ``WORKFLOWS``) in ``bundle``, in layering order."""
    return [str(Path(bundle) / "configs" / name) for name in WORKFLOWS[workflow]]


class _SameModule(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports ``scripts.tumorseg[.x]`` as the already importable ``tumorseg[.x]``.

    Where the bundle's ``scripts/tumorseg`` is this very package (this repository, installed with
    ``pip install -e .``), the configs' ``scripts.tumorseg.*`` and the command-line tools'
    ``tumorseg.*`` must be one module: two copies would make two of every class, and an
    ``except InputError`` in one would miss the other's."""

    PREFIX = "scripts.tumorseg"

    def find_spec(self, name, path=None, target=None):
        if name == self.PREFIX or name.startswith(self.PREFIX + "."):
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        return importlib.import_module(__package__ + spec.name[len(self.PREFIX) :])

    def exec_module(self, module):
        pass  # already executed under its own name


def use_bundle_code(bundle: Path) -> None:
    """Make ``bundle``'s ``scripts.*`` importable, as ``monai.bundle run`` does (its root first on
    ``sys.path``); where its ``scripts/tumorseg`` is this package, as this package. Another
    bundle's ``scripts`` modules imported before are unloaded first (as MONAI Label does), so that
    components never come from a different copy of the code."""
    root = str(Path(bundle).resolve())
    loaded = sys.modules.get("scripts")
    where = [Path(p).resolve() for p in getattr(loaded, "__path__", [])]
    if loaded is not None and where != [Path(root) / "scripts"]:
        for name in [n for n in sys.modules if n == "scripts" or n.startswith("scripts.")]:
            del sys.modules[name]
    if root in sys.path:
        sys.path.remove(root)
    sys.path.insert(0, root)
    imported_as_tumorseg = __package__ != _SameModule.PREFIX  # as scripts.tumorseg itself, there is nothing to join
    if imported_as_tumorseg and (Path(root) / "scripts" / "tumorseg").resolve() == Path(__file__).resolve().parent:
        if not any(isinstance(f, _SameModule) for f in sys.meta_path):
            sys.meta_path.insert(0, _SameModule())


def parser(workflow: str, bundle: Path = BUNDLE, overrides: dict | None = None):
    """``ConfigParser`` of ``workflow``'s configs with ``bundle_root`` set to ``bundle``, whose
    ``scripts.tumorseg`` components then instantiate (``use_bundle_code``)."""
    from monai.bundle import ConfigParser

    use_bundle_code(bundle)
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
