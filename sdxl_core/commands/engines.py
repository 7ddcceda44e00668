"""UNet engines side by side: build (or reload) FP16, INT8 and FP8 engines, then time one UNet step each.

    sdxl-bench engines --model sdxl-random --engine-dir E --onnx-dir X --out results/
    sdxl-bench engines --model sdxl-random --engine-dir E --reload --out results/

Each engine is prepared as the suite runs it (on a GPU: compiled by regions, the step in a CUDA graph),
then the UNet steps are timed on the same random inputs, precisions interleaved round by round, with the
relative error of each output against the FP16 engine's (the first fp16 row). Then each engine renders one
image of the same prompt and seed: SSIM and PSNR against the FP16 image, and `engines.png` (each image with
its SSIM heat map). `--reload` loads from the engine dir alone (a fresh process,
no ONNX dir, building forbidden). An engine name with `+qkv` (`--precisions fp16,int8,fp16+qkv,int8+qkv`) is
the variant with fused attention projections (`Variant.fused_qkv`), an engine of its own. `--fp16-tunings`
adds in-memory FP16 rows, each a candidate for the strongest FP16: `full` (the whole UNet as one compiled
graph), `nchw` (NCHW activations; on a GPU the engines run channels-last unless `--layout nchw`); speed-ups are
then also given against the fastest FP16 row.
"""

from __future__ import annotations

import copy
import dataclasses
import time

import torch

from sdxl_core import models, run, timing
from sdxl_core.engines import torch_backend
from sdxl_core.errors import UserError
from sdxl_core.reports.measurements import render_engines
from sdxl_core.reports.results import ResultFile
from sdxl_core.run import DEFAULT_PROMPT
from sdxl_core.variants import VARIANTS, on_model

FLOPS_PER_STEP_1024 = 13.52e12  # SDXL UNet, CFG batch 2 at 1024x1024 (torch.utils.flop_counter on the meta device)
FP16_TUNINGS = {"full": ("full", None), "nchw": ("regional", False)}  # row suffix -> (compile mode, channels-last)
PRECISIONS = ("fp16", "int8", "fp8")


def add_arguments(p) -> None:
    p.add_argument("--model", default="sdxl-random", help="built-in, hub id or local dir")
    p.add_argument(
        "--precisions",
        default="fp16,int8,fp8",
        help="engines to prepare, from fp16,int8,fp8, each optionally +qkv (fused attention projections)",
    )
    p.add_argument(
        "--calibration-size",
        type=int,
        default=2,
        help="calibration prompts of the 8-bit engines (timing does not depend on it; the demo uses 32)",
    )
    p.add_argument(
        "--size", type=int, default=None, help="image height and width (default: the variant's; tiny's on tiny)"
    )
    p.add_argument("--engine-dir", required=True, help="where the engines are built, or reloaded from")
    p.add_argument("--onnx-dir", default=None, help="calibration state (reused when present)")
    p.add_argument("--reload", action="store_true", help="load engines only: no ONNX dir, no calibration")
    p.add_argument(
        "--compile",
        choices=("auto", "regional", "full", "off"),
        default="auto",
        help="auto: regional on a GPU, off on the CPU",
    )
    p.add_argument("--cuda-graph", choices=("auto", "on", "off"), default="auto", help="auto: on a GPU")
    p.add_argument("--fp16-tunings", default="", help=f"extra in-memory FP16 rows, from {','.join(FP16_TUNINGS)}")
    p.add_argument(
        "--layout",
        choices=("auto", "channels-last", "nchw"),
        default="auto",
        help="activation layout of the engine rows (auto: channels-last on a GPU, NCHW on the CPU)",
    )
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--iters", type=int, default=4, help="UNet steps per engine per round")
    p.add_argument("--out", required=True, help="directory for engines.json")


