"""A reused engine on a GPU: built with SDXL_BENCH_PRECOMPILE=1, a fresh `sdxl-bench txt2img --no-build` loads the
engine's precompiled regions and Dynamo traces nothing; its start-up (process start to first image) is printed.

The variant is the suite's own (its fused-QKV and calibration choices); the engine is built by the user's command
into a directory of the test's own, since the suite's engines are built without precompiled regions (opt-in), and
the calibration is reused from the suite's --onnx-dir. Both children are the user's command, so what they report
is what a user waits for. Marked `reuse`, not `bench`: each variant costs a build of its own, which `nox -s gpu_bench`
(the answer after an upgrade) does not wait for; `nox -s gpu_reuse` runs it.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRECISION_FLAGS = {"fp16": [], "int8": ["--int8"], "fp8": ["--fp8"]}


def txt2img(variant, engine_dir: Path, onnx_dir: str, out: Path) -> list[str]:
    """The txt2img command that builds or loads `variant`'s engine."""
    command = [sys.executable, "-m", "sdxl_core.commands.cli", "txt2img", "a reused engine"]
    command += ["--model", variant.model, "--version", variant.version, *PRECISION_FLAGS[variant.precision]]
    command += ["--fused-qkv"] if variant.fused_qkv else []
    command += ["--calibration-size", str(variant.calibration_size)] if variant.is_quantized else []
    command += ["--engine-dir", str(engine_dir), "--onnx-dir", onnx_dir, "--output-dir", str(out), "--no-progress"]
    # The variant's own step count: an 8-bit engine's key holds the steps it was calibrated at.
    return command + ["--denoising-steps", str(variant.steps), "--num-warmup-runs", "0"]


def run_child(command: list[str]) -> dict:
    """Run one child; its report's engine record and start-up, with its start-up table printed."""
    env = {**os.environ, "SDXL_BENCH_PRECOMPILE": "1"}
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    print(done.stdout[-3000:])  # the child's start-up table, shown with the test's report
    out = Path(command[command.index("--output-dir") + 1])
    (report_path,) = out.glob("*.json")
    return json.loads(report_path.read_text())


@pytest.mark.gpu
@pytest.mark.reuse
@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.needs_variants(n))
        for n in ("xl-1.0-fp16", "xl-1.0-int8", "xl-1.0-fp8", "xl-turbo")
    ],
)
def test_a_reused_engine_with_precompiled_regions_traces_nothing(suite_variant, onnx_dir, name, tmp_path):
    variant = suite_variant(name)
    built = run_child(txt2img(variant, tmp_path / "engines", onnx_dir, tmp_path / "build"))
    assert built["engine"]["mode"] == "built"
    assert built["engine"]["compiled_regions"].startswith("saved: "), built["engine"]["compiled_regions"]
    reused = run_child(txt2img(variant, tmp_path / "engines", onnx_dir, tmp_path / "reuse") + ["--no-build"])
    engine = reused["engine"]
    assert engine["mode"] == "loaded" and engine["engine_key"] == built["engine"]["engine_key"]
    assert engine["compiled_regions"] == "loaded", engine["compiled_regions"]
    assert engine["dynamo_frames"] == 0, f"Dynamo traced {engine['dynamo_frames']} frames on reuse"
