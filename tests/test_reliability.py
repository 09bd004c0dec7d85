"""Interrupted training resumes; untrusted checkpoints cannot run code."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import QUICK, REPO, TRAIN, check, configs, mlflow_run, run_cli

pytestmark = pytest.mark.slow

# slow enough per epoch (12 iterations) to be killed in the middle of one
SLOW_EPOCHS = [
    "--image_size",
    "96",
    "--channels",
    "[8, 16, 32]",
    "--strides",
    "[2, 2]",
    "--num_res_units",
    "1",
    "--batch_size",
    "2",
    "--num_workers",
    "0",
    "--max_epochs",
    "4",
]


def test_training_killed_mid_epoch_resumes_into_the_same_mlflow_run(converted_sample, tmp_path):
    from tumorseg.io.files import newest

    args = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "run",  # one stage (the recipe's resume across stages: tests/test_recipe.py)
        "--config_file",
        TRAIN,
        "--dataset_dir",
        str(converted_sample),
        "--ckpt_dir",
        str(tmp_path / "models"),
        "--output_dir",
        str(tmp_path / "eval"),
        *SLOW_EPOCHS,
        "--tracking",
        str(REPO / "configs" / "mlflow.json"),
        "--tracking_dir",
        str(tmp_path / "mlflow"),
    ]
    proc = subprocess.Popen(
        args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    deadline = time.time() + 300
    for line in proc.stdout:
        if "Saved checkpoint at epoch: 1" in line:
            break
        assert time.time() < deadline and proc.poll() is None
    time.sleep(0.3)  # into epoch 2, well before its end (12 iterations, then validation)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    killed_at = torch.load(newest(tmp_path / "models" / "last", "*.pt"), weights_only=True)["trainer"]["iteration"]
    assert 12 <= killed_at < 4 * 12
    # every checkpoint file is whole (a kill during a save can leave only an unused temporary file)
    for path in [tmp_path / "models" / "model.pt", *(tmp_path / "models" / "last").glob("*.pt")]:
        torch.load(path, weights_only=True)

    # resumed with the dataset spelt relatively: MLflow refuses to change the logged datalist
    # parameter, which used to end the stage; the new spelling is kept as a tag
    args[args.index("--dataset_dir") + 1] = os.path.relpath(converted_sample, REPO)
    result = check(run_cli(*args[1:], "--resume", "true"))
    assert "Restored all variables from" in result.stdout + result.stderr
    last = list((tmp_path / "models" / "last").glob("*.pt"))
    assert len(last) == 1, last  # n_saved=1 holds across the resume: the killed run's file is gone
    final = torch.load(last[0], weights_only=True)
    assert final["trainer"]["iteration"] == 4 * 12 and final["lr_scheduler"]["last_epoch"] == 4
    assert final["optimizer"]["state"]  # Adam moments came along
    from monai.networks.nets import UNet

    UNet(
        spatial_dims=2, in_channels=1, out_channels=1, channels=[8, 16, 32], strides=[2, 2], num_res_units=1, dropout=0.1
    ).load_state_dict(torch.load(tmp_path / "models" / "model.pt", weights_only=True))
    client, run = mlflow_run(tmp_path / "mlflow", "train")  # one run: continued, not an orphan
    assert run.info.status == "FINISHED"
    assert run.data.params["datalist"] == str(converted_sample / "datalist.json")
    assert run.data.tags["resumed.datalist"] == os.path.relpath(converted_sample, REPO) + "/datalist.json"
    steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, "val_mean_dice")})
    assert steps == [1, 2, 3, 4]


def test_a_training_whose_loss_turns_nan_stops_in_one_line_and_keeps_nothing_of_that_epoch(converted_sample, tmp_path):
    """A learning rate far too high: the loss is NaN within the first epoch. The stage stops
    before that epoch's validation (whose Dice 0 would be saved as the "best" model) and its
    checkpoint, its MLflow run ends FAILED, and the one line says what happened."""
    result = run_cli(
        "-m", "monai.bundle", "run", "run", "--config_file", TRAIN, "--dataset_dir", str(converted_sample),
        "--ckpt_dir", str(tmp_path / "models"), "--output_dir", str(tmp_path / "eval"), *QUICK, "--max_epochs", "2",
        "--learning_rate", "1e30", "--tracking", str(REPO / "configs" / "mlflow.json"),
        "--tracking_dir", str(tmp_path / "mlflow"),
    )  # fmt: skip
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "loss not finite" in errors[0] and "epoch 1" in errors[0], result.stderr[-3000:]
    assert not (tmp_path / "models" / "model.pt").exists()
    assert not list((tmp_path / "models" / "last").glob("*.pt"))
    _, run = mlflow_run(tmp_path / "mlflow", "train")
    assert run.info.status == "FAILED"


class RunsCode:
    """A pickle that runs a shell command when unpickled without weights_only."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_runs_nothing(converted_sample, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "model.pt"
    torch.save({"model": RunsCode(marker)}, evil)

    result = run_cli(
        "-m",
        "tumorseg.inference.predict",
        str(next((REPO / "data" / "brain-tumor-coco-sample" / "test").glob("*.jpg"))),
        "-o",
        str(tmp_path / "out"),
        "--checkpoint",
        str(evil),
    )
    assert result.returncode == 2 and "not loadable as weights" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists()

    result = run_cli(
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        configs("evaluate.yaml"),
        "--dataset_dir",
        str(converted_sample),
        "--checkpoint",
        str(evil),
        "--num_workers",
        "0",
        "--output_dir",
        str(tmp_path / "eval"),
    )
    assert result.returncode != 0
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the control: an unsafe load does run it
    assert marker.exists()
