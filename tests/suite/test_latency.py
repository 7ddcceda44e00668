"""Latency benchmarks (pytest-benchmark histories) and the 8-bit speed gates.

Timing is CUDA-synchronized on a GPU. Speed is only ever asserted on a Hopper GPU (sm_90), as a ratio of
medians taken side by side in this session. On the CPU the benchmarks still run and assert what can fail
there without a clock: a finite output of the right shape, stage times that add up to the pipeline's total.
The engine-size bound holds everywhere and is asserted everywhere.
"""

import statistics

import pytest
import torch
from safetensors import safe_open

from sdxl_core import specs, timing
from sdxl_core.engines import torch_backend

PROMPT = "a photo of an astronaut riding a horse on mars"
MAX_8BIT_WEIGHT_FRACTION = 0.55
# The tiny model keeps 7.3 % of its bytes in layers the recipe never quantizes (time/add embeddings, conv_in,
# conv_out, conv_shortcut); the full SDXL UNet 2.6 %. Its INT8 level-3 engine measures 56.0 % (55.3 % counted as
# on a GPU). The 55 % bound itself is checked on the full architecture on CPU too: test_quantize.py.
TINY_MAX_8BIT_WEIGHT_FRACTION = 0.57


def _synced(fn, device):
    def run():
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    return run


def _rounds(device):
    return (20, 3) if device.type == "cuda" else (3, 1)


def unet_step(engine):
    inputs = torch_backend.unet_inputs(
        engine.variant, engine.components.unet, engine.engines.device, engine.engines.dtype
    )

    def step():
        with torch.inference_mode():
            return engine.engines.unet(*inputs)

    return step


@pytest.mark.bench
def test_unet_step_latency(benchmark, variant_engine, suite_device):
    rounds, warmup = _rounds(suite_device)
    if suite_device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(suite_device)
    outputs = []
    step = unet_step(variant_engine)
    benchmark.pedantic(_synced(lambda: outputs.append(step()), suite_device), rounds=rounds, warmup_rounds=warmup)
    _describe(benchmark, variant_engine, suite_device)
    latent = specs.SPECS["unet"].shapes(variant_engine.variant, variant_engine.components.unet.config)["latent"]
    assert outputs and all(tuple(out.shape) == latent and torch.isfinite(out).all() for out in outputs)


@pytest.mark.bench
def test_pipeline_latency(benchmark, variant_engine, suite_device):
    rounds, warmup = (5, 1) if suite_device.type == "cuda" else (2, 1)
    results = []
    benchmark.pedantic(
        _synced(lambda: results.append(variant_engine.generate(PROMPT)), suite_device),
        rounds=rounds,
        warmup_rounds=warmup,
    )
    timed = results[warmup:] or results  # a worker without a GPU of its own runs it once, untimed
    benchmark.extra_info["stages_ms"] = {
        k: round(statistics.median(r.timings[k] for r in timed), 3) for k in ("clip", "clip2", "unet", "vae", "total")
    }
    benchmark.extra_info["unet_steps"] = timed[0].unet_calls
    _describe(benchmark, variant_engine, suite_device)
    for result in timed:  # the stages run one after another inside the timed total, so they add up to at most it
        stages = sum(result.timings[k] for k in ("clip", "clip2", "unet", "vae"))
        assert 0 < stages <= result.timings["total"] * 1.001 + 0.05
        assert result.unet_calls == variant_engine.variant.steps
        assert len(result.images) == variant_engine.variant.batch_size


def _describe(benchmark, engine, device):
    info = engine.engines.info
    benchmark.extra_info.update(
        variant=engine.variant.name,
        precision=engine.variant.precision,
        model=engine.variant.model,
        size=f"{engine.variant.height}x{engine.variant.width}",
        unet_batch=engine.variant.unet_batch,
        engine_key=info.engine_key,
        engine_bytes=info.engine_bytes,
        device=str(device),
        engine_mode=info.mode,
        compile_mode=info.compile_mode,
        cuda_graph=info.cuda_graph,
        layers_by_path=info.layers_by_path,
        gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        peak_memory_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    )


