"""The CUTLASS W8A8 GEMMs for Hopper (`csrc/gemm8_sm90.cu`), INT8 and FP8 (e4m3): the contract of
`int8_gemm.int8_linear` for both formats.

    out[M, N] = (A_q[M, K] @ W_q[N, K]^T) * (a_scale * w_scale[N]) + bias[N]

The format is the operands' dtype (int8 or float8_e4m3fn); each format is its own library, built from the one
source (FP8: fast accumulation, Hopper's reduced-precision adds inside the MMA, as cuBLAS and TensorRT run FP8).
A library is built by `cuda_build` (nvcc, sm_90a, CUTLASS headers from `nvidia-cutlass`) and called through
ctypes with raw device pointers and the current CUDA stream, so a launch needs no host sync and a CUDA graph can
capture it. It holds a few tile/cluster/schedule configurations (`configs()`), one chosen per call; which is
fastest for a shape is measured by whoever calls it. TMA's rules apply (`supports`): row-major operands with
16-byte aligned bases and rows (A's rows may be further apart than K, W is packed), K % 16 == 0, N % 8 == 0;
M is free. The output is packed float16 or bfloat16 and the bias, if any, has the output's dtype.

The library also holds the GEGLU projection of SDXL's feed-forward with the GEGLU and the next layer's input
quantization in the GEMM's epilogue (`launch_geglu`; the formula is in the source): it takes W1 [value; gate]
interleaved in blocks of 8 rows (`interleave`), so that a thread of the warp-group MMA holds each output column's
value and gate, and writes the 8-bit [M, F] input of the next GEMM.

The first launch of each configuration on a device sets its shared-memory limit (cudaFuncSetAttribute): run a
warm-up call before capturing a CUDA graph, as for any kernel that must be ready when captured.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from sdxl_core import hardware, settings
from sdxl_core.quant.kernels import cuda_build

LIBRARY = "gemm8_sm90"
# Only the extern "C" entry points are exported (the source marks them visible).
BUILD_FLAGS = {
    "int8": ("-Xcompiler=-fvisibility=hidden",),
    "fp8": ("-Xcompiler=-fvisibility=hidden", "-DSDXL_GEMM8_FP8=1"),
}
FORMATS = {torch.int8: "int8", torch.float8_e4m3fn: "fp8"}
# The configurations the library holds, in index order, as `csrc/gemm8_sm90.cu` names them (both formats): what
# a layer plan may name ("cutlass:<config>"), known without loading the library.
CONFIG_NAMES = (
    "coop_128x128x128",
    "coop_128x160x128",
    "coop_128x256x128",
    "pingpong_64x128x128",
    "pingpong_128x128x128_cluster2x1",
    "coop_128x160x128_cluster2x1",
)
OUT_DTYPES = (torch.float16, torch.bfloat16)
# The GEGLU GEMM's configurations, in index order (N counts W1's 2F rows).
GEGLU_CONFIG_NAMES = ("coop_128x256x128",)
# What a layer plan names for a GEGLU projection that runs one of them (`quant.geglu`).
GEGLU_PREFIX = "cutlass:geglu_"
GEGLU_KERNELS = tuple(GEGLU_PREFIX + name for name in GEGLU_CONFIG_NAMES)
INTERLEAVE = 8  # rows of value, then of gate, per block of W1 (the MMA accumulator's 8-column groups)


class CutlassError(RuntimeError):
    """The library refused or failed a GEMM; the message is the library's own one-line reason."""


def build(fmt: str = "int8") -> tuple[str, tuple[str, ...]]:
    """The `fmt` library as `cuda_build.build_all` takes it: (source name, extra nvcc flags)."""
    return LIBRARY, BUILD_FLAGS[fmt]


