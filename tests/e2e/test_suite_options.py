"""The suite's own options, checked when pytest configures (before any test is collected or any engine built):
each bad value is one usage error that names the option, exit status 4, in seconds, never a failure inside a
test or a crash at the end of the session."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BOUND_S = 120  # pytest and the plugin's imports on a busy 2-core machine

BAD = {
    # options: what the one usage-error line says
    "--variants=bogus": "--variants: unknown variant 'bogus'",
    "--variants=xl-1.0-int9": "did you mean xl-1.0-int8?",
    "--min-int8-speedup=-1": "--min-int8-speedup must be a finite ratio above 0",
    "--min-fp8-speedup=nan": "--min-fp8-speedup must be a finite ratio above 0",
    "--gpus=0": "--gpus must be at least 1",
    "--calibration-size=0": "--calibration-size must be between 1 and",
    "--backend=foo": "--backend 'foo' is not a backend: choose one of torch, tensorrt",
    "--engine-dir=/etc/passwd": "--engine-dir /etc/passwd: /etc/passwd is not a directory",
    "--onnx-dir=/etc/passwd/onnx": "--onnx-dir /etc/passwd/onnx: /etc/passwd is not a directory",
    "--model=bogus": "--model: unknown model 'bogus'",
    "--quality-report=/etc/passwd/x.md": "--quality-report /etc/passwd/x.md: /etc/passwd is not a directory",
}


def pytest_run(*options: str) -> subprocess.CompletedProcess:
    """Collect one small test module with these options, as a user starts the suite."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", "--collect-only", "-q"]
        + [*options, "tests/unit/test_variants.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=BOUND_S,
        env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"},
    )


@pytest.mark.parametrize("option", BAD)
def test_a_bad_option_is_one_usage_error_before_any_test(option):
    done = pytest_run(option)
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 4, done.stdout[-2000:] + done.stderr[-2000:]
    assert len(errors) == 1 and errors[0].startswith("ERROR: "), done.stderr[-2000:]
    assert BAD[option] in errors[0]
    assert "collected" not in done.stdout  # refused before collection


def test_good_options_collect():
    done = pytest_run("--variants=xl-1.0-fp16,xl-1.0-int8", "--model=tiny", "--backend=torch", "--min-fp8-speedup=1.1")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
