"""Sessions: tests (CPU, what CI runs), demo, gpu_bench (the suite on a Hopper GPU), gpu_engines, gpu_kernels,
gpu_profile (GPU measurements), quality, baselines, compare.

Each session makes its own virtualenv and installs the project from pyproject.toml. On a GPU runner
whose Python already has a CUDA build of torch, pass `--no-venv` (nox >= 2024) or set
SDXL_BENCH_SYSTEM_PYTHON=1 to use that interpreter's site-packages (venv with system site packages).
"""

from __future__ import annotations

import os
import sys

import nox

nox.options.sessions = ["tests"]
nox.options.default_venv_backend = "venv"
PYTHON = None  # the interpreter that runs nox (3.11 on CI)
CPU_TORCH = ["torch==2.14.1", "torchvision==0.29.1"]  # on local disk on the CPU image: no 5 GB download


def _install(session: nox.Session, extras: str = "dev") -> None:
    if not os.environ.get("SDXL_BENCH_SYSTEM_PYTHON"):
        session.install(*CPU_TORCH)
    session.install("-e", f".[{extras}]")


def _gpu_venv() -> dict:
    return {"venv_params": ["--system-site-packages"]} if os.environ.get("SDXL_BENCH_SYSTEM_PYTHON") else {}


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The CPU suite: everything that can run without a GPU, including quality tests on `tiny`."""
    _install(session)
    session.env["HF_HUB_OFFLINE"] = "1"
    session.run("pytest", "-n", "2", "--dist", "loadgroup", *session.posargs)


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """The README's main job on the built-in model: FP16 and INT8 engines, images, grid, table."""
    _install(session)
    session.env["HF_HUB_OFFLINE"] = "1"
    session.run("python", "-m", "sdxl_core.demo", *session.posargs)


@nox.session(python=False)
def gpu_bench(session: nox.Session) -> None:
    """Hopper GPU runner: build engines, run `-m bench` with histories, gate against the last saved run."""
    history = ".benchmarks"
    args = ["pytest", "-m", "bench", "--benchmark-autosave", "--benchmark-storage", history,
            "--model", os.environ.get("SDXL_BENCH_MODEL", "sdxl-random"),
            "--engine-dir", os.environ.get("SDXL_BENCH_ENGINE_DIR", "engines"),
            "--onnx-dir", os.environ.get("SDXL_BENCH_ONNX_DIR", "onnx")]
    if os.path.isdir(history) and any(os.scandir(history)):
        args += ["--benchmark-compare", "--benchmark-compare-fail=median:10%"]
    session.run(*args, *session.posargs)


@nox.session(python=False)
def quality(session: nox.Session) -> None:
    session.run("pytest", "-m", "quality", *session.posargs)


@nox.session(python=False)
def baselines(session: nox.Session) -> None:
    """Regenerate the stored FP16 baselines (commit the result deliberately)."""
    session.run("pytest", "-m", "quality", "--update-baselines", *session.posargs)


@nox.session(python=False)
def compare(session: nox.Session) -> None:
    """pytest-benchmark histories to a table and a PNG plot of latency per variant over runs."""
    session.run("sdxl-bench", "history", *(session.posargs or [".benchmarks"]))


# GPU measurements beside the suite: each runs one `sdxl-bench` subcommand on this Python (a GPU host's own
# CUDA torch, no venv), writes its result file into --out (default gpu-results/), and takes extra flags after
# `--`, e.g. `nox -s gpu_engines -- --reload --engine-dir engines`. `sdxl-bench report FILE` renders them.
def _bench(session: nox.Session, command: str, *defaults: str) -> None:
    args = list(session.posargs)
    if not any(a == "--out" or a.startswith("--out=") for a in args):
        args.append("--out=gpu-results")
    session.run(sys.executable, "-m", "sdxl_core.cli", command, *defaults, *args, external=True)


@nox.session(python=False)
def gpu_engines(session: nox.Session) -> None:
    """FP16 / INT8 / FP8 UNet engines built (or reloaded) and timed side by side: engines.json."""
    _bench(session, "engines", "--model=" + os.environ.get("SDXL_BENCH_MODEL", "sdxl-random"),
           "--engine-dir=" + os.environ.get("SDXL_BENCH_ENGINE_DIR", "engines"),
           "--onnx-dir=" + os.environ.get("SDXL_BENCH_ONNX_DIR", "onnx"))


@nox.session(python=False)
def gpu_kernels(session: nox.Session) -> None:
    """Per-shape GEMM and conv table, 16 bits against every 8-bit kernel: kernels.json."""
    _bench(session, "kernels")


@nox.session(python=False)
def gpu_profile(session: nox.Session) -> None:
    """A UNet step's GPU time by kernel group, FP16 against INT8 and FP8: profile.json."""
    _bench(session, "profile", "--model=" + os.environ.get("SDXL_BENCH_MODEL", "sdxl-random"),
           "--engine-dir=" + os.environ.get("SDXL_BENCH_ENGINE_DIR", "engines"),
           "--onnx-dir=" + os.environ.get("SDXL_BENCH_ONNX_DIR", "onnx"))
