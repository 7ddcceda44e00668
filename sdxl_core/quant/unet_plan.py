"""A converted UNet as a whole: ModelOpt fake quant -> the real 8-bit modules of `qmodules` (`convert_to_real`),
the layer plan that rebuilds them without ModelOpt, save and load.

A UNet (FP16 or converted) is saved by `save(unet, dir)` as its config, its layer plan (JSON; empty for FP16)
and its tensors as they run (safetensors); `load(engine, device, dtype)` (through `load_real`) rebuilds it on
the meta device and assigns the tensors, with neither ModelOpt nor calibration. It reads a verified engine
(`engines.store.Engine`), never a path: every file through `engine.read`, which hashes the bytes it returns,
and the config and plan checked against their schemas (`plan`) before anything is built from them.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdxl_core.errors import UserError
from sdxl_core.quant import plan as plan_schema
from sdxl_core.quant.qmodules import (
    MODULE_TYPES,
    Fp8Conv2d,
    Fp8Linear,
    Int8Conv2d,
    Int8Linear,
    QConv2d,
    QuantizedModule,
)

PLAN_FORMAT = plan_schema.PLAN_FORMAT
UNET_FILES = (plan_schema.CONFIG_FILE, plan_schema.PLAN_FILE, "unet.safetensors")  # what `save` writes
_QUANTIZER_KEY = re.compile(r"(^|\.)\w+_quantizer\.")


@dataclass
class ConversionReport:
    counts: dict[str, int] = field(default_factory=dict)  # module type -> how many were replaced
    dropped_attention: int = 0  # level-4 attention modules whose quantizers were dropped

    def __str__(self):
        text = ", ".join(f"{n} {name}" for name, n in sorted(self.counts.items())) or "nothing quantized"
        if self.dropped_attention:
            text += (
                f"; FP8 attention quantizers of {self.dropped_attention} attention modules dropped "
                "(attention runs in the activation dtype)"
            )
        return text


def convert_to_real(unet: torch.nn.Module) -> tuple[torch.nn.Module, ConversionReport]:
    """A new plain-torch UNet with real 8-bit modules for every ModelOpt layer that has its weight and
    input quantizers enabled. Unquantized tensors are shared with `unet`, not copied."""
    from sdxl_core.quant.quantize import ATTENTION_QUANTIZERS, is_quantized

    plan, replaced, report = {}, {}, ConversionReport()
    for name, module in unet.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and hasattr(module, "input_quantizer"):
            if is_quantized(module):
                real = _from_modelopt(module)
                plan[name] = _spec(real)
                replaced.update({f"{name}.{k}": v for k, v in real.state_dict().items()})
                kind = type(real).__name__
                report.counts[kind] = report.counts.get(kind, 0) + 1
            elif module.input_quantizer.pre_quant_scale is not None:
                # Smoothed, then disabled: fold the input scale back into the weight.
                replaced[f"{name}.weight"] = module.weight * module.input_quantizer.pre_quant_scale
        elif any(getattr(module, q, None) is not None for q in ATTENTION_QUANTIZERS):
            report.dropped_attention += is_quantized(module)
    plain = {k: v for k, v in unet.state_dict().items() if not _QUANTIZER_KEY.search(k)}
    real_unet = load_real(
        unet.config,
        {"format": PLAN_FORMAT, "fused_qkv": has_fused_qkv(unet), "layers": plan},
        {**plain, **replaced},
        unet_cls=type(unet),
    )
    return real_unet, report


def layer_plan(unet: torch.nn.Module) -> dict:
    """JSON-ready: which modules of a converted UNet are 8-bit, with the flags that fix their buffer shapes, and
    whether its attention projections are fused (the module tree the layer names refer to); where a build ran
    attentions, LayerNorms or GEGLUs on our kernels (`quant.attention`, `quant.layernorm`, `quant.geglu_act`), which
    and on which kernel."""
    from sdxl_core.quant import attention, geglu_act, layernorm

    layers = {name: _spec(m) for name, m in unet.named_modules() if isinstance(m, QuantizedModule)}
    plan = {"format": PLAN_FORMAT, "fused_qkv": has_fused_qkv(unet), "layers": layers}
    ours = {
        "attention": attention.fused_attentions(unet),
        "norms": layernorm.fused_norms(unet),
        "activations": geglu_act.fused_activations(unet),
    }
    for entry, fused in ours.items():
        if fused:  # only where a build fused some, so other engines' plans stay as they were
            plan[entry] = fused
    return plan


def fuse_qkv(unet: torch.nn.Module) -> torch.nn.Module:
    """Fuse the attention projections in place: one `to_qkv` GEMM per self-attention, one `to_kv` per
    cross-attention (diffusers' `fuse_qkv_projections`), then drop the unfused projections, which nothing
    runs any more, so they are neither stored nor quantized. Calibrating after fusing gives the fused layer one
    SmoothQuant scale and one input scale of its own: one quantized input, one 8-bit GEMM.

    The fused projections take the `requires_grad` of the weights they replace (diffusers makes them trainable):
    a UNet fused here and one loaded from its engine must look alike to the guards of its precompiled regions."""
    from diffusers.models.attention_processor import Attention

    attentions = [m for m in unet.modules() if isinstance(m, Attention)]
    trainable = [m.to_k.weight.requires_grad for m in attentions]
    unet.fuse_qkv_projections()
    for module, requires_grad in zip(attentions, trainable, strict=True):
        fused = module.to_kv if module.is_cross_attention else module.to_qkv
        fused.requires_grad_(requires_grad)
        for name in ("to_k", "to_v") if module.is_cross_attention else ("to_q", "to_k", "to_v"):
            setattr(module, name, None)
    return unet


def has_fused_qkv(unet: torch.nn.Module) -> bool:
    return any(hasattr(m, "to_qkv") or hasattr(m, "to_kv") for m in unet.modules())


def apply_layer_plan(plain_unet: torch.nn.Module, plan: dict) -> torch.nn.Module:
    """Replace the planned modules of a plain UNet (any device, meta included) with empty 8-bit modules of
    the right shapes, in place, so that the converted state dict loads with `strict=True`. The whole plan is
    checked first (`plan.check_layer_plan`): a plan this build would not write changes nothing."""
    plan_schema.check_layer_plan(plan)
    if plan.get("fused_qkv") and not has_fused_qkv(plain_unet):
        fuse_qkv(plain_unet)
    for name, spec in plan["layers"].items():
        cls = MODULE_TYPES.get(spec.get("type"))
        try:
            module = plain_unet.get_submodule(name)
        except AttributeError:
            module = None
        base = torch.nn.Linear if cls in (Int8Linear, Fp8Linear) else torch.nn.Conv2d
        if cls is None or type(module) is not base:
            raise UserError(
                f"layer plan does not match the UNet at {name!r} ({spec.get('type')} over "
                f"{type(module).__name__}): rebuild the engine"
            )
        quantized = cls.empty_like(module, smooth=spec["smooth"], per_channel=spec["per_channel"])
        quantized.gemm_path = spec.get("gemm", "8bit")
        quantized.kernel = spec.get("kernel", quantized.kernel)
        as_gemm = not isinstance(quantized, QConv2d) or quantized.as_gemm
        plan_schema.check_layer_kernel(name, quantized.kernel, quantized.FMT, as_gemm)
        plain_unet.set_submodule(name, quantized)
    from sdxl_core.quant import attention, geglu, geglu_act, layernorm

    geglu.apply_fusions(plain_unet)
    attention.apply_fusions(plain_unet, plan.get("attention", {}))
    geglu_act.apply_fusions(plain_unet, plan.get("activations", {}))
    layernorm.apply_fusions(plain_unet, plan.get("norms", {}))
    return plain_unet


def real_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The converted UNet's tensors, contiguous and detached (what `safetensors.torch.save_file` wants)."""
    return {k: v.detach().contiguous() for k, v in unet.state_dict().items()}


def load_real(config: dict, plan: dict, state_dict: dict[str, torch.Tensor], *, unet_cls=None) -> torch.nn.Module:
    """Rebuild a converted UNet: built on the meta device, 8-bit modules planted, tensors assigned (no copies)."""
    if unet_cls is None:
        from diffusers import UNet2DConditionModel as unet_cls
    try:
        with torch.device("meta"):
            unet = unet_cls.from_config(config)
    except Exception as exc:  # a config that diffusers cannot build from (edited, foreign)
        raise UserError(f"UNet config does not build a UNet ({str(exc).strip()[:160]}): rebuild the engine") from None
    apply_layer_plan(unet, plan)
    try:
        unet.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0][:200]
        raise UserError(f"8-bit UNet weights do not match the layer plan ({first}): rebuild the engine") from None
    left = [n for n, t in [*unet.named_parameters(), *unet.named_buffers()] if t.is_meta]
    if left:
        raise UserError(f"8-bit UNet is missing {len(left)} tensors (e.g. {left[0]}): rebuild the engine")
    # The UNet was built in the default dtype and its tensors assigned: the 8-bit layers' activation dtype is the
    # assigned float tensors' (the 8-bit layers hold none of their own to follow where they have no bias or smooth).
    activation = next(p.dtype for p in unet.parameters() if p.is_floating_point())
    for module in unet.modules():
        if isinstance(module, QuantizedModule):
            module.act_dtype = activation
    return unet.eval().requires_grad_(False)


