#!/usr/bin/env bash
# Reload from the engine dir alone, one engine per fresh process, to find which reload faults (session 2 saw an
# illegal memory access on the first step after reloading FP16+INT8+FP8 together). Builds FP16 and INT8 first.
set -uo pipefail
source benchmarks/gpu_setup.sh || exit 1
run() {  # name, timeout, args...
  local name=$1 limit=$2; shift 2
  timeout "$limit" python3 benchmarks/unet_engines.py --model sdxl-random --engine-dir /tmp/E --calibration-size 2 \
    --out "$OUT/$name.json" "$@" 2>&1 | grep -v "it/s\]" | grep -v "^DEBUG" > "$OUT/$name.log"
  echo "== $name rc=${PIPESTATUS[0]}"; tail -6 "$OUT/$name.log"
}
run build 230 --precisions fp16,int8 --onnx-dir /tmp/X
for p in fp16 int8; do
  TORCH_LOGS=recompiles run "reload_${p}_graph" 55 --reload --precisions "$p"
done
for p in fp16 int8; do
  grep -q "first step ok" "$OUT/reload_${p}_graph.log" || run "reload_${p}_nograph" 55 --reload --precisions "$p" --cuda-graph off
done
