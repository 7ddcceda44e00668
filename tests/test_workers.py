"""pytest-xdist workers, checked on the CPU."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_pytest(*args, cwd) -> subprocess.CompletedProcess:
    """pytest in a child, free of this run's xdist state."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    # Without hypothesis's plugin a worker starts in a second instead of six on a busy 2-core machine.
    quick = ("-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-p", "no:anyio")
    return subprocess.run([sys.executable, "-m", "pytest", *quick, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


GROUPED = textwrap.dedent("""
    import pytest


    @pytest.mark.xdist_group("engine")
    @pytest.mark.parametrize("i", range(6))
    def test_grouped(i):
        pass


    @pytest.mark.parametrize("i", range(4))
    def test_free(i):
        pass
""")


def test_a_loadgroup_group_runs_on_one_worker(tmp_path):
    (tmp_path / "test_grouped.py").write_text(GROUPED)
    done = run_pytest("-p", "sdxl_core.pytest_plugin", "test_grouped.py", "-n", "2", "--dist", "loadgroup", "-v",
                      cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    ran_on = {line.split()[0] for line in done.stdout.splitlines() if "PASSED" in line and "test_grouped[" in line}
    assert len(ran_on) == 1 and done.stdout.count("@engine") >= 6, done.stdout
