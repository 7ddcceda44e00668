"""Sessions: tests and battery (CPU, what CI runs), demo, gpu_bench (the suite on a Hopper GPU), gpu_reuse, gpu_engines,
gpu_kernels, gpu_profile (GPU measurements), quality, baselines, compare.

`tests` and `demo` make their own virtualenv and install the project from pyproject.toml. On a GPU runner
whose Python already has a CUDA build of torch, pass `--no-venv` (nox >= 2024) or set
SDXL_BENCH_SYSTEM_PYTHON=1 to use that interpreter's site-packages (venv with system site packages).

`gpu_bench`, `quality`, `baselines` and `compare` run in the Python that runs nox, where the project must be
installed (`pip install -e '.[dev]'`); where it is not, they refuse in one line that names that command, with
exit status 2. `gpu_bench` also refuses where PyTorch sees no CUDA GPU: its numbers go into the history that
later GPU runs are gated against.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys

import nox

nox.options.sessions = ["tests"]
nox.options.default_venv_backend = "venv"
PYTHON = None  # the interpreter that runs nox (3.11 on CI)
CPU_TORCH = ["torch==2.14.1", "torchvision==0.29.1"]  # on local disk on the CPU image: no 5 GB download
HISTORY = ".benchmarks"


def _install(session: nox.Session, extras: str = "dev") -> None:
    if not os.environ.get("SDXL_BENCH_SYSTEM_PYTHON"):
        session.install(*CPU_TORCH)
    session.install("-e", f".[{extras}]")


def _gpu_venv() -> dict:
    return {"venv_params": ["--system-site-packages"]} if os.environ.get("SDXL_BENCH_SYSTEM_PYTHON") else {}


def _refuse(session: nox.Session, message: str) -> None:
    """One line on stderr and exit status 2, as the CLI does for input it refuses."""
    print(f"error: nox -s {session.name}: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def _require_project(session: nox.Session) -> None:
    """Refuse where the Python that runs nox lacks the project (its sessions import torch and sdxl_core)."""
    missing = [] if importlib.util.find_spec("torch") else ["PyTorch"]
    try:
        importlib.metadata.version("sdxl-bench")
    except importlib.metadata.PackageNotFoundError:
        missing.append("the sdxl-bench package")
    if missing:
        _refuse(
            session,
            f"runs in the Python that runs nox ({sys.executable}), which lacks {' and '.join(missing)}: "
            f"install the project there first: {sys.executable} -m pip install -e '.[dev]'",
        )


def _gpu_count() -> int:
    """How many GPUs PyTorch may use (0: none), asked in a child process so that nox itself never initialises
    CUDA; counted as the suite's plugin counts them (CUDA_VISIBLE_DEVICES, else nvidia-smi -L)."""
    probe = (
        "import torch; from sdxl_core.suite.workers import visible_gpus; "
        "print((len(visible_gpus()) or torch.cuda.device_count()) if torch.cuda.is_available() else 0)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    return int(done.stdout.strip() or 0) if done.returncode == 0 else 0


def _chooses_workers(posargs) -> bool:
    """Whether the user's own pytest arguments say how many workers (or GPUs) to run."""
    return any(arg == "no:xdist" or arg.startswith(("-n", "--numprocesses", "--gpus")) for arg in posargs)


def gpu_bench_args(env, *, on_gpu: bool, history_has_runs: bool, gpus: int = 1) -> list[str]:
    """pytest's arguments for gpu_bench. Values go in `--opt=value` form: pytest takes a bare existing directory
    for a test path and roots itself there (then the suite's conftest.py never loads).

    On a GPU: engines in the persistent dirs, a saved history, a 10 % median gate against its last run, and
    with `gpus` > 1 one pytest-xdist worker per GPU (the suite's plugin pins each to its own). Without one
    (`--allow-cpu`, for debugging): `tiny` unless SDXL_BENCH_MODEL says otherwise, engines in temp dirs, and no
    history: CPU numbers must never become the baseline of a GPU gate.
    """
    if not on_gpu:
        return ["-m", "bench", f"--model={env.get('SDXL_BENCH_MODEL', 'tiny')}"]
    args = [
        "-m",
        "bench",
        "--benchmark-autosave",
        f"--benchmark-storage={HISTORY}",
        f"--model={env.get('SDXL_BENCH_MODEL', 'sdxl-random')}",
        f"--engine-dir={env.get('SDXL_BENCH_ENGINE_DIR', 'engines')}",
        f"--onnx-dir={env.get('SDXL_BENCH_ONNX_DIR', 'onnx')}",
    ]
    if gpus > 1:
        args += ["-n", str(gpus)]
    if history_has_runs:
        args += ["--benchmark-compare", "--benchmark-compare-fail=median:10%"]
    return args


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The CPU suite: everything that can run without a GPU, including quality tests on `tiny`."""
    _install(session)
    session.run("ruff", "check", ".")  # lint and format first: seconds, before minutes of tests
    session.run("ruff", "format", "--check", ".")
    session.env["HF_HUB_OFFLINE"] = "1"
    session.run("pytest", "-n", "2", "--dist", "loadgroup", *session.posargs)


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """The README's main job on the built-in model: FP16 and INT8 engines, images, grid, table."""
    _install(session)
    session.env["HF_HUB_OFFLINE"] = "1"
    session.run("python", "-m", "sdxl_core.commands.demo", *session.posargs)


@nox.session(python=False)
def gpu_bench(session: nox.Session) -> None:
    """Hopper GPU runner: build engines, run `-m bench` with histories, gate against the last saved run; one
    pytest-xdist worker per GPU where there are several (`-- --gpus N` or CUDA_VISIBLE_DEVICES uses fewer).

    Refuses (exit 2) where PyTorch sees no CUDA GPU; `nox -s gpu_bench -- --allow-cpu` runs it on the CPU for
    debugging and saves nothing.
    """
    posargs = [arg for arg in session.posargs if arg != "--allow-cpu"]
    allow_cpu = len(posargs) != len(session.posargs)
    _require_project(session)
    gpus = _gpu_count()
    on_gpu = gpus > 0
    if not on_gpu and not allow_cpu:
        _refuse(
            session,
            "PyTorch sees no CUDA GPU here, and these numbers would go into the GPU history that later "
            "runs are gated against; run it on a GPU runner (or add `-- --allow-cpu` to debug it on "
            "the CPU, saving nothing)",
        )
    history_has_runs = os.path.isdir(HISTORY) and any(os.scandir(HISTORY))
    session.run(
        sys.executable,
        "-m",
        "pytest",
        *gpu_bench_args(
            os.environ, on_gpu=on_gpu, history_has_runs=history_has_runs, gpus=1 if _chooses_workers(posargs) else gpus
        ),
        *posargs,
    )


@nox.session(python=False)
def gpu_reuse(session: nox.Session) -> None:
    """Hopper GPU runner: the opt-in precompiled regions (`-m reuse`): per 8-bit and FP16 variant, a fresh process
    builds an engine with them and another reuses it, tracing nothing. Apart from gpu_bench, whose answer after an
    upgrade it would delay by a build per variant; it reuses gpu_bench's calibrations (`SDXL_BENCH_ONNX_DIR`)."""
    _require_project(session)
    if not _gpu_count():
        _refuse(session, "PyTorch sees no CUDA GPU here; run it on a Hopper GPU runner")
    session.run(
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "reuse",
        "-p",
        "no:xdist",
        f"--model={os.environ.get('SDXL_BENCH_MODEL', 'sdxl-random')}",
        f"--onnx-dir={os.environ.get('SDXL_BENCH_ONNX_DIR', 'onnx')}",
        *session.posargs,
    )


@nox.session(python=False)
def battery(session: nox.Session) -> None:
    """The bug battery (tests/battery): each plausible bug applied alone to a copy of the code, where the quality
    tests on `tiny` must fail; the kill rate must be 100 %. It runs in the `tests` session's virtualenv where
    there is one (CI runs `nox -s tests battery`), else in the Python that runs nox. Options after `--`, e.g.
    `-- --only guidance_off_by_one --jobs 1`."""
    python = os.path.join(".nox", "tests", "bin", "python")
    if not os.path.isfile(python):
        _require_project(session)
        python = sys.executable
    session.env["HF_HUB_OFFLINE"] = "1"
    session.run(python, "-m", "tests.battery", *session.posargs, external=True)


@nox.session(python=False)
def quality(session: nox.Session) -> None:
    """8-bit images vs the stored FP16 baselines (SSIM, PSNR, CLIP score), in the Python that runs nox."""
    _require_project(session)
    session.run(sys.executable, "-m", "pytest", "-m", "quality", *session.posargs)


@nox.session(python=False)
def baselines(session: nox.Session) -> None:
    """Regenerate the stored FP16 baselines (commit the result deliberately)."""
    _require_project(session)
    session.run(sys.executable, "-m", "pytest", "-m", "quality", "--update-baselines", *session.posargs)


@nox.session(python=False)
def compare(session: nox.Session) -> None:
    """pytest-benchmark histories to a table and a PNG plot of latency per variant over runs."""
    _require_project(session)
    session.run(sys.executable, "-m", "sdxl_core.commands.cli", "history", *(session.posargs or [HISTORY]))


# GPU measurements beside the suite: each runs one `sdxl-bench` subcommand on this Python (a GPU host's own
# CUDA torch, no venv), writes its result file into --out (default gpu-results/), and takes extra flags after
# `--`, e.g. `nox -s gpu_engines -- --reload --engine-dir engines`. `sdxl-bench report FILE` renders them.
def _bench(session: nox.Session, command: str, *defaults: str) -> None:
    _require_project(session)
    args = list(session.posargs)
    if not any(a == "--out" or a.startswith("--out=") for a in args):
        args.append("--out=gpu-results")
    session.run(sys.executable, "-m", "sdxl_core.commands.cli", command, *defaults, *args, external=True)


@nox.session(python=False)
def gpu_engines(session: nox.Session) -> None:
    """FP16 / INT8 / FP8 UNet engines built (or reloaded) and timed side by side: engines.json."""
    _bench(
        session,
        "engines",
        "--model=" + os.environ.get("SDXL_BENCH_MODEL", "sdxl-random"),
        "--engine-dir=" + os.environ.get("SDXL_BENCH_ENGINE_DIR", "engines"),
        "--onnx-dir=" + os.environ.get("SDXL_BENCH_ONNX_DIR", "onnx"),
    )


@nox.session(python=False)
def gpu_kernels(session: nox.Session) -> None:
    """Per-shape GEMM and conv table, 16 bits against every 8-bit kernel: kernels.json."""
    _bench(session, "kernels")


@nox.session(python=False)
def gpu_profile(session: nox.Session) -> None:
    """A UNet step's GPU time by kernel group, FP16 against INT8 and FP8: profile.json."""
    _bench(
        session,
        "profile",
        "--model=" + os.environ.get("SDXL_BENCH_MODEL", "sdxl-random"),
        "--engine-dir=" + os.environ.get("SDXL_BENCH_ENGINE_DIR", "engines"),
        "--onnx-dir=" + os.environ.get("SDXL_BENCH_ONNX_DIR", "onnx"),
    )
