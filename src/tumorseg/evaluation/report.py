"""Self-contained HTML reports of a validation or evaluation: metric table, per-image Dice
histogram (inline SVG), worst cases, and the case panel embedded as a PNG."""

from __future__ import annotations

import base64
import html

import numpy as np


def histogram_svg(values: list[float], bins: int = 10, width: int = 420, height: int = 160) -> str:
    """Bars of how many images fall in each Dice bin over [0, 1]."""
    counts, edges = np.histogram(np.clip(values, 0, 1), bins=bins, range=(0, 1))
    top = max(int(counts.max()), 1)
    bar_w = width / bins
    bars = []
    for i, c in enumerate(counts):
        h = (height - 30) * c / top
        x, y = i * bar_w, height - 20 - h
        bars.append(
            f'<rect x="{x + 1:.1f}" y="{y:.1f}" width="{bar_w - 2:.1f}" height="{h:.1f}" fill="#3b7dd8">'
            f"<title>{edges[i]:.1f}-{edges[i + 1]:.1f}: {c} images</title></rect>"
            f'<text x="{x + bar_w / 2:.1f}" y="{y - 2:.1f}" font-size="10" text-anchor="middle">{c}</text>'
        )
    ticks = "".join(
        f'<text x="{i * bar_w:.1f}" y="{height - 5}" font-size="10">{edges[i]:.1f}</text>' for i in range(0, bins + 1, 2)
    )
    return f'<svg width="{width + 20}" height="{height}" xmlns="http://www.w3.org/2000/svg">{"".join(bars)}{ticks}</svg>'


def html_report(
    title: str, figures: dict[str, float], per_image: list[dict], panel_png: bytes | None = None, worst: int = 10
) -> str:
    """The report page: ``figures`` as a table, the Dice distribution of ``per_image`` rows
    (each with ``image`` and ``dice``), the ``worst`` cases, and the panel picture."""
    esc = html.escape
    table = "".join(f"<tr><td>{esc(k)}</td><td>{v:.4f}</td></tr>" for k, v in figures.items())
    dice = [float(r["dice"]) for r in per_image]
    ranked = sorted(per_image, key=lambda r: float(r["dice"]))[:worst]
    worst_rows = "".join(
        f"<tr><td>{esc(str(r['image']))}</td>"
        + "".join(f"<td>{float(r[k]):.3f}</td>" for k in ("dice", "iou") if k in r)
        + "</tr>"
        for r in ranked
    )
    picture = (
        f'<h2>Cases</h2><p>Green: ground truth; red: prediction.</p><img alt="cases" src="data:image/png;base64,'
        f'{base64.b64encode(panel_png).decode()}">'
        if panel_png
        else ""
    )
    mean, median = (np.mean(dice), np.median(dice)) if dice else (float("nan"), float("nan"))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}}td{{padding:2px 10px}}tr:nth-child(even){{background:#f2f2f2}}</style>
</head><body>
<h1>{esc(title)}</h1>
<h2>Figures</h2><table>{table}</table>
<h2>Per-image Dice ({len(dice)} images, mean {mean:.4f}, median {median:.4f})</h2>
{histogram_svg(dice) if dice else ""}
<h2>Worst {len(ranked)} cases</h2><table><tr><th>image</th><th>Dice</th><th>IoU</th></tr>{worst_rows}</table>
{picture}
</body></html>
"""
