"""The bundle through the real `python -m monai.bundle` CLI: train, resume, evaluate, infer, MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import QUICK, REPO, TRAIN, check, configs, mlflow_run, run_cli
from PIL import Image

pytestmark = pytest.mark.slow


def test_training_is_tracked_in_mlflow(trained, converted_sample):
    client, run = mlflow_run(trained / "mlflow", "train")
    assert run.info.status == "FINISHED"
    params = run.data.params
    for key, value in {
        "loss_w_dice": "1.0",
        "loss_w_focal": "1.0",
        "learning_rate": "0.001",
        "max_epochs": "2",
        "batch_size": "8",
        "image_size": "64",
        "channels": "[8, 16, 32]",
        "dropout": "0.1",
        "train_images": "24",
        "val_images": "8",
    }.items():
        assert params[key] == value, key
    import hashlib

    digest = hashlib.sha256((converted_sample / "datalist.json").read_bytes()).hexdigest()[:16]
    assert params["datalist_sha256"] == digest
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]  # the epoch's mean
    dice = client.get_metric_history(run.info.run_id, "val_mean_dice")
    assert [m.step for m in dice] == [1, 2] and all(0 <= m.value <= 1 for m in dice)
    assert len(client.get_metric_history(run.info.run_id, "val_mean_iou")) == 2
    root = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "model.pt" in root and any(p.startswith("config_") and p.endswith(".json") for p in root)
    panels = {a.path for a in client.list_artifacts(run.info.run_id, "panels")}
    assert panels == {"panels/epoch_001.png", "panels/epoch_002.png"}
    local = client.download_artifacts(run.info.run_id, "panels/epoch_002.png", str(trained / "dl"))
    assert Image.open(local).size[0] >= 3 * 64


def test_best_and_last_checkpoints(trained):
    from monai.networks.nets import UNet

    net = UNet(spatial_dims=2, in_channels=1, out_channels=1, channels=[8, 16, 32], strides=[2, 2], num_res_units=1, dropout=0.1)
    net.load_state_dict(torch.load(trained / "models" / "model.pt", weights_only=True))
    (last,) = (trained / "models" / "last").glob("*.pt")
    state = torch.load(last, weights_only=True)
    assert set(state) == {"model", "optimizer", "lr_scheduler", "trainer"}
    assert state["trainer"]["iteration"] == 2 * 3 and state["lr_scheduler"]["last_epoch"] == 2  # 2 epochs of 3


def test_resume_with_the_run_id_that_monai_label_calls(trained, converted_sample, tmp_path):
    import shutil

    from tumorseg.io.files import newest

    shutil.copytree(trained / "models", tmp_path / "models")  # leave the shared run as it is
    result = check(
        run_cli(
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            TRAIN,
            "--dataset_dir",
            str(converted_sample),
            "--ckpt_dir",
            str(tmp_path / "models"),
            "--output_dir",
            str(tmp_path / "eval"),
            "--max_epochs",
            "3",
            "--resume",
            "true",
            *QUICK,
        )
    )
    log = result.stdout + result.stderr
    assert "Restored all variables from" in log
    assert "Epoch[3] Complete" in log and "Epoch[1] Complete" not in log  # only the missing epoch ran
    assert torch.load(newest(tmp_path / "models" / "last", "*.pt"), weights_only=True)["trainer"]["iteration"] == 3 * 3


def write_png(path: Path, mask: np.ndarray) -> str:
    Image.fromarray((mask * 255).astype(np.uint8).T).save(path)  # PILReader reads axes as (x, y)
    return str(path)


def test_evaluate_on_cases_with_known_answers(tmp_path):
    """Evaluate through the real config with an identity 'network': the prediction is the image
    (threshold 0.6 on sigmoid means image > 0.41), so each case's answer is known."""
    size = 64
    box = lambda x0, x1: np.pad(np.ones((x1 - x0, 20)), ((x0, size - x1), (10, size - 30)))  # noqa: E731
    cases = {
        "perfect": (box(10, 30), box(10, 30)),
        "both_empty": (np.zeros((size, size)), np.zeros((size, size))),
        "half": (box(20, 40), box(10, 30)),
        "false_alarm": (box(10, 30), np.zeros((size, size))),
    }
    rows = []
    for name, (pred_as_image, label) in cases.items():
        rows.append(
            {
                "image": write_png(tmp_path / f"{name}.png", pred_as_image),
                "label": write_png(tmp_path / f"{name}_label.png", label),
            }
        )
    (tmp_path / "datalist.json").write_text(json.dumps({"training": [], "validation": [], "test": rows}))
    torch.save({}, tmp_path / "identity.pt")
    check(
        run_cli(
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            configs("evaluate.yaml"),
            "--dataset_dir",
            str(tmp_path),
            "--network_def",
            "$torch.nn.Identity()",
            "--checkpoint",
            str(tmp_path / "identity.pt"),
            "--threshold",
            "0.6",
            "--min_peak",
            "0.6",  # the box's peak is sigmoid(1) = 0.73: not the shipped weights' gate
            "--image_size",
            str(size),
            "--output_dir",
            str(tmp_path / "eval"),
            "--num_workers",
            "0",
            "--tta",
            "false",
            "--box_fit",
            "false",  # plain thresholding: the answers are known
        )
    )
    report = tmp_path / "eval" / "evaluate_test"
    import csv

    per_image = {r["image"]: r for r in csv.DictReader((report / "per_image.csv").open())}
    assert float(per_image["perfect.png"]["dice"]) == 1.0 and float(per_image["perfect.png"]["hd95"]) == 0.0
    assert float(per_image["both_empty.png"]["dice"]) == 1.0
    assert float(per_image["half.png"]["dice"]) == pytest.approx(0.5)
    assert float(per_image["half.png"]["iou"]) == pytest.approx(1 / 3)
    assert float(per_image["false_alarm.png"]["dice"]) == 0.0
    summary = json.loads((report / "summary.json").read_text())
    assert summary["images"] == 4 and summary["images_with_tumour"] == 2
    assert summary["per_image"]["dice"]["mean"] == pytest.approx((1 + 1 + 0.5 + 0) / 4)
    tp, fp, fn = 400 + 200, 200 + 400, 200
    assert summary["global"]["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert set(summary["poster"]) == {"global_accuracy", "mean_accuracy", "mean_iou", "weighted_iou", "mean_fscore"}
    # presence per slice: both tumour slices found; of the two healthy ones, one left empty
    assert summary["presence"] == {"sensitivity": 1.0, "specificity": 0.5, "tumour_slices": 2, "healthy_slices": 2}


def test_evaluate_and_inference_on_the_trained_model(trained, evaluated, tmp_path):
    summary = json.loads((evaluated / "evaluate_validation" / "summary.json").read_text())
    assert summary["images"] == 8
    client, run = mlflow_run(trained / "mlflow", "evaluate")
    assert run.info.status == "FINISHED"
    assert run.data.metrics["eval_dice"] == pytest.approx(summary["per_image"]["dice"]["mean"])

    images = REPO / "data" / "brain-tumor-coco-sample" / "test"
    check(
        run_cli(
            "-m",
            "monai.bundle",
            "run",
            "inference",
            "--config_file",
            configs("inference.yaml"),
            "--dataset_dir",
            str(images),
            "--ckpt_dir",
            str(trained / "models"),
            "--output_dir",
            str(tmp_path / "masks"),
            *QUICK,
        )
    )
    masks = sorted((tmp_path / "masks").glob("*_seg.png"))
    assert len(masks) == 8
    for mask in masks:
        source = images / mask.name.replace("_seg.png", ".jpg")
        m = Image.open(mask)
        assert m.size == Image.open(source).size and m.mode == "L"
        assert set(np.unique(np.array(m))) <= {0, 1}


def test_two_process_training_with_torchrun_on_cpu(converted_sample, tmp_path):
    """multi_gpu_train.yaml with 2 gloo processes: trains, only rank 0 writes and logs, and the
    validation Dice gathered over the ranks equals a 1-process evaluation of the same model."""
    result = check(
        run_cli(
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "monai.bundle",
            "run",
            "training",
            "--config_file",
            configs("multi_gpu_train.yaml"),
            "--dataset_dir",
            str(converted_sample),
            "--ckpt_dir",
            str(tmp_path / "models"),
            "--output_dir",
            str(tmp_path / "eval"),
            "--max_epochs",
            "1",
            *QUICK,
            "--tracking",
            str(REPO / "configs" / "mlflow.json"),
            "--tracking_dir",
            str(tmp_path / "mlflow"),
            env={"OMP_NUM_THREADS": "1"},
        )
    )
    log = result.stdout + result.stderr
    assert log.count("Epoch[1] Metrics") == 1  # the stats handler runs on rank 0 only
    assert (tmp_path / "models" / "model.pt").is_file()
    assert len(list((tmp_path / "models" / "last").glob("*.pt"))) == 1
    assert len(list((tmp_path / "eval" / "panels").glob("*.png"))) == 1
    client, run = mlflow_run(tmp_path / "mlflow", "train")  # one run, from rank 0
    assert run.data.params["machine.world_size"] == "2"
    distributed_dice = run.data.metrics["val_mean_dice"]
    lr = client.get_metric_history(run.info.run_id, "lr_group_0")
    assert lr and all(m.value > 0 for m in lr)

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
            str(tmp_path / "models"),
            "--output_dir",
            str(tmp_path / "eval1"),
            "--eval_list",
            "validation",
            "--tta",
            "false",
            "--box_fit",
            "false",
            *QUICK,  # the settings validation uses
        )
    )
    single = json.loads((tmp_path / "eval1" / "evaluate_validation" / "summary.json").read_text())
    assert abs(single["per_image"]["dice"]["mean"] - distributed_dice) < 1e-6
