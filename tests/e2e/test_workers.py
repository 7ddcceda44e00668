"""The suite on several GPUs, checked on the CPU with fake devices: which GPU each pytest-xdist worker gets,
the refusal to time on a shared GPU, the variant groups that keep each engine on one worker, and benchmark
results that come home from workers as one run (the rules are in sdxl_core/suite/workers.py).

A fake device is a `CUDA_VISIBLE_DEVICES` entry on a machine without CUDA: the plugin maps and pins workers by
these names alone, so the pinning is what a GPU host gets; nothing here needs a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sdxl_core.errors import UserError
from sdxl_core.suite import workers

REPO = Path(__file__).resolve().parents[2]
UUID_A, UUID_B = "GPU-8932f937-d72c-4106-c12f-20bd9faed9f6", "GPU-1a2b3c4d-0000-1111-2222-333344445555"
NVIDIA_SMI = """\
GPU 0: NVIDIA H200 (UUID: GPU-8932f937-d72c-4106-c12f-20bd9faed9f6)
GPU 1: NVIDIA H200 (UUID: GPU-1a2b3c4d-0000-1111-2222-333344445555)
  MIG 3g.71gb     Device  0: (UUID: MIG-5c8e2a47-4f1b-5d2e-9a77-0c3f2b1e8d90)
