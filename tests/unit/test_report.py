"""Grids, heat maps, latency tables and history plots."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from sdxl_core.errors import UserError
from sdxl_core.reports import images as report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def solid(width: int, height: int, color=(255, 0, 0)) -> Image.Image:
    return Image.new("RGB", (width, height), color)


def noise(width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


GRID_SIZES = st.lists(
    st.lists(st.tuples(st.integers(1, 20), st.integers(1, 20)), min_size=1, max_size=4), min_size=1, max_size=3
)


@given(GRID_SIZES, st.integers(0, 6), st.booleans())
@settings(max_examples=30, deadline=None)
def test_grid_size_arithmetic(sizes, pad, labelled):
    rows = [[solid(w, h) for w, h in row] for row in sizes]
    labels = [f"row {i}" for i in range(len(rows))] if labelled else None
    grid = report.image_grid(rows, labels, pad=pad)
    cell_w = max(w for row in sizes for w, _ in row)
    cell_h = max(h for row in sizes for _, h in row)
    cols = max(len(row) for row in sizes)
    label_h = report.LABEL_HEIGHT if labelled else 0
    assert grid.mode == "RGB"
    assert grid.size == (cols * cell_w + (cols + 1) * pad, len(rows) * (cell_h + label_h) + (len(rows) + 1) * pad)


def test_grid_places_images_in_their_cells():
    red, blue = solid(10, 8, (255, 0, 0)), solid(10, 8, (0, 0, 255))
    grid = report.image_grid([[red, blue], [blue]], labels=["fp16", "int8"], pad=4)
    top = 4 + report.LABEL_HEIGHT
    assert grid.getpixel((0, 0)) == (255, 255, 255)
    assert grid.getpixel((4, top)) == (255, 0, 0)
    assert grid.getpixel((4 + 10 + 4, top)) == (0, 0, 255)
    second_row = top + 8 + 4 + report.LABEL_HEIGHT
    assert grid.getpixel((4, second_row)) == (0, 0, 255)
    # The missing cell of the short second row stays background.
    assert grid.getpixel((4 + 10 + 4, second_row)) == (255, 255, 255)
    # The label strip has some dark text pixels in it.
    strip = np.asarray(grid.crop((4, 4, grid.width, 4 + report.LABEL_HEIGHT)))
    assert strip.min() < 128


def test_grid_rejects_bad_input():
    with pytest.raises(UserError, match="at least one row"):
        report.image_grid([])
    with pytest.raises(UserError, match="2 rows but 1 labels"):
        report.image_grid([[solid(2, 2)], [solid(2, 2)]], labels=["only one"])


def test_heatmap_has_input_size_and_highlights_differences():
    a = noise(40, 30)
    b = a.copy()
    b[:, 20:] = noise(20, 30, seed=1)  # only the right half differs
    heat = report.ssim_heatmap(a, b)
    assert heat.size == (40, 30) and heat.mode == "RGB"
    brightness = np.asarray(heat.convert("L"), dtype=float)
    assert brightness[:, 28:].mean() > brightness[:, :12].mean() + 50


def test_heatmap_of_identical_images_is_uniform():
    a = noise(16, 16)
    assert len(report.ssim_heatmap(a, a).getcolors()) == 1


def test_heatmap_rejects_mismatched_sizes():
    with pytest.raises(UserError, match="image shapes differ"):
        report.ssim_heatmap(noise(16, 16), noise(16, 17))


def test_side_by_side_layout():
    ref = Image.fromarray(noise(32, 24))
    images = {"fp16": ref, "int8": Image.fromarray(noise(32, 24, 1)), "fp8": ref.copy()}
    out = report.side_by_side(images, reference_label="fp16")
    cells, pad = 5, 4  # reference, then image + heat map for each of the two others
    assert out.size == (cells * 32 + (cells + 1) * pad, 24 + report.LABEL_HEIGHT + 2 * pad)


def test_side_by_side_needs_the_reference():
    with pytest.raises(UserError, match="reference 'fp16' is not among the images: int8"):
        report.side_by_side({"int8": solid(8, 8)}, "fp16")


def test_latency_table_columns_and_formatting():
    rows = [
        {"variant": "fp16", "unet ms": 812.3456, "steps": 30},
        {"variant": "int8 | smooth", "vae ms": 41.0, "unet ms": 401.004, "ok": True},
    ]
    lines = report.latency_table(rows).splitlines()
    assert lines[0] == "| variant | unet ms | steps | vae ms | ok |"
    assert lines[1] == "| --- | --- | --- | --- | --- |"
    assert lines[2] == "| fp16 | 812.35 | 30 | - | - |"
    assert lines[3] == "| int8 \\| smooth | 401.00 | - | 41.00 | True |"
    assert len(lines) == 4


def test_latency_table_of_nothing_is_empty():
    assert report.latency_table([]) == ""


@given(st.lists(st.dictionaries(st.sampled_from("abcdef"), st.floats(0, 1e6), max_size=4), max_size=5))
@settings(max_examples=40, deadline=None)
def test_latency_table_has_one_line_per_row_with_every_column(rows):
    table = report.latency_table(rows)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    if not columns:
        assert table == ""
        return
    lines = table.splitlines()
    assert lines[0] == "| " + " | ".join(columns) + " |"
    assert len(lines) == len(rows) + 2
    assert all(line.count("|") == len(columns) + 1 for line in lines)


def test_plot_history_writes_a_png_and_no_temp_files(tmp_path):
    target = tmp_path / "plots" / "latency.png"
    series = {"fp16": [("run-1", 810.0), ("run-2", 805.5)], "int8": [("run-2", 402.0), ("run-3", 399.1)]}
    assert report.plot_history(series, target, ylabel="UNet ms", title="UNet latency") == target
    assert target.read_bytes()[:8] == PNG_SIGNATURE
    assert [p.name for p in target.parent.iterdir()] == ["latency.png"]
    with Image.open(target) as png:
        assert png.width > 100 and png.height > 100
    # Overwriting an existing plot also goes through a temp file.
    report.plot_history({"fp16": [("run-1", 1.0)]}, target)
    assert [p.name for p in target.parent.iterdir()] == ["latency.png"]


def test_plot_history_failure_leaves_target_untouched(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    target = tmp_path / "latency.png"
    target.write_bytes(b"old")

    def broken_savefig(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(OSError, match="disk full"):
        report.plot_history({"fp16": [("run-1", 1.0)]}, target)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["latency.png"]


def test_plot_history_needs_points(tmp_path):
    with pytest.raises(UserError, match="at least one"):
        report.plot_history({"fp16": []}, tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []
