"""The recipe runs behind the model card become MLflow runs that carry their evidence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import BUNDLE, QUICK, REPO, SAMPLE, check, run_cli

RESULTS = REPO / "experiments" / "results" / "h100-2026-11-26"


def test_recipe_runs_import_into_mlflow_with_params_curves_and_the_shipped_checkpoint(tmp_path):
    import mlflow

    weights = BUNDLE / "models" / "model.pt"
    args = ["-m", "experiments.import_runs", str(RESULTS), "--tracking_dir", str(tmp_path), "--checkpoint", f"default={weights}"]
    first = check(run_cli(*args))
    assert first.stdout.count("best val Dice") == 5
    assert check(run_cli(*args)).stdout.count("already imported") == 5  # idempotent

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlruns.db")
    experiment = client.get_experiment_by_name("brain_tumor_mri_seg")
    assert experiment.artifact_location.startswith((tmp_path / "mlruns").as_uri())  # beside the store, not in the cwd
    runs = {r.data.tags["recipe"]: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"default", "rotate_aug", "wide", "dynunet_ds", "dice_only"}

    default = runs["default"]
    epochs = [json.loads(line) for line in (RESULTS / "default" / "metrics.jsonl").read_text().splitlines()]
    history = client.get_metric_history(default.info.run_id, "val_mean_dice")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(1, len(epochs) + 1))
    assert max(m.value for m in history) == max(e["val_mean_dice"] for e in epochs)
    assert default.data.params["learning_rate"] == "0.001" and default.data.params["channels"] == "[16, 32, 64, 128, 256]"
    assert runs["wide"].data.params["channels"] == "[24, 48, 96, 192, 384]"
    assert runs["dice_only"].data.params["loss_w_focal"] == "0.0"
    assert runs["dynunet_ds"].info.status == "KILLED" and default.info.status == "FINISHED"

    from tumorseg.io.files import file_digest

    assert default.data.tags["checkpoint_sha256"] == file_digest(weights, None)  # evaluate runs of it nest here
    # the shipped weights as the run's MLflow model, registered
    versions = client.search_model_versions("name = 'brain_tumor_mri_seg'")
    assert [v.run_id for v in versions] == [default.info.run_id]
    client_model = client.get_model_version("brain_tumor_mri_seg", versions[0].version)
    assert client_model.tags["checkpoint_sha256"] == default.data.tags["checkpoint_sha256"]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlruns.db")
    try:
        loaded = mlflow.pyfunc.load_model(f"models:/brain_tumor_mri_seg/{versions[0].version}")
    finally:
        mlflow.set_tracking_uri(None)  # it also sets MLFLOW_TRACKING_URI, which later subprocesses would inherit
    bundled = Path(loaded.unwrap_python_model().predictor.checkpoint)
    assert bundled.read_bytes() == weights.read_bytes()  # the shipped weights, inside the model's bundle copy
    assert client.get_registered_model("brain_tumor_mri_seg").aliases  # they carry the alias `shipped`


def test_postprocessing_table_is_one_mlflow_run_nested_under_the_weights_training_run(converted_sample, tmp_path):
    import mlflow

    weights = BUNDLE / "models" / "model.pt"
    check(
        run_cli(
            "-m", "experiments.import_runs", str(RESULTS), "--tracking_dir", str(tmp_path), "--checkpoint", f"default={weights}"
        )
    )
    result = check(
        run_cli(
            "-m",
            "experiments.postprocessing",
            "--dataset_dir",
            str(converted_sample),
            "--split",
            "validation",
            "--tracking_dir",
            str(tmp_path),
        )
    )
    rows = [line.split(" | ") for line in result.stdout.splitlines() if line.startswith("| True") or line.startswith("| False")]
    rules = {(r[0].strip("| "), r[1]) for r in rows}
    assert ("True", "expected_dice_box") in rules and ("False", "largest_component_bbox") in rules and len(rows) == 2 * 11
    assert "category 1: " in result.stdout and "category 2: " in result.stdout  # read from the COCO json beside the images

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlruns.db")
    experiment = client.get_experiment_by_name("brain_tumor_mri_seg")
    (run,) = client.search_runs([experiment.experiment_id], "tags.workflow = 'postprocessing'")
    (train,) = client.search_runs([experiment.experiment_id], "tags.recipe = 'default'")
    assert run.info.run_name == "postprocessing_validation" and run.data.tags["mlflow.parentRunId"] == train.info.run_id
    dice = run.data.metrics["tta_expected_dice_box.dice"]
    assert 0.0 < dice <= 1.0 and f"{dice:.4f}" in result.stdout  # the table printed is the one logged
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"postprocessing.md", "postprocessing.json"}


def test_every_recipe_builds_its_trainer_and_run_parameters(converted_sample):
    """Each recipe of experiments/recipes.py, as its configs layer on train.yaml: the trainer and
    every run parameter MLflow logs resolve (a typo in an override file fails here, not after
    the start of a long run)."""
    from experiments.recipes import RECIPES, config_files
    from tumorseg.bundle import parser as bundle_parser

    for recipe in RECIPES:
        parser = bundle_parser("train", BUNDLE)
        parser.read_config([str(REPO / f) for f in config_files(recipe)])
        parser.update({"bundle_root": str(BUNDLE), "dataset_dir": str(converted_sample), "cache_rate": 0.0, "num_workers": 0})
        params = parser.get_parsed_content("run_params")
        assert params["max_epochs"] > 0 and params["image_size"] > 0, recipe
        assert parser.get_parsed_content("train#trainer") is not None, recipe


def test_dice_both_trains_with_the_posters_loss_plus_a_per_image_dice_term(converted_sample):
    """configs/experiments/dice_both.yaml: the trainer's loss is the poster's (batch Dice + focal)
    plus the Dice term per image, so a batch of one small and one large box scores the sum."""
    import torch

    from tumorseg.bundle import config_files
    from tumorseg.bundle import parser as bundle_parser
    from tumorseg.training.losses import PosterDiceFocalLoss

    parser = bundle_parser("train", BUNDLE)
    parser.read_config([*config_files("train", BUNDLE), str(REPO / "configs" / "experiments" / "dice_both.yaml")])
    parser.update({"bundle_root": str(BUNDLE), "dataset_dir": str(converted_sample), "cache_rate": 0.0, "num_workers": 0})
    trainer = parser.get_parsed_content("train#trainer")
    logits = torch.randn(2, 1, 16, 16)
    label = torch.zeros(2, 1, 16, 16)
    label[0, :, 2:4, 2:4], label[1, :, 2:14, 2:14] = 1, 1
    expected = PosterDiceFocalLoss()(logits, label) + PosterDiceFocalLoss(w_focal=0.0, batch=False)(logits, label)
    assert torch.allclose(trainer.loss_function(logits, label), expected)
    assert not torch.allclose(PosterDiceFocalLoss()(logits, label), expected)
    assert parser.get_parsed_content("run_params")["loss_w_dice_per_image"] == 1.0


def test_training_runs_at_train_size_and_validation_at_image_size(converted_sample):
    """Train small, run larger: ``train_size`` resizes only the training slices (before the
    augmentation, so the cached step does it once); validation keeps ``image_size``, the size the
    weights are run at. By default both are the same."""
    from experiments.recipes import config_files
    from tumorseg.bundle import parser as bundle_parser

    def sizes(recipe: str, **overrides) -> tuple:
        parser = bundle_parser("train", BUNDLE)
        parser.read_config([str(REPO / f) for f in config_files(recipe)])
        parser.update({"bundle_root": str(BUNDLE), "dataset_dir": str(converted_sample), "num_workers": 0, **overrides})
        train = parser.get_parsed_content("train#dataset")[0]["image"]
        validate = parser.get_parsed_content("validate#dataset")[0]["image"]
        return max(train.shape[1:]), max(validate.shape[1:]), parser.get_parsed_content("run_params")["train_size"]

    assert sizes("default", image_size=64) == (64, 64, 64)
    assert sizes("default", image_size=64, train_size=48) == (48, 64, 48)
    assert sizes("fast_cpu") == (192, 224, 192)  # the fast CPU recipe's pair


def test_a_run_stopped_at_the_deadline_ends_killed_in_mlflow(tmp_path, monkeypatch):
    """experiments/recipes.py stops a run still going at --deadline_s with SIGKILL, so the run never
    ends its own MLflow run: the launcher ends it as KILLED (not left RUNNING), found through the
    tracker's run record, and leaves runs of other names alone."""
    import mlflow

    from experiments.recipes import mark_killed

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlruns.db")
    experiment = client.create_experiment("brain_tumor_mri_seg")
    stopped = client.create_run(experiment, run_name="train_stopped")
    other = client.create_run(experiment, run_name="train_other")
    run_dir = tmp_path / "recipe"
    (run_dir / "models" / "last").mkdir(parents=True)
    (run_dir / "models" / "last" / "mlflow_run_name").write_text("train_stopped")

    mark_killed(run_dir, {"ckpt_dir": str(run_dir / "models")})  # not tracked: nothing to end
    assert client.get_run(stopped.info.run_id).info.status == "RUNNING"
    mark_killed(run_dir, {"tracking": "configs/mlflow.json", "tracking_dir": str(tmp_path)})
    assert client.get_run(stopped.info.run_id).info.status == "KILLED"
    assert client.get_run(other.info.run_id).info.status == "RUNNING"


