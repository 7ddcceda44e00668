"""The compact tensors a baseline keeps beside its images, how a render is compared with them, and how the
tolerances are measured.

Per variant and case (prompt, seed) a baseline keeps the final latents (`latents`); per variant, the UNet's
output for fixed seeded inputs (`SPECS["unet"].sample_inputs`, seed 0) at PROBE_TIMESTEPS (`unet.t<T>`). A UNet
output too large to keep (SDXL: 2x4x128x128 per timestep) is kept as its average over PxP latent pixels, P the
smallest factor that leaves at most POOLED_SIDE a side, plus four statistics of the full tensor (`unet.t<T>.stats`:
mean, standard deviation, mean |x|, max |x|, float64). Tensors of up to FULL_PRECISION_NUMEL elements keep
float32, larger ones float16 (SDXL's 128x128x4 latents: 128 KiB); a current tensor is rounded to the stored
dtype before it is compared, so an unchanged render compares equal bit for bit. An 8-bit UNet's probe also holds
its calibrated numbers (`quant.state`, one row per quantized layer), compared number by number.

Each comparison is one number (`difference`): the relative L2 distance |a - b| / |b| for latents and pooled UNet
outputs (the worst over timesteps, statistics included), the mean absolute difference in 8-bit levels for the
image. Its tolerance is `max(measured, epsilon) x FACTOR` where `measured` is the largest difference that leaves
the code unchanged, measured when the baseline is written (`measure_floor`):
  - rerun: the same render again (0 where the hardware is deterministic);
  - threads (CPU only): the render with two BLAS threads instead of one, i.e. another reduction order in every
    GEMM and conv, the kind of difference another CPU's vector kernels make;
  - rounding: every UNet output (for the probe: its input) multiplied by (1 +- one rounding unit of the compute
    dtype) with a seeded random sign per element, the size of the difference another GPU kernel makes;
  - scales (8-bit only): every activation scale off by what another device's calibration moves it. An 8-bit
    render is chaotic in its scales: on tiny, scales moved by 1e-6 (AVX2 instead of AVX-512 kernels) move its
    latents 4-9 %, as much as a 5 % scale bug does. So `value` (the device that made the baseline: bit-identical
    up to the other sources) leaves `scales` out and `other_device` takes it in; on another device the
    calibrated numbers (`quant`, tolerance from CALIBRATION_NOISE_CPU) are what holds an 8-bit variant tight.

An 8-bit variant's record also says which path ("8bit" or "16bit") and kernel each quantized layer ran
(`layer_paths`): the per-shape dispatch picks them by timing on the GPU, so a rebuild of the same code may pick
another path for a shape whose candidates are close. Every path computes the same quantized values (qmodules), so
such a change moves the output by float rounding, which the `rounding` source covers; should a failure still
coincide with one, it says so (`baselines.path_change`) beside its verdict; the tolerances stay as they are.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
from collections import Counter

import numpy as np
import torch
from PIL import Image

from sdxl_core.specs import SPECS

PROBE_TIMESTEPS = (999, 500, 50)
POOLED_SIDE = 32
FULL_PRECISION_NUMEL = 16384
IMAGE_SIDE = 256  # stored images are copies for people, at most this many pixels a side
FACTOR = 4.0  # tolerance = max(measured floor, epsilon) x FACTOR
IMAGE_EPSILON = 0.01  # 8-bit levels: one level on 1 % of the values
KINDS = ("latents", "image", "unet", "quant")  # "quant": the calibrated numbers of an 8-bit UNet


def stored_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.float32 if tensor.numel() <= FULL_PRECISION_NUMEL else torch.float16


def compact(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach().float().cpu()
    return tensor.to(stored_dtype(tensor)).contiguous()


def _pooled(output: torch.Tensor) -> torch.Tensor:
    side = max(output.shape[-2:])
    factor = math.ceil(side / POOLED_SIDE)
    return torch.nn.functional.avg_pool2d(output, factor) if factor > 1 else output


def _stats(output: torch.Tensor) -> torch.Tensor:
    x = output.double()
    return torch.stack([x.mean(), x.std(), x.abs().mean(), x.abs().max()])


def image_copy(image: Image.Image) -> Image.Image:
    """The image as stored: at most IMAGE_SIDE pixels a side (box filter: deterministic), RGB."""
    image = image.convert("RGB")
    side = max(image.size)
    if side <= IMAGE_SIDE:
        return image
    factor = math.ceil(side / IMAGE_SIDE)
    return image.resize((image.width // factor, image.height // factor), Image.Resampling.BOX)


def case_tensors(result) -> dict[str, torch.Tensor]:
    """What a baseline keeps of one render (a `pipeline.Result`)."""
    return {"latents": compact(result.latents)}


@torch.inference_mode()
def unet_probe(engine, *, perturb: float = 0.0) -> dict[str, torch.Tensor]:
    """The UNet stage's output for seeded inputs at PROBE_TIMESTEPS; `perturb` multiplies the sample by
    (1 +- perturb) per element (seeded signs) to measure how far rounding-sized input changes move it."""
    engines, variant = engine.engines, engine.variant
    module = SPECS["unet"].module(engine.components)
    sample, _, hidden, text_embeds, time_ids = SPECS["unet"].sample_inputs(
        variant, module, seed=0, device=engines.device, dtype=engines.dtype
    )
    if perturb:
        sample = sample * (1 + perturb * _signs(sample.shape, sample.device, sample.dtype))
    out = {}
    for t in PROBE_TIMESTEPS:
        timestep = torch.tensor(float(t), dtype=torch.float32, device=engines.device)
        output = engines.unet(sample, timestep, hidden, text_embeds, time_ids).float()
        out[f"unet.t{t}"] = compact(_pooled(output))
        out[f"unet.t{t}.stats"] = _stats(output).cpu()
    return {**out, **quantized_state(engine.components.unet)}


def probe_outputs(probe: dict) -> dict:
    return {k: v for k, v in probe.items() if k.startswith("unet.")}


def probe_state(probe: dict) -> dict:
    return {k: v for k, v in probe.items() if k.startswith("quant.")}


def quantized_state(unet: torch.nn.Module | None) -> dict[str, torch.Tensor]:
    """The calibrated numbers of an 8-bit UNet, one row per quantized layer (in module order): activation scale,
    mean weight scale, mean |8-bit weight|, mean SmoothQuant factor (1 without). Empty for a UNet without
    quantized torch layers (FP16, or a backend that keeps them elsewhere)."""
    rows = []
    for module in unet.modules() if unet is not None else ():
        if not isinstance(getattr(module, "a_scale", None), torch.Tensor):
            continue
        smooth = getattr(module, "smooth", None)
        rows.append(
            [
                module.a_scale.double().reshape(()),
                module.w_scale.double().mean(),
                module.weight.double().abs().mean(),
                smooth.double().mean() if smooth is not None else torch.ones((), dtype=torch.float64),
            ]
        )
    return {"quant.state": torch.tensor([[float(v) for v in row] for row in rows], dtype=torch.float64)} if rows else {}


# ---------------------------------------------------------------------------------------------------------------
# Which path and kernel each quantized layer ran: a timing-dependent choice of the build, kept beside the numbers.

# Numeric segments after these name a part of one layer (diffusers' Attention.to_out, FeedForward.net), not one of
# several blocks: `ff.net.0.proj` and `ff.net.2` are different layers, so their index stays in the group's name.
_PART_LISTS = ("to_out", "net")


def layer_group(name: str) -> str:
    """A layer's name with its block indices as `*`: `up_blocks.*.attentions.*.transformer_blocks.*.attn2.to_kv`."""
    parts = name.split(".")
    return ".".join(
        "*" if part.isdigit() and (i == 0 or parts[i - 1] not in _PART_LISTS) else part for i, part in enumerate(parts)
    )


