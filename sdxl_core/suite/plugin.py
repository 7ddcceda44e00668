"""The suite's pytest options, as a plugin that pytest loads before it looks at the paths it is given.

A conftest.py loads only for the directories pytest collects. Given an existing directory outside the checkout
as an option's value (`pytest -m bench --engine-dir /abs/dir`), pytest first takes that directory for a test
path, roots itself there, and never loads the checkout's conftest.py: every option of the suite is then
"unrecognized". So the options live here, loaded by `-p sdxl_core.suite.plugin` in pyproject.toml's addopts
(which pytest reads when it finds the checkout's pyproject.toml, as it does with `--engine-dir=/abs/dir`) and,
where the package is installed, by its `pytest11` entry point (which pytest loads whatever paths it is given).
This module imports nothing heavy: it loads in a fresh clone too, and says what to install.

The suite's other parts are plugins of their own, loaded with this one (`pytest_plugins` below): `gpus` (one
pytest-xdist worker per GPU), `fixtures` (one engine per variant per session) and `summary` (what the run
measured, at its end).
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import pytest

from sdxl_core.hardware import capability as capability_of
from sdxl_core.hardware import is_hopper
from sdxl_core.suite import sweep
from sdxl_core.variants import VARIANTS

# `summary` before `fixtures`, which imports it: a plugin module imported first is not assertion-rewritten.
pytest_plugins = ["sdxl_core.suite.gpus", "sdxl_core.suite.summary", "sdxl_core.suite.fixtures"]

INSTALL = "pip install -e '.[dev]'"
MARKERS = {
    "gpu": "needs a CUDA GPU",
    "hopper": "needs a Hopper GPU (compute capability 9.0: H100, H200) for its speed gates",
    "h100": "alias of hopper",
    "tensorrt": "needs the TensorRT Python package with its builder libraries",
    "quality": "compares every variant with its stored baseline (latents, UNet output, image) and 8-bit with FP16",
    "bench": "latency benchmarks (pytest-benchmark); meaningful on a GPU",
    "reuse": "a reused engine with precompiled regions, in fresh processes that build their own engines (GPU)",
    "slow": "takes more than a few seconds on CPU",
    "needs_variants": "needs_variants(*names): builds these engines; deselected when --variants leaves one out",
    # pytest-xdist's own marker, registered here too: under `-p no:xdist` (one process, as the quality baselines
    # are made) --strict-markers would otherwise refuse every module that groups its tests.
    "xdist_group": "xdist_group(name): tests of one group run on one pytest-xdist worker (--dist loadgroup)",
}


def pytest_addoption(parser):
    group = parser.getgroup("sdxl-bench")
    group.addoption(
        "--model", default=None, help="model for engine fixtures (default: tiny on CPU, sdxl-random on GPU)"
    )
    group.addoption("--backend", default="torch", help="torch or tensorrt")
    group.addoption("--engine-dir", default=None, help="engine dir shared by the session (default: a temp dir)")
    group.addoption("--onnx-dir", default=None, help="ONNX/calibration dir (default: a temp dir)")
    group.addoption("--variants", default=None, help="comma-separated variant names for engine fixtures")
    group.addoption(
        "--update-baselines",
        action="store_true",
        help="rewrite the stored baselines of the variants this run selects (--variants; the others' entries stay)",
    )
    group.addoption("--baseline-dir", default="baselines", help="root of the stored baselines")
    group.addoption(
        "--calibration-size",
        type=int,
        default=None,
        help="calibration prompts for 8-bit engines (default: the variant's, 32; timing does not depend "
        "on it, quality does)",
    )
    group.addoption(
        "--fused-qkv",
        choices=("on", "off"),
        default="on",
        help="torch-backend engines with fused attention projections (one Q/K/V GEMM; both FP16 and "
        "8-bit, so the gate stays like for like)",
    )
    group.addoption("--min-int8-speedup", type=float, default=1.15, help="INT8 gate: median FP16 / median INT8")
    group.addoption("--min-fp8-speedup", type=float, default=1.3, help="FP8 gate: median FP16 / median FP8")
    group.addoption(
        "--gpus",
        type=int,
        default=None,
        metavar="N",
        help="use the first N visible GPUs, one pytest-xdist worker each (implies -n N where -n is not "
        "given); default: with -n, every visible GPU (CUDA_VISIBLE_DEVICES, else nvidia-smi -L)",
    )
    group.addoption(
        "--prompts",
        default=sweep.DEFAULT_PROMPTS,
        metavar="N|FILE",
        help="quality sweep: N of the packaged prompts (1-64), or a file with one prompt a line "
        f"(default {sweep.DEFAULT_PROMPTS})",
    )
    group.addoption(
        "--quality-report",
        default=None,
        metavar="PATH",
        help="write the quality sweep's summary and per-prompt values to PATH (.md: markdown, else JSON)",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """The suite's markers and the quality sweep's prompts; and without PyTorch, where every test module would
    fail to import and the hardware probe end in an INTERNALERROR, one line that says what to install."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing downloads at test time
    for name, meaning in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {meaning}")
    if config.option.help or config.option.version:
        return
    if importlib.util.find_spec("torch") is None:
        raise pytest.UsageError(
            f"the sdxl-bench suite needs the project installed in this Python (No module named 'torch'): {INSTALL}"
        )
    try:
        check_options(config)
        config.stash[PROMPTS] = sweep.load_prompts(config.getoption("--prompts"))
    except sweep.UserError as exc:
        raise pytest.UsageError(str(exc)) from None