def test_category_aware_recipe_trains_on_categories_and_runs_as_one_tumour_logit(tmp_path):
    """configs/experiments/categories.yaml on masks that keep the COCO categories: the network
    trains on three classes, validation scores the merged tumour mask (categories 1 and 2 are
    both tumour), and the saved weights run, in eval mode, as the one tumour logit everything
    downstream expects."""
    import torch

    from data_tools.coco_to_monai import convert
    from tumorseg.bundle import parser as bundle_parser

    data = tmp_path / "categories"
    convert(SAMPLE, data, keep_categories=True, progress=False, log=lambda line: None)
    files = [str(BUNDLE / "configs" / f) for f in ("common.yaml", "train.yaml")]
    files += [str(REPO / "configs" / "experiments" / f) for f in ("per_image_dice.yaml", "categories.yaml")]
    out = tmp_path / "run"
    check(run_cli("-m", "monai.bundle", "run", "run", "--config_file", str(files), "--dataset_dir", str(data),
                  "--ckpt_dir", str(out / "models"), "--output_dir", str(out / "eval"), "--max_epochs", "2", *QUICK))  # fmt: skip
    epochs = [json.loads(line) for line in (out / "eval" / "metrics.jsonl").read_text().splitlines()]
    assert len(epochs) == 2 and all(0.0 <= e["val_mean_dice"] <= 1.0 for e in epochs)

    parser = bundle_parser("train", BUNDLE)
    parser.read_config(files)
    parser.update({"bundle_root": str(BUNDLE), "dataset_dir": str(data), "cache_rate": 0.0, "num_workers": 0})
    parser.update({"image_size": 64, "channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1})
    train_classes = {int(v) for d in parser.get_parsed_content("train#dataset") for v in torch.unique(d["label"])}
    assert train_classes == {0, 1, 2}  # the loss sees the categories...
    for d in parser.get_parsed_content("validate#dataset"):
        assert set(torch.unique(d["label"]).tolist()) <= {0.0, 1.0}  # ...validation the tumour
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(out / "models" / "model.pt", weights_only=True))
    x = torch.rand(2, 1, 64, 64)
    assert network.train()(x).shape == (2, 3, 64, 64)
    assert network.eval()(x).shape == (2, 1, 64, 64)


def test_quarter_turn_measure_scores_upright_and_turned_slices_against_their_own_boxes(converted_sample, tmp_path):
    """experiments/quarter_turns.py: one row per turn, each slice scored against its box turned
    with it (the shipped weights find the tumours of the sample's valid slices both ways)."""
    out = tmp_path / "rows.jsonl"
    script = ("-m", "experiments.quarter_turns")
    check(run_cli(*script, "--dataset_dir", str(converted_sample), "--limit", "3", "--output", str(out)))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["quarter_turns"] for r in rows] == [0, 1] and all(r["slices"] == 3 for r in rows)
    assert all(r["dice"] > 0.5 and r["slice_sensitivity"] == 1.0 for r in rows), rows


