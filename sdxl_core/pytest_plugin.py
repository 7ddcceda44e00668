"""The suite's pytest options, as a plugin that pytest loads before it looks at the paths it is given.

A conftest.py loads only for the directories pytest collects. Given an existing directory outside the checkout
as an option's value (`pytest -m bench --engine-dir /abs/dir`), pytest first takes that directory for a test
path, roots itself there, and never loads the checkout's conftest.py: every option of the suite is then
"unrecognized". So the options live here, loaded by `-p sdxl_core.pytest_plugin` in pyproject.toml's addopts
(which pytest reads when it finds the checkout's pyproject.toml, as it does with `--engine-dir=/abs/dir`) and,
where the package is installed, by its `pytest11` entry point (which pytest loads whatever paths it is given).
This module imports nothing heavy: it loads in a fresh clone too, and says what to install.
"""

from __future__ import annotations

import importlib.util

import pytest

INSTALL = "pip install -e '.[dev]'"
MARKERS = {
    "gpu": "needs a CUDA GPU",
    "hopper": "needs a Hopper GPU (compute capability 9.0: H100, H200) for its speed gates",
    "h100": "alias of hopper",
    "tensorrt": "needs the TensorRT Python package with its builder libraries",
    "quality": "compares images against stored FP16 baselines (SSIM, PSNR, CLIP score)",
    "bench": "latency benchmarks (pytest-benchmark); meaningful on a GPU",
    "slow": "takes more than a few seconds on CPU",
    "needs_variants": "needs_variants(*names): builds these engines; deselected when --variants leaves one out",
}


def pytest_addoption(parser):
    group = parser.getgroup("sdxl-bench")
    group.addoption("--model", default=None, help="model for engine fixtures (default: tiny on CPU, "
                    "sdxl-random on GPU)")
    group.addoption("--backend", default="torch", help="torch or tensorrt")
    group.addoption("--engine-dir", default=None, help="engine dir shared by the session (default: a temp dir)")
    group.addoption("--onnx-dir", default=None, help="ONNX/calibration dir (default: a temp dir)")
    group.addoption("--variants", default=None, help="comma-separated variant names for engine fixtures")
    group.addoption("--update-baselines", action="store_true", help="regenerate stored FP16 baselines")
    group.addoption("--baseline-dir", default="baselines", help="root of the stored baselines")
    group.addoption("--calibration-size", type=int, default=None,
                    help="calibration prompts for 8-bit engines (default: the variant's, 32; timing does not depend "
                         "on it, quality does)")
    group.addoption("--fused-qkv", choices=("on", "off"), default="on",
                    help="torch-backend engines with fused attention projections (one Q/K/V GEMM; both FP16 and "
                         "8-bit, so the gate stays like for like)")
    group.addoption("--min-int8-speedup", type=float, default=1.15, help="INT8 gate: median FP16 / median INT8")
    group.addoption("--min-fp8-speedup", type=float, default=1.3, help="FP8 gate: median FP16 / median FP8")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """The suite's markers; and without PyTorch, where every test module would fail to import and the hardware
    probe end in an INTERNALERROR, one line that says what to install."""
    for name, meaning in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {meaning}")
    if config.option.help or config.option.version:
        return
    if importlib.util.find_spec("torch") is None:
        raise pytest.UsageError(f"the sdxl-bench suite needs the project installed in this Python "
                                f"(No module named 'torch'): {INSTALL}")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """In a `loadgroup` worker, name each grouped test's group in its node id where xdist could not: xdist
    (3.8) writes the `@group` suffix into `item._nodeid`, which pytest 9.2's structured node ids no longer read,
    so every group silently spread over all workers (pytest-xdist#1386). Runs after xdist's own hook and
    leaves ids that already carry the suffix alone."""
    if not (hasattr(config, "workerinput") and config.getvalue("loadgroup")):
        return
    for item in items:
        groups = {str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                  for m in item.iter_markers("xdist_group")}
        suffix = "@" + "_".join(sorted(groups))
        if groups and not item.nodeid.endswith(suffix) and hasattr(item, "_id"):
            from _pytest.nodeid import NodeId

            item._id = NodeId.parse(item.nodeid + suffix)
