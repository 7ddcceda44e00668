"""The kernel cache and the compiler, under attack (CPU; gcc stands in for nvcc's output, a shell script for nvcc).

A kernel library is native code that `ctypes` runs on load: it must come from a file this user owns and nobody
else can write, not from whatever sits under the expected name. Each planted library below writes a marker from
its constructor, so "loaded" means "its code ran". And a run killed while nvcc compiles leaves no compiler
behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sdxl_core.quant.kernels import cuda_build

ROOT = Path(__file__).resolve().parents[2]
OTHER_UID = 4242  # a user who is not this one (no account needed: files are chowned to the number)
LIBRARY = """
#include <stdio.h>
__attribute__((constructor)) static void ran(void) {
    FILE *f = fopen(MARKER, "a");
    if (f) { fputs(WHO "\\n", f); fclose(f); }
}
int sdxl_test_which(void) { return WHICH; }
"""


def gcc_library(tmp_path: Path, who: str, which: int, marker: Path) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc to build a stand-in kernel library")
    source, out = tmp_path / f"{who}.c", tmp_path / f"{who}.so"
    source.write_text(LIBRARY)
    subprocess.run(
        ["gcc", "-shared", "-fPIC", f'-DMARKER="{marker}"', f'-DWHO="{who}"', f"-DWHICH={which}", "-o", out, source],
        check=True,
    )
    return out


@pytest.fixture
def kernel_cache(tmp_path, monkeypatch):
    """A kernel cache whose one kernel `k` "compiles" by copying a benign library into place; returns
    (the library's path in the cache, the marker its code writes, an evil library's path, builds so far)."""
    marker = tmp_path / "marker"
    good = gcc_library(tmp_path, "good", 1, marker)
    evil = gcc_library(tmp_path, "evil", 666, marker)
    csrc, cache = tmp_path / "csrc", tmp_path / "cache"
    csrc.mkdir()
    (csrc / "k.cu").write_text("// a kernel\n")
    cache.mkdir(mode=0o755)
    builds = []

    def compile_(source, include, flags, target, progress, threads=None, parts=1):
        builds.append(target)
        tmp = target.with_suffix(".tmp")
        shutil.copy(good, tmp)
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)

    monkeypatch.setattr(cuda_build, "CSRC", csrc)
    monkeypatch.setattr(cuda_build, "cutlass_include", lambda: (tmp_path, "0"))
    monkeypatch.setattr(cuda_build, "nvcc_release", lambda: "12.4")
    monkeypatch.setattr(cuda_build, "_compile", compile_)
    monkeypatch.setenv(cuda_build.CACHE_ENV, str(cache))
    target = cuda_build.library_path("k")
    assert target.parent == cache and target.name.endswith("-nvcc12.4.so")
    return target, marker, evil, builds


def test_a_library_of_ones_own_loads_without_a_build(kernel_cache):
    target, marker, _, builds = kernel_cache
    assert cuda_build.library("k").sdxl_test_which() == 1 and builds == [target]
    assert cuda_build.library("k").sdxl_test_which() == 1 and builds == [target]  # cached: no second build
    assert marker.read_text() == "good\n"


PLANTED = {
    # name: how the evil library sits under the kernel's name in the cache
    "owned by another user": lambda evil, target: (shutil.copy(evil, target), os.chown(target, OTHER_UID, -1)),
    "writable by others": lambda evil, target: (shutil.copy(evil, target), os.chmod(target, 0o757)),
    "writable by the group": lambda evil, target: (shutil.copy(evil, target), os.chmod(target, 0o775)),
    "a symlink to another user's file": lambda evil, target: (os.chown(evil, OTHER_UID, -1), target.symlink_to(evil)),
}


@pytest.mark.parametrize("planted", PLANTED)
def test_a_planted_library_is_never_loaded_but_rebuilt(planted, kernel_cache):
    target, marker, evil, builds = kernel_cache
    if os.geteuid() != 0 and "another user" in planted:
        pytest.skip("chowning a file to another user needs root")
    PLANTED[planted](evil, target)
    lib = cuda_build.library("k")
    assert not marker.exists() or "evil" not in marker.read_text(), "the planted library's code ran"
    assert lib.sdxl_test_which() == 1 and builds == [target]
    assert not target.is_symlink() and target.stat().st_uid == os.geteuid()


def test_a_planted_library_that_cannot_be_rebuilt_is_refused_in_one_line(kernel_cache, monkeypatch):
    target, marker, evil, _ = kernel_cache
    shutil.copy(evil, target)
    os.chmod(target, 0o777)
    monkeypatch.setattr(cuda_build, "_compile", lambda *args, **kwargs: None)  # the build leaves the file as it is
    with pytest.raises(cuda_build.KernelUnavailable, match="it is writable by group or others") as info:
        cuda_build.library("k")
    assert "\n" not in str(info.value) and not marker.exists()


# --------------------------------------------------------------------------- a killed compile

FAKE_NVCC = """#!/bin/sh
sleep 300 &
echo "$$ $!" > {pids}
wait
"""
COMPILE = """
import sys
import threading
from pathlib import Path
from sdxl_core.quant.kernels import cuda_build
source, target = Path(sys.argv[1]), Path(sys.argv[2])
cuda_build._compile(source, source.parent, (), target, False)
"""


def _running(pid: int) -> bool:
    """Alive and not a zombie (a killed orphan waits for init to reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def sleeping_nvcc(root: Path, script: str) -> tuple[Path, dict]:
    """A CUDA_HOME at `root` whose nvcc (`script`) sleeps and writes its own and the sleep's pids to root/pids, a
    kernel source root/k.cu, and the environment that points a child process at them: (the pids file, env)."""
    (root / "bin").mkdir()
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(script.format(pids=root / "pids"))
    nvcc.chmod(0o755)
    (root / "k.cu").write_text("// a kernel\n")
    return root / "pids", {**os.environ, "CUDA_HOME": str(root), "PYTHONPATH": str(ROOT)}


def test_a_run_killed_while_nvcc_compiles_leaves_no_compiler_running(tmp_path):
    pids, env = sleeping_nvcc(tmp_path, FAKE_NVCC)
    run = subprocess.Popen([sys.executable, "-c", COMPILE, str(tmp_path / "k.cu"), str(tmp_path / "k.so")], env=env)
    compiler = []
    try:
        deadline = time.monotonic() + 60
        while not (pids.exists() and pids.read_text().endswith("\n")):
            assert run.poll() is None and time.monotonic() < deadline, "the compiler never started"
            time.sleep(0.05)
        compiler = [int(p) for p in pids.read_text().split()]
        run.send_signal(signal.SIGKILL)
        run.wait()
        deadline = time.monotonic() + 5
        while any(_running(p) for p in compiler) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_running(p) for p in compiler), "nvcc (or its child) outlived the killed run"
    finally:
        for pid in compiler:  # what this test started, if the product left it running
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if run.poll() is None:
            run.kill()
            run.wait()


