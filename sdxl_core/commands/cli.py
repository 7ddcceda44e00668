"""`sdxl-bench`: txt2img, build, report and history, with the flag names of TensorRT's demo_txt2img_xl.py."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import functools
import hashlib
import json
import logging
import os
import re
import shlex
import sys
import time
import warnings
from pathlib import Path

from sdxl_core.errors import UserError
from sdxl_core.startup import Startup
from sdxl_core.variants import (
    FP8_LEVELS,
    INT8_LEVELS,
    LIMITS,
    MAX_BATCH_ABOVE_512,
    SCHEDULERS,
    TINY_CALIBRATION_SIZE,
    TINY_SIZE,
    VARIANTS,
    Variant,
    builtin_defaults,
    check_range,
    get_variant,
)

# GPU measurements (sdxl_core/commands/): each writes a result file into --out that `report` renders.
BENCH_COMMANDS = {
    "engines": "UNet engines side by side: build or reload FP16/INT8/FP8, time a step each (GPU)",
    "kernels": "per-shape GEMM and conv table: 16-bit against every 8-bit kernel (GPU)",
    "profile": "where a UNet step's GPU time goes, by kernel group, FP16 against 8-bit (GPU)",
}


DEFAULT_PROMPT = "a photo of an astronaut riding a horse on mars"
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's default at the end of its help; helps that state their own default (a variant's, or
    none) keep their words instead of "(default: None)"."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (
            "default:" in text
            or any(action.default is v for v in (None, False, argparse.SUPPRESS))
            or action.default == []
        ):
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse prints usage plus the error; people get one line, exit status 2, and the help that applies."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _by_variant(field: str, fmt=str, tiny: str = "") -> str:
    """A variant field's default in words: the common value, then the variants that differ."""
    groups: dict = {}
    for name, variant in VARIANTS.items():
        groups.setdefault(getattr(variant, field), []).append(name)
    common, *others = sorted(groups, key=lambda value: -len(groups[value]))
    parts = [fmt(common)] + [f"{fmt(value)} for {', '.join(groups[value])}" for value in others]
    return f"default: the variant's, {'; '.join(parts)}{tiny}"


def build_parser(bench_flags=tuple(BENCH_COMMANDS)) -> argparse.ArgumentParser:
    """The whole command line. `bench_flags`: the GPU measurement subcommands whose own flags are added; their
    modules import torch and the backend, so `main` adds only the one it runs (their names and help are
    always there)."""
    parser = _Parser(prog="sdxl-bench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    txt2img = commands.add_parser(
        "txt2img",
        help="generate images and print the per-stage latency table",
        description="Generate images and print the per-stage latency table.",
    )
    txt2img.add_argument("prompt", nargs="*", help=f"text prompt (default: {DEFAULT_PROMPT!r})")
    txt2img.add_argument(
        "--negative-prompt",
        default="",
        help="what the image should move away from; used with guidance above 1 (default: none)",
    )
    _add_variant_flags(txt2img)
    low, high = LIMITS["--seed"]
    txt2img.add_argument("--seed", type=int, default=0, help=f"seed of the initial noise, {low} to 2**64-1")
    txt2img.add_argument(
        "--batch-count",
        type=int,
        default=1,
        help="timed batches, one random stream from --seed, {}-{}".format(*LIMITS["--batch-count"]),
    )
    txt2img.add_argument(
        "--num-warmup-runs",
        type=int,
        default=1,
        help="untimed runs before them, {}-{}".format(*LIMITS["--num-warmup-runs"]),
    )
    txt2img.add_argument(
        "--output-dir",
        default="output",
        help="images and the JSON report; their names carry the variant, the seed and a hash of the "
        "prompt and settings, so distinct runs never overwrite each other",
    )
    _add_runtime_flags(txt2img, building=False)

    build = commands.add_parser(
        "build",
        help="build (or verify) engines for variants without generating images",
        description="Build engines into --engine-dir, or find and verify the ones there.",
    )
    build.add_argument("--variants", default="xl-1.0-fp16", help=f"comma-separated, from: {', '.join(VARIANTS)}")
    build.add_argument(
        "--calibration-size",
        type=int,
        default=None,
        help="prompts each 8-bit build calibrates on, {}-{}, each a whole denoising run (default: the "
        "variant's, 32; {} with --model tiny)".format(*LIMITS["--calibration-size"], TINY_CALIBRATION_SIZE),
    )
    build.add_argument(
        "--report",
        default=None,
        help="JSON file for what each variant's engine is and where the start-up time went "
        "(default: none, the tables are printed only)",
    )
    _add_runtime_flags(build, building=True)

    report = commands.add_parser(
        "report",
        help="turn a run's JSON report(s) into a markdown summary",
        description="Turn txt2img reports or pytest-benchmark runs into markdown tables.",
    )
    report.add_argument("reports", nargs="+", help="JSON files written by txt2img (or pytest-benchmark histories)")
    report.add_argument("--output", default=None, help="markdown file to write (default: print it)")
    history = commands.add_parser(
        "history",
        help="pytest-benchmark histories to a markdown table and a PNG plot",
        description="pytest-benchmark histories to a markdown table and a PNG plot.",
    )
    history.add_argument("storage", nargs="?", default=".benchmarks", help="the --benchmark-storage dir")
    history.add_argument("--output-dir", default="benchmark-history", help="where history.md and history.png go")
    parser.subcommands = {"txt2img": txt2img, "build": build, "report": report, "history": history}
    for name, text in BENCH_COMMANDS.items():
        parser.subcommands[name] = commands.add_parser(name, help=text, description=text + ".")
        if name in bench_flags:
            _bench_module(name).add_arguments(parser.subcommands[name])
    return parser


