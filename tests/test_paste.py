"""Tumours pasted into tumour-free slices (the negatives stage's prepare_batch), on real slices:
Kaggle tumour slices of the embedded sample as donors, healthy MNI152 template slices as hosts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tumorseg.training.paste import PasteTumours

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "brain-tumor-coco-sample" / "train"
SIZE = 128


def _tumour_slices(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image

    coco = json.loads((SAMPLE / "_annotations.coco.json").read_text())
    images, labels = [], []
    for info in coco["images"][:n]:
        grey = np.asarray(Image.open(SAMPLE / info["file_name"]).convert("L"), dtype=np.float32)
        label = np.zeros_like(grey)
        for a in (a for a in coco["annotations"] if a["image_id"] == info["id"]):
            x, y, w, h = a["bbox"]
            label[int(y) : int(y + h), int(x) : int(x + w)] = 1
        images.append(grey / grey.max())
        labels.append(label)
    resize = lambda a, mode: F.interpolate(torch.tensor(np.stack(a))[:, None], size=(SIZE, SIZE), mode=mode)  # noqa: E731
    return resize(images, "bilinear"), resize(labels, "nearest")


def _healthy_slices(n: int) -> torch.Tensor:
    from nilearn.datasets import load_mni152_template

    volume = np.asarray(load_mni152_template(resolution=2).dataobj, dtype=np.float32)
    picks = [volume[:, :, z] / volume.max() for z in np.linspace(35, 55, n).astype(int)]
    return F.interpolate(torch.tensor(np.stack(picks))[:, None], size=(SIZE, SIZE), mode="bilinear")


@pytest.fixture(scope="module")
def batch() -> dict:
    tumour_images, tumour_labels = _tumour_slices(3)
    healthy = _healthy_slices(4)
    return {
        "image": torch.cat([tumour_images, healthy]),
        "label": torch.cat([tumour_labels, torch.zeros_like(healthy)]),
    }


def _boxes(label: torch.Tensor) -> tuple[int, int, int, int]:
    rows = torch.nonzero(label.amax(1) > 0).flatten()
    cols = torch.nonzero(label.amax(0) > 0).flatten()
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def test_every_tumour_free_slice_gets_one_box_on_the_brain_and_the_rest_is_untouched(batch):
    original = {k: v.clone() for k, v in batch.items()}
    image, label = PasteTumours(prob=1.0, zoom=(0.8, 1.2), margin=0.25, seed=3)(batch)
    assert all(torch.equal(batch[k], original[k]) for k in batch), "the collated batch was changed"
    donor_areas = [float(original["label"][i].sum()) for i in range(3)]
    assert torch.equal(image[:3], original["image"][:3]) and torch.equal(label[:3], original["label"][:3])
    for i in range(3, 7):
        y0, y1, x0, x1 = _boxes(label[i, 0])
        assert float(label[i, 0].sum()) == (y1 - y0) * (x1 - x0), "the pasted label is one rectangle"
        assert min(donor_areas) * 0.8**2 * 0.8 <= (y1 - y0) * (x1 - x0) <= max(donor_areas) * 1.2**2 * 1.2
        host = original["image"][i, 0]
        assert host[(y0 + y1) // 2, (x0 + x1) // 2] > 0.05, "the box sits on the brain, not in the air"
        changed = torch.nonzero((image[i, 0] - host).abs() > 1e-6)
        assert len(changed), "nothing was pasted"
        # changes stay within the box and its feathered margin
        h, w = y1 - y0, x1 - x0
        assert changed[:, 0].min() >= y0 - 0.3 * h - 1 and changed[:, 0].max() < y1 + 0.3 * h + 1
        assert changed[:, 1].min() >= x0 - 0.3 * w - 1 and changed[:, 1].max() < x1 + 0.3 * w + 1
        # the patch carries the host's intensities, not the donor's
        assert float(image[i, 0].min()) >= float(host.min()) - 1e-6
        assert float(image[i, 0].max()) <= float(host.max()) + 1e-6


def test_prob_zero_and_a_batch_without_donors_are_passed_through(batch):
    image, label = PasteTumours(prob=0.0)(batch)
    assert torch.equal(image, batch["image"]) and torch.equal(label, batch["label"])
    healthy_only = {"image": batch["image"][3:], "label": batch["label"][3:]}
    image, label = PasteTumours(prob=1.0)(healthy_only)
    assert torch.equal(image, healthy_only["image"]) and not label.any()


def test_the_draws_follow_the_seed(batch):
    first = PasteTumours(prob=0.5, seed=7)(batch)
    again = PasteTumours(prob=0.5, seed=7)(batch)
    other = PasteTumours(prob=0.5, seed=8)(batch)
    assert torch.equal(first[1], again[1]) and torch.equal(first[0], again[0])
    assert not torch.equal(first[1], other[1])


@pytest.mark.parametrize(
    "kwargs, message",
    [({"prob": 1.5}, "prob must be in"), ({"zoom": (1.2, 0.8)}, "zoom must be a range"), ({"margin": -0.1}, "margin must be")],
)
def test_arguments_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PasteTumours(**kwargs)
