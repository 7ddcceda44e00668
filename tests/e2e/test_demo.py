"""The demo (`python -m sdxl_core.commands.demo`) on the built-in tiny model: files, table rows, one-line errors."""

from __future__ import annotations

import pytest
from PIL import Image

from sdxl_core.commands import demo
from sdxl_core.variants import TINY_MAX_STEPS

ROWS = list(demo.VARIANT_NAMES)
STAGES = ("clip ms", "clip2 ms", "unet ms/step", "vae ms", "total ms")


@pytest.mark.slow
def test_demo_writes_images_grid_and_table(tmp_path, engine_dir, capsys):
    # tiny's defaults are every command's (variants.builtin_defaults), the suite's too: the INT8 engine has the
    # key of the one the quality tests build, so a session that runs both calibrates once (a shared engine dir).
    out = tmp_path / "demo-out"
    assert (
        demo.main(
            [
                "--model",
                "tiny",
                "--output-dir",
                str(out),
                "--engine-dir",
                engine_dir,
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out

    names = [f"{n}.png" for n in ROWS] + ["side_by_side.png", "latency.md", "demo.json"]
    for name in names:
        assert (out / name).is_file(), f"{name} missing from {sorted(p.name for p in out.iterdir())}"
        assert str(out / name) in printed
    for name in ROWS:
        assert Image.open(out / f"{name}.png").size == (128, 128)
    assert Image.open(out / "side_by_side.png").width > 3 * 128  # FP16, INT8, heat map

    table = (out / "latency.md").read_text()
    lines = [line for line in table.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert all(stage in header for stage in STAGES), header
    rows = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True)) for line in lines[2:]]
    assert [r["variant"] for r in rows] == ROWS
    for row in rows:
        assert row["steps"] == str(TINY_MAX_STEPS)
        assert all(float(row[stage]) > 0 for stage in STAGES), row
    assert 0.0 <= float(rows[1]["SSIM vs fp16"]) <= 1.0
    assert lines[0] in printed  # the table is printed too


def test_demo_bad_flag_is_one_line(capsys):
    assert demo.main(["--denoising-steps", "0", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --denoising-steps must be between 1 and 1000") and "\n" not in err
