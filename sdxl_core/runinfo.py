"""What a run was and what it measured: the JSON report, the latency table, library and device facts."""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import platform
import statistics
from pathlib import Path

import torch

REPORT_SCHEMA_VERSION = 1
REPORT_KEYS = ("schema", "created", "command", "variant", "engine", "prompt", "seed", "timings_ms",
               "per_batch_ms", "images_per_second", "unet_steps", "images", "libraries", "device")
TIMED_STAGES = ("clip", "clip2", "unet", "vae", "total")
LIBRARIES = ("torch", "diffusers", "transformers", "nvidia-modelopt", "triton", "tensorrt", "onnx", "onnxruntime",
             "peft", "open-clip-torch")


def library_versions() -> dict[str, str | None]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    versions["python"] = platform.python_version()
    versions["cuda"] = torch.version.cuda
    return versions


def device_info(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"type": device.type, "name": platform.processor() or platform.machine(),
                "threads": torch.get_num_threads()}
    props = torch.cuda.get_device_properties(device)
    return {"type": "cuda", "name": props.name, "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1), "multiprocessors": props.multi_processor_count}


def make_report(variant, engines, results, *, prompt: str, seed: int, images: list[str], command: str) -> dict:
    per_batch = [{k: round(r.timings[k], 3) for k in TIMED_STAGES} for r in results]
    mean = {k: round(statistics.fmean(b[k] for b in per_batch), 3) for k in TIMED_STAGES}
    return {
        "schema": REPORT_SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command,
        "variant": dataclasses.asdict(variant),
        "engine": engines.info,
        "prompt": prompt,
        "seed": seed,
        "timings_ms": mean,
        "per_batch_ms": per_batch,
        "images_per_second": round(variant.batch_size * 1000.0 / mean["total"], 4),
        "unet_steps": results[0].unet_calls,
        "images": images,
        "libraries": library_versions(),
        "device": device_info(engines.device),
    }


def stage_table(report: dict) -> str:
    """The demo's latency table, with the two text encoders on rows of their own."""
    t, steps = report["timings_ms"], report["unet_steps"]
    rows = [("CLIP", t["clip"]), ("CLIP2", t["clip2"]), (f"UNet x {steps}", t["unet"]), ("VAE-Dec", t["vae"])]
    line = "|" + "-" * 18 + "|" + "-" * 16 + "|"
    out = [line, f"| {'Module':<16} | {'Latency':>14} |", line]
    out += [f"| {name:<16} | {ms:>11.2f} ms |" for name, ms in rows]
    out += [line, f"| {'Pipeline':<16} | {t['total']:>11.2f} ms |", line]
    out.append(f"UNet per step: {t['unet'] / steps:.2f} ms   Throughput: {report['images_per_second']:.3f} image/s"
               f"   ({report['variant']['name']}, {report['device']['name']}, batch {report['variant']['batch_size']})")
    return "\n".join(out)


def markdown_summary(paths: list[Path]) -> str:
    """Markdown for people reading CI artifacts: one table of txt2img reports, one per pytest-benchmark run."""
    from .errors import UserError

    txt2img, sections = [], []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"{path} is not a txt2img report ({type(exc).__name__}: {exc})") from None
        if isinstance(data, dict) and "benchmarks" in data:
            sections.append(_benchmark_run_table(path, data))
        elif isinstance(data, dict) and "kind" in data:  # a result file of `sdxl-bench engines|kernels|profile`
            from .bench.results import render

            sections.append(render(data))
        else:
            txt2img.append(_txt2img_row(path, data))
    if txt2img:
        columns = ("variant", "model", "device", "size", "steps", "CLIP ms", "CLIP2 ms", "UNet ms/step", "VAE ms",
                   "total ms", "img/s")
        sections.insert(0, "\n".join(["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns), *txt2img]))
    return "\n\n".join(sections) + "\n"


def _txt2img_row(path, report) -> str:
    from .errors import UserError

    try:
        t, v = report["timings_ms"], report["variant"]
        return (f"| {v['name']} | {v['model']} | {report['device']['name']} | {v['height']}x{v['width']} | "
                f"{report['unet_steps']} | {t['clip']:.1f} | {t['clip2']:.1f} | "
                f"{t['unet'] / report['unet_steps']:.2f} | {t['vae']:.1f} | {t['total']:.1f} | "
                f"{report['images_per_second']:.3f} |")
    except (KeyError, TypeError, ZeroDivisionError) as exc:
        raise UserError(f"{path} is not a txt2img report ({type(exc).__name__}: {exc})") from None


def _benchmark_run_table(path, data: dict) -> str:
    """One pytest-benchmark run (`--benchmark-autosave` JSON): per benchmark median/min/max, engine, memory."""
    from .errors import UserError

    machine = data.get("machine_info", {})
    commit = data.get("commit_info", {})
    gpu = next((b.get("extra_info", {}).get("gpu") for b in data["benchmarks"] if b.get("extra_info", {}).get("gpu")),
               None)
    head = (f"### {Path(path).name}\n\n{data.get('datetime', '')} · commit {str(commit.get('id', ''))[:10]} · "
            f"{gpu or machine.get('cpu', {}).get('brand_raw', 'cpu')} · Python {machine.get('python_version', '?')}")
    columns = ("benchmark", "variant", "median ms", "min ms", "max ms", "rounds", "UNet ms (pipeline)",
               "engine MiB", "peak GPU GiB (process so far)")
    lines = [head, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for bench in data["benchmarks"]:
        try:
            stats, extra = bench["stats"], bench.get("extra_info", {})
            stages = extra.get("stages_ms", {})
            engine = extra.get("engine_bytes")
            peak = extra.get("peak_memory_bytes")
            lines.append(
                f"| {bench['name']} | {extra.get('variant', '')} | {stats['median'] * 1e3:.2f} | "
                f"{stats['min'] * 1e3:.2f} | {stats['max'] * 1e3:.2f} | {stats['rounds']} | "
                f"{_or_dash(stages.get('unet'), 1)} | {_or_dash(engine and engine / 2**20, 0)} | "
                f"{_or_dash(peak and peak / 2**30, 1)} |")
        except (KeyError, TypeError) as exc:
            raise UserError(f"{path}: benchmark entry without stats ({type(exc).__name__}: {exc})") from None
    return "\n".join(lines)


def _or_dash(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
