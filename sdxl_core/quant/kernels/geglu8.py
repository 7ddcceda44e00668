"""The 8-bit GEGLU projection with the GEGLU and the next layer's input quantization in its epilogue (Triton).

SDXL's feed-forward is  out = W2 @ GEGLU(W1 @ x + b1) + b2  with  GEGLU(h) = h[:, :F] * gelu(h[:, F:]).
Unfused, the 8-bit W1 GEMM writes h [M, 2F] in 16 bits and a pointwise kernel reads it back, applies the GEGLU,
the second layer's SmoothQuant scale and its input quantization, and writes [M, F] in 8 bits: 9 bytes of memory
traffic per output element. Here one kernel computes both halves of h for the same F columns in two accumulators
(value and gate rows of W1 are read from their two halves, so the weight stays as stored) and writes only the
8-bit [M, F] that W2's GEMM takes: 1 byte per output element.

    h     = (A_q @ W1_q^T) * (a_scale * w_scale) + b1     rounded to the activation dtype, as the GEMM's output is
    y     = h_value * gelu(h_gate) * smooth2              in float32 (exact gelu: erf)
    out_q = quantize(y, a_scale2)                         int8: round-half-even of y * (1 / a_scale2), clamped;
                                                          fp8:  y * (1 / a_scale2) clamped to +-448, rounded to e4m3

`geglu8_reference` is the same in torch. A_q [M, K] and W1_q [2F, K] are int8 or float8_e4m3fn; w_scale is [2F]
(INT8, per channel) or a scalar (FP8); smooth2 is [F] or None. Operands load through TMA descriptors, so rows
must be 16-byte aligned (`supports`); every SDXL shape is. CPU tensors run the torch reference, or the kernel in
the Triton interpreter when TRITON_INTERPRET=1 (as `int8_gemm` decides).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from sdxl_core.quant.kernels.fp8_gemm import FP8_DTYPE, quantize_fp8
from sdxl_core.quant.kernels.int8_gemm import (
    _INTERPRET,
    _QUICK,
    _USE_RINT,
    _int32_matmul,
    _quantize_tile,
    quantize_per_tensor,
)
from sdxl_core.quant.kernels.tiles import grouped_tile, tma_config

KERNEL = "geglu_triton"  # the name a layer plan gives a projection that runs this kernel
STORAGE = {"int8": torch.int8, "fp8": FP8_DTYPE}


def configs(interpret: bool, quick: bool) -> list:
    """BLOCK_N counts output columns: each program holds two BLOCK_M x BLOCK_N accumulators (value and gate)."""
    if interpret:  # 32x16x32 keeps the interpreter's ragged test shapes multi-tile in every dimension
        return [tma_config(32, 16, 32, 1, 4)]
    # Shared memory per stage is (BLOCK_M + 2 * BLOCK_N) * BLOCK_K bytes (48 KiB for 128x64x128... 64 KiB for
    # 128x128x128), so 3 stages of the largest tile fit Hopper's 227 KiB.
    tiles = [
        tma_config(128, 128, 128, 3, 8),
        tma_config(128, 64, 128, 4, 4),
        tma_config(128, 64, 128, 4, 8),
        tma_config(64, 128, 128, 4, 4),
        tma_config(128, 128, 64, 4, 8),
        tma_config(256, 64, 128, 3, 8),
    ]
    return tiles[:1] if quick else tiles


@triton.jit
def _round_e4m3(y):
    """y (float32, already within +-448) rounded half-to-even to the nearest e4m3 value: 3 mantissa bits, and
    steps of 2**-9 below the smallest normal 2**-6. Exact in float32 (a power-of-two step). Only for the Triton
    interpreter, whose own float32 -> e4m3 cast does not round to nearest even; the GPU's conversion instruction
    (round to nearest even, saturating) gives the same values directly."""
    exponent = tl.maximum(tl.floor(tl.log2(tl.abs(y) + 1e-30)), -6.0)
    step = tl.exp2(exponent - 3.0)
    scaled = y / step
    rounded = (scaled + 12582912.0) - 12582912.0  # round half to even (|scaled| < 2**22)
    return rounded * step


@triton.jit
def _geglu8_kernel(
    a_desc,
    w_desc,
    out_ptr,
    a_scale_ptr,
    w_scale_ptr,
    bias_ptr,
    smooth_ptr,
    out_scale_ptr,
    M,
    F_COLS,
    K,
    stride_om,
    FP8: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SMOOTH: tl.constexpr,
    ROUND_E4M3: tl.constexpr,
    USE_RINT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(F_COLS, BLOCK_N), GROUP_M)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    acc_dtype = tl.float32 if FP8 else tl.int32
    acc_v = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_dtype)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_dtype)
    for k in range(tl.cdiv(K, BLOCK_K)):
        a = a_desc.load([off_m, k * BLOCK_K])
        w_v = w_desc.load([off_n, k * BLOCK_K])  # rows past F read gate rows or zeros: their columns are not stored
        w_g = w_desc.load([F_COLS + off_n, k * BLOCK_K])
        acc_v = tl.dot(a, w_v.T, acc_v, out_dtype=acc_dtype)
        acc_g = tl.dot(a, w_g.T, acc_g, out_dtype=acc_dtype)

    cols = off_n + tl.arange(0, BLOCK_N)
    in_n = cols < F_COLS
    a_scale = tl.load(a_scale_ptr)
    if PER_CHANNEL:
        scale_v = a_scale * tl.load(w_scale_ptr + cols, mask=in_n, other=0.0)
        scale_g = a_scale * tl.load(w_scale_ptr + F_COLS + cols, mask=in_n, other=0.0)
    else:
        scale_v = a_scale * tl.load(w_scale_ptr) + tl.zeros((BLOCK_N,), dtype=tl.float32)
        scale_g = scale_v
    value = acc_v.to(tl.float32) * scale_v[None, :]
    gate = acc_g.to(tl.float32) * scale_g[None, :]
    if HAS_BIAS:
        value += tl.load(bias_ptr + cols, mask=in_n, other=0.0).to(tl.float32)[None, :]
        gate += tl.load(bias_ptr + F_COLS + cols, mask=in_n, other=0.0).to(tl.float32)[None, :]
    # The unfused GEMM hands its output over in the activation dtype: round there too.
    value = value.to(bias_ptr.dtype.element_ty).to(tl.float32)
    gate = gate.to(bias_ptr.dtype.element_ty).to(tl.float32)
    y = value * (0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476)))
    if HAS_SMOOTH:
        y = y * tl.load(smooth_ptr + cols, mask=in_n, other=0.0).to(tl.float32)[None, :]
    inv_out_scale = tl.math.div_rn(1.0, tl.load(out_scale_ptr))
    if FP8:
        q = tl.minimum(tl.maximum(y * inv_out_scale, -448.0), 448.0)
        if ROUND_E4M3:
            q = _round_e4m3(q)  # stored as float32: the caller casts the e4m3 values, exactly
        else:
            q = q.to(tl.float8e4nv)
    else:
        q = _quantize_tile(y, inv_out_scale, USE_RINT)
    rows = off_m + tl.arange(0, BLOCK_M)
    out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :]
    tl.store(out_ptrs, q, mask=(rows[:, None] < M) & in_n[None, :])


@functools.cache
def _autotuned(interpret: bool, quick: bool):
    return triton.autotune(configs(interpret, quick), key=["M", "F_COLS", "K", "FP8"])(_geglu8_kernel)


def supports(x_q: torch.Tensor, w_q: torch.Tensor) -> bool:
    """TMA's rules for the 2-D 8-bit operands (rows and base addresses 16-byte aligned) and an even W1."""
    if x_q.dim() != 2 or w_q.dim() != 2 or w_q.shape[0] % 2 or x_q.shape[1] != w_q.shape[1]:
        return False
    return all(t.stride(1) == 1 and t.stride(0) % 16 == 0 and t.data_ptr() % 16 == 0 for t in (x_q, w_q))