GPU 2: NVIDIA H200 (UUID: GPU-0f0f0f0f-1111-2222-3333-444455556666)
"""


def run_pytest(*args, cwd, gpus: str | None, timeout: int = 300, **env_vars) -> subprocess.CompletedProcess:
    """pytest in a child with `gpus` as its CUDA_VISIBLE_DEVICES (None: unset), free of this run's xdist state."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST") and k != "CUDA_VISIBLE_DEVICES"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.update(env_vars)
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpus
    # Without hypothesis's plugin a worker starts in a second instead of six on a busy 2-core machine.
    quick = ("-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-p", "no:anyio")
    return subprocess.run(
        [sys.executable, "-m", "pytest", *quick, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ---------------------------------------------------------------------------------------------------------------
# The mapping, as pure functions.


@pytest.mark.parametrize(
    "value, devices",
    [
        ("0,1,2,3", ["0", "1", "2", "3"]),
        ("3, 1", ["3", "1"]),
        (f"{UUID_A},{UUID_B}", [UUID_A, UUID_B]),
        ("MIG-5c8e2a47-4f1b-5d2e-9a77-0c3f2b1e8d90", ["MIG-5c8e2a47-4f1b-5d2e-9a77-0c3f2b1e8d90"]),
        ("0,1,oops,2", ["0", "1"]),  # CUDA stops at the first entry that names no device
        ("-1", []),
        ("", []),
    ],
)
def test_cuda_visible_devices_read_as_cuda_reads_them(value, devices):
    assert workers.parse_visible_devices(value) == devices


def test_gpus_come_from_cuda_visible_devices_else_nvidia_smi():
    assert workers.parse_nvidia_smi(NVIDIA_SMI) == ["0", "1", "2"]  # the MIG line is not a GPU of its own
    assert workers.visible_gpus({}, nvidia_smi=NVIDIA_SMI) == ["0", "1", "2"]
    assert workers.visible_gpus({"CUDA_VISIBLE_DEVICES": "2"}, nvidia_smi=NVIDIA_SMI) == ["2"]
    assert workers.visible_gpus({"CUDA_VISIBLE_DEVICES": ""}, nvidia_smi=NVIDIA_SMI) == []
    assert workers.visible_gpus({}, nvidia_smi="") == []


@pytest.mark.parametrize(
    "visible, n_workers, devices",
    [
        ([str(i) for i in range(8)], 8, {f"gw{i}": str(i) for i in range(8)}),
        (["4", "5", "6", "7"], 2, {"gw0": "4", "gw1": "5"}),
        ([UUID_A, UUID_B], 2, {"gw0": UUID_A, "gw1": UUID_B}),
        (["0", "1"], 4, {"gw0": "0", "gw1": "1", "gw2": "0", "gw3": "1"}),  # shared: timing refuses
        ([], 2, {}),  # no GPU: workers run unpinned (the CPU suite)
    ],
)
def test_worker_devices(visible, n_workers, devices):
    assert workers.worker_devices(visible, n_workers) == devices


def test_gpus_option_takes_the_first_n_and_refuses_more_than_there_are():
    assert workers.limit_gpus(["2", "3", "5"], 2) == ["2", "3"]
    assert workers.limit_gpus(["2", "3", "5"], None) == ["2", "3", "5"]
    with pytest.raises(UserError, match=r"^--gpus 4: this machine shows 3 GPUs \(CUDA_VISIBLE_DEVICES='2,3,5'\)$"):
        workers.limit_gpus(["2", "3", "5"], 4, workers.describe(["2", "3", "5"], {"CUDA_VISIBLE_DEVICES": "2,3,5"}))
    with pytest.raises(UserError, match="at least 1"):
        workers.limit_gpus(["0"], 0)


def test_contention_is_one_line_naming_the_workers_and_the_fix():
    devices = workers.worker_devices(["0", "1"], 3)
    assert workers.contention(devices, "gw1") is None
    assert (
        workers.contention(devices, "gw0")
        == workers.contention(devices, "gw2")
        == (
            "pytest workers gw0, gw2 share GPU 0: timing would measure contention; run one worker per GPU (-n 2) "
            "or --gpus 1"
        )
    )
    assert workers.contention({}, "gw0") is None and workers.contention(devices, None) is None


def test_plain_nodeid_drops_the_loadgroup_suffix_only():
    assert workers.plain_nodeid("tests/t.py::test_a[xl-1.0-int8]@xl-1.0-int8") == "tests/t.py::test_a[xl-1.0-int8]"
    assert workers.plain_nodeid("tests/t.py::test_b@quality") == "tests/t.py::test_b"
    assert workers.plain_nodeid("tests/t.py::test_c[a.b-1]") == "tests/t.py::test_c[a.b-1]"


# ---------------------------------------------------------------------------------------------------------------
# Workers started by pytest, on fake devices.

SEEN = textwrap.dedent("""
    import os
    from pathlib import Path

    import pytest


    @pytest.mark.parametrize("i", range(8))
    def test_sees_its_gpu(i):
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        Path(os.environ["SEEN_DIR"], f"{worker}-{i}").write_text(os.environ.get("CUDA_VISIBLE_DEVICES", "unset"))


    @pytest.mark.bench
    def test_timed():
        pass
""")


def seen(directory: Path) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in directory.iterdir():
        found.setdefault(path.name.split("-")[0], set()).add(path.read_text())
    return found


@pytest.mark.parametrize(
    "gpus, args, expected",
    [
        (f"{UUID_A},{UUID_B}", ["-n", "2"], {"gw0": {UUID_A}, "gw1": {UUID_B}}),
        ("4,5,6,7", ["--gpus", "2"], {"gw0": {"4"}, "gw1": {"5"}}),  # --gpus N starts N workers
        ("0,1,2", ["-n", "auto"], {"gw0": {"0"}, "gw1": {"1"}, "gw2": {"2"}}),  # auto: one worker per GPU
        ("3,1", ["--gpus", "1"], {"main": {"3"}}),  # one process, pinned to the first GPU
    ],
    ids=["uuids", "gpus-2", "auto", "gpus-1"],
)
def test_each_worker_sees_only_its_own_gpu(tmp_path, gpus, args, expected):
    (tmp_path / "test_seen.py").write_text(SEEN)
    (tmp_path / "seen").mkdir()
    done = run_pytest(
        "-p",
        "sdxl_core.suite.plugin",
        "test_seen.py",
        "-k",
        "sees",
        *args,
        cwd=tmp_path,
        gpus=gpus,
        SEEN_DIR=str(tmp_path / "seen"),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    found = seen(tmp_path / "seen")
    assert set(found) <= set(expected) and all(found[w] == expected[w] for w in found), found
    if "main" not in expected:
        assert f"created: {len(expected)}/{len(expected)} workers" in done.stdout
    if "main" not in expected:
        assert "sdxl-bench: gw0 -> GPU " in done.stdout  # the header shows the map


def test_more_gpus_than_the_machine_shows_is_one_line(tmp_path):
    (tmp_path / "test_seen.py").write_text(SEEN)
    done = run_pytest("-p", "sdxl_core.suite.plugin", "test_seen.py", "--gpus", "3", cwd=tmp_path, gpus="0,1")
    assert done.returncode == pytest.ExitCode.USAGE_ERROR, done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == ["ERROR: --gpus 3: this machine shows 2 GPUs (CUDA_VISIBLE_DEVICES='0,1')"], done.stderr


def test_timing_refuses_where_two_workers_share_a_gpu(tmp_path):
    """Two workers on one GPU: the timing test fails (not skips) with one line; other tests run."""
    (tmp_path / "test_seen.py").write_text(SEEN)
    (tmp_path / "seen").mkdir()
    done = run_pytest(
        "-p",
        "sdxl_core.suite.plugin",
        "test_seen.py",
        "-n",
        "2",
        "-rf",
        cwd=tmp_path,
        gpus="0",
        SEEN_DIR=str(tmp_path / "seen"),
    )
    assert done.returncode == pytest.ExitCode.TESTS_FAILED, done.stdout + done.stderr
    assert "1 failed, 8 passed" in done.stdout
    line = (
        "pytest workers gw0, gw1 share GPU 0: timing would measure contention; run one worker per GPU (-n 1) "
        "or --gpus 1"
    )
    assert f"\n{line}\n" in done.stdout  # the whole failure, without a traceback
    assert "FAILED test_seen.py::test_timed" in done.stdout
    assert "GPUs shared: timing tests refuse" in done.stdout
    # ...and with a GPU each, it times.
    done = run_pytest(
        "-p", "sdxl_core.suite.plugin", "test_seen.py", "-n", "2", "-k", "timed", cwd=tmp_path, gpus="0,1"
    )
    assert done.returncode == 0, done.stdout + done.stderr


# ---------------------------------------------------------------------------------------------------------------
# Benchmark histories: the same run from one process and from two workers.

BENCH = textwrap.dedent("""
    import pytest


    def test_sum(benchmark):
        benchmark.extra_info["n"] = 100
        benchmark(sum, range(100))


    @pytest.mark.xdist_group("sorting")
    @pytest.mark.parametrize("n", [10, 100])
    def test_sorted(benchmark, n):
        benchmark.pedantic(sorted, args=(list(range(n, 0, -1)),), rounds=5)
""")
BUDGET = ("--benchmark-max-time=0.005", "--benchmark-min-rounds=3", "--benchmark-warmup=off")


def _shape(path: Path) -> list[dict]:
    """A saved run without its timings: what must not depend on how many workers made it."""
    return [
        {k: v for k, v in bench.items() if k != "stats"} | {"rounds": bench["stats"]["rounds"] > 0}
        for bench in json.loads(path.read_text())["benchmarks"]
    ]


def test_benchmarks_from_two_workers_save_and_print_one_run_as_one_process_does(tmp_path):
    (tmp_path / "test_bench.py").write_text(BENCH)
    one = run_pytest(
        "-p",
        "sdxl_core.suite.plugin",
        "-p",
        "no:xdist",
        "test_bench.py",
        *BUDGET,
        "--benchmark-json=one.json",
        cwd=tmp_path,
        gpus=None,
    )
    assert one.returncode == 0, one.stdout + one.stderr
    two = run_pytest(
        "-p",
        "sdxl_core.suite.plugin",
        "-n",
        "2",
        "test_bench.py",
        *BUDGET,
        "--benchmark-json=two.json",
        "--benchmark-autosave",
        "--benchmark-storage=store",
        cwd=tmp_path,
        gpus="0,1",
    )
    assert two.returncode == 0, two.stdout + two.stderr
    assert _shape(tmp_path / "one.json") == _shape(tmp_path / "two.json")  # names without "@sorting", order, info
    assert [b["fullname"] for b in json.loads((tmp_path / "two.json").read_text())["benchmarks"]] == [
        "test_bench.py::test_sum",
        "test_bench.py::test_sorted[10]",
        "test_bench.py::test_sorted[100]",
    ]
    saved = list((tmp_path / "store").glob("*/*.json"))
    assert len(saved) == 1 and _shape(saved[0]) == _shape(tmp_path / "one.json")  # one history file, not one a worker
    assert "benchmark: 3 tests" in two.stdout and "automatically disabled" not in two.stdout + two.stderr
    # The next run is gated against the saved one across workers too: make the saved run impossibly fast.
    history = json.loads(saved[0].read_text())
    for bench in history["benchmarks"]:
        bench["stats"]["min"] = 1e-12
    saved[0].write_text(json.dumps(history))
    again = run_pytest(
        "-p",
        "sdxl_core.suite.plugin",
        "-n",
        "2",
        "test_bench.py",
        *BUDGET,
        "--benchmark-storage=store",
        "--benchmark-compare",
        "--benchmark-compare-fail=min:10%",
        cwd=tmp_path,
        gpus="0,1",
    )
    assert again.returncode != 0, again.stdout + again.stderr
    assert "Performance has regressed" in again.stdout + again.stderr
    assert again.stdout.count("test_sorted[100]") >= 2  # the table lists NOW against the saved run


# ---------------------------------------------------------------------------------------------------------------
# The suite's own tests: grouped so that each variant's engine lives on one worker.

GROUPED = textwrap.dedent("""
    import pytest


    @pytest.mark.xdist_group("engine")
    @pytest.mark.parametrize("i", range(6))
    def test_grouped(i):
        pass


    @pytest.mark.parametrize("i", range(4))
    def test_free(i):
        pass
""")


def test_a_loadgroup_group_runs_on_one_worker(tmp_path):
    """Where -n is given without --dist, the plugin makes it `loadgroup`, and its groups hold under pytest 9.2."""
    (tmp_path / "test_grouped.py").write_text(GROUPED)
    done = run_pytest("-p", "sdxl_core.suite.plugin", "test_grouped.py", "-n", "2", "-v", cwd=tmp_path, gpus=None)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "scheduling tests via LoadGroupScheduling" in done.stdout
    ran_on = {line.split()[0] for line in done.stdout.splitlines() if "PASSED" in line and "test_grouped[" in line}
    assert len(ran_on) == 1 and done.stdout.count("@engine") >= 6, done.stdout


GROUPS = textwrap.dedent("""
    def pytest_collection_finish(session):
        for item in session.items:
            groups = sorted(str(m.args[0]) for m in item.iter_markers("xdist_group"))
            print("GROUP", item.nodeid, ",".join(groups) or "-")
""")


def collected_groups(tmp_path, *args) -> dict[str, str]:
    (tmp_path / "print_groups.py").write_text(GROUPS)
    env_path = f"{tmp_path}{os.pathsep}{REPO}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")} | {"PYTHONPATH": env_path}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--co",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "print_groups",
            "-p",
            "no:hypothesispytest",
            "tests/suite/test_latency.py",
            "tests/suite/test_quality.py",
            *args,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {
        line.split()[1].split("::")[1]: line.split()[2]
        for line in done.stdout.splitlines()
        if line.startswith("GROUP ")
    }


def test_tests_of_one_variant_share_a_worker_and_sweep_prompts_spread(tmp_path):
    groups = collected_groups(tmp_path, "--prompts=2")
    assert (
        groups["test_unet_step_latency[xl-1.0-int8]"] == groups["test_pipeline_latency[xl-1.0-int8]"] == "xl-1.0-int8"
    )
    # Gates and size checks need FP16 too: they go with their 8-bit variant, which loads FP16 beside it.
    assert groups["test_8bit_speedup_gate_on_hopper[fp8---min-fp8-speedup]"] == "xl-1.0-fp8"
    assert groups["test_8bit_engine_weights_fit_in_55_percent_of_fp16[int8]"] == "xl-1.0-int8"
    assert groups["test_matches_own_baseline[xl-turbo-case1]"] == groups["test_unet_step_latency[xl-turbo]"]
    assert groups["test_8bit_close_to_fp16[xl-1.0-fp8-case0]"] == "xl-1.0-fp8"
    assert groups["test_sweep_8bit_close_to_fp16[p063-xl-1.0-int8]"] == "-"  # prompts spread over workers
    assert groups["test_hardware_slug[cpu-cpu]"] == "-"
    # With --update-baselines one worker renders and writes the whole baseline.
    updating = collected_groups(tmp_path, "--prompts=2", "--update-baselines")
    assert {
        g for name, g in updating.items() if name.startswith(("test_matches", "test_8bit_close", "test_sweep"))
    } == {"quality"}


def test_every_module_collects_without_xdist():
    """`-p no:xdist` (one process, as the quality baselines are made): modules that group their tests with
    `xdist_group` still collect under --strict-markers."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:xdist",
            "-p",
            "no:cacheprovider",
            "--collect-only",
            "-q",
            "tests/unit/test_trt_api.py",
            "tests/e2e/test_workers.py",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-2000:]
    assert "xdist_group" not in done.stdout + done.stderr
