"""The shipped model and the inference settings chosen for it: TTA, box fit, the metrics log."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import BUNDLE, INFERENCE, REPO, SAMPLE, check, configs, run_cli

WEIGHTS = BUNDLE / "models" / "model.pt"


def test_flip_tta_inferer_averages_flipped_views_and_switches_off():
    from monai.inferers import SimpleInferer

    from tumorseg.inference.inferers import FlipTTAInferer

    x = torch.arange(2 * 1 * 4 * 6, dtype=torch.float32).reshape(2, 1, 4, 6) / 48 - 0.5
    # a network that sees its input in a fixed place: its flipped views disagree unless undone
    ramp = torch.linspace(-2, 2, 6)

    def net(t):
        return t + ramp

    expected = torch.stack([torch.sigmoid((x.flip(d) + ramp).flip(d) if d else x + ramp) for d in [(), (2,), (3,), (2, 3)]]).mean(
        0
    )
    out = FlipTTAInferer(SimpleInferer())(x, net)
    assert torch.allclose(torch.sigmoid(out), expected, atol=1e-5)
    assert torch.equal(FlipTTAInferer(enabled=False)(x, net), net(x))
    with pytest.raises(ValueError, match="flips"):
        FlipTTAInferer(flips=[])


def test_cpu_autocast_inferer_runs_in_bf16_and_returns_float32():
    from monai.inferers import SimpleInferer
    from monai.networks.nets import UNet

    from tumorseg.inference.inferers import CPUAutocastInferer, cpu_bf16_supported

    torch.manual_seed(0)
    net = UNet(2, 1, 1, (4, 8), (2,), num_res_units=1).eval()
    x = torch.rand(2, 1, 32, 32)
    seen = []
    net.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    with torch.no_grad():
        fp32 = SimpleInferer()(x, net)
        on = CPUAutocastInferer(SimpleInferer(), enabled=True)(x, net)
        off = CPUAutocastInferer(enabled="false")(x, net)
    assert seen == [torch.float32, torch.bfloat16, torch.float32]  # the network ran in bf16 only when on
    assert on.dtype == torch.float32 and torch.allclose(on, fp32, atol=0.05)  # bf16 has 8 bits of mantissa
    assert torch.equal(off, fp32)
    assert CPUAutocastInferer(enabled="auto").enabled == cpu_bf16_supported()
    with pytest.raises(ValueError, match="auto"):
        CPUAutocastInferer(enabled="sometimes")


def test_low_resolution_epochs_shrink_the_first_epochs_only_also_on_resume():
    from ignite.engine import Engine
    from monai.data import CacheDataset, DataLoader
    from monai.transforms import Compose, RandFlipd, Resized

    from experiments.components import LowResolutionEpochs

    data = [{"image": torch.rand(1, 16, 16), "label": torch.zeros(1, 16, 16)} for _ in range(4)]
    compose = Compose([RandFlipd(["image", "label"], prob=0.5)])
    loader = DataLoader(CacheDataset(data, compose, progress=False), batch_size=2, num_workers=1)
    shrink = Resized(["image", "label"], spatial_size=(8, 8), mode=["bilinear", "nearest"])

    def sizes(resume_after: int = 0) -> dict:
        seen = {}
        engine = Engine(lambda e, batch: seen.setdefault(e.state.epoch, set()).add(tuple(batch["image"].shape[2:])))
        LowResolutionEpochs(compose, shrink, epochs=2).attach(engine)
        if resume_after:  # as CheckpointLoader restores the trainer's state
            engine.load_state_dict({"epoch": resume_after, "max_epochs": 4, "epoch_length": 2})
        engine.run(loader, max_epochs=4)
        return seen

    assert sizes() == {1: {(8, 8)}, 2: {(8, 8)}, 3: {(16, 16)}, 4: {(16, 16)}}
    assert shrink not in compose.transforms  # left at full size after training
    assert sizes(resume_after=1) == {2: {(8, 8)}, 3: {(16, 16)}, 4: {(16, 16)}}
    with pytest.raises(ValueError, match="epochs"):
        LowResolutionEpochs(compose, shrink, epochs=-1)


def test_expected_dice_box_returns_one_rectangle_or_nothing():
    from tumorseg.postprocessing.transforms import ExpectedDiceBox, ExpectedDiceBoxd

    prob = np.zeros((1, 64, 64), dtype=np.float32)
    prob[0, 10:30, 20:40] = 0.9  # the tumour
    prob[0, 12:16, 18:20] = 0.6  # a fringe that makes the thresholded mask non-rectangular
    prob[0, 50:53, 50:53] = 0.95  # a small second blob holding less probability
    box = ExpectedDiceBox(threshold=0.5)(prob)
    assert box.dtype == prob.dtype and box.shape == prob.shape
    rows, cols = np.nonzero(box[0])
    assert box[0, 10:30, 20:40].all() and box.sum() == (np.ptp(rows) + 1) * (np.ptp(cols) + 1)  # a filled rectangle
    assert not box[0, 50:53, 50:53].any()
    assert not ExpectedDiceBox(0.5)(prob * 0.5).any()  # nothing reaches the threshold: nothing predicted
    as_tensor = ExpectedDiceBoxd("pred", threshold=0.5)({"pred": torch.as_tensor(prob)})["pred"]
    assert isinstance(as_tensor, torch.Tensor) and torch.equal(as_tensor, torch.as_tensor(box))
    with pytest.raises(ValueError, match="threshold"):
        ExpectedDiceBox(threshold=1.5)
    with pytest.raises(ValueError, match="channel-first"):
        ExpectedDiceBox()(prob[0])


def test_training_writes_one_metrics_line_per_epoch(trained):
    lines = (trained / "eval" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        assert 0.0 <= r["val_mean_dice"] <= 1.0 and np.isfinite(r["train_loss"]) and r["lr"] > 0 and r["time_s"] > 0


def test_shipped_weights_are_small_safe_and_segment_held_out_sample_slices(converted_sample, tmp_path):
    """models/model.pt (well under 25 MB, a plain state dict) through the bundle's evaluate config
    on the sample's 8 `test` slices (taken from Kaggle's valid split, never trained on)."""
    assert WEIGHTS.stat().st_size < 10 * 2**20
    state = torch.load(WEIGHTS, weights_only=True, map_location="cpu")
    assert all(v.device.type == "cpu" for v in state.values())
    out = tmp_path / "eval"
    check(
        run_cli(
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            configs("evaluate.yaml"),
            "--dataset_dir",
            str(converted_sample),
            "--eval_list",
            "test",
            "--eval_dir",
            str(out),
            "--num_workers",
            "0",
        )
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 8
    assert summary["per_image"]["dice"]["mean"] > 0.6, summary["per_image"]


def test_tta_and_box_fit_switch_from_the_command_line(converted_sample, tmp_path):
    """evaluate.yaml chooses TTA and box fit; `--tta false --box_fit false` gives plain thresholding,
    whose masks are not all rectangles, while box-fit masks are."""
    from PIL import Image

    results = {}
    for flag in ("true", "false"):
        out = tmp_path / flag
        check(
            run_cli(
                "-m",
                "monai.bundle",
                "run",
                "inference",
                "--config_file",
                INFERENCE,
                "--dataset_dir",
                str(SAMPLE / "test"),
                "--output_dir",
                str(out),
                "--tta",
                flag,
                "--box_fit",
                flag,
            )
        )
        results[flag] = sorted(out.glob("*_seg.png"))
        assert len(results[flag]) == 8

    def is_rectangle(mask):
        rows, cols = np.nonzero(mask)
        return mask.sum() == 0 or mask.sum() == (np.ptp(rows) + 1) * (np.ptp(cols) + 1)

    assert all(is_rectangle(np.asarray(Image.open(p))) for p in results["true"])
    assert not all(is_rectangle(np.asarray(Image.open(p))) for p in results["false"])


class _Brightness(torch.nn.Module):
    """A stand-in refiner whose tumour is whatever is bright: logit 20 * (x - 0.5)."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(20.0))

    def forward(self, x):
        return self.scale * (x - 0.5)


