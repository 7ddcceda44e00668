"""Fault battery: the real CLI on `tiny` (CPU, 64x64, 2 steps, 2 calibration prompts), killed, crowded, starved.

Every case runs `sdxl-bench` in subprocesses (through tests/support/faults.py, which injects the fault) and checks
what people and the next run see: the exit status (2 and one line for a failure people must fix, none of
it a traceback), that nothing half-written survives a rerun, and how long it took (bounded: seconds,
never minutes). A process killed by SIGKILL cleans nothing up; the next build removes what it left.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from sdxl_core.engines import store, torch_backend
from sdxl_core.quant import qmodules
from sdxl_core.variants import VARIANTS

ROOT = Path(__file__).resolve().parents[2]
FP16 = VARIANTS["xl-1.0-fp16"].replace(model="tiny", height=64, width=64, steps=2)
INT8 = VARIANTS["xl-1.0-int8"].replace(model="tiny", height=64, width=64, steps=2, calibration_size=2)
# One sdxl-bench process on `tiny`, Python start and imports included, on a busy 2-core CI machine.
RUN_BOUND_S = 90
KEY = "a CI secret of at least sixteen characters"
TORCH_LOG = re.compile(r"[DIWEF]\d{4} \d\d:\d\d:\d\d")  # glog-style records torch writes to stderr
PHASE = "sdxl-bench: "  # the line the CLI prints at each phase of long work, before any error


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def error_line(self) -> str:
        """The one line a failed run printed. Python warnings are off; torch's own log records (such as
        "No CUDA runtime is found" where a CUDA toolkit is installed) are not the tool's to silence."""
        lines = [
            line
            for line in self.stderr.strip().splitlines()
            if not TORCH_LOG.match(line) and not line.startswith(PHASE)
        ]
        assert len(lines) == 1 and lines[0].startswith("error: "), self.stderr[-2000:]
        return lines[0]


def _report_file(out: Path, variant) -> Path:
    """The run report txt2img wrote (its name carries a hash of the prompt and settings)."""
    (report,) = out.glob(f"{variant.name}-s0-*.json")
    return report


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (store.KEY_ENV, store.TRUST_ENV)}
    return {
        **env,
        "PYTHONPATH": str(ROOT),
        "PYTHONWARNINGS": "ignore",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        **extra,
    }


def command(args: list[str], fault: str = "") -> list[str]:
    return [sys.executable, "-m", "tests.support.faults", fault, "--", *args]


def sdxl_bench(args: list[str], fault: str = "", *, prefix: tuple[str, ...] = (), **env) -> Run:
    started = time.perf_counter()
    done = subprocess.run(
        [*prefix, *command(args, fault)], cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=RUN_BOUND_S
    )
    run = Run(done.returncode, done.stdout, done.stderr, time.perf_counter() - started)
    assert run.seconds < RUN_BOUND_S
    return run


def txt2img(variant, engine_dir: Path, out: Path, *extra: str) -> list[str]:
    args = [
        "txt2img",
        "a castle",
        "--model",
        "tiny",
        "--height",
        str(variant.height),
        "--width",
        str(variant.width),
        "--denoising-steps",
        str(variant.steps),
        "--device",
        "cpu",
        "--no-progress",
        "--num-warmup-runs",
        "0",
        "--engine-dir",
        str(engine_dir),
        "--output-dir",
        str(out),
        *extra,
    ]
    if variant.precision == "int8":
        args += ["--int8", "--calibration-size", str(variant.calibration_size)]
    return args


def mode_of(out: Path, variant) -> str:
    """built or loaded, from the report the run wrote."""
    return json.loads(_report_file(out, variant).read_text())["engine"]["mode"]


def key_of(variant) -> str:
    return torch_backend.engine_key(variant, torch.device("cpu"))


def leftovers(*dirs: Path) -> list[str]:
    """Temp and stale files and dirs (hidden names) anywhere under `dirs`."""
    return sorted(str(p) for d in dirs if d.exists() for p in d.rglob(".*"))


