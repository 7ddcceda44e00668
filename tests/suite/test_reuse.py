"""A reused engine on a GPU: a fresh `sdxl-bench txt2img --no-build` loads the engine's precompiled regions and
Dynamo traces nothing; its start-up (process start to first image) is recorded beside the latency benchmarks.

The engine comes from the suite's own fixture (built once per session, or found in --engine-dir); the child
process is the user's command, so what it reports is what a user waits for.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRECISION_FLAGS = {"fp16": [], "int8": ["--int8"], "fp8": ["--fp8"]}


def reuse_command(variant, engine_dir: str, out: Path) -> list[str]:
    """The txt2img command that loads `variant`'s engine (the suite's fused-QKV and calibration choices)."""
    command = [sys.executable, "-m", "sdxl_core.commands.cli", "txt2img", "a reused engine"]
    command += ["--model", variant.model, *PRECISION_FLAGS[variant.precision]]
    command += ["--fused-qkv"] if variant.fused_qkv else []
    command += ["--calibration-size", str(variant.calibration_size)] if variant.is_quantized else []
    command += ["--engine-dir", engine_dir, "--output-dir", str(out), "--no-build", "--no-progress"]
    # The variant's own step count: an 8-bit engine's key holds the steps it was calibrated at.
    return command + ["--denoising-steps", str(variant.steps), "--num-warmup-runs", "0"]


@pytest.mark.gpu
@pytest.mark.bench
@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.needs_variants(n)) for n in ("xl-1.0-fp16", "xl-1.0-int8", "xl-1.0-fp8")]
)
def test_a_reused_engine_traces_nothing(build_engine, engine_dir, name, tmp_path, record_property):
    built = build_engine(name)
    out = tmp_path / "out"
    done = subprocess.run(
        reuse_command(built.variant, engine_dir, out), cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    print(done.stdout[-3000:])  # the child's start-up table, shown with the test's report
    (report_path,) = out.glob("*.json")
    report = json.loads(report_path.read_text())
    engine = report["engine"]
    record_property("startup_s", report["startup_s"])
    assert engine["mode"] == "loaded" and engine["engine_key"] == built.info.engine_key, engine["engine_key"]
    assert engine["compiled_regions"] == "loaded", engine["compiled_regions"]
    assert engine["dynamo_frames"] == 0, f"Dynamo traced {engine['dynamo_frames']} frames on reuse"
