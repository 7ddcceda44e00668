#!/usr/bin/env bash
# The INT8 GEMM kernels on a Hopper GPU in one call: first their GPU tests (every CUTLASS config against the torch
# reference at ragged and SDXL shapes, float16/bfloat16, with and without bias, and inside a CUDA graph; the Triton
# kernels with one autotune config), then the per-shape table: cuBLAS fp16, the Triton INT8 kernels, each CUTLASS
# config and FP8 _scaled_mm (us, TOPS, speed-up vs fp16), written to $OUT/gemm_shapes.json row by row.
# Carry the nvidia-cutlass wheel in .whl/ (gpu_setup.sh installs it) and the prebuilt library in .kernel-cache/
# (KERNEL_CACHE=dir for another place). It is copied to a cache of this user's own (cuda_build loads only from
# those); without a matching library (same source, nvcc release, nvidia-cutlass version) nvcc compiles it first.
set -uo pipefail
source benchmarks/gpu_setup.sh || exit 1
export SDXL_BENCH_KERNEL_CACHE=/tmp/sdxl-bench-kernels
mkdir -p "$SDXL_BENCH_KERNEL_CACHE" && chmod 755 "$SDXL_BENCH_KERNEL_CACHE"
cp "${KERNEL_CACHE:-.kernel-cache}"/*.so "$SDXL_BENCH_KERNEL_CACHE"/ 2>/dev/null
python3 - <<'EOF' 2>&1 | tee "$OUT/cutlass_library.log"
import time
from sdxl_core.kernels import int8_cutlass
started = time.perf_counter()
print("CUTLASS INT8:", int8_cutlass.unavailable_reason() or "available", f"({time.perf_counter() - started:.1f} s)")
print("configs:", ", ".join(int8_cutlass.configs()))
EOF
# Time limits keep the whole call under 10 minutes: about 3 for the tests, 4 for the table.
SDXL_BENCH_AUTOTUNE=quick timeout "${CUTLASS_TEST_TIMEOUT:-180}" python3 -m pytest tests/test_kernels.py -m gpu -q \
  -p no:cacheprovider -k "cutlass" > "$OUT/gpu_tests_cutlass.log" 2>&1
tail -25 "$OUT/gpu_tests_cutlass.log"
SDXL_BENCH_AUTOTUNE=quick timeout "${TRITON_TEST_TIMEOUT:-150}" python3 -m pytest tests/test_kernels.py -m gpu -q \
  -p no:cacheprovider -k "not cutlass" > "$OUT/gpu_tests_triton.log" 2>&1
tail -8 "$OUT/gpu_tests_triton.log"
timeout "${TABLE_TIMEOUT:-240}" python3 benchmarks/gemm_shapes.py --out "$OUT" 2>&1 | tee "$OUT/gemm_shapes.log"
