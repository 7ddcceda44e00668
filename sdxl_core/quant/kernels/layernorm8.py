"""LayerNorm whose epilogue quantizes its output for the 8-bit layer it feeds (Triton, one pass per row).

Each of SDXL's 70 transformer blocks runs three LayerNorms (before the self-attention, the cross-attention and the
feed-forward), each feeding one linear layer: the fused QKV projection, the cross-attention's Q projection, the GEGLU
projection. In an 8-bit engine Inductor fuses that layer's SmoothQuant scale and input quantization into the norm's
kernel, and on Hopper that kernel took 2-4 us longer per call than the FP16 engine's plain LayerNorm (0.46 ms of a
step, docs/perf.md): Inductor loops over each 1280-channel row twice, and its default block sizes for these short
reductions are far from the best it can find when it tunes them. Here a program holds whole rows in registers, reads
each element once and writes the next layer's 8-bit input directly:

    s     = x + residual                      `add_layernorm8` only: the block's residual add before `norm2` and
                                              `norm3`, rounded to the activation dtype and written (the block's new
                                              residual stream), as the unfused add writes it
    y16   = LayerNorm(s) * weight + bias      in float32, rounded to the activation dtype as the norm's output is
    out_q = quantize(y16 * smooth)            the next layer's smoothing and input quantization (`epilogue8`)

With `out_dtype` the activation dtype the kernel writes y16 (no smoothing, no quantization): the norm as a 16-bit
engine runs it, so a build can tell whether this kernel beats Inductor's without the quantization.

x (and the residual) is [M, C] with unit stride in C (any row stride); C up to 8192. CPU tensors run the torch
reference, or the kernel in the Triton interpreter when TRITON_INTERPRET=1 (as `int8_gemm` decides).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from sdxl_core.quant.kernels.epilogue8 import QUANTIZED, inverse_scale_arg, out_kind, quantize_8bit, quantize_output
from sdxl_core.quant.kernels.fp8_gemm import FP8_DTYPE
from sdxl_core.quant.kernels.int8_gemm import _INTERPRET, _QUICK, _USE_RINT

KERNEL = "layernorm_triton"  # the name a layer plan gives a LayerNorm that runs this kernel
MAX_CHANNELS = 8192  # a row in registers: 8192 float32 values over 8 warps is 32 per thread


def _config(block_m: int, warps: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m}, num_warps=warps)


def configs(interpret: bool, quick: bool) -> list[triton.Config]:
    """Rows per program: one row per program keeps SDXL's 2048 x 1280 norm at 2048 programs (15 per SM on Hopper);
    several rows per program share the weight, bias and smoothing loads."""
    if interpret:  # 4 rows keeps the interpreter's ragged test shapes multi-program
        return [_config(4, 4)]
    tiles = [_config(1, 4), _config(2, 4), _config(4, 4), _config(4, 8), _config(8, 8)]
    return tiles[:1] if quick else tiles


@triton.jit
def _layernorm8_kernel(
    x_ptr,
    r_ptr,
    sum_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    smooth_ptr,
    inv_scale_ptr,
    M,
    C,
    stride_xm,
    stride_rm,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    OUT: tl.constexpr,
    HAS_SMOOTH: tl.constexpr,
    ROUND_E4M3: tl.constexpr,
    USE_RINT: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    in_c = cols < C
    mask = (rows < M)[:, None] & in_c[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + rows[:, None] * stride_rm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s16 = (x + r).to(x_ptr.dtype.element_ty)  # the residual stream is kept in the activation dtype
        tl.store(sum_ptr + rows[:, None] * C + cols[None, :], s16, mask=mask)
        x = s16.to(tl.float32)
    # Two passes over the registers (mean, then the centred squares), as PyTorch's LayerNorm computes the variance.
    mean = tl.sum(x, 1) / C
    centred = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, 1) / C + eps)
    w = tl.load(w_ptr + cols, mask=in_c, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=in_c, other=0.0).to(tl.float32)
    y16 = (centred * rstd[:, None] * w[None, :] + b[None, :]).to(x_ptr.dtype.element_ty)
    out_ptrs = out_ptr + rows[:, None] * C + cols[None, :]
    if OUT == 0:
        tl.store(out_ptrs, y16, mask=mask)
    else:
        y = y16.to(tl.float32)
        if HAS_SMOOTH:
            y = y * tl.load(smooth_ptr + cols, mask=in_c, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptrs, quantize_8bit(y, tl.load(inv_scale_ptr), OUT, ROUND_E4M3, USE_RINT), mask=mask)


@functools.cache
def _autotuned(interpret: bool, quick: bool):
    return triton.autotune(configs(interpret, quick), key=["M", "C", "HAS_RESIDUAL", "OUT"])(_layernorm8_kernel)


def supports(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """A 16-bit [M, C] input with unit stride in C, C <= MAX_CHANNELS, and a weight and bias of C each."""
    if x.dim() != 2 or x.dtype not in (torch.float16, torch.bfloat16) or x.stride(1) != 1:
        return False
    channels = x.shape[1]
    if not 0 < channels <= MAX_CHANNELS or weight is None or bias is None:
        return False
    return weight.shape == bias.shape == (channels,)


def can_run(x: torch.Tensor, weight, bias) -> bool:
    """Whether `layernorm8` runs this input here: the kernel's rules on a GPU (or in the interpreter); off them it
    computes the torch reference, which takes any 2-D input."""
    return supports(x, weight, bias) if x.is_cuda or _INTERPRET else x.dim() == 2


def layernorm_reference(x, weight, bias, eps: float, smooth, inv_scale, out_dtype) -> torch.Tensor:
    """What the unfused engine computes: PyTorch's LayerNorm in the activation dtype, then the next layer's smoothing
    and input quantization (none for a 16-bit `out_dtype`)."""
    y16 = F.layer_norm(x, x.shape[-1:], weight, bias, eps)
    return quantize_output(y16, smooth, inv_scale, out_dtype)


def add_layernorm_reference(x, residual, weight, bias, eps: float, smooth, inv_scale, out_dtype):
    """(x + residual, its `layernorm_reference`): the unfused block's residual add and norm."""
    s = x + residual
    return s, layernorm_reference(s, weight, bias, eps, smooth, inv_scale, out_dtype)


