"""Benchmark history: real pytest-benchmark runs (autosaved in a subprocess) -> markdown table and PNG plot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from PIL import Image

from sdxl_core.errors import UserError
from sdxl_core.reports.history import history_report, load_runs

BENCH_FILE = textwrap.dedent("""
    def test_sum(benchmark):
        benchmark(sum, range(100))


    def test_sorted(benchmark):
        benchmark(sorted, list(range(100, 0, -1)))
""")
BENCHMARKS = ("test_sum", "test_sorted")


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    """Two autosaved runs of a trivial benchmark file, made by pytest-benchmark itself."""
    work = tmp_path_factory.mktemp("bench-project")
    (work / "test_trivial.py").write_text(BENCH_FILE)
    store = work / "store"
    # An xdist worker's PYTEST_XDIST_* variables would make pytest-benchmark in the child disable itself.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    for _ in range(2):
        # Outside this repo: no conftest or pyproject addopts apply; tiny budgets keep each run ~2 s.
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "test_trivial.py",
                "-q",
                "-p",
                "no:cacheprovider",
                "-p",
                "no:xdist",
                "--benchmark-autosave",
                f"--benchmark-storage={store}",
                "--benchmark-max-time=0.005",
                "--benchmark-min-rounds=3",
                "--benchmark-warmup=off",
            ],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stdout + done.stderr
    return store


def _table_rows(markdown: str) -> list[dict]:
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True)) for line in lines[2:]]


def test_history_report_table_and_plot(storage, tmp_path):
    files = sorted(storage.glob("*/*.json"))
    assert [f.name[:5] for f in files] == ["0001_", "0002_"]

    markdown_path, png_path = history_report(storage, tmp_path / "out")
    rows = _table_rows(markdown_path.read_text())
    assert [row["run"] for row in rows] == ["0001", "0002"]
    for row in rows:
        for name in BENCHMARKS:
            assert float(row[name]) > 0, row  # median in ms, 4 significant digits
    first = {b["name"]: b["stats"]["median"] for b in json.loads(files[0].read_text())["benchmarks"]}
    assert load_runs(storage)[0].medians_ms["test_sum"] == pytest.approx(first["test_sum"] * 1e3)  # s -> ms

    with Image.open(png_path) as png:
        assert png.format == "PNG" and png.width >= 300 and png.height >= 200


def test_history_of_one_machine_folder(storage, tmp_path):
    """The machine-id folder itself works as well as the storage root."""
    machine = next(storage.iterdir())
    markdown_path, _ = history_report(machine, tmp_path)
    assert len(_table_rows(markdown_path.read_text())) == 2


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda tmp: tmp / "absent", "does not exist"),
        (lambda tmp: tmp, "no pytest-benchmark runs"),
    ],
)
def test_missing_or_empty_dir_is_one_line(tmp_path, make, message):
    with pytest.raises(UserError, match=message) as info:
        history_report(make(tmp_path), tmp_path / "out")
    assert "\n" not in str(info.value) and "--benchmark-autosave" in str(info.value)


def test_a_folder_of_nothing_but_other_json_is_one_line(tmp_path, capsys):
    (tmp_path / "0001_x.json").write_text('{"benchmarks": [{"name": "a"}]}')
    with pytest.raises(UserError, match="no pytest-benchmark runs in .* \\(1 other JSON file\\(s\\) skipped\\)"):
        history_report(tmp_path, tmp_path / "out")
    err = capsys.readouterr().err
    assert err.startswith("note: skipped ") and "0001_x.json is not a pytest-benchmark run" in err


def test_history_skips_another_tools_json_with_a_note(storage, tmp_path):
    import shutil

    folder = tmp_path / "runs"
    shutil.copytree(storage, folder)
    (next(folder.iterdir()) / "coverage.json").write_text('{"meta": {"version": "7"}, "files": {}}')
    done = sdxl_bench("history", str(folder), "--output-dir", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    assert "note: skipped " in done.stderr and "coverage.json is not a pytest-benchmark run" in done.stderr
    assert [row["run"] for row in _table_rows((tmp_path / "out" / "history.md").read_text())] == ["0001", "0002"]


def test_history_plots_each_benchmark_on_its_own_scale_with_no_legend_over_it():
    from sdxl_core.reports.images import history_figure

    runs = ["0001", "0002", "0003"]
    series = {
        "pipeline": [(r, 1200.0 + i) for i, r in enumerate(runs)],
        "step": [(r, 30.0 + i) for i, r in enumerate(runs)],
    }
    axes = [ax for ax in history_figure(series).axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["pipeline", "step"]
    for ax, points in zip(axes, series.values(), strict=True):
        top = max(v for _, v in points)
        assert ax.get_legend() is None and top < ax.get_ylim()[1] <= 1.2 * top  # the line fills its own plot


def test_report_renders_a_saved_benchmark_run(storage):
    """`sdxl-bench report` on a pytest-benchmark JSON: one row per benchmark with its median in ms."""
    from sdxl_core.reports.run_report import markdown_summary

    run = sorted(storage.glob("*/*.json"))[0]
    data = json.loads(run.read_text())
    markdown = markdown_summary([run])
    assert markdown.startswith(f"### {run.name}")
    rows = {row["benchmark"]: row for row in _table_rows(markdown)}
    assert set(rows) == set(BENCHMARKS)
    for bench in data["benchmarks"]:
        row = rows[bench["name"]]
        assert float(row["median ms"]) == pytest.approx(bench["stats"]["median"] * 1e3, rel=1e-2, abs=0.01)
        assert int(row["rounds"]) == bench["stats"]["rounds"]


def sdxl_bench(*args, stdout=subprocess.PIPE):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "sdxl_core.commands.cli", *args],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=600,
        env=env,
    )


def test_report_renders_what_build_report_writes(tmp_path):
    built = sdxl_bench(
        "build", "--model", "tiny", "--variants", "xl-1.0-fp16", "--engine-dir", str(tmp_path / "e"),
        "--report", str(tmp_path / "build.json"),
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    done = sdxl_bench("report", str(tmp_path / "build.json"))
    assert done.returncode == 0, done.stderr
    rows = _table_rows(done.stdout)
    assert [(r["variant"], r["engine"]) for r in rows] == [("xl-1.0-fp16", "built")]
    assert rows[0]["path"].startswith(str(tmp_path / "e"))


@pytest.mark.parametrize(
    "make, line",
    [
        (lambda tmp: tmp / "absent.json", "absent.json: no such file"),
        (lambda tmp: tmp, "is a directory: give report files"),
        (lambda tmp: _write(tmp / "a.png", b"\x89PNG\r\n\x1a\n" + bytes(64)), "a.png is a PNG image, not a report"),
        (lambda tmp: _write(tmp / "notes.json", b'{"hello": 1}'), "notes.json is not a txt2img report, nor any"),
    ],
    ids=["missing", "directory", "png", "other-json"],
)
def test_report_says_what_a_path_is_in_one_line(tmp_path, make, line):
    done = sdxl_bench("report", str(make(tmp_path)))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and line in done.stderr and "Error" not in done.stderr


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_report_into_a_pipe_closed_early_says_nothing(storage):
    runs = sorted(storage.glob("*/*.json")) * 400  # far more than a pipe holds, so the writer meets the closed end
    reader = subprocess.Popen(["head", "-n", "1"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    done = sdxl_bench("report", *map(str, runs), stdout=reader.stdin)
    reader.stdin.close()
    reader.wait()
    assert done.returncode in (0, 141) and done.stderr == ""
