"""Build CUDA C++ kernels (CUTLASS) with nvcc into plain C-ABI shared libraries, cached per source.

A library is compiled once per (source, CUTLASS version, flags) and kept in the kernel cache
(`SDXL_BENCH_KERNEL_CACHE`, default `~/.cache/sdxl-bench/kernels`). It exports `extern "C"` functions that
take raw device pointers, sizes and a `cudaStream_t`, so Python calls them through ctypes and the library
does not depend on the torch version it runs beside (the CUDA runtime is linked statically).

A shared library is executable code, so the cache must be the user's own: a cache directory owned by
another user, or writable by group or others, is refused; a library file is loaded only if it is a regular file
(not a symlink) owned by this user and writable by nobody else, checked on the open descriptor that is then
loaded (through /proc/self/fd), and is rebuilt otherwise. Nothing is ever loaded from an engine dir. nvcc runs in
a process group of its own that dies with this process, even under SIGKILL: a killed run leaves no compiler.

Where nvcc or the CUTLASS headers (the `nvidia-cutlass` package) are missing, `library` raises
`KernelUnavailable` and callers fall back to the Triton kernels.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

from sdxl_core import settings

CSRC = Path(__file__).with_name("csrc")
CACHE_ENV = "SDXL_BENCH_KERNEL_CACHE"
# Hopper's warp-group MMA (wgmma) and TMA need the arch-specific sm_90a target; written in -gencode form
# because `-arch=sm_90a` also ran a plain sm_90 pass that rejects them.
ARCH_FLAGS = ("-gencode=arch=compute_90a,code=sm_90a",)
NVCC_FLAGS = (
    "-O3",
    "-std=c++17",
    "--expt-relaxed-constexpr",
    "--expt-extended-lambda",
    "-shared",
    "-Xcompiler=-fPIC",
    "-cudart=static",
    "-DNDEBUG",
    "-DCUTLASS_ENABLE_TENSOR_CORE_MMA=1",
    "-lineinfo",
)


class KernelUnavailable(RuntimeError):
    """This machine cannot build or load the library (no nvcc, no CUTLASS, not a Hopper GPU, compile error)."""


def cache_dir() -> Path:
    return settings.kernel_cache()


def nvcc() -> str:
    for candidate in (
        os.environ.get("CUDA_HOME") and Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc",
        shutil.which("nvcc"),
        Path("/usr/local/cuda/bin/nvcc"),
    ):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    raise KernelUnavailable("nvcc not found (set CUDA_HOME or put nvcc on PATH)")


@functools.cache
def nvcc_release() -> str:
    """'13.0' from `nvcc --version`: part of the cache key (a different compiler is a different library)."""
    out = subprocess.run([nvcc(), "--version"], capture_output=True, text=True, check=False).stdout
    found = re.search(r"release (\d+\.\d+)", out)
    if not found:
        raise KernelUnavailable(f"cannot read the nvcc release from {out.strip()[-120:]!r}")
    return found.group(1)


def cutlass_include() -> tuple[Path, str]:
    """The CUTLASS headers shipped in the `nvidia-cutlass` wheel, and its version."""
    try:
        from importlib.metadata import version

        import cutlass_library
    except ImportError:
        raise KernelUnavailable("the CUTLASS headers are missing: pip install nvidia-cutlass") from None
    include = Path(cutlass_library.__file__).parent / "source" / "include"
    if not (include / "cutlass" / "cutlass.h").is_file():
        raise KernelUnavailable(f"no CUTLASS headers under {include}")
    return include, version("nvidia-cutlass")


def _key(sources: list[Path], flags: tuple[str, ...], cutlass_version: str) -> str:
    """What the binary depends on. Not the compiler: any nvcc that builds sm_90a gives a valid library, and a
    machine with a built cache needs no nvcc at all."""
    digest = hashlib.sha256()
    for part in (cutlass_version, *flags):
        digest.update(part.encode() + b"\0")
    for source in sources:
        digest.update(source.name.encode() + b"\0" + source.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _check_owned(path: Path) -> None:
    """A directory we load code from must be ours and not writable by anyone else."""
    info = path.stat()
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise KernelUnavailable(f"kernel cache {path} belongs to another user: set {CACHE_ENV} to a dir of your own")
    if info.st_mode & 0o022:
        raise KernelUnavailable(f"kernel cache {path} is writable by group or others: chmod go-w it")


def library(name: str, *, extra_flags: tuple[str, ...] = (), progress: bool = True) -> ctypes.CDLL:
    """`csrc/<name>.cu` (plus every `csrc/*.cuh` it may include) built for sm_90a and loaded.

    Compiles on first use (minutes for CUTLASS kernels) under a file lock, publishes by rename, then loads
    the cached file on every later call in any process."""
    source = CSRC / f"{name}.cu"
    if not source.is_file():
        raise KernelUnavailable(f"no kernel source {source}")
    include, cutlass_version = cutlass_include()
    flags = (*NVCC_FLAGS, *ARCH_FLAGS, *extra_flags)
    sources = [source, *sorted(CSRC.glob("*.cuh"))]
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True, mode=0o755)
    _check_owned(root)
    target = root / f"{name}-{_key(sources, flags, cutlass_version)}.so"
    return load_cached(target, lambda: _compile(source, include, flags, target, progress))


def load_cached(target: Path, build) -> ctypes.CDLL:
    """The library at `target` if it is one this user may load (`trusted_library`), else `build()` it (which
    replaces whatever is there) under the target's lock, then load it."""
    if not _is_trusted(target):
        from filelock import FileLock

        with FileLock(str(target) + ".lock"):
            if not _is_trusted(target):
                build()
    fd, problem = trusted_library(target)
    if fd is None:
        raise KernelUnavailable(f"refusing to load {target}: {problem}")
    try:
        return _load(target, fd)
    finally:
        os.close(fd)