def test_known_config_names_are_the_libraries_own():
    """The names a layer plan may use are known without loading a library: they must be the sources' own."""
    import re

    from sdxl_core.quant.kernels import conv_cutlass, gemm8_cutlass

    gemm = (cuda_build.CSRC / "gemm8_sm90.cu").read_text()
    block = gemm[gemm.index("kConfigNames[kNumConfigs] = {") :].split("};", 1)[0]
    assert tuple(re.findall(r'"(\w+)"', block)) == gemm8_cutlass.CONFIG_NAMES
    conv = (cuda_build.CSRC / "conv_sm90.cu").read_text()
    names = tuple(re.findall(r'X\(\d+, "(\w+)"', conv))
    assert "kNumInt8Configs = kNumConfigs - 1;" in conv  # the last config is FP8 only
    assert conv_cutlass.CONFIG_NAMES == {"int8": names[:-1], "fp8": names}


def test_two_libraries_built_one_after_the_other_are_each_their_own(tmp_path):
    """The GEMM library and then the conv library, each built on first use: each is loaded through a
    descriptor, and the loader knows a library by the name it was opened under, so a descriptor number freed and
    reused would hand the second caller the first library ('undefined symbol' at the conv kernels' first call)."""
    marker, cache = tmp_path / "marker", tmp_path / "cache"
    cache.mkdir(mode=0o755)
    built = {who: gcc_library(tmp_path, who, which, marker) for who, which in (("first", 1), ("second", 2))}
    loaded = {}
    for who, library in built.items():
        target = cache / f"{who}.so"
        loaded[who] = cuda_build.load_cached(target, build=lambda src=library, dst=target: shutil.copy(src, dst))
    assert loaded["first"].sdxl_test_which() == 1
    assert loaded["second"].sdxl_test_which() == 2


# --------------------------------------------------------------------------- what a cached library is keyed by