def check_options(config) -> None:
    """Refuse, before any test is collected, an option value that would fail only inside a test or at the end of
    the session: one line (UserError) each."""
    from sdxl_core.engines import BACKENDS
    from sdxl_core.errors import UserError
    from sdxl_core.variants import check_range, did_you_mean

    option = config.getoption
    if option("--backend") not in BACKENDS:
        raise UserError(f"--backend {option('--backend')!r} is not a backend: choose one of {', '.join(BACKENDS)}")
    if option("--variants") is not None:
        names = [n for n in selected_variants(config) if n]
        if not names:
            raise UserError(f"--variants {option('--variants')!r} names no variant: choose from {', '.join(VARIANTS)}")
        for name in names:
            if name not in VARIANTS:
                raise UserError(
                    f"--variants: unknown variant {name!r}{did_you_mean(name, VARIANTS)}; choose from "
                    f"{', '.join(VARIANTS)}"
                )
    for flag in ("--min-int8-speedup", "--min-fp8-speedup"):
        value = option(flag)
        if not math.isfinite(value) or value <= 0:
            raise UserError(f"{flag} must be a finite ratio above 0 (FP16 median / 8-bit median), got {value}")
    if option("--gpus") is not None and option("--gpus") < 1:
        raise UserError(f"--gpus must be at least 1, got {option('--gpus')}")
    if option("--calibration-size") is not None:
        check_range("--calibration-size", option("--calibration-size"))
    for flag in ("--engine-dir", "--onnx-dir", "--baseline-dir"):
        if option(flag) is not None:
            _check_dir_path(flag, Path(option(flag)))
    if option("--quality-report") is not None:
        report = Path(option("--quality-report"))
        if report.is_dir():
            raise UserError(f"--quality-report {report} is a directory: name a file (.md or .json)")
        _check_dir_path("--quality-report", report, writable=True)
    if option("--model") is not None:
        from sdxl_core.models import check_model_name

        try:
            check_model_name(option("--model"))
        except UserError as exc:
            raise UserError(f"--model: {exc}") from None


def _check_dir_path(flag: str, path: Path, writable: bool = False) -> None:
    """`path` is a directory, or could be made one (`writable`: a file that could be written): its nearest
    existing ancestor is a directory, and with `writable` one this user may write."""
    existing = path.parent if writable else path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        from sdxl_core.errors import UserError

        raise UserError(f"{flag} {path}: {existing} is not a directory")
    if writable and not os.access(existing, os.W_OK):
        from sdxl_core.errors import UserError

        raise UserError(f"{flag} {path}: {existing} is not writable")


