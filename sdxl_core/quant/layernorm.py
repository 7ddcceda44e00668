"""LayerNorms on our Triton LayerNorm kernel, which can also quantize its output for the 8-bit layer it feeds
(`kernels.layernorm8`).

Each SDXL transformer block runs three LayerNorms, and each feeds one linear layer: `norm1` the fused QKV projection,
`norm2` the cross-attention's Q projection (its K and V read the text states), `norm3` the GEGLU projection. In an
8-bit engine Inductor fuses that layer's smoothing and input quantization into the norm's kernel, which on Hopper
took 2-4 us longer per call than the FP16 engine's plain LayerNorm (docs/perf.md). A LayerNorm fused here runs the
Triton kernel instead: where the layer it feeds is an 8-bit layer on an 8-bit GEMM, the kernel writes that layer's
8-bit input and the layer runs its GEMM on it as it is (`QLinear` takes an input in its own 8-bit format as already
quantized); anywhere else (an FP16 engine, a layer on the 16-bit path, a self-attention whose Q, K and V are three
layers with scales of their own) it writes the 16-bit norm. `norm2` and `norm3` follow the block's residual adds
(attention output + residual stream): fused, the kernel does that add too and writes the new residual stream beside
the norm, and the block runs `_AddNormBlock.forward` (diffusers' forward for SDXL's blocks, with the add handed to
the norm), so Inductor's own kernels for those adds are gone.

Whether that pays is measured per norm shape at build time (`choose`), as the GEMM kernels are: the unfused residual
add, norm and quantization for an 8-bit layer, compiled as the engine compiles them, against the kernel doing the
same. FP16 engines are built with the same choice, so the speed gates stay like for like. A fused norm is named in the
layer plan (`"norms": {module name: kernel}`), and `apply_fusions` fuses it again when the engine is loaded. The class
swaps leave every module and tensor as it is: the engine files change only by that plan entry.
"""

from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Callable
from typing import NamedTuple

import torch

from sdxl_core.errors import UserError
from sdxl_core.quant import fusions, qmodules
from sdxl_core.quant.attention import quantizes
from sdxl_core.quant.kernels import layernorm8, ops

KERNEL = layernorm8.KERNEL
KERNELS = (KERNEL,)
UNFUSED = fusions.UNFUSED
SIXTEEN_BIT = fusions.SIXTEEN_BIT  # the "fmt" of a row whose norm feeds a 16-bit input; also the unfused 16-bit norm
KERNEL_16BIT = f"{KERNEL}:16bit"  # the Triton kernel with a 16-bit output
# Per transformer-block norm: the path of the one layer its output feeds (`norm1` feeds one layer only where the
# self-attention's projections are fused), and whether a residual add makes its input.
_FEEDS = {"norm1": ("attn1", "to_qkv"), "norm2": ("attn2", "to_q"), "norm3": ("ff", "net", "0", "proj")}
_AFTER_RESIDUAL = {"norm1": False, "norm2": True, "norm3": True}


class _FusedLayerNormForward:
    """Mixed into a LayerNorm's own class (see `fuse`), so its parameters and state dict stay exactly as they are.
    `feeds` holds the layer its output goes to (in a tuple, so that it is not registered as a submodule)."""

    kernel = KERNEL
    feeds: tuple[torch.nn.Module | None] = (None,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        return ops.layernorm8(flat, self.weight, self.bias, self.eps, *self._output(x)).reshape(x.shape)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + residual, the norm of it) in one kernel."""
        flat, flat_residual = x.reshape(-1, x.shape[-1]), residual.reshape(-1, x.shape[-1])
        total, y = ops.add_layernorm8(flat, flat_residual, self.weight, self.bias, self.eps, *self._output(x))
        return total.reshape(x.shape), y.reshape(x.shape)

    def _output(self, x: torch.Tensor) -> tuple:
        """(smooth, inverse scale, dtype) of the output: the next layer's 8-bit input, or the 16-bit norm."""
        (layer,) = self.feeds
        if layer is not None and quantizes(layer):
            return layer.smooth, layer.a_inv_scale, qmodules.STORAGE[layer.FMT]
        return None, None, x.dtype


