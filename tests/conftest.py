"""Shared fixtures: the embedded sample and its conversion (real data, real tools)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Under CI (CI=true) a missing environment (Chromium, the MONAI Label venv) fails its tests
# instead of skipping them: a broken set-up must not pass for a green run.
IN_CI = os.environ.get("CI") == "true"
SAMPLE = REPO / "data" / "brain-tumor-coco-sample"
BUNDLE = REPO / "bundles" / "brain_tumor_mri_seg"
CONFIGS = BUNDLE / "configs"


def _digests(folder: Path) -> dict[str, tuple[int, int]]:
    """Each file's checksum and modification time: a file changed and put back shows too."""
    import zlib

    return {str(p): (zlib.crc32(p.read_bytes()), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session", autouse=True)
def repository_inputs_untouched():
    """The embedded sample and the shipped weights are inputs of many tests (the converted
    datalist names the sample's own files): no test may change them, even for a while (tests run
    side by side, another worker may be reading them)."""
    watched = [SAMPLE, BUNDLE / "models"]
    before = [_digests(f) for f in watched]
    yield
    after = [_digests(f) for f in watched]
    changed = [p for b, a in zip(before, after) for p in sorted(set(b) | set(a)) if b.get(p) != a.get(p)]
    assert not changed, f"tests changed the repository's inputs: {changed[:5]}"


def run_cli(*args: str, cwd: Path = REPO, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python <args>`` as users do, capturing text output. ``-m monai.bundle`` runs get
    ``--bundle_root`` of the repository's bundle unless they give one (as the README's commands do)."""
    if args[:2] == ("-m", "monai.bundle") and "--bundle_root" not in args and args[2:3] != ("verify_metadata",):
        args = (*args, "--bundle_root", str(BUNDLE))
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)


@pytest.fixture(scope="session")
def converted_sample(tmp_path_factory) -> Path:
    """The embedded sample converted by data_tools (once per session)."""
    from data_tools.coco_to_monai import convert

    out = tmp_path_factory.mktemp("converted") / "sample"
    convert(SAMPLE, out, progress=False, log=lambda line: None)
    return out


COMMON = str(CONFIGS / "common.yaml")
TRAIN = str([COMMON, str(CONFIGS / "train.yaml")])  # --config_file of training
INFERENCE = str([COMMON, str(CONFIGS / "inference.yaml")])  # --config_file of inference
QUICK = [
    "--image_size",
    "64",
    "--channels",
    "[8, 16, 32]",
    "--strides",
    "[2, 2]",
    "--num_res_units",
    "1",
    "--batch_size",
    "8",
    "--num_workers",
    "0",
]


def configs(*names: str) -> str:
    """--config_file of a workflow layered on training (evaluate.yaml, multi_gpu_train.yaml, settings)."""
    return str([COMMON, str(CONFIGS / "train.yaml"), *(str(CONFIGS / n) if "/" not in n else n for n in names)])


def check(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="session")
def trained(converted_sample, tmp_path_factory):
    """Two epochs on the sample, tracked in a fresh MLflow store."""
    out = tmp_path_factory.mktemp("train")
    check(
        run_cli(
            "-m",
            "monai.bundle",
            "run",
            "run",  # one stage (tests/test_recipe.py runs the whole recipe)
            "--config_file",
            TRAIN,
            "--dataset_dir",
            str(converted_sample),
            "--ckpt_dir",
            str(out / "models"),
            "--output_dir",
            str(out / "eval"),
            "--max_epochs",
            "2",
            *QUICK,
            "--tracking",
            str(REPO / "configs" / "mlflow.json"),
            "--tracking_dir",
            str(out / "mlflow"),
        )
    )
    return out


def mlflow_run(tracking_dir: Path, workflow: str):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tracking_dir}/mlruns.db")
    experiment = client.get_experiment_by_name("brain_tumor_mri_seg")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.workflow = '{workflow}'")
    assert len(runs) == 1
    return client, runs[0]


@pytest.fixture(scope="session")
def evaluated(trained, converted_sample, tmp_path_factory):
    """The trained model evaluated on the sample's validation list, tracked in the same store."""
    out = tmp_path_factory.mktemp("evaluate")
    check(
        run_cli(
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            configs("evaluate.yaml"),
            "--dataset_dir",
            str(converted_sample),
            "--ckpt_dir",
            str(trained / "models"),
            "--output_dir",
            str(out),
            "--eval_list",
            "validation",
            *QUICK,
            "--tracking",
            str(REPO / "configs" / "mlflow.json"),
            "--tracking_dir",
            str(trained / "mlflow"),
        )
    )
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def edit_json(root: Path, split: str, change) -> None:
    """Apply ``change`` to the parsed COCO json of one split of a Kaggle-layout folder."""
    import json

    path = root / split / "_annotations.coco.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
