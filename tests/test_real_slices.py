"""Real negatives through the datalist, the learned presence decision, and the one-line refusals
of a workflow file run alone or without its bundle root."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import BUNDLE, CONFIGS, SAMPLE, run_cli
from PIL import Image

from tumorseg.io.reading import InputError
from tumorseg.postprocessing.presence import FEATURES, PresenceClassifier, presence_features


def box_map(size=64, box=(10, 30, 12, 40), level=0.95) -> np.ndarray:
    p = np.zeros((size, size), np.float32)
    p[box[0] : box[1], box[2] : box[3]] = level
    return p


def ragged_map(seed: int, size=64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = np.zeros((size, size), np.float32)
    for _ in range(6):  # thin slanted strokes, as a false positive along a ventricle's wall
        r, c = rng.integers(0, size - 20, 2)
        level = rng.uniform(0.6, 1.0)
        for i in range(16):
            p[r + i, c + i : c + i + 2] = level
    return p


def test_features_tell_a_filled_box_from_ragged_strokes():
    box, ragged = presence_features(box_map()), presence_features(ragged_map(0))
    fill, components = FEATURES.index("fill"), FEATURES.index("components")
    assert box[fill] == pytest.approx(1.0) and ragged[fill] < 0.5
    assert box[components] < ragged[components]
    empty = presence_features(np.zeros((32, 32)))
    assert empty[FEATURES.index("peak")] == 0 and np.isfinite(empty).all()


def test_classifier_learns_presence_and_round_trips(tmp_path):
    tumours = [presence_features(box_map(box=(r, r + 15, c, c + 20))) for r in range(5, 40, 5) for c in (5, 20, 30)]
    healthy = [presence_features(ragged_map(seed)) for seed in range(len(tumours))]
    x, y = np.array(tumours + healthy), np.array([1] * len(tumours) + [0] * len(healthy))
    classifier = PresenceClassifier.fit(x, y)
    assert classifier.present(box_map()) and not classifier.present(ragged_map(999))
    classifier.save(tmp_path / "presence.json")
    again = PresenceClassifier.load(tmp_path / "presence.json")
    assert np.allclose(again.probability(x), classifier.probability(x))
    (tmp_path / "bad.json").write_text('{"mean": [1]}')
    with pytest.raises(InputError, match="bad.json: not a presence classifier"):
        PresenceClassifier.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="both kinds"):
        PresenceClassifier.fit(x[:3], np.ones(3))


def test_real_negatives_enter_training_and_a_held_out_part_is_kept(tmp_path, converted_sample):
    """--real: each file's part comes from its bytes (stable whatever else is in the folder);
    training copies are square, the selection and held-out lists name the originals, untouched."""
    real = tmp_path / "real"
    real.mkdir()
    rng = np.random.default_rng(0)
    for k in range(24):  # web-sized, not square, RGB-encoded grey: as the real ones come
        grey = (rng.random((200 + k, 180)) * 255).astype(np.uint8)
        Image.fromarray(grey).convert("RGB").save(real / f"healthy_{k:02d}.jpg")
    others = tmp_path / "others"
    shutil.copytree(SAMPLE / "test", others)
    before = {p.name: p.read_bytes() for p in real.iterdir()}

    def build(out: Path) -> dict:
        args = ["-m", "data_tools.healthy", str(converted_sample), str(out), "--variants", "1", "--synthetic", "2"]
        result = run_cli(*args, "--real", str(real), "--other-tumours", str(others), "--real-repeat", "2")
        assert result.returncode == 0, result.stderr[-2000:]
        return json.loads((out / "datalist.json").read_text())

    datalist = build(tmp_path / "a")
    trained = [i for i in datalist["training"] if "/real_healthy/" in i["image"]]
    held = {Path(i["image"]).name for i in datalist["healthy_real"]}
    select = {Path(i["image"]).name for i in datalist["healthy_select"]}
    trained_names = {Path(i["image"]).stem for i in trained}
    assert len(trained) == 2 * len(trained_names) and trained_names and held
    assert not ({f"{n}.jpg" for n in trained_names} & held) and not (held & select)
    assert len(trained_names) + len(held) + len(select) == 24
    for item in trained[:3]:
        assert Image.open(tmp_path / "a" / item["image"]).size == (256, 256)
        assert not np.asarray(Image.open(tmp_path / "a" / item["label"])).any()
    assert all(i["tumour"] == 0 and (tmp_path / "a" / i["image"]).resolve().parent == real for i in datalist["healthy_real"])
    assert len(datalist["other_tumours"]) == 8 and all(i["tumour"] == 1 for i in datalist["other_tumours"])
    assert {p.name: p.read_bytes() for p in real.iterdir()} == before  # inputs only read

    (real / "healthy_99.jpg").write_bytes((real / "healthy_00.jpg").read_bytes()[:-10] + b"0123456789")
    again = build(tmp_path / "b")
    assert held <= {Path(i["image"]).name for i in again["healthy_real"]}  # earlier files keep their part


def test_a_bad_real_folder_is_one_line(tmp_path, converted_sample):
    result = run_cli("-m", "data_tools.healthy", str(converted_sample), str(tmp_path / "out"), "--real", str(tmp_path / "nope"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'nope'}: not a folder of PNG/JPG slices"


@pytest.mark.parametrize("workflow", ["inference", "train"])  # evaluate.yaml alone fails in MONAI's own reader
def test_a_workflow_file_alone_is_one_line_with_the_command_to_run(tmp_path, workflow):
    run_id = {"inference": "inference", "train": "training"}[workflow]
    alone = str(CONFIGS / f"{workflow}.yaml")
    result = run_cli("-m", "monai.bundle", "run", run_id, "--config_file", alone, cwd=tmp_path)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {alone}: a layer of the bundle's configs, not a workflow on its own (missing common.yaml")
    assert "common.yaml" in last.split("run: ", 1)[1] and "Traceback" not in result.stderr


def test_no_bundle_root_outside_the_bundle_is_one_line(tmp_path):
    files = str([str(CONFIGS / "common.yaml"), str(CONFIGS / "inference.yaml")])
    args = ["-m", "monai.bundle", "run", "inference", "--config_file", files, "--input_dir", str(SAMPLE / "test")]
    result = run_cli(*args, "--bundle_root", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {tmp_path}: not a bundle folder") and f"--bundle_root {BUNDLE}" in last


def test_the_gate_with_a_classifier_clears_what_it_says_is_not_tumour(tmp_path):
    """PresenceGated(classifier=...): the peak rule first, then the learned decision."""
    import torch

    from tumorseg.postprocessing.transforms import PresenceGated

    tumours = [presence_features(box_map(box=(r, r + 15, 5, 30))) for r in range(5, 45, 4)]
    healthy = [presence_features(ragged_map(seed)) for seed in range(len(tumours))]
    x, y = np.array(tumours + healthy), np.array([1] * len(tumours) + [0] * len(healthy))
    PresenceClassifier.fit(x, y).save(tmp_path / "presence.json")
    gate = PresenceGated("pred", min_peak=0.5, classifier=str(tmp_path / "presence.json"))
    image = torch.rand(1, 64, 64)
    kept = gate({"pred": torch.as_tensor(box_map())[None], "image": image})["pred"]
    cleared = gate({"pred": torch.as_tensor(ragged_map(7))[None], "image": image})["pred"]
    assert kept.max() > 0.9 and cleared.max() == 0
    no_classifier = PresenceGated("pred", min_peak=0.5)
    assert no_classifier({"pred": torch.as_tensor(ragged_map(7))[None], "image": image})["pred"].max() > 0
