"""Every SDXL_BENCH_* environment variable: read and checked here, documented in the README's settings table.

Each is read when asked for (so a test can set one), checked the same way each time, and a bad value is one
line for the user (UserError). `check()` reads them all: the CLI calls it before any model loads. The
variables that configure the test harness rather than the package (SDXL_BENCH_MODEL, _ENGINE_DIR, _ONNX_DIR
and _SYSTEM_PYTHON for noxfile.py, _TRT_VERSIONS for tests/unit/test_trt_api.py) are read where they are
used, since nox runs without the package installed, and listed in SETTINGS with the others.
Importing this module imports nothing heavy: the Triton kernels read a setting as they are imported.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from sdxl_core.errors import UserError

PREFIX = "SDXL_BENCH_"
CROSS_KV_MODES = ("per-step", "reuse")
MIN_ENGINE_KEY_CHARS = 16

# name (after the prefix) -> (allowed values, what it does): the README's table, and what `check` reads.
SETTINGS = {
    "CROSS_KV": ("per-step (default), reuse", "compute cross-attention K/V once per prompt instead of every step"),
    "PRECOMPILE": (
        "0 (default), 1",
        "a GPU engine build also stores its regions compiled ahead of time (reuse traces nothing)",
    ),
    "GEMM_DISPATCH": ("on (default), off", "time each 8-bit layer shape's kernels when a GPU engine is built"),
    "KERNELS": (
        "comma-separated kernel names or prefixes (`cutlass`, `scaled_mm`, `attention_triton`, `layernorm_triton`,"
        " `geglu_act_triton`, ...)",
        "the kernels the dispatch may time besides the 16-bit path (unset: all)",
    ),
    "PDL": (
        "0 (default), 1",
        "the CUTLASS 8-bit kernels start their prologue while the kernel before them ends (dependent launch)",
    ),
    "AUTOTUNE": ("full (default), quick", "quick: the Triton INT8 kernels autotune over one config"),
    "TRITON_ON_CPU": ("0 (default), 1", "run the Triton kernels in Triton's CPU interpreter (tests)"),
    "MODELOPT_CUDA_EXT": ("0 (default), 1", "calibrate with ModelOpt's CUDA extension (nvcc JIT, ~67 s)"),
    "KERNEL_CACHE": ("a directory", "where the CUTLASS kernels are built (default ~/.cache/sdxl-bench/kernels)"),
    "DISPATCH_CACHE": ("1 (default), 0", "reuse each GPU's kernel timings per layer shape (kept in the kernel cache)"),
    "MODEL_CACHE": ("a directory, off", "where built-in models are cached (default ~/.cache/sdxl-bench/models)"),
    "ENGINE_KEY": (f"at least {MIN_ENGINE_KEY_CHARS} characters", "sign engines; trust only signed ones"),
    "TRUST_ENGINE_DIR": ("0 (default), 1", "trust executable engine files without a key or ownership check"),
    "MODEL": ("a model name or path", "nox: the model the suite runs (default tiny on CPU, sdxl-random on GPU)"),
    "ENGINE_DIR": ("a directory", "nox: where the suite keeps engines (default engines)"),
    "ONNX_DIR": ("a directory", "nox: where the suite keeps ONNX and calibration (default onnx)"),
    "SYSTEM_PYTHON": ("unset, 1", "nox: make its venvs with the system site-packages"),
    "TRT_VERSIONS": ("comma-separated versions", "tests: the TensorRT releases test_trt_api checks against"),
}
_KERNEL_NAME = re.compile(r"[A-Za-z0-9_:.-]+")


def raw(name: str) -> str | None:
    """The variable's value with surrounding blanks removed; None when unset or blank."""
    if name not in SETTINGS:
        raise KeyError(name)
    value = os.environ.get(PREFIX + name, "").strip()
    return value or None


def _choice(name: str, choices: tuple[str, ...], default: str) -> str:
    value = raw(name) or default
    if value not in choices:
        raise UserError(f"{PREFIX}{name}={value!r}: choose one of {', '.join(choices)}")
    return value


def _flag(name: str) -> bool:
    return _choice(name, ("0", "1"), "0") == "1"


def cross_kv() -> str:
    return _choice("CROSS_KV", CROSS_KV_MODES, "per-step")


def precompile() -> bool:
    return _flag("PRECOMPILE")


def gemm_dispatch() -> bool:
    return _choice("GEMM_DISPATCH", ("on", "off"), "on") == "on"


def kernels() -> list[str]:
    """The kernel names (prefixes) the dispatch may time; empty: every kernel."""
    names = [n.strip() for n in (raw("KERNELS") or "").split(",") if n.strip()]
    for name in names:
        if not _KERNEL_NAME.fullmatch(name):
            raise UserError(f"{PREFIX}KERNELS: {name!r} is not a kernel name (e.g. cutlass,scaled_mm)")
    return names


def pdl() -> bool:
    return _flag("PDL")


def autotune_quick() -> bool:
    return _choice("AUTOTUNE", ("full", "quick"), "full") == "quick"


def triton_on_cpu() -> bool:
    return _flag("TRITON_ON_CPU")


def modelopt_cuda_ext() -> bool:
    return _flag("MODELOPT_CUDA_EXT")


def trust_engine_dir() -> bool:
    value = raw("TRUST_ENGINE_DIR") or "0"
    if value not in ("0", "1"):
        raise UserError(
            f"{PREFIX}TRUST_ENGINE_DIR must be 1 (trust unsigned engine dirs of other users) or 0, got {value!r}"
        )
    return value == "1"


def dispatch_cache() -> bool:
    return _choice("DISPATCH_CACHE", ("0", "1"), "1") == "1"


def kernel_cache() -> Path:
    return Path(raw("KERNEL_CACHE") or Path.home() / ".cache" / "sdxl-bench" / "kernels").expanduser()


def model_cache() -> Path | None:
    """The built-in models' cache directory; None when SDXL_BENCH_MODEL_CACHE=off."""
    value = raw("MODEL_CACHE")
    if value and value.lower() == "off":
        return None
    if value:
        return Path(value).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "sdxl-bench" / "models"


def engine_key() -> bytes | None:
    """SDXL_BENCH_ENGINE_KEY as bytes (exactly the environment's bytes, whatever the locale), or None."""
    value = os.environ.get(PREFIX + "ENGINE_KEY")
    if not value:
        return None
    key = os.fsencode(value)  # undecodable bytes came in as surrogates: any byte string is a valid HMAC key
    if len(key) < MIN_ENGINE_KEY_CHARS:
        raise UserError(
            f"{PREFIX}ENGINE_KEY is {len(key)} characters: use at least {MIN_ENGINE_KEY_CHARS} random ones "
            "(python -c 'import secrets; print(secrets.token_hex(32))')"
        )
    return key


_CHECKS = (
    cross_kv,
    precompile,
    gemm_dispatch,
    kernels,
    pdl,
    autotune_quick,
    triton_on_cpu,
    modelopt_cuda_ext,
    trust_engine_dir,
    dispatch_cache,
)


def check() -> None:
    """Read every setting the package reads: a bad one is one line now, not minutes into a run."""
    for read in (*_CHECKS, engine_key):
        read()