class _AddNormBlock:
    """Mixed into a transformer block's own class where its `norm2` or `norm3` is fused: diffusers' forward for
    SDXL's blocks (`_plain_block`), with each residual add that precedes a fused norm done by the norm's kernel."""

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        timestep=None,
        cross_attention_kwargs=None,
        class_labels=None,
        added_cond_kwargs=None,
    ):
        kwargs = dict(cross_attention_kwargs or {})
        if kwargs.pop("gligen", None) is not None:
            raise ValueError("a transformer block with norms on the LayerNorm kernel takes no GLIGEN inputs")
        norm_hidden_states = self.norm1(hidden_states)
        attn_output = self.attn1(
            norm_hidden_states, encoder_hidden_states=None, attention_mask=attention_mask, **kwargs
        )
        hidden_states, norm_hidden_states = _add_norm(self.norm2, attn_output, hidden_states)
        attn_output = self.attn2(
            norm_hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=encoder_attention_mask,
            **kwargs,
        )
        hidden_states, norm_hidden_states = _add_norm(self.norm3, attn_output, hidden_states)
        return self.ff(norm_hidden_states) + hidden_states


def _add_norm(norm, x, residual):
    if isinstance(norm, _FusedLayerNormForward):
        return norm.add_forward(x, residual)
    total = x + residual
    return total, norm(total)


def _fused_class(mixin: type, cls: type) -> type:
    return fusions.fused_class(mixin, cls, __name__)


_unfused_class = fusions.unfused_class
# A fused class is pickled by name (an engine's precompiled regions): this module makes it when it is looked up.
_FUSED_BASES = {
    "KernelFusedLayerNorm": (_FusedLayerNormForward, "torch.nn", "LayerNorm"),
    "KernelFusedBasicTransformerBlock": (_AddNormBlock, "diffusers.models.attention", "BasicTransformerBlock"),
}


def __getattr__(name: str):
    if name not in _FUSED_BASES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    mixin, module, base = _FUSED_BASES[name]
    return _fused_class(mixin, getattr(importlib.import_module(module), base))


def fusable(norm: torch.nn.Module) -> bool:
    """A LayerNorm over the last dimension with a weight and a bias, of a width the kernel takes."""
    if not isinstance(norm, torch.nn.LayerNorm) or len(norm.normalized_shape) != 1:
        return False
    return norm.weight is not None and norm.bias is not None and norm.normalized_shape[0] <= layernorm8.MAX_CHANNELS


def _plain_block(block: torch.nn.Module) -> bool:
    """A diffusers BasicTransformerBlock as SDXL's are: LayerNorms, a self- and a cross-attention, a feed-forward, no
    positional embedding or chunking. Its norms' outputs then go only to the layers `_FEEDS` names (a UNet step
    always passes the cross-attention its text states), and `_AddNormBlock.forward` is its forward."""
    from diffusers.models.attention import BasicTransformerBlock

    return (
        isinstance(block, BasicTransformerBlock)
        and block.norm_type == "layer_norm"
        and not block.only_cross_attention
        and block.pos_embed is None
        and block._chunk_size is None
        and block.attn2 is not None
        and block.attn2.is_cross_attention
    )


def _layer_at(block: torch.nn.Module, path: tuple[str, ...]) -> torch.nn.Module | None:
    module = block
    for part in path:
        module = getattr(module, part, None) if not part.isdigit() else module[int(part)]
        if module is None:
            return None
    return module


class Norm(NamedTuple):
    """A transformer-block norm the kernel can run: the LayerNorm, the layer its output feeds (None where it feeds
    several), whether a residual add makes its input, and its block."""

    norm: torch.nn.Module
    feeds: torch.nn.Module | None
    after_residual: bool
    block: torch.nn.Module


def norms(unet: torch.nn.Module) -> dict[str, Norm]:
    """{module name: `Norm`} of every transformer-block norm the kernel can run."""
    found = {}
    for name, block in unet.named_modules():
        if not _plain_block(block):
            continue
        for norm_name, path in _FEEDS.items():
            norm = getattr(block, norm_name)
            if fusable(norm):
                found[f"{name}.{norm_name}"] = Norm(norm, _layer_at(block, path), _AFTER_RESIDUAL[norm_name], block)
    return found


