#!/usr/bin/env bash
# Issue 6 item 1 on the H100: which FP16 is the strongest baseline? One process, sdxl-random 1024x1024 CFG batch 2,
# every row's step in a CUDA graph, timed side by side: the FP16 engine compiled by regions (what the suite runs),
# compiled as one whole graph, channels-last, fused QKV, and both. Results land in $OUT. About 5 compiles of
# ~50 s each on the H100 (session 2's FP16 regional compile took 48 s).
set -uo pipefail
source benchmarks/gpu_setup.sh || exit 1
timeout "${FP16_TIMEOUT:-480}" python3 benchmarks/unet_engines.py --model sdxl-random --precisions fp16 \
  --engine-dir /tmp/E --compile regional --cuda-graph on --fp16-tunings cl,qkv,cl+qkv,full \
  --out "$OUT/fp16_best.json" 2>&1 | grep -v "it/s\]" | tee "$OUT/fp16_best.log"