def _bench_module(name: str):
    import importlib

    return importlib.import_module(f"sdxl_core.commands.{name}")


def _add_variant_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--variant",
        default=None,
        help=f"start from a named variant: {', '.join(VARIANTS)} "
        "(default: xl-1.0-fp16, or the one --version, --int8 or --fp8 picks)",
    )
    p.add_argument(
        "--version",
        choices=("xl-1.0", "xl-turbo"),
        default=None,
        help="SDXL version (demo flag): base 1.0 or Turbo (default: xl-1.0, or the --variant's)",
    )
    steps, size = LIMITS["--denoising-steps"], LIMITS["--height"]
    tiny_size = f"; {TINY_SIZE} with --model tiny"
    p.add_argument(
        "--denoising-steps",
        type=int,
        default=None,
        help=f"denoising steps, {steps[0]}-{steps[1]} ({_by_variant('steps')})",
    )
    p.add_argument("--scheduler", default=None, help=f"one of {', '.join(SCHEDULERS)} ({_by_variant('scheduler')})")
    p.add_argument(
        "--guidance-scale",
        type=float,
        default=None,
        help="classifier-free guidance, {:g}-{:g}; at 1 or below the UNet runs without CFG ({})".format(
            *LIMITS["--guidance-scale"], _by_variant("guidance_scale", "{:g}".format)
        ),
    )
    p.add_argument(
        "--height",
        type=int,
        default=None,
        help=f"image height, a multiple of 8, {size[0]}-{size[1]} ({_by_variant('height', tiny=tiny_size)})",
    )
    p.add_argument(
        "--width",
        type=int,
        default=None,
        help=f"image width, a multiple of 8, {size[0]}-{size[1]} ({_by_variant('width', tiny=tiny_size)})",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="images per batch, {}-{} (at most {} above 512x512, as the demo) ({})".format(
            *LIMITS["--batch-size"], MAX_BATCH_ABOVE_512, _by_variant("batch_size")
        ),
    )
    p.add_argument(
        "--lora-path",
        default=None,
        help="diffusers-format LoRA: hub id, dir or .safetensors file, fused "
        f"before any engine is built ({_by_variant('lora_path', lambda v: v or 'none')})",
    )
    p.add_argument(
        "--lora-scale",
        type=float,
        default=None,
        help="weight of the fused LoRA, {:g} to {:g} ({})".format(
            *LIMITS["--lora-scale"], _by_variant("lora_scale", "{:g}".format)
        ),
    )
    precision = p.add_mutually_exclusive_group()
    precision.add_argument(
        "--int8", action="store_true", help="INT8 UNet (ModelOpt SmoothQuant PTQ) (default: FP16 UNet)"
    )
    precision.add_argument("--fp8", action="store_true", help="FP8 (E4M3) UNet (ModelOpt PTQ) (default: FP16 UNet)")
    levels = [
        ", ".join(f"{level:g}" for level in group[:-1]) + f" or {group[-1]:g}" for group in (INT8_LEVELS, FP8_LEVELS)
    ]
    p.add_argument(
        "--quantization-level",
        type=float,
        default=None,
        help=f"which layers an 8-bit UNet quantizes: 1 convs, 2 + FFN linears, 2.5 + Q/K/V, 3 + every "
        f"linear, 4 + attention matmuls; INT8 takes {levels[0]}; FP8 {levels[1]} "
        f"(default: 3; ignored without --int8/--fp8)",
    )
    p.add_argument("--quantization-alpha", type=float, default=None, help="INT8 SmoothQuant alpha, 0-1 (default: 0.8)")
    p.add_argument(
        "--quantization-percentile",
        type=float,
        default=None,
        help="INT8 conv inputs: share of the denoising steps whose amax counts, in (0, 1] (default: 1.0)",
    )
    p.add_argument(
        "--calibration-size",
        type=int,
        default=None,
        help="prompts an 8-bit build calibrates on, {}-{}, each a whole denoising run (default: 32; "
        "{} with --model tiny)".format(*LIMITS["--calibration-size"], TINY_CALIBRATION_SIZE),
    )
    p.add_argument(
        "--fused-qkv",
        action="store_true",
        help="torch backend: fuse each attention's Q/K/V (and cross-attention K/V) projections into one "
        "GEMM; 8-bit engines are calibrated on the fused layers (default: off)",
    )