def assert_whole(engine_dir: Path, variant) -> None:
    assert store.verify(engine_dir, key_of(variant), {}, required=qmodules.UNET_FILES) is not None
    assert [p.name for p in engine_dir.iterdir() if p.is_dir()] == [key_of(variant)]


def build_in_process(variant, engine_dir: Path, onnx_dir: Path | None = None) -> tuple[str, float]:
    """Build (or load) the engine in this process, as a rerun does: (built or loaded, seconds)."""
    from sdxl_core import models, run

    started = time.perf_counter()
    components, cpu = models.load("tiny"), torch.device("cpu")
    loop = run.calibration_loop(components, variant, cpu, torch.float32, False)
    engines = torch_backend.prepare(
        variant, components, cpu, engine_dir=engine_dir, onnx_dir=onnx_dir, progress=False, forward_loop=loop
    )
    return engines.info.mode, time.perf_counter() - started


# --------------------------------------------------------------------------- kill -9, then a rerun

# point: (variant, what the killed build leaves behind (engine dir, ONNX dir): proof that it died mid-write)
KILLS = {
    "locked": (FP16, lambda e, o: True),
    "calibrating": (INT8, lambda e, o: True),
    "saving-record": (INT8, lambda e, o: any((o / "activation-records").glob(".*.pt.*.tmp.pt"))),
    "saving-calibration": (INT8, lambda e, o: any(o.rglob(".calibration.pt.*.tmp.pt"))),
    "writing-engine": (FP16, lambda e, o: any((p / "unet.safetensors").exists() for p in e.glob(".*.tmp"))),
    "publishing": (FP16, lambda e, o: any(e.glob(".*.stale")) and any(e.glob(".*.tmp"))),
}


@pytest.mark.parametrize("point", KILLS)
def test_a_build_killed_at_any_point_leaves_nothing_after_a_rerun(point, tmp_path):
    variant, trace = KILLS[point]
    engine_dir, onnx_dir = tmp_path / "engines", tmp_path / "onnx"
    args = txt2img(variant, engine_dir, tmp_path / "out", "--onnx-dir", str(onnx_dir))
    if point == "publishing":  # a refused engine, which the build replaces
        build_in_process(variant, engine_dir)
        weights = engine_dir / key_of(variant) / "unet.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])

    killed = sdxl_bench(args, fault=f"kill:{point}")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert trace(engine_dir, onnx_dir), leftovers(engine_dir, onnx_dir)
    assert not (engine_dir / key_of(variant)).exists()  # no engine under the key, whole or not

    mode, seconds = build_in_process(variant, engine_dir, onnx_dir)  # the rerun (in this process: no imports)
    assert mode == "built" and seconds < RUN_BOUND_S
    assert leftovers(engine_dir, onnx_dir) == []
    assert_whole(engine_dir, variant)
    print(f"kill:{point}: killed run {killed.seconds:.1f} s, rerun {seconds:.1f} s")


# --------------------------------------------------------------------------- builders and readers together


def test_three_builders_and_a_reader_leave_one_engine(tmp_path):
    engine_dir = tmp_path / "engines"
    started = time.perf_counter()
    outs = [tmp_path / f"out{i}" for i in range(4)]
    errors = [tmp_path / f"builder{i}.err" for i in range(3)]
    builders = [
        subprocess.Popen(
            command(txt2img(FP16, engine_dir, outs[i])),
            cwd=ROOT,
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=errors[i].open("w"),
        )
        for i in range(3)
    ]
    try:
        while not (engine_dir / key_of(FP16)).exists():  # the reader starts once one builder has published
            assert time.perf_counter() - started < RUN_BOUND_S, "no builder published within the run bound"
            failed = [(i, b.returncode) for i, b in enumerate(builders) if b.poll() not in (None, 0)]
            assert not failed, [(i, code, errors[i].read_text()[-2000:]) for i, code in failed]
            time.sleep(0.1)
        reader = sdxl_bench(txt2img(FP16, engine_dir, outs[3], "--no-build"))
        codes = [b.wait(timeout=RUN_BOUND_S) for b in builders]
    finally:
        for b in builders:
            b.kill()
            b.wait()
    assert codes == [0, 0, 0], [e.read_text()[-2000:] for e in errors]
    assert reader.returncode == 0, reader.stderr[-2000:]
    assert sorted(mode_of(o, FP16) for o in outs[:3]) == ["built", "loaded", "loaded"]
    assert mode_of(outs[3], FP16) == "loaded"
    assert leftovers(engine_dir) == []
    assert_whole(engine_dir, FP16)
    assert time.perf_counter() - started < 2 * RUN_BOUND_S
    print(f"three builders and a reader: {time.perf_counter() - started:.1f} s, reader {reader.seconds:.1f} s")


