"""GEGLU activation whose epilogue quantizes its output for the 8-bit layer after it (Triton, pointwise).

SDXL's feed-forward is  out = W2 @ GEGLU(W1 @ x + b1) + b2  with  GEGLU(h) = h[:, :F] * gelu(h[:, F:])  (exact gelu).
Unfused, Inductor makes one pointwise kernel of the GEGLU, W2's SmoothQuant scale and its input quantization; on
Hopper it was the largest Inductor kernel of every engine, and the INT8 engine's took 0.32 ms per step longer than
the FP16 engine's, though it writes half the bytes (docs/perf.md): the kernel is bound by its arithmetic (erf), and
Inductor's runs over the output as one flat index, recomputing each element's row and column (a division and a
remainder by F) and loading the smoothing per element. Here a program takes a 2-D tile of rows and output columns:

    y     = h[:, :F] * gelu(h[:, F:])     in float32, neither factor rounded to 16 bits
    out_q = quantize(y * smooth)           the next layer's smoothing and input quantization (`epilogue8`)

which is how Inductor computes the unfused GEGLU and quantization on the GPU: it fuses the gelu, the product and the
quantization into one kernel in float32 and rounds nothing in between. With `out_dtype` the activation dtype the
kernel writes y rounded to it (no smoothing, no quantization): diffusers' GEGLU as Inductor compiles it for a 16-bit
engine, so a build can tell whether this kernel beats Inductor's without the quantization. (Eager PyTorch rounds the
gelu to 16 bits before the product; on Hopper that changed 25 % of the fp16 outputs by an ulp, so a kernel doing so
would not compute what the unfused engine does.)

h is [M, 2F] with unit stride in its columns (any row stride), F a multiple of 8. CPU tensors run the torch
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

KERNEL = "geglu_act_triton"  # the name a layer plan gives a GEGLU activation that runs this kernel


def _config(block_m: int, block_f: int, warps: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_F": block_f}, num_warps=warps)


def configs(interpret: bool, quick: bool) -> list[triton.Config]:
    """Tiles of rows x output columns: 8 bytes (fp16) per thread and load at 128 or 256 columns."""
    if interpret:  # 4 x 16 keeps the interpreter's ragged test shapes multi-tile in both dimensions
        return [_config(4, 16, 4)]
    tiles = [_config(8, 256, 4), _config(16, 256, 8), _config(32, 128, 8), _config(16, 128, 4), _config(32, 256, 8)]
    return tiles[:1] if quick else tiles


@triton.jit
def _geglu_act8_kernel(
    h_ptr,
    out_ptr,
    smooth_ptr,
    inv_scale_ptr,
    M,
    F_COLS,
    stride_hm,
    OUT: tl.constexpr,
    HAS_SMOOTH: tl.constexpr,
    ROUND_E4M3: tl.constexpr,
    USE_RINT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    in_f = cols < F_COLS
    mask = (rows < M)[:, None] & in_f[None, :]
    row_ptrs = h_ptr + rows[:, None] * stride_hm + cols[None, :]
    value = tl.load(row_ptrs, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(row_ptrs + F_COLS, mask=mask, other=0.0).to(tl.float32)
    y = value * (0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476)))
    out_ptrs = out_ptr + rows[:, None] * F_COLS + cols[None, :]
    if OUT == 0:
        tl.store(out_ptrs, y.to(h_ptr.dtype.element_ty), mask=mask)
    else:
        if HAS_SMOOTH:
            y = y * tl.load(smooth_ptr + cols, mask=in_f, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptrs, quantize_8bit(y, tl.load(inv_scale_ptr), OUT, ROUND_E4M3, USE_RINT), mask=mask)


@functools.cache
def _autotuned(interpret: bool, quick: bool):
    return triton.autotune(configs(interpret, quick), key=["M", "F_COLS", "OUT"])(_geglu_act8_kernel)


def supports(h: torch.Tensor) -> bool:
    """A 16-bit [M, 2F] input with unit stride in its columns, F a multiple of 8."""
    if h.dim() != 2 or h.dtype not in (torch.float16, torch.bfloat16) or h.stride(1) != 1:
        return False
    return h.shape[1] > 0 and h.shape[1] % 16 == 0


def can_run(h: torch.Tensor) -> bool:
    """Whether `geglu_act8` runs this input here: the kernel's rules on a GPU (or in the interpreter); off them it
    computes the torch reference, which takes any [M, 2F] input."""
    return supports(h) if h.is_cuda or _INTERPRET else h.dim() == 2 and h.shape[1] % 2 == 0


def geglu_reference(h, smooth, inv_scale, out_dtype) -> torch.Tensor:
    """What the unfused engine computes as Inductor fuses it: diffusers' GEGLU in float32 (gelu and product unrounded),
    rounded to h's dtype for a 16-bit `out_dtype`, or smoothed and quantized for the next layer."""
    value, gate = h.float().chunk(2, dim=-1)
    y = value * F.gelu(gate)
    return y.to(h.dtype) if out_dtype not in QUANTIZED else quantize_output(y, smooth, inv_scale, out_dtype)


def geglu_act8(h, smooth, inv_scale, out_dtype: torch.dtype) -> torch.Tensor:
    """[M, F] in `out_dtype` (int8, float8_e4m3fn, or h's dtype) from [M, 2F] `h`, as the module docstring says.
    `smooth` ([F], or None) and `inv_scale` (float32, 1 / the next layer's a_scale) are used only for an 8-bit
    `out_dtype`."""
    quantized = out_dtype in QUANTIZED
    if out_dtype != h.dtype and not quantized:
        raise ValueError(f"geglu_act8 writes int8, float8_e4m3fn or the activation dtype {h.dtype}, not {out_dtype}")
    if quantized and inv_scale is None:
        raise ValueError("an 8-bit GEGLU output needs the next layer's inverse input scale")
    if not (h.is_cuda or _INTERPRET) or h.numel() == 0:
        return geglu_reference(h, smooth, inv_scale, out_dtype)
    if not supports(h):
        raise ValueError(
            f"geglu_act8 cannot run h {tuple(h.shape)} {h.dtype}: it takes a 16-bit [M, 2F] input with unit stride in "
            "its columns and F a multiple of 8"
        )
    m, f = h.shape[0], h.shape[1] // 2
    # The interpreter's float32 -> e4m3 cast mis-rounds: there the kernel writes the rounded values in float32 and
    # torch casts them (exact: each is an e4m3 value), as `geglu8` does.
    round_e4m3 = _INTERPRET and out_dtype == FP8_DTYPE
    out = torch.empty((m, f), dtype=torch.float32 if round_e4m3 else out_dtype, device=h.device)
    inv_arg = inverse_scale_arg(inv_scale, quantized, out)
    smooth_arg = smooth.contiguous() if quantized and smooth is not None else inv_arg

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(f, meta["BLOCK_F"]))

    _autotuned(_INTERPRET, _QUICK)[grid](
        h,
        out,
        smooth_arg,
        inv_arg,
        m,
        f,
        h.stride(0),
        OUT=out_kind(out_dtype),
        HAS_SMOOTH=quantized and smooth is not None,
        ROUND_E4M3=round_e4m3,
        USE_RINT=_USE_RINT,
    )
    return out.to(out_dtype) if round_e4m3 else out
