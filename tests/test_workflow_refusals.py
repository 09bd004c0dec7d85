"""The bundle's workflows refuse bad inputs before any engine starts, in the one line
``tumorseg-predict`` prints (tumorseg.io.reading.InputError), with a non-zero exit."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import BUNDLE, INFERENCE, QUICK, SAMPLE, TRAIN, configs, run_cli


def one_line(result, *fragments: str) -> None:
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    shipped = (BUNDLE / "models" / "model.pt").read_bytes()
    (root / "truncated.pt").write_bytes(shipped[: len(shipped) // 3])
    torch.save({"conv.weight": torch.zeros(3, 3)}, root / "other_network.pt")
    return root


@pytest.mark.parametrize("name, says", [("truncated.pt", "not loadable"), ("other_network.pt", "another network"),
                                        ("absent.pt", "no model weights")])  # fmt: skip
def test_evaluate_and_inference_refuse_bad_weights(checkpoints, converted_sample, tmp_path, name, says):
    checkpoint = str(checkpoints / name)
    evaluate = run_cli("-m", "monai.bundle", "run", "--config_file", configs("evaluate.yaml"),
                       "--dataset_dir", str(converted_sample), "--eval_list", "validation",
                       "--output_dir", str(tmp_path / "eval"), "--checkpoint", checkpoint)  # fmt: skip
    one_line(evaluate, name, says)
    inference = run_cli("-m", "monai.bundle", "run", "inference", "--config_file", INFERENCE,
                        "--input_dir", str(SAMPLE / "test"), "--output_dir", str(tmp_path / "out"),
                        "--checkpoint", checkpoint)  # fmt: skip
    one_line(inference, name, says)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*_mask*"))


def test_training_refuses_missing_datalist_labels_and_bad_start_weights(checkpoints, converted_sample, tmp_path):
    def train(dataset, *extra):
        return run_cli("-m", "monai.bundle", "run", "run", "--config_file", TRAIN, "--dataset_dir", str(dataset),
                       "--ckpt_dir", str(tmp_path / "m"), "--output_dir", str(tmp_path / "e"), *QUICK, *extra)  # fmt: skip

    one_line(train(tmp_path / "nowhere"), "datalist.json", "no datalist")
    broken = tmp_path / "broken"
    shutil.copytree(converted_sample, broken)
    labels = sorted((broken / "labels" / "train").glob("*.png"))
    for label in labels[:4]:
        label.unlink()
    one_line(train(broken), "4 file(s) of list 'training' missing", labels[0].name)
    (broken / "datalist.json").write_text('{"training": [')
    one_line(train(broken), "not a JSON datalist")
    one_line(train(converted_sample, "--init_weights", str(checkpoints / "truncated.pt")), "truncated.pt", "not loadable")
    assert not (tmp_path / "m" / "model.pt").exists()
    # the recipe: the failing stage named, the reason in the same line
    recipe = run_cli("-m", "monai.bundle", "run", "training", "--config_file", TRAIN, "--dataset_dir", str(tmp_path / "x"),
                     "--ckpt_dir", str(tmp_path / "r"), "--output_dir", str(tmp_path / "re"), *QUICK)  # fmt: skip
    one_line(recipe, "recipe stage segmentation failed", "no datalist")
