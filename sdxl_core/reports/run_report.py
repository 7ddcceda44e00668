"""What a run was and what it measured: the JSON report, the latency table, library and device facts."""

from __future__ import annotations

import dataclasses
import datetime
import statistics
from pathlib import Path

import torch

from sdxl_core.errors import UserError
from sdxl_core.hardware import device_info, library_versions
from sdxl_core.reports.tables import markdown_table

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
    since = "program start" if "python" in seconds else "start"
    return table(seconds, report.get("startup_notes"), total_label=f"{since} to {until}")


KNOWN_REPORTS = "a txt2img report, a build report, a pytest-benchmark run or a result file of engines|kernels|profile"


def markdown_summary(paths: list[Path]) -> str:
    """Markdown for people reading CI artifacts: one table of txt2img reports, then one section per build
    report, pytest-benchmark run and result file, in the order given."""
    txt2img, sections = [], []
    for path in paths:
        data = _read_report(Path(path))
        kind = _kind(data)
        try:
            if kind == "txt2img report":
                txt2img.append(_txt2img_row(data))
            elif kind == "build report":
                sections.append(_build_table(path, data))
            elif kind == "pytest-benchmark run":
                sections.append(_benchmark_run_table(path, data))
            elif kind == "result file":
                from sdxl_core.reports.measurements import render

                sections.append(render(data))
            else:
                raise UserError(f"{path} is not a txt2img report, nor any report sdxl-bench writes ({KNOWN_REPORTS})")
        except (KeyError, TypeError, AttributeError, ValueError, ZeroDivisionError) as exc:
            why = (
                f"it has no {exc.args[0]!r} field" if isinstance(exc, KeyError) else str(exc) or "a field is malformed"
            )
            raise UserError(f"{path} is not a {kind}: {why}") from None
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
        sections.insert(0, markdown_table(columns, txt2img))
    return "\n\n".join(sections) + "\n"


def _read_report(path: Path):
    """The report's JSON; a missing file, a directory, a file that is not JSON: each its own line."""
    from sdxl_core.files import parse_json

    if path.is_dir():
        raise UserError(f"{path} is a directory: give report files ({KNOWN_REPORTS})")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except OSError as exc:
        raise UserError(f"{path} cannot be read: {exc.strerror or exc}") from None
    try:
        return parse_json(data)  # nesting bounded: deep JSON is a ValueError
    except ValueError:
        what = "a PNG image" if data.startswith(b"\x89PNG") else "not JSON"
        raise UserError(f"{path} is {what}, not a report ({KNOWN_REPORTS})") from None


def _kind(data) -> str | None:
    if not isinstance(data, dict):
        return None
    if "benchmarks" in data:
        return "pytest-benchmark run"
    if "kind" in data:
        return "result file"
    if "built" in data:
        return "build report"
    if "timings_ms" in data or "variant" in data:
        return "txt2img report"
    return None


def _txt2img_row(report) -> list:
    t, v = report["timings_ms"], report["variant"]
    return [
        v["name"],
        v["model"],
        report["device"]["name"],
        f"{v['height']}x{v['width']}",
        report["unet_steps"],
        f"{t['clip']:.1f}",
        f"{t['clip2']:.1f}",
        f"{t['unet'] / report['unet_steps']:.2f}",
        f"{t['vae']:.1f}",
        f"{t['total']:.1f}",
        f"{report['images_per_second']:.3f}",
    ]


def _build_table(path, data: dict) -> str:
    """A `build --report`: per variant, built or loaded, where, how large, and how long until it was ready."""
    device = data.get("device") or {}
    rows = []
    for record in data["built"]:
        engine = record["engine"]
        size = engine.get("engine_bytes")
        rows.append(
            [
                record["variant"],
                engine.get("mode"),
                _or_dash(size and size / 2**20, 1),
                _or_dash(record.get("startup_s", {}).get("total"), 1),
                engine.get("engine_path"),
            ]
        )
    head = f"### {Path(path).name}\n\nbuild on {device.get('name', '?')}\n\n    {data.get('command', '')}"
    return head + "\n\n" + markdown_table(("variant", "engine", "MiB", "ready after s", "path"), rows)


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
    rows = []
    for bench in benchmarks:
        stats, extra = bench["stats"], bench.get("extra_info", {})
        stages = extra.get("stages_ms", {})
        engine = extra.get("engine_bytes")
        peak = extra.get("peak_memory_bytes")
        rows.append(
            [
                bench["name"],
                extra.get("variant", ""),
                f"{stats['median'] * 1e3:.2f}",
                f"{stats['min'] * 1e3:.2f}",
                f"{stats['max'] * 1e3:.2f}",
                stats["rounds"],
                _or_dash(stages.get("unet"), 1),
                _or_dash(engine and engine / 2**20, 0),
                _or_dash(peak and peak / 2**30, 1),
            ]
        )
    return head + "\n\n" + markdown_table(columns, rows)


def _or_dash(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
