"""`sdxl-bench`: txt2img, build and report, with the flag names of TensorRT's demo_txt2img_xl.py."""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
from pathlib import Path

from .errors import UserError
from .variants import SCHEDULERS, TINY_SIZE, VARIANTS, Variant, get_variant

DEFAULT_PROMPT = "a photo of an astronaut riding a horse on mars"


class _Parser(argparse.ArgumentParser):
    """argparse prints usage plus the error; people get one line and exit status 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sdxl-bench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    txt2img = commands.add_parser("txt2img", help="generate images and print the per-stage latency table")
    txt2img.add_argument("prompt", nargs="*", help=f"text prompt (default: {DEFAULT_PROMPT!r})")
    txt2img.add_argument("--negative-prompt", default="")
    _add_variant_flags(txt2img)
    txt2img.add_argument("--seed", type=int, default=0)
    txt2img.add_argument("--batch-count", type=int, default=1)
    txt2img.add_argument("--num-warmup-runs", type=int, default=1)
    txt2img.add_argument("--output-dir", default="output")

    build = commands.add_parser("build", help="build (or verify) engines for variants without generating images")
    build.add_argument("--variants", default="xl-1.0-fp16", help=f"comma-separated, from: {', '.join(VARIANTS)}")
    _add_runtime_flags(build)

    report = commands.add_parser("report", help="turn a run's JSON report(s) into a markdown summary")
    report.add_argument("reports", nargs="+", help="JSON files written by txt2img (or pytest-benchmark histories)")
    report.add_argument("--output", default=None, help="markdown file to write (default: print)")
    history = commands.add_parser("history", help="pytest-benchmark histories to a markdown table and a PNG plot")
    history.add_argument("storage", nargs="?", default=".benchmarks", help="--benchmark-storage dir")
    history.add_argument("--output-dir", default="benchmark-history")
    for name, text in BENCH_COMMANDS.items():
        _bench_module(name).add_arguments(commands.add_parser(name, help=text))
    return parser


# GPU measurements (sdxl_core/bench/): each writes a result file into --out that `report` renders.
BENCH_COMMANDS = {
    "engines": "UNet engines side by side: build or reload FP16/INT8/FP8, time a step each (GPU)",
    "kernels": "per-shape GEMM and conv table: 16-bit against every 8-bit kernel (GPU)",
    "profile": "where a UNet step's GPU time goes, by kernel group, FP16 against 8-bit (GPU)",
}


def _bench_module(name: str):
    import importlib

    return importlib.import_module(f"sdxl_core.bench.{name}")


def _add_variant_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--variant", default=None, help=f"start from a named variant: {', '.join(VARIANTS)}")
    p.add_argument("--version", choices=("xl-1.0", "xl-turbo"), default=None, help="SDXL version (demo flag)")
    p.add_argument("--denoising-steps", type=int, default=None)
    p.add_argument("--scheduler", default=None, help=f"one of {', '.join(SCHEDULERS)}")
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lora-path", default=None, help="diffusers-format LoRA: hub id, dir or .safetensors file")
    p.add_argument("--lora-scale", type=float, default=None)
    precision = p.add_mutually_exclusive_group()
    precision.add_argument("--int8", action="store_true", help="INT8 UNet (ModelOpt SmoothQuant PTQ)")
    precision.add_argument("--fp8", action="store_true", help="FP8 (E4M3) UNet (ModelOpt PTQ)")
    p.add_argument("--quantization-level", type=float, default=None)
    p.add_argument("--quantization-alpha", type=float, default=None)
    p.add_argument("--quantization-percentile", type=float, default=None)
    p.add_argument("--calibration-size", type=int, default=None)
    p.add_argument("--fused-qkv", action="store_true",
                   help="torch backend: fuse each attention's Q/K/V (and cross-attention K/V) projections into one "
                        "GEMM; 8-bit engines are calibrated on the fused layers")
    _add_runtime_flags(p)


def _add_runtime_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="hub id, local diffusers dir, or a built-in: tiny (CPU-fast), sdxl-random (full size)")
    p.add_argument("--backend", default="torch", help="torch or tensorrt")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--half", choices=("fp16", "bf16"), default="fp16", help="dtype of unquantized GPU work")
    p.add_argument("--onnx-dir", default=None, help="ONNX exports and calibration state (reused when present)")
    p.add_argument("--engine-dir", default=None,
                   help="where engines are built and reused; enough on its own to run them (default: in memory)")
    p.add_argument("--no-build", action="store_true",
                   help="only load a prebuilt engine from --engine-dir: never calibrate, export or build")
    p.add_argument("--use-cuda-graph", action="store_true",
                   help="capture the UNet step in a CUDA graph (the torch backend always does on a GPU)")
    p.add_argument("--no-progress", action="store_true")


def variant_from_args(args) -> Variant:
    """The named variant (or the one --version/--int8/--fp8 picks), then each flag given overrides it."""
    if args.variant:
        base = get_variant(args.variant)
    elif args.version == "xl-turbo":
        base = VARIANTS["xl-turbo"]
    else:
        base = VARIANTS["xl-1.0-int8" if args.int8 else "xl-1.0-fp8" if args.fp8 else "xl-1.0-fp16"]
    precision = "int8" if args.int8 else "fp8" if args.fp8 else None
    if precision and base.precision != precision:
        level = VARIANTS[f"xl-1.0-{precision}"].quant_level
        base = base.replace(precision=precision, quant_level=level, name=f"{base.name}-{precision}")
    changes = {
        "model": args.model,
        "version": args.version,
        "steps": args.denoising_steps,
        "scheduler": args.scheduler,
        "guidance_scale": args.guidance_scale,
        "height": args.height,
        "width": args.width,
        "batch_size": args.batch_size,
        "lora_path": args.lora_path,
        "lora_scale": args.lora_scale,
        "quant_level": args.quantization_level,
        "quant_alpha": args.quantization_alpha,
        "quant_percentile": args.quantization_percentile,
        "calibration_size": args.calibration_size,
        "backend": args.backend,
        "fused_qkv": True if args.fused_qkv else None,
    }
    changes = {k: v for k, v in changes.items() if v is not None}
    if args.lora_path and Path(args.lora_path).suffix == ".safetensors" and not Path(args.lora_path).exists():
        raise UserError(f"--lora-path {args.lora_path} does not exist")
    if changes.get("model") == "tiny":
        changes = {"height": TINY_SIZE, "width": TINY_SIZE, **changes}
    return base.replace(**changes)


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but PyTorch sees no CUDA GPU")
    return device


def cmd_txt2img(args) -> int:
    from . import models, pipeline, runinfo
    from .engines import get_backend
    from .files import atomic_path, atomic_write_text

    variant = variant_from_args(args)
    if args.batch_count < 1 or args.num_warmup_runs < 0:
        raise UserError("--batch-count must be >= 1 and --num-warmup-runs >= 0")
    prompt = " ".join(args.prompt) or DEFAULT_PROMPT
    device = resolve_device(args.device)
    backend = get_backend(variant.backend)
    components = models.load(variant.model, lora_path=variant.lora_path, lora_scale=variant.lora_scale,
                             unet_weights=not args.no_build)  # a load-only run takes the UNet from the engine
    engines = prepare_engines(backend, variant, components, device, args)
    results = pipeline.run(engines, components, variant, prompt, negative_prompt=args.negative_prompt,
                           seed=args.seed, batch_count=args.batch_count, warmup_runs=args.num_warmup_runs,
                           progress=not args.no_progress)

    out_dir = Path(args.output_dir)
    image_paths = []
    for b, result in enumerate(results):
        for i, image in enumerate(result.images):
            path = out_dir / f"{variant.name}-s{args.seed}-b{b}-{i}.png"
            with atomic_path(path) as tmp:
                image.save(tmp, format="PNG")
            image_paths.append(str(path))
    report = runinfo.make_report(variant, engines, results, prompt=prompt, seed=args.seed,
                                 images=image_paths, command=shlex.join(sys.argv))
    report_path = out_dir / f"{variant.name}-s{args.seed}.json"
    atomic_write_text(report_path, json.dumps(report, indent=2) + "\n")
    print(runinfo.stage_table(report))
    print(f"wrote {len(image_paths)} image(s) and {report_path}")
    return 0


def prepare_engines(backend, variant, components, device, args):
    options = dict(engine_dir=args.engine_dir, onnx_dir=args.onnx_dir, half=args.half,
                   progress=not args.no_progress, allow_build=not args.no_build)
    if args.use_cuda_graph:
        options["use_cuda_graph"] = True
    return backend.prepare(variant, components, device, **options)


def cmd_build(args) -> int:
    from . import models
    from .engines import get_backend

    if not args.engine_dir:
        raise UserError("sdxl-bench build needs --engine-dir: that is where the engines go")
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    variants = [get_variant(n) for n in names]  # refuse a bad name before any work
    device = resolve_device(args.device)
    for variant in variants:
        variant = variant.replace(**{k: v for k, v in (("model", args.model), ("backend", args.backend)) if v})
        if variant.model == "tiny":
            variant = variant.replace(height=TINY_SIZE, width=TINY_SIZE)
        backend = get_backend(variant.backend)
        components = models.load(variant.model, lora_path=variant.lora_path, lora_scale=variant.lora_scale)
        engines = prepare_engines(backend, variant, components, device, args)
        info = engines.info
        print(f"{variant.name}: {info.get('mode')} {info.get('engine_path')} "
              f"({info.get('engine_bytes', 0) / 2**20:.1f} MiB)")
    return 0


def cmd_report(args) -> int:
    from . import runinfo

    text = runinfo.markdown_summary([Path(p) for p in args.reports])
    if args.output:
        from .files import atomic_write_text

        atomic_write_text(args.output, text)
        print(f"wrote {args.output}")
    else:
        print(text)
    return 0


def cmd_history(args) -> int:
    from .history import history_report

    markdown, plot = history_report(args.storage, args.output_dir)
    print(Path(markdown).read_text())
    print(f"wrote {markdown} and {plot}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"txt2img": cmd_txt2img, "build": cmd_build, "report": cmd_report, "history": cmd_history,
                **{name: _bench_module(name).main for name in BENCH_COMMANDS}}
    try:
        return commands[args.command](args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if type(exc).__name__ == "OutOfMemoryError":
            print(f"error: out of GPU memory ({platform.node()}): lower --batch-size or the size", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
