"""Per-shape kernel timings kept across engine builds, so a build re-times only what it has not timed before.

`gemm_dispatch.choose` times each 8-bit layer shape once per candidate kernel. A timing depends on the GPU, the
software that runs the kernel and the kernel's code, not on the engine or variant that asks, so it is kept in the
user's own cache (`dispatch_timings.json` in the kernel cache dir, never in an engine dir) under an environment:
GPU name and compute capability, torch / CUDA / Triton / CUTLASS versions, the Triton autotune mode and a digest
of the kernels (our kernel sources and the CUTLASS libraries' cache keys, nvcc release included). Within an
environment an entry is (format, op, shape, dtype, layout, candidate) -> ms. Only timings are reused: every
build still checks every candidate's result (`gemm_dispatch.relative_error`).

The file is data only (JSON, never executed), read with its size and nesting bounded; a file that is not ours,
not regular or not in this shape is ignored with one warning line and rewritten at the next save. Saves merge
with what another process saved meanwhile and replace the file atomically. SDXL_BENCH_DISPATCH_CACHE=0 turns
it off.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import stat
import sys
from pathlib import Path

import torch

from sdxl_core import settings
from sdxl_core.errors import UserError
from sdxl_core.files import atomic_write_text, parse_json

FILE_NAME = "dispatch_timings.json"
FORMAT = 1
MAX_BYTES = 4 << 20
KEEP_ENVIRONMENTS = 16  # the most recently used; older ones (an old torch, another GPU) are dropped
LOCK_TIMEOUT_S = 30.0
KERNELS = Path(__file__).with_name("kernels")


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "none"


@functools.cache
def kernels_digest() -> str:
    """Our kernel code: the kernel modules' sources and each CUTLASS library's cache key (its source, flags,
    CUTLASS version and nvcc release; "unavailable" where it cannot be built here)."""
    from sdxl_core.quant.kernels import conv_cutlass, cuda_build, gemm8_cutlass

    digest = hashlib.sha256()
    for source in sorted(KERNELS.glob("*.py")):
        digest.update(source.name.encode() + b"\0" + source.read_bytes() + b"\0")
    for name, flags in [*(gemm8_cutlass.build(fmt) for fmt in gemm8_cutlass.BUILD_FLAGS), conv_cutlass.BUILD]:
        try:
            library = cuda_build.library_path(name, flags).name
        except cuda_build.KernelUnavailable:
            library = f"{name}: unavailable"
        digest.update(library.encode() + b"\0")
    return digest.hexdigest()[:16]


def environment(device: torch.device) -> dict[str, str]:
    """What a timing depends on beyond the shape and the candidate."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        gpu = f"{torch.cuda.get_device_name(device)} sm{major}{minor}"
    else:
        gpu = device.type
    return {
        "gpu": gpu,
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "triton": _version("triton"),
        "cutlass": _version("nvidia-cutlass"),
        "autotune": "quick" if settings.autotune_quick() else "full",
        "kernels": kernels_digest(),
    }


def entry(fmt: str, op: str, shape: tuple, dtype: torch.dtype, channels_last: bool, candidate: str) -> str:
    layout = "channels_last" if channels_last else "contiguous"
    return " ".join((fmt, op, "x".join(map(str, shape)), str(dtype).removeprefix("torch."), layout, candidate))


