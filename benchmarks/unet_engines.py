"""UNet engines side by side: build (or reload) FP16, INT8 and FP8 engines, then time one UNet step each.

    python benchmarks/unet_engines.py --model sdxl-random --engine-dir E --onnx-dir X --out build.json
    python benchmarks/unet_engines.py --model sdxl-random --engine-dir E --reload --out reload.json

On a GPU each engine is compiled by regions and its step captured in a CUDA graph, as the suite runs it.
`--fp16-tunings full,cl,qkv,cl+qkv` adds in-memory FP16 rows, each a candidate for the strongest FP16 (issue 6):
`full` compiles the UNet as one whole graph, `cl` runs it channels-last, `qkv` with fused QKV projections
(`torch_backend.tune_layout`); the speed-ups are then also given against the fastest FP16 row.
`--channels-last` runs the engine rows channels-last too.

Build: one seeded model, one engine per precision through `torch_backend.prepare` (ModelOpt calibration
with the real pipeline, conversion to real 8-bit modules, safetensors + compile caches). Reload (a fresh
process): the engines from `--engine-dir` alone, no ONNX dir, building forbidden. Both then time the
UNet step on the same random inputs, interleaving precisions round by round (CUDA events, median), and
report the relative error of each output against FP16 on those inputs.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sdxl_core import models  # noqa: E402
from sdxl_core.engines import torch_backend  # noqa: E402
from sdxl_core.runinfo import device_info, library_versions  # noqa: E402
from sdxl_core.variants import VARIANTS  # noqa: E402

FLOPS_PER_STEP_1024 = 13.52e12  # SDXL UNet, CFG batch 2 at 1024x1024 (torch.utils.flop_counter, FACTS.md)
FP16_TUNINGS = {  # row name suffix -> (compile mode, channels-last, fused QKV)
    "full": ("full", False, False), "cl": ("regional", True, False), "qkv": ("regional", False, True),
    "cl+qkv": ("regional", True, True),
}


def time_step(step, inputs, device, iters: int) -> list[float]:
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(*inputs)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step(*inputs)
            times.append((time.perf_counter() - t0) * 1000)
    return times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sdxl-random")
    p.add_argument("--precisions", default="fp16,int8,fp8")
    p.add_argument("--calibration-size", type=int, default=32)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--engine-dir", required=True)
    p.add_argument("--onnx-dir", default=None)
    p.add_argument("--reload", action="store_true", help="load engines only (no ONNX dir, no calibration)")
    p.add_argument("--compile", choices=("auto", "regional", "full", "off"), default="auto")
    p.add_argument("--cuda-graph", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--fp16-tunings", default="", help=f"extra in-memory FP16 rows: {','.join(FP16_TUNINGS)}")
    p.add_argument("--fp16-full-compile", action="store_true", help="same as --fp16-tunings full")
    p.add_argument("--channels-last", action="store_true", help="run the engine rows channels-last")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=4)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    tunings = [t for t in args.fp16_tunings.split(",") if t] + (["full"] if args.fp16_full_compile else [])
    unknown = [t for t in tunings if t not in FP16_TUNINGS]
    if unknown:
        p.error(f"unknown FP16 tuning {unknown[0]!r}: choose from {', '.join(FP16_TUNINGS)}")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    compile = {"auto": None, "regional": True, "full": True, "off": False}[args.compile]
    compile_mode = "full" if args.compile == "full" else "regional"
    cuda_graph = {"auto": None, "on": True, "off": False}[args.cuda_graph]
    size = args.height or (128 if args.model == "tiny" else 1024)
    # Built-ins are seeded on the CPU (the same weights as the CLI and the suite); a reload needs no UNet weights.
    master = models.load(args.model, unet_weights=not args.reload or bool(tunings))
    engines, rows = {}, {}
    precisions = args.precisions.split(",") + [f"fp16-{t}" for t in dict.fromkeys(tunings)]
    for precision in precisions:
        tuned_row = precision.startswith("fp16-")  # in memory, from the seeded UNet
        row_mode, channels_last, fuse_qkv = (FP16_TUNINGS[precision.removeprefix("fp16-")] if tuned_row
                                             else (compile_mode, args.channels_last, False))
        variant = VARIANTS["xl-1.0-fp16" if tuned_row else f"xl-1.0-{precision}"].replace(
            model=args.model, height=size, width=size, calibration_size=args.calibration_size)
        fresh_unet = not args.reload or tuned_row  # tunings change the module: never share it between rows
        components = dataclasses.replace(master, unet=copy.deepcopy(master.unet) if fresh_unet else master.unet)
        started = time.perf_counter()
        engines[precision] = torch_backend.prepare(
            variant, components, device, engine_dir=None if tuned_row else args.engine_dir,
            onnx_dir=None if args.reload else args.onnx_dir, allow_build=tuned_row or not args.reload,
            compile=True if tuned_row and device.type == "cuda" else compile, compile_mode=row_mode,
            use_cuda_graph=cuda_graph, channels_last=channels_last, fuse_qkv=fuse_qkv)
        if device.type == "cuda":
            torch.cuda.synchronize()
        info = dict(engines[precision].info)
        rows[precision] = {"prepare_s": round(time.perf_counter() - started, 2), **info}
        print(f"{precision}: prepared in {rows[precision]['prepare_s']} s ({info.get('mode')})", flush=True)
        del components
    unet_fp32 = master.unet
    inputs = torch_backend.dummy_unet_inputs(unet_fp32, variant, device, engines["fp16"].dtype if "fp16" in engines
                                             else torch.float16)
    del master
    outputs = {}
    with torch.inference_mode():
        for precision, engine in engines.items():
            outputs[precision] = engine.unet(*inputs).float()
            if device.type == "cuda":
                torch.cuda.synchronize()  # a fault shows here, named, not later in another engine's timing
            print(f"{precision}: first step ok", flush=True)
            time_step(engine.unet, inputs, device, 2)  # warm-up
        samples = {precision: [] for precision in engines}
        for _ in range(args.rounds):  # interleaved: every precision sees the same clocks and thermals
            for precision, engine in engines.items():
                samples[precision] += time_step(engine.unet, inputs, device, args.iters)
    reference = outputs.get("fp16")
    flops = FLOPS_PER_STEP_1024 * (size / 1024) ** 2
    for precision, row in rows.items():
        median = statistics.median(samples[precision])
        row.update(ms_per_step=round(median, 3), ms_all=[round(t, 3) for t in samples[precision]],
                   tflops=round(flops / median / 1e9, 1))
        if reference is not None:
            err = (outputs[precision] - reference).norm() / reference.norm()
            row["rel_err_vs_fp16"] = float(err)
            row["speedup_vs_fp16"] = round(rows["fp16"]["ms_per_step"] / median, 3) if "fp16" in rows else None
    fp16_rows = [row["ms_per_step"] for name, row in rows.items() if name == "fp16" or name.startswith("fp16-")]
    if fp16_rows:
        for row in rows.values():
            row["speedup_vs_best_fp16"] = round(min(fp16_rows) / row["ms_per_step"], 3)
    report = {"mode": "reload" if args.reload else "build", "model": args.model, "size": size,
              "unet_batch": variant.unet_batch, "calibration_size": args.calibration_size,
              "device": device_info(device), "libraries": library_versions(), "command": " ".join(sys.argv),
              "engines": rows}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{'precision':<11} {'mode':<9} {'ms/step':>9} {'TFLOP/s':>8} {'vs fp16':>8} {'vs best':>8} "
          f"{'rel err':>8} {'calib s':>8} {'compile s':>9} {'graph s':>7} {'load s':>7} {'engine MiB':>10}")
    for precision, row in rows.items():
        print(f"{precision:<11} {row.get('mode', ''):<9} {row['ms_per_step']:>9.2f} {row['tflops']:>8.1f} "
              f"{row.get('speedup_vs_fp16') or 0:>8.3f} {row.get('speedup_vs_best_fp16') or 0:>8.3f} "
              f"{row.get('rel_err_vs_fp16', 0):>8.4f} {row.get('calibration_s', 0):>8} "
              f"{row.get('compile_s', '-'):>9} {row.get('cuda_graph_s', '-'):>7} {row.get('load_s', '-'):>7} "
              f"{row.get('engine_bytes', 0) / 2**20:>10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
