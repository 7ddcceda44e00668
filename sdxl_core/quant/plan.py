"""What an engine's UNet files may hold: the layer plan's and the UNet config's schemas.

Both come from an engine dir, which may be shared or another user's, and both steer what runs: a layer plan names
the kernel each 8-bit layer calls, a UNet config is handed to diffusers' `from_config` (which takes a string for
a model path or hub id). So each is checked whole before anything is built from it: the config must be an object
of the fields a UNet takes, the plan may name only the layer types, GEMM paths and kernels this build knows, and a
run off the GPU refuses a plan that names a GPU kernel instead of loading or compiling one. Every violation is
one line (UserError) that names the file.
"""

from __future__ import annotations

import inspect
import re

from sdxl_core.errors import UserError
from sdxl_core.quant.kernels import conv_cutlass, gemm8_cutlass
from sdxl_core.quant.kernels.attention8 import KERNEL as ATTENTION_KERNEL
from sdxl_core.quant.kernels.geglu8 import KERNEL as GEGLU_KERNEL
from sdxl_core.quant.kernels.geglu_act8 import KERNEL as GEGLU_ACT_KERNEL
from sdxl_core.quant.kernels.layernorm8 import KERNEL as LAYERNORM_KERNEL

PLAN_FILE = "layer_plan.json"
CONFIG_FILE = "unet_config.json"
PLAN_FORMAT = "sdxl-bench-layer-plan/1"
GEMM_PATHS = ("8bit", "16bit")
CUTLASS = "cutlass:"
# Layer type: (8-bit format, whether it is a conv). A conv with a 1x1 kernel and stride 1 runs as a GEMM.
LAYER_TYPES = {
    "Int8Linear": ("int8", False),
    "Fp8Linear": ("fp8", False),
    "Int8Conv2d": ("int8", True),
    "Fp8Conv2d": ("fp8", True),
}
# The GEMM kernels besides the CUTLASS configs: the Triton INT8 kernels, cuBLAS FP8 (float32 or fast accumulation),
# and for a feed-forward's GEGLU projection the Triton or CUTLASS kernels with the GEGLU in their epilogue
# (`quant.geglu` checks that a layer naming one is such a projection).
_GEGLU_KERNELS = (GEGLU_KERNEL, *gemm8_cutlass.GEGLU_KERNELS)
_GEMM_KERNELS = {"int8": ("pointer", "tma", *_GEGLU_KERNELS), "fp8": ("scaled_mm", "scaled_mm_fast", *_GEGLU_KERNELS)}
_SPEC_FIELDS = ("type", "smooth", "per_channel", "gemm", "kernel")
_PLAN_FIELDS = ("format", "fused_qkv", "layers", "attention", "norms", "activations")
# The fused modules a plan may name, per field: {module name: kernel}. `quant.attention`, `quant.layernorm` and
# `quant.geglu_act` check that each module named is an attention (a LayerNorm, a GEGLU) their kernel runs.
FUSED_KERNELS = {"attention": (ATTENTION_KERNEL,), "norms": (LAYERNORM_KERNEL,), "activations": (GEGLU_ACT_KERNEL,)}
_LAYER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*")
# What diffusers adds to a model's config besides its constructor's arguments.
_CONFIG_META = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")


def gemm_kernels(fmt: str) -> tuple[str, ...]:
    """The kernels an 8-bit GEMM (a linear layer, or a 1x1 conv run as one) of format `fmt` may name."""
    return (*_GEMM_KERNELS[fmt], *(CUTLASS + name for name in gemm8_cutlass.CONFIG_NAMES))


def conv_kernels(fmt: str) -> tuple[str, ...]:
    """The kernels an 8-bit 3x3 (or strided) conv may name: the emulation, or a CUTLASS conv config."""
    return ("emulated", *(CUTLASS + name for name in conv_cutlass.CONFIG_NAMES[fmt]))


def _refuse(file: str, what: str) -> UserError:
    return UserError(f"{file}: {what}: rebuild the engine")


