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

    def compile_(source, include, flags, target, progress):
        builds.append(target)
        tmp = target.with_suffix(".tmp")
        shutil.copy(good, tmp)
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)

    monkeypatch.setattr(cuda_build, "CSRC", csrc)
    monkeypatch.setattr(cuda_build, "cutlass_include", lambda: (tmp_path, "0"))
    monkeypatch.setattr(cuda_build, "_compile", compile_)
    monkeypatch.setenv(cuda_build.CACHE_ENV, str(cache))
    target = cache / f"k-{cuda_build._key([csrc / 'k.cu'], cuda_build.NVCC_FLAGS + cuda_build.ARCH_FLAGS, '0')}.so"
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
    monkeypatch.setattr(cuda_build, "_compile", lambda *args: None)  # the build leaves the file as it is
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


def test_a_run_killed_while_nvcc_compiles_leaves_no_compiler_running(tmp_path):
    (tmp_path / "bin").mkdir()
    pids = tmp_path / "pids"
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.write_text(FAKE_NVCC.format(pids=pids))
    nvcc.chmod(0o755)
    (tmp_path / "k.cu").write_text("// a kernel\n")
    env = {**os.environ, "CUDA_HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
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
    int8 = int(re.search(r"kNumInt8Configs = (\d+)", conv).group(1))
    assert conv_cutlass.CONFIG_NAMES == {"int8": names[:int8], "fp8": names}


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