@pytest.fixture
def sources(tmp_path, monkeypatch):
    """A kernel source `k.cu` in a checkout's csrc, CUTLASS 3.9 and nvcc 12.4; returns the csrc dir."""
    csrc = tmp_path / "checkout" / "csrc"
    csrc.mkdir(parents=True)
    (csrc / "k.cu").write_text('#include "common.cuh"\n// a kernel\n')
    (csrc / "common.cuh").write_text("// a header of ours\n")
    monkeypatch.setattr(cuda_build, "CSRC", csrc)
    monkeypatch.setattr(cuda_build, "cutlass_include", lambda: (tmp_path, "3.9.0"))
    monkeypatch.setattr(cuda_build, "nvcc_release", lambda: "12.4")
    monkeypatch.setenv(cuda_build.CACHE_ENV, str(tmp_path / "cache"))
    return csrc


def test_the_key_survives_another_checkout_and_another_torch(sources, tmp_path, monkeypatch):
    import torch

    import sdxl_core

    before = cuda_build.library_path("k")
    moved = shutil.copytree(sources, tmp_path / "elsewhere" / "csrc")
    monkeypatch.setattr(cuda_build, "CSRC", moved)
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    monkeypatch.setattr(sdxl_core, "__version__", "9.9.9", raising=False)
    monkeypatch.setattr(sys, "version", "3.99.0")
    assert cuda_build.library_path("k") == before


@pytest.mark.parametrize(
    "change",
    ["source bytes", "header bytes", "a new header", "flags", "CUTLASS version", "nvcc release"],
)
def test_what_the_binary_depends_on_changes_the_key(change, sources, tmp_path, monkeypatch):
    before = cuda_build.library_path("k")
    extra = ()
    if change == "source bytes":
        (sources / "k.cu").write_text('#include "common.cuh"\n// another kernel\n')
    elif change == "header bytes":
        (sources / "common.cuh").write_text("// another header\n")
    elif change == "a new header":
        (sources / "more.cuh").write_text("// one more header\n")
    elif change == "flags":
        extra = ("-DSDXL_GEMM8_FP8=1",)
    elif change == "CUTLASS version":
        monkeypatch.setattr(cuda_build, "cutlass_include", lambda: (tmp_path, "4.0.0"))
    else:
        monkeypatch.setattr(cuda_build, "nvcc_release", lambda: "13.0")
    assert cuda_build.library_path("k", extra) != before


def test_nvcc_threads_share_out_the_cpus_and_need_cuda_11_5(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert cuda_build.nvcc_threads(1) == cuda_build.MAX_NVCC_THREADS
    assert cuda_build.nvcc_threads(3) == 5 and cuda_build.nvcc_threads(64) == 1
    assert cuda_build._threads_flags("11.4", 4) == ()
    assert cuda_build._threads_flags("11.5", 4) == ("--threads", "4")


# --------------------------------------------------------------------------- several libraries side by side

# A fake compile marks itself `$me.started`, then waits (up to about 10 s) until `want` compiles run at once; one
# that gave up notes it as `$me.alone`. Formatted into the fake nvcc scripts below as {wait}.
WAIT_FOR_COMPANY = """touch "{log}/$me.started"
i=0
while [ "$(ls "{log}" | grep -c '[.]started$')" -lt {want} ]; do
  i=$((i+1)); if [ $i -gt 200 ]; then touch "{log}/$me.alone"; break; fi
  sleep 0.05
done
"""

# Each run waits (up to about 10 s) until `want` compiles are running at once; one that gave up notes it.
BARRIER_NVCC = """#!/bin/sh
if [ "$1" = "--version" ]; then echo "Cuda compilation tools, release 12.4, V12.4.99"; exit 0; fi
out=""; src=""; prev=""
for a in "$@"; do
  [ "$prev" = "-o" ] && out="$a"
  case "$a" in *.cu) src="$a";; esac
  prev="$a"
done
name=$(basename "$src" .cu)
echo "$*" > "{log}/$name.$$.args"
me="$name.$$"
{wait}if [ "$name" = bad ]; then echo half > "$out"; echo "bad.cu(1): error: it does not compile"; exit 1; fi
cp "{lib}" "$out"
"""


@pytest.fixture
def fake_nvcc(tmp_path, monkeypatch):
    """A CUDA_HOME whose nvcc "compiles" by copying a benign library once `want` compiles run at once; returns
    a function (want) -> (the log dir of its runs, the kernel cache)."""
    lib = gcc_library(tmp_path, "built", 7, tmp_path / "marker")
    csrc, cache, log = tmp_path / "csrc", tmp_path / "cache", tmp_path / "log"
    for path in (csrc, log, tmp_path / "cuda" / "bin"):
        path.mkdir(parents=True)
    cache.mkdir(mode=0o755)
    for name in ("a", "b", "bad"):
        (csrc / f"{name}.cu").write_text(f"// {name}\n")
    monkeypatch.setattr(cuda_build, "CSRC", csrc)
    monkeypatch.setattr(cuda_build, "cutlass_include", lambda: (tmp_path, "0"))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "cuda"))
    monkeypatch.setenv(cuda_build.CACHE_ENV, str(cache))

    def make(want: int):
        nvcc = tmp_path / "cuda" / "bin" / "nvcc"
        wait = WAIT_FOR_COMPANY.format(log=log, want=want)
        nvcc.write_text(BARRIER_NVCC.format(log=log, wait=wait, lib=lib))
        nvcc.chmod(0o755)
        return log, cache

    return make


