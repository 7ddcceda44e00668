"""W8A8 INT8 GEMM in Triton: per-tensor activation scale, per-output-channel weight scale.

    out[M, N] = (A_q[M, K] @ W_q[N, K]^T) * (a_scale * w_scale[N]) + bias[N]

W_q is stored [N, K] row-major, so the B operand W_q^T is column-major: the layout that int8 tensor cores
take directly (a row-major int8 B ran 3-7x slower on H100). Accumulation is int32; dequantization and bias
happen in the epilogue. `int8_linear_fused` takes the unquantized activation and quantizes each A tile in
registers, which saves a full read + write pass over the activation.

Quantization everywhere is round-half-to-even of x * (1 / scale), both in float32. It uses the reciprocal
because that is what the fused kernel can afford per element. It equals round(x / scale) except when x / scale
lies within about an ulp of a .5 tie, and always when scale is a power of two.

Several kernels compute the pre-quantized GEMM, named by strings: "pointer" (the Triton kernel here, one program
per output tile, any layout), "tma" (the persistent Triton kernel in `int8_tma`, Hopper) and "cutlass:<config>"
(the CUTLASS kernels in `gemm8_cutlass`, Hopper). The caller names one per call (`int8_linear(..., kernel=)`);
`candidate_kernels` lists those that can run given operands. Nothing here times or remembers a choice: which
kernel is fastest for a shape is measured once by the engine build and kept in its layer plan.

Dispatch: CUDA tensors run Triton. CPU tensors run an exact torch reference, or the Triton kernels in the
interpreter when SDXL_BENCH_TRITON_ON_CPU=1 or TRITON_INTERPRET=1 is set before this module is imported.
"""

import os

import torch
import triton
import triton.language as tl

from sdxl_core import settings
from sdxl_core.quant.kernels import gemm8_cutlass, int8_tma
from sdxl_core.quant.kernels.tiles import gemm_config, grouped_tile

try:
    from triton.language.extra import libdevice
except ImportError:  # older layouts kept it only under the cuda namespace
    try:
        from triton.language.extra.cuda import libdevice
    except ImportError:
        libdevice = None

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # also routes CPU tensors to the Triton kernels

# libdevice calls are extern functions, which the interpreter cannot run.
_USE_RINT = libdevice is not None and hasattr(libdevice, "rint") and not _INTERPRET


if _INTERPRET:
    # Autotuning in the interpreter is pointless and slow; 32x32x32 keeps ragged test shapes multi-tile.
    _INT8_CONFIGS = [gemm_config(32, 32, 32, 1, 4)]
    _FUSED_CONFIGS = _INT8_CONFIGS
else:
    # Every distinct (M, N, K) of a UNet tries each config once while the engine warms up, so the list is
    # kept to tiles that won somewhere on the H100 (FACTS.md, docs/perf) plus one for the 154-token
    # cross-attention K/V projections.
    _INT8_CONFIGS = [
        gemm_config(128, 256, 128, 3, 8),  # best measured tile on H100 for the large SDXL shapes
        gemm_config(256, 128, 128, 3, 8),
        gemm_config(128, 128, 128, 4, 8),
        gemm_config(128, 128, 64, 5, 4),  # K=320 (1x1 convs) is not a multiple of 128
        gemm_config(64, 128, 128, 4, 4),
    ]
    # The fused kernel stages A in 16 bits, so its tiles need twice the shared memory for A.
    _FUSED_CONFIGS = [
        gemm_config(128, 256, 128, 3, 8),
        gemm_config(128, 256, 64, 4, 8),
        gemm_config(128, 128, 128, 3, 8),
        gemm_config(128, 128, 64, 4, 4),
        gemm_config(64, 128, 128, 3, 4),
        gemm_config(128, 64, 128, 3, 4),
        gemm_config(64, 64, 128, 4, 4),
    ]

_QUICK = settings.autotune_quick()
if _QUICK:
    # Each new (M, N, K) autotunes every config; GPU tests over many ragged shapes take one config only.
    # The fused kernel's quick config must fit float32 A tiles too: 128x256x128 over 3 stages needed 245760
    # bytes of shared memory on the H100 (limit 232448, docs/perf/h100-2026-11-25/kernel_tests_gpu.log).
    _INT8_CONFIGS, _FUSED_CONFIGS = _INT8_CONFIGS[:1], [gemm_config(128, 128, 64, 4, 4)]