def gpu_equivalent_weight_bytes(engine_path) -> int:
    """Bytes of the engine's weights as they sit on a GPU: 8-bit tensors 1 byte, float tensors 2 (fp16).

    On a GPU this is the file's tensor bytes; on the CPU (where unquantized tensors are fp32) it is what the
    same engine holds on a GPU, so the bound means the same thing in CI as on a GPU.
    """
    total = 0
    with safe_open(f"{engine_path}/unet.safetensors", framework="pt") as f:
        for name in f.keys():
            tensor = f.get_slice(name)
            numel = 1
            for dim in tensor.get_shape():
                numel *= dim
            dtype = tensor.get_dtype()
            total += numel * (1 if dtype in ("I8", "F8_E4M3") else 4 if dtype in ("I32",) else 2)
    return total


@pytest.mark.parametrize(
    "precision",
    [pytest.param(p, marks=pytest.mark.needs_variants("xl-1.0-fp16", f"xl-1.0-{p}")) for p in ("int8", "fp8")],
)
def test_8bit_engine_weights_fit_in_55_percent_of_fp16(build_engine, suite_model, precision):
    fp16 = build_engine("xl-1.0-fp16").engines.info.engine_path
    quantized = build_engine(f"xl-1.0-{precision}").engines.info.engine_path
    fraction = gpu_equivalent_weight_bytes(quantized) / gpu_equivalent_weight_bytes(fp16)
    bound = TINY_MAX_8BIT_WEIGHT_FRACTION if suite_model == "tiny" else MAX_8BIT_WEIGHT_FRACTION
    assert fraction <= bound, (
        f"{precision} engine holds {fraction:.1%} of the FP16 engine's weight bytes "
        f"(bound {bound:.0%}): more layers stayed in 16 bits than the level should leave"
    )


@pytest.mark.gpu
@pytest.mark.hopper
@pytest.mark.bench
@pytest.mark.parametrize(
    "precision, option",
    [
        pytest.param(p, f"--min-{p}-speedup", marks=pytest.mark.needs_variants("xl-1.0-fp16", f"xl-1.0-{p}"))
        for p in ("int8", "fp8")
    ],
)
def test_8bit_speedup_gate_on_hopper(build_engine, pytestconfig, record_property, precision, option):
    engines = {"fp16": build_engine("xl-1.0-fp16"), precision: build_engine(f"xl-1.0-{precision}")}
    medians = timing.medians(timing.interleaved_ms({name: unet_step(e) for name, e in engines.items()}))
    speedup = medians["fp16"] / medians[precision]
    record_property("speedup", speedup)
    record_property("fp16_ms", medians["fp16"])
    record_property("ms", medians[precision])
    record_property("layers_8bit", engines[precision].engines.info.layers_by_path)
    required = pytestconfig.getoption(option)
    assert speedup >= required, (
        f"{precision.upper()} UNet step {medians[precision]:.2f} ms vs FP16 {medians['fp16']:.2f} ms: "
        f"speed-up {speedup:.3f}x, gate {required:.2f}x ({torch.cuda.get_device_name()})"
    )


def test_variants_deselect_the_gates_whose_engines_they_leave_out():
    """`--variants xl-1.0-lcm-lora,xl-turbo` must not build FP16, INT8 and FP8 engines behind the user's back."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    def collected(variants):
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "--collect-only",
                "-q",
                "-p",
                "no:cacheprovider",
                f"--variants={variants}",
                "tests/suite/test_latency.py",
            ],
            cwd=Path(__file__).parents[2],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return {line.split("::")[1] for line in done.stdout.splitlines() if "::" in line}

    assert not any(
        name.startswith(("test_8bit_speedup_gate", "test_8bit_engine_weights"))
        for name in collected("xl-1.0-lcm-lora,xl-turbo")
    )
    chosen = collected("xl-1.0-fp16,xl-1.0-int8")
    assert "test_8bit_speedup_gate_on_hopper[int8---min-int8-speedup]" in chosen
    assert not any("fp8" in name for name in chosen)
