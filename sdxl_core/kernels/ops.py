"""The 8-bit GEMMs as PyTorch custom ops on pre-quantized activations.

torch.compile keeps each op as one opaque call (no graph break at a Python wrapper, no tracing into the
autotuner) while the activation quantization before it stays plain torch ops that Inductor fuses into
the producer (LayerNorm, GELU, the previous epilogue): measured on H100, quantizing inside the GEMM
or as separate eager kernels cost more than the 8-bit GEMM saved (docs/perf).
"""

from __future__ import annotations

import torch

from . import conv_cutlass, fp8_gemm, int8_gemm


@torch.library.custom_op("sdxl_bench::int8_mm", mutates_args=())
def int8_mm(x_q: torch.Tensor, w_q: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
            bias: torch.Tensor | None, out_dtype: torch.dtype, kernel: str) -> torch.Tensor:
    """`kernel`: which INT8 kernel runs, one of `int8_gemm.candidate_kernels` (a constant of the compiled graph)."""
    return int8_gemm.int8_linear(x_q, w_q, a_scale, w_scale, bias, out_dtype=out_dtype, kernel=kernel)


@torch.library.custom_op("sdxl_bench::fp8_mm", mutates_args=())
def fp8_mm(x_q: torch.Tensor, w_q: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
           bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    n, k = w_q.shape
    if not x_q.is_cuda or k % 16 or n % 16:  # _scaled_mm needs multiples of 16; the reference is exact
        out = (x_q.float() @ w_q.float().T) * (a_scale.float() * w_scale.float())
        return (out if bias is None else out + bias.float()).to(out_dtype)
    if w_scale.numel() > 1:
        scale_a = a_scale.float().expand(x_q.shape[0], 1).contiguous()
        scale_b = w_scale.float().reshape(1, n)
    else:
        scale_a, scale_b = a_scale.float(), w_scale.float()
    return fp8_gemm._scaled_mm(x_q, w_q, scale_a, scale_b, bias, out_dtype, False)


@int8_mm.register_fake
@fp8_mm.register_fake
def _mm_shape(x_q, w_q, a_scale, w_scale, bias, out_dtype, kernel=None):
    return x_q.new_empty((x_q.shape[0], w_q.shape[0]), dtype=out_dtype)


@torch.library.custom_op("sdxl_bench::conv8", mutates_args=())
def conv8(x_q: torch.Tensor, w_krsc: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
          bias: torch.Tensor | None, stride: list[int], padding: list[int], out_dtype: torch.dtype,
          config: int) -> torch.Tensor:
    """The 8-bit CUTLASS conv (`conv_cutlass.conv2d`): channels-last in and out, `config` a constant."""
    return conv_cutlass.conv2d(x_q, w_krsc, a_scale, w_scale, bias, stride, padding, out_dtype, config)


@conv8.register_fake
def _conv8_shape(x_q, w_krsc, a_scale, w_scale, bias, stride, padding, out_dtype, config):
    n, _, h, w = x_q.shape
    k, r, s, _ = w_krsc.shape
    p, q = conv_cutlass.output_hw(h, w, r, s, stride, padding)
    return x_q.new_empty_strided((n, k, p, q), (p * q * k, 1, q * k, k), dtype=out_dtype)
