"""What a reviewer finds in MLflow after a real training run and an evaluate run."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import REPO, mlflow_run

pytestmark = pytest.mark.slow


def test_run_parameters_are_readable_hyper_parameters_code_and_machine(trained):
    client, run = mlflow_run(trained / "mlflow", "train")
    params, tags = run.data.params, run.data.tags
    assert 20 <= len(params) <= 60, sorted(params)  # tens, not every config key
    assert not [k for k in params if k.startswith("config.")]
    assert params["learning_rate"] == "0.001" and params["batch_size"] == "8" and params["image_size"] == "64"
    assert params["channels"] == "[8, 16, 32]" and params["loss_w_dice"] == "1.0"
    import monai

    import tumorseg

    assert params["code.monai_version"] == monai.__version__ and params["code.tumorseg_version"] == tumorseg.__version__
    assert params["machine.device"] == "cpu" and params["machine.world_size"] == "1"
    assert tags["bundle"] == "brain_tumor_mri_seg" and tags["workflow"] == "train"
    assert any(a.path.startswith("config_") and a.path.endswith(".json") for a in client.list_artifacts(run.info.run_id))
    # the datasets, with MONAI's dataset logging: a digest and a size per split
    inputs = {d.dataset.name: d.dataset for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"train_dataset_0", "validation_dataset_0"}
    assert params["train_dataset_0_samples"] == params["train_images"] and params["train_dataset_0_digest"]


def test_per_epoch_metrics_have_the_epoch_as_step(trained):
    client, run = mlflow_run(trained / "mlflow", "train")
    for key in ("train_loss", "lr_group_0", "val_mean_dice", "val_mean_iou"):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == [1, 2], key


def test_validation_report_and_panels(trained):
    client, run = mlflow_run(trained / "mlflow", "train")
    assert {a.path for a in client.list_artifacts(run.info.run_id, "report")} == {"report/validation.html"}
    page = client.download_artifacts(run.info.run_id, "report/validation.html", str(trained / "dl-report"))
    text = open(page).read()
    assert "Validation after epoch 2" in text and "<svg" in text and "val_mean_dice" in text
    assert "data:image/png;base64," in text


def test_best_model_is_registered_with_its_record(trained):
    client, run = mlflow_run(trained / "mlflow", "train")
    versions = client.search_model_versions("name = 'brain_tumor_mri_seg'")
    assert [v.run_id for v in versions] == [run.info.run_id]
    version = client.get_model_version("brain_tumor_mri_seg", versions[0].version)
    assert run.info.run_id in version.description and "(N, 1, H, W)" in version.description
    best = max(m.value for m in client.get_metric_history(run.info.run_id, "val_mean_dice"))
    assert float(version.tags["val_mean_dice"]) == pytest.approx(best, abs=1e-4)
    assert version.tags["checkpoint_sha256"] == run.data.tags["checkpoint_sha256"]
    assert version.tags["data.datalist_sha256"] == run.data.params["datalist_sha256"]
    assert not client.get_registered_model("brain_tumor_mri_seg").aliases  # these weights are not the shipped ones


def test_shipped_model_as_pyfunc_segments_any_batch_and_size_like_the_bundle(tmp_path):
    """The shipped weights registered (alias ``shipped``) and loaded as a pyfunc: batches of 1, 2
    and 5 slices of 640 x 640 and 2 of 560 x 400 give the masks of the bundle's own inference."""
    import mlflow
    from conftest import INFERENCE, SAMPLE, check, run_cli
    from PIL import Image

    from tumorseg.bundle import BUNDLE
    from tumorseg.tracking.tracker import log_bundle_model, open_store

    client, experiment_id = open_store(tmp_path / "mlflow")
    run = client.create_run(experiment_id, run_name="shipped")
    assert log_bundle_model(client, run.info.run_id, BUNDLE / "models" / "model.pt", "brain_tumor_mri_seg") == "1"
    assert {k: str(v) for k, v in client.get_registered_model("brain_tumor_mri_seg").aliases.items()} == {"shipped": "1"}

    folder = tmp_path / "slices"
    folder.mkdir()
    jpgs = sorted((SAMPLE / "test").glob("*.jpg"))[:5]
    images = {p.stem: np.asarray(Image.open(p).convert("L"), dtype=np.float32) for p in jpgs}
    for p in jpgs:
        Image.open(p).convert("L").save(folder / f"{p.stem}.png")
    for k, p in enumerate(jpgs[:2]):
        crop = Image.open(p).convert("L").crop((20 + 40 * k, 60, 420 + 40 * k, 620))  # 400 wide, 560 high
        crop.save(folder / f"crop{k}.png")
        images[f"crop{k}"] = np.asarray(crop, dtype=np.float32)
    check(run_cli("-m", "monai.bundle", "run", "inference", "--config_file", INFERENCE,
                  "--input_dir", str(folder), "--output_dir", str(tmp_path / "bundle")))  # fmt: skip
    expected = {name: np.asarray(Image.open(tmp_path / "bundle" / f"{name}_seg.png")) for name in images}

    mlflow.set_tracking_uri(client.tracking_uri)
    try:
        model = mlflow.pyfunc.load_model("models:/brain_tumor_mri_seg@shipped")
    finally:
        mlflow.set_tracking_uri(None)  # it also sets MLFLOW_TRACKING_URI, which later subprocesses would inherit
    inputs = model.metadata.signature.inputs.to_dict()[0]
    assert list(inputs["tensor-spec"]["shape"]) == [-1, 1, -1, -1]
    full = [p.stem for p in jpgs]
    for names in (full[:1], full[:2], full, ["crop0", "crop1"]):
        batch = np.stack([images[n] for n in names])[:, None]
        masks = model.predict(batch)
        assert masks.shape == batch.shape and masks.dtype == np.uint8
        for name, mask in zip(names, masks[:, 0]):
            assert np.array_equal(mask, expected[name]), name
    assert sum(int(m.sum()) for m in expected.values()) > 0  # tumour slices: the masks compared hold tumour


def test_evaluate_run_is_linked_to_its_training_run(trained, evaluated):
    client, train_run = mlflow_run(trained / "mlflow", "train")
    _, eval_run = mlflow_run(trained / "mlflow", "evaluate")
    assert eval_run.data.tags["mlflow.parentRunId"] == train_run.info.run_id
    assert eval_run.data.tags["checkpoint_sha256"] == train_run.data.tags["checkpoint_sha256"]
    params, metrics = eval_run.data.params, eval_run.data.metrics
    assert params["eval_list"] == "validation" and params["checkpoint_sha256"] and params["image_size"] == "64"
    assert not {"learning_rate", "loss_w_dice", "max_epochs"} & set(params)  # evaluation settings, not training ones
    assert "eval_dice" in metrics and "eval_poster_mean_iou" in metrics and "eval_mean_dice" in metrics
    assert not [k for k in metrics if k.startswith("val_")]
    assert {d.dataset.name for d in eval_run.inputs.dataset_inputs} == {"evaluation_dataset_0"}
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
    assert run.data.params["input_dir"].endswith("valid")


def test_runs_started_side_by_side_into_a_fresh_store_all_succeed(tmp_path):
    """MLflow creates its tables on first use; without the lock 3 of 4 such processes fail."""
    import subprocess
    import sys

    code = (
        "import sys; from tumorseg.tracking.tracker import MLflowTracker; from monai.utils import path_to_sqlite_uri; "
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
    from tumorseg.tracking.tracker import open_store

    client, experiment_id = open_store(tmp_path, "side_by_side")
    assert len(client.search_runs([experiment_id])) == 4