def test_box_refined_moves_the_box_onto_what_the_refiner_sees_and_never_changes_presence(tmp_path):
    """tumorseg.postprocessing.refine.BoxRefined: the box is replaced by the refiner's box found in a window around
    it (here: a bright rectangle the first box only half covers); an empty mask stays empty and a
    window where the refiner sees nothing keeps the first box."""
    from tumorseg.postprocessing.refine import BoxRefined, bbox, window

    weights = tmp_path / "refiner.pt"
    torch.save(_Brightness().state_dict(), weights)
    refine = BoxRefined("pred", "image", _Brightness(), weights, context=2.0, size=64)

    image = torch.zeros(1, 128, 128)
    image[0, 40:60, 50:80] = 1.0  # the tumour: rows 40-59, columns 50-79
    first = torch.zeros(1, 128, 128)
    first[0, 45:70, 60:85] = 1  # the first stage's box, off in place and size
    out = refine({"image": image, "pred": first})["pred"]
    assert out.shape == first.shape
    r0, c0, r1, c1 = bbox(np.asarray(out[0]) > 0)
    assert abs(r0 - 40) <= 2 and abs(c0 - 50) <= 2 and abs(r1 - 60) <= 2 and abs(c1 - 80) <= 2, (r0, c0, r1, c1)

    empty = torch.zeros(1, 128, 128)
    assert not refine({"image": image, "pred": empty})["pred"].any()  # presence is the first stage's
    dark = torch.zeros(1, 128, 128)
    kept = refine({"image": dark, "pred": first})["pred"]
    assert torch.equal(torch.as_tensor(kept), first)  # the refiner sees nothing: the first box stays

    assert window((10, 10, 20, 30), 2.0) == (-9, -4, 48)  # centred; min_side: a small box keeps some context
    assert window((10, 10, 50, 40), 2.0) == (-10, -15, 80)  # twice the longer side
    with pytest.raises(ValueError, match="context must be >= 1"):
        BoxRefined("pred", "image", _Brightness(), weights, context=0.5)
    with pytest.raises(Exception, match="refiner.pt: no model weights"):
        BoxRefined("pred", "image", _Brightness(), tmp_path / "missing" / "refiner.pt")