def fuse(found: Norm, kernel: str = KERNEL) -> None:
    """Run this norm on the kernel (with its block's residual add before it, where there is one)."""
    if kernel not in KERNELS:
        raise ValueError(f"{kernel!r} is not a LayerNorm kernel: choose one of {', '.join(KERNELS)}")
    if not fusable(found.norm):
        raise ValueError(f"this {type(found.norm).__name__} cannot run on the LayerNorm kernel (see `fusable`)")
    norm_cls = _unfused_class(_FusedLayerNormForward, type(found.norm))
    found.norm.__class__ = _fused_class(_FusedLayerNormForward, norm_cls)
    found.norm.feeds = (found.feeds,)
    if found.after_residual:
        block_cls = _unfused_class(_AddNormBlock, type(found.block))
        found.block.__class__ = _fused_class(_AddNormBlock, block_cls)


def unfuse(found: Norm) -> None:
    found.norm.__class__ = _unfused_class(_FusedLayerNormForward, type(found.norm))
    found.norm.__dict__.pop("feeds", None)
    if not any(isinstance(getattr(found.block, name), _FusedLayerNormForward) for name in ("norm2", "norm3")):
        found.block.__class__ = _unfused_class(_AddNormBlock, type(found.block))


def fused_norms(unet: torch.nn.Module) -> dict[str, str]:
    """{module name: kernel} of the fused LayerNorms: the layer plan's "norms" entry."""
    return {name: m.kernel for name, m in unet.named_modules() if isinstance(m, _FusedLayerNormForward)}


def apply_fusions(unet: torch.nn.Module, planned: dict[str, str]) -> int:
    """Fuse every LayerNorm the layer plan names (its 8-bit layers planted first); refuse the plan if one is not a
    transformer-block norm the kernel runs. Returns how many were fused."""
    found = norms(unet) if planned else {}
    for name, kernel in planned.items():
        if name not in found or kernel not in KERNELS:
            what = f"layer plan runs {name[:80]!r} on the LayerNorm kernel, which it cannot"
            raise UserError(f"{what}: rebuild the engine")
        fuse(found[name], kernel)
    return len(planned)


