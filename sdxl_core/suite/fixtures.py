"""Session fixtures: one engine per variant per session, built once (or found in --engine-dir) and reused."""

from __future__ import annotations

import os
import time

import pytest

from sdxl_core.hardware import is_hopper
from sdxl_core.startup import Startup
from sdxl_core.suite import summary
from sdxl_core.suite.plugin import HARDWARE, probe_hardware, selected_variants
from sdxl_core.suite.summary import ENGINE_RECORDS


@pytest.fixture(scope="session", autouse=True)
def _one_cpu_thread_per_worker(hardware):
    """On the CPU the tiny model's ops are too small to gain from threads, and xdist already runs one worker
    per core: spinning OpenMP threads on a busy 2-core machine made a tiny forward pass 60x slower."""
    if hardware["cuda"]:
        yield
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def hardware(pytestconfig) -> dict:
    return pytestconfig.stash.get(HARDWARE, None) or probe_hardware()


def pytest_generate_tests(metafunc):
    if "variant_engine" in metafunc.fixturenames:
        metafunc.parametrize("variant_engine", selected_variants(metafunc.config), indirect=True)
    if "sweep_prompt" in metafunc.fixturenames:
        from sdxl_core.suite.plugin import PROMPTS
        from sdxl_core.suite.sweep import prompt_id

        prompts = metafunc.config.stash[PROMPTS]
        metafunc.parametrize("sweep_prompt", prompts, ids=[prompt_id(index) for index, _ in prompts])


@pytest.fixture(scope="session")
def suite_model(pytestconfig, hardware) -> str:
    return pytestconfig.getoption("--model") or ("sdxl-random" if hardware["cuda"] else "tiny")


@pytest.fixture(scope="session")
def suite_device(hardware):
    import torch

    return torch.device("cuda" if hardware["cuda"] else "cpu")


def _shared_dir(tmp_path_factory, option_value, name):
    """--engine-dir / --onnx-dir, else one dir that every xdist worker of this run shares."""
    if option_value:
        return option_value
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


@pytest.fixture(scope="session")
def engine_dir(pytestconfig, tmp_path_factory) -> str:
    return _shared_dir(tmp_path_factory, pytestconfig.getoption("--engine-dir"), "engines")


@pytest.fixture(scope="session")
def onnx_dir(pytestconfig, tmp_path_factory) -> str:
    return _shared_dir(tmp_path_factory, pytestconfig.getoption("--onnx-dir"), "onnx")


@pytest.fixture(scope="session")
def suite_variant(suite_model, engine_dir, pytestconfig):
    """Variant name -> the variant as this suite runs it on `suite_model`.

    On `tiny` (CPU) as every command runs it (variants.py's builtin_defaults). On the built-in random models the
    LCM-LoRA variant uses a random LoRA the suite makes itself; on real models the variant table as it is.
    """
    from sdxl_core.variants import get_variant, on_model

    def make(name: str):
        variant = on_model(get_variant(name), suite_model)
        if variant.lora_path and suite_model in ("tiny", "sdxl-random"):
            # Random weights take a random LoRA of the real one's targets (the LCM-LoRA can't be downloaded here).
            variant = variant.replace(lora_path=str(_random_lora(engine_dir, suite_model)))
        if pytestconfig.getoption("--backend") == "torch" and pytestconfig.getoption("--fused-qkv") == "on":
            variant = variant.replace(fused_qkv=True)
        if pytestconfig.getoption("--calibration-size"):
            variant = variant.replace(calibration_size=pytestconfig.getoption("--calibration-size"))
        return variant

    return make


def _random_lora(engine_dir: str, model: str):
    from pathlib import Path

    from sdxl_core.files import build_lock
    from sdxl_core.models import make_builtin_lora

    directory = Path(engine_dir) / f"{model}-lora"
    with build_lock(directory):
        if not (directory / "pytorch_lora_weights.safetensors").exists():
            directory.mkdir(parents=True, exist_ok=True)
            make_builtin_lora(model, directory)
    return directory / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="session")
def engine_cache():
    return {}


@pytest.fixture(scope="session")
def build_engine(suite_variant, suite_device, engine_dir, onnx_dir, pytestconfig, engine_cache, hardware):
    """(name, **changes) -> run.Run (variant, components, engines; `generate`), built once per session (the file lock
    keeps xdist workers from building twice). `changes` are Variant fields (`batch_size=2`): another engine."""
    from sdxl_core import run

    threads = None if hardware["cuda"] else 1  # as _one_cpu_thread_per_worker: xdist runs a worker per core
    options = run.Options(engine_dir=engine_dir, onnx_dir=onnx_dir, threads=threads, progress=False)

    def build(name: str, **changes) -> run.Run:
        if not engine_cache:  # the first engine of the session: nvcc starts on what the 8-bit ones need
            run.start_kernel_builds([suite_variant(n) for n in selected_variants(pytestconfig)], suite_device)
        label = " ".join([name, *(f"{k}={v}" for k, v in sorted(changes.items()))])
        if label not in engine_cache:
            variant = suite_variant(name).replace(backend=pytestconfig.getoption("--backend"), **changes)
            started = time.perf_counter()
            startup = Startup()
            try:
                ready = run.prepare(variant, options, device=suite_device, startup=startup)
            except Exception as exc:
                # Every Hopper card has 80 GB or more, where every variant fits: an OOM there is a failure.
                # A smaller card lacks the hardware, and the skip names it.
                if type(exc).__name__ == "OutOfMemoryError" and not is_hopper(hardware["capability"]):
                    pytest.skip(
                        f"GPU out of memory building {name} on {hardware['name']}: needs a card with more "
                        f"free memory (a Hopper GPU)"
                    )
                raise
            ENGINE_RECORDS.append(
                {
                    "variant": label,
                    "mode": ready.info.mode,
                    "worker": os.environ.get("PYTEST_XDIST_WORKER", "this process"),
                    "seconds": round(time.perf_counter() - started, 1),
                    "phases": {phase: round(t, 1) for phase, t in startup.seconds.items()},
                    "calibration": ready.info.calibration,
                    "nvcc_s": ready.info.kernel_build_s,
                }
            )
            summary.show_engine(pytestconfig, ENGINE_RECORDS[-1])
            engine_cache[label] = ready
        return engine_cache[label]

    return build


@pytest.fixture(scope="session")
def variant_engine(request, build_engine):
    return build_engine(request.param)
