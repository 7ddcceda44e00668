"""What people look at: labelled image grids, SSIM heat maps, latency tables and latency-history plots.

matplotlib is driven through the Agg canvas directly (no pyplot), so nothing opens a window or changes
the process-wide backend.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from sdxl_core import metrics
from sdxl_core.errors import UserError
from sdxl_core.files import atomic_path
from sdxl_core.reports.tables import markdown_table

LABEL_HEIGHT = 16  # caption strip above each labelled row or image, in pixels
HEATMAP_CMAP = "inferno"


@lru_cache(maxsize=1)
def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def _caption(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str) -> None:
    draw.text((xy[0] + 2, xy[1] + 2), text, fill="black", font=_font())


def image_grid(
    rows: list[list[Image.Image]], labels: list[str] | None = None, pad: int = 4, background: str = "white"
) -> Image.Image:
    """Paste `rows` of images into one RGB image, each cell as large as the largest image.

    `labels` (one per row) are drawn in a LABEL_HEIGHT strip above their row. Size:
    width = cols * cell_w + (cols + 1) * pad, height = nrows * (cell_h + label_h) + (nrows + 1) * pad.
    """
    if not rows or not any(rows):
        raise UserError("image_grid needs at least one row with at least one image")
    if labels is not None and len(labels) != len(rows):
        raise UserError(f"image_grid got {len(rows)} rows but {len(labels)} labels; pass one label per row")
    cell_w = max(img.width for row in rows for img in row)
    cell_h = max(img.height for row in rows for img in row)
    cols = max(len(row) for row in rows)
    label_h = LABEL_HEIGHT if labels is not None else 0
    grid = Image.new(
        "RGB", (cols * cell_w + (cols + 1) * pad, len(rows) * (cell_h + label_h) + (len(rows) + 1) * pad), background
    )
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(rows):
        top = pad + r * (cell_h + label_h + pad)
        if labels is not None:
            _caption(draw, (pad, top), labels[r])
        for c, img in enumerate(row):
            grid.paste(img.convert("RGB"), (pad + c * (cell_w + pad), top + label_h))
    return grid


def _labelled(img: Image.Image, text: str, background: str = "white") -> Image.Image:
    out = Image.new("RGB", (img.width, img.height + LABEL_HEIGHT), background)
    _caption(ImageDraw.Draw(out), (0, 0), text)
    out.paste(img.convert("RGB"), (0, LABEL_HEIGHT))
    return out


def ssim_heatmap(a, b, full_scale: float | None = None) -> Image.Image:
    """The SSIM map of `a` vs `b` as an RGB image of the same size; bright where the images differ.

    Colours span 1 - SSIM from 0 to `full_scale`; by default to this map's own maximum, so that the small
    differences of a good 8-bit image stay visible instead of a uniformly dark square.
    """
    from matplotlib import colormaps

    dissimilarity = _dissimilarity(a, b)
    top = full_scale or max(float(dissimilarity.max()), 1e-6)
    rgba = colormaps[HEATMAP_CMAP](np.clip(dissimilarity / top, 0.0, 1.0), bytes=True)
    return Image.fromarray(rgba[..., :3], "RGB")


def _dissimilarity(a, b) -> np.ndarray:
    return 1.0 - np.clip(metrics.ssim_map(a, b), 0.0, 1.0)


def side_by_side(images: dict[str, Image.Image], reference_label: str) -> Image.Image:
    """One row: the reference, then each other image followed by its SSIM heat map against the reference."""
    if reference_label not in images:
        raise UserError(f"reference {reference_label!r} is not among the images: {', '.join(images)}")
    reference = images[reference_label]
    cells = [_labelled(reference, f"{reference_label} (reference)")]
    for label, img in images.items():
        if label == reference_label:
            continue
        value = metrics.ssim(reference, img)
        cells.append(_labelled(img, f"{label}  SSIM {value:.4f}"))
        peak = max(float(_dissimilarity(reference, img).max()), 1e-6)
        cells.append(_labelled(ssim_heatmap(reference, img, peak), f"1-SSIM, brightest {peak:.2g}"))
    return image_grid([cells])


def latency_table(rows: list[dict]) -> str:
    """A markdown table: columns are the union of the rows' keys in first-seen order, floats to 2 decimals."""
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    if not columns:
        return ""
    return markdown_table(columns, [[row.get(c) for c in columns] for row in rows]) + "\n"


def plot_history(
    series: dict[str, list[tuple[str, float]]], path: str | os.PathLike, ylabel: str = "ms", title: str | None = None
) -> Path:
    """Write `history_figure` as a PNG."""
    fig = history_figure(series, ylabel, title)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path


def history_figure(series: dict[str, list[tuple[str, float]]], ylabel: str = "ms", title: str | None = None):
    """Each series' value over runs (x: run labels in first-seen order), one small plot per
    series with its own y axis: a 30 ms step and a 1200 ms pipeline each fill their plot, and each plot is
    titled with its series, so no legend covers the data."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series = {name: points for name, points in series.items() if points}
    if not series:
        raise UserError("plot_history needs at least one (run label, value) point")
    runs: list[str] = []
    for points in series.values():
        runs.extend(run for run, _ in points if run not in runs)
    position = {run: i for i, run in enumerate(runs)}

    columns = min(3, len(series))
    rows = -(-len(series) // columns)
    width = max(4.0, 0.45 * len(runs) + 1.5)
    fig = Figure(figsize=(width * columns, 2.8 * rows + (0.5 if title else 0)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, columns, squeeze=False)
    crowded = len(runs) > 6
    for ax, (name, points) in zip(axes.flat, series.items(), strict=False):
        ax.plot([position[run] for run, _ in points], [value for _, value in points], marker="o")
        ax.set_title(name, fontsize=9)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_ylim(bottom=0, top=max(value for _, value in points) * 1.15)  # from zero: changes keep their size
        ax.grid(True, alpha=0.3)
        ax.set_xlim(-0.5, len(runs) - 0.5)
        ax.set_xticks(range(len(runs)), runs, rotation=45 if crowded else 0, ha="right" if crowded else "center")
    for ax in axes.flat[len(series) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    return fig