def test_mean_ensemble_of_packed_weights_runs_through_evaluate(converted_sample, tmp_path):
    """experiments/ensemble.py packs weights into one state dict that configs/experiments/ensemble.yaml
    loads: the network gives the logit of its members' mean probability, and the bundle's evaluate
    takes it like any checkpoint (two copies of the shipped weights score as the weights alone)."""
    import torch

    from experiments.components import MeanEnsemble
    from tumorseg.bundle import parser as bundle_parser

    a, b = torch.nn.Conv2d(1, 1, 3, padding=1), torch.nn.Conv2d(1, 1, 3, padding=1)
    x = torch.randn(2, 1, 8, 8)
    mean = (torch.sigmoid(a(x)) + torch.sigmoid(b(x))) / 2
    assert torch.allclose(torch.sigmoid(MeanEnsemble([a, b])(x)), mean, atol=1e-5)

    packed = tmp_path / "ensemble.pt"
    shipped = BUNDLE / "models" / "model.pt"
    check(run_cli("-m", "experiments.ensemble", str(shipped), str(shipped), "-o", str(packed)))
    files = [str(BUNDLE / "configs" / f) for f in ("common.yaml", "train.yaml")]
    files += [str(REPO / "configs" / "experiments" / "ensemble.yaml"), str(BUNDLE / "configs" / "evaluate.yaml")]
    parser = bundle_parser("evaluate", BUNDLE)
    parser.read_config(files)
    parser.update({"bundle_root": str(BUNDLE), "ensemble_size": 2})
    network = parser.get_parsed_content("network_def").eval()
    network.load_state_dict(torch.load(packed, weights_only=True))
    single = parser.get_parsed_content("network_def#members")[0]  # the UNet of common.yaml's settings
    single.load_state_dict(torch.load(shipped, weights_only=True))
    with torch.no_grad():
        image = torch.rand(1, 1, 64, 64)
        assert torch.allclose(torch.sigmoid(network(image)), torch.sigmoid(single.eval()(image)), atol=1e-5)

    scores, ensemble = {}, [str(REPO / "configs" / "experiments" / "ensemble.yaml")]
    for name, checkpoint, extra in (("single", shipped, []), ("ensemble", packed, ensemble)):
        config = files[:2] + extra + [str(BUNDLE / "configs" / "evaluate.yaml")]
        out = tmp_path / name
        check(run_cli("-m", "monai.bundle", "run", "--config_file", str(config), "--dataset_dir", str(converted_sample),
                      "--eval_list", "validation", "--checkpoint", str(checkpoint), "--ensemble_size", "2",
                      "--output_dir", str(out)))  # fmt: skip
        scores[name] = json.loads((out / "evaluate_validation" / "summary.json").read_text())
    dice = {name: s["per_image"]["dice"]["mean"] for name, s in scores.items()}
    assert dice["ensemble"] == pytest.approx(dice["single"], abs=1e-3), dice