class TimingCache:
    """The timings of one environment, read from `path` when made; `save` writes back what was added."""

    def __init__(self, path: Path, env: dict[str, str]):
        self.path = path
        self.env = env
        self.env_key = hashlib.sha256(json.dumps(env, sort_keys=True).encode()).hexdigest()[:16]
        environments, problem = _read(path)
        if problem:
            print(f"warning: ignoring the kernel timing cache {path} ({problem}); timing again", file=sys.stderr)
        self.ms: dict[str, float] = dict(environments.get(self.env_key, {}).get("ms", {}))
        self.added: dict[str, float] = {}

    def get(self, key: str) -> float | None:
        return self.ms.get(key)

    def put(self, key: str, ms: float) -> None:
        if _valid_ms(ms):
            self.ms[key] = self.added[key] = float(ms)

    def save(self) -> None:
        """Merge what this build timed into the file (as another process may have left it), atomically; a cache
        that cannot be written is one warning line, never a failed build."""
        if not self.added:
            return
        from filelock import FileLock, Timeout

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            with FileLock(str(self.path) + ".lock", timeout=LOCK_TIMEOUT_S):
                environments, _ = _read(self.path)
                mine = environments.pop(self.env_key, {"environment": self.env, "ms": {}})
                mine = {"environment": self.env, "ms": {**mine["ms"], **self.added}}
                kept = list(environments.items())[-(KEEP_ENVIRONMENTS - 1) :] if KEEP_ENVIRONMENTS > 1 else []
                environments = {**dict(kept), self.env_key: mine}  # the one used last goes last
                text = _dump(environments)
                while len(text.encode()) > MAX_BYTES and len(environments) > 1:
                    environments.pop(next(iter(environments)))
                    text = _dump(environments)
                atomic_write_text(self.path, text)
            self.added = {}
        except (OSError, UserError, Timeout) as err:
            print(f"warning: cannot save the kernel timing cache {self.path}: {err}", file=sys.stderr)


def open_for(device: torch.device) -> TimingCache | None:
    """The timing cache of `device`'s environment; None when SDXL_BENCH_DISPATCH_CACHE=0."""
    if not settings.dispatch_cache():
        return None
    return TimingCache(settings.kernel_cache() / FILE_NAME, environment(device))


def measure(cache: TimingCache | None, calls: dict, timer, where: tuple) -> tuple[dict[str, float], tuple[str, ...]]:
    """({candidate: ms per call}, the candidates whose ms came from `cache`) for `calls` at `where` = (fmt, op,
    shape, dtype, channels_last): each looked up in the cache, else `timer(fn, candidate, shape)` and kept."""
    ms, cached = {}, []
    for name, fn in calls.items():
        key = entry(*where, name)
        found = cache.get(key) if cache is not None else None
        if found is not None:
            ms[name] = found
            cached.append(name)
        else:
            ms[name] = timer(fn, name, where[2])
            if cache is not None:
                cache.put(key, ms[name])
    return ms, tuple(cached)


def _dump(environments: dict) -> str:
    return json.dumps({"format": FORMAT, "environments": environments}, indent=1, sort_keys=False) + "\n"


def _valid_ms(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _read(path: Path) -> tuple[dict, str]:
    """({environment key: {"environment": ..., "ms": ...}}, "") from the file, or ({}, why it is not used; ""
    when there is no file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return {}, ""
    except OSError as exc:
        return {}, f"cannot open it: {exc.strerror}"
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return {}, "not a regular file"
        if info.st_uid != os.geteuid():
            return {}, f"it belongs to uid {info.st_uid}, not to this user"
        if info.st_size > MAX_BYTES:
            return {}, f"{info.st_size} bytes, more than {MAX_BYTES}"
        data = os.read(fd, MAX_BYTES + 1)
    finally:
        os.close(fd)
    try:
        loaded = parse_json(data)
    except ValueError as exc:
        return {}, str(exc)
    problem = _problem(loaded)
    return ({}, problem) if problem else (loaded["environments"], "")


def _problem(loaded) -> str:
    """Why `loaded` is not a timing cache of this format, or ""."""
    if not isinstance(loaded, dict) or loaded.get("format") != FORMAT:
        return f"not a timing cache of format {FORMAT}"
    environments = loaded.get("environments")
    if not isinstance(environments, dict):
        return "its environments are not an object"
    for key, value in environments.items():
        if not isinstance(value, dict) or not isinstance(value.get("environment"), dict):
            return f"environment {key[:32]!r} is not an object with an environment"
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in value["environment"].items()):
            return f"environment {key[:32]!r} has a value that is not a string"
        ms = value.get("ms")
        if not isinstance(ms, dict) or not all(_valid_ms(v) for v in ms.values()):
            return f"environment {key[:32]!r} has a timing that is not a positive number of ms"
    return ""