@functools.cache
def _library(fmt: str = "int8") -> ctypes.CDLL:
    name, flags = build(fmt)
    lib = cuda_build.library(name, extra_flags=flags)
    lib.sdxl_gemm8_format.restype = ctypes.c_char_p
    lib.sdxl_gemm8_format.argtypes = []
    if lib.sdxl_gemm8_format().decode() != fmt:  # one source, two builds: never run one format's on the other
        raise cuda_build.KernelUnavailable(f"the {fmt} GEMM library holds {lib.sdxl_gemm8_format().decode()} kernels")
    lib.sdxl_gemm8.restype = ctypes.c_int
    lib.sdxl_gemm8.argtypes = [
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_void_p,  # a, w, out
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_void_p,  # a_scale, w_scale, bias
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,  # m, n, k, lda (A's row stride)
        ctypes.c_int,
        ctypes.c_int,  # out_bf16, config
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_void_p,  # workspace, workspace bytes, stream
    ]
    lib.sdxl_gemm8_workspace.restype = ctypes.c_size_t
    lib.sdxl_gemm8_workspace.argtypes = [ctypes.c_int] * 4
    lib.sdxl_gemm8_num_configs.restype = ctypes.c_int
    lib.sdxl_gemm8_num_configs.argtypes = []
    lib.sdxl_gemm8_config_name.restype = ctypes.c_char_p
    lib.sdxl_gemm8_config_name.argtypes = [ctypes.c_int]
    lib.sdxl_last_error.restype = ctypes.c_char_p
    lib.sdxl_last_error.argtypes = []
    lib.sdxl_geglu8.restype = ctypes.c_int
    lib.sdxl_geglu8.argtypes = [
        *[ctypes.c_void_p] * 5,  # a, w, out, a_scale, w_scale
        ctypes.c_int,  # w_scale per channel
        *[ctypes.c_void_p] * 3,  # bias, smooth, out_scale
        *[ctypes.c_int] * 6,  # m, f, k, lda, act_bf16, config
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_void_p,  # workspace, workspace bytes, stream
    ]
    lib.sdxl_geglu8_workspace.restype = ctypes.c_size_t
    lib.sdxl_geglu8_workspace.argtypes = [ctypes.c_int] * 4
    lib.sdxl_geglu8_num_configs.restype = ctypes.c_int
    lib.sdxl_geglu8_num_configs.argtypes = []
    lib.sdxl_geglu8_config_name.restype = ctypes.c_char_p
    lib.sdxl_geglu8_config_name.argtypes = [ctypes.c_int]
    lib.sdxl_gemm8_set_pdl.restype = ctypes.c_int
    lib.sdxl_gemm8_set_pdl.argtypes = [ctypes.c_int]
    lib.sdxl_gemm8_set_pdl(int(settings.pdl()))
    return lib


def _last_error(lib) -> str:
    return (lib.sdxl_last_error() or b"").decode(errors="replace")


@functools.cache
def configs(fmt: str = "int8") -> tuple[str, ...]:
    """The configuration names the `fmt` library holds, in index order. Loads (building if need be) the
    library; raises `cuda_build.KernelUnavailable` where it cannot."""
    lib = _library(fmt)
    names = tuple(lib.sdxl_gemm8_config_name(i).decode() for i in range(lib.sdxl_gemm8_num_configs()))
    geglu = tuple(lib.sdxl_geglu8_config_name(i).decode() for i in range(lib.sdxl_geglu8_num_configs()))
    # A stale library: an index would run another config than the plan names.
    if names != CONFIG_NAMES or geglu != GEGLU_CONFIG_NAMES:
        raise cuda_build.KernelUnavailable(
            f"the {fmt} GEMM library holds configs {names} and GEGLU configs {geglu}, not {CONFIG_NAMES} and "
            f"{GEGLU_CONFIG_NAMES}"
        )
    return names


@functools.cache
def _available(index: int, fmt: str) -> bool:
    if not hardware.is_hopper(index):  # the library holds sm_90a code only
        return False
    try:
        configs(fmt)
    except cuda_build.KernelUnavailable:
        return False
    return True


def available(device: torch.device | str | None = None, fmt: str = "int8") -> bool:
    """Whether the CUTLASS `fmt` kernels can run on `device` (default: the current CUDA device): a CUDA device
    of compute capability 9.0 and a library that loads (built here on first use: minutes; cached afterwards)."""
    device = torch.device("cuda") if device is None else torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return _available(torch.cuda.current_device() if device.index is None else device.index, fmt)


def unavailable_reason(device: torch.device | str | None = None, fmt: str = "int8") -> str | None:
    """Why `available(device)` is False, in one line (None when it is True)."""
    device = torch.device("cuda") if device is None else torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"needs a CUDA Hopper GPU (sm_90), not {device}"
    index = torch.cuda.current_device() if device.index is None else device.index
    capability = hardware.capability(index)
    if not hardware.is_hopper(capability):
        return f"needs compute capability 9.0 (Hopper), cuda:{index} is {capability[0]}.{capability[1]}"
    try:
        configs(fmt)
    except cuda_build.KernelUnavailable as err:
        return str(err).splitlines()[0]
    return None


def _row_stride(a: torch.Tensor) -> int:
    return a.stride(0) if a.shape[0] > 1 else a.shape[1]  # one row: its stride is never used


