"""The shipped model and the inference settings chosen for it: TTA, box fit, the metrics log."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import BUNDLE, INFERENCE, SAMPLE, check, configs, run_cli

WEIGHTS = BUNDLE / "models" / "model.pt"


def test_flip_tta_inferer_averages_flipped_views_and_switches_off():
    from monai.inferers import SimpleInferer

    from tumorseg.inferers import FlipTTAInferer

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

    from tumorseg.inferers import CPUAutocastInferer, cpu_bf16_supported

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

    from tumorseg.handlers import LowResolutionEpochs

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
    from tumorseg.transforms import ExpectedDiceBox, ExpectedDiceBoxd

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
