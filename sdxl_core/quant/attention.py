"""Attentions on our Triton attention kernel, which can also quantize its output for the 8-bit output projection
(`kernels.attention8`).

In an 8-bit engine, cuDNN's flash SDPA writes each attention's output in 16 bits and a separate kernel then
applies `to_out`'s SmoothQuant scale and input quantization: 140 such passes per SDXL step, 0.68 ms on Hopper
(docs/perf.md), which the FP16 engine does not have. An attention fused here runs the Triton attention kernel;
where `to_out` is an 8-bit layer on an 8-bit GEMM, the kernel's epilogue writes `to_out`'s 8-bit input and `to_out`
runs its GEMM on it; anywhere else (an FP16 engine, a layer on the 16-bit path) the kernel writes the 16-bit output
SDPA would and `to_out` runs as it is.

Whether that pays is measured per attention shape at build time (`choose`), as the GEMM kernels are, on operands
laid out as the attention processors make them: for an 8-bit `to_out`, the unfused pair (SDPA and the quantization,
compiled as the engine compiles them) against the kernel with the quantizing epilogue; otherwise SDPA against the
kernel with a 16-bit output. FP16 engines are built with the same choice, so the speed gates stay like for like:
whatever the kernel gains over cuDNN's attention itself, FP16 gets too, and only the removed pass is the 8-bit
engines' own. A fused attention is named in the layer plan (`"attention": {module name: kernel}`), and
`apply_fusions` fuses it again when the engine is loaded. The processor swap leaves every module and tensor as it
is: the engine files change only by that plan entry.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable

import torch

from sdxl_core.errors import UserError
from sdxl_core.quant import fusions, qmodules
from sdxl_core.quant.kernels import attention8, ops
from sdxl_core.quant.kernels.epilogue8 import QUANTIZED

KERNEL = attention8.KERNEL
KERNELS = (KERNEL,)
UNFUSED = fusions.UNFUSED
SDPA = fusions.SIXTEEN_BIT  # SDPA alone, with a 16-bit output: the FP16 engine's attention unfused
KERNEL_16BIT = f"{KERNEL}:16bit"  # the Triton kernel with a 16-bit output
SIXTEEN_BIT = fusions.SIXTEEN_BIT  # the "fmt" of a row whose `to_out` takes a 16-bit input


class FusedOutputAttention:
    """An attention processor for diffusers' `Attention` (self- or cross-attention, projections fused or not) on the
    Triton kernel: `to_out`'s 8-bit input straight from the kernel where `to_out` runs an 8-bit GEMM, else the
    16-bit output. Only for attentions `fusable` accepts: no masks, norms or residual connection, unit output
    rescale, SDPA's default scale."""

    kernel = KERNEL

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if attention_mask is not None or hidden_states.dim() != 3:
            raise UserError("a fused attention takes [batch, tokens, channels] states and no attention mask")
        q, k, v = (_heads(t, attn.heads) for t in _projections(attn, hidden_states, encoder_hidden_states))
        batch, tokens, _ = hidden_states.shape
        out = attn.to_out[0]
        # The projections' dtype: the activation dtype even where a LayerNorm handed them an 8-bit input.
        if quantizes(out):
            y_q = ops.attention8(q, k, v, out.smooth, out.a_inv_scale, qmodules.STORAGE[out.FMT])
            y = out.forward_quantized(y_q, q.dtype)
        else:
            y = out(ops.attention8(q, k, v, None, None, q.dtype))
        return attn.to_out[1](y.reshape(batch, tokens, out.out_features))


def quantizes(out: torch.nn.Module) -> bool:
    """Whether the attention kernel hands this output projection its 8-bit input: an 8-bit layer on an 8-bit GEMM."""
    return isinstance(out, qmodules.QLinear) and out.runs_8bit_gemm