def test_box_window_cuts_the_refiners_training_input_around_the_label_box():
    """tumorseg.postprocessing.refine.BoxWindowd: image and label cut to the window BoxRefined would cut around the
    label's box (without jitter), resized to the refiner's size; jitter moves and scales it within
    its bounds; a slice without a box is taken whole."""
    from tumorseg.postprocessing.refine import BoxWindowd, bbox

    image = torch.rand(1, 200, 200)
    label = torch.zeros(1, 200, 200)
    label[0, 60:100, 80:100] = 1  # 40 x 20: the window is 80 px, centred on it
    exact = BoxWindowd(["image", "label"], "label", context=2.0, size=64)({"image": image, "label": label})
    assert exact["image"].shape == exact["label"].shape == (1, 64, 64)
    assert bbox(np.asarray(exact["label"][0]) > 0) == (16, 24, 48, 40)  # the box, at 64/80 of its size, centred
    assert torch.allclose(exact["image"].mean(), image[0, 40:120, 50:130].mean(), atol=0.01)  # the window's pixels

    jittered = BoxWindowd(["image", "label"], "label", context=2.0, size=64, jitter=0.2, scale_jitter=0.3)
    jittered.set_random_state(0)
    boxes = {bbox(np.asarray(jittered({"image": image, "label": label})["label"][0]) > 0) for _ in range(20)}
    assert len(boxes) > 10  # moved and scaled every time ...
    for r0, _, r1, _ in boxes:  # ... within the bounds: shift <= 0.2 box, side within exp(+-0.3)
        assert 32 / np.exp(0.3) - 1 <= r1 - r0 <= 32 * np.exp(0.3) + 1
        assert abs((r0 + r1) / 2 - 32) <= 0.2 * 40 * 64 / (80 / np.exp(0.3)) + 1

    whole = BoxWindowd(["image", "label"], "label", size=50)({"image": image, "label": torch.zeros(1, 200, 200)})
    assert whole["image"].shape == (1, 50, 50) and not whole["label"].any()
    with pytest.raises(ValueError, match="jitter must be in"):
        BoxWindowd(["image", "label"], "label", jitter=0.7)