def _add_runtime_flags(p: argparse.ArgumentParser, building: bool) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="hub id (org/name), local diffusers dir, or a built-in: tiny (CPU-fast), sdxl-random "
        "(full size); built-ins have random weights (default: the variant's, "
        "stabilityai/stable-diffusion-xl-base-1.0; stabilityai/sdxl-turbo for xl-turbo)",
    )
    p.add_argument("--backend", default="torch", help="torch or tensorrt")
    p.add_argument(
        "--device", default="auto", help="auto (a CUDA GPU where PyTorch sees one, else the CPU), cpu, cuda or cuda:N"
    )
    p.add_argument(
        "--half",
        choices=("fp16", "bf16"),
        default="fp16",
        help="dtype of unquantized GPU work; the CPU always computes in fp32",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for PyTorch on the CPU, {}-{} (default: 1 with --model tiny, whose ops are too "
        "small to gain from threads; else the CPUs this process may use; OMP_NUM_THREADS when "
        "set)".format(*LIMITS["--threads"]),
    )
    p.add_argument(
        "--onnx-dir",
        default=None,
        help="ONNX exports and calibration state, reused when present (default: none, nothing kept)",
    )
    p.add_argument(
        "--engine-dir",
        default=None,
        help="where engines are built and reused; enough on its own to run them (default: none, the "
        "engine lives in memory)",
    )
    if building:
        p.add_argument(
            "--no-build",
            action="store_true",
            help="build nothing: only check that each engine is in --engine-dir, whole, and loads",
        )
        p.add_argument(
            "--use-cuda-graph",
            action="store_true",
            help="after building, also capture the UNet step in a CUDA graph to check that it captures "
            "(engines store no graph; txt2img captures its own)",
        )
    else:
        p.add_argument(
            "--no-build",
            action="store_true",
            help="only load a prebuilt engine from --engine-dir: never calibrate, export or build",
        )
        p.add_argument(
            "--use-cuda-graph",
            action="store_true",
            help="capture the UNet step in a CUDA graph (the torch backend always does on a GPU; "
            "TensorRT only with this flag)",
        )
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bars; one line per phase still goes to stderr"
    )


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
    changes = {**builtin_defaults(changes.get("model")), **changes}
    return base.replace(**changes)


