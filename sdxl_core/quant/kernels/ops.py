"""The 8-bit GEMMs as PyTorch custom ops on pre-quantized activations, and the attention, LayerNorm and GEGLU that
quantize their output for them.

torch.compile keeps each op as one opaque call (no graph break at a Python wrapper, no tracing into the
autotuner) while the activation quantization before a GEMM stays plain torch ops that Inductor fuses into
the producer (LayerNorm, GELU, the previous epilogue): measured on H100, quantizing inside the GEMM
or as separate eager kernels cost more than the 8-bit GEMM saved (docs/perf). Where a build measures our own
producer kernel faster (the attention, LayerNorm and GEGLU ops below), that kernel quantizes in its epilogue instead
and the GEMM takes its output as it is.
"""

from __future__ import annotations

import torch

from sdxl_core.quant.kernels import attention8 as attention8_kernel
from sdxl_core.quant.kernels import conv_cutlass, fp8_gemm, geglu8, gemm8_cutlass, int8_gemm
from sdxl_core.quant.kernels import geglu_act8 as geglu_act8_kernel
from sdxl_core.quant.kernels import layernorm8 as layernorm8_kernel

CUTLASS_PREFIX = "cutlass:"
# The FP8 GEMM kernels a layer can name: cuBLAS through torch._scaled_mm with float32 accumulation or with
# Hopper's fast (reduced-precision) accumulation, and the CUTLASS configs ("cutlass:<config>", fast accumulation).
FP8_SCALED_MM = ("scaled_mm", "scaled_mm_fast")


@torch.library.custom_op("sdxl_bench::int8_mm", mutates_args=())
def int8_mm(
    x_q: torch.Tensor,
    w_q: torch.Tensor,
    a_scale: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    kernel: str,
) -> torch.Tensor:
    """`kernel`: which INT8 kernel runs, one of `int8_gemm.candidate_kernels` (a constant of the compiled graph)."""
    return int8_gemm.int8_linear(x_q, w_q, a_scale, w_scale, bias, out_dtype=out_dtype, kernel=kernel)


@torch.library.custom_op("sdxl_bench::fp8_mm", mutates_args=())
def fp8_mm(
    x_q: torch.Tensor,
    w_q: torch.Tensor,
    a_scale: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    kernel: str,
) -> torch.Tensor:
    """`kernel`: one of FP8_SCALED_MM or "cutlass:<config>" (a constant of the compiled graph). Off the GPU
    every kernel computes the float32 reference."""
    n, k = w_q.shape
    if kernel not in FP8_SCALED_MM and not kernel.startswith(CUTLASS_PREFIX):
        raise ValueError(f"unknown FP8 kernel {kernel!r}: choose one of {', '.join(FP8_SCALED_MM)} or cutlass:<config>")
    if x_q.is_cuda and kernel.startswith(CUTLASS_PREFIX):
        out = torch.empty((x_q.shape[0], n), dtype=out_dtype, device=x_q.device)
        a_scale, w_scale = int8_gemm.gemm_scales(a_scale, w_scale, n, x_q.device)
        return gemm8_cutlass.launch(
            x_q.contiguous(),
            w_q.contiguous(),
            out,
            a_scale,
            w_scale,
            None if bias is None else bias.to(out_dtype).contiguous(),
            kernel.removeprefix(CUTLASS_PREFIX),
        )
    if not x_q.is_cuda or k % 16 or n % 16:  # _scaled_mm needs multiples of 16; the reference is exact
        out = (x_q.float() @ w_q.float().T) * (a_scale.float() * w_scale.float())
        return (out if bias is None else out + bias.float()).to(out_dtype)
    if w_scale.numel() > 1:
        scale_a = a_scale.float().expand(x_q.shape[0], 1).contiguous()
        scale_b = w_scale.float().reshape(1, n)
    else:
        scale_a, scale_b = a_scale.float(), w_scale.float()
    return fp8_gemm._scaled_mm(x_q, w_q, scale_a, scale_b, bias, out_dtype, kernel == "scaled_mm_fast")