def test_libraries_compile_side_by_side_with_nvcc_threads(fake_nvcc):
    log, cache = fake_nvcc(want=3)
    builds = [("a", ()), ("a", ("-DSDXL_GEMM8_FP8=1",)), ("b", ())]
    assert cuda_build.build_all(builds, progress=False) == dict.fromkeys(builds)
    assert len(list(log.glob("*.started"))) == 3
    assert not list(log.glob("*.alone")), "a compile ran alone: the builds did not overlap"
    threads = str(cuda_build.nvcc_threads(3))
    for args in log.glob("*.args"):
        assert f"--threads {threads} " in args.read_text()
    assert len(list(cache.glob("*.so"))) == 3
    assert cuda_build.library("b", progress=False).sdxl_test_which() == 7
    assert len(list(log.glob("*.started"))) == 3  # cached: no compile


def test_a_failing_build_leaves_no_half_written_library(fake_nvcc):
    log, cache = fake_nvcc(want=2)
    result = cuda_build.build_all([("bad", ()), ("a", ())], progress=False)
    assert result[("a", ())] is None
    assert result[("bad", ())] == "nvcc failed on bad.cu:"
    assert not list(log.glob("*.alone"))
    assert [p.name for p in cache.glob("*.so")] == [cuda_build.library_path("a").name]
    assert not [p for p in cache.iterdir() if p.is_dir()], "a compile's temp dir was left behind"
    with pytest.raises(cuda_build.KernelUnavailable, match="it does not compile"):
        cuda_build.library("bad", progress=False)  # still unavailable, in library()'s own words


def test_without_nvcc_the_newest_cached_build_loads(fake_nvcc, monkeypatch):
    _, cache = fake_nvcc(want=1)
    cuda_build.library("a", progress=False)
    built = cuda_build.library_path("a")
    older = built.with_name(built.name.replace("nvcc12.4", "nvcc11.8"))
    shutil.copy(built, older)
    monkeypatch.setattr(cuda_build, "nvcc_release", _no_nvcc)
    loaded = cuda_build.library("a", progress=False)
    assert loaded._name == str(built)
    built.unlink()
    older.chmod(0o777)  # not one this user may load
    with pytest.raises(cuda_build.KernelUnavailable, match="nvcc not found"):
        cuda_build.library("a", progress=False)


def _no_nvcc():
    raise cuda_build.KernelUnavailable("nvcc not found (set CUDA_HOME or put nvcc on PATH)")


def test_an_8bit_build_asks_for_every_cutlass_library_at_once_on_hopper_only(monkeypatch):
    import torch

    from sdxl_core import hardware
    from sdxl_core.quant.kernels import conv_cutlass, gemm8_cutlass

    asked = []
    monkeypatch.setattr(cuda_build, "_PENDING", {})
    monkeypatch.setattr(cuda_build, "start_all", lambda builds, progress: asked.append(builds) or {})
    monkeypatch.setattr(hardware, "is_hopper", lambda device: device.index == 0)
    cuda_build.build_8bit(torch.device("cuda", 0), progress=False)
    assert asked == [(gemm8_cutlass.build("int8"), gemm8_cutlass.build("fp8"), conv_cutlass.BUILD)]
    assert len({flags for _, flags in asked[0]}) == 3  # three distinct libraries
    cuda_build.build_8bit(torch.device("cuda", 1), progress=False)
    cuda_build.build_8bit(torch.device("cpu"), progress=False)
    assert len(asked) == 1