def supports(a: torch.Tensor, w_q: torch.Tensor) -> bool:
    """The layout rules of the kernels for 2-D 8-bit operands A [M, K] and W [N, K] of one format (int8 or
    float8_e4m3fn; TMA's rules): row-major A with 16-byte aligned rows (stride(0) % 16 == 0, K % 16 == 0) and
    base, packed W with N % 8 == 0 (16-byte output rows) and a 16-byte aligned base."""
    if a.dim() != 2 or w_q.dim() != 2 or a.dtype not in FORMATS or w_q.dtype != a.dtype:
        return False
    k, n = w_q.shape[1], w_q.shape[0]
    lda = _row_stride(a)
    return (
        a.shape[1] == k
        and k % 16 == 0
        and n % 8 == 0
        and a.stride(1) == 1
        and lda % 16 == 0
        and lda >= k
        and w_q.is_contiguous()
        and a.data_ptr() % 16 == 0
        and w_q.data_ptr() % 16 == 0
    )


def _config_index(config: str, fmt: str) -> int:
    names = configs(fmt)
    if config not in names:
        raise ValueError(f"unknown CUTLASS {fmt.upper()} config {config!r}: choose one of {', '.join(names)}")
    return names.index(config)


def _check(a, w_q, out, a_scale, w_scale, bias):
    m, k = a.shape
    n = w_q.shape[0]
    if not supports(a, w_q):
        raise ValueError(
            f"CUTLASS 8-bit GEMM cannot take A {tuple(a.shape)} {a.dtype} and W {tuple(w_q.shape)} "
            f"{w_q.dtype}: needs row-major int8 or float8_e4m3fn (both alike), K % 16 == 0, N % 8 == 0, "
            f"16-byte aligned rows"
        )
    if out.dtype not in OUT_DTYPES or out.shape != (m, n) or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous float16/bfloat16 [{m}, {n}] tensor, got {out.dtype} {tuple(out.shape)}"
        )
    if a_scale.dtype != torch.float32 or a_scale.numel() != 1:
        raise ValueError(f"a_scale must be one float32 value, got {a_scale.dtype} {tuple(a_scale.shape)}")
    if w_scale.dtype != torch.float32 or w_scale.shape != (n,) or not w_scale.is_contiguous():
        raise ValueError(
            f"w_scale must be a contiguous float32 [{n}] tensor, got {w_scale.dtype} {tuple(w_scale.shape)}"
        )
    if bias is not None and (bias.dtype != out.dtype or bias.shape != (n,) or not bias.is_contiguous()):
        raise ValueError(
            f"bias must be a contiguous {out.dtype} [{n}] tensor (the output's dtype), got "
            f"{bias.dtype} {tuple(bias.shape)}"
        )
    tensors = [a, w_q, out, a_scale, w_scale] + ([bias] if bias is not None else [])
    if any(t.device != a.device for t in tensors) or a.device.type != "cuda":
        raise ValueError("every tensor must be on the same CUDA device")


def launch(a, w_q, out, a_scale, w_scale, bias, config: str) -> torch.Tensor:
    """out <- (a @ w_q^T) * (a_scale * w_scale) + bias with configuration `config` (a name from `configs()`),
    on the current stream. Operands as `int8_gemm` prepares them: a [M, K] and w_q [N, K] both int8 or both
    float8_e4m3fn (the format), a_scale a float32 one-element tensor, w_scale float32 [N], bias [N] in out's
    dtype or None; out [M, N] (packed) is written."""
    _check(a, w_q, out, a_scale, w_scale, bias)
    fmt = FORMATS[a.dtype]
    index = _config_index(config, fmt)
    lib = _library(fmt)
    m, k = a.shape
    n = w_q.shape[0]
    with torch.cuda.device(a.device):
        size = lib.sdxl_gemm8_workspace(m, n, k, index)
        if size == ctypes.c_size_t(-1).value:
            raise CutlassError(f"CUTLASS {fmt.upper()} GEMM {config}: {_last_error(lib)}")
        workspace = torch.empty(size, dtype=torch.uint8, device=a.device) if size else None
        code = lib.sdxl_gemm8(
            a.data_ptr(),
            w_q.data_ptr(),
            out.data_ptr(),
            a_scale.data_ptr(),
            w_scale.data_ptr(),
            None if bias is None else bias.data_ptr(),
            m,
            n,
            k,
            _row_stride(a),
            int(out.dtype == torch.bfloat16),
            index,
            None if workspace is None else workspace.data_ptr(),
            size,
            torch.cuda.current_stream().cuda_stream,
        )
    if code != 0:
        raise CutlassError(f"CUTLASS {fmt.upper()} GEMM {config} (M={m}, N={n}, K={k}) failed: {_last_error(lib)}")
    return out