def test_a_reader_does_not_wait_for_a_builders_lock(tmp_path):
    engine_dir = tmp_path / "engines"
    build_in_process(FP16, engine_dir)
    with store.lock(engine_dir, key_of(FP16)):  # a builder of this very key holds its lock
        reader = sdxl_bench(txt2img(FP16, engine_dir, tmp_path / "out", "--no-build"))
    assert reader.returncode == 0, reader.stderr[-2000:]
    assert mode_of(tmp_path / "out", FP16) == "loaded"
    print(f"reader beside a held lock: {reader.seconds:.1f} s")


# --------------------------------------------------------------------------- full disk, read-only dir


def _mount_namespace() -> tuple[str, ...] | None:
    """A command prefix that runs in a private mount namespace where this user may mount, or None."""
    if shutil.which("unshare") is None:
        return None
    for prefix in (
        ("unshare", "--mount", "--propagation", "private"),
        ("unshare", "--map-root-user", "--mount", "--propagation", "private"),
    ):
        if subprocess.run([*prefix, "true"], capture_output=True).returncode == 0:
            return prefix
    return None


NAMESPACE = _mount_namespace()
NO_NAMESPACE = "needs mount namespaces (unshare --mount as root, or unprivileged user namespaces)"
# Mount the engine dir ($1) as given ($2: tmpfs size or "ro"), run the rest, then list what is left in it.
MOUNT_AND_RUN = """
dir=$1 how=$2 listing=$3; shift 3
if [ "$how" = ro ]; then mount --bind "$dir" "$dir" && mount -o remount,bind,ro "$dir" || exit 97
else mount -t tmpfs -o size="$how" tmpfs "$dir" || exit 97; fi
"$@"; rc=$?
ls -A "$dir" > "$listing"
exit $rc
"""


def sdxl_bench_mounted(engine_dir: Path, how: str, args: list[str], fault: str = "") -> tuple[Run, list[str]]:
    """`sdxl-bench` with the engine dir mounted as `how` (a tmpfs size, or "ro"); returns the run and
    what the engine dir held afterwards."""
    listing = engine_dir.parent / "listing.txt"
    run = sdxl_bench(
        args, fault, prefix=(*NAMESPACE, "sh", "-c", MOUNT_AND_RUN, "sh", str(engine_dir), how, str(listing))
    )
    assert run.returncode != 97, f"mounting failed: {run.stderr[-500:]}"
    return run, listing.read_text().split()


@pytest.mark.parametrize("disk", ["injected", "tmpfs"])
def test_a_full_disk_is_one_line_and_leaves_nothing(disk, tmp_path):
    engine_dir, out = tmp_path / "engines", tmp_path / "out"
    engine_dir.mkdir()
    args = txt2img(FP16, engine_dir, out)
    if disk == "injected":  # the safetensors writer fails with ENOSPC halfway through the weights
        run, left = sdxl_bench(args, fault="enospc"), [p.name for p in engine_dir.iterdir()]
    else:  # a 512 KiB tmpfs: the engine's weights do not fit
        if NAMESPACE is None:
            pytest.skip(NO_NAMESPACE)
        run, left = sdxl_bench_mounted(engine_dir, "512k", args)
    assert run.returncode == 2
    assert "not written: cannot write" in run.error_line() and "no space left" in run.error_line().lower()
    assert left == [f"{key_of(FP16)}.lock"]  # nothing half-written: no temp dir, no engine
    mode, seconds = build_in_process(FP16, engine_dir)  # with room again
    assert mode == "built" and leftovers(engine_dir) == []
    assert_whole(engine_dir, FP16)
    print(f"full disk ({disk}): {run.seconds:.1f} s, rerun {seconds:.1f} s")


