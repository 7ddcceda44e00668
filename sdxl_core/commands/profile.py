"""Where a UNet step spends its GPU time: kernels grouped by what they do, FP16 against the 8-bit engines.

    sdxl-bench profile --model sdxl-random --engine-dir E --onnx-dir X --out results/

Builds (or loads from `--engine-dir`) one engine per precision as the suite runs them, but without the CUDA
graph so the profiler sees each kernel, profiles `--steps` UNet steps per engine and sums each kernel's
GPU time into the groups below. Each engine's row also carries the per-shape kernel timings that chose its
kernels (`gemm_timings`), so one file holds both views of a step. On the CPU it runs the same way on `tiny` with
CPU op times (the CI smoke test).

Kernel names are grouped by their origin, most specific first: Inductor's generated Triton kernels are named
`triton_<kind>_fused_<ops>` and may name the ops they fuse (a GEGLU fused with the next layer's quantize is
called `..._int8_mm_...` without being a GEMM), so they are matched before anything else; cuDNN's SDPA and
conv kernels contain `sm90_` and `gemm`, so attention and convolution are matched before the GEMMs.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from sdxl_core import models, run
from sdxl_core.engines import torch_backend
from sdxl_core.reports.measurements import group_of, render_profile
from sdxl_core.reports.results import ResultFile
from sdxl_core.variants import VARIANTS, on_model


def add_arguments(p) -> None:
    p.add_argument("--model", default="sdxl-random", help="built-in, hub id or local dir")
    p.add_argument(
        "--precisions",
        default="fp16,int8,fp8",
        help="engines to profile, from fp16,int8,fp8, each optionally +qkv (fused attention projections)",
    )
    p.add_argument("--calibration-size", type=int, default=2, help="calibration prompts of the 8-bit engines")
    p.add_argument("--engine-dir", required=True, help="where the engines are built or found")
    p.add_argument("--onnx-dir", default=None, help="calibration state (reused when present)")
    p.add_argument("--steps", type=int, default=5, help="UNet steps profiled per engine")
    p.add_argument("--out", required=True, help="directory for profile.json")


TOP_KERNELS = 30


def profile_step(step, inputs, steps: int, device) -> tuple[dict[str, float], list[tuple[str, float]], float]:
    """ms per step by group, the TOP_KERNELS most expensive kernels (ms per step), and kernel launches per step
    (each costs a launch and a ramp-up that no group's time shows)."""
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
    kernels: dict[str, float] = {}
    launches = 0
    for event in prof.events():
        if device.type == "cuda" and event.device_type.name != "CUDA":
            continue
        if device.type == "cpu" and (
            event.cpu_parent is not None or not event.name.startswith(("aten::", "sdxl_bench::"))
        ):
            continue  # top-level ops only, so nothing is counted twice
        us = event.device_time if device.type == "cuda" else event.cpu_time
        launches += 1
        kernels[event.name] = kernels.get(event.name, 0.0) + us / 1000.0 / steps
    groups: dict[str, float] = {}
    for name, ms in kernels.items():
        groups[group_of(name)] = groups.get(group_of(name), 0.0) + ms
    top = sorted(kernels.items(), key=lambda item: -item[1])[:TOP_KERNELS]
    return groups, top, launches / steps


def dispatch_timings(info) -> list[dict] | None:
    """The per-shape kernel timings that chose an engine's kernels (an FP16 engine's: its attentions'): measured by
    this run's build, or kept in the engine (`gemm_dispatch.json`: timings for people to read, nothing in it runs);
    None on a CPU."""
    if info.gemm_timings:
        return info.gemm_timings
    path = Path(info.engine_path) / torch_backend.DISPATCH_FILE if info.engine_path else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


def main(args) -> int:
    precisions = [p for p in args.precisions.split(",") if p]
    variants = {
        precision: on_model(
            VARIANTS[f"xl-1.0-{precision.removesuffix('+qkv')}"],
            args.model,
            calibration_size=args.calibration_size,
            fused_qkv=precision.endswith("+qkv"),
        )
        for precision in precisions
    }
    # No CUDA graph: the profiler must see each kernel.
    options = run.Options(engine_dir=args.engine_dir, onnx_dir=args.onnx_dir, progress=False, use_cuda_graph=False)
    device = run.check(variants[precisions[0]], options)
    size = variants[precisions[0]].height
    result = ResultFile(args.out, "profile", device, model=args.model, size=size, steps=args.steps)
    master = models.load(args.model)
    for precision, variant in variants.items():
        components = dataclasses.replace(master, unet=copy.deepcopy(master.unet))
        engines = run.prepare(variant, options, device=device, components=components).engines
        inputs = torch_backend.unet_inputs(variant, components.unet, device, engines.dtype)
        groups, top, launches = profile_step(engines.unet, inputs, args.steps, device)
        result.add(
            {
                "engine": precision,
                "ms_by_group": groups,
                "total_ms": sum(groups.values()),
                "top_kernels_ms": top,
                "kernels_per_step": launches,
                "layers_by_kernel": engines.info.layers_by_kernel,
                "gemm_timings": dispatch_timings(engines.info),
            }
        )
        print(f"{precision}: {sum(groups.values()):.2f} ms per step profiled", flush=True)
        del components, engines
    print(render_profile(result.data))
    return 0