def fp8_candidates(x_q: torch.Tensor, w_q: torch.Tensor, out_dtype: torch.dtype) -> list[str]:
    """The `fp8_mm` kernels that can run these operands here: both _scaled_mm modes on a GPU (N and K multiples
    of 16), and the CUTLASS configs on a Hopper GPU where the FP8 library loads."""
    n, k = w_q.shape
    kernels = list(FP8_SCALED_MM) if x_q.is_cuda and not k % 16 and not n % 16 else ["scaled_mm"]
    if (
        x_q.is_cuda
        and out_dtype in gemm8_cutlass.OUT_DTYPES
        and gemm8_cutlass.supports(x_q, w_q)
        and gemm8_cutlass.available(x_q.device, "fp8")
    ):
        kernels += [CUTLASS_PREFIX + name for name in gemm8_cutlass.configs("fp8")]
    return kernels


@int8_mm.register_fake
@fp8_mm.register_fake
def _mm_shape(x_q, w_q, a_scale, w_scale, bias, out_dtype, kernel=None):
    return x_q.new_empty((x_q.shape[0], w_q.shape[0]), dtype=out_dtype)


@torch.library.custom_op("sdxl_bench::conv8", mutates_args=())
def conv8(
    x_q: torch.Tensor,
    w_krsc: torch.Tensor,
    a_scale: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    out_dtype: torch.dtype,
    config: int,
) -> torch.Tensor:
    """The 8-bit CUTLASS conv (`conv_cutlass.conv2d`): channels-last in and out, `config` a constant."""
    return conv_cutlass.conv2d(x_q, w_krsc, a_scale, w_scale, bias, stride, padding, out_dtype, config)


@conv8.register_fake
def _conv8_shape(x_q, w_krsc, a_scale, w_scale, bias, stride, padding, out_dtype, config):
    n, _, h, w = x_q.shape
    k, r, s, _ = w_krsc.shape
    p, q = conv_cutlass.output_hw(h, w, r, s, stride, padding)
    return x_q.new_empty_strided((n, k, p, q), (p * q * k, 1, q * k, k), dtype=out_dtype)


@torch.library.custom_op("sdxl_bench::geglu8", mutates_args=())
def geglu8_mm(
    x_q: torch.Tensor,
    w_q: torch.Tensor,
    a_scale: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    smooth: torch.Tensor | None,
    out_scale: torch.Tensor,
    act_dtype: torch.dtype,
) -> torch.Tensor:
    """The GEGLU projection with the GEGLU and the next layer's input quantization in the epilogue
    (`geglu8.geglu8`): [M, K] and [2F, K] 8-bit in, [M, F] 8-bit out."""
    return geglu8.geglu8(x_q, w_q, a_scale, w_scale, bias, smooth, out_scale, act_dtype)


