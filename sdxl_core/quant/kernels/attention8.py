"""Attention whose epilogue quantizes its output for the 8-bit output projection (Triton, flash-attention forward).

In an 8-bit engine each attention's output O [B, S, H*D] feeds `to_out`, an 8-bit linear layer. Unfused, cuDNN's
flash SDPA writes O in 16 bits and a separate kernel reads it back to apply `to_out`'s SmoothQuant scale and its
input quantization: nothing can absorb that pass, because cuDNN's kernel is opaque. It cost 0.68 ms of a Hopper step
(140 calls, docs/perf.md), an 8-bit-only cost. Here one kernel computes the attention and writes `to_out`'s 8-bit
input directly:

    O     = softmax(Q K^T / sqrt(D)) V          online softmax in float32, P rounded to Q's dtype for P V
    O16   = O rounded to the activation dtype   as cuDNN's output is
    y     = O16 * smooth                         in float32 (smooth: `to_out`'s SmoothQuant scale, or none)
    out_q = quantize(y, 1 / a_scale)             int8: round-half-even, clamped; fp8: clamped to +-448, e4m3

With `out_dtype` the activation dtype the kernel writes O16 instead (no smoothing, no quantization): the same
attention as a 16-bit engine's, so a build can tell whether this kernel beats cuDNN's without the quantization.

Q, K and V are [B, S, H, D] views of the projections' outputs, any strides with unit stride in D (the fused QKV
projection's output split three ways is one); the output is [B * Sq, H * D], the layout `to_out` reads. D is a
power of two from 16 to 128. No mask, no dropout, no causality: SDXL's attentions have none. CPU tensors run the
torch reference, or the kernel in the Triton interpreter when TRITON_INTERPRET=1 (as `int8_gemm` decides).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from sdxl_core.quant.kernels.epilogue8 import QUANTIZED, inverse_scale_arg, out_kind, quantize_8bit, quantize_output
from sdxl_core.quant.kernels.fp8_gemm import FP8_DTYPE
from sdxl_core.quant.kernels.int8_gemm import _INTERPRET, _QUICK, _USE_RINT

KERNEL = "attention_triton"  # the name a layer plan gives an attention that runs this kernel
_LOG2E = 1.4426950408889634


def _config(block_m: int, block_n: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


def configs(interpret: bool, quick: bool) -> list[triton.Config]:
    """Tiles for head dim 64 on Hopper (SDXL's): 128 queries per program with 64 or 128 keys per step, the
    flash-attention tutorial's; 64-query tiles for the short sequences, where 128-query tiles leave SMs idle."""
    if interpret:  # 16 x 16 keeps the interpreter's ragged test shapes multi-block in queries and keys
        return [_config(16, 16, 4, 1)]
    tiles = [
        _config(128, 64, 4, 3),
        _config(128, 64, 8, 3),
        _config(128, 128, 8, 2),
        _config(64, 64, 4, 3),
        _config(64, 128, 4, 2),
    ]
    return tiles[:1] if quick else tiles


@triton.jit
def _attention8_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    smooth_ptr,
    inv_scale_ptr,
    SQ,
    SK,
    H,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    qk_scale,
    D: tl.constexpr,
    OUT: tl.constexpr,
    HAS_SMOOTH: tl.constexpr,
    ROUND_E4M3: tl.constexpr,
    USE_RINT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, D)
    in_m = rows < SQ
    q_base = q_ptr + b * stride_qb + h * stride_qh
    q = tl.load(q_base + rows[:, None] * stride_qs + dims[None, :], mask=in_m[:, None], other=0.0)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, D), dtype=tl.float32)
    for start in range(0, SK, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        in_n = keys < SK
        k = tl.load(k_base + keys[:, None] * stride_ks + dims[None, :], mask=in_n[:, None], other=0.0)
        # Scores in log2 units: softmax(s) = exp2(s * log2(e) - max) / sum, with 1 / sqrt(D) folded in.
        s = tl.dot(q, tl.trans(k)) * qk_scale
        s = tl.where(in_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every key block holds at least one key
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + keys[:, None] * stride_vs + dims[None, :], mask=in_n[:, None], other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new

    # cuDNN's SDPA hands its output over in the activation dtype: round there too.
    o = (acc / l_i[:, None]).to(q_ptr.dtype.element_ty)
    channels = h * D + dims
    out_ptrs = out_ptr + (b * SQ + rows)[:, None] * (H * D) + channels[None, :]
    if OUT == 0:
        tl.store(out_ptrs, o, mask=in_m[:, None])
    else:
        y = o.to(tl.float32)
        if HAS_SMOOTH:
            y = y * tl.load(smooth_ptr + channels).to(tl.float32)[None, :]
        tl.store(out_ptrs, quantize_8bit(y, tl.load(inv_scale_ptr), OUT, ROUND_E4M3, USE_RINT), mask=in_m[:, None])


@functools.cache
def _autotuned(interpret: bool, quick: bool):
    return triton.autotune(configs(interpret, quick), key=["SQ", "SK", "H", "D", "OUT"])(_attention8_kernel)


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """[B, S, H, D] operands of one dtype with unit stride in D, D a power of two in 16..128, K and V alike."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or k.shape != v.shape:
        return False
    b, _, h, d = q.shape
    if k.shape[0] != b or k.shape[2] != h or k.shape[3] != d or k.shape[1] == 0:
        return False
    if d not in (16, 32, 64, 128) or not (q.dtype == k.dtype == v.dtype):
        return False
    if q.dtype not in (torch.float16, torch.bfloat16):
        return False
    return all(t.stride(3) == 1 for t in (q, k, v))


def can_run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether `attention8` runs these operands here: the kernel's rules on a GPU (or in the interpreter); off them
    it computes the torch reference, which takes any."""
    return supports(q, k, v) if q.is_cuda or _INTERPRET else q.dim() == k.dim() == v.dim() == 4


def attention_reference(q, k, v, smooth, inv_scale, out_dtype) -> torch.Tensor:
    """What the unfused engine computes from the same [B, S, H, D] operands: SDPA in the activation dtype, the
    [B * Sq, H * D] reshape, `to_out`'s smoothing and input quantization (none for a 16-bit `out_dtype`)."""
    b, sq, h, d = q.shape
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    o = o.transpose(1, 2).reshape(b * sq, h * d)
    return quantize_output(o, smooth, inv_scale, out_dtype)


def attention8(q, k, v, smooth, inv_scale, out_dtype: torch.dtype) -> torch.Tensor:
    """[B * Sq, H * D] in `out_dtype` (int8, float8_e4m3fn, or q's dtype) from [B, S, H, D] `q`, `k`, `v`, as the
    module docstring says. `smooth` ([H * D], or None) and `inv_scale` (float32, 1 / `to_out`'s a_scale) are used
    only for an 8-bit `out_dtype`."""
    quantized = out_dtype in QUANTIZED
    if out_dtype != q.dtype and not quantized:
        raise ValueError(f"attention8 writes int8, float8_e4m3fn or the activation dtype {q.dtype}, not {out_dtype}")
    if quantized and inv_scale is None:
        raise ValueError("an 8-bit attention output needs the output projection's inverse input scale")
    if not (q.is_cuda or _INTERPRET) or q.numel() == 0:
        return attention_reference(q, k, v, smooth, inv_scale, out_dtype)
    if not supports(q, k, v):
        raise ValueError(
            f"attention8 cannot run q {tuple(q.shape)} {q.dtype}, k {tuple(k.shape)}, v {tuple(v.shape)}: it takes "
            "[B, S, H, D] 16-bit operands with unit stride in D and D a power of two from 16 to 128"
        )
    b, sq, h, d = q.shape
    # The interpreter's float32 -> e4m3 cast mis-rounds: there the kernel writes the rounded values in float32 and
    # torch casts them (exact: each is an e4m3 value), as `geglu8` does.
    round_e4m3 = _INTERPRET and out_dtype == FP8_DTYPE
    out = torch.empty((b * sq, h * d), dtype=torch.float32 if round_e4m3 else out_dtype, device=q.device)
    inv_arg = inverse_scale_arg(inv_scale, quantized, out)
    smooth_arg = smooth.contiguous() if quantized and smooth is not None else inv_arg

    def grid(meta):
        return (triton.cdiv(sq, meta["BLOCK_M"]), b * h)

    _autotuned(_INTERPRET, _QUICK)[grid](
        q,
        k,
        v,
        out,
        smooth_arg,
        inv_arg,
        sq,
        k.shape[1],
        h,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        _LOG2E / math.sqrt(d),
        D=d,
        OUT=out_kind(out_dtype),
        HAS_SMOOTH=quantized and smooth is not None,
        ROUND_E4M3=round_e4m3,
        USE_RINT=_USE_RINT,
    )
    return out.to(out_dtype) if round_e4m3 else out