@triton.jit
def _quantize_tile(x, inv_scale, USE_RINT: tl.constexpr):
    y = x.to(tl.float32) * inv_scale
    # Clamping before rounding is equivalent because the bounds are integers.
    y = tl.minimum(tl.maximum(y, -128.0), 127.0)
    if USE_RINT:
        y = libdevice.rint(y)
    else:
        # Adding 1.5 * 2**23 leaves no fraction bits, so the FPU's round-to-nearest-even does the rounding.
        # The min/max above keeps the multiply from being contracted into an FMA with this add.
        y = (y + 12582912.0) - 12582912.0
    return y.to(tl.int8)


@triton.jit
def _w8a8_kernel(
    a_ptr,
    w_ptr,
    out_ptr,
    a_scale_ptr,
    w_scale_ptr,
    bias_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_wn,
    stride_wk,
    stride_om,
    stride_on,
    HAS_BIAS: tl.constexpr,
    QUANTIZE_A: tl.constexpr,
    USE_RINT: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Out-of-range rows and columns wrap onto valid ones, so only K needs a load mask; the store is masked.
    rows = offs_m % M
    cols = offs_n % N
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + cols[None, :] * stride_wn  # a [BLOCK_K, BLOCK_N] tile of W^T

    a_scale = tl.load(a_scale_ptr)
    inv_a_scale = tl.math.div_rn(1.0, a_scale)  # IEEE division, so it matches torch's 1 / scale bit for bit

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(w_ptrs)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0)
            b = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0)
        if QUANTIZE_A:
            a = _quantize_tile(a, inv_a_scale, USE_RINT)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    scale = a_scale * tl.load(w_scale_ptr + cols)
    out = acc.to(tl.float32) * scale[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)


def _even_k(args):
    return args["K"] % args["BLOCK_K"] == 0


# Two autotuners over one kernel body: each keeps its own cache and config list.
_int8_gemm_kernel = triton.autotune(_INT8_CONFIGS, key=["M", "N", "K"])(
    triton.heuristics({"EVEN_K": _even_k})(_w8a8_kernel)
)
_fused_gemm_kernel = triton.autotune(_FUSED_CONFIGS, key=["M", "N", "K"])(
    triton.heuristics({"EVEN_K": _even_k})(_w8a8_kernel)
)


# Adding 1.5 * 2**23 to a float32 in [-128, 127] rounds it to an integer, half to even (the sum lies in a binade
# whose spacing is 1), and leaves that integer in the low mantissa bits: the sum's bits minus the constant's.
_ROUND_MAGIC = 12582912.0
_ROUND_MAGIC_BITS = 0x4B400000


def quantize_per_tensor(
    x: torch.Tensor, scale: torch.Tensor | float, inverse: torch.Tensor | None = None
) -> torch.Tensor:
    """clamp(round_half_even(x * (1 / scale)), -128, 127) as int8, computed in float32.

    `inverse`: 1 / scale computed once beforehand (float32), as the 8-bit layers keep it. Without it the reciprocal
    is computed here, which inside a compiled producer means once per element.

    The rounding and the conversion are an addition and an integer subtraction on the float's bits, not
    round-to-integer and float-to-int instructions, which run at an eighth of the float32 rate on Hopper. Inductor
    fuses this into the producer's kernel (LayerNorm, GEGLU, GroupNorm): measured on Hopper, those kernels took
    0.43 ms less per INT8 step this way (docs/perf.md). Bit for bit what torch.round, clamp and a cast give
    (tests/unit/test_kernels.py)."""
    if inverse is None:
        inverse = 1.0 / torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    return round_to_int8(x.float() * inverse)


