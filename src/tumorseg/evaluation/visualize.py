"""Pictures of segmentations: ground truth and prediction outlined over the image."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw
from skimage.segmentation import find_boundaries

GROUND_TRUTH_RGB = (0, 220, 0)
PREDICTION_RGB = (255, 40, 40)
CAPTION_HEIGHT = 16
MIN_TILE = 256  # smaller cases are enlarged (nearest neighbour) so outlines stay visible


def overlay(image: np.ndarray, label: np.ndarray | None, pred: np.ndarray | None) -> np.ndarray:
    """RGB uint8 picture of a 2D image with the label (green) and prediction (red) outlines."""
    img = np.asarray(image, dtype=np.float32)
    lo, hi = float(img.min()), float(img.max())
    grey = ((img - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(img)).astype(np.uint8)
    rgb = np.stack([grey] * 3, axis=-1)
    for mask, colour in ((label, GROUND_TRUTH_RGB), (pred, PREDICTION_RGB)):
        if mask is not None and np.any(mask):
            rgb[find_boundaries(np.asarray(mask, dtype=bool), mode="inner")] = colour
    return rgb


def panel(cases: list[tuple], columns: int = 3, letters: tuple[str, str, str, str] | None = None) -> Image.Image:
    """A grid of ``(image, label, pred, caption)`` cases (2D arrays, spatial axes as stored by
    MONAI's ``PILReader``: first axis = width), each with its caption underneath; ``letters``
    (top, bottom, left, right) marks the patient directions on every tile, e.g. ``("A", "P", "R", "L")``."""
    tiles = [overlay(np.asarray(img).T, np.asarray(lab).T, np.asarray(prd).T) for img, lab, prd, _ in cases]
    factor = max(1, -(-MIN_TILE // max(tiles[0].shape[:2])))
    tiles = [t.repeat(factor, axis=0).repeat(factor, axis=1) for t in tiles]
    h, w = tiles[0].shape[:2]
    columns = min(columns, len(tiles))
    rows = -(-len(tiles) // columns)
    canvas = Image.new("RGB", (columns * w, rows * (h + CAPTION_HEIGHT)), "black")
    draw = ImageDraw.Draw(canvas)
    for i, (tile, case) in enumerate(zip(tiles, cases)):
        x, y = (i % columns) * w, (i // columns) * (h + CAPTION_HEIGHT)
        canvas.paste(Image.fromarray(tile), (x, y))
        draw.text((x + 3, y + h + 2), case[3], fill="white")
        if letters:
            top, bottom, left, right = letters
            draw.text((x + w // 2 - 3, y + 2), top, fill="yellow")
            draw.text((x + w // 2 - 3, y + h - 13), bottom, fill="yellow")
            draw.text((x + 3, y + h // 2 - 6), left, fill="yellow")
            draw.text((x + w - 10, y + h // 2 - 6), right, fill="yellow")
    return canvas
