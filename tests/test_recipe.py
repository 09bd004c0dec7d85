"""The training recipe (train.yaml's ``training``): every stage in order, resumable per stage,
nested MLflow runs, published weights; killed at a stage boundary and resumed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from conftest import BUNDLE, QUICK, REPO, TRAIN, check, configs, run_cli
from PIL import Image

from tumorseg.io.files import file_digest

TINY = [*QUICK, "--segmentation_epochs", "2", "--negatives_epochs", "1", "--refiner_epochs", "1", "--refine_size", "32"]


def with_negative(converted_sample: Path, root: Path) -> Path:
    """The converted sample plus one tumour-free training item ("tumour": 0, all-zero label)."""
    data = root / "dataset"
    shutil.copytree(converted_sample, data)
    black = np.zeros((64, 64), np.uint8)
    Image.fromarray(black).save(data / "healthy.png")
    Image.fromarray(black).save(data / "healthy_label.png")
    datalist = json.loads((data / "datalist.json").read_text())
    datalist["training"].append({"image": "healthy.png", "label": "healthy_label.png", "tumour": 0})
    (data / "datalist.json").write_text(json.dumps(datalist))
    return data


def recipe_command(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "monai.bundle", "run", "training", "--bundle_root", str(BUNDLE),
        "--config_file", TRAIN, "--dataset_dir", str(data),
        "--ckpt_dir", str(out / "models"), "--output_dir", str(out / "eval"), *TINY,
        "--tracking", str(REPO / "configs" / "mlflow.json"), "--tracking_dir", str(out / "mlflow"), *extra,
    ]  # fmt: skip


def test_recipe_killed_at_a_stage_boundary_resumes(converted_sample, tmp_path):
    data, out = with_negative(converted_sample, tmp_path), tmp_path / "run"
    stages = out / "models" / "stages"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(
        recipe_command(data, out), cwd=REPO, env=env, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deadline = time.time() + 300
    while not (stages / "segmentation" / "done.json").is_file():
        assert first.poll() is None and time.time() < deadline, first.communicate()[0][-3000:]
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)  # the recipe and the stage it has just started
    first.wait()
    segmentation = json.loads((stages / "segmentation" / "done.json").read_text())
    assert not (stages / "refiner" / "done.json").exists()
    assert not (out / "models" / "model.pt").exists()  # nothing published by a killed recipe

    resumed = check(run_cli(*recipe_command(data, out, "--resume", "true")[1:], timeout=600))
    assert "recipe: segmentation is done" in resumed.stdout
    # the first stage was not trained again; the negatives stage started from its weights
    assert file_digest(stages / "segmentation" / "model.pt", None) == segmentation["sha256"]
    record = json.loads((stages / "recipe.json").read_text())
    assert list(record["stages"]) == ["segmentation", "negatives", "refiner"]
    assert record["published"]["model.pt"]["from"] == "negatives"
    assert file_digest(out / "models" / "model.pt", None) == record["stages"]["negatives"]["sha256"]
    assert file_digest(out / "models" / "refiner.pt", None) == record["stages"]["refiner"]["sha256"]

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow'}/mlruns.db")
    experiment = client.get_experiment_by_name("brain_tumor_mri_seg")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("workflow") == "recipe"]
    assert len(parents) == 1 and parents[0].info.run_name == record["recipe_run"]
    assert parents[0].info.status == "FINISHED"
    children = {r.data.params["stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert set(children) == {"segmentation", "negatives", "refiner"}
    assert len(runs) == 4  # the killed negatives run was continued, not duplicated
    # the tumour-free item is the negatives stage's alone
    assert int(children["negatives"].data.params["train_images"]) == int(children["segmentation"].data.params["train_images"]) + 1
    assert children["negatives"].data.params["train_negatives"] == "True"
    assert children["negatives"].data.params["paste_prob"] == "0.5"  # tumours pasted into the negatives


def test_recipe_stage_alone_and_failures_in_one_line(converted_sample, tmp_path):
    out = tmp_path / "run"
    alone = check(run_cli(*recipe_command(converted_sample, out, "--recipe_stages", "['refiner']")[1:]))
    assert "recipe: refiner done" in alone.stdout
    assert (out / "models" / "refiner.pt").is_file() and not (out / "models" / "model.pt").exists()

    # the negatives stage alone, without the segmentation stage's weights: one line naming the stage
    failed = run_cli(*recipe_command(converted_sample, tmp_path / "other", "--recipe_stages", "['negatives']")[1:])
    assert failed.returncode != 0
    assert "recipe stage negatives failed" in failed.stderr and "Traceback" not in failed.stderr
    unknown = run_cli(*recipe_command(converted_sample, tmp_path / "x", "--recipe_stages", "['segmentatoin']")[1:])
    assert unknown.returncode != 0 and "segmentatoin" in unknown.stderr


def test_poster_recipe_is_one_override_file():
    from tumorseg.bundle import parser

    poster = parser("train_poster")
    assert poster.get_parsed_content("recipe_stages") == ["segmentation"]
    assert poster.get_parsed_content("dice_batch") is True and poster.get_parsed_content("quarter_turns") == 0.0
    shipped = parser("train")
    assert shipped.get_parsed_content("recipe_stages") == ["segmentation", "negatives", "refiner"]
    assert configs("train_poster.yaml").endswith("train_poster.yaml']")


def test_negatives_collate_with_unmarked_tumour_items(converted_sample, tmp_path):
    """Only the negatives carry ``"tumour": 0``; a batch that holds both kinds still collates
    (a batch keeps the keys of its first item, so a marked one first used to end in KeyError)."""
    from monai.data import list_data_collate

    from tumorseg.io.reading import datalist_items

    data = with_negative(converted_sample, tmp_path)
    datalist = json.loads((data / "datalist.json").read_text())
    datalist["training"].insert(0, datalist["training"].pop())  # the marked negative first
    (data / "datalist.json").write_text(json.dumps(datalist))
    items = datalist_items(data / "datalist.json", "training", data)
    assert len(items) == len(datalist["training"]) and Path(items[0]["image"]).name == "healthy.png"
    assert len(list_data_collate(items)["image"]) == len(items)
    without = datalist_items(data / "datalist.json", "training", data, negatives=False)
    assert len(without) == len(items) - 1


def test_a_stage_that_fails_mid_run_ends_its_mlflow_runs_failed_and_resume_finishes_them(converted_sample, tmp_path):
    """A training image that breaks in the loader (uncached: read during the epoch, after the
    stage's MLflow run started): the stage's run and the recipe's parent end FAILED, not RUNNING;
    once the image is mended, ``--resume true`` reopens the parent, runs the stage (afresh: it
    failed before its first checkpoint) and ends both FINISHED; the failed attempt stays FAILED."""
    import mlflow

    data, out = tmp_path / "dataset", tmp_path / "run"
    shutil.copytree(converted_sample, data)
    # the datalist's images are the sample's own files: the first one copied into the dataset
    # and pointed to there, so that breaking it leaves the repository's sample alone
    datalist = json.loads((data / "datalist.json").read_text())
    source = (data / datalist["training"][0]["image"]).resolve()
    image = data / "broken" / source.name
    image.parent.mkdir()
    shutil.copy(source, image)
    datalist["training"][0]["image"] = str(image.relative_to(data))
    (data / "datalist.json").write_text(json.dumps(datalist))
    good = image.read_bytes()
    image.write_bytes(good[: len(good) // 4])
    extra = ["--recipe_stages", "['segmentation']", "--cache_rate", "0"]
    failed = run_cli(*recipe_command(data, out, *extra)[1:])
    assert failed.returncode != 0 and "recipe stage segmentation failed" in failed.stderr, failed.stderr[-2000:]
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow'}/mlruns.db")
    experiment = client.get_experiment_by_name("brain_tumor_mri_seg").experiment_id

    def statuses() -> list[tuple[str, str]]:
        runs = client.search_runs([experiment], order_by=["attributes.start_time ASC"])
        return [(r.data.tags.get("workflow", "?"), r.info.status) for r in runs]

    assert sorted(statuses()) == [("recipe", "FAILED"), ("train", "FAILED")]
    image.write_bytes(good)
    check(run_cli(*recipe_command(data, out, *extra, "--resume", "true")[1:]))
    assert sorted(statuses()) == [("recipe", "FINISHED"), ("train", "FAILED"), ("train", "FINISHED")]
    parent = [r for r in client.search_runs([experiment]) if r.data.tags.get("workflow") == "recipe"][0]
    nested = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(nested) == 2  # both attempts under the one parent