def choose(
    unet: torch.nn.Module,
    run_step: Callable[[], object],
    timer: Callable | None = None,
    *,
    max_error: float,
    allowed=lambda _: True,
) -> list[dict]:
    """Per distinct norm shape and output kind: the unfused norm against the kernel (`allowed` here); fuse every
    norm of that kind and shape where the kernel is faster and its output matches. One JSON-ready row per shape.
    `timer(fn, candidate, shape)` gives ms per call; by default the dispatch's own, kept in its timing cache."""
    found = norms(unet)
    if not found or not any(allowed(kernel) for kernel in KERNELS):
        return []
    by_norm = {id(entry.norm): entry for entry in found.values()}
    for entry in found.values():  # another build's choice: undone, so that every norm is called (and recorded) alike
        unfuse(entry)

    def key(norm, x):
        entry = by_norm[id(norm)]
        fmt = entry.feeds.FMT if entry.feeds is not None and quantizes(entry.feeds) else SIXTEEN_BIT
        return fmt, (x.numel() // x.shape[-1], x.shape[-1], int(entry.after_residual)), x.dtype

    def time(norm, fmt, shape, dtype, timer, cache):
        layer = by_norm[id(norm)].feeds if fmt != SIXTEEN_BIT else None
        return time_shape(norm, layer, shape, dtype, timer, cache, max_error, allowed)

    def fuse_norm(norm, kernel):
        fuse(by_norm[id(norm)], kernel)

    modules = [entry.norm for entry in found.values()]
    return fusions.choose_per_shape("layernorm", KERNEL, modules, run_step, key, time, fuse_norm, unet, timer)


def time_shape(norm, layer, shape, dtype, timer, cache, max_error, allowed=lambda _: True) -> tuple[dict, dict]:
    """({candidate: ms per call}, {kernel candidate: why it was not timed}) for a norm of `shape` = (rows, C,
    after a residual add) whose output feeds `layer` quantized (an 8-bit layer on an 8-bit GEMM) or, with `layer`
    None, in 16 bits. The unfused candidate (UNFUSED, or SIXTEEN_BIT) is the residual add, the norm and any
    quantization compiled together; the kernel candidate (KERNEL, or KERNEL_16BIT) is the kernel doing all of it,
    where the kernel runs and computes right."""
    # One compiled graph per shape and output kind: past Dynamo's limit the unfused norm would run eagerly and be
    # timed slower than the engine runs it.
    with torch._dynamo.config.patch(recompile_limit=max(torch._dynamo.config.recompile_limit, 64)):
        return _time_shape(norm, layer, shape, dtype, timer, cache, max_error, allowed)


def _time_shape(norm, layer, shape, dtype, timer, cache, max_error, allowed) -> tuple[dict, dict]:
    from sdxl_core.quant import dispatch_cache

    rows, channels, residual = shape
    device = norm.weight.device
    x = torch.randn(rows, channels, device=device, dtype=dtype) * 3 + torch.randn(rows, 1, device=device, dtype=dtype)
    r = torch.randn(rows, channels, device=device, dtype=dtype) if residual else None
    weight, bias = norm.weight.to(dtype), norm.bias.to(dtype)
    if layer is not None:
        scales, out_dtype, names = (layer.smooth, layer.a_inv_scale), qmodules.STORAGE[layer.FMT], (UNFUSED, KERNEL)
    else:
        scales, out_dtype, names = (None, None), dtype, (SIXTEEN_BIT, KERNEL_16BIT)
    args = (x, r, weight, bias, norm.eps, *scales, out_dtype)
    unfused_fn, kernel_fn = _compiled(x.is_cuda)
    timed = {names[0]: functools.partial(unfused_fn, *args)}
    rejected = {}
    if allowed(KERNEL) and layernorm8.can_run(x, weight, bias):
        candidate = functools.partial(kernel_fn, *args)
        (total, y), (ref_total, ref_y) = candidate(), timed[names[0]]()
        error = fusions.output_error(y, ref_y, layer.a_scale if layer is not None else None)
        if residual:  # the new residual stream too: the same additions, rounded alike
            error = max(error, fusions.output_error(total, ref_total, None))
        if error <= max_error:
            timed[names[1]] = candidate
        else:
            rejected[names[1]] = f"relative error {error:.2e}"
    fmt = layer.FMT if layer is not None else SIXTEEN_BIT
    ms, _ = dispatch_cache.measure(cache, timed, timer, (fmt, "layernorm", shape, dtype, False))
    return ms, rejected


def _unfused(x, residual, weight, bias, eps, smooth, inv_scale, out_dtype):
    """The residual add, the norm and the next layer's smoothing and quantization, as the unfused engine runs them:
    (the residual stream, the norm's output)."""
    if residual is not None:
        return layernorm8.add_layernorm_reference(x, residual, weight, bias, eps, smooth, inv_scale, out_dtype)
    return x, layernorm8.layernorm_reference(x, weight, bias, eps, smooth, inv_scale, out_dtype)


def _on_kernel(x, residual, weight, bias, eps, smooth, inv_scale, out_dtype):
    """The same on the kernel."""
    if residual is not None:
        return ops.add_layernorm8(x, residual, weight, bias, eps, smooth, inv_scale, out_dtype)
    return x, ops.layernorm8(x, weight, bias, eps, smooth, inv_scale, out_dtype)


@functools.cache
def _compiled(on_gpu: bool):
    """(`_unfused`, `_on_kernel`) compiled as the engine compiles its blocks (Inductor on a GPU), plain elsewhere."""
    if not on_gpu:
        return _unfused, _on_kernel
    return torch.compile(_unfused, dynamic=False), torch.compile(_on_kernel, dynamic=False)


def print_table(rows: list[dict], file=sys.stderr) -> None:
    fusions.print_table(rows, "layernorm", KERNEL, KERNEL_16BIT, file)