def _is_trusted(path: Path) -> bool:
    fd, _ = trusted_library(path)
    if fd is None:
        return False
    os.close(fd)
    return True


def trusted_library(path: Path) -> tuple[int | None, str]:
    """(an open descriptor of `path`, "") when it is a regular file, not a symlink, owned by this user and writable
    by nobody else; else (None, why not)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None, "it does not exist"
    except OSError as exc:
        return None, f"it cannot be opened without following a link ({exc.strerror})"
    info = os.fstat(fd)
    problem = ""
    if not stat.S_ISREG(info.st_mode):
        problem = "it is not a regular file"
    elif info.st_uid != os.geteuid():
        problem = f"it belongs to uid {info.st_uid}, not to this user"
    elif info.st_mode & 0o022:
        problem = "it is writable by group or others"
    if problem:
        os.close(fd)
        return None, problem
    return fd, ""


_LOADED: dict[tuple[int, int, int], ctypes.CDLL] = {}  # by file identity: (device, inode, mtime)


def _load(path: Path | str, fd: int) -> ctypes.CDLL:
    """Load the file open as `fd` (checked) through /proc/self/fd: the very file that was checked, whatever `path`
    names meanwhile. Once per file."""
    info = os.fstat(fd)
    identity = (info.st_dev, info.st_ino, info.st_mtime_ns)
    if identity not in _LOADED:
        # The loader knows a library by the name it was opened under and hands back the one already loaded
        # under that name: a descriptor number freed and reused for another library would get the first one.
        # So each library is opened through a duplicate descriptor that stays open for the life of the process.
        kept = os.dup(fd)
        try:
            handle = ctypes.CDLL(f"/proc/self/fd/{kept}")._handle
            _LOADED[identity] = ctypes.CDLL(str(path), handle=handle)  # named by its path, loaded from the fd
        except OSError as err:
            os.close(kept)
            raise KernelUnavailable(f"cannot load {path}: {err}") from None
    return _LOADED[identity]


def _compile(source: Path, include: Path, flags: tuple[str, ...], target: Path, progress: bool) -> None:
    tools = include.parent / "tools" / "util" / "include"
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        cmd = [nvcc(), *flags, f"-I{include}", f"-I{tools}", f"-I{CSRC}", str(source), "-o", str(out)]
        if progress:
            print(
                f"compiling {source.name} with nvcc {nvcc_release()} for sm_90a (once; cached in {target.parent})",
                file=sys.stderr,
            )
        returncode, output = run_compiler(cmd)
        if returncode != 0:
            tail = output.strip().splitlines()[-20:]
            raise KernelUnavailable(f"nvcc failed on {source.name}:\n" + "\n".join(tail))
        os.chmod(out, 0o755)
        os.replace(out, target)


# Runs the compiler in a process group of its own and takes the whole group down when its parent dies: the
# shell gets SIGTERM from the kernel when the process that started it dies (PR_SET_PDEATHSIG, even under SIGKILL)
# and kills its group, nvcc's own children (cicc, ptxas, the host compiler) included.
_GROUP_GUARD = 'trap "kill -KILL 0" TERM INT HUP; "$@" & wait $!'
_PR_SET_PDEATHSIG = 1


def _die_with(parent: int):
    def setup() -> None:  # in the child, before exec
        os.setpgid(0, 0)
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the death signal was armed
            os._exit(1)

    return setup


def run_compiler(cmd: list[str]) -> tuple[int, str]:
    """(exit status, output) of `cmd`, run so that no part of it outlives this process: killed with its group
    when this process dies (any signal) or is interrupted."""
    proc = subprocess.Popen(
        ["/bin/sh", "-c", _GROUP_GUARD, "sh", *cmd],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=_die_with(os.getpid()),
    )
    try:
        output, _ = proc.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    return proc.returncode, output