def resolve_device(name: str):
    if not DEVICE.fullmatch(name):
        raise UserError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N")
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but PyTorch sees no CUDA GPU")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: PyTorch sees {torch.cuda.device_count()} CUDA GPU(s), numbered from 0")
    return device


def set_cpu_threads(requested: int | None, model: str) -> int:
    """PyTorch's CPU threads: what was asked, else what OMP_NUM_THREADS says, else 1 for `tiny` (its ops are too
    small to gain from threads, and on a busy machine extra threads made its steps 18x slower), else every CPU
    this process may use."""
    import torch

    from sdxl_core.reports.run_report import usable_cpus

    if requested is None and os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    threads = requested or (1 if model == "tiny" else usable_cpus())
    torch.set_num_threads(threads)
    return threads


def quiet_library_notices() -> None:
    """Import-time notices that say nothing about the run: torch's "no CUDA runtime" on a CPU machine, ModelOpt's
    deprecated torch.jit use and its untested-transformers-version warning. Phase lines stay readable."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated")
    warnings.filterwarnings("ignore", message=r".* is not tested with current version of modelopt")


def say(message: str) -> None:
    """One line per phase on stderr, with or without progress bars: long work never runs silent."""
    print(f"sdxl-bench: {message}", file=sys.stderr, flush=True)


def output_stem(
    variant: Variant, prompt: str, negative_prompt: str, seed: int, batch_count: int, device, half: str
) -> str:
    """`<variant>-s<seed>-<hash>`: the hash covers the prompts and every setting that changes the images, so runs
    that differ in any of them write different files; the same run again replaces its own files."""
    settings = {
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "variant": dataclasses.asdict(variant),
        "batch_count": batch_count,
        "device": device.type,
        "half": half if device.type == "cuda" else None,
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    return f"{variant.name}-s{seed}-{digest}"


def check_dirs(args, output_dir: str | None = None) -> None:
    """Refuse before any work: an output, engine or ONNX dir that is a file or cannot be written to, and a
    --no-build engine dir that does not exist."""
    from sdxl_core.files import check_writable_dir

    if output_dir is not None:
        check_writable_dir(output_dir, "--output-dir")
    if args.no_build:
        if not args.engine_dir:
            raise UserError("--no-build loads a prebuilt engine: it needs --engine-dir")
        if not Path(args.engine_dir).is_dir():
            raise UserError(f"--engine-dir {args.engine_dir} is not a directory: nothing to load with --no-build")
        return
    if args.engine_dir and not Path(args.engine_dir).is_dir():
        # An existing engine dir may be a shared, read-only store: loading from it writes nothing, and a build
        # that would have to write there is refused in one line by the store.
        check_writable_dir(args.engine_dir, "--engine-dir")
    if args.onnx_dir:
        check_writable_dir(args.onnx_dir, "--onnx-dir")


def _check_runtime(args, model: str, lora_path: str | None = None):
    """The checks every command that builds or runs engines makes before loading anything; returns the device."""
    from sdxl_core import models

    if args.threads is not None:
        check_range("--threads", args.threads)
    device = resolve_device(args.device)
    models.check_model_name(model)
    if models.is_hub_id(model):
        models.check_hub_source(model, "unet/config.json", "model", "use --model tiny or a local diffusers dir")
    if lora_path and models.is_hub_id(lora_path):
        models.check_hub_source(
            lora_path, "pytorch_lora_weights.safetensors", "LoRA", "pass a local .safetensors file with --lora-path"
        )
    if args.use_cuda_graph and device.type != "cuda":
        raise UserError("--use-cuda-graph needs a CUDA GPU")
    from sdxl_core.engines import cross_kv

    cross_kv.mode()  # a bad SDXL_BENCH_CROSS_KV is one line here, before any model loads
    return device


def _engine_phase(variant: Variant, args) -> str:
    where = f"from {args.engine_dir}" if args.engine_dir else "in memory"
    if args.no_build:
        return f"{variant.name}: loading the UNet engine {where}"
    work = (
        f"; a build first calibrates on {variant.calibration_size} prompt(s) x {variant.steps} steps"
        if variant.is_quantized
        else ""
    )
    kind = f"{variant.precision.upper()} " if variant.is_quantized else ""
    return f"{variant.name}: preparing the {kind}UNet engine {where}{work}"


def _engine_done(info: dict, startup: Startup) -> str:
    calibration = (
        f", calibration {info['calibration']} in {info['calibration_s']:.1f} s" if info.get("calibration") else ""
    )
    return f"engine {info.get('mode')} ({time.perf_counter() - startup.origin:.1f} s since start){calibration}"


def cmd_txt2img(args, startup: Startup) -> int:
    from sdxl_core.files import atomic_path, atomic_write_text

    variant = variant_from_args(args)
    check_range("--seed", args.seed)
    check_range("--batch-count", args.batch_count)
    check_range("--num-warmup-runs", args.num_warmup_runs)
    prompt = " ".join(args.prompt) or DEFAULT_PROMPT
    device, backend = _start(args, startup, variant, args.output_dir)
    import torch

    from sdxl_core import pipeline
    from sdxl_core.reports import run_report

    threads = set_cpu_threads(args.threads, variant.model) if device.type == "cpu" else None

    say(f"loading {variant.model} on {device}" + (f" ({threads} thread(s))" if threads else ""))
    components = _load_components(variant, args, startup)
    say(_engine_phase(variant, args))
    engines = prepare_engines(backend, variant, components, device, args, startup)
    say(_engine_done(engines.info, startup))
    if args.num_warmup_runs:
        say(f"warm-up: {args.num_warmup_runs} untimed run(s) of {variant.steps} steps")
    say(f"generating {args.batch_count} batch(es) of {variant.batch_size} image(s), {variant.steps} steps each")
    generator = torch.Generator("cpu").manual_seed(args.seed)  # one random stream over all timed batches
    run = functools.partial(
        pipeline.run,
        engines,
        components,
        variant,
        prompt,
        negative_prompt=args.negative_prompt,
        seed=args.seed,
        progress=not args.no_progress,
        generator=generator,
    )
    with startup.phase("warmup", device):
        run(batch_count=0, warmup_runs=args.num_warmup_runs)
    with startup.phase("first_image", device):
        results = run(batch_count=1)
    startup.finish()
    results += run(batch_count=args.batch_count - 1)

    out_dir = Path(args.output_dir)
    stem = output_stem(variant, prompt, args.negative_prompt, args.seed, args.batch_count, device, args.half)
    image_paths = []
    for b, result in enumerate(results):
        for i, image in enumerate(result.images):
            path = out_dir / f"{stem}-b{b}-{i}.png"
            with atomic_path(path) as tmp:
                image.save(tmp, format="PNG")
            image_paths.append(str(path))
    report = run_report.make_report(
        variant,
        engines,
        results,
        prompt=prompt,
        seed=args.seed,
        images=image_paths,
        command=shlex.join(sys.argv),
        negative_prompt=args.negative_prompt,
        half=args.half,
        startup=startup,
    )
    report_path = out_dir / f"{stem}.json"
    atomic_write_text(report_path, json.dumps(report, indent=2) + "\n")
    print(run_report.stage_table(report))
    print(run_report.startup_table(report, until="first image"))
    print(f"wrote {len(image_paths)} image(s) and {report_path}")
    return 0


def _start(args, startup: Startup, variant: Variant, output_dir: str | None = None):
    """The checks before any work, and the imports a run needs, each timed; returns (device, backend)."""
    quiet_library_notices()
    with startup.phase("imports"):
        import torch  # noqa: F401  (the checks need it; the other imports wait until the checks pass)
    with startup.phase("checks"):
        device = _check_runtime(args, variant.model, variant.lora_path)
    with startup.phase("imports"):
        from sdxl_core import models, pipeline  # noqa: F401  (the pipeline's imports too: numpy, PIL, tqdm)
        from sdxl_core.engines import get_backend

        backend = get_backend(variant.backend)
        models.import_libraries()
    with startup.phase("checks"):
        check_dirs(args, output_dir)
    return device, backend


def _load_components(variant: Variant, args, startup: Startup):
    """The model's components. With an engine dir the UNet is shape-only: its weights are generated or read
    only if the engine has to be built (a reused engine brings its own UNet)."""
    from sdxl_core import models

    if variant.model in models.MODEL_NOTES:
        say(models.MODEL_NOTES[variant.model])
    return models.load(
        variant.model,
        lora_path=variant.lora_path,
        lora_scale=variant.lora_scale,
        unet_weights=not (args.no_build or args.engine_dir),
        startup=startup,
    )


def prepare_engines(backend, variant, components, device, args, startup: Startup | None = None):
    options = dict(
        engine_dir=args.engine_dir,
        onnx_dir=args.onnx_dir,
        half=args.half,
        progress=not args.no_progress,
        allow_build=not args.no_build,
        startup=startup,
    )
    if args.use_cuda_graph:
        options["use_cuda_graph"] = True
    return backend.prepare(variant, components, device, **options)


def cmd_build(args, startup: Startup) -> int:
    from sdxl_core.engines import check_backend

    if not args.engine_dir:
        raise UserError("sdxl-bench build needs --engine-dir: that is where the engines go")
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    if not names:
        raise UserError(f"--variants {args.variants!r} names no variant: choose from {', '.join(VARIANTS)}")
    variants = [get_variant(n) for n in names]  # refuse a bad name before any work
    variants = [
        v.replace(**{k: val for k, val in (("model", args.model), ("backend", args.backend)) if val}) for v in variants
    ]
    variants = [v.replace(**builtin_defaults(v.model)) for v in variants]
    if args.calibration_size is not None:
        check_range("--calibration-size", args.calibration_size)
        variants = [v.replace(calibration_size=args.calibration_size) if v.is_quantized else v for v in variants]
    for variant in variants:
        check_backend(variant.backend)
    if args.report:
        from sdxl_core.files import check_writable_dir

        check_writable_dir(Path(args.report).parent, "--report")
    device, _ = _start(args, startup, variants[0])
    from sdxl_core.engines import get_backend
    from sdxl_core.reports import run_report

    with startup.phase("checks"):
        for variant in variants[1:]:
            _check_runtime(args, variant.model, variant.lora_path)
    if device.type == "cpu":
        set_cpu_threads(args.threads, variants[0].model)
    built = []
    for i, variant in enumerate(variants):
        timed = startup if i == 0 else Startup()  # each variant's table counts from where it starts
        backend = get_backend(variant.backend)
        say(f"loading {variant.model} for {variant.name}")
        components = _load_components(variant, args, timed)
        say(_engine_phase(variant, args))
        engines = prepare_engines(backend, variant, components, device, args, timed)
        timed.finish()
        info = engines.info
        print(
            f"{variant.name}: {info.get('mode')} {info.get('engine_path')} "
            f"({info.get('engine_bytes', 0) / 2**20:.1f} MiB)"
        )
        record = {
            "variant": variant.name,
            "engine": {k: v for k, v in info.items() if k != "gemm_timings"},
            "startup_s": timed.record(),
            "startup_notes": timed.notes,
        }
        print(run_report.startup_table(record, until=f"{variant.name} engine ready"))
        built.append(record)
    if args.report:
        from sdxl_core.files import atomic_write_text

        report = {
            "schema": run_report.REPORT_SCHEMA_VERSION,
            "command": shlex.join(sys.argv),
            "built": built,
            "libraries": run_report.library_versions(device),
            "device": run_report.device_info(device),
        }
        atomic_write_text(args.report, json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.report}")
    return 0


def cmd_report(args) -> int:
    from sdxl_core.reports import run_report

    text = run_report.markdown_summary([Path(p) for p in args.reports])
    if args.output:
        from sdxl_core.files import atomic_write_text, check_writable_dir

        check_writable_dir(Path(args.output).parent, "--output")
        atomic_write_text(args.output, text)
        print(f"wrote {args.output}")
    else:
        print(text)
    return 0


def cmd_history(args) -> int:
    from sdxl_core.files import check_writable_dir
    from sdxl_core.reports.history import history_report

    check_writable_dir(args.output_dir, "--output-dir")
    markdown, plot = history_report(args.storage, args.output_dir)
    print(Path(markdown).read_text())
    print(f"wrote {markdown} and {plot}")
    return 0


# What the machine can do about an OSError, by errno: the fix goes on the same line as the error.
ENVIRONMENT_HINTS = {
    errno.ENOSPC: "free some space, or point --output-dir, --engine-dir or --onnx-dir at another disk",
    errno.EDQUOT: "free some of your quota, or point --output-dir, --engine-dir or --onnx-dir elsewhere",
    errno.EFBIG: "the file size limit (ulimit -f) is too low for this file",
    errno.EACCES: "check the permissions, or point --output-dir, --engine-dir or --onnx-dir elsewhere",
    errno.EPERM: "check the permissions, or point --output-dir, --engine-dir or --onnx-dir elsewhere",
    errno.EROFS: "that file system is read-only: point --output-dir, --engine-dir or --onnx-dir elsewhere",
    errno.ENOTDIR: "a path component is a file, not a directory",
    errno.EISDIR: "a directory stands where a file should be",
}


def environment_error(exc: BaseException) -> str | None:
    """One line for an error the machine caused (disk full, permissions, read-only, out of memory), else None.

    Writers outside Python's io (safetensors, torch.save) report a full disk in their own words; those are
    recognised by their OS error number or text.
    """
    text = str(exc)
    number = exc.errno if isinstance(exc, OSError) else None
    found = re.search(r"(?:os error|\bcode:) (\d+)", text)  # Rust's io::Error, shown or debug-printed
    if number is None and found:
        number = int(found.group(1))
    if number is None and ("No space left on device" in text or "file write failed" in text):
        number = errno.ENOSPC
    if type(exc).__name__ == "OutOfMemoryError":
        return "out of GPU memory: lower --batch-size or the image size, or use a GPU with more free memory"
    if isinstance(exc, MemoryError) or "can't allocate memory" in text:
        return "out of memory: lower --batch-size or the image size"
    if number is None and not isinstance(exc, OSError):
        return None
    where = getattr(exc, "filename", None)
    reason = os.strerror(number) if number else (text.splitlines() or [type(exc).__name__])[0]
    hint = ENVIRONMENT_HINTS.get(number, "check the path and the machine")
    return f"{reason}{f' ({where})' if where else ''}: {hint}"


def main(argv: list[str] | None = None) -> int:
    """Run one command. Without `argv` this process was started to run it (the entry point, `python -m`), so its
    start-up table counts from the process's start; a caller passing `argv` counts from this call."""
    startup = Startup.from_process_start() if argv is None else Startup()
    words = sys.argv[1:] if argv is None else argv
    parser = build_parser(bench_flags=[w for w in words[:1] if w in BENCH_COMMANDS])
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # refused by the subcommand, so the error points at its own --help
        parser.subcommands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    commands = {
        "txt2img": functools.partial(cmd_txt2img, startup=startup),
        "build": functools.partial(cmd_build, startup=startup),
        "report": cmd_report,
        "history": cmd_history,
    }
    try:
        return (commands.get(args.command) or _bench_module(args.command).main)(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        line = environment_error(exc)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
