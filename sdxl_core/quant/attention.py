"""Attentions whose kernel also quantizes their output for the 8-bit output projection (`kernels.attention8`).

In an 8-bit engine, cuDNN's flash SDPA writes each attention's output in 16 bits and a separate kernel then
applies `to_out`'s SmoothQuant scale and input quantization: 140 such passes per SDXL step, 0.68 ms on Hopper
(docs/perf.md), which the FP16 engine does not have. An attention fused here runs the Triton attention kernel
whose epilogue writes `to_out`'s 8-bit input, and `to_out` then runs its chosen 8-bit GEMM on it.

Whether that pays is measured per attention shape at build time (`choose`), as the GEMM kernels are: the unfused
pair (SDPA and the quantization, compiled as the engine compiles them) against the fused kernel, each on operands
laid out as the attention processors make them. Each row also times SDPA alone and the Triton kernel with a 16-bit
output: what a 16-bit engine would gain from the kernel, so that a speed-up of the kernel itself, which the FP16
engine could have too, is told apart from the quantization pass it removes. A fused attention is named in the layer
plan (`"attention": {module name: kernel}`), and `apply_fusions` fuses it again when the engine is loaded. The
processor swap leaves every module and tensor as it is: the engine files change only by that plan entry.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable

import torch

from sdxl_core.errors import UserError
from sdxl_core.quant import qmodules
from sdxl_core.quant.kernels import attention8, ops

KERNEL = attention8.KERNEL
KERNELS = (KERNEL,)
UNFUSED = "unfused"
SDPA = "16bit"  # SDPA alone, with a 16-bit output: the FP16 engine's attention (not a candidate here)
KERNEL_16BIT = f"{KERNEL}:16bit"  # the Triton kernel with a 16-bit output


class FusedOutputAttention:
    """An attention processor for diffusers' `Attention` (self- or cross-attention, projections fused or not) that
    hands `to_out` its 8-bit input from the attention kernel. Only for attentions `fusable` accepts: no masks, norms
    or residual connection, unit output rescale, SDPA's default scale."""

    kernel = KERNEL

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if attention_mask is not None or hidden_states.dim() != 3:
            raise UserError("a fused attention takes [batch, tokens, channels] states and no attention mask")
        q, k, v = _projections(attn, hidden_states, encoder_hidden_states)
        batch, tokens, _ = hidden_states.shape
        out = attn.to_out[0]
        y_q = ops.attention8(
            *(_heads(t, attn.heads) for t in (q, k, v)),
            out.smooth,
            out.a_inv_scale,
            qmodules.STORAGE[out.FMT],
        )
        y = out.forward_quantized(y_q, hidden_states.dtype).reshape(batch, tokens, out.out_features)
        return attn.to_out[1](y)


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
    """A diffusers Attention as SDXL's transformer blocks hold them, whose output projection is an 8-bit linear
    layer on an 8-bit GEMM and whose heads the kernel takes."""
    from diffusers.models.attention_processor import Attention

    if not isinstance(attn, Attention) or len(attn.to_out) != 2 or not isinstance(attn.to_out[1], torch.nn.Dropout):
        return False
    out = attn.to_out[0]
    if not isinstance(out, qmodules.QLinear) or not out.runs_8bit_gemm:
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
        raise ValueError(f"{type(attn).__name__} cannot run fused with its 8-bit output projection")
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
    """Per distinct attention shape: the unfused pair against the fused kernel (`allowed` here); fuse every
    attention of that shape where the kernel is faster and its output matches. One JSON-ready row per shape.
    `timer(fn, candidate, shape)` gives ms per call; by default the dispatch's own, kept in its timing cache."""
    from sdxl_core.quant import dispatch_cache, gemm_dispatch

    attentions = [m for m in unet.modules() if fusable(m)]
    if not attentions or not any(allowed(kernel) for kernel in KERNELS):
        return []
    cache = None
    if timer is None:
        cache = dispatch_cache.open_for(next(unet.parameters()).device)
        timer = gemm_dispatch.time_candidate
    rows = []
    for (fmt, shape, dtype), unique in sorted(_group_by_shape(attentions, run_step).items(), key=lambda i: i[0][:2]):
        with torch.inference_mode():
            ms, rejected = time_shape(unique[0].to_out[0], shape, dtype, timer, cache, max_error, allowed)
        choice = min((k for k in KERNELS if k in ms), key=ms.get, default=UNFUSED)
        if choice != UNFUSED and ms[choice] >= ms[UNFUSED]:
            choice = UNFUSED
        for attn in unique:
            fuse(attn, choice) if choice != UNFUSED else unfuse(attn)
        for kernel, why in rejected.items():
            print(f"warning: {fmt} attention {shape}: not using {kernel} ({why})", file=sys.stderr)
        rows.append(
            {
                "fmt": fmt,
                "op": "attention",
                "shape": list(shape),
                "layers": len(unique),
                "ms": {name: round(value, 5) for name, value in ms.items()},
                "choice": choice,
                "rejected": rejected,
            }
        )
    if cache is not None:
        cache.save()
    return rows


