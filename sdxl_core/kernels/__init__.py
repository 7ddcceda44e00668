"""Quantized GEMM kernels: `int8_gemm` (Triton W8A8, one program per tile; it also picks between that and
`int8_tma`, a persistent Hopper kernel with TMA loads), `fp8_gemm` (torch._scaled_mm), `ops` (both as torch
custom ops for torch.compile) and `tiles` (the tile order the Triton kernels share).

Import the submodules directly; this package stays empty so that importing `fp8_gemm` does not pull in Triton.
"""
