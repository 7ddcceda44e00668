"""W8A8 INT8 GEMM in Triton: per-tensor activation scale, per-output-channel weight scale.

    out[M, N] = (A_q[M, K] @ W_q[N, K]^T) * (a_scale * w_scale[N]) + bias[N]

W_q is stored [N, K] row-major, so the B operand W_q^T is column-major: the layout that int8 tensor cores
take directly (a row-major int8 B ran 3-7x slower on H100). Accumulation is int32; dequantization and bias
happen in the epilogue. `int8_linear_fused` takes the unquantized activation and quantizes each A tile in
registers, which saves a full read + write pass over the activation.

Quantization everywhere is round-half-to-even of x * (1 / scale), both in float32. It uses the reciprocal
because that is what the fused kernel can afford per element. It equals round(x / scale) except when x / scale
lies within about an ulp of a .5 tie, and always when scale is a power of two.

Two kernels compute the pre-quantized GEMM: the pointer kernel here (one program per output tile) and the
persistent TMA kernel in `int8_tma` (Hopper). On a GPU each shape runs the one that timed faster on its first
call (`kernel_choices()` lists them); `SDXL_BENCH_INT8_KERNEL=pointer|tma` forces one.

Dispatch: CUDA tensors run Triton. CPU tensors run an exact torch reference, or the Triton kernels in the
interpreter when SDXL_BENCH_TRITON_ON_CPU=1 or TRITON_INTERPRET=1 is set before this module is imported.
"""

import os
import sys
from dataclasses import asdict, dataclass

import torch

# Triton decides between compiling and interpreting when a function is decorated, and triton.language
# decorates its own helpers (tl.cdiv, ...) on import, so the opt-in must become TRITON_INTERPRET first.
if os.environ.get("SDXL_BENCH_TRITON_ON_CPU") == "1" and os.environ.get("TRITON_INTERPRET") != "1":
    if "triton" in sys.modules:
        raise ImportError("SDXL_BENCH_TRITON_ON_CPU=1 needs TRITON_INTERPRET=1 set before triton is imported")
    os.environ["TRITON_INTERPRET"] = "1"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from . import int8_tma  # noqa: E402
from .tiles import gemm_config, grouped_tile  # noqa: E402

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

_QUICK = os.environ.get("SDXL_BENCH_AUTOTUNE") == "quick"
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
    a_ptr, w_ptr, out_ptr, a_scale_ptr, w_scale_ptr, bias_ptr,
    M, N, K,
    stride_am, stride_ak, stride_wn, stride_wk, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, QUANTIZE_A: tl.constexpr, USE_RINT: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
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


