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

The first launch of each configuration on a device sets its shared-memory limit (cudaFuncSetAttribute): run a
warm-up call before capturing a CUDA graph, as for any kernel that must be ready when captured.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from sdxl_core import hardware
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
    "coop_128x128x128_streamk",
    "pingpong_64x128x128",
    "pingpong_128x128x128_cluster2x1",
)
OUT_DTYPES = (torch.float16, torch.bfloat16)


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
    return lib


def _last_error(lib) -> str:
    return (lib.sdxl_last_error() or b"").decode(errors="replace")


@functools.cache
def configs(fmt: str = "int8") -> tuple[str, ...]:
    """The configuration names the `fmt` library holds, in index order. Loads (building if need be) the
    library; raises `cuda_build.KernelUnavailable` where it cannot."""
    lib = _library(fmt)
    names = tuple(lib.sdxl_gemm8_config_name(i).decode() for i in range(lib.sdxl_gemm8_num_configs()))
    if names != CONFIG_NAMES:  # a stale library: an index would run another config than the plan names
        raise cuda_build.KernelUnavailable(f"the {fmt} GEMM library holds configs {names}, not {CONFIG_NAMES}")
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
