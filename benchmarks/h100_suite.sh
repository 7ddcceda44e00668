#!/usr/bin/env bash
# Issue 4 on the H100: the suite's benchmarks and 8-bit gates (`nox -s gpu_bench` without nox, which the offline
# GPU host lacks) on sdxl-random, with a pytest-benchmark history saved under $OUT/benchmarks (`sdxl-bench report` and
# `sdxl-bench history` turn it into markdown and a plot on any machine afterwards).
# Reuses engines in /tmp/E (from h100_compiled.sh on the same machine) when their keys match, else builds them.
# CALIB=N calibration prompts (default 2: timing does not depend on it), VARIANTS=comma list.
set -uo pipefail
source benchmarks/gpu_setup.sh || exit 1
CALIB=${CALIB:-2}
timeout "${SUITE_TIMEOUT:-480}" python3 -m pytest -m bench -p no:cacheprovider -rA \
  --model sdxl-random --engine-dir /tmp/E --onnx-dir /tmp/X --calibration-size "$CALIB" \
  --variants "${VARIANTS:-xl-1.0-fp16,xl-1.0-int8,xl-1.0-fp8,xl-turbo}" \
  --benchmark-autosave --benchmark-storage "$OUT/benchmarks" --benchmark-columns min,median,max,rounds \
  2>&1 | grep -v "it/s\]" | tee "$OUT/gpu_bench.log"
