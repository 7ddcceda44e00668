"""Quantized GEMM kernels: `int8_gemm` (Triton W8A8, one program per tile, and the entry point that runs the INT8
kernel a caller names), `int8_tma` (a persistent Triton Hopper kernel with TMA loads), `gemm8_cutlass` (CUTLASS
Hopper INT8 and FP8 GEMMs in C libraries that `cuda_build` compiles with nvcc from `csrc/`), `fp8_gemm`
(torch._scaled_mm), `ops` (the 8-bit GEMMs as torch custom ops for torch.compile) and `tiles` (the tile order
the Triton kernels share).

Import the submodules directly; this package stays empty so that importing `fp8_gemm` does not pull in Triton.
"""
