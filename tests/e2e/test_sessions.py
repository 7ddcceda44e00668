"""The nox sessions and the suite's pytest options as a new user meets them: they work, or refuse in one line."""

import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# What a Python without PyTorch looks like to `import torch` and to importlib.util.find_spec("torch").
WITHOUT_TORCH = "import sys; sys.modules['torch'] = None; "


def run_nox(*args, without_torch=False):
    code = (WITHOUT_TORCH if without_torch else "") + "from nox.__main__ import main; main()"
    return subprocess.run(
        [sys.executable, "-c", code, "-f", str(REPO / "noxfile.py"), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )


def own_lines(stderr: str) -> list[str]:
    """stderr less nox's own log lines (`nox > Running session ...`)."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("nox >")]


def history_files() -> set:
    return {str(p) for p in (REPO / ".benchmarks").rglob("*")} if (REPO / ".benchmarks").exists() else set()


def test_gpu_bench_refuses_in_seconds_without_a_gpu(hardware, record_property):
    if hardware["cuda"]:
        pytest.skip("needs a machine without a CUDA GPU: with one, gpu_bench runs the benchmarks")
    engines_existed, history = (REPO / "engines").exists(), history_files()
    started = time.perf_counter()
    done = run_nox("-s", "gpu_bench")
    seconds = time.perf_counter() - started
    record_property("ms", round(seconds * 1000))
    assert done.returncode == 2, done.stderr
    lines = own_lines(done.stderr)
    assert len(lines) == 1 and "PyTorch sees no CUDA GPU" in lines[0] and "--allow-cpu" in lines[0], done.stderr
    assert seconds < 60
    assert (REPO / "engines").exists() == engines_existed and history_files() == history


def test_gpu_bench_on_the_cpu_saves_no_history(hardware):
    """`-- --allow-cpu` (debugging) runs the bench tests on tiny with temp engine dirs and no history."""
    if hardware["cuda"]:
        pytest.skip("needs a machine without a CUDA GPU: with one, --allow-cpu changes nothing")
    history = history_files()
    done = run_nox("-s", "gpu_bench", "--", "--allow-cpu", "--co", "-q", "-p", "no:cacheprovider")
    assert done.returncode == 0, done.stderr
    assert "--benchmark-autosave" not in done.stderr and "--model=tiny" in done.stderr  # nox logs the command
    assert history_files() == history


def test_gpu_bench_passes_values_in_one_argument_and_saves_only_gpu_numbers():
    sys.path.insert(0, str(REPO))
    try:
        import noxfile
    finally:
        sys.path.remove(str(REPO))
    env = {"SDXL_BENCH_ENGINE_DIR": "/abs/engines", "SDXL_BENCH_ONNX_DIR": "/abs/onnx"}
    gpu = noxfile.gpu_bench_args(env, on_gpu=True, history_has_runs=True)
    assert {
        "--engine-dir=/abs/engines",
        "--onnx-dir=/abs/onnx",
        "--model=sdxl-random",
        "--benchmark-autosave",
        "--benchmark-compare-fail=median:10%",
    } <= set(gpu)
    assert not [arg for arg in gpu if arg.startswith("/")], "a bare path would become pytest's rootdir"
    cpu = noxfile.gpu_bench_args(env, on_gpu=False, history_has_runs=True)
    assert not [arg for arg in cpu if arg.startswith(("--benchmark", "--engine-dir", "--onnx-dir"))]


def test_gpu_bench_runs_one_worker_per_gpu_unless_told_otherwise():
    sys.path.insert(0, str(REPO))
    try:
        import noxfile
    finally:
        sys.path.remove(str(REPO))
    eight = noxfile.gpu_bench_args({}, on_gpu=True, history_has_runs=False, gpus=8)
    assert eight[eight.index("-n") + 1] == "8"
    assert "-n" not in noxfile.gpu_bench_args({}, on_gpu=True, history_has_runs=False, gpus=1)
    assert "-n" not in noxfile.gpu_bench_args({}, on_gpu=False, history_has_runs=False, gpus=8)
    for own in (["--gpus", "2"], ["--gpus=2"], ["-n", "4"], ["-n4"], ["--numprocesses=4"], ["-p", "no:xdist"]):
        assert noxfile._chooses_workers(own), own
    assert not noxfile._chooses_workers(["--backend", "tensorrt", "--variants=xl-1.0-fp16,xl-1.0-int8"])


@pytest.mark.parametrize("session", ["quality", "baselines", "compare", "gpu_bench"])
def test_sessions_refuse_in_one_line_where_pytorch_is_missing(session):
    done = run_nox("-s", session, without_torch=True)
    assert done.returncode == 2, done.stderr
    lines = own_lines(done.stderr)
    assert len(lines) == 1 and "lacks PyTorch" in lines[0] and "-m pip install -e '.[dev]'" in lines[0], done.stderr


def test_quality_session_runs_where_the_project_is_installed():
    done = run_nox("-s", "quality", "--", "--co", "-q", "-p", "no:cacheprovider")
    assert done.returncode == 0, done.stderr
    assert "tests collected" in done.stdout


def test_pytest_without_pytorch_is_one_line():
    code = WITHOUT_TORCH + "import pytest; sys.exit(pytest.main(['-m', 'quality', '-p', 'no:cacheprovider']))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == pytest.ExitCode.USAGE_ERROR, done.stdout + done.stderr
    assert "INTERNALERROR" not in done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "No module named 'torch'" in lines[0] and "pip install -e '.[dev]'" in lines[0]


def test_the_options_plugin_is_registered_for_any_path():
    """addopts loads it where pytest finds pyproject.toml; the entry point where the package is installed."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert config["project"]["entry-points"]["pytest11"] == {"sdxl_core.suite.plugin": "sdxl_core.suite.plugin"}
    assert "-p sdxl_core.suite.plugin" in config["tool"]["pytest"]["ini_options"]["addopts"]


@pytest.mark.parametrize("form", ["--opt=value", "installed plugin"])
def test_suite_options_survive_an_existing_absolute_engine_dir(form, tmp_path):
    """Run twice: the first run finds no engine dir; a run that builds leaves one, which the second run finds.
    Pytest took an existing directory given as `--engine-dir /abs/dir` for a test path and rooted itself there.
    With `--engine-dir=/abs/dir` it roots in the checkout; given apart, the options still load where the package's
    entry point loads the plugin (here `-p` on the command line does what the entry point does)."""
    engine_dir = tmp_path / "engines"
    args = (
        [f"--engine-dir={engine_dir}"]
        if form == "--opt=value"
        else ["-p", "sdxl_core.suite.plugin", "--engine-dir", str(engine_dir)]
    )
    for _ in range(2):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                *args,
                "--co",
                "-q",
                "-p",
                "no:cacheprovider",
                "--ignore-glob=*/test_[!v]*.py",
            ],  # collect test_variants.py only: quick
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=300,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "unrecognized arguments" not in done.stderr and "tests collected" in done.stdout
        engine_dir.mkdir(exist_ok=True)


def test_gpu_reuse_refuses_in_one_line_without_a_gpu(hardware):
    if hardware["cuda"]:
        pytest.skip("needs a machine without a CUDA GPU: with one, gpu_reuse builds engines")
    done = run_nox("-s", "gpu_reuse")
    assert done.returncode == 2, done.stderr
    lines = own_lines(done.stderr)
    assert len(lines) == 1 and "PyTorch sees no CUDA GPU" in lines[0], done.stderr


def collected(marker: str) -> set[str]:
    command = [sys.executable, "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider", "-m", marker, "tests/suite"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
    return {line.split("::")[0] for line in done.stdout.splitlines() if "::" in line}


def test_gpu_bench_waits_for_no_precompiled_reuse_builds():
    """The reuse test builds an engine per variant in its own processes: `-m reuse` (gpu_reuse), not `-m bench`."""
    assert "tests/suite/test_reuse.py" not in collected("bench")
    assert collected("reuse") == {"tests/suite/test_reuse.py"}
