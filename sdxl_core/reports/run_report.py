"""What a run was and what it measured: the JSON report, the latency table, library and device facts."""

from __future__ import annotations

import dataclasses
import datetime
import statistics
from pathlib import Path

import torch

from sdxl_core.hardware import cpu_model, device_info, library_versions, usable_cpus  # noqa: F401 (callers' names)

REPORT_SCHEMA_VERSION = 3
# Every report has these, in this order; `quantization` follows `variant` on 8-bit runs only, `model_note`
# follows `compute_dtype` on built-in models only. `startup_s`: seconds per start-up phase (see startup.py),
# then "other" and "total" (to the first image); `startup_notes`: where a phase's work came from.
REPORT_KEYS = (
    "schema",
    "created",
    "command",
    "variant",
    "compute_dtype",
    "half",
    "engine",
    "prompt",
    "negative_prompt",
    "seed",
    "timings_ms",
    "per_batch_ms",
    "images_per_second",
    "unet_steps",
    "startup_s",
    "startup_notes",
    "images",
    "libraries",
    "device",
)
QUANTIZATION_FIELDS = ("quant_level", "quant_alpha", "quant_percentile", "calibration_size")
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
TIMED_STAGES = ("clip", "clip2", "unet", "vae", "total")


def make_report(
    variant,
    engines,
    results,
    *,
    prompt: str,
    seed: int,
    images: list[str],
    command: str,
    negative_prompt: str = "",
    half: str | None = None,
    startup=None,
) -> dict:
    """What ran, as it ran: the UNet's precision as computed (fp32 for an unquantized UNet on the CPU), the
    compute dtype of the unquantized work, --half only where it applies (a GPU), quantization fields only for
    8-bit runs, and a note on built-in models, whose random weights make noise by design."""
    from sdxl_core.models import MODEL_NOTES

    per_batch = [{k: round(r.timings[k], 3) for k in TIMED_STAGES} for r in results]
    mean = {k: round(statistics.fmean(b[k] for b in per_batch), 3) for k in TIMED_STAGES}
    compute = DTYPE_NAMES.get(engines.dtype, str(engines.dtype).removeprefix("torch."))
    described = {k: v for k, v in dataclasses.asdict(variant).items() if k not in QUANTIZATION_FIELDS}
    described["precision"] = variant.precision if variant.is_quantized else compute
    report = {
        "schema": REPORT_SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command,
        "variant": described,
    }
    if variant.is_quantized:
        info = engines.info
        report["quantization"] = {
            "precision": variant.precision,
            "level": variant.quant_level,
            **(
                {"alpha": variant.quant_alpha, "percentile": variant.quant_percentile}
                if variant.precision == "int8"
                else {}
            ),
            "calibration_prompts": variant.calibration_size,
            "calibration_steps": variant.steps,
            "calibration": info.calibration,
            "calibration_s": info.calibration_s,
        }
    report["compute_dtype"] = compute
    if variant.model in MODEL_NOTES:
        report["model_note"] = MODEL_NOTES[variant.model]
    engine = engines.info.as_dict(quantized=variant.is_quantized)
    report.update(
        {
            "half": half if engines.device.type == "cuda" else None,
            "engine": engine,
            "prompt": prompt,
            "negative_prompt": negative_prompt,
            "seed": seed,
            "timings_ms": mean,
            "per_batch_ms": per_batch,
            "images_per_second": round(variant.batch_size * 1000.0 / mean["total"], 4),
            "unet_steps": results[0].unet_calls,
            "startup_s": startup.record() if startup is not None else {},
            "startup_notes": dict(startup.notes) if startup is not None else {},
            "images": images,
            "libraries": library_versions(engines.device),
            "device": device_info(engines.device),
        }
    )
    return report


def stage_table(report: dict) -> str:
    """The demo's latency table, with the two text encoders on rows of their own."""
    t, steps = report["timings_ms"], report["unet_steps"]
    rows = [("CLIP", t["clip"]), ("CLIP2", t["clip2"]), (f"UNet x {steps}", t["unet"]), ("VAE-Dec", t["vae"])]
    line = "|" + "-" * 18 + "|" + "-" * 16 + "|"
    out = [line, f"| {'Module':<16} | {'Latency':>14} |", line]
    out += [f"| {name:<16} | {ms:>11.2f} ms |" for name, ms in rows]
    out += [line, f"| {'Pipeline':<16} | {t['total']:>11.2f} ms |", line]
    v = report["variant"]
    out.append(
        f"UNet per step: {t['unet'] / steps:.2f} ms   Throughput: {report['images_per_second']:.3f} image/s"
        f"   ({v['name']} in {v['precision']}, {report['device']['name']}, batch {v['batch_size']})"
    )
    return "\n".join(out)