def test_cascade_screen_refines_stage_one_boxes_and_logs_an_mlflow_run(converted_sample, tmp_path):
    """experiments/cascade.py: stage 2 trains through the bundle (configs/train_refiner.yaml) on
    windows around the true boxes, then refines the shipped model's boxes on `valid`; the three
    per-image Dice figures land in summary.json and in one MLflow run, linked to the training run."""
    from tumorseg.tracking.tracker import open_store

    out, store = tmp_path / "cascade", tmp_path / "mlflow"
    script = ("-m", "experiments.cascade")
    check(run_cli(*script, "--dataset_dir", str(converted_sample), "--out", str(out), "--epochs", "1", "--limit", "4",
                  "--crop_size", "64", "--tracking_dir", str(store), "--name", "cascade_test"))  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["slices"] == len(summary["rows"]) > 0
    for key in ("stage1", "cascade", "stage2_on_true_window"):
        assert 0.0 <= summary[key] <= 1.0
    assert summary["stage1"] > 0.5  # the shipped model finds the sample's tumours
    assert (out / "stage2.pt").read_bytes() == (out / "models" / "model.pt").read_bytes()  # the bundle training's best
    assert (out / "stage1.json").is_file() and (out / "eval" / "metrics.jsonl").is_file()

    client, experiment_id = open_store(store)
    (run,) = client.search_runs([experiment_id], filter_string="attributes.run_name = 'cascade_test'")
    assert run.data.metrics["valid_dice_cascade"] == pytest.approx(summary["cascade"])
    assert run.data.params["crop_size"] == "64" and run.data.tags["workflow"] == "cascade"
    training_run = run.data.params["refiner_training_run"]
    (trained,) = client.search_runs([experiment_id], filter_string=f"attributes.run_name = '{training_run}'")
    assert trained.data.params["stage"] == "refiner" and trained.data.params["refine_size"] == "64"
    under = [r["cascade"] < 0.5 for r in summary["rows"]]
    assert summary["cascade_under_0.5"] == pytest.approx(sum(under) / len(under))

    # the same weights measured on the training slices (no second training), beside the first run's files
    check(run_cli(*script, "--dataset_dir", str(converted_sample), "--out", str(out), "--split", "training", "--limit", "3",
                  "--crop_size", "64", "--tracking_dir", str(store), "--name", "cascade_test_training"))  # fmt: skip
    fit = json.loads((out / "summary_training.json").read_text())
    assert fit["slices"] == 3 and (out / "stage1_training.json").is_file()
    assert summary == json.loads((out / "summary.json").read_text())  # the first run's kept
    (run,) = client.search_runs([experiment_id], filter_string="attributes.run_name = 'cascade_test_training'")
    assert run.data.metrics["training_dice_cascade"] == pytest.approx(fit["cascade"])
    assert len(client.search_runs([experiment_id], filter_string="params.stage = 'refiner'")) == 1  # trained once
