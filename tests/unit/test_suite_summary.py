"""The suite's closing summary of the engines it prepared: per variant, where a build's time went."""

import os
import subprocess
import sys
from pathlib import Path

from sdxl_core.suite.summary import engine_lines

ROOT = Path(__file__).resolve().parents[2]


def test_each_built_engine_shows_its_phases_largest_first():
    records = [
        {"variant": "xl-1.0-fp16", "mode": "loaded", "worker": "gw1", "seconds": 18.8, "phases": {"engine_load": 12.0}},
        {
            "variant": "xl-1.0-int8",
            "mode": "built",
            "worker": "this process",
            "seconds": 264.7,
            "phases": {"calibration": 40.2, "gemm_dispatch": 95.1, "compile": 61.0, "convert": 0.2},
            "calibration": "shared",
            "nvcc_s": 83.4,
        },
    ]
    lines = engine_lines(records)
    assert lines[0].startswith("xl-1.0-fp16") and "loaded" in lines[0] and "18.8 s" in lines[0]
    assert lines[1].split() == ["phases:", "engine_load", "12.0", "s"]
    assert lines[2].startswith("xl-1.0-int8") and "built" in lines[2]
    # largest first; phases under half a second are left out
    assert lines[3].split("phases: ")[1] == "gemm_dispatch 95.1 s, compile 61.0 s, calibration 40.2 s"
    assert lines[4].split() == "calibration: replayed the calibration passes another 8-bit format recorded".split()
    assert lines[5].split() == "the CUTLASS libraries (nvcc, or the kernel cache) took 83.4 s beside them".split()
    assert lines[-1] == "building took 264.7 s of this run"


CONFTEST = """
import pytest
from sdxl_core.suite import summary

@pytest.fixture
def engine(pytestconfig):
    record = {"variant": "xl-1.0-int8", "mode": "built", "worker": "this process", "seconds": 9.5,
              "phases": {"calibration": 7.0}}
    summary.show_engine(pytestconfig, record)
"""
TESTS = """
def test_a(engine):
    print("captured")

def test_b():
    assert False
"""


def test_an_engine_shows_the_moment_it_is_ready(tmp_path):
    """Past the capture, while the session runs: a run stopped at its time limit still shows each engine."""
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_it.py").write_text(TESTS)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PYTEST_XDIST_WORKER", None)
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", "test_it.py"]
    lines = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True).stdout.splitlines()
    shown = [i for i, line in enumerate(lines) if line.startswith("[engine] xl-1.0-int8") and "9.5 s" in line]
    assert shown, lines
    assert lines[shown[0] + 1].split("phases: ")[1] == "calibration 7.0 s"
    failures = next(i for i, line in enumerate(lines) if "FAILURES" in line)
    assert shown[0] < failures  # printed when it happened, not with the summary
    assert "captured" not in lines[shown[0] - 1 : shown[0] + 2]


def test_records_without_phases_still_print():
    lines = engine_lines([{"variant": "xl-turbo", "mode": "loaded", "worker": "gw0", "seconds": 3.0}])
    assert lines == [f"{'xl-turbo':<18} {'loaded':<10} on {'gw0':<13} 3.0 s"]
