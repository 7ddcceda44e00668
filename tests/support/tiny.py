"""What several CPU tests share: random inputs for the tiny UNet, a UNet call as the pipeline makes it, a tiny UNet
calibrated and converted to 8-bit modules, and a check script run in the Triton interpreter."""

import contextlib
import copy
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def unet_inputs(generator, timestep):
    """Random tiny-UNet inputs at one timestep (CFG batch 2, 16x16 latents, 77 tokens of 96)."""
    return dict(
        sample=torch.randn(2, 4, 16, 16, generator=generator),
        timestep=torch.tensor(float(timestep)),
        encoder_hidden_states=torch.randn(2, 77, 96, generator=generator),
        added_cond_kwargs={
            "text_embeds": torch.randn(2, 32, generator=generator),
            "time_ids": torch.randn(2, 6, generator=generator),
        },
    )


def run(unet, inputs):
    with torch.inference_mode():
        return unet(**inputs).sample


def converted_tiny(precision: str, calib: list[dict], fused_qkv: bool = False) -> torch.nn.Module:
    """The tiny UNet calibrated on `calib` (unet_inputs batches) at quantization level 3 (every transformer-block
    linear 8-bit) and converted to real 8-bit modules; with `fused_qkv`, on fused attention projections."""
    from sdxl_core.models import build_builtin
    from sdxl_core.quant import qmodules, quantize
    from sdxl_core.variants import Variant

    variant = Variant(name="t", model="tiny", precision=precision, quant_level=3.0, steps=2)
    unet = build_builtin("tiny").unet
    if fused_qkv:
        qmodules.fuse_qkv(unet)

    def forward_loop(model):
        with torch.inference_mode():
            for batch in calib:
                model(**batch)

    return qmodules.convert_to_real(quantize.quantize_unet(unet, variant, forward_loop, progress=False))[0]


def converted_copies(calib: list[dict], fused_qkv: bool = False):
    """(precision, fused_qkv=`fused_qkv`) -> a fresh copy of `converted_tiny(precision, calib, fused_qkv)`, each UNet
    calibrated once per module that asks (a module-scoped fixture returns this)."""
    cache = {}

    def get(precision: str, fused: bool = fused_qkv) -> torch.nn.Module:
        if (precision, fused) not in cache:
            cache[precision, fused] = converted_tiny(precision, calib, fused)
        return copy.deepcopy(cache[precision, fused])

    return get


def timer_preferring(wins: bool, winner: str, where=lambda shape: True):
    """A scripted dispatch timer (`timer(fn, candidate, shape)`): `winner` takes 1 ms where `where(shape)` (5 ms
    if not `wins`), every other candidate 2 ms. Each candidate runs once, as the real timer runs it."""

    def timer(fn, candidate, shape):
        fn()
        if candidate == winner and where(shape):
            return 1.0 if wins else 5.0
        return 2.0

    return timer


def load_saved(directory) -> torch.nn.Module:
    """The UNet `qmodules.save` wrote to `directory`, loaded as an engine loads it (weights dequantized in float32)."""
    import json

    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from sdxl_core.quant import qmodules

    config = json.loads((directory / "unet_config.json").read_text())
    plan = json.loads((directory / "layer_plan.json").read_text())
    tensors = load_file(str(directory / "unet.safetensors"))
    unet = qmodules.load_real(config, plan, tensors, unet_cls=UNet2DConditionModel)
    qmodules.dequantize_weights(unet, torch.float32)
    return unet


@contextlib.contextmanager
def input_dtypes(layers):
    """The set of dtypes `layers` are called with, while the body of the `with` runs."""
    seen = set()
    hooks = [layer.register_forward_pre_hook(lambda m, args: seen.add(args[0].dtype)) for layer in layers]
    try:
        yield seen
    finally:
        for hook in hooks:
            hook.remove()


def grid_index(q: torch.Tensor) -> torch.Tensor:
    """Each 8-bit value's position among all values of its format, in order (so neighbours differ by 1)."""
    if q.dtype == torch.int8:
        return q.int()
    values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = torch.unique(values[~values.isnan()]).to(q.device)  # sorted; +0 and -0 are one value
    return torch.searchsorted(grid, q.float().contiguous())


def run_in_interpreter(script: str, *args: str) -> subprocess.CompletedProcess:
    """tests/support/<script> in a fresh process with the Triton interpreter opted in: the interpreter has to be
    chosen before triton is imported. The opt-in variable (rather than TRITON_INTERPRET itself) also covers the
    kernels package's translation of it."""
    pythonpath = os.pathsep.join(p for p in [str(ROOT), os.environ.get("PYTHONPATH", "")] if p)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, str(ROOT / "tests" / "support" / script), *args],
        env={**env, "SDXL_BENCH_TRITON_ON_CPU": "1", "PYTHONPATH": pythonpath},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
