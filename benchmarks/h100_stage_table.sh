#!/usr/bin/env bash
# Issue 2 item 7 (+ kernel smoke): sdxl-random FP16 eager at 1024x1024 per-stage table on the GPU,
# the Triton/FP8 GEMM shape table, and the GPU kernel tests. Results land in $OUT.
set -uo pipefail
source benchmarks/gpu_setup.sh || exit 1
python3 -m sdxl_core.cli txt2img "a photo of an astronaut riding a horse on mars" --model sdxl-random \
  --num-warmup-runs 1 --batch-count 3 --output-dir /tmp/eager --no-progress 2>&1 | tee "$OUT/stage_table_eager.log"
cp /tmp/eager/*.json "$OUT/" 2>/dev/null
python3 -m pytest tests/test_kernels.py -m gpu -q -p no:cacheprovider 2>&1 | tail -25 | tee "$OUT/kernel_tests.log"
timeout 300 python3 benchmarks/gemm_shapes.py --out "$OUT/gemm_shapes.json" 2>&1 | tee "$OUT/gemm_shapes.log"
