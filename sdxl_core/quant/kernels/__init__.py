"""Quantized GEMM kernels: `int8_gemm` (Triton W8A8, one program per tile, and the entry point that runs the INT8
kernel a caller names), `int8_tma` (a persistent Triton Hopper kernel with TMA loads), `geglu8` (the GEGLU projection
with the GEGLU and the next layer's quantization in its epilogue, Triton), `gemm8_cutlass` (CUTLASS Hopper INT8 and
FP8 GEMMs in C libraries that `cuda_build` compiles with nvcc from `csrc/`), `fp8_gemm` (torch._scaled_mm), `ops`
(the 8-bit GEMMs as torch custom ops for torch.compile) and `tiles` (the tile order the Triton kernels share).

Import the submodules directly; this package imports no Triton, so that importing `fp8_gemm` does not pull it in.
"""

import os
import sys

from sdxl_core import settings

# Triton decides between compiling and interpreting when a function is decorated, and triton.language decorates its
# own helpers (tl.cdiv, ...) on import, so the opt-in must become TRITON_INTERPRET before any kernel module loads.
if settings.triton_on_cpu() and os.environ.get("TRITON_INTERPRET") != "1":
    if "triton" in sys.modules:
        raise ImportError("SDXL_BENCH_TRITON_ON_CPU=1 needs TRITON_INTERPRET=1 set before triton is imported")
    os.environ["TRITON_INTERPRET"] = "1"
