"""The GEMM dispatch timings an 8-bit engine build measured (its `gemm_dispatch.json`) as a markdown table.

    python benchmarks/dispatch_table.py E/unetxl-int8.../gemm_dispatch.json [more.json ...]

One row per GEMM shape of the UNet: how many layers run it, the 8-bit kernel and the 16-bit cuBLAS GEMM
(GPU time per call from CUDA-graph replays), both as TFLOP/s, and the path the engine took. INT8 rows
also say which Triton kernel ran the 8-bit GEMM (pointer or persistent TMA, timed with do_bench when chosen).
"""

import json
import sys
from pathlib import Path


def table(path: Path) -> str:
    rows = json.loads(path.read_text())
    lines = [f"`{path}`", "",
             "| format | M x K -> N | layers | 8-bit us | 8-bit TFLOP/s | 16-bit us | 16-bit TFLOP/s "
             "| 8-bit speed-up | path | INT8 kernel (pointer / TMA us) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        flop = 2.0 * r["M"] * r["K"] * r["N"]
        lines.append(f"| {r['fmt']} | {r['M']} x {r['K']} -> {r['N']} | {r['layers']} | {r['ms_8bit'] * 1e3:.1f} | "
                     f"{flop / (r['ms_8bit'] * 1e-3) / 1e12:.0f} | {r['ms_16bit'] * 1e3:.1f} | "
                     f"{flop / (r['ms_16bit'] * 1e-3) / 1e12:.0f} | {r['speedup_8bit']:.2f}x | {r['path']} | "
                     f"{_kernel(r)} |")
    return "\n".join(lines)


def _kernel(row: dict) -> str:
    if "int8_kernel" not in row:
        return "-"
    tma = "failed" if row.get("ms_tma") is None else f"{row['ms_tma'] * 1e3:.1f}"
    return f"{row['int8_kernel']} ({row['ms_pointer'] * 1e3:.1f} / {tma})"


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__.strip().splitlines()[2].strip())
    print("\n\n".join(table(Path(p)) for p in sys.argv[1:]))