def fmt_of(t: torch.Tensor) -> str:
    for fmt, dtype in STORAGE.items():
        if t.dtype == dtype:
            return fmt
    raise TypeError(f"expected an int8 or float8_e4m3fn tensor, got {t.dtype}")


def geglu_quantize_reference(h: torch.Tensor, smooth, out_scale, fmt: str, out_inv_scale=None) -> torch.Tensor:
    """What the unfused model computes after W1's GEMM output h [M, 2F] (activation dtype): the GEGLU in float32,
    the second layer's SmoothQuant scale, its input quantization."""
    value, gate = h.float().chunk(2, dim=-1)
    y = value * F.gelu(gate)
    if smooth is not None:
        y = y * smooth.float()
    if fmt == "int8":
        return quantize_per_tensor(y, out_scale, out_inv_scale)
    return quantize_fp8(y, out_scale, out_inv_scale)


def geglu8_reference(x_q, w_q, a_scale, w_scale, bias, smooth, out_scale, act_dtype) -> torch.Tensor:
    """The torch reference for `geglu8`: the exact 8-bit product, the epilogue in float32."""
    fmt = fmt_of(w_q)
    if fmt == "int8":
        acc = _int32_matmul(x_q, w_q).float()
    else:
        acc = x_q.float() @ w_q.float().T
    scale = torch.as_tensor(a_scale, dtype=torch.float32, device=x_q.device) * w_scale.float().reshape(-1)
    h = acc * scale
    if bias is not None:
        h = h + bias.float()
    return geglu_quantize_reference(h.to(act_dtype), smooth, out_scale, fmt)