def _projections(attn, hidden_states, encoder_hidden_states):
    """Q, K, V [B, S, H * D] as diffusers' processors compute them (one fused QKV or KV GEMM where there is one)."""
    if encoder_hidden_states is None:
        if getattr(attn, "to_qkv", None) is not None:
            return attn.to_qkv(hidden_states).chunk(3, dim=-1)
        return attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    q = attn.to_q(hidden_states)
    if getattr(attn, "to_kv", None) is not None:
        k, v = attn.to_kv(encoder_hidden_states).chunk(2, dim=-1)
        return q, k, v
    return q, attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t.unflatten(-1, (heads, t.shape[-1] // heads))


def _default_processor(attn):
    from diffusers.models.attention_processor import AttnProcessor2_0, FusedAttnProcessor2_0

    fused = getattr(attn, "to_qkv", None) is not None or getattr(attn, "to_kv", None) is not None
    return FusedAttnProcessor2_0() if fused else AttnProcessor2_0()


def fusable(attn: torch.nn.Module) -> bool:
    """A diffusers Attention as SDXL's transformer blocks hold them, whose output projection is a linear layer
    (16-bit or 8-bit) and whose heads the kernel takes."""
    from diffusers.models.attention_processor import Attention

    if not isinstance(attn, Attention) or len(attn.to_out) != 2 or not isinstance(attn.to_out[1], torch.nn.Dropout):
        return False
    out = attn.to_out[0]
    if not isinstance(out, torch.nn.Linear | qmodules.QLinear):
        return False
    plain = all(
        getattr(attn, name, None) is None for name in ("spatial_norm", "group_norm", "norm_q", "norm_k", "norm_cross")
    )
    if not plain or attn.residual_connection or attn.rescale_output_factor != 1.0:
        return False
    if out.in_features % attn.heads:
        return False
    head_dim = out.in_features // attn.heads
    return head_dim in (16, 32, 64, 128) and math.isclose(attn.scale, head_dim**-0.5)


def fuse(attn: torch.nn.Module, kernel: str = KERNEL) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"{kernel!r} is not a fused attention kernel: choose one of {', '.join(KERNELS)}")
    if not fusable(attn):
        raise ValueError(f"this {type(attn).__name__} cannot run on the attention kernel (see `fusable`)")
    attn.set_processor(FusedOutputAttention())


def unfuse(attn: torch.nn.Module) -> None:
    attn.set_processor(_default_processor(attn))


def fused_attentions(unet: torch.nn.Module) -> dict[str, str]:
    """{module name: kernel} of the fused attentions: the layer plan's "attention" entry."""
    return {
        name: m.processor.kernel
        for name, m in unet.named_modules()
        if isinstance(getattr(m, "processor", None), FusedOutputAttention)
    }


def apply_fusions(unet: torch.nn.Module, planned: dict[str, str]) -> int:
    """Fuse every attention the layer plan names (its 8-bit layers planted first); refuse the plan if one is not
    an attention that can run fused. Returns how many were fused."""
    for name, kernel in planned.items():
        try:
            attn = unet.get_submodule(name)
        except AttributeError:
            attn = None
        if attn is None or kernel not in KERNELS or not fusable(attn):
            raise UserError(
                f"layer plan fuses {name[:80]!r} with its output projection, which it cannot: rebuild the engine"
            )
        fuse(attn, kernel)
    return len(planned)


def choose(
    unet: torch.nn.Module,
    run_step: Callable[[], object],
    timer: Callable | None = None,
    *,
    max_error: float,
    allowed=lambda _: True,
) -> list[dict]:
    """Per distinct attention shape and output projection kind: the unfused attention against the kernel
    (`allowed` here); fuse every attention of that kind and shape where the kernel is faster and its output matches.
    One JSON-ready row per shape. `timer(fn, candidate, shape)` gives ms per call; by default the dispatch's own,
    kept in its timing cache."""
    attentions = [m for m in unet.modules() if fusable(m)]
    if not attentions or not any(allowed(kernel) for kernel in KERNELS):
        return []
    for attn in attentions:  # another build's choice: undone
        if isinstance(attn.processor, FusedOutputAttention):
            unfuse(attn)

    def time(attn, fmt, shape, dtype, timer, cache):
        return time_shape(attn.to_out[0], shape, dtype, timer, cache, max_error, allowed)

    return fusions.choose_per_shape("attention", KERNEL, attentions, run_step, _shape_key, time, fuse, unet, timer)


def _fmt(out: torch.nn.Module) -> str:
    return out.FMT if quantizes(out) else SIXTEEN_BIT


def _shape_key(attn, hidden_states, encoder_hidden_states=None, **_) -> tuple:
    """(fmt, (B, Sq, Sk, H, D, cross), dtype) of an attention call; fmt is the 8-bit format the kernel would write
    for `to_out`, or SIXTEEN_BIT."""
    batch, sq, channels = hidden_states.shape
    sk = sq if encoder_hidden_states is None else encoder_hidden_states.shape[1]
    shape = (batch, sq, sk, attn.heads, channels // attn.heads, int(encoder_hidden_states is not None))
    # A fused LayerNorm may hand the projections their 8-bit input: the attention runs in their output dtype.
    dtype = attn.to_out[0].act_dtype if hidden_states.dtype in QUANTIZED else hidden_states.dtype
    return _fmt(attn.to_out[0]), shape, dtype


def operands(shape: tuple, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random Q, K, V [B, S, H, D] laid out as the processors leave them: views of one fused QKV output
    (self-attention) or of a Q and a fused KV output (cross-attention)."""
    batch, sq, sk, heads, head_dim, cross = shape
    width = heads * head_dim
    if cross:
        q = torch.randn(batch, sq, width, device=device, dtype=dtype)
        k, v = torch.randn(batch, sk, 2 * width, device=device, dtype=dtype).chunk(2, dim=-1)
    else:
        q, k, v = torch.randn(batch, sq, 3 * width, device=device, dtype=dtype).chunk(3, dim=-1)
    return tuple(_heads(t, heads) for t in (q, k, v))


def time_shape(out, shape, dtype, timer, cache, max_error, allowed=lambda _: True) -> tuple[dict, dict]:
    """({candidate: ms per call}, {kernel candidate: why it was not timed}) for the attention of `shape` = (B, Sq,
    Sk, H, D, cross) whose output projection is `out`. Always SDPA (alone); where `out` runs an 8-bit GEMM also
    UNFUSED (SDPA and `out`'s input quantization) and KERNEL (the kernel writing `out`'s 8-bit input); and
    KERNEL_16BIT (the kernel with a 16-bit output), where the kernel runs and computes right."""
    # One compiled graph per shape and 8-bit format, 8 in a process that builds INT8 and FP8 engines (more with other
    # sizes): past Dynamo's limit the unfused pair would run eagerly and be timed slower than the engine runs it.
    with torch._dynamo.config.patch(recompile_limit=max(torch._dynamo.config.recompile_limit, 64)):
        return _time_shape(out, shape, dtype, timer, cache, max_error, allowed)


def _time_shape(out, shape, dtype, timer, cache, max_error, allowed) -> tuple[dict, dict]:
    from sdxl_core.quant import dispatch_cache

    q, k, v = operands(shape, dtype, out.weight.device)
    # SDPA alone runs eagerly: compiled it is the same cuDNN call (its output's reshape is a view), and an FP16
    # build then compiles nothing here.
    timed = {SDPA: functools.partial(attention8.attention_reference, q, k, v, None, None, dtype)}
    candidates = {KERNEL_16BIT: (functools.partial(ops.attention8, q, k, v, None, None, dtype), SDPA, None)}
    if quantizes(out):
        storage = qmodules.STORAGE[out.FMT]
        pair = _compiled_reference(q.is_cuda)
        timed[UNFUSED] = lambda: pair(q, k, v, out.smooth, out.a_inv_scale, storage)
        fused = functools.partial(ops.attention8, q, k, v, out.smooth, out.a_inv_scale, storage)
        candidates[KERNEL] = (fused, UNFUSED, out.a_scale)
    rejected = {}
    if allowed(KERNEL) and attention8.can_run(q, k, v):
        for name, (fn, against, scale) in candidates.items():
            error = fusions.output_error(fn(), timed[against](), scale)
            if error <= max_error:
                timed[name] = fn
            else:
                rejected[name] = f"relative error {error:.2e}"
    ms, _ = dispatch_cache.measure(cache, timed, timer, (_fmt(out), "attention", shape, dtype, False))
    return ms, rejected


@functools.cache
def _compiled_reference(on_gpu: bool):
    """SDPA and `to_out`'s smoothing and quantization as the unfused 8-bit engine runs them: cuDNN's SDPA and one
    Inductor kernel on a GPU."""
    reference = attention8.attention_reference
    return torch.compile(reference, dynamic=False) if on_gpu else reference


def print_table(rows: list[dict], file=sys.stderr) -> None:
    fusions.print_table(rows, "attention", KERNEL, KERNEL_16BIT, file)
