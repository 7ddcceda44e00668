"""Attacks on a shared engine dir and kernel cache, through the real CLI (`sdxl-bench txt2img` on `tiny`, CPU).

The attacker can write the engine dir and the directories beside it, and re-hash an unsigned sidecar, but not
sign. Every attack ends in exit 2 and one line that names the file, within seconds, with nothing loaded that
was not verified and no native code run; a key of any bytes signs and loads. Where the machine allows it
(root), a second user (a bare uid, no account needed) holds the lock.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from sdxl_core import models
from sdxl_core.engines import store, torch_backend, unet_stage
from sdxl_core.quant.kernels import cuda_build
from tests.e2e.test_engine_faults import FP16, INT8, ROOT, key_of, mode_of, sdxl_bench, txt2img

CPU = torch.device("cpu")
OTHER_UID = 4242
SPARSE_BYTES = 12 << 30  # 12 GB long, no disk used


def build(variant, engine_dir: Path) -> Path:
    """The engine, built in this process (8-bit: calibrated on one sample of UNet inputs); its path."""

    def calibrate(unet):
        unet_stage(unet)(*torch_backend.unet_inputs(variant, unet, CPU, torch.float32))

    torch_backend.prepare(
        variant, models.load("tiny"), CPU, engine_dir=engine_dir, progress=False, forward_loop=calibrate
    )
    return engine_dir / key_of(variant)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("built")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(store.KEY_ENV, raising=False)
        for variant in (FP16, INT8):
            build(variant, root / variant.precision)
    return root


@pytest.fixture
def engine(built, tmp_path):
    """A private copy of the FP16 or INT8 engine dir: (engine dir, engine path)."""

    def copy(variant) -> tuple[Path, Path]:
        shutil.copytree(built / variant.precision, tmp_path / variant.precision)
        return tmp_path / variant.precision, tmp_path / variant.precision / key_of(variant)

    return copy


def rewrite(path: Path, name: str, data: bytes) -> None:
    """Replace an engine file and re-hash it in the unsigned sidecar."""
    (path / name).write_bytes(data)
    record = json.loads((path / store.SIDECAR).read_text())
    record["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (path / store.SIDECAR).write_text(json.dumps(record))


def no_build(variant, engine_dir: Path, out: Path, **env):
    return sdxl_bench(txt2img(variant, engine_dir, out, "--no-build"), **env)


# --------------------------------------------------------------------------- native code


LIBRARY = """
#include <stdio.h>
__attribute__((constructor)) static void ran(void) {
    FILE *f = fopen(MARKER, "w");
    if (f) { fputs("planted code ran\\n", f); fclose(f); }
}
"""


def test_a_layer_plan_cannot_make_a_cpu_run_load_native_code(engine, tmp_path):
    """The plan of an unsigned INT8 engine names a CUTLASS conv; the kernel cache holds a library under the
    very name that kernel would load: the CPU run refuses the plan and runs no native code."""
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc to build the planted library")
    try:
        _, cutlass_version = cuda_build.cutlass_include()
    except cuda_build.KernelUnavailable as err:
        pytest.skip(f"needs the CUTLASS headers to name the library a kernel loads ({err})")
    marker, cache = tmp_path / "marker", tmp_path / "kernels"
    cache.mkdir(mode=0o755)
    sources = [cuda_build.CSRC / "conv_sm90.cu", *sorted(cuda_build.CSRC.glob("*.cuh"))]
    flags = (*cuda_build.NVCC_FLAGS, *cuda_build.ARCH_FLAGS)
    planted = cache / f"conv_sm90-{cuda_build._key(sources, flags, cutlass_version)}.so"
    (tmp_path / "planted.c").write_text(LIBRARY)
    subprocess.run(
        ["gcc", "-shared", "-fPIC", f'-DMARKER="{marker}"', "-o", planted, tmp_path / "planted.c"], check=True
    )
    engine_dir, path = engine(INT8)
    plan = json.loads((path / "layer_plan.json").read_text())
    conv = next(s for s in plan["layers"].values() if s["type"] == "Int8Conv2d" and s["kernel"] == "emulated")
    conv["kernel"] = "cutlass:128x128x128_1x1"
    rewrite(path, "layer_plan.json", json.dumps(plan).encode())
    run = no_build(INT8, engine_dir, tmp_path / "out", **{cuda_build.CACHE_ENV: str(cache)})
    assert not marker.exists(), "the planted library's code ran"
    assert run.returncode == 2
    assert (
        "layer_plan.json: " in run.error_line() and "a CUDA GPU kernel, and this run is on the cpu" in run.error_line()
    )


# --------------------------------------------------------------------------- what is read


@pytest.mark.parametrize("name", [store.SIDECAR, store.SIGNATURE])
def test_a_huge_sidecar_or_signature_is_one_line_naming_it(name, engine, tmp_path):
    key = "a CI secret of at least sixteen characters"
    engine_dir, path = engine(FP16)
    (path / store.SIGNATURE).write_text(store.signature((path / store.SIDECAR).read_bytes(), key.encode()))
    os.truncate(path / name, SPARSE_BYTES)
    run = no_build(FP16, engine_dir, tmp_path / "out", **{store.KEY_ENV: key})
    assert run.returncode == 2 and f"{name} is {SPARSE_BYTES} bytes, more than the" in run.error_line()
    assert "out of memory" not in run.stderr


def test_a_key_entry_that_links_outside_the_engine_dir_is_refused(engine, tmp_path):
    engine_dir, path = engine(FP16)
    outside = tmp_path / "outside"
    path.rename(outside)
    path.symlink_to(outside, target_is_directory=True)
    run = no_build(FP16, engine_dir, tmp_path / "out")
    assert run.returncode == 2 and f"{path} is a symlink" in run.error_line()


@pytest.mark.parametrize("name", [store.SIDECAR, "unet_config.json", "layer_plan.json"])
def test_deeply_nested_json_in_any_engine_file_is_one_line(name, engine, tmp_path):
    engine_dir, path = engine(FP16)
    deep = ("[" * 100_000 + "]" * 100_000).encode()
    if name == store.SIDECAR:
        (path / name).write_bytes(deep)
    else:
        rewrite(path, name, deep)
    run = no_build(FP16, engine_dir, tmp_path / "out")
    assert run.returncode == 2 and "nested 100000 levels deep" in run.error_line()
    assert name in run.error_line() or "sidecar" in run.error_line()


def test_a_unet_config_holding_a_string_is_not_taken_for_a_model(engine, tmp_path):
    engine_dir, path = engine(FP16)
    local = tmp_path / "someone-elses-unet"
    local.mkdir()
    (local / "config.json").write_text((path / "unet_config.json").read_text())
    rewrite(path, "unet_config.json", json.dumps(str(local)).encode())
    run = no_build(FP16, engine_dir, tmp_path / "out")
    assert run.returncode == 2 and "unet_config.json: a JSON str, not a UNet config object" in run.error_line()


def test_a_key_of_bytes_that_are_not_utf8_signs_and_loads(tmp_path, monkeypatch):
    key = os.fsdecode(b"\xff\xfe non-UTF-8 cl\xe9 0123456789")  # what os.environ holds for such bytes
    monkeypatch.setenv(store.KEY_ENV, key)
    engine_dir = tmp_path / "engines"
    build(FP16, engine_dir)
    run = no_build(FP16, engine_dir, tmp_path / "out", **{store.KEY_ENV: key})
    assert run.returncode == 0, run.stderr[-2000:]
    assert mode_of(tmp_path / "out", FP16) == "loaded"


# --------------------------------------------------------------------------- locks

HOLD = """
import sys, time
sys.path.insert(0, sys.argv[2])
from sdxl_core.engines import store
with store.lock(sys.argv[1], sys.argv[3]):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_lock_held_by_another_user_is_named_and_given_up_on_after_the_timeout(tmp_path):
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run the lock's holder as a second user")
    engine_dir = Path(tempfile.mkdtemp(prefix="sdxl-bench-shared-", dir="/tmp"))  # reachable by the other user
    holder = None
    try:
        engine_dir.chmod(0o777)
        as_other = ["setpriv", f"--reuid={OTHER_UID}", f"--regid={OTHER_UID}", "--clear-groups"]
        holder = subprocess.Popen(
            [*as_other, sys.executable, "-c", HOLD, str(engine_dir), str(ROOT), key_of(FP16)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert holder.stdout.readline() == "held\n"
        started = time.perf_counter()
        run = sdxl_bench(txt2img(FP16, engine_dir, tmp_path / "out", "--lock-timeout", "2"))
        assert run.returncode == 2
        line = run.error_line()
        assert f"gave up after 2 s waiting for the build lock {engine_dir / key_of(FP16)}.lock" in line
        assert f"held by pid {holder.pid} on " in line
        assert f"waiting for the build lock {engine_dir / key_of(FP16)}.lock, held by pid {holder.pid}" in run.stderr
        assert (engine_dir / f"{key_of(FP16)}.lock").stat().st_uid == OTHER_UID
        print(f"lock held by uid {OTHER_UID}: gave up in {time.perf_counter() - started:.1f} s")
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
        shutil.rmtree(engine_dir, ignore_errors=True)


def test_a_fifo_planted_as_the_lock_is_refused_in_seconds(tmp_path):
    engine_dir = tmp_path / "engines"
    engine_dir.mkdir()
    os.mkfifo(engine_dir / f"{key_of(FP16)}.lock")
    run = sdxl_bench(txt2img(FP16, engine_dir, tmp_path / "out"))
    assert run.returncode == 2 and f"{key_of(FP16)}.lock is a FIFO, not a lock file: remove it" in run.error_line()