def quantize_per_tensor(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """clamp(round_half_even(x * (1 / scale)), -128, 127) as int8, computed in float32."""
    inv_scale = 1.0 / torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    return torch.round(x.float() * inv_scale).clamp_(-128, 127).to(torch.int8)


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row INT8 quantization of a [N, K] weight; returns (w_q [N, K] int8, w_scale [N] float32)."""
    w_scale = (w.float().abs().amax(dim=1) / 127.0).clamp_(min=1e-12)
    w_q = torch.round(w.float() / w_scale[:, None]).clamp_(-128, 127).to(torch.int8)
    return w_q, w_scale


def _scales(a_scale, w_scale, n, device):
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
    a_scale, w_scale = _scales(a_scale, w_scale, n, x_q.device)
    acc = _int32_matmul(x_q.reshape(-1, k), w_q)
    out = acc.float() * (a_scale * w_scale)
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype).reshape(*x_q.shape[:-1], n)


def _use_triton(x, w_q):
    if x.numel() == 0 or w_q.numel() == 0:  # nothing to launch; the reference handles the empty cases
        return False
    return x.is_cuda or (x.device.type == "cpu" and _INTERPRET)


def _launch(kernel, a, w_q, a_scale, w_scale, bias, out_dtype, quantize_a, choice=None):
    k, n = w_q.shape[1], w_q.shape[0]
    lead = a.shape[:-1]
    a = a.reshape(-1, k)
    if a.stride(-1) != 1:
        a = a.contiguous()
    w_q = w_q.contiguous()  # keeps B = W^T column-major, the fast layout
    m = a.shape[0]
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    a_scale, w_scale = _scales(a_scale, w_scale, n, a.device)
    bias_arg = bias.contiguous() if bias is not None else w_scale  # dummy pointer when HAS_BIAS is off

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    def run(name):
        if name == "tma":
            int8_tma.launch(a, w_q, out, a_scale, w_scale, bias_arg, has_bias=bias is not None,
                            interpret=_INTERPRET, quick=_QUICK)
            return
        kernel[grid](
            a, w_q, out, a_scale, w_scale, bias_arg,
            m, n, k,
            a.stride(0), a.stride(1), w_q.stride(0), w_q.stride(1), out.stride(0), out.stride(1),
            HAS_BIAS=bias is not None, QUANTIZE_A=quantize_a, USE_RINT=_USE_RINT,
        )

    run("pointer" if quantize_a else _pick_kernel(run, a, w_q, (m, n, k, out_dtype, bias is not None), choice))
    return out.reshape(*lead, n)


# ---------------------------------------------------------------- which kernel runs a pre-quantized GEMM

KERNEL_ENV = "SDXL_BENCH_INT8_KERNEL"  # "auto" (default): time both per shape on the GPU; "pointer"; "tma"
KERNELS = ("pointer", "tma")


@dataclass
class KernelChoice:
    kernel: str
    ms_pointer: float
    ms_tma: float | None  # None when the TMA kernel failed to build or run (see `error`)
    error: str | None = None


_choices: dict[tuple, KernelChoice] = {}  # (M, N, K, out dtype, has bias) -> choice, for this process


def _kernel_mode() -> str:
    mode = os.environ.get(KERNEL_ENV, "auto")
    if mode not in ("auto", *KERNELS):
        from ..errors import UserError

        raise UserError(f"{KERNEL_ENV}={mode!r}: choose auto, pointer or tma")
    return mode


def _pick_kernel(run, a, w_q, key, choice=None) -> str:
    """The kernel for this GEMM: forced by `choice` or SDXL_BENCH_INT8_KERNEL, else on a GPU the faster of
    the two, timed once per shape (first call, before any CUDA graph captures it). TMA needs aligned operands."""
    mode = choice or _kernel_mode()
    if mode not in ("auto", *KERNELS):
        raise ValueError(f"INT8 kernel {mode!r}: choose auto, pointer or tma")
    if not int8_tma.supports(a, w_q):
        return "pointer"
    if mode != "auto":
        return mode
    if not a.is_cuda or torch.cuda.is_current_stream_capturing():
        return _choices[key].kernel if key in _choices else "pointer"
    if key not in _choices:
        _choices[key] = _time_kernels(run)
    return _choices[key].kernel


def _time_kernels(run) -> KernelChoice:
    from triton.testing import do_bench

    def ms(name):
        return do_bench(lambda: run(name), warmup=10, rep=40, return_mode="median")

    ms_pointer = ms("pointer")
    try:
        ms_tma = ms("tma")
    except Exception as err:  # a TMA kernel the local Triton cannot build must not stop the engine
        return KernelChoice("pointer", ms_pointer, None, f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
    return KernelChoice("tma" if ms_tma < ms_pointer else "pointer", ms_pointer, ms_tma)


def load_choices(rows: list[dict]) -> None:
    """Take per-shape choices saved by an engine build (`kernel_choices()` rows), so a reload runs the kernel
    its build measured without timing both again."""
    from ..errors import UserError

    for row in rows:
        try:
            key = (row["M"], row["N"], row["K"], getattr(torch, row["out_dtype"]), row["bias"])
            choice = KernelChoice(row["kernel"], row["ms_pointer"], row["ms_tma"], row.get("error"))
        except (KeyError, TypeError, AttributeError) as err:
            raise UserError(f"malformed INT8 kernel choice {row!r} ({err}): rebuild the engine") from None
        if choice.kernel not in KERNELS or not isinstance(key[3], torch.dtype):
            raise UserError(f"malformed INT8 kernel choice {row!r}: rebuild the engine")
        _choices[key] = choice


def kernel_choices() -> list[dict]:
    """The per-shape choices this process made, JSON-ready (kept beside the engine's GEMM dispatch)."""
    return [{"M": m, "N": n, "K": k, "out_dtype": str(dtype).removeprefix("torch."), "bias": has_bias,
             **asdict(choice)} for (m, n, k, dtype, has_bias), choice in _choices.items()]


def _check(x, w_q, x_dtypes):
    if x.dtype not in x_dtypes:
        raise TypeError(f"activation dtype {x.dtype} not in {x_dtypes}")
    if w_q.dtype != torch.int8 or w_q.dim() != 2:
        raise TypeError(f"w_q must be a 2-D int8 [N, K] tensor, got {w_q.dtype} {tuple(w_q.shape)}")
    if x.shape[-1] != w_q.shape[1]:
        raise ValueError(f"K mismatch: x has {x.shape[-1]}, w_q has {w_q.shape[1]}")


def int8_linear(x_q, w_q, a_scale, w_scale, bias=None, out_dtype=torch.float16, kernel=None):
    """out[..., N] = (x_q @ w_q^T) * (a_scale * w_scale) + bias for int8 x_q [..., K] and int8 w_q [N, K].

    a_scale: per-tensor float32 scalar (tensor or float); w_scale: float32 [N] (or a scalar); bias: [N].
    kernel: "pointer", "tma" or "auto" (default: SDXL_BENCH_INT8_KERNEL, else "auto"); see `_pick_kernel`.
    """
    _check(x_q, w_q, (torch.int8,))
    if not _use_triton(x_q, w_q):
        return int8_linear_reference(x_q, w_q, a_scale, w_scale, bias, out_dtype)
    return _launch(_int8_gemm_kernel, x_q, w_q, a_scale, w_scale, bias, out_dtype, quantize_a=False, choice=kernel)


def int8_linear_fused(x, w_q, a_scale, w_scale, bias=None):
    """`int8_linear(quantize_per_tensor(x, a_scale), ...)` in one kernel; returns [..., N] in x's dtype."""
    _check(x, w_q, (torch.float16, torch.bfloat16, torch.float32))
    if not _use_triton(x, w_q):
        return int8_linear_reference(quantize_per_tensor(x, a_scale), w_q, a_scale, w_scale, bias, x.dtype)
    return _launch(_fused_gemm_kernel, x, w_q, a_scale, w_scale, bias, x.dtype, quantize_a=True)


def candidate_kernels(x_q, w_q) -> list[str]:
    """The kernels `int8_linear(kernel=...)` can run for these operands on their device."""
    a = x_q.reshape(-1, x_q.shape[-1])
    return ["pointer", *(["tma"] if a.is_cuda and int8_tma.supports(a, w_q) else [])]
