#!/usr/bin/env bash
# Issue 4 on the H100: the suite's benchmarks and 8-bit gates (`nox -s gpu_bench` without nox, which the offline
# GPU host lacks) on sdxl-random, with a pytest-benchmark history saved under $OUT/benchmarks (`sdxl-bench report` and
# `sdxl-bench history` turn it into markdown and a plot on any machine afterwards).
# Builds the engines into /tmp/E (or reuses them there), then reloads them from /tmp/E alone in a fresh process
# (benchmarks/unet_engines.py --reload): reload times and one more side-by-side table.
# CALIB=N calibration prompts (default 2: timing does not depend on it), VARIANTS=comma list.
set -uo pipefail
source benchmarks/gpu_setup.sh || exit 1
CALIB=${CALIB:-2}
# HISTORY=dir: earlier saved runs (e.g. docs/perf/h100-2026-11-25-s2/call2-suite/benchmarks) to compare against,
# with the same 10 % median gate as `nox -s gpu_bench`; the new run is saved next to them in $OUT/benchmarks.
COMPARE=()
if [ -n "${HISTORY:-}" ] && [ -d "$HISTORY" ]; then
  mkdir -p "$OUT/benchmarks" && cp -r "$HISTORY"/. "$OUT/benchmarks/"
  COMPARE=(--benchmark-compare --benchmark-compare-fail=median:10%)
fi
# Issue 4's check that the GPU machine collects one engine fixture per variant (all five, whatever VARIANTS says).
python3 -m pytest -m bench -p no:cacheprovider --model sdxl-random --setup-plan -q 2>&1 \
  | grep -E "variant_engine|tests/|collected|error" | cut -c1-160 > "$OUT/bench_setup_plan.txt"
grep -c "SETUP    S variant_engine" "$OUT/bench_setup_plan.txt"
timeout "${SUITE_TIMEOUT:-460}" python3 -m pytest -m bench -p no:cacheprovider -rA \
  --model sdxl-random --engine-dir /tmp/E --onnx-dir /tmp/X --calibration-size "$CALIB" \
  --variants "${VARIANTS:-xl-1.0-fp16,xl-1.0-int8,xl-1.0-fp8}" "${COMPARE[@]}" \
  --benchmark-autosave --benchmark-storage "$OUT/benchmarks" --benchmark-columns min,median,max,rounds \
  2>&1 | grep -v "it/s\]" | grep -v "^DEBUG    torch.__trace" | tee "$OUT/gpu_bench.log"
for f in /tmp/E/*/gemm_dispatch.json; do [ -f "$f" ] && cp "$f" "$OUT/gemm_dispatch_$(basename "$(dirname "$f")" | cut -c1-12).json"; done
timeout "${RELOAD_TIMEOUT:-110}" python3 benchmarks/unet_engines.py --model sdxl-random --engine-dir /tmp/E --reload \
  --calibration-size "$CALIB" --precisions fp16,int8,fp8 --out "$OUT/engines_reload.json" 2>&1 | grep -v "it/s\]" \
  | tee "$OUT/engines_reload.log"
