"""Reading the bundle's configs from Python, from any working directory."""

from __future__ import annotations

from pathlib import Path

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "brain_tumor_mri_seg"


def inference_parser(bundle: Path = BUNDLE, overrides: dict | None = None):
    """``ConfigParser`` of train.yaml with inference.yaml layered on it.

    inference.yaml takes its shared definitions from train.yaml through ``%`` macros whose paths
    are relative to the repository root; layered here on train.yaml itself they are redundant,
    so they are left out and the parser works from any directory.
    """
    from monai.bundle import ConfigParser

    inference = ConfigParser.load_config_file(str(bundle / "configs" / "inference.yaml"))
    inference = {k: v for k, v in inference.items() if not (isinstance(v, str) and v.startswith("%"))}
    parser = ConfigParser(ConfigParser.load_config_file(str(bundle / "configs" / "train.yaml")))
    parser.update(inference)
    parser.update({"bundle_root": str(bundle), **(overrides or {})})
    return parser


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