def test_8bit_libraries_build_in_the_background_once_per_process(monkeypatch):
    """`start_8bit` returns while the libraries compile; a second start joins the first; `build_8bit` waits."""
    import torch

    from sdxl_core import hardware

    go, compiled = threading.Event(), []

    def library(name, *, extra_flags, progress, threads, parts):
        assert go.wait(30), "the test never let the compile finish"
        compiled.append((name, extra_flags))

    monkeypatch.setattr(cuda_build, "_PENDING", {})
    monkeypatch.setattr(cuda_build, "library", library)
    monkeypatch.setattr(cuda_build, "_sources", lambda name: [Path(f"{name}.cu")])
    monkeypatch.setattr(cuda_build, "source_parts", lambda source: 1)
    monkeypatch.setattr(hardware, "is_hopper", lambda device: True)
    gpu = torch.device("cuda", 0)
    pending = cuda_build.start_8bit(gpu, progress=False)
    assert len(pending.futures) == 3 and not any(f.done() for f in pending.futures.values())  # not waited for
    assert cuda_build.start_8bit(gpu, progress=False) is pending and compiled == []
    go.set()
    assert cuda_build.build_8bit(gpu, progress=False) == dict.fromkeys(pending.futures)
    assert sorted(compiled) == sorted(pending.futures) and pending.seconds > 0


def test_a_run_starts_the_8bit_builds_where_it_prepares_8bit_torch_engines_on_a_gpu(monkeypatch):
    import torch

    from sdxl_core import run
    from sdxl_core.variants import get_variant

    started, gpu = [], torch.device("cuda", 0)
    monkeypatch.setattr(cuda_build, "start_8bit", lambda device, progress: started.append(device))
    fp16, int8 = get_variant("xl-1.0-fp16"), get_variant("xl-1.0-int8")
    run.start_kernel_builds([fp16], gpu)
    run.start_kernel_builds([fp16, int8], torch.device("cpu"))
    run.start_kernel_builds([fp16, int8.replace(backend="tensorrt")], gpu)
    assert started == []
    run.start_kernel_builds([fp16, int8], gpu)
    assert started == [gpu]


BACKGROUND_NVCC = """#!/bin/sh
if [ "$1" = "--version" ]; then echo "Cuda compilation tools, release 12.4, V12.4.99"; exit 0; fi
sleep 300 &
echo "$$ $!" > {pids}
wait
"""
ENDS_WHILE_COMPILING = """
import sys, time
from pathlib import Path
from sdxl_core.quant.kernels import cuda_build
root = Path(sys.argv[1])
cuda_build.CSRC, cuda_build.cutlass_include = root, lambda: (root, "0")
cuda_build.start_all([("k", ())], progress=False)
while not (root / "pids").exists() or not (root / "pids").read_text().endswith("\\n"):
    time.sleep(0.05)
"""


def test_a_run_that_ends_while_nvcc_compiles_in_the_background_neither_waits_nor_leaves_it(tmp_path):
    (tmp_path / "cache").mkdir(mode=0o755)
    pids, env = sleeping_nvcc(tmp_path, BACKGROUND_NVCC)
    env[cuda_build.CACHE_ENV] = str(tmp_path / "cache")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", ENDS_WHILE_COMPILING, str(tmp_path)], env=env, timeout=120)
    compiler = [int(p) for p in pids.read_text().split()]
    try:
        assert done.returncode == 0
        assert time.monotonic() - started < 60, "the run waited for the background compile (sleep 300) to end"
        deadline = time.monotonic() + 5
        while any(_running(p) for p in compiler) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_running(p) for p in compiler), "nvcc (or its child) outlived the run"
    finally:
        for pid in compiler:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# --------------------------------------------------------------------------- a library in parts

# Logs each call; a compile (-c) waits (up to about 10 s) until `want` compiles run at once, then writes an object
# (`fail` names a part that fails instead); the link (no -c) copies the stand-in library to its output.
PARTS_NVCC = """#!/bin/sh
if [ "$1" = "--version" ]; then echo "Cuda compilation tools, release 12.4, V12.4.99"; exit 0; fi
out=""; prev=""; part=""; unit=0
for a in "$@"; do
  [ "$prev" = "-o" ] && out="$a"
  [ "$a" = "-c" ] && unit=1
  case "$a" in -DSDXL_PART=*) part="${{a#-DSDXL_PART=}}";; esac
  prev="$a"
done
if [ $unit = 0 ]; then echo "$*" > "{log}/link.$$.args"; cp "{lib}" "$out"; exit 0; fi
echo "$*" > "{log}/part$part.args"
me="part$part"
{wait}if [ "$part" = "{fail}" ]; then echo "k.cu(9): error: part $part does not compile"; exit 1; fi
echo object > "$out"
"""


