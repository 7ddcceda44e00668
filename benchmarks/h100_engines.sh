#!/usr/bin/env bash
# Issue 3 item 6: FP16 / INT8 / FP8 UNet engines on sdxl-random at 1024x1024 (CFG batch 2), side by side in
# one process: build (calibrate, convert, save), then reload from the engine dir alone in a fresh process.
# COMPILE=on|off (default off), CALIB=N prompts (default 2 to fit a 10-minute device call; the demo uses 32).
set -uo pipefail
source benchmarks/gpu_setup.sh || exit 1
COMPILE=${COMPILE:-off} CALIB=${CALIB:-2} TAG=${TAG:-eager}
timeout ${BUILD_TIMEOUT:-420} python3 benchmarks/unet_engines.py --model sdxl-random --calibration-size "$CALIB" \
  --precisions "${PRECISIONS:-fp16,int8,fp8}" --engine-dir /tmp/E --onnx-dir /tmp/X --compile "$COMPILE" --out "$OUT/engines_build_$TAG.json" 2>&1 \
  | grep -v "it/s\]" | tee "$OUT/engines_build_$TAG.log"
timeout ${RELOAD_TIMEOUT:-150} python3 benchmarks/unet_engines.py --model sdxl-random --engine-dir /tmp/E --reload \
  --calibration-size "$CALIB" --precisions "${PRECISIONS:-fp16,int8,fp8}" --compile "$COMPILE" --out "$OUT/engines_reload_$TAG.json" 2>&1 | grep -v "it/s\]" | tee "$OUT/engines_reload_$TAG.log"
if [ -n "${GEMM:-}" ]; then
  timeout 150 python3 benchmarks/gemm_shapes.py --quick --out "$OUT/gemm_shapes_quick.json" 2>&1 | tee "$OUT/gemm_shapes_quick.log"
fi
