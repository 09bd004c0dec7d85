"""Shared fixtures: the embedded sample and its conversion (real data, real tools)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "brain-tumor-coco-sample"
BUNDLE = REPO / "bundles" / "brain_tumor_mri_seg"
CONFIGS = BUNDLE / "configs"


def run_cli(*args: str, cwd: Path = REPO, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python <args>`` as users do, capturing text output."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env
    )


@pytest.fixture(scope="session")
def converted_sample(tmp_path_factory) -> Path:
    """The embedded sample converted by data_tools (once per session)."""
    from data_tools.coco_to_monai import convert

    out = tmp_path_factory.mktemp("converted") / "sample"
    convert(SAMPLE, out, progress=False, log=lambda line: None)
    return out