def check_layer_plan(plan, device_type: str | None = None) -> None:
    """Refuse a plan that is not one this build writes; with `device_type` other than "cuda", also one that
    names a GPU kernel (a CPU run never loads or compiles one)."""
    if not isinstance(plan, dict):
        raise _refuse(PLAN_FILE, f"a JSON {type(plan).__name__}, not a layer plan object")
    if plan.get("format") != PLAN_FORMAT:
        raise _refuse(PLAN_FILE, f"not a {PLAN_FORMAT} layer plan")
    unknown = sorted(set(plan) - set(_PLAN_FIELDS))
    if unknown:
        raise _refuse(PLAN_FILE, f"unknown field {unknown[0][:60]!r}")
    if not isinstance(plan.get("fused_qkv", False), bool):
        raise _refuse(PLAN_FILE, "fused_qkv is not true or false")
    layers = plan.get("layers")
    if not isinstance(layers, dict):
        found = "missing" if layers is None else f"a JSON {type(layers).__name__}"
        raise _refuse(PLAN_FILE, f"its layers are {found}, not an object of layer name: spec")
    for name, spec in layers.items():
        _check_spec(name, spec, device_type)
    for field, kernels in FUSED_KERNELS.items():
        _check_fused(field, plan.get(field, {}), kernels)


def _check_fused(field: str, fused, kernels: tuple[str, ...]) -> None:
    if not isinstance(fused, dict):
        raise _refuse(PLAN_FILE, f"its {field} entry is a JSON {type(fused).__name__}, not an object")
    for name, kernel in fused.items():
        if not _LAYER_NAME.fullmatch(name):
            raise _refuse(PLAN_FILE, f"{field} {name[:80]!r} is not a module name")
        if not isinstance(kernel, str) or kernel not in kernels:
            what = f"{field} {name[:80]!r} names kernel {str(kernel)[:80]!r}, which this build does not have"
            raise _refuse(PLAN_FILE, what)


def _check_spec(name: str, spec, device_type: str | None) -> None:
    where = f"layer {name[:80]!r}"
    if not _LAYER_NAME.fullmatch(name):
        raise _refuse(PLAN_FILE, f"{where} is not a module name")
    if not isinstance(spec, dict):
        raise _refuse(PLAN_FILE, f"{where} is a JSON {type(spec).__name__}, not a layer spec object")
    unknown = sorted(set(spec) - set(_SPEC_FIELDS))
    if unknown:
        raise _refuse(PLAN_FILE, f"{where} has an unknown field {unknown[0][:60]!r}")
    kind = spec.get("type")
    if not isinstance(kind, str) or kind not in LAYER_TYPES:
        raise _refuse(PLAN_FILE, f"{where} has type {str(kind)[:60]!r}, not one of {', '.join(LAYER_TYPES)}")
    for flag in ("smooth", "per_channel"):
        if not isinstance(spec.get(flag), bool):
            raise _refuse(PLAN_FILE, f"{where} has no {flag} flag (true or false)")
    if spec.get("gemm", "8bit") not in GEMM_PATHS:
        raise _refuse(PLAN_FILE, f"{where} has GEMM path {str(spec.get('gemm'))[:60]!r}, not one of 8bit, 16bit")
    kernel = spec.get("kernel")
    if kernel is None:
        return
    fmt, conv = LAYER_TYPES[kind]
    if not isinstance(kernel, str) or kernel not in (*gemm_kernels(fmt), *(conv_kernels(fmt) if conv else ())):
        raise _refuse(PLAN_FILE, f"{where} names kernel {str(kernel)[:80]!r}, which this build does not have")
    if device_type is not None and device_type != "cuda" and kernel.startswith(CUTLASS):
        raise _refuse(PLAN_FILE, f"{where} runs {kernel}, a CUDA GPU kernel, and this run is on the {device_type}")


def check_layer_kernel(name: str, kernel: str, fmt: str, runs_as_gemm: bool) -> None:
    """A planned kernel fits the layer it is planted in: GEMM kernels for GEMMs, conv kernels for other convs."""
    if kernel not in (gemm_kernels(fmt) if runs_as_gemm else conv_kernels(fmt)):
        what = "a GEMM" if runs_as_gemm else "a conv"
        raise _refuse(PLAN_FILE, f"layer {name[:80]!r} runs as {what} and cannot run kernel {kernel!r}")


def check_unet_config(config, unet_cls) -> None:
    """Refuse a UNet config that is not an object of the fields `unet_cls` takes (a string would be taken for a
    model path or hub id)."""
    if not isinstance(config, dict):
        raise _refuse(CONFIG_FILE, f"a JSON {type(config).__name__}, not a UNet config object")
    known = set(inspect.signature(unet_cls.__init__).parameters) - {"self"} | set(_CONFIG_META)
    unknown = sorted(str(k) for k in config if k not in known)
    if unknown:
        raise _refuse(CONFIG_FILE, f"unknown field {unknown[0][:60]!r} for a {unet_cls.__name__}")
    if config.get("_class_name", unet_cls.__name__) != unet_cls.__name__:
        raise _refuse(CONFIG_FILE, f"it configures a {str(config['_class_name'])[:60]}, not a {unet_cls.__name__}")
