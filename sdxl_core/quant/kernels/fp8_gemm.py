"""FP8 (e4m3) linear layer on top of torch._scaled_mm.

    out[..., N] = (quantize_fp8(x, a_scale) @ w_fp8^T) * (a_scale * w_scale) + bias

a_scale is per-tensor; w_scale is per-tensor or per-output-channel [N]. _scaled_mm accepts either two scalar
scales ("tensorwise") or scale_a [M, 1] with scale_b [1, N] ("rowwise"), so a per-channel w_scale is sent
with a_scale broadcast to [M, 1].
"""

import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448

# Set once a rowwise call with non-bf16 output has been refused (only the CUTLASS rowwise path, used when
# cuBLAS is older than 12.9, has that limit); later calls go straight to bf16 output and cast.
_rowwise_needs_bf16 = False


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor | float, inverse: torch.Tensor | None = None) -> torch.Tensor:
    """x * (1 / scale) clamped to +-448 and rounded to float8_e4m3fn, computed in float32.

    A multiplication by the reciprocal, as ModelOpt's FP8 fake quantization computes it (x * (448 / amax)).
    `inverse`: 1 / scale computed once beforehand (float32), as the 8-bit layers keep it; without it the reciprocal
    is computed here. Inside a compiled producer that is once per element, which measured on Hopper 0.27 ms per FP8
    step slower than a division (docs/perf.md): the engines pass the stored one."""
    if inverse is None:
        inverse = 1.0 / torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    return (x.float() * inverse).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_fp8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row e4m3 quantization of a [N, K] weight; returns (w_fp8 [N, K], w_scale [N] float32)."""
    w_scale = (w.float().abs().amax(dim=1) / FP8_MAX).clamp_(min=1e-12)
    return quantize_fp8(w, w_scale[:, None]), w_scale


def _scales(a_scale, w_scale, device):
    a_scale = torch.as_tensor(a_scale, dtype=torch.float32, device=device).reshape(())
    w_scale = torch.as_tensor(w_scale, dtype=torch.float32, device=device)
    return a_scale, (w_scale.reshape(()) if w_scale.numel() == 1 else w_scale.reshape(-1).contiguous())


def fp8_linear_reference(x, w_fp8, a_scale, w_scale, bias=None):
    """Float32 reference: both fp8 operands widened to float32 and multiplied, then the scales and bias."""
    n, k = w_fp8.shape
    a_scale, w_scale = _scales(a_scale, w_scale, x.device)
    x_fp8 = quantize_fp8(x.reshape(-1, k), a_scale)
    out = (x_fp8.float() @ w_fp8.float().T) * (a_scale * w_scale)
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], n)


def _pad_to_16(t, dim):
    """Zero-pad one dim of a 2-D tensor to a multiple of 16 (fp8 is padded through its uint8 bit pattern)."""
    pad = -t.shape[dim] % 16
    if pad == 0:
        return t
    widths = (0, pad) if dim == 1 else (0, 0, 0, pad)
    if t.dtype == FP8_DTYPE:
        return F.pad(t.view(torch.uint8), widths).view(FP8_DTYPE)
    return F.pad(t, widths)


def _scaled_mm(x_fp8, w_fp8, scale_a, scale_b, bias, out_dtype, use_fast_accum):
    global _rowwise_needs_bf16
    rowwise = scale_b.numel() > 1
    mm_dtype = torch.bfloat16 if (rowwise and _rowwise_needs_bf16) else out_dtype
    # A float32 output takes no fused bias, so it is added afterwards.
    fused_bias = bias is not None and mm_dtype != torch.float32

    def call(dtype):
        b = bias.to(dtype) if fused_bias else None
        return torch._scaled_mm(
            x_fp8, w_fp8.t(), scale_a=scale_a, scale_b=scale_b, bias=b, out_dtype=dtype, use_fast_accum=use_fast_accum
        )

    try:
        out = call(mm_dtype)
    except RuntimeError as err:
        if not (rowwise and mm_dtype != torch.bfloat16 and "bf16" in str(err)):
            raise
        _rowwise_needs_bf16 = True
        mm_dtype = torch.bfloat16
        out = call(mm_dtype)
    out = out.to(out_dtype)
    if bias is not None and not fused_bias:
        out = out + bias.to(out_dtype)
    return out


def fp8_linear(x, w_fp8, a_scale, w_scale, bias=None, *, use_fast_accum=False):
    """FP8 linear: quantize x [..., K] with a_scale, multiply by w_fp8 [N, K] (e4m3), return [..., N] in x's dtype.

    On CUDA this calls torch._scaled_mm, which needs a row-major first operand, a column-major second operand
    (w_fp8.t() of the contiguous [N, K] weight) and K, N multiples of 16. When K or N is not, both operands are
    zero-padded to the next multiple of 16 (exact, but the weight copy costs time on every call: pre-pad real
    weights instead). bf16/fp16 outputs get the bias fused; float32 outputs add it afterwards. A per-channel
    w_scale uses rowwise scaling, which needs sm89+ and, on torch builds whose cuBLAS predates 12.9, bf16
    output (the result is then computed in bf16 and cast). On CPU tensors the float32 reference runs.
    """
    if x.shape[-1] != w_fp8.shape[1] or w_fp8.dtype != FP8_DTYPE:
        raise ValueError(f"expected w_fp8 [N, {x.shape[-1]}] {FP8_DTYPE}, got {w_fp8.dtype} {tuple(w_fp8.shape)}")
    if not x.is_cuda or x.numel() == 0:
        return fp8_linear_reference(x, w_fp8, a_scale, w_scale, bias)
    n, k = w_fp8.shape
    a_scale, w_scale = _scales(a_scale, w_scale, x.device)
    x2 = _pad_to_16(x.reshape(-1, k), dim=1)
    x_fp8 = quantize_fp8(x2, a_scale)
    w_pad = _pad_to_16(_pad_to_16(w_fp8.contiguous(), dim=1), dim=0)
    n_pad = w_pad.shape[0]
    if w_scale.numel() > 1:
        scale_a = a_scale.expand(x_fp8.shape[0], 1).contiguous()
        scale_b = (F.pad(w_scale, (0, n_pad - n), value=1.0) if n_pad > n else w_scale).reshape(1, n_pad)
    else:
        scale_a, scale_b = a_scale, w_scale
    if bias is not None and n_pad > n:
        bias = F.pad(bias, (0, n_pad - n))
    out = _scaled_mm(x_fp8, w_pad, scale_a, scale_b, bias, x.dtype, use_fast_accum)
    return out[:, :n].reshape(*x.shape[:-1], n)
