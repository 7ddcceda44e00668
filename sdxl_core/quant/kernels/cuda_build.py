"""Build CUDA C++ kernels (CUTLASS) with nvcc into plain C-ABI shared libraries, cached per source.

A library is compiled once per (source and our headers, flags, CUTLASS version, nvcc release) and kept in the
kernel cache (`SDXL_BENCH_KERNEL_CACHE`, default `~/.cache/sdxl-bench/kernels`); nothing else (paths, the Python
or torch version) is in its name, so another checkout or another torch reuses it. A machine without nvcc loads
the newest cached build of the same source. `build_all` compiles several libraries side by side, and where the
machine has CPUs to spare each library in parts (translation units holding some of its configs, linked into
one library: `parts_for`), so a fresh machine waits for about one part's compile, not a whole library's; and
`start_8bit` starts them in the background, so the CPUs compile while the GPU calibrates. A library
exports `extern "C"` functions that take raw device pointers, sizes and a `cudaStream_t`, so Python calls them
through ctypes and it does not depend on the torch version it runs beside (the CUDA runtime is linked
statically).

A shared library is executable code, so the cache must be the user's own: a cache directory owned by
another user, or writable by group or others, is refused; a library file is loaded only if it is a regular file
(not a symlink) owned by this user and writable by nobody else, checked on the open descriptor that is then
loaded (through /proc/self/fd), and is rebuilt otherwise. Nothing is ever loaded from an engine dir. nvcc runs in
a process group of its own that dies with this process, even under SIGKILL: a killed run leaves no compiler.

Where the CUTLASS headers (the `nvidia-cutlass` package) are missing, or nvcc and a cached build, `library`
raises `KernelUnavailable` and callers fall back to the Triton kernels.
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
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
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
    # CUTLASS's sm90 kernels then wait for the kernel before them (griddepcontrol.wait) before touching global
    # memory: what makes the libraries' programmatic dependent launches safe (csrc/gemm8_sm90.cu)
    "-DCUTLASS_ENABLE_GDC_FOR_SM90=1",
    "-lineinfo",
)
# nvcc's `--threads` (CUDA 11.5 on) runs its compilation steps in parallel; it changes how fast a library builds,
# not what it holds, so it is no part of the cache key. Capped: nvcc gains little beyond a few threads.
THREADS_SINCE = (11, 5)
MAX_NVCC_THREADS = 8


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


def nvcc_release() -> str:
    """'13.0' from `nvcc --version`: part of the cache key (a different compiler is a different library)."""
    return _release(nvcc())


@functools.cache
def _release(compiler: str) -> str:
    out = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    found = re.search(r"release (\d+\.\d+)", out)
    if not found:
        raise KernelUnavailable(f"cannot read the nvcc release from {out.strip()[-120:]!r}")
    return found.group(1)


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def nvcc_threads(builds: int = 1) -> int:
    """Threads for each of `builds` nvcc runs at once: this machine's CPUs shared out, at least 1."""
    return max(1, min(MAX_NVCC_THREADS, _cpus() // max(1, builds)))


def _threads_flags(release: str, threads: int) -> tuple[str, ...]:
    if tuple(int(p) for p in release.split(".")) < THREADS_SINCE:
        return ()
    return ("--threads", str(threads))


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
    """What the binary depends on but the compiler: the sources' names (relative: `#include "x.cuh"`) and bytes,
    the flags and the CUTLASS version. The nvcc release is added beside it in the file name (`library_path`), so
    a machine without nvcc can still find a build of the same source."""
    digest = hashlib.sha256()
    for part in (cutlass_version, *flags):
        digest.update(part.encode() + b"\0")
    for source in sources:
        digest.update(source.name.encode() + b"\0" + source.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _sources(name: str) -> list[Path]:
    """`csrc/<name>.cu` and every header of ours it may include (all of `csrc/*.cuh`)."""
    source = CSRC / f"{name}.cu"
    if not source.is_file():
        raise KernelUnavailable(f"no kernel source {source}")
    return [source, *sorted(CSRC.glob("*.cuh"))]


def _flags(extra_flags: tuple[str, ...]) -> tuple[str, ...]:
    return (*NVCC_FLAGS, *ARCH_FLAGS, *extra_flags)


def _stem(name: str, extra_flags: tuple[str, ...]) -> str:
    _, cutlass_version = cutlass_include()
    return f"{name}-{_key(_sources(name), _flags(extra_flags), cutlass_version)}-nvcc"


def library_path(name: str, extra_flags: tuple[str, ...] = ()) -> Path:
    """Where the kernel cache keeps library `name` built with `extra_flags` by this machine's nvcc:
    `<name>-<key of sources, flags, CUTLASS>-nvcc<release>.so`. Raises `KernelUnavailable` without nvcc or
    CUTLASS."""
    return cache_dir() / f"{_stem(name, extra_flags)}{nvcc_release()}.so"


def _newest_cached(stem: str) -> Path | None:
    """Without nvcc: the trusted cached build of this source by the newest nvcc release, if any."""
    found = []
    for path in cache_dir().glob(stem + "*.so"):
        release = re.fullmatch(r"(\d+)\.(\d+)\.so", path.name[len(stem) :])
        if release and _is_trusted(path):
            found.append(((int(release[1]), int(release[2])), path))
    return max(found)[1] if found else None


def _check_owned(path: Path) -> None:
    """A directory we load code from must be ours and not writable by anyone else."""
    info = path.stat()
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise KernelUnavailable(f"kernel cache {path} belongs to another user: set {CACHE_ENV} to a dir of your own")
    if info.st_mode & 0o022:
        raise KernelUnavailable(f"kernel cache {path} is writable by group or others: chmod go-w it")


def library(
    name: str,
    *,
    extra_flags: tuple[str, ...] = (),
    progress: bool = True,
    threads: int | None = None,
    parts: int | None = None,
) -> ctypes.CDLL:
    """`csrc/<name>.cu` (plus every `csrc/*.cuh` it may include) built for sm_90a and loaded.

    Compiles on first use (minutes for CUTLASS kernels) under a file lock, publishes by rename, then loads
    the cached file on every later call in any process. Without nvcc, loads the newest cached build of the same
    source and flags. `threads`: nvcc's `--threads` (default: this machine's CPUs, capped); `parts`: translation
    units compiled side by side (default `parts_for` one build). Neither changes what the library holds, so
    neither is in its cache key."""
    source = _sources(name)[0]
    include, _ = cutlass_include()
    stem = _stem(name, extra_flags)
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True, mode=0o755)
    _check_owned(root)
    try:
        release = nvcc_release()
    except KernelUnavailable:
        cached = _newest_cached(stem)
        if cached is None:
            raise
        return load_cached(cached, lambda: None)  # checked on load like any other
    target = root / f"{stem}{release}.so"
    flags = _flags(extra_flags)
    threads = nvcc_threads() if threads is None else threads
    parts = parts_for(source) if parts is None else parts
    return load_cached(target, lambda: _compile(source, include, flags, target, progress, threads=threads, parts=parts))


def start_all(builds: Sequence[tuple[str, tuple[str, ...]]], *, progress: bool = True) -> dict[tuple, Future]:
    """Start building (or finding in the cache) and loading each (name, extra_flags) library side by side, one nvcc
    each, the CPUs shared out among them: {build: a future of None, or why it is unavailable in one line}.

    Each build is `library`'s (locked, published by rename) in a daemon thread: a process that is interrupted or
    exits does not wait minutes for nvcc, whose process group dies with it."""
    builds = list(dict.fromkeys((name, tuple(flags)) for name, flags in builds))
    threads = nvcc_threads(len(builds)) if builds else 1

    def build(spec: tuple[str, tuple[str, ...]]) -> str | None:
        try:
            parts = parts_for(_sources(spec[0])[0], len(builds))
            library(spec[0], extra_flags=spec[1], progress=progress, threads=threads, parts=parts)
        except KernelUnavailable as err:
            return str(err).splitlines()[0]
        return None

    return dict(zip(builds, in_daemon_threads(build, builds, "nvcc"), strict=True))


def in_daemon_threads(function, items, name: str) -> list[Future]:
    """`function(item)` for each item, each in a daemon thread of its own, as futures: unlike a thread pool's
    workers, which the interpreter joins at exit, these never make an exiting process wait for a compiler."""
    futures = []
    for item in items:
        future: Future = Future()

        def work(item=item, future=future) -> None:
            try:
                future.set_result(function(item))
            except BaseException as exc:  # the waiter re-raises it
                future.set_exception(exc)

        threading.Thread(target=work, name=name, daemon=True).start()
        futures.append(future)
    return futures


def wait_all(futures: dict[tuple, Future]) -> dict[tuple, str | None]:
    """`start_all`'s results once every build is done; an interrupt kills the compilers it waited for."""
    try:
        return {spec: future.result() for spec, future in futures.items()}
    except BaseException:
        _kill_compilers()
        raise


def build_all(builds: Sequence[tuple[str, tuple[str, ...]]], *, progress: bool = True) -> dict[tuple, str | None]:
    """`start_all` and wait: {build: None, or why it is unavailable in one line}."""
    return wait_all(start_all(builds, progress=progress))


@dataclass
class Pending:
    """The 8-bit libraries being built (or found in the cache) in the background: their futures, and when the
    builds started and the last of them ended."""

    futures: dict[tuple, Future]
    started: float = field(default_factory=time.perf_counter)
    finished: float | None = None

    def __post_init__(self):
        for future in self.futures.values():
            future.add_done_callback(self._done)

    def _done(self, _future) -> None:
        if all(f.done() for f in self.futures.values()):
            self.finished = time.perf_counter()

    def wait(self) -> dict[tuple, str | None]:
        return wait_all(self.futures)

    @property
    def seconds(self) -> float:
        """How long the builds ran (so far, while they run): nvcc's wall time, or a cache lookup's."""
        return (self.finished or time.perf_counter()) - self.started


_PENDING: dict[tuple, Pending] = {}
_PENDING_LOCK = threading.Lock()


def start_8bit(device, formats: Sequence[str] | None = None, *, progress: bool = True) -> Pending | None:
    """Start building the CUTLASS libraries 8-bit layers may run on `device` (the GEMM of each format, default
    all, and the conv library) in the background, once per process: the CPUs compile while the GPU calibrates or
    builds another engine, and a run that builds INT8 and FP8 engines waits for one compile, not three. None on a
    GPU that cannot run them (sm_90a only); what cannot be built is left for `library` to report when it is
    asked for."""
    from sdxl_core import hardware
    from sdxl_core.quant.kernels import conv_cutlass, gemm8_cutlass

    if getattr(device, "type", device) != "cuda" or not hardware.is_hopper(device):
        return None
    builds = tuple(gemm8_cutlass.build(fmt) for fmt in formats or gemm8_cutlass.BUILD_FLAGS) + (conv_cutlass.BUILD,)
    with _PENDING_LOCK:
        if builds not in _PENDING:
            started = time.perf_counter()
            _PENDING[builds] = Pending(start_all(builds, progress=progress), started)
        return _PENDING[builds]


def build_8bit(device, formats: Sequence[str] | None = None, *, progress: bool = True) -> dict[tuple, str | None]:
    """`start_8bit` (or the build it started before) and wait for it: {build: None, or why it is unavailable}."""
    pending = start_8bit(device, formats, progress=progress)
    return {} if pending is None else pending.wait()


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


_PARTS_LINE = re.compile(rb"^// sdxl-parts: (\d+)$", re.MULTILINE)


def source_parts(source: Path) -> int:
    """The most translation units `source` may be compiled as (its `// sdxl-parts: N` line; 1 without one)."""
    found = _PARTS_LINE.search(source.read_bytes())
    return int(found.group(1)) if found else 1


def parts_for(source: Path, builds: int = 1) -> int:
    """How many translation units to compile `source` as when `builds` libraries compile at once: its configs
    shared out over this machine's CPUs. Each unit compiles the CUTLASS headers again (about a quarter of a whole
    library's compile, measured on the CPU), so a machine with fewer CPUs than libraries compiles each as one."""
    return max(1, min(source_parts(source), _cpus() // max(1, builds)))


def _failed(source: Path, output: str) -> KernelUnavailable:
    return KernelUnavailable(f"nvcc failed on {source.name}:\n" + "\n".join(output.strip().splitlines()[-20:]))


def _compile(
    source: Path,
    include: Path,
    flags: tuple[str, ...],
    target: Path,
    progress: bool,
    *,
    threads: int | None = None,
    parts: int = 1,
) -> None:
    """nvcc `source` into the library `target`: as one translation unit with `threads`, or as `parts` units
    compiled side by side (one nvcc each: -DSDXL_PARTS, -DSDXL_PART) and then linked."""
    tools = include.parent / "tools" / "util" / "include"
    includes = [f"-I{include}", f"-I{tools}", f"-I{CSRC}"]
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        if progress:
            how = f" in {parts} parts side by side" if parts > 1 else ""
            print(
                f"compiling {source.name}{how} with nvcc {nvcc_release()} for sm_90a (once; cached in {target.parent})",
                file=sys.stderr,
            )
        if parts > 1:
            objects = [Path(tmp) / f"part{i}.o" for i in range(parts)]
            unit_flags = [flag for flag in flags if flag != "-shared"]
            units = [
                [nvcc(), *unit_flags, f"-DSDXL_PARTS={parts}", f"-DSDXL_PART={i}", *includes, "-c", str(source)]
                + ["-o", str(obj)]
                for i, obj in enumerate(objects)
            ]
            compiles = in_daemon_threads(run_compiler, units, "nvcc-part")
            try:
                done = [compile_.result() for compile_ in compiles]
            except BaseException:
                _kill_compilers()  # an interrupt: the other parts would only be waited for
                raise
            for returncode, output in done:
                if returncode != 0:
                    raise _failed(source, output)
            cmd = [nvcc(), *flags, *map(str, objects), "-o", str(out)]
        else:
            parallel = () if threads is None else _threads_flags(nvcc_release(), threads)
            cmd = [nvcc(), *flags, *parallel, *includes, str(source), "-o", str(out)]
        returncode, output = run_compiler(cmd)
        if returncode != 0:
            raise _failed(source, output)
        os.chmod(out, 0o755)
        os.replace(out, target)


# Runs the compiler in a process group of its own and takes the whole group down when its parent dies: the
# shell gets SIGTERM from the kernel when the process that started it dies (PR_SET_PDEATHSIG, even under SIGKILL)
# and kills its group, nvcc's own children (cicc, ptxas, the host compiler) included.
# The death signal comes when the *thread* that started the shell ends, so a compile's thread waits for it (as
# `run_compiler` does). prctl is looked up here, before the fork: the child of a threaded process must not
# dlopen (another thread may have held the loader's lock at the fork).
_GROUP_GUARD = 'trap "kill -KILL 0" TERM INT HUP; "$@" & wait $!'
_PR_SET_PDEATHSIG = 1
_RUNNING: set[subprocess.Popen] = set()
_RUNNING_LOCK = threading.Lock()


@functools.cache
def _prctl():
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _die_with(parent: int):
    prctl = _prctl()

    def setup() -> None:  # in the child, before exec
        os.setpgid(0, 0)
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the death signal was armed
            os._exit(1)

    return setup


def _kill_compilers() -> None:
    """Kill the process group of every compiler this process runs (an interrupted `build_all`)."""
    with _RUNNING_LOCK:
        running = list(_RUNNING)
    for proc in running:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


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
    with _RUNNING_LOCK:
        _RUNNING.add(proc)
    try:
        output, _ = proc.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    finally:
        with _RUNNING_LOCK:
            _RUNNING.discard(proc)
    return proc.returncode, output
