"""A run that reuses an engine imports no build machinery: no ModelOpt, no ONNX (seconds of imports each).

`sdxl-bench build` makes FP16, INT8 and FP8 `tiny` engines in one child process; `sdxl-bench txt2img --no-build`
then loads each in a fresh child. Each child writes the names in its own `sys.modules` as it exits, so what is
checked is what the process imported, however it got there. Packages count by their top-level name: the
ModelOpt distribution (`modelopt`, `modelopt_recipes`) and `onnx`/`onnxruntime`. `torch.onnx` (imported by torch
itself) and `diffusers.quantizers.modelopt` (diffusers' own config class, imported by diffusers.models; it imports
no ModelOpt) are not those packages.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILD_ONLY = ("modelopt", "modelopt_recipes", "onnx", "onnxruntime")
VARIANTS = {"fp16": [], "int8": ["--int8"], "fp8": ["--fp8"]}
# The CLI's own entry point, with its exit status, after which the child records its modules.
CHILD = """
import json, sys
from sdxl_core.commands import cli
try:
    status = cli.main(sys.argv[2:])
finally:
    with open(sys.argv[1], "w") as f:
        json.dump(sorted(sys.modules), f)
sys.exit(status)
"""


def sdxl_bench(record: Path, *args: str) -> list[str]:
    """`sdxl-bench ARGS` in a fresh process; the modules it had imported when it exited."""
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(record), *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(record.read_text())


def build_only(modules: list[str]) -> list[str]:
    return [name for name in modules if name.split(".")[0] in BUILD_ONLY]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The three tiny engines in one engine dir, and the modules the build imported."""
    root = tmp_path_factory.mktemp("reuse-imports")
    variants = "xl-1.0-fp16,xl-1.0-int8,xl-1.0-fp8"
    engine_dir = root / "engines"
    modules = sdxl_bench(
        root / "build.json", "build", "--variants", variants, "--model", "tiny", "--engine-dir", str(engine_dir)
    )
    return engine_dir, modules


def test_the_build_imports_modelopt(built):
    """What the reuse must not import, the build does: the check below sees these packages when they load."""
    _, modules = built
    assert {"modelopt", "modelopt.torch.quantization"} <= set(modules), build_only(modules)


@pytest.mark.parametrize("precision", VARIANTS)
def test_a_reused_engine_imports_no_modelopt_and_no_onnx(built, precision, tmp_path):
    engine_dir, _ = built
    out = tmp_path / "out"
    modules = sdxl_bench(
        tmp_path / "modules.json",
        "txt2img",
        "x",
        "--model",
        "tiny",
        *VARIANTS[precision],
        "--engine-dir",
        str(engine_dir),
        "--output-dir",
        str(out),
        "--no-build",
        "--num-warmup-runs",
        "0",
        "--no-progress",
    )
    (report_path,) = out.glob("*.json")
    report = json.loads(report_path.read_text())
    engine = report["engine"]
    assert engine["mode"] == "loaded" and engine["engine_key"].startswith(f"unetxl-{precision}."), engine
    found = build_only(modules)
    assert found == [], f"the reuse imported {', '.join(found[:8])}"
    assert "sdxl_core.quant.quantize" not in modules