def _digest(rows) -> str:
    return hashlib.sha256(json.dumps(sorted(rows)).encode()).hexdigest()


def layer_paths(unet: torch.nn.Module | None) -> dict | None:
    """What the engine ran per quantized layer, compact: layers per path and per kernel (as the engine info counts
    them), sha256 digests of the sorted (layer name, path) and (layer name, kernel) pairs, the layer-name groups
    on the 16-bit path with their counts, and how many attentions run our attention kernel. None for a UNet without
    8-bit torch layers (FP16, TensorRT)."""
    from sdxl_core.engines.cross_kv import CachedProjection
    from sdxl_core.engines.torch_backend import layer_counts
    from sdxl_core.quant.qmodules import QuantizedModule

    modules = dict(unet.named_modules()) if unet is not None else {}
    layers = {}
    for name, module in modules.items():
        if isinstance(module, QuantizedModule):
            parent = name.rpartition(".")[0]
            if isinstance(modules.get(parent), CachedProjection):  # reused cross-attention K/V: the layer it holds
                name = parent
            layers[name] = (module.gemm_path, "16bit" if module.gemm_path == "16bit" else module.kernel)
    if not layers:
        return None
    by_path, by_kernel = layer_counts(unet)
    sixteen = Counter(layer_group(name) for name, (path, _) in layers.items() if path == "16bit")
    from sdxl_core.quant import attention, geglu_act, layernorm

    return {
        "layers_by_path": dict(sorted(by_path.items())),
        "layers_by_kernel": dict(sorted(by_kernel.items())),
        "paths_digest": _digest([name, path] for name, (path, _) in layers.items()),
        "kernels_digest": _digest([name, kernel] for name, (_, kernel) in layers.items()),
        "16bit_groups": dict(sorted(sixteen.items())),
        # which attentions, LayerNorms and GEGLUs run our kernels (quant.attention, quant.layernorm, quant.geglu_act),
        # also chosen by timing
        "attention_kernels": dict(sorted(Counter(attention.fused_attentions(unet).values()).items())),
        "norm_kernels": dict(sorted(Counter(layernorm.fused_norms(unet).values()).items())),
        "activation_kernels": dict(sorted(Counter(geglu_act.fused_activations(unet).values()).items())),
    }


