"""Quantized GEMM kernels: `int8_gemm` (Triton W8A8) and `fp8_gemm` (torch._scaled_mm).

Import the submodules directly; this package stays empty so that importing `fp8_gemm` does not pull in Triton.
"""