@pytest.fixture
def parts_nvcc(tmp_path, monkeypatch):
    """csrc/k.cu, which may be compiled in up to 3 parts, and an nvcc that logs its calls; returns a function
    (cpus, want, fail) -> its log dir."""
    lib = gcc_library(tmp_path, "built", 7, tmp_path / "marker")
    csrc, cache, log = tmp_path / "csrc", tmp_path / "cache", tmp_path / "log"
    for path in (csrc, log, tmp_path / "cuda" / "bin"):
        path.mkdir(parents=True)
    cache.mkdir(mode=0o755)
    (csrc / "k.cu").write_text("// a kernel in parts\n// sdxl-parts: 3\n")
    monkeypatch.setattr(cuda_build, "CSRC", csrc)
    monkeypatch.setattr(cuda_build, "cutlass_include", lambda: (tmp_path, "0"))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "cuda"))
    monkeypatch.setenv(cuda_build.CACHE_ENV, str(cache))

    def make(cpus: int, want: int, fail: str = "none"):
        monkeypatch.setattr(cuda_build, "_cpus", lambda: cpus)
        nvcc = tmp_path / "cuda" / "bin" / "nvcc"
        wait = WAIT_FOR_COMPANY.format(log=log, want=want)
        nvcc.write_text(PARTS_NVCC.format(log=log, wait=wait, lib=lib, fail=fail))
        nvcc.chmod(0o755)
        return log

    return make


def test_a_library_in_parts_compiles_them_side_by_side_then_links_them(parts_nvcc):
    log = parts_nvcc(cpus=4, want=3)
    lib = cuda_build.library("k", extra_flags=("-DX=1",), progress=False)
    assert lib.sdxl_test_which() == 7
    assert sorted(p.name for p in log.glob("part*.args")) == ["part0.args", "part1.args", "part2.args"]
    assert not list(log.glob("*.alone")), "a part compiled alone: the parts did not overlap"
    for part in range(3):
        args = (log / f"part{part}.args").read_text().split()
        assert "-c" in args and "-DX=1" in args and "-DSDXL_PARTS=3" in args and "-shared" not in args
        assert not any(a.startswith("--threads") for a in args)  # one CPU each
    (link,) = [path.read_text().split() for path in log.glob("link.*.args")]
    assert "-shared" in link and "-c" not in link
    objects = [a for a in link if a.endswith(".o")]
    assert len(objects) == 3 and len(set(objects)) == 3


def test_a_machine_with_fewer_cpus_than_libraries_compiles_each_as_one_unit(parts_nvcc):
    log = parts_nvcc(cpus=2, want=1)
    assert cuda_build.parts_for(cuda_build.CSRC / "k.cu", builds=3) == 1
    assert cuda_build.parts_for(cuda_build.CSRC / "k.cu", builds=1) == 2
    builds = [("k", ()), ("k", ("-DA=1",)), ("k", ("-DB=1",))]
    assert cuda_build.build_all(builds, progress=False) == dict.fromkeys(builds)
    assert not list(log.glob("part*.args")) and len(list(log.glob("link.*.args"))) == 3  # nvcc without -c
    for args in log.glob("link.*.args"):
        assert "-DSDXL_PART" not in args.read_text() and "k.cu" in args.read_text()


def test_a_part_that_does_not_compile_fails_the_library_in_its_own_words(parts_nvcc):
    log = parts_nvcc(cpus=3, want=1, fail="1")
    with pytest.raises(cuda_build.KernelUnavailable, match="part 1 does not compile"):
        cuda_build.library("k", progress=False)
    assert not list(log.glob("link.*.args"))
    cache = cuda_build.cache_dir()
    assert not list(cache.glob("*.so")) and not [p for p in cache.iterdir() if p.is_dir()]


def test_the_cutlass_sources_may_be_built_in_parts():
    for name, parts in (("gemm8_sm90", 7), ("conv_sm90", 9)):  # 6 GEMM configs and the GEGLU one; 9 conv configs
        assert cuda_build.source_parts(cuda_build.CSRC / f"{name}.cu") == parts
