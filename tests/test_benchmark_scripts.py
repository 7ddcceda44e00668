"""The H100 scripts' Python parts run end to end on `tiny` on the CPU, so a GPU call is never spent on a typo."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT_ENV = {**{k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")},
              "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def run_script(*args):
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=SCRIPT_ENV)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


@pytest.mark.slow
def test_profile_step_groups_every_op_and_sees_the_8bit_gemm(tmp_path):
    out = tmp_path / "profile.json"
    done = run_script("benchmarks/profile_step.py", "--model", "tiny", "--precisions", "fp16,int8",
                      "--engine-dir", str(tmp_path / "E"), "--onnx-dir", str(tmp_path / "X"), "--steps", "2",
                      "--out", str(out))
    report = json.loads(out.read_text())
    fp16, int8 = report["engines"]["fp16"], report["engines"]["int8"]
    for engine in (fp16, int8):
        assert engine["total_ms"] > 0
        assert sum(engine["ms_by_group"].values()) == pytest.approx(engine["total_ms"])
    assert fp16["ms_by_group"].get("gemm", 0) > 0 and "8-bit gemm" not in fp16["ms_by_group"]
    assert int8["ms_by_group"]["8-bit gemm"] > 0
    assert "8-bit gemm" in done.stdout and "top kernels" in done.stdout


def test_dispatch_table_renders_tflops(tmp_path):
    rows = [{"fmt": "int8", "M": 2048, "K": 1280, "N": 10240, "layers": 60, "ms_8bit": 0.0648, "ms_16bit": 0.0814,
             "speedup_8bit": 1.256, "path": "8bit", "int8_kernel": "tma", "ms_pointer": 0.0712, "ms_tma": 0.0648,
             "tma_error": None},
            {"fmt": "int8", "M": 154, "K": 2048, "N": 640, "layers": 20, "ms_8bit": 0.0074, "ms_16bit": 0.0053,
             "speedup_8bit": 0.716, "path": "16bit", "int8_kernel": "pointer", "ms_pointer": 0.0074, "ms_tma": None,
             "tma_error": "CompilationError: x"}]
    (tmp_path / "gemm_dispatch.json").write_text(json.dumps(rows))
    done = subprocess.run([sys.executable, "benchmarks/dispatch_table.py", str(tmp_path / "gemm_dispatch.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    row = [line for line in done.stdout.splitlines() if line.startswith("| int8")][0]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "2048 x 1280 -> 10240" and cells[3] == "64.8" and cells[-2] == "8bit"
    assert cells[-1] == "tma (71.2 / 64.8)"
    assert "| 16bit | pointer (7.4 / failed) |" in done.stdout
    assert float(cells[4]) == pytest.approx(2 * 2048 * 1280 * 10240 / 64.8e-6 / 1e12, abs=1)  # TFLOP/s


@pytest.mark.slow
def test_unet_engines_builds_tunes_and_reloads(tmp_path):
    engines = ["--model", "tiny", "--precisions", "fp16,int8", "--calibration-size", "2", "--engine-dir",
               str(tmp_path / "E"), "--rounds", "1", "--iters", "1"]
    run_script("benchmarks/unet_engines.py", *engines, "--onnx-dir", str(tmp_path / "X"),
               "--fp16-tunings", "cl,qkv,cl+qkv", "--out", str(tmp_path / "build.json"))
    build = json.loads((tmp_path / "build.json").read_text())["engines"]
    assert list(build) == ["fp16", "int8", "fp16-cl", "fp16-qkv", "fp16-cl+qkv"]
    assert (build["fp16-cl+qkv"]["channels_last"], build["fp16-cl+qkv"]["fuse_qkv"]) == (True, True)
    for name in ("fp16-cl", "fp16-qkv", "fp16-cl+qkv"):
        assert build[name]["mode"] == "in-memory" and build[name]["rel_err_vs_fp16"] < 1e-5
    assert 0 < build["int8"]["rel_err_vs_fp16"] < 0.1  # quantization noise, not a broken engine
    best = min(row["ms_per_step"] for name, row in build.items() if name.startswith("fp16"))
    assert build["int8"]["speedup_vs_best_fp16"] == round(best / build["int8"]["ms_per_step"], 3)

    run_script("benchmarks/unet_engines.py", *engines, "--reload", "--channels-last",
               "--out", str(tmp_path / "reload.json"))
    reload = json.loads((tmp_path / "reload.json").read_text())["engines"]
    assert [(row["mode"], row["channels_last"]) for row in reload.values()] == [("loaded", True)] * 2
    assert reload["int8"]["rel_err_vs_fp16"] < 0.1


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "benchmarks").glob("*.sh")))
def test_gpu_shell_scripts_parse(script):
    """A syntax error found here costs nothing; found on the H100 it costs a 10-minute call."""
    done = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_engines_table_renders_a_committed_h100_run():
    run = ROOT / "docs/perf/h100-2026-11-25-s2/call1-compiled/engines_build_compiled.json"
    done = run_script("benchmarks/engines_table.py", str(run))
    lines = done.stdout.splitlines()
    assert lines[0] == "NVIDIA H100 80GB HBM3; torch 2.11.0; `sdxl-random` 1024x1024, UNet batch 2"
    rows = {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")]
                                          for line in lines if line.startswith("| ") and "---" not in line)}
    assert rows["int8"][:7] == ["int8", "build", "38.03", "356", "0.895x", "0.895x", "0.0893"]
    assert rows["fp16"][-1] == "4897" and rows["fp8"][-1] == "2487"  # engine MiB
    assert "benchmarks/unet_engines.py" in lines[-1]
