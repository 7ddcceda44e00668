"""The README's main job in one command: FP16 and INT8 engines, one prompt through both, images, grid, table.

    python -m sdxl_core.commands.demo [--model tiny] [--output-dir demo-out] [--engine-dir DIR]

On the built-in `tiny` model (CPU, random weights) it runs as every command runs `tiny` (variants.py's
builtin_defaults: 128x128, 4 steps, INT8 calibrated on 2 prompts), well under two minutes on two idle CPU
cores; a second run loads both engines from the engine dir and skips calibration. Each variant gets one
1-step warm-up (one-time kernel and allocator costs stay out of the table), then one timed run. It writes
into --output-dir:

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

from sdxl_core import hardware, run
from sdxl_core.errors import UserError
from sdxl_core.run import DEFAULT_PROMPT
from sdxl_core.variants import TINY_CALIBRATION_SIZE, TINY_MAX_STEPS, get_variant, on_model

VARIANT_NAMES = ("xl-1.0-fp16", "xl-1.0-int8")


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
        "--denoising-steps", type=int, default=None, help=f"default: {TINY_MAX_STEPS} on tiny, else the variant's 30"
    )
    p.add_argument(
        "--calibration-size",
        type=int,
        default=None,
        help=f"INT8 calibration prompts; default: {TINY_CALIBRATION_SIZE} on tiny, else 32",
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--no-warmup", action="store_true", help="skip the 1-step warm-up run per variant")
    p.add_argument("--no-progress", action="store_true")
    return p


def demo_variants(model: str, steps: int | None = None, calibration_size: int | None = None) -> list:
    return [
        on_model(get_variant(name), model, steps=steps, calibration_size=calibration_size) for name in VARIANT_NAMES
    ]


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
    from sdxl_core import metrics
    from sdxl_core.files import atomic_path, atomic_write_text
    from sdxl_core.reports import images as report

    started = time.perf_counter()
    out = Path(output_dir)
    engine_dir = Path(engine_dir) if engine_dir else out / "engines"
    variants = demo_variants(model, steps, calibration_size)
    options = run.Options(
        engine_dir=str(engine_dir),
        onnx_dir=str(onnx_dir) if onnx_dir else None,
        output_dir=str(out),
        device=device,
        progress=progress,
        phase_lines=progress,
    )
    torch_device = [run.check(variant, options) for variant in variants][0]

    images, rows, details = {}, [], []
    for variant in variants:
        build_started = time.perf_counter()
        ready = run.prepare(variant, options, device=torch_device)
        prepare_s = time.perf_counter() - build_started
        if warmup:
            ready.generate(prompt, seed=seed, steps=1)
        result = ready.generate(prompt, seed=seed)
        image = result.images[0]
        images[variant.name] = image
        t = result.timings
        rows.append(
            {
                "variant": variant.name,
                "engine": ready.info.mode,
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
                "engine": ready.info_dict(),
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
    facts = hardware.device_info(torch_device)
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
        "libraries": hardware.library_versions(),
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
