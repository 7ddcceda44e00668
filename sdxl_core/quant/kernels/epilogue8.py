"""The 8-bit output of a kernel that hands the next layer its input quantized (`attention8`, `layernorm8`): the layer's
SmoothQuant scale and input quantization, in Triton (`quantize_8bit`) and in torch (`quantize_output`), as Inductor
computes them when it fuses the same ops into the producer.

    y     = o16 * smooth                 in float32 (o16: the producer's output rounded to the activation dtype)
    out_q = quantize(y, 1 / a_scale)     int8: round-half-even, clamped to [-128, 127]; fp8: clamped to +-448, e4m3
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sdxl_core.quant.kernels.fp8_gemm import FP8_DTYPE, quantize_fp8
from sdxl_core.quant.kernels.geglu8 import _round_e4m3
from sdxl_core.quant.kernels.int8_gemm import _quantize_tile, quantize_per_tensor

QUANTIZED = (torch.int8, FP8_DTYPE)
OUT_16BIT, OUT_INT8, OUT_FP8 = 0, 1, 2  # a kernel's OUT constexpr


def out_kind(out_dtype: torch.dtype) -> int:
    return {torch.int8: OUT_INT8, FP8_DTYPE: OUT_FP8}.get(out_dtype, OUT_16BIT)


@triton.jit
def quantize_8bit(y, inv_scale, OUT: tl.constexpr, ROUND_E4M3: tl.constexpr, USE_RINT: tl.constexpr):
    """y (float32, already smoothed) quantized for an OUT_INT8 or OUT_FP8 output. With ROUND_E4M3 (the interpreter,
    whose own e4m3 cast mis-rounds) the FP8 values come back rounded in float32, for the caller to cast exactly."""
    if OUT == 1:
        q = _quantize_tile(y, inv_scale, USE_RINT)
    else:
        q = tl.minimum(tl.maximum(y * inv_scale, -448.0), 448.0)
        if ROUND_E4M3:
            q = _round_e4m3(q)
        else:
            q = q.to(tl.float8e4nv)
    return q


def quantize_output(o: torch.Tensor, smooth, inv_scale, out_dtype) -> torch.Tensor:
    """The next layer's smoothing and input quantization of a producer's output [M, C] (activation dtype, or float32
    where the producer's output is not rounded first), in float32 as Inductor's fused kernel computes them; a
    16-bit `out_dtype` returns `o` as it is."""
    if out_dtype not in QUANTIZED:
        return o
    y = o.float()
    if smooth is not None:
        y = y * smooth.float()
    if out_dtype == torch.int8:
        return quantize_per_tensor(y, None, inv_scale)
    return quantize_fp8(y, None, inv_scale)


def inverse_scale_arg(inv_scale, quantized: bool, out: torch.Tensor) -> torch.Tensor:
    """The kernels' inv_scale pointer argument: 1 / a_scale as one float32, or for a 16-bit output (which never reads
    it) the output itself. A placeholder allocated per call would be a fill kernel per call: in the FP16 engine's
    profile on Hopper, 240 extra kernels per step and 0.2 ms of fills."""
    if quantized:
        return torch.as_tensor(inv_scale, dtype=torch.float32, device=out.device).reshape(1)
    return out