def startup_table(report: dict, until: str) -> str:
    """Where the start-up went (`startup_s`), phase by phase, to `until` ("first image", "engine ready")."""
    from sdxl_core.startup import table

    seconds = report["startup_s"]
    since = "process start" if "python" in seconds else "start"
    return table(seconds, report.get("startup_notes"), total_label=f"{since} to {until}")


def markdown_summary(paths: list[Path]) -> str:
    """Markdown for people reading CI artifacts: one table of txt2img reports, one per pytest-benchmark run."""
    from sdxl_core.errors import UserError
    from sdxl_core.files import parse_json

    txt2img, sections = [], []
    for path in paths:
        try:
            data = parse_json(Path(path).read_bytes())  # nesting bounded: deep JSON is a ValueError
        except (OSError, ValueError) as exc:
            raise UserError(f"{path} is not a txt2img report ({type(exc).__name__}: {exc})") from None
        try:
            if isinstance(data, dict) and "benchmarks" in data:
                sections.append(_benchmark_run_table(path, data))
            elif isinstance(data, dict) and "kind" in data:  # a result file of `sdxl-bench engines|kernels|profile`
                from sdxl_core.reports.results import render

                sections.append(render(data))
            else:
                txt2img.append(_txt2img_row(data))
        except (KeyError, TypeError, AttributeError, ValueError, ZeroDivisionError) as exc:
            kind = "pytest-benchmark run" if isinstance(data, dict) and "benchmarks" in data else "txt2img report"
            raise UserError(f"{path} is not a {kind} ({type(exc).__name__}: {exc})") from None
    if txt2img:
        columns = (
            "variant",
            "model",
            "device",
            "size",
            "steps",
            "CLIP ms",
            "CLIP2 ms",
            "UNet ms/step",
            "VAE ms",
            "total ms",
            "img/s",
        )
        sections.insert(0, "\n".join(["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns), *txt2img]))
    return "\n\n".join(sections) + "\n"


def _txt2img_row(report) -> str:
    t, v = report["timings_ms"], report["variant"]
    return (
        f"| {v['name']} | {v['model']} | {report['device']['name']} | {v['height']}x{v['width']} | "
        f"{report['unet_steps']} | {t['clip']:.1f} | {t['clip2']:.1f} | "
        f"{t['unet'] / report['unet_steps']:.2f} | {t['vae']:.1f} | {t['total']:.1f} | "
        f"{report['images_per_second']:.3f} |"
    )


def _benchmark_run_table(path, data: dict) -> str:
    """One pytest-benchmark run (`--benchmark-autosave` JSON): per benchmark median/min/max, engine, memory.

    Wrong types anywhere raise KeyError, TypeError, AttributeError or ValueError (the caller makes one line).
    """
    machine = data.get("machine_info") or {}
    commit = data.get("commit_info") or {}
    benchmarks = data["benchmarks"]
    if not isinstance(benchmarks, list):
        raise TypeError("'benchmarks' is not a list")
    gpu = next((b.get("extra_info", {}).get("gpu") for b in benchmarks if b.get("extra_info", {}).get("gpu")), None)
    head = (
        f"### {Path(path).name}\n\n{data.get('datetime', '')} · commit {str(commit.get('id', ''))[:10]} · "
        f"{gpu or machine.get('cpu', {}).get('brand_raw', 'cpu')} · Python {machine.get('python_version', '?')}"
    )
    columns = (
        "benchmark",
        "variant",
        "median ms",
        "min ms",
        "max ms",
        "rounds",
        "UNet ms (pipeline)",
        "engine MiB",
        "peak GPU GiB (process so far)",
    )
    lines = [head, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for bench in benchmarks:
        stats, extra = bench["stats"], bench.get("extra_info", {})
        stages = extra.get("stages_ms", {})
        engine = extra.get("engine_bytes")
        peak = extra.get("peak_memory_bytes")
        lines.append(
            f"| {bench['name']} | {extra.get('variant', '')} | {stats['median'] * 1e3:.2f} | "
            f"{stats['min'] * 1e3:.2f} | {stats['max'] * 1e3:.2f} | {stats['rounds']} | "
            f"{_or_dash(stages.get('unet'), 1)} | {_or_dash(engine and engine / 2**20, 0)} | "
            f"{_or_dash(peak and peak / 2**30, 1)} |"
        )
    return "\n".join(lines)


def _or_dash(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
