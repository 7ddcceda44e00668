"""Every SDXL_BENCH_* variable is read in settings.py, checked there, and documented in the README's table."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sdxl_core import settings
from sdxl_core.errors import UserError
from sdxl_core.reports.tables import markdown_table

ROOT = Path(__file__).resolve().parents[2]
NAME = re.compile(r"SDXL_BENCH_([A-Z0-9_]+[A-Z0-9])")


def test_every_variable_named_anywhere_is_a_setting_and_in_the_readme_table():
    sources = [*ROOT.joinpath("sdxl_core").rglob("*.py"), *ROOT.joinpath("tests").rglob("*.py"), ROOT / "noxfile.py"]
    named = {m for path in sources for m in NAME.findall(path.read_text())}
    assert named - set(settings.SETTINGS) == set()
    rows = [(f"`{settings.PREFIX}{n}`", values, what) for n, (values, what) in settings.SETTINGS.items()]
    table = markdown_table(("variable", "values", "what it does"), rows)
    assert table in (ROOT / "README.md").read_text(), "README's settings table differs from settings.SETTINGS"


def test_only_settings_reads_the_package_variables():
    readers = [
        str(path.relative_to(ROOT))
        for path in ROOT.joinpath("sdxl_core").rglob("*.py")
        if path.name != "settings.py" and re.search(r"environ(\.get)?[\[(]\s*[\"']SDXL_BENCH_", path.read_text())
    ]
    assert readers == []


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("CROSS_KV", "always", "SDXL_BENCH_CROSS_KV='always': choose one of per-step, reuse"),
        ("GEMM_DISPATCH", "no", "SDXL_BENCH_GEMM_DISPATCH='no': choose one of on, off"),
        ("AUTOTUNE", "fast", "SDXL_BENCH_AUTOTUNE='fast': choose one of full, quick"),
        ("TRITON_ON_CPU", "yes", "SDXL_BENCH_TRITON_ON_CPU='yes': choose one of 0, 1"),
        ("MODELOPT_CUDA_EXT", "true", "SDXL_BENCH_MODELOPT_CUDA_EXT='true': choose one of 0, 1"),
        ("TRUST_ENGINE_DIR", "yes", "SDXL_BENCH_TRUST_ENGINE_DIR must be 1"),
        ("ENGINE_KEY", "short", "SDXL_BENCH_ENGINE_KEY is 5 characters"),
        ("KERNELS", "cutlass;rm -rf", "SDXL_BENCH_KERNELS: 'cutlass;rm -rf' is not a kernel name"),
    ],
)
def test_a_bad_value_is_one_line(monkeypatch, name, value, message):
    monkeypatch.setenv(settings.PREFIX + name, value)
    with pytest.raises(UserError) as refused:
        settings.check()
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)


def test_defaults_and_good_values(monkeypatch, tmp_path):
    for name in settings.SETTINGS:
        monkeypatch.delenv(settings.PREFIX + name, raising=False)
    settings.check()
    assert (settings.cross_kv(), settings.gemm_dispatch(), settings.kernels()) == ("per-step", True, [])
    monkeypatch.setenv("SDXL_BENCH_KERNELS", " cutlass, scaled_mm ")
    monkeypatch.setenv("SDXL_BENCH_MODEL_CACHE", "OFF")
    monkeypatch.setenv("SDXL_BENCH_KERNEL_CACHE", str(tmp_path))
    assert settings.kernels() == ["cutlass", "scaled_mm"] and settings.model_cache() is None
    assert settings.kernel_cache() == tmp_path


def test_importing_settings_imports_no_torch():
    code = "import sys, sdxl_core.settings; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_the_cli_refuses_a_bad_setting_before_any_model_loads(tmp_path):
    env = {**os.environ, "SDXL_BENCH_GEMM_DISPATCH": "maybe", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "sdxl_core.commands.cli", "txt2img", "x", "--model", "tiny"]
        + ["--output-dir", str(tmp_path), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines()[-1] == "error: SDXL_BENCH_GEMM_DISPATCH='maybe': choose one of on, off"
    assert not any(tmp_path.iterdir())
