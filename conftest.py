"""Hardware probing and session fixtures (the suite's options are in `sdxl_core/pytest_plugin.py`).

Hardware is probed once: tests marked `gpu` skip where PyTorch sees no CUDA device, `hopper` (alias `h100`)
where the card is not a Hopper GPU (compute capability 9.0: H100, H200), `tensorrt` where the TensorRT
builder is not importable.
"""

from __future__ import annotations

import importlib.util
import os
import time

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing downloads at test time


def _hardware() -> dict:
    import torch

    cuda = torch.cuda.is_available()
    capability = torch.cuda.get_device_capability() if cuda else None
    return {
        "cuda": cuda,
        "name": torch.cuda.get_device_name() if cuda else "cpu",
        "capability": capability,
        "tensorrt": importlib.util.find_spec("tensorrt") is not None,
    }


@pytest.hookimpl(tryfirst=True)  # before xdist's loadgroup reads the xdist_group markers
def pytest_collection_modifyitems(config, items):
    hw = _hardware()
    config.stash[HARDWARE] = hw
    reasons = {
        "gpu": None if hw["cuda"] else "needs a CUDA GPU (PyTorch sees none)",
        "hopper": (None if hw["capability"] == (9, 0)
                   else f"needs a Hopper GPU (sm_90: H100, H200); this is {hw['name']}"),
        "tensorrt": None if hw["tensorrt"] else "needs TensorRT (pip install 'sdxl-bench[trt]')",
    }
    reasons["h100"] = reasons["hopper"]
    _deselect_unselected_variants(config, items)
    _group_by_variant(config, items)
    for item in items:
        for marker, reason in reasons.items():
            if reason and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))
                break


HARDWARE = pytest.StashKey[dict]()


