"""What a reviewer finds in MLflow after a real training run and an evaluate run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import REPO, mlflow_run

pytestmark = pytest.mark.slow


def test_run_parameters_describe_config_code_and_machine(trained):
    client, run = mlflow_run(trained / "mlflow", "train")
    params, tags = run.data.params, run.data.tags
    assert params["config.learning_rate"] == "0.001"
    assert params["config.train.dataloader.batch_size"] == "8"  # a reference, shown as its value
    assert params["config.network_def._target_"] == "UNet"
    assert params["config.train.augmentation.2.scale_range"] == "0.15"
    import monai

    assert params["code.monai_version"] == monai.__version__ and params["code.tumorseg_version"] == "0.1.0"
    assert params["machine.device"] == "cpu" and params["machine.world_size"] == "1"
    assert tags["bundle"] == "brain_tumor_mri_seg" and tags["workflow"] == "train"


def test_validation_report_and_panels(trained):
    client, run = mlflow_run(trained / "mlflow", "train")
    assert {a.path for a in client.list_artifacts(run.info.run_id, "report")} == {"report/validation.html"}
    page = client.download_artifacts(run.info.run_id, "report/validation.html", str(trained / "dl-report"))
    text = open(page).read()
    assert "Validation after epoch 2" in text and "<svg" in text and "val_mean_dice" in text
    assert "data:image/png;base64," in text


def test_best_model_is_registered_and_loads_with_pyfunc(trained, converted_sample):
    import mlflow

    client, run = mlflow_run(trained / "mlflow", "train")
    versions = client.search_model_versions("name = 'brain_tumor_mri_seg'")
    assert [v.run_id for v in versions] == [run.info.run_id]
    mlflow.set_tracking_uri(f"sqlite:///{trained}/mlflow/mlruns.db")
    try:
        model = mlflow.pyfunc.load_model("models:/brain_tumor_mri_seg/1")
    finally:
        mlflow.set_tracking_uri(None)  # it also sets MLFLOW_TRACKING_URI, which later subprocesses would inherit
    assert model.metadata.signature is not None

    # the bundle's own network and preprocessing on a real sample image
    from tumorseg.bundle import parser as bundle_parser

    parser = bundle_parser("train", overrides={"image_size": 64, "channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1})
    from monai.transforms import Compose

    sample = {"image": str(next((REPO / "data" / "brain-tumor-coco-sample" / "test").glob("*.jpg")))}
    image = Compose(parser.get_parsed_content("preprocessing"))(sample)["image"][None]
    net = parser.get_parsed_content("network_def").eval()
    net.load_state_dict(torch.load(trained / "models" / "model.pt", weights_only=True))
    with torch.no_grad():
        expected = net(image.as_tensor()).numpy()
    predicted = model.predict(image.numpy().astype(np.float32))
    assert np.allclose(predicted, expected, atol=1e-5)


def test_evaluate_run_is_linked_to_its_training_run(trained, evaluated):
    client, train_run = mlflow_run(trained / "mlflow", "train")
    _, eval_run = mlflow_run(trained / "mlflow", "evaluate")
    assert eval_run.data.tags["mlflow.parentRunId"] == train_run.info.run_id
    assert eval_run.data.tags["checkpoint_sha256"] == train_run.data.tags["checkpoint_sha256"]
    assert eval_run.data.params["config.eval_list"] == "validation"
    assert "eval_dice" in eval_run.data.metrics and "eval_poster_mean_iou" in eval_run.data.metrics
    arts = {a.path for a in client.list_artifacts(eval_run.info.run_id, "evaluation")}
    assert {"evaluation/report.html", "evaluation/cases.png", "evaluation/summary.json", "evaluation/per_image.csv"} <= arts


def test_inference_run_is_tracked_and_linked(trained, evaluated, tmp_path):
    from conftest import QUICK, check, configs, run_cli

    check(
        run_cli(
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            configs("inference.yaml"),
            "--input_dir",
            str(REPO / "data" / "brain-tumor-coco-sample" / "valid"),
            "--ckpt_dir",
            str(trained / "models"),
            "--output_dir",
            str(tmp_path),
            *QUICK,
            "--tracking",
            str(REPO / "configs" / "mlflow.json"),
            "--tracking_dir",
            str(trained / "mlflow"),
        )
    )
    _, train_run = mlflow_run(trained / "mlflow", "train")
    _, run = mlflow_run(trained / "mlflow", "inference")
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == train_run.info.run_id
    assert run.data.params["config.input_dir"].endswith("valid")


def test_runs_started_side_by_side_into_a_fresh_store_all_succeed(tmp_path):
    """MLflow creates its tables on first use; without the lock 3 of 4 such processes fail."""
    import subprocess
    import sys

    code = (
        "import sys; from tumorseg.tracking import MLflowTracker; from monai.utils import path_to_sqlite_uri; "
        "t = MLflowTracker(tracking_uri=path_to_sqlite_uri(sys.argv[1] + '/mlruns.db'), experiment_name='side_by_side', "
        "run_name='run_' + sys.argv[2]); from ignite.engine import Engine; t.start(Engine(lambda e, b: None)); "
        "t.client.set_terminated(t.cur_run.info.run_id)"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path), str(i)], cwd=REPO, stderr=subprocess.PIPE, text=True)
        for i in range(4)
    ]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, "\n".join(e[-1500:] for e in errors)
    from tumorseg.tracking import open_store

    client, experiment_id = open_store(tmp_path, "side_by_side")
    assert len(client.search_runs([experiment_id])) == 4