def geglu8(x_q, w_q, a_scale, w_scale, bias, smooth, out_scale, act_dtype) -> torch.Tensor:
    """out_q [M, F] (x_q's 8-bit dtype) for x_q [M, K] and W1 w_q [2F, K], as the module docstring says.
    `bias` ([2F], activation dtype) may be None; `smooth` ([F]) may be None; `out_scale` is the second layer's
    per-tensor input scale; `act_dtype` the activation dtype the unfused GEMM would have written."""
    fmt = fmt_of(w_q)
    if x_q.dtype != w_q.dtype:
        raise TypeError(f"x_q is {x_q.dtype}, w_q is {w_q.dtype}: both must be the same 8-bit format")
    m, k = x_q.shape
    f_cols = w_q.shape[0] // 2
    if not (x_q.is_cuda or _INTERPRET) or x_q.numel() == 0:
        return geglu8_reference(x_q, w_q, a_scale, w_scale, bias, smooth, out_scale, act_dtype)
    if not supports(x_q, w_q):
        raise ValueError(f"geglu8 cannot run M={m}, K={k}, 2F={w_q.shape[0]}: needs 16-byte aligned rows")
    # The interpreter's float32 -> e4m3 cast mis-rounds (subnormals too): there the kernel writes the rounded values
    # in float32, and torch casts them (exact: each is an e4m3 value).
    round_e4m3 = _INTERPRET and fmt == "fp8"
    out = torch.empty((m, f_cols), dtype=torch.float32 if round_e4m3 else x_q.dtype, device=x_q.device)
    a_scale = torch.as_tensor(a_scale, dtype=torch.float32, device=x_q.device).reshape(1)
    out_scale = torch.as_tensor(out_scale, dtype=torch.float32, device=x_q.device).reshape(1)
    w_scale = w_scale.float().reshape(-1).contiguous()
    per_channel = w_scale.numel() > 1
    if per_channel and w_scale.numel() != 2 * f_cols:
        raise ValueError(f"w_scale has {w_scale.numel()} entries, expected 1 or 2F={2 * f_cols}")
    # The bias pointer's dtype also names the activation dtype the kernel rounds h to: pass a dummy of it.
    bias_arg = (
        bias.to(act_dtype).contiguous() if bias is not None else torch.empty(1, dtype=act_dtype, device=x_q.device)
    )
    smooth_arg = smooth.contiguous() if smooth is not None else w_scale
    placeholder = [1, 1]  # replaced per config (`tiles.tma_config`)
    a_desc = TensorDescriptor.from_tensor(x_q, placeholder)
    w_desc = TensorDescriptor.from_tensor(w_q, placeholder)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(f_cols, meta["BLOCK_N"]),)

    _autotuned(_INTERPRET, _QUICK)[grid](
        a_desc,
        w_desc,
        out,
        a_scale,
        w_scale,
        bias_arg,
        smooth_arg,
        out_scale,
        m,
        f_cols,
        k,
        out.stride(0),
        FP8=fmt == "fp8",
        PER_CHANNEL=per_channel,
        HAS_BIAS=bias is not None,
        HAS_SMOOTH=smooth is not None,
        ROUND_E4M3=round_e4m3,
        USE_RINT=_USE_RINT,
    )
    return out.to(x_q.dtype) if round_e4m3 else out