def _group_by_shape(attentions, run_step) -> dict[tuple, list[torch.nn.Module]]:
    """{(fmt, (B, Sq, Sk, H, D, cross), dtype): the attentions called so} over one `run_step()`."""
    groups: dict[tuple, list[torch.nn.Module]] = {}

    def record(attn, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        context = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
        batch, sq, channels = hidden.shape
        sk = sq if context is None else context.shape[1]
        shape = (batch, sq, sk, attn.heads, channels // attn.heads, int(context is not None))
        group = groups.setdefault((attn.to_out[0].FMT, shape, hidden.dtype), [])
        if attn not in group:
            group.append(attn)

    hooks = [m.register_forward_pre_hook(record, with_kwargs=True) for m in attentions]
    try:
        with torch.inference_mode():
            run_step()
    finally:
        for hook in hooks:
            hook.remove()
    return groups


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
    """({UNFUSED: SDPA and `out`'s input quantization, SDPA: SDPA alone, and, where it runs and computes right, KERNEL
    and KERNEL_16BIT: ms per call}, {KERNEL: why it was not timed}) for the attention of `shape` = (B, Sq, Sk, H,
    D, cross) whose output projection is `out` (an 8-bit linear layer)."""
    # One compiled graph per shape and output dtype, up to 16 in a process that builds INT8 and FP8 engines: past
    # Dynamo's default limit of 8 the unfused pair would run eagerly and be timed slower than the engine runs it.
    with torch._dynamo.config.patch(recompile_limit=max(torch._dynamo.config.recompile_limit, 64)):
        return _time_shape(out, shape, dtype, timer, cache, max_error, allowed)


def _time_shape(out, shape, dtype, timer, cache, max_error, allowed) -> tuple[dict, dict]:
    from sdxl_core.quant import dispatch_cache

    storage = qmodules.STORAGE[out.FMT]
    q, k, v = operands(shape, dtype, out.weight.device)
    unfused = _compiled_reference(q.is_cuda)
    timed = {
        UNFUSED: lambda: unfused(q, k, v, out.smooth, out.a_inv_scale, storage),
        SDPA: lambda: unfused(q, k, v, None, None, dtype),
    }
    rejected = {}
    if allowed(KERNEL) and attention8.can_run(q, k, v):
        fused = functools.partial(ops.attention8, q, k, v, out.smooth, out.a_inv_scale, storage)
        error = _relative_error(fused(), timed[UNFUSED](), out.a_scale)
        if error <= max_error:
            timed[KERNEL] = fused
            timed[KERNEL_16BIT] = functools.partial(ops.attention8, q, k, v, None, None, dtype)
        else:
            rejected[KERNEL] = f"relative error {error:.2e}"
    ms, _ = dispatch_cache.measure(cache, timed, timer, (out.FMT, "attention", shape, dtype, False))
    return ms, rejected


def _relative_error(got: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor) -> float:
    """The fused kernel's dequantized output against the unfused pair's: a right kernel differs by the attention's
    float rounding, which moves a few outputs to the neighbouring 8-bit value."""
    got_f, ref_f = got.float() * scale.float(), ref.float() * scale.float()
    return float((got_f - ref_f).norm() / ref_f.norm().clamp(min=1e-30))


@functools.cache
def _compiled_reference(on_gpu: bool):
    """SDPA and `to_out`'s smoothing and quantization as the unfused engine runs them: cuDNN's SDPA and one Inductor
    kernel on a GPU."""
    reference = attention8.attention_reference
    return torch.compile(reference, dynamic=False) if on_gpu else reference


def print_table(rows: list[dict], file=sys.stderr) -> None:
    for row in rows:
        ms = row["ms"]
        fused = f"{ms[KERNEL]:.4f}" if KERNEL in ms else "-"
        print(
            f"{row['fmt']:>4} attention {'x'.join(map(str, row['shape'])):>22} {row['layers']:>6} "
            f"unfused {ms[UNFUSED]:.4f} ms, fused {fused} ms  choice {row['choice']}",
            file=file,
        )
