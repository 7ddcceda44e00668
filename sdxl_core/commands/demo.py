"""The README's main job in one command: FP16 and INT8 engines, one prompt through both, images, grid, table.

    python -m sdxl_core.commands.demo [--model tiny] [--output-dir demo-out] [--engine-dir DIR]

On the built-in `tiny` model (CPU, random weights) it runs at 128x128 with 10 steps and calibrates INT8 on
2 prompts, well under two minutes on two idle CPU cores; a second run loads both engines from the engine
dir and skips calibration. Each variant gets one 1-step warm-up (one-time kernel and allocator costs stay
out of the table), then one timed run. Writes into --output-dir:

    xl-1.0-fp16.png, xl-1.0-int8.png   the two images (same prompt, same seed)
    side_by_side.png                   FP16 | INT8 | SSIM heat map of INT8 vs FP16
    latency.md                         per-stage milliseconds per variant, plus SSIM/PSNR vs FP16
    demo.json                          the same numbers with engine info, library versions and device
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from sdxl_core.errors import UserError
from sdxl_core.variants import TINY_SIZE

DEFAULT_PROMPT = "a photo of an astronaut riding a horse on mars"
VARIANT_NAMES = ("xl-1.0-fp16", "xl-1.0-int8")
TINY = {"height": TINY_SIZE, "width": TINY_SIZE, "steps": 10, "calibration_size": 2}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sdxl_core.commands.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="tiny (default, CPU-fast), sdxl-random, a hub id or a local dir")
    p.add_argument("--output-dir", default="demo-out")
    p.add_argument(
        "--engine-dir", default=None, help="where the engines are built and reused (default: <output-dir>/engines)"
    )
    p.add_argument("--onnx-dir", default=None, help="calibration state, reused when present (default: none kept)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--denoising-steps", type=int, default=None, help=f"default: {TINY['steps']} on tiny, else the variant's 30"
    )
    p.add_argument(
        "--calibration-size",
        type=int,
        default=None,
        help=f"INT8 calibration prompts; default: {TINY['calibration_size']} on tiny, else 32",
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--no-warmup", action="store_true", help="skip the 1-step warm-up run per variant")
    p.add_argument("--no-progress", action="store_true")
    return p


def demo_variants(model: str, steps: int | None = None, calibration_size: int | None = None) -> list:
    from sdxl_core.variants import get_variant

    variants = []
    for name in VARIANT_NAMES:
        variant = get_variant(name).replace(model=model)
        if model == "tiny":
            variant = variant.replace(
                height=TINY["height"],
                width=TINY["width"],
                steps=TINY["steps"],
                calibration_size=TINY["calibration_size"],
            )
        if steps is not None:
            variant = variant.replace(steps=steps)
        if calibration_size is not None:
            variant = variant.replace(calibration_size=calibration_size)
        variants.append(variant)
    return variants


def run_demo(
    model: str = "tiny",
    output_dir="demo-out",
    engine_dir=None,
    *,
    onnx_dir=None,
    prompt: str = DEFAULT_PROMPT,
    seed: int = 0,
    steps: int | None = None,
    calibration_size: int | None = None,
    device: str = "auto",
    warmup: bool = True,
    progress: bool = True,
) -> dict:
    """Build (or load) both engines, render `prompt` with each, write the files; returns what was written."""
    from sdxl_core import metrics, models, pipeline
    from sdxl_core.commands.cli import resolve_device, set_cpu_threads
    from sdxl_core.engines import torch_backend
    from sdxl_core.files import atomic_path, atomic_write_text
    from sdxl_core.reports import images as report
    from sdxl_core.reports import run_report

    started = time.perf_counter()
    out = Path(output_dir)
    engine_dir = Path(engine_dir) if engine_dir else out / "engines"
    torch_device = resolve_device(device)
    if torch_device.type == "cpu":
        set_cpu_threads(None, model)
    variants = demo_variants(model, steps, calibration_size)

    images, rows, details = {}, [], []
    for variant in variants:
        if progress:
            print(f"{variant.name}: preparing the engine in {engine_dir}", file=sys.stderr)
        build_started = time.perf_counter()
        components = models.load(variant.model)
        engines = torch_backend.prepare(
            variant,
            components,
            torch_device,
            engine_dir=str(engine_dir),
            onnx_dir=str(onnx_dir) if onnx_dir else None,
            progress=progress,
        )
        prepare_s = time.perf_counter() - build_started
        if warmup:
            pipeline.txt2img(engines, components, variant.replace(steps=1), [prompt], seed=seed)
        result = pipeline.txt2img(engines, components, variant, [prompt], seed=seed, progress=progress)
        image = result.images[0]
        images[variant.name] = image
        t = result.timings
        rows.append(
            {
                "variant": variant.name,
                "engine": engines.info.get("mode"),
                "steps": result.unet_calls,
                "clip ms": t["clip"],
                "clip2 ms": t["clip2"],
                "unet ms/step": t["unet"] / result.unet_calls,
                "vae ms": t["vae"],
                "total ms": t["total"],
            }
        )
        details.append(
            {
                "variant": variant.name,
                "timings_ms": {k: round(v, 3) for k, v in t.items()},
                "unet_steps": result.unet_calls,
                "prepare_s": round(prepare_s, 2),
                "engine": engines.info,
            }
        )

    reference = images[VARIANT_NAMES[0]]
    quality = {name: metrics.compare(reference, img) for name, img in images.items() if name != VARIANT_NAMES[0]}
    for row in rows:
        if row["variant"] in quality:
            row["SSIM vs fp16"] = f"{quality[row['variant']]['ssim']:.4f}"
            row["PSNR dB"] = quality[row["variant"]]["psnr"]

    paths = {}
    for name, image in images.items():
        paths[name] = out / f"{name}.png"
        with atomic_path(paths[name]) as tmp:
            image.save(tmp, format="PNG")
    paths["side_by_side"] = out / "side_by_side.png"
    with atomic_path(paths["side_by_side"]) as tmp:
        report.side_by_side(images, VARIANT_NAMES[0]).save(tmp, format="PNG")

    first = variants[0]
    facts = run_report.device_info(torch_device)
    table = report.latency_table(rows)
    heading = (
        f"# sdxl-bench demo: {first.model}, {first.height}x{first.width}, {first.steps} steps, "
        f'{facts["name"]} ({torch_device.type})\n\nPrompt: "{prompt}", seed {seed}. '
        f"Milliseconds of one run after a 1-step warm-up{'' if warmup else ' (skipped)'}.\n\n"
    )
    if torch_device.type == "cpu":
        heading += (
            "On CPU the FP16 variant computes in float32 and INT8 runs CPU 8-bit kernels: these timings "
            "check the plumbing and say nothing about GPU speed-ups.\n\n"
        )
    paths["latency"] = out / "latency.md"
    atomic_write_text(paths["latency"], heading + table)
    paths["json"] = out / "demo.json"
    summary = {
        "command": shlex.join(sys.argv),
        "prompt": prompt,
        "seed": seed,
        "variants": details,
        "quality_vs_fp16": quality,
        "libraries": run_report.library_versions(),
        "device": facts,
        "engine_dir": str(engine_dir),
        "wall_s": round(time.perf_counter() - started, 2),
    }
    atomic_write_text(paths["json"], json.dumps(summary, indent=2, default=str) + "\n")
    return {"table": table, "rows": rows, "paths": paths, "quality": quality, "wall_s": summary["wall_s"]}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        done = run_demo(
            args.model,
            args.output_dir,
            args.engine_dir,
            onnx_dir=args.onnx_dir,
            prompt=args.prompt,
            seed=args.seed,
            steps=args.denoising_steps,
            calibration_size=args.calibration_size,
            device=args.device,
            warmup=not args.no_warmup,
            progress=not args.no_progress,
        )
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(done["table"])
    for label, path in done["paths"].items():
        print(f"{label:>13}: {path}")
    print(f"done in {done['wall_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