def _signs(shape, device, dtype, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator("cpu").manual_seed(seed)
    return (torch.randint(0, 2, shape, generator=generator) * 2 - 1).to(device=device, dtype=dtype)


def relative_difference(current: torch.Tensor, stored: torch.Tensor) -> float:
    """|a - b| / |b| after rounding `current` to the stored dtype (0 for an unchanged render)."""
    a = current.detach().cpu().to(stored.dtype).double()
    b = stored.double()
    if a.shape != b.shape:
        return math.inf
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def tensors_difference(current: dict, stored: dict) -> float:
    """The largest relative difference over the tensors `stored` holds; statistics and calibrated numbers compare
    one by one (a statistic's mean is left out: near zero, its relative change says nothing)."""
    worst = 0.0
    for name, reference in stored.items():
        if name not in current or current[name].shape != reference.shape:
            return math.inf
        if name.endswith(".stats") or name.startswith("quant."):
            a, b = current[name].double(), reference.double()
            if name.endswith(".stats"):
                a, b = a[1:], b[1:]
            worst = max(worst, float(((a - b).abs() / b.abs().clamp_min(1e-30)).max()))
        else:
            worst = max(worst, relative_difference(current[name], reference))
    return worst


def image_difference(current: Image.Image, stored: Image.Image) -> float:
    """Mean absolute difference in 8-bit levels between the stored copy and the same copy of `current`."""
    a = np.asarray(image_copy(current), dtype=np.float64)
    b = np.asarray(stored.convert("RGB"), dtype=np.float64)
    if a.shape != b.shape:
        return math.inf
    return float(np.abs(a - b).mean())


# Another device's calibration moves the calibrated numbers by this much (relative): measured on tiny with the
# CPU kernels forced to AVX2 (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS) against AVX-512:
# activation scales up to 1.5e-6 (INT8) / 2.2e-6 (FP8), mean |8-bit weight| up to 7.5e-6 (INT8, via SmoothQuant).
CALIBRATION_NOISE_CPU = 7.6e-6


def epsilon(kind: str, compute_dtype: torch.dtype) -> float:
    """The smallest floor before FACTOR: for the image one level on 1 % of the values; for the calibrated numbers
    what another device's calibration moves (CPU: CALIBRATION_NOISE_CPU, measured; GPU: one rounding unit of the
    compute dtype, in which the amaxes are taken); for tensors one rounding unit of the compute dtype."""
    if kind == "image":
        return IMAGE_EPSILON
    if kind == "quant" and compute_dtype == torch.float32:
        return CALIBRATION_NOISE_CPU
    return float(torch.finfo(compute_dtype).eps)


def tolerance(measured: dict[str, float], eps: float, factor: float = FACTOR) -> dict:
    """The manifest's record of one tolerance, with its parts: `value` = max(measured on this device, epsilon) x
    factor holds on the device that made the baseline; `other_device` also covers the `scales` source (another
    device's calibration), for a run on another CPU or GPU of the same hardware class."""
    same = max([eps, *(v for source, v in measured.items() if source != "scales")])
    other = max([eps, *measured.values()])
    return {
        "value": float(f"{same * factor:.3g}"),
        "other_device": float(f"{other * factor:.3g}"),
        "measured": measured,
        "epsilon": eps,
        "factor": factor,
    }


# ---------------------------------------------------------------------------------------------------------------
# Floors: how much an unchanged code path moves.


def render(engine, prompt: str, seed: int, *, perturb: float = 0.0):
    """One render as the suite makes it (`engine.generate`: a run.Run); `perturb` multiplies every UNet output by
    (1 +- perturb) per element."""
    if perturb:
        unet = engine.engines.unet

        def rounded_differently(*args):
            out = unet(*args)
            return out * (1 + perturb * _signs(out.shape, out.device, out.dtype))

        engine = dataclasses.replace(engine, engines=dataclasses.replace(engine.engines, unet=rounded_differently))
    return engine.generate(prompt, seed=seed)


def measure_floor(engine, cases, results, probe) -> dict[str, dict[str, float]]:
    """kind -> {source: the largest difference over `cases`} for an unchanged code path (module doc).
    `results` are the renders of `cases` and `probe` the UNet probe already made."""
    dtype = engine.engines.dtype
    sources = {"rerun": contextlib.nullcontext(0.0), "rounding": contextlib.nullcontext(torch.finfo(dtype).eps)}
    if engine.engines.device.type == "cpu":
        sources["threads"] = _threads(2)
    if probe_state(probe):
        sources["scales"] = _scales(engine.components.unet, epsilon("quant", dtype))
    floor = {kind: {} for kind in KINDS}
    for source, context in sources.items():
        latents, image = 0.0, 0.0
        with context as perturb:
            for (prompt, seed), result in zip(cases, results, strict=True):
                again = render(engine, prompt, seed, perturb=perturb)
                latents = max(latents, relative_difference(again.latents, compact(result.latents)))
                image = max(image, image_difference(again.images[0], image_copy(result.images[0])))
            again_probe = unet_probe(engine, perturb=perturb)
        floor["latents"][source] = float(f"{latents:.3g}")
        floor["image"][source] = float(f"{image:.3g}")
        floor["unet"][source] = float(f"{tensors_difference(probe_outputs(again_probe), probe_outputs(probe)):.3g}")
        if "quant" in floor and probe_state(probe) and source != "scales":
            floor["quant"][source] = float(f"{tensors_difference(again_probe, probe_state(probe)):.3g}")
    if not probe_state(probe):
        del floor["quant"]
    return floor


@contextlib.contextmanager
def _threads(count: int):
    """Another reduction order on the CPU: `count` BLAS threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield 0.0
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _scales(unet: torch.nn.Module, relative: float):
    """Another device's calibration: every activation scale times (1 +- `relative`), seeded signs; restored after."""
    modules = [m for m in unet.modules() if isinstance(getattr(m, "a_scale", None), torch.Tensor)]
    signs = _signs((len(modules),), "cpu", torch.float64).tolist()
    saved = [(module, module.a_scale.clone()) for module in modules]
    with torch.no_grad():
        for module, sign in zip(modules, signs, strict=True):
            module.set_activation_scale(module.a_scale * (1 + relative * sign))
    try:
        yield 0.0
    finally:
        with torch.no_grad():
            for module, value in saved:
                module.set_activation_scale(value)
