"""Persistent W8A8 INT8 GEMM with TMA loads, for Hopper: the same contract as `int8_gemm.int8_linear`.

    out[M, N] = (A_q[M, K] @ W_q[N, K]^T) * (a_scale * w_scale[N]) + bias[N]

The pointer kernel in `int8_gemm` launches one program per output tile and loads its operands with
per-thread address arithmetic. This one launches one program per SM; each walks the output tiles in grouped
order and loads A and W tiles with TMA (tensor memory accelerator) descriptors, which copy a whole tile
into shared memory with one instruction, zero-fill what lies outside the matrix (so ragged M, N and K need
no masks) and leave the registers to the accumulator. The epilogue (int32 -> float32, scales, bias, store)
is the pointer kernel's, so both give identical results.

TMA needs 16-byte aligned base addresses and row strides: `supports` says when it applies (K % 16 == 0 for
int8 rows; every SDXL UNet shape qualifies). `int8_gemm.int8_linear(..., kernel="tma")` runs it.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from sdxl_core.quant.kernels.tiles import grouped_tile, tma_config


def configs(interpret: bool, quick: bool) -> list:
    if interpret:  # 32x32x32 keeps the interpreter's ragged test shapes multi-tile in every dimension
        return [tma_config(32, 32, 32, 1, 4)]
    # Shared memory per stage is (BLOCK_M + BLOCK_N) * BLOCK_K bytes: 48 KiB for 128x256x128, so 4 stages
    # fit Hopper's 227 KiB. On an H200 it lost to the CUTLASS INT8 kernels at every SDXL shape (docs/perf.md);
    # the build-time dispatch times it beside them and keeps it only where it wins.
    tiles = [
        tma_config(128, 256, 128, 4, 8),
        tma_config(128, 256, 128, 3, 8),
        tma_config(256, 128, 128, 3, 8),
        tma_config(128, 128, 128, 4, 8),
        tma_config(128, 256, 64, 5, 8),
        tma_config(64, 128, 128, 5, 4),
    ]
    return tiles[:1] if quick else tiles


@triton.jit
def _w8a8_tma_kernel(
    a_desc,
    w_desc,
    out_ptr,
    a_scale_ptr,
    w_scale_ptr,
    bias_ptr,
    M,
    N,
    K,
    stride_om,
    stride_on,
    HAS_BIAS: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    a_scale = tl.load(a_scale_ptr)
    for tile in range(tl.program_id(0), num_pid_m * num_pid_n, NUM_PROGRAMS):
        pid_m, pid_n = grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k in range(k_tiles):
            a = a_desc.load([off_m, k * BLOCK_K])
            w = w_desc.load([off_n, k * BLOCK_K])
            acc = tl.dot(a, w.T, acc, out_dtype=tl.int32)

        offs_m = off_m + tl.arange(0, BLOCK_M)
        offs_n = off_n + tl.arange(0, BLOCK_N)
        in_n = offs_n < N
        scale = a_scale * tl.load(w_scale_ptr + offs_n, mask=in_n, other=0.0)
        out = acc.to(tl.float32) * scale[None, :]
        if HAS_BIAS:
            out += tl.load(bias_ptr + offs_n, mask=in_n, other=0.0).to(tl.float32)[None, :]
        out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & in_n[None, :])


@functools.cache
def _autotuned(interpret: bool, quick: bool):
    return triton.autotune(configs(interpret, quick), key=["M", "N", "K"])(_w8a8_tma_kernel)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def supports(a: torch.Tensor, w_q: torch.Tensor) -> bool:
    """TMA's rules for 2-D int8 operands: row-major, rows and base addresses 16-byte aligned."""
    return all(t.dim() == 2 and t.stride(1) == 1 and t.stride(0) % 16 == 0 and t.data_ptr() % 16 == 0 for t in (a, w_q))


def launch(a, w_q, out, a_scale, w_scale, bias_arg, *, has_bias: bool, interpret: bool, quick: bool):
    """Run the kernel on prepared 2-D operands (as `int8_gemm._launch` prepares them)."""
    m, k = a.shape
    n = w_q.shape[0]
    kernel = _autotuned(interpret, quick)
    programs = 2 if interpret else _sm_count(a.device.index or 0)  # 2 keeps the tile loop looping in tests
    placeholder = [1, 1]  # replaced per config (`tiles.tma_config`)
    a_desc = TensorDescriptor.from_tensor(a, placeholder)
    w_desc = TensorDescriptor.from_tensor(w_q, placeholder)

    def grid(meta):
        return (min(programs, triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])),)

    kernel[grid](
        a_desc,
        w_desc,
        out,
        a_scale,
        w_scale,
        bias_arg,
        m,
        n,
        k,
        out.stride(0),
        out.stride(1),
        HAS_BIAS=has_bias,
        NUM_PROGRAMS=programs,
    )
    return out
