"""Where a UNet step spends its GPU time: kernels grouped by kind, FP16 against the 8-bit engines.

    python benchmarks/profile_step.py --model sdxl-random --engine-dir E [--onnx-dir X] --out profile.json

Builds (or loads from `--engine-dir`) one engine per precision as the suite runs them, but without the CUDA
graph so the profiler sees each kernel, then profiles `--steps` UNet steps per engine and sums the device
time of every kernel into the groups below (first matching pattern wins). The question it answers: how
much of an 8-bit engine's time is GEMM and how much is the quantization glue around it. On the CPU it runs
the same way on `tiny` with CPU op times (the CI smoke test).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import re
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sdxl_core import models  # noqa: E402
from sdxl_core.engines import torch_backend  # noqa: E402
from sdxl_core.variants import TINY_SIZE, VARIANTS  # noqa: E402

GROUPS = [  # (group, pattern over the kernel or op name, lower-cased)
    ("8-bit gemm", r"w8a8|_scaled_mm|f8f8|e4m3|int8_mm|fp8_mm"),
    ("gemm", r"gemm|cublas|cutlass|nvjet|xmma|sm90_|ampere_|\bmm\b|addmm|aten::linear|aten::matmul"),
    ("attention", r"flash|fmha|attention|sdpa"),
    ("conv", r"conv|cudnn|implicit_convolve|winograd|nchw|nhwc"),
    ("fused pointwise/norm (Inductor)", r"triton_(poi|per|red|tem)"),
    ("eager norm", r"norm"),
    ("copy/cast", r"copy|cast|to_copy|contiguous|cat"),
    ("eager pointwise", r"elementwise|vectorized|unrolled|reduce_kernel|aten::(add|mul|div|sub|round|clamp|silu|gelu)"),
]


def group_of(name: str) -> str:
    lowered = name.lower()
    return next((group for group, pattern in GROUPS if re.search(pattern, lowered)), "other")


def profile_engine(step, inputs, steps: int, device) -> tuple[dict[str, float], list[tuple[str, float]]]:
    """ms per step by group, and the 15 most expensive kernels (ms per step)."""
    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    with torch.inference_mode():
        for _ in range(2):
            step(*inputs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        with profile(activities=activities) as prof:
            for _ in range(steps):
                step(*inputs)
            if device.type == "cuda":
                torch.cuda.synchronize()
    kernels = {}
    for event in prof.events():
        if device.type == "cuda" and event.device_type.name != "CUDA":
            continue
        if device.type == "cpu" and (event.cpu_parent is not None
                                     or not event.name.startswith(("aten::", "sdxl_bench::"))):
            continue  # top-level ops only, so nothing is counted twice
        us = event.device_time if device.type == "cuda" else event.cpu_time
        kernels[event.name] = kernels.get(event.name, 0.0) + us / 1000.0 / steps
    groups: dict[str, float] = {}
    for name, ms in kernels.items():
        groups[group_of(name)] = groups.get(group_of(name), 0.0) + ms
    top = sorted(kernels.items(), key=lambda item: -item[1])[:15]
    return groups, top


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sdxl-random")
    p.add_argument("--precisions", default="fp16,int8,fp8")
    p.add_argument("--calibration-size", type=int, default=2)
    p.add_argument("--engine-dir", required=True)
    p.add_argument("--onnx-dir", default=None)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = TINY_SIZE if args.model == "tiny" else 1024
    master = models.load(args.model)
    report = {"model": args.model, "size": size, "device": str(device), "steps": args.steps, "engines": {}}
    for precision in args.precisions.split(","):
        variant = VARIANTS[f"xl-1.0-{precision}"].replace(model=args.model, height=size, width=size,
                                                         calibration_size=args.calibration_size)
        if args.model == "tiny":
            variant = variant.replace(steps=2)  # calibration steps only: the CPU smoke test stays short
        components = dataclasses.replace(master, unet=copy.deepcopy(master.unet))
        engines = torch_backend.prepare(variant, components, device, engine_dir=args.engine_dir,
                                        onnx_dir=args.onnx_dir, use_cuda_graph=False, progress=False)
        inputs = torch_backend.dummy_unet_inputs(components.unet, variant, device, engines.dtype)
        groups, top = profile_engine(engines.unet, inputs, args.steps, device)
        report["engines"][precision] = {"ms_by_group": groups, "total_ms": sum(groups.values()),
                                        "top_kernels_ms": top, "gemm_paths": engines.info.get("gemm_paths")}
        del components, engines
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")

    names = list(report["engines"])
    all_groups = [g for g, _ in GROUPS] + ["other"]
    print(f"{'ms per UNet step':<34}" + "".join(f"{n:>10}" for n in names))
    for group in all_groups:
        print(f"{group:<34}" + "".join(f"{report['engines'][n]['ms_by_group'].get(group, 0.0):>10.2f}" for n in names))
    print(f"{'total':<34}" + "".join(f"{report['engines'][n]['total_ms']:>10.2f}" for n in names))
    for name in names:
        print(f"\n{name}: top kernels (ms per step)")
        for kernel, ms in report["engines"][name]["top_kernels_ms"]:
            print(f"  {ms:8.3f}  {kernel[:110]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