def layernorm8(x, weight, bias, eps: float, smooth, inv_scale, out_dtype: torch.dtype) -> torch.Tensor:
    """[M, C] in `out_dtype` (int8, float8_e4m3fn, or x's dtype) from [M, C] `x`, as the module docstring says.
    `smooth` ([C], or None) and `inv_scale` (float32, 1 / the next layer's a_scale) are used only for an 8-bit
    `out_dtype`."""
    return _run(x, None, weight, bias, eps, smooth, inv_scale, out_dtype)[1]


def add_layernorm8(x, residual, weight, bias, eps: float, smooth, inv_scale, out_dtype: torch.dtype):
    """(x + residual in x's dtype, `layernorm8` of it) in one kernel: the block's residual add and the norm after it."""
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(
            f"add_layernorm8 adds a residual like x {tuple(x.shape)} {x.dtype}, not {tuple(residual.shape)}"
        )
    return _run(x, residual, weight, bias, eps, smooth, inv_scale, out_dtype)


def _run(x, residual, weight, bias, eps, smooth, inv_scale, out_dtype) -> tuple[torch.Tensor | None, torch.Tensor]:
    quantized = out_dtype in QUANTIZED
    if out_dtype != x.dtype and not quantized:
        raise ValueError(f"layernorm8 writes int8, float8_e4m3fn or the activation dtype {x.dtype}, not {out_dtype}")
    if quantized and inv_scale is None:
        raise ValueError("an 8-bit LayerNorm output needs the next layer's inverse input scale")
    if not (x.is_cuda or _INTERPRET) or x.numel() == 0:
        if residual is None:
            return None, layernorm_reference(x, weight, bias, eps, smooth, inv_scale, out_dtype)
        return add_layernorm_reference(x, residual, weight, bias, eps, smooth, inv_scale, out_dtype)
    if not supports(x, weight, bias) or (residual is not None and residual.stride(1) != 1):
        raise ValueError(
            f"layernorm8 cannot run x {tuple(x.shape)} {x.dtype}: it takes a 16-bit [M, C] input (and residual) with "
            f"unit stride in C, C <= {MAX_CHANNELS}, and a weight and a bias of C values"
        )
    m, channels = x.shape
    # The interpreter's float32 -> e4m3 cast mis-rounds: there the kernel writes the rounded values in float32 and
    # torch casts them (exact: each is an e4m3 value), as `geglu8` does.
    round_e4m3 = _INTERPRET and out_dtype == FP8_DTYPE
    out = torch.empty((m, channels), dtype=torch.float32 if round_e4m3 else out_dtype, device=x.device)
    total = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else None
    inv_arg = inverse_scale_arg(inv_scale, quantized, out)
    smooth_arg = smooth.contiguous() if quantized and smooth is not None else inv_arg

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]),)

    _autotuned(_INTERPRET, _QUICK)[grid](
        x,
        x if residual is None else residual,
        out if total is None else total,
        weight,
        bias,
        out,
        smooth_arg,
        inv_arg,
        m,
        channels,
        x.stride(0),
        x.stride(0) if residual is None else residual.stride(0),
        eps,
        HAS_RESIDUAL=residual is not None,
        OUT=out_kind(out_dtype),
        HAS_SMOOTH=quantized and smooth is not None,
        ROUND_E4M3=round_e4m3,
        USE_RINT=_USE_RINT,
        BLOCK_C=triton.next_power_of_2(channels),
    )
    return total, (out.to(out_dtype) if round_e4m3 else out)