def _deselect_unselected_variants(config, items) -> None:
    """`--variants` limits the engines a run builds: a test marked `needs_variants(...)` (a speed gate builds FP16
    and one 8-bit engine) is deselected when the run did not select all of them, rather than building them."""
    if not config.getoption("--variants"):
        return
    selected = set(_selected_variants(config))
    keep, drop = [], []
    for item in items:
        marker = item.get_closest_marker("needs_variants")
        (drop if marker and not set(marker.args) <= selected else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def variant_group(item) -> str | None:
    """The variant whose engine a test uses, or None. Under `--dist loadgroup` (pytest-xdist) the tests of one
    variant run on one worker (`xdist_group`), so each engine is built or loaded once, on one GPU. A test that
    needs two engines (FP16 and an 8-bit one, `needs_variants`) goes with the 8-bit one, whose worker loads FP16
    from the shared engine dir. The quality sweep's items (one per prompt) spread over all workers instead."""
    if "sweep_prompt" in getattr(item, "fixturenames", ()):
        return None
    callspec = getattr(item, "callspec", None)
    if callspec and "variant_engine" in callspec.params:
        return callspec.params["variant_engine"]
    marker = item.get_closest_marker("needs_variants")
    if marker and marker.args:
        return next((name for name in marker.args if name != FP16), marker.args[0])
    return None


def _group_by_variant(config, items) -> None:
    """With --update-baselines one worker renders and writes every baseline: the quality tests stay together.
    Without pytest-xdist (`-p no:xdist`) there are no groups, and no `xdist_group` marker to use."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        if config.getoption("--update-baselines") and item.get_closest_marker("quality"):
            item.add_marker(pytest.mark.xdist_group("quality"))
            continue
        group = variant_group(item)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))


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
    return pytestconfig.stash.get(HARDWARE, None) or _hardware()


# ----------------------------------------------------------------------------------------------------------------
# Engine fixtures: one engine per variant per session, built once (or found in --engine-dir) and reused.

FP16 = "xl-1.0-fp16"
ALL_VARIANTS = (FP16, "xl-1.0-int8", "xl-1.0-fp8", "xl-1.0-lcm-lora", "xl-turbo")


def _selected_variants(config) -> list[str]:
    names = config.getoption("--variants")
    return [n.strip() for n in names.split(",")] if names else list(ALL_VARIANTS)


def pytest_generate_tests(metafunc):
    if "variant_engine" in metafunc.fixturenames:
        metafunc.parametrize("variant_engine", _selected_variants(metafunc.config), indirect=True)
    if "sweep_prompt" in metafunc.fixturenames:
        from sdxl_core.pytest_plugin import PROMPTS
        from sdxl_core.sweep import prompt_id

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

    On `tiny` (CPU): 128x128, at most 4 steps and 2 calibration prompts. On the built-in random models the
    LCM-LoRA variant uses a random LoRA the suite makes itself; on real models the variant table as it is.
    """
    from sdxl_core.variants import TINY_SIZE, get_variant

    def make(name: str):
        variant = get_variant(name).replace(model=suite_model)
        if suite_model == "tiny":
            variant = variant.replace(height=TINY_SIZE, width=TINY_SIZE, steps=min(variant.steps, 4),
                                      calibration_size=2)
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
    from tests.lora_utils import make_builtin_lora

    directory = Path(engine_dir) / f"{model}-lora"
    with build_lock(directory):
        if not (directory / "pytorch_lora_weights.safetensors").exists():
            directory.mkdir(parents=True, exist_ok=True)
            make_builtin_lora(model, directory)
    return directory / "pytorch_lora_weights.safetensors"


class BuiltEngine:
    """A variant with its loaded components and engines, ready for the pipeline."""

    def __init__(self, variant, components, engines):
        self.variant, self.components, self.engines = variant, components, engines

    def generate(self, prompt: str, seed: int = 0):
        from sdxl_core import pipeline

        return pipeline.txt2img(self.engines, self.components, self.variant, [prompt] * self.variant.batch_size,
                                seed=seed)


@pytest.fixture(scope="session")
def engine_cache():
    return {}


@pytest.fixture(scope="session")
def build_engine(suite_variant, suite_device, engine_dir, onnx_dir, pytestconfig, engine_cache, hardware):
    """name -> BuiltEngine, built once per session (the file lock keeps xdist workers from building twice)."""
    from sdxl_core import models
    from sdxl_core.engines import get_backend

    def build(name: str) -> BuiltEngine:
        if name not in engine_cache:
            variant = suite_variant(name).replace(backend=pytestconfig.getoption("--backend"))
            backend = get_backend(variant.backend)
            components = models.load(variant.model, lora_path=variant.lora_path, lora_scale=variant.lora_scale)
            started = time.perf_counter()
            try:
                engines = backend.prepare(variant, components, suite_device, engine_dir=engine_dir,
                                          onnx_dir=onnx_dir, progress=False)
            except Exception as exc:
                # Every Hopper card has 80 GB or more, where every variant fits: an OOM there is a failure.
                # A smaller card lacks the hardware, and the skip names it.
                if type(exc).__name__ == "OutOfMemoryError" and hardware["capability"] != (9, 0):
                    pytest.skip(f"GPU out of memory building {name} on {hardware['name']}: needs a card with more "
                                f"free memory (a Hopper GPU)")
                raise
            _ENGINE_RECORDS.append({"variant": name, "mode": engines.info.get("mode", "in-memory"),
                                    "worker": os.environ.get("PYTEST_XDIST_WORKER", "this process"),
                                    "seconds": round(time.perf_counter() - started, 1)})
            engine_cache[name] = BuiltEngine(variant, components, engines)
        return engine_cache[name]

    return build


@pytest.fixture(scope="session")
def variant_engine(request, build_engine) -> BuiltEngine:
    return build_engine(request.param)


def pytest_runtest_logreport(report):
    """Collect the quality sweep's records where the summary is printed (the xdist controller, or the one
    process); workers only send theirs home in their reports."""
    from sdxl_core.sweep import PROPERTY

    if report.when == "call" and not os.environ.get("PYTEST_XDIST_WORKER"):
        _SWEEP_RECORDS.extend(value for key, value in report.user_properties if key == PROPERTY)


_SWEEP_RECORDS: list[dict] = []
SWEEP_SUMMARY = pytest.StashKey[dict]()
# Each engine this process prepared: variant, "built" or "loaded" (from the engine dir), worker, seconds. Workers
# send theirs home at the end (xdist's workeroutput), so the summary shows one run whatever the worker count.
_ENGINE_RECORDS: list[dict] = []
ENGINES_OUTPUT = "sdxl_bench_engines"


@pytest.hookimpl(optionalhook=True)  # an xdist hook: absent without pytest-xdist
def pytest_testnodedown(node, error):
    _ENGINE_RECORDS.extend(getattr(node, "workeroutput", {}).get(ENGINES_OUTPUT, []))


def pytest_sessionfinish(session):
    """The sweep's mean over every prompt that ran, the report file, and a failed run when a mean fails (each
    prompt's own threshold already failed that prompt's test). A worker sends its engines home."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        if hasattr(session.config, "workeroutput"):
            session.config.workeroutput[ENGINES_OUTPUT] = list(_ENGINE_RECORDS)
        return
    if not _SWEEP_RECORDS:
        return
    from sdxl_core import sweep

    summary = session.config.stash[SWEEP_SUMMARY] = sweep.summarise(_SWEEP_RECORDS)
    path = session.config.getoption("--quality-report")
    if path:
        sweep.write_report(path, summary)
    if any(s["failures"] for s in summary.values()) and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, config):
    """What the quality and speed tests measured (from `record_property`), one row a test, by name, and
    the quality sweep's summary: the same on one GPU as on several."""
    from sdxl_core.workers import plain_nodeid

    rows = []
    for outcome in ("passed", "failed"):
        for report in terminalreporter.stats.get(outcome, []):
            props = dict(getattr(report, "user_properties", []))
            measured = {k: v for k, v in props.items() if k in ("ssim", "psnr_db", "speedup", "fp16_ms", "ms")}
            if report.when == "call" and measured:
                rows.append((outcome, plain_nodeid(report.nodeid).split("::")[-1], measured))
    if rows:
        terminalreporter.section("sdxl-bench measurements")
        for outcome, name, measured in sorted(rows, key=lambda row: (row[0] != "passed", row[1])):
            values = "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in measured.items())
            terminalreporter.write_line(f"{outcome:<6} {name:<60} {values}")
    if _ENGINE_RECORDS:
        terminalreporter.section("sdxl-bench engines")
        for record in sorted(_ENGINE_RECORDS, key=lambda r: (r["variant"], r["mode"] != "built", r["worker"])):
            terminalreporter.write_line(f"{record['variant']:<18} {record['mode']:<10} on {record['worker']:<13} "
                                        f"{record['seconds']:.1f} s")
    summary = config.stash.get(SWEEP_SUMMARY, None)
    if summary:
        from sdxl_core import sweep

        terminalreporter.section("sdxl-bench quality sweep")
        for line in sweep.summary_lines(summary):
            terminalreporter.write_line(line)
        path = config.getoption("--quality-report")
        terminalreporter.write_line(f"per-prompt values: {path}" if path else
                                    "per-prompt values: --quality-report PATH (.md or .json)")
