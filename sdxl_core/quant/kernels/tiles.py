"""What the Triton GEMMs share: their autotune configs' form (with TMA descriptors too) and their tile order."""

import triton
import triton.language as tl


def gemm_config(block_m, block_n, block_k, stages, warps, pre_hook=None) -> triton.Config:
    meta = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8}
    return triton.Config(meta, num_stages=stages, num_warps=warps, pre_hook=pre_hook)


def _set_descriptor_blocks(nargs):
    """Autotune pre-hook of the TMA kernels: the descriptors `a_desc` and `w_desc` load the tiles of the config run."""
    nargs["a_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
    nargs["w_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]


def tma_config(block_m, block_n, block_k, stages, warps) -> triton.Config:
    """`gemm_config` for a kernel that loads A and W through the descriptors `a_desc` and `w_desc` (their block
    shapes are set per config; launch them with a placeholder block shape)."""
    return gemm_config(block_m, block_n, block_k, stages, warps, pre_hook=_set_descriptor_blocks)


@triton.jit
def grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of output tile number `tile` in grouped order: GROUP_M consecutive tiles share one
    column block of W, so it is read from HBM once and then from L2."""
    tiles_per_group = GROUP_M * num_pid_n
    first_m = (tile // tiles_per_group) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile % tiles_per_group) % group_m
    pid_n = (tile % tiles_per_group) // group_m
    return pid_m, pid_n