PROMPTS = pytest.StashKey[list]()  # the quality sweep's (index, prompt) pairs
FP16 = "xl-1.0-fp16"


def selected_variants(config) -> list[str]:
    """The variants whose engines this run builds: --variants, else every one in the variant table."""
    names = config.getoption("--variants")
    return [n.strip() for n in names.split(",")] if names else list(VARIANTS)


# --------------------------------------------------------------------------------------------------------------
# Hardware, probed once: a test marked `gpu` skips where PyTorch sees no CUDA device, `hopper` (alias `h100`)
# where the card is not a Hopper GPU (compute capability 9.0: H100, H200), `tensorrt` where the TensorRT
# builder is not importable.


def probe_hardware() -> dict:
    import torch

    cuda = torch.cuda.is_available()
    capability = capability_of() if cuda else None
    return {
        "cuda": cuda,
        "name": torch.cuda.get_device_name() if cuda else "cpu",
        "capability": capability,
        "tensorrt": importlib.util.find_spec("tensorrt") is not None,
    }


@pytest.hookimpl(tryfirst=True)  # before xdist's loadgroup reads the xdist_group markers
def pytest_collection_modifyitems(config, items):
    hw = probe_hardware()
    config.stash[HARDWARE] = hw
    reasons = {
        "gpu": None if hw["cuda"] else "needs a CUDA GPU (PyTorch sees none)",
        "hopper": (
            None if is_hopper(hw["capability"]) else f"needs a Hopper GPU (sm_90: H100, H200); this is {hw['name']}"
        ),
        "tensorrt": None if hw["tensorrt"] else "needs TensorRT (pip install 'sdxl-bench[trt]')",
    }
    reasons["h100"] = reasons["hopper"]
    _deselect_unselected_variants(config, items)
    _group_by_variant(config, items)
    for item in items:
        for marker, reason in reasons.items():
            if reason and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))
                break


HARDWARE = pytest.StashKey[dict]()


def _deselect_unselected_variants(config, items) -> None:
    """`--variants` limits the engines a run builds: a test marked `needs_variants(...)` (a speed gate builds FP16
    and one 8-bit engine) is deselected when the run did not select all of them, rather than building them."""
    if not config.getoption("--variants"):
        return
    selected = set(selected_variants(config))
    keep, drop = [], []
    for item in items:
        marker = item.get_closest_marker("needs_variants")
        (drop if marker and not set(marker.args) <= selected else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def variant_group(item) -> str | None:
    """The variant whose engine a test uses, or None. Under `--dist loadgroup` (pytest-xdist) the tests of one
    variant run on one worker (`xdist_group`), so each engine is built or loaded once, on one GPU. A test that
    needs two engines (FP16 and an 8-bit one, `needs_variants`) goes with the 8-bit one, whose worker loads FP16
    from the shared engine dir. The quality sweep's items (one per prompt) spread over all workers instead."""
    if "sweep_prompt" in getattr(item, "fixturenames", ()):
        return None
    callspec = getattr(item, "callspec", None)
    if callspec and "variant_engine" in callspec.params:
        return callspec.params["variant_engine"]
    marker = item.get_closest_marker("needs_variants")
    if marker and marker.args:
        return next((name for name in marker.args if name != FP16), marker.args[0])
    return None


def _group_by_variant(config, items) -> None:
    """With --update-baselines one worker renders and writes every baseline: the quality tests stay together.
    Without pytest-xdist (`-p no:xdist`) there are no groups, and no `xdist_group` marker to use."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        if config.getoption("--update-baselines") and item.get_closest_marker("quality"):
            item.add_marker(pytest.mark.xdist_group("quality"))
            continue
        group = variant_group(item)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))