def interleave(t: torch.Tensor) -> torch.Tensor:
    """W1 [2F, ...] = [value; gate] (or its per-row scale or bias [2F]) as the GEGLU GEMM takes it: blocks of
    `INTERLEAVE` value rows, each followed by the gate rows of the same output columns. F % INTERLEAVE == 0."""
    f = t.shape[0] // 2
    if t.shape[0] % 2 or f % INTERLEAVE:
        raise ValueError(f"W1 has {t.shape[0]} rows: the GEGLU GEMM needs 2F rows with F % {INTERLEAVE} == 0")
    value, gate = t[:f], t[f:]
    blocks = (f // INTERLEAVE, 1, INTERLEAVE, *t.shape[1:])
    return torch.cat([value.reshape(blocks), gate.reshape(blocks)], dim=1).reshape(t.shape).contiguous()


def deinterleave(t: torch.Tensor) -> torch.Tensor:
    """`interleave`'s inverse: [value; gate] again."""
    f = t.shape[0] // 2
    pairs = t.reshape(f // INTERLEAVE, 2, INTERLEAVE, *t.shape[1:])
    return torch.cat([pairs[:, 0].reshape(f, *t.shape[1:]), pairs[:, 1].reshape(f, *t.shape[1:])])


def geglu_supports(a: torch.Tensor, w_i: torch.Tensor) -> bool:
    """The GEGLU GEMM's rules: `supports` for A and the interleaved W1, whose 2F rows hold whole blocks."""
    return supports(a, w_i) and w_i.shape[0] % (2 * INTERLEAVE) == 0


def launch_geglu(a, w_i, out, a_scale, w_scale_i, bias_i, smooth, out_scale, act_dtype, config: str) -> torch.Tensor:
    """out [M, F] (a's 8-bit dtype, packed) <- the GEGLU projection with the next layer's input quantization, with
    GEGLU configuration `config`, on the current stream. a [M, K] and w_i [2F, K] (`interleave`d) 8-bit of one
    format; a_scale and out_scale float32 one-element tensors; w_scale_i float32 [2F] (interleaved) or one value;
    bias_i [2F] (interleaved) and smooth [F] in `act_dtype`, or None."""
    if not geglu_supports(a, w_i):
        raise ValueError(
            f"the CUTLASS GEGLU GEMM cannot take A {tuple(a.shape)} {a.dtype} and W1 {tuple(w_i.shape)} {w_i.dtype}"
        )
    fmt = FORMATS[a.dtype]
    m, k = a.shape
    f = w_i.shape[0] // 2
    if out.dtype != a.dtype or out.shape != (m, f) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {a.dtype} [{m}, {f}] tensor, got {out.dtype} {tuple(out.shape)}")
    if act_dtype not in OUT_DTYPES:
        raise ValueError(f"the activation dtype must be float16 or bfloat16, not {act_dtype}")
    for name, t in (("a_scale", a_scale), ("out_scale", out_scale)):
        if t.dtype != torch.float32 or t.numel() != 1:
            raise ValueError(f"{name} must be one float32 value, got {t.dtype} {tuple(t.shape)}")
    if w_scale_i.dtype != torch.float32 or w_scale_i.numel() not in (1, 2 * f) or not w_scale_i.is_contiguous():
        raise ValueError(f"w_scale must be a contiguous float32 tensor of 1 or 2F={2 * f} values")
    for name, t, n in (("bias", bias_i, 2 * f), ("smooth", smooth, f)):
        if t is not None and (t.dtype != act_dtype or t.shape != (n,) or not t.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous {act_dtype} [{n}] tensor")
    if config not in GEGLU_CONFIG_NAMES:
        raise ValueError(f"unknown CUTLASS GEGLU config {config!r}: choose one of {', '.join(GEGLU_CONFIG_NAMES)}")
    configs(fmt)  # the library holds the configs this module names
    lib = _library(fmt)
    index = GEGLU_CONFIG_NAMES.index(config)
    with torch.cuda.device(a.device):
        size = lib.sdxl_geglu8_workspace(m, f, k, index)
        if size == ctypes.c_size_t(-1).value:
            raise CutlassError(f"CUTLASS {fmt.upper()} GEGLU GEMM {config}: {_last_error(lib)}")
        workspace = torch.empty(size, dtype=torch.uint8, device=a.device) if size else None
        code = lib.sdxl_geglu8(
            a.data_ptr(),
            w_i.data_ptr(),
            out.data_ptr(),
            a_scale.data_ptr(),
            w_scale_i.data_ptr(),
            int(w_scale_i.numel() > 1),
            None if bias_i is None else bias_i.data_ptr(),
            None if smooth is None else smooth.data_ptr(),
            out_scale.data_ptr(),
            m,
            f,
            k,
            _row_stride(a),
            int(act_dtype == torch.bfloat16),
            index,
            None if workspace is None else workspace.data_ptr(),
            size,
            torch.cuda.current_stream().cuda_stream,
        )
    if code != 0:
        why = _last_error(lib)
        raise CutlassError(f"CUTLASS {fmt.upper()} GEGLU GEMM {config} (M={m}, F={f}, K={k}) failed: {why}")
    return out
