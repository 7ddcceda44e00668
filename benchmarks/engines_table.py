"""`unet_engines.py` results (build and reload JSON) as one markdown table, for docs/perf.

    python benchmarks/engines_table.py build.json [reload.json]

One row per engine: ms/step, TFLOP/s, speed-up against FP16 and against the fastest FP16 row, relative error
against FP16 on the same inputs, how it was prepared (calibration, compile, CUDA graph, load, or the whole
prepare step on a reload) and the engine bytes. With a reload JSON, its rows follow, marked "reload".
"""

import json
import sys
from pathlib import Path

COLUMNS = ("engine", "run", "ms/step", "TFLOP/s", "vs FP16", "vs best FP16", "rel. err vs FP16", "calibrate s",
           "compile s", "graph s", "load s", "prepare s", "engine MiB")


def _cell(value, fmt="{}"):
    return "-" if value is None else fmt.format(value)


def rows(report: dict, run: str) -> list[str]:
    lines = []
    for name, r in report["engines"].items():
        cells = [name, run, _cell(r.get("ms_per_step"), "{:.2f}"), _cell(r.get("tflops"), "{:.0f}"),
                 _cell(r.get("speedup_vs_fp16"), "{:.3f}x"), _cell(r.get("speedup_vs_best_fp16"), "{:.3f}x"),
                 _cell(r.get("rel_err_vs_fp16"), "{:.4f}"), _cell(r.get("calibration_s")), _cell(r.get("compile_s")),
                 _cell(r.get("cuda_graph_s")), _cell(r.get("load_s")), _cell(r.get("prepare_s")),
                 _cell(r["engine_bytes"] / 2**20 if r.get("engine_bytes") else None, "{:.0f}")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def table(paths: list[Path]) -> str:
    reports = [json.loads(p.read_text()) for p in paths]
    first = reports[0]
    device = first.get("device", {})
    head = (f"{device.get('name', '?')}; torch {first.get('libraries', {}).get('torch', '?')}; `{first['model']}` "
            f"{first['size']}x{first['size']}, UNet batch {first['unet_batch']}")
    lines = [head, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for report in reports:
        lines += rows(report, report.get("mode", "?"))
    lines += ["", *[f"    {r['command']}" for r in reports]]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__.strip().splitlines()[2].strip())
    print(table([Path(p) for p in sys.argv[1:]]))
