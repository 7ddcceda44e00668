#!/usr/bin/env bash
# Issues 3 and 6 on the H100: FP16 / INT8 / FP8 UNet engines compiled by regions with the step in a CUDA graph,
# sdxl-random 1024x1024 CFG batch 2, built then reloaded from the engine dir alone in a fresh process, timed side
# by side; GPU kernel tests first (one autotune config: with all of them they took 229 s; a failing CUDA-graph
# test switches the graphs off), the GEMM shape table last.
# CALIB=N calibration prompts (default 2 to fit a 10-minute call; timing does not depend on it).
# FULL=1 adds an in-memory FP16 compiled as one whole graph. Results land in $OUT. The GEMM table times both INT8
# kernels (pointer, persistent TMA) against cuBLAS fp16 and FP8.
set -uo pipefail
source benchmarks/gpu_setup.sh || exit 1
CALIB=${CALIB:-2} CG=on
SDXL_BENCH_AUTOTUNE=quick python3 -m pytest tests/test_kernels.py tests/test_compile.py -m gpu -q -p no:cacheprovider 2>&1 | tail -15 \
  | tee "$OUT/gpu_tests.log"
grep -q "FAILED.*graphed_step" "$OUT/gpu_tests.log" && CG=off
EXTRA=(); [ "${FULL:-0}" = 1 ] && EXTRA=(--fp16-full-compile)
timeout "${BUILD_TIMEOUT:-330}" python3 benchmarks/unet_engines.py --model sdxl-random --calibration-size "$CALIB" \
  --precisions "${PRECISIONS:-fp16,int8,fp8}" --engine-dir /tmp/E --onnx-dir /tmp/X --compile regional \
  --cuda-graph "$CG" "${EXTRA[@]}" --out "$OUT/engines_build_compiled.json" 2>&1 | grep -v "it/s\]" \
  | tee "$OUT/engines_build_compiled.log"
timeout "${RELOAD_TIMEOUT:-150}" python3 benchmarks/unet_engines.py --model sdxl-random --engine-dir /tmp/E --reload \
  --calibration-size "$CALIB" --precisions "${PRECISIONS:-fp16,int8,fp8}" --compile regional --cuda-graph "$CG" \
  --out "$OUT/engines_reload_compiled.json" 2>&1 | grep -v "it/s\]" | tee "$OUT/engines_reload_compiled.log"
timeout "${GEMM_TIMEOUT:-120}" python3 benchmarks/gemm_shapes.py --kernels fp16,tri_int8,tri_int8_tma,fp8_mm,fp8_linear --out "$OUT/gemm_shapes.json" 2>&1 \
  | tee "$OUT/gemm_shapes.log"
