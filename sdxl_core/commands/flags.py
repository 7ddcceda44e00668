"""The `sdxl-bench` command line: every subcommand's flags (the names of TensorRT's demo_txt2img_xl.py), their
help with each default, and the variant the txt2img flags pick."""

from __future__ import annotations

import argparse
import importlib
import math
from importlib import metadata

from sdxl_core.files import LOCK_TIMEOUT_S
from sdxl_core.run import DEFAULT_PROMPT
from sdxl_core.variants import (
    FP8_LEVELS,
    INT8_LEVELS,
    LIMITS,
    MAX_BATCH_ABOVE_512,
    SCHEDULERS,
    TINY_CALIBRATION_SIZE,
    TINY_MAX_STEPS,
    TINY_SIZE,
    VARIANTS,
    Variant,
    get_variant,
    on_model,
)

# GPU measurements (sdxl_core/commands/): each writes a result file into --out that `report` renders.
BENCH_COMMANDS = {
    "engines": "UNet engines side by side: build or reload FP16/INT8/FP8, time a step each (GPU)",
    "kernels": "per-shape GEMM and conv table (16-bit against every 8-bit kernel) and the fused quantization (GPU)",
    "profile": "where a UNet step's GPU time goes, by kernel group, FP16 against 8-bit (GPU)",
}
DESCRIPTION = "txt2img, build, report and history, with the flag names of TensorRT's demo_txt2img_xl.py."


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


def project_version() -> str:
    """The installed package's version; run from a source tree that is not installed (a GPU host's copy on
    PYTHONPATH), the one pyproject.toml names, said so: every command builds this parser, so it must not fail."""
    try:
        return metadata.version("sdxl-bench")
    except metadata.PackageNotFoundError:
        import tomllib
        from pathlib import Path

        try:
            project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]
            return f"{project['version']} (source tree, not installed)"
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "unknown (not installed)"


def build_parser(bench_flags=tuple(BENCH_COMMANDS)) -> argparse.ArgumentParser:
    """The whole command line. `bench_flags`: the GPU measurement subcommands whose own flags are added; their
    modules import torch and the backend, so `main` adds only the one it runs (their names and help are
    always there)."""
    parser = _Parser(prog="sdxl-bench", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"sdxl-bench {project_version()}")
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
            bench_module(name).add_arguments(parser.subcommands[name])
    return parser


def bench_module(name: str):
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
    tiny_steps = f"; at most {TINY_MAX_STEPS} with --model tiny"
    p.add_argument(
        "--denoising-steps",
        type=int,
        default=None,
        help=f"denoising steps, {steps[0]}-{steps[1]} ({_by_variant('steps', tiny=tiny_steps)})",
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
    for side in ("height", "width"):
        p.add_argument(
            f"--{side}",
            type=int,
            default=None,
            help=f"image {side}, a multiple of 8, {size[0]}-{size[1]} ({_by_variant(side, tiny=tiny_size)})",
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
    p.add_argument(
        "--lock-timeout",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help=f"how long to wait for another process building the same engine, then give up (default: "
        f"{LOCK_TIMEOUT_S:g})",
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


def _seconds(text: str) -> float:
    """A finite, non-negative number of seconds (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds, 0 or more, got {text}")
    return value


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
        "model": args.model,  # first: a built-in model's defaults apply under the flags (`on_model`)
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
    return on_model(base, **changes)