def round_to_int8(y: torch.Tensor) -> torch.Tensor:
    """clamp(round_half_even(y), -128, 127) as int8 for a float32 y, by the addition above and the float's bits."""
    shifted = y.clamp(-128, 127) + _ROUND_MAGIC
    return (shifted.view(torch.int32) - _ROUND_MAGIC_BITS).to(torch.int8)


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row INT8 quantization of a [N, K] weight; returns (w_q [N, K] int8, w_scale [N] float32)."""
    w_scale = (w.float().abs().amax(dim=1) / 127.0).clamp_(min=1e-12)
    w_q = torch.round(w.float() / w_scale[:, None]).clamp_(-128, 127).to(torch.int8)
    return w_q, w_scale


def gemm_scales(a_scale, w_scale, n, device):
    """The scales as the GEMM kernels take them: a_scale float32 [1], w_scale float32 [N] (a per-tensor scale
    expanded), both on `device`."""
    a_scale = torch.as_tensor(a_scale, dtype=torch.float32, device=device).reshape(1)
    w_scale = torch.as_tensor(w_scale, dtype=torch.float32, device=device).reshape(-1)
    if w_scale.numel() == 1:
        w_scale = w_scale.expand(n)
    if w_scale.numel() != n:
        raise ValueError(f"w_scale has {w_scale.numel()} entries, expected 1 or N={n}")
    return a_scale, w_scale.contiguous()


def _int32_matmul(x_q, w_q):
    if x_q.device.type == "cpu":
        return x_q.to(torch.int32) @ w_q.to(torch.int32).T
    # CUDA has no integer matmul; float64 is exact here because every partial sum is an integer below 2**53.
    return (x_q.double() @ w_q.double().T).to(torch.int32)


def int8_linear_reference(x_q, w_q, a_scale, w_scale, bias=None, out_dtype=torch.float16):
    """Exact torch reference for `int8_linear` (the int32 product is exact; the epilogue is float32)."""
    k, n = w_q.shape[1], w_q.shape[0]
    a_scale, w_scale = gemm_scales(a_scale, w_scale, n, x_q.device)
    acc = _int32_matmul(x_q.reshape(-1, k), w_q)
    out = acc.float() * (a_scale * w_scale)
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype).reshape(*x_q.shape[:-1], n)


def _use_triton(x, w_q):
    if x.numel() == 0 or w_q.numel() == 0:  # nothing to launch; the reference handles the empty cases
        return False
    return x.is_cuda or (x.device.type == "cpu" and _INTERPRET)


def _operands(x, w_q):
    """The 2-D operands the kernels take: A [M, K] with unit column stride (a copy only when it has none) and
    W [N, K] contiguous, so B = W^T is column-major, the fast layout."""
    k = w_q.shape[1]
    a = x.reshape(-1, k)
    return (a if a.stride(-1) == 1 else a.contiguous()), w_q.contiguous()


CUTLASS_PREFIX = "cutlass:"


def _candidates(a, w_q, out_dtype) -> list[str]:
    kernels = ["pointer"]
    # TMA needs Hopper or later; on a CPU the "tma" kernel runs in the Triton interpreter (or as the reference).
    tma_device = a.device.type == "cpu" or (a.is_cuda and torch.cuda.get_device_capability(a.device) >= (9, 0))
    if tma_device and int8_tma.supports(a, w_q):
        kernels.append("tma")
    if out_dtype in gemm8_cutlass.OUT_DTYPES and gemm8_cutlass.supports(a, w_q) and gemm8_cutlass.available(a.device):
        kernels += [CUTLASS_PREFIX + name for name in gemm8_cutlass.configs()]
    return kernels


def candidate_kernels(x_q: torch.Tensor, w_q: torch.Tensor, out_dtype: torch.dtype = torch.float16) -> list[str]:
    """The kernel names `int8_linear(x_q, w_q, ..., out_dtype=out_dtype, kernel=name)` accepts for these operands:
    "pointer" always; "tma" where TMA's alignment holds (on a CPU too, for the Triton interpreter); one
    "cutlass:<config>" per CUTLASS configuration on a Hopper GPU where its library loads, for float16/bfloat16
    output. On a CPU without the Triton interpreter every choice computes the torch reference."""
    _check(x_q, w_q, (torch.int8,))
    return _candidates(*_operands(x_q, w_q), out_dtype)


def _require(choice, a, w_q, out_dtype):
    choices = _candidates(a, w_q, out_dtype)
    if choice not in choices:
        raise ValueError(
            f"INT8 kernel {choice!r} cannot run this GEMM (M={a.shape[0]}, K={a.shape[1]}, "
            f"N={w_q.shape[0]}, {str(out_dtype).removeprefix('torch.')} out, {a.device}): choose "
            f"one of {', '.join(choices)}"
        )


def _launch(kernel, a, w_q, lead, a_scale, w_scale, bias, out_dtype, quantize_a, choice="pointer"):
    """Run `choice` on operands prepared by `_operands`; returns [*lead, N]."""
    (m, k), n = a.shape, w_q.shape[0]
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    a_scale, w_scale = gemm_scales(a_scale, w_scale, n, a.device)
    bias_arg = bias.contiguous() if bias is not None else w_scale  # dummy pointer when HAS_BIAS is off

    if choice == "tma":
        int8_tma.launch(
            a, w_q, out, a_scale, w_scale, bias_arg, has_bias=bias is not None, interpret=_INTERPRET, quick=_QUICK
        )
    elif choice.startswith(CUTLASS_PREFIX):
        gemm8_cutlass.launch(
            a,
            w_q,
            out,
            a_scale,
            w_scale,
            None if bias is None else bias.contiguous(),
            choice.removeprefix(CUTLASS_PREFIX),
        )
    else:

        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

        kernel[grid](
            a,
            w_q,
            out,
            a_scale,
            w_scale,
            bias_arg,
            m,
            n,
            k,
            a.stride(0),
            a.stride(1),
            w_q.stride(0),
            w_q.stride(1),
            out.stride(0),
            out.stride(1),
            HAS_BIAS=bias is not None,
            QUANTIZE_A=quantize_a,
            USE_RINT=_USE_RINT,
        )
    return out.reshape(*lead, n)


def _check(x, w_q, x_dtypes):
    if x.dtype not in x_dtypes:
        raise TypeError(f"activation dtype {x.dtype} not in {x_dtypes}")
    if w_q.dtype != torch.int8 or w_q.dim() != 2:
        raise TypeError(f"w_q must be a 2-D int8 [N, K] tensor, got {w_q.dtype} {tuple(w_q.shape)}")
    if x.shape[-1] != w_q.shape[1]:
        raise ValueError(f"K mismatch: x has {x.shape[-1]}, w_q has {w_q.shape[1]}")


def int8_linear(x_q, w_q, a_scale, w_scale, bias=None, out_dtype=torch.float16, kernel="pointer"):
    """out[..., N] = (x_q @ w_q^T) * (a_scale * w_scale) + bias for int8 x_q [..., K] and int8 w_q [N, K].

    a_scale: per-tensor float32 scalar (tensor or float); w_scale: float32 [N] (or a scalar); bias: [N].
    kernel: one of `candidate_kernels(x_q, w_q, out_dtype)` ("pointer", "tma", "cutlass:<config>"); any other
    name is a ValueError that lists them. On a CPU without the Triton interpreter the torch reference runs.
    """
    _check(x_q, w_q, (torch.int8,))
    a, w_2d = _operands(x_q, w_q)
    _require(kernel, a, w_2d, out_dtype)
    if not _use_triton(x_q, w_q):
        return int8_linear_reference(x_q, w_q, a_scale, w_scale, bias, out_dtype)
    return _launch(
        _int8_gemm_kernel, a, w_2d, x_q.shape[:-1], a_scale, w_scale, bias, out_dtype, quantize_a=False, choice=kernel
    )


def int8_linear_fused(x, w_q, a_scale, w_scale, bias=None):
    """`int8_linear(quantize_per_tensor(x, a_scale), ...)` in one kernel; returns [..., N] in x's dtype."""
    _check(x, w_q, (torch.float16, torch.bfloat16, torch.float32))
    if not _use_triton(x, w_q):
        return int8_linear_reference(quantize_per_tensor(x, a_scale), w_q, a_scale, w_scale, bias, x.dtype)
    a, w_2d = _operands(x, w_q)
    return _launch(_fused_gemm_kernel, a, w_2d, x.shape[:-1], a_scale, w_scale, bias, x.dtype, quantize_a=True)