@pytest.fixture
def read_only(tmp_path):
    """Run `sdxl-bench` with a directory read-only: a read-only bind mount where mount namespaces are
    allowed, else (not root) the directory made unwritable."""

    def run(engine_dir: Path, args: list[str]) -> Run:
        if NAMESPACE is not None:
            return sdxl_bench_mounted(engine_dir, "ro", args)[0]
        if os.geteuid() == 0:
            pytest.skip(f"{NO_NAMESPACE}; root writes through file modes")
        modes = {p: p.stat().st_mode for p in [engine_dir, *engine_dir.rglob("*")]}
        try:
            for p in modes:
                p.chmod(modes[p] & ~0o222)
            return sdxl_bench(args)
        finally:
            for p, mode in modes.items():
                p.chmod(mode)

    return run


def test_a_read_only_engine_dir_loads_and_runs(tmp_path, read_only):
    engine_dir, out = tmp_path / "engines", tmp_path / "out"
    build_in_process(FP16, engine_dir)
    before = sorted(str(p.relative_to(engine_dir)) for p in engine_dir.rglob("*"))
    loaded = read_only(engine_dir, txt2img(FP16, engine_dir, out, "--no-build"))
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert mode_of(out, FP16) == "loaded" and list(out.glob("*.png"))
    reused = read_only(engine_dir, txt2img(FP16, engine_dir, tmp_path / "out2"))  # building allowed, not needed
    assert reused.returncode == 0 and mode_of(tmp_path / "out2", FP16) == "loaded", reused.stderr[-2000:]
    larger = FP16.replace(height=128, width=128)  # another engine, which would have to be built there
    refused = read_only(engine_dir, txt2img(larger, engine_dir, out))
    assert refused.returncode == 2
    assert f"cannot build engine {key_of(larger)}: {engine_dir} is not writable" in refused.error_line()
    assert sorted(str(p.relative_to(engine_dir)) for p in engine_dir.rglob("*")) == before
    print(f"read-only dir: load {loaded.seconds:.1f} s, refused build {refused.seconds:.1f} s")


# --------------------------------------------------------------------------- a tampered engine


def test_a_tampered_compile_cache_runs_no_code_through_the_cli(tmp_path, monkeypatch):
    """`txt2img --no-build` as a GPU runner runs it (compiling), on an engine signed by the CI's key whose
    compile cache an attacker replaced and re-hashed: exit 2, one line, and the payload never ran."""
    from tests.unit.test_engine_trust import marker_payload, plant

    engine_dir, marker = tmp_path / "engines", tmp_path / "marker"
    monkeypatch.setenv(store.KEY_ENV, KEY)
    build_in_process(FP16, engine_dir)
    plant(engine_dir / key_of(FP16), marker_payload(marker), listed=True)
    run = sdxl_bench(txt2img(FP16, engine_dir, tmp_path / "out", "--no-build"), fault="compile", **{store.KEY_ENV: KEY})
    assert run.returncode == 2
    assert f"its {store.SIGNATURE} does not match {store.KEY_ENV}" in run.error_line()
    assert not marker.exists()
    print(f"tampered compile cache: {run.seconds:.1f} s")


def test_a_dropped_in_compile_cache_is_ignored_through_the_cli(tmp_path):
    from tests.unit.test_engine_trust import marker_payload, plant

    engine_dir, out, marker = tmp_path / "engines", tmp_path / "out", tmp_path / "marker"
    build_in_process(FP16, engine_dir)
    plant(engine_dir / key_of(FP16), marker_payload(marker), listed=False)
    run = sdxl_bench(txt2img(FP16, engine_dir, out, "--no-build"), fault="compile")
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(_report_file(out, FP16).read_text())["engine"]
    assert report["compile_cache"] == "none in the engine" and not marker.exists()
    print(f"dropped-in compile cache: {run.seconds:.1f} s")