def save(unet: torch.nn.Module, directory: Path) -> None:
    """Write UNET_FILES into `directory`: config, layer plan, tensors as they run."""
    from safetensors.torch import save_file

    directory = Path(directory)
    (directory / "unet_config.json").write_text(json.dumps(dict(unet.config), indent=1, default=list))
    (directory / "layer_plan.json").write_text(json.dumps(layer_plan(unet), indent=1, sort_keys=True))
    save_file(real_state_dict(unet), str(directory / "unet.safetensors"))


def load(engine, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The UNet `save` wrote, from a verified engine (`engines.store.Engine`: each file read once through
    `engine.read`, hashed as read, and parsed from those bytes), on `device`, with 16-bit-path weights dequantized
    once in `dtype`. The config and the plan pass their schemas before anything is built or loaded."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load as load_tensors

    config = engine.read_json(plan_schema.CONFIG_FILE)
    plan_schema.check_unet_config(config, UNet2DConditionModel)
    plan = engine.read_json(plan_schema.PLAN_FILE)
    plan_schema.check_layer_plan(plan, torch.device(device).type)
    data = engine.read("unet.safetensors")
    try:
        tensors = load_tensors(data)
    except Exception as exc:  # safetensors' own error types; a header that does not parse
        raise UserError(f"unet.safetensors is not a safetensors file ({str(exc).strip()[:120]})") from None
    del data
    if torch.device(device).type != "cpu":
        tensors = {name: tensor.to(device) for name, tensor in tensors.items()}
    unet = load_real(config, plan, tensors, unet_cls=UNet2DConditionModel)
    dequantize_weights(unet, dtype)
    return unet


def module_counts(unet: torch.nn.Module) -> Counter:
    return Counter(type(m).__name__ for m in unet.modules() if isinstance(m, QuantizedModule))


def _spec(module: QuantizedModule) -> dict:
    return {
        "type": type(module).__name__,
        "smooth": getattr(module, "smooth", None) is not None,
        "per_channel": module.per_channel,
        "gemm": module.gemm_path,
        "kernel": module.kernel,
    }


def _from_modelopt(module: torch.nn.Module) -> QuantizedModule:
    wq, iq = module.weight_quantizer, module.input_quantizer
    if wq.num_bits not in (8, (4, 3)) or iq.num_bits != wq.num_bits:
        raise UserError(f"cannot run {wq.num_bits}-bit weights with {iq.num_bits}-bit inputs as 8-bit modules")
    if iq.amax is None or iq.amax.numel() != 1 or wq.amax is None:
        raise UserError("8-bit modules need calibrated per-tensor activations and calibrated weights")
    with torch.no_grad():
        # ModelOpt's own fake-quantized weight (SmoothQuant scale folded in): re-quantizing it with the same
        # scales recovers ModelOpt's 8-bit values exactly, with no rounding ties decided differently.
        weight = wq(module.weight)
    fmt = "fp8" if wq.num_bits == (4, 3) else "int8"
    cls = {
        (True, "int8"): Int8Linear,
        (True, "fp8"): Fp8Linear,
        (False, "int8"): Int8Conv2d,
        (False, "fp8"): Fp8Conv2d,
    }[(isinstance(module, torch.nn.Linear), fmt)]
    return cls.from_float(module, weight=weight, w_amax=wq.amax, a_amax=iq.amax, smooth=iq.pre_quant_scale)


def dequantize_weights(unet: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cache the dequantized weights of the 16-bit-path layers in the activation dtype."""
    for module in unet.modules():
        if isinstance(module, QuantizedModule):
            module.dequantize_weight(dtype)