def main(args) -> int:
    tunings = [t for t in args.fp16_tunings.split(",") if t]
    unknown = [t for t in tunings if t not in FP16_TUNINGS]
    if unknown:
        raise UserError(f"unknown FP16 tuning {unknown[0]!r}: choose from {', '.join(FP16_TUNINGS)}")
    precisions = [p for p in args.precisions.split(",") if p]
    if not precisions or any(p.removesuffix("+qkv") not in PRECISIONS for p in precisions):
        raise UserError(f"--precisions takes fp16, int8 and fp8 (each optionally +qkv), got {args.precisions!r}")
    compile = {"auto": None, "regional": True, "full": True, "off": False}[args.compile]
    compile_mode = "full" if args.compile == "full" else "regional"
    cuda_graph = {"auto": None, "on": True, "off": False}[args.cuda_graph]
    layout = {"auto": None, "channels-last": True, "nchw": False}[args.layout]
    names = precisions + [f"fp16-{t}" for t in dict.fromkeys(tunings)]
    variants = {name: _variant(name, args) for name in names}
    options = run.Options(
        engine_dir=args.engine_dir,
        onnx_dir=None if args.reload else args.onnx_dir,
        allow_build=not args.reload,
        progress=False,
        use_cuda_graph=cuda_graph,
        backend_options={"compile": compile, "compile_mode": compile_mode, "channels_last": layout},
    )
    device = run.check(variants[names[0]], options)
    run.start_kernel_builds(variants.values(), device)
    size = variants[names[0]].height
    result = ResultFile(
        args.out,
        "engines",
        device,
        mode="reload" if args.reload else "build",
        model=args.model,
        size=size,
        calibration_size=args.calibration_size,
    )
    # A reload needs no UNet weights: the engine brings them. Tuned FP16 rows start from the seeded UNet.
    master = models.load(args.model, unet_weights=not args.reload or bool(tunings))
    runs, rows = {}, {}
    for name, variant in variants.items():
        tuned = name.startswith("fp16-")
        fresh = not args.reload or tuned  # tunings change the module: never share it between rows
        components = dataclasses.replace(master, unet=copy.deepcopy(master.unet) if fresh else master.unet)
        started = time.perf_counter()
        runs[name] = run.prepare(
            variant, _tuned(options, name, device) if tuned else options, device=device, components=components
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        info = runs[name].info_dict()
        rows[name] = result.add({"engine": name, "prepare_s": round(time.perf_counter() - started, 2), **info})
        print(f"{name}: prepared in {rows[name]['prepare_s']} s ({runs[name].info.mode})", flush=True)
    engines = {name: ready.engines for name, ready in runs.items()}
    inputs = torch_backend.unet_inputs(variant, master.unet, device, engines[precisions[0]].dtype)
    del master
    outputs = {}
    with torch.inference_mode():
        for name, engine in engines.items():
            outputs[name] = engine.unet(*inputs).float()
            if device.type == "cuda":
                torch.cuda.synchronize()  # a fault shows here, named, not later in another engine's timing
            print(f"{name}: first step ok", flush=True)
        steps = {name: (lambda engine=engine: engine.unet(*inputs)) for name, engine in engines.items()}
        samples = timing.interleaved_ms(steps, rounds=args.rounds, iters=args.iters, cuda=device.type == "cuda")
    medians = timing.medians(samples)
    flops = FLOPS_PER_STEP_1024 * (size / 1024) ** 2
    best_fp16 = min((ms for name, ms in medians.items() if name.startswith("fp16")), default=None)
    fp16 = next((name for name in precisions if name.startswith("fp16")), None)
    for name, row in rows.items():
        row.update(
            ms_per_step=round(medians[name], 3),
            ms_all=[round(t, 3) for t in samples[name]],
            tflops=round(flops / medians[name] / 1e9, 1),
        )
        if fp16 is not None:
            reference = outputs[fp16]
            row["rel_err_vs_fp16"] = float((outputs[name] - reference).norm() / reference.norm())
            row["speedup_vs_fp16"] = round(medians[fp16] / medians[name], 3)
        if best_fp16 is not None:
            row["speedup_vs_best_fp16"] = round(best_fp16 / medians[name], 3)
    result.save()
    _images(runs, rows, result, size, fp16 or precisions[0])
    print(render_engines(result.data))
    return 0


def _variant(name: str, args):
    """An engine row's variant: `fp16`, `int8+qkv`, ... on --model; a tuning row (`fp16-full`) is FP16's."""
    precision = "fp16" if name.startswith("fp16-") else name.removesuffix("+qkv")
    return on_model(
        VARIANTS[f"xl-1.0-{precision}"],
        args.model,
        height=args.size,
        width=args.size,
        calibration_size=args.calibration_size,
        fused_qkv=name.endswith("+qkv"),
    )


def _tuned(options: run.Options, name: str, device) -> run.Options:
    """A tuning row is built in memory (never stored) with its own compile mode and layout."""
    mode, channels_last = FP16_TUNINGS[name.removeprefix("fp16-")]
    compile = True if device.type == "cuda" else options.backend_options["compile"]
    tuning = {"compile": compile, "compile_mode": mode, "channels_last": channels_last}
    return dataclasses.replace(options, engine_dir=None, allow_build=True, backend_options=tuning)


def _images(runs, rows, result, size, reference: str) -> None:
    """One image per engine from the same prompt and seed; SSIM/PSNR against the reference engine's image."""
    from PIL import Image

    from sdxl_core import metrics
    from sdxl_core.reports.images import side_by_side

    images = {name: ready.generate(DEFAULT_PROMPT, seed=0).images[0] for name, ready in runs.items()}
    for name, image in images.items():
        values = metrics.compare(images[reference], image)
        rows[name].update(ssim_vs_fp16=round(values["ssim"], 5), psnr_vs_fp16=round(values["psnr"], 2))
    result.update(image_prompt=DEFAULT_PROMPT, image_reference=reference)
    grid = side_by_side(images, reference)
    if size > 512:  # keep the result file small: the heat maps read as well at half size
        grid = grid.resize((grid.width // 2, grid.height // 2), Image.BICUBIC)
    grid.save(result.path.with_suffix(".png"))