@geglu8_mm.register_fake
def _geglu8_shape(x_q, w_q, a_scale, w_scale, bias, smooth, out_scale, act_dtype):
    return x_q.new_empty((x_q.shape[0], w_q.shape[0] // 2))


@torch.library.custom_op("sdxl_bench::geglu8_cutlass", mutates_args=())
def geglu8_cutlass(
    x_q: torch.Tensor,
    w_i: torch.Tensor,
    a_scale: torch.Tensor,
    w_scale_i: torch.Tensor,
    bias_i: torch.Tensor | None,
    smooth: torch.Tensor | None,
    out_scale: torch.Tensor,
    act_dtype: torch.dtype,
    config: str,
) -> torch.Tensor:
    """The same computation on CUTLASS (`gemm8_cutlass.launch_geglu`, `config` a constant of the compiled graph):
    W1, its scale and its bias come `gemm8_cutlass.interleave`d. Off the GPU: the torch reference."""
    if not x_q.is_cuda:
        per_row = w_scale_i.numel() > 1
        return geglu8.geglu8_reference(
            x_q,
            gemm8_cutlass.deinterleave(w_i),
            a_scale,
            gemm8_cutlass.deinterleave(w_scale_i.reshape(-1)) if per_row else w_scale_i,
            None if bias_i is None else gemm8_cutlass.deinterleave(bias_i),
            smooth,
            out_scale,
            act_dtype,
        )
    out = x_q.new_empty((x_q.shape[0], w_i.shape[0] // 2))
    scales = (a_scale, out_scale)
    a_scale, out_scale = (torch.as_tensor(t, dtype=torch.float32, device=x_q.device).reshape(1) for t in scales)
    return gemm8_cutlass.launch_geglu(
        x_q.contiguous(),
        w_i,
        out,
        a_scale,
        w_scale_i.float().reshape(-1).contiguous(),
        None if bias_i is None else bias_i.to(act_dtype).contiguous(),
        None if smooth is None else smooth.to(act_dtype).contiguous(),
        out_scale,
        act_dtype,
        config,
    )


@geglu8_cutlass.register_fake
def _geglu8_cutlass_shape(x_q, w_i, a_scale, w_scale_i, bias_i, smooth, out_scale, act_dtype, config):
    return x_q.new_empty((x_q.shape[0], w_i.shape[0] // 2))


@torch.library.custom_op("sdxl_bench::attention8", mutates_args=())
def attention8(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    smooth: torch.Tensor | None,
    inv_scale: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Attention on [B, S, H, D] views with the output projection's smoothing and input quantization in its epilogue
    (`attention8.attention8`): [B * Sq, H * D] in `out_dtype` (8-bit, or the activation dtype unquantized)."""
    return attention8_kernel.attention8(q, k, v, smooth, inv_scale, out_dtype)


@attention8.register_fake
def _attention8_shape(q, k, v, smooth, inv_scale, out_dtype):
    b, sq, h, d = q.shape
    return q.new_empty((b * sq, h * d), dtype=out_dtype)


@torch.library.custom_op("sdxl_bench::layernorm8", mutates_args=())
def layernorm8(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    smooth: torch.Tensor | None,
    inv_scale: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """LayerNorm of [M, C] with the next layer's smoothing and input quantization in its epilogue
    (`layernorm8.layernorm8`): [M, C] in `out_dtype` (8-bit, or the activation dtype unquantized)."""
    return layernorm8_kernel.layernorm8(x, weight, bias, eps, smooth, inv_scale, out_dtype)


@layernorm8.register_fake
def _layernorm8_shape(x, weight, bias, eps, smooth, inv_scale, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype)


@torch.library.custom_op("sdxl_bench::add_layernorm8", mutates_args=())
def add_layernorm8(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    smooth: torch.Tensor | None,
    inv_scale: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The block's residual add and the LayerNorm after it in one kernel (`layernorm8.add_layernorm8`): (x + residual
    [M, C] in x's dtype, the norm of it [M, C] in `out_dtype`)."""
    return layernorm8_kernel.add_layernorm8(x, residual, weight, bias, eps, smooth, inv_scale, out_dtype)


@add_layernorm8.register_fake
def _add_layernorm8_shape(x, residual, weight, bias, eps, smooth, inv_scale, out_dtype):
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(x.shape, dtype=out_dtype)


@torch.library.custom_op("sdxl_bench::geglu_act8", mutates_args=())
def geglu_act8(
    h: torch.Tensor, smooth: torch.Tensor | None, inv_scale: torch.Tensor | None, out_dtype: torch.dtype
) -> torch.Tensor:
    """The GEGLU of [M, 2F] with the next layer's smoothing and input quantization in its epilogue
    (`geglu_act8.geglu_act8`): [M, F] in `out_dtype` (8-bit, or the activation dtype unquantized)."""
    return geglu_act8_kernel.geglu_act8(h, smooth, inv_scale, out_dtype)


@geglu_act8.register_fake
def _geglu_act8_shape(h, smooth, inv_scale, out_dtype):
    return h.new_empty((h.shape[0], h.shape[1] // 2), dtype=out_dtype)