@pytest.mark.slow
def test_refiner_trains_through_the_bundle_and_evaluate_uses_it(converted_sample, tmp_path):
    """configs/train_refiner.yaml: the real `monai.bundle run training` trains the second stage
    (tracked in MLflow as a training run of stage `refiner` that registers no model) and keeps the
    last epoch's weights, and `--refiner_checkpoint` puts them into evaluate's cascade."""
    import hashlib

    import mlflow

    models, store = tmp_path / "models", tmp_path / "mlflow"
    train_refiner = configs("train_refiner.yaml")
    check(run_cli("-m", "monai.bundle", "run", "run", "--config_file", train_refiner, "--dataset_dir",
                  str(converted_sample), "--ckpt_dir", str(models), "--output_dir", str(tmp_path / "eval"),
                  "--max_epochs", "2", "--refine_size", "32", "--num_workers", "0",
                  "--tracking", str(REPO / "configs" / "mlflow.json"), "--tracking_dir", str(store)))  # fmt: skip
    weights = models / "model.pt"
    state = torch.load(weights, weights_only=True)
    last = torch.load(models / "last" / "checkpoint_epoch=2.pt", weights_only=True)["model"]
    assert state.keys() == last.keys() and all(torch.equal(state[k], last[k]) for k in state)  # the last epoch's
    client = mlflow.MlflowClient(f"sqlite:///{store}/mlruns.db")
    (run,) = client.search_runs([client.get_experiment_by_name("brain_tumor_mri_seg").experiment_id])
    assert run.data.params["stage"] == "refiner" and run.data.params["refine_size"] == "32"
    assert "val_mean_dice" in run.data.metrics and not client.search_registered_models()
    listed = check(run_cli("-m", "tumorseg.tracking.runs", "--tracking-dir", str(store))).stdout
    assert f"{run.info.run_name} [finished] second stage (refiner)" in listed

    out = tmp_path / "evaluate"
    check(run_cli("-m", "monai.bundle", "run", "--config_file", configs("evaluate.yaml"), "--dataset_dir",
                  str(converted_sample), "--eval_list", "test", "--eval_dir", str(out),
                  "--refiner_checkpoint", str(weights), "--refine_size", "32",
                  "--tracking", str(REPO / "configs" / "mlflow.json"), "--tracking_dir", str(store)))  # fmt: skip
    (evaluated,) = client.search_runs([run.info.experiment_id], filter_string="tags.workflow = 'evaluate'")
    assert evaluated.data.params["refiner_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()[:16]  # which refiner
    shipped = tmp_path / "shipped"
    check(run_cli("-m", "monai.bundle", "run", "--config_file", configs("evaluate.yaml"), "--dataset_dir",
                  str(converted_sample), "--eval_list", "test", "--eval_dir", str(shipped)))  # fmt: skip
    rows = [(p / "per_image.csv").read_text().splitlines() for p in (out, shipped)]
    assert len(rows[0]) == len(rows[1]) > 1
    assert rows[0] != rows[1]  # the new refiner placed the boxes


def test_refine_is_part_of_the_box_fit_and_switches_off_from_the_command_line(converted_sample, tmp_path):
    """The shipped post-processing refines the box fit's boxes (models/refiner.pt); `--refine false`
    gives the first stage's boxes, and without the box fit there is nothing to refine."""
    from tumorseg.inference.predictor import Predictor

    def steps(**overrides):
        predictor = Predictor.from_bundle(BUNDLE, overrides={"runtime": "torch", **overrides})
        return [type(t).__name__ for t in predictor.postprocess.transforms]

    assert steps()[-2:] == ["ExpectedDiceBoxd", "BoxRefined"]
    assert "BoxRefined" not in steps(refine=False) and "BoxRefined" not in steps(box_fit=False)

    dice = {}
    for flag in ("true", "false"):
        out = tmp_path / flag
        check(run_cli("-m", "monai.bundle", "run", "--config_file", configs("evaluate.yaml"), "--dataset_dir",
                      str(converted_sample), "--eval_list", "test", "--eval_dir", str(out), "--refine", flag))  # fmt: skip
        dice[flag] = json.loads((out / "summary.json").read_text())["per_image"]["dice"]["mean"]
    assert dice["true"] > 0.6 and dice["false"] > 0.6, dice
    assert dice["true"] != dice["false"], dice  # the second stage changed the boxes


def test_tumorseg_predict_refines_by_default_and_records_it(tmp_path):
    """tumorseg-predict runs the second stage with the box fit (the inference config's default) and
    `--no-refine` keeps the first stage's box; each case's summary says which."""
    from PIL import Image

    image = sorted((SAMPLE / "test").glob("*.jpg"))[0]
    boxes = {}
    for flag in ("--refine", "--no-refine"):
        out = tmp_path / flag.strip("-")
        check(run_cli("-m", "tumorseg.inference.predict", str(image), "-o", str(out), flag, "--no-progress"))
        summary = json.loads((out / f"{image.stem}.json").read_text())
        assert summary["refine"] is (flag == "--refine") and summary["box_fit"] is True
        boxes[flag] = np.asarray(Image.open(out / f"{image.stem}_seg.png")) > 0
        assert boxes[flag].any()  # a tumour slice: a box either way
    assert not np.array_equal(boxes["--refine"], boxes["--no-refine"])  # the second stage moved it
