"""The quality sweep: FP16 and 8-bit images of N prompts, compared prompt by prompt, summed up as mean and worst.

Each (prompt, 8-bit variant) is one test item that renders both images itself, so the items spread over
pytest-xdist workers with no state between them; each sends one record home in its report's user properties
(`PROPERTY`). The process that prints the summary (the xdist controller, or the one process) collects the
records and calls `summarise`: per variant the mean and worst SSIM and PSNR, the mean CLIP scores where they
were measured, and which thresholds failed. The worst prompt's threshold is each item's own (a prompt below it
fails its test); the mean's is checked here, over the records that came home.
"""

from __future__ import annotations

import json
import math
import statistics
from importlib import resources
from pathlib import Path

from sdxl_core.errors import UserError
from sdxl_core.reports.tables import markdown_table

PROPERTY = "quality_sweep"
DEFAULT_PROMPTS = "2"
PACKAGED = "data/calibration_prompts.txt"


def packaged_prompts() -> list[str]:
    text = resources.files("sdxl_core").joinpath(PACKAGED).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_prompts(value: str) -> list[tuple[int, str]]:
    """(index, prompt) pairs for `--prompts N` or `--prompts FILE`; the index is the prompt's seed too.

    N takes N of the packaged prompts, last first: 8-bit engines calibrate on the first ones, so a small N
    scores prompts the calibration never saw. FILE holds one prompt a line (blank and `#` lines skipped),
    indexed in file order.
    """
    value = str(value).strip()
    if value.isdigit():
        prompts = packaged_prompts()
        count = int(value)
        if not 1 <= count <= len(prompts):
            raise UserError(
                f"--prompts {count}: give 1 to {len(prompts)} (the packaged prompts), or a file with one prompt a line"
            )
        return [(i, prompts[i]) for i in range(len(prompts) - 1, len(prompts) - 1 - count, -1)]
    path = Path(value)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(
            f"--prompts {value}: neither a count nor a readable prompt file "
            f"({type(exc).__name__}: {exc.strerror if isinstance(exc, OSError) else exc})"
        ) from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise UserError(f"--prompts {value}: the file holds no prompt (one a line; # starts a comment)")
    return list(enumerate(prompts))


def prompt_id(index: int) -> str:
    return f"p{index:03d}"


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _min(records: list[dict], key: str) -> dict | None:
    measured = [r for r in records if r.get(key) is not None]
    return min(measured, key=lambda r: (r[key], r["index"])) if measured else None


def summarise(records: list[dict]) -> dict:
    """variant -> its sweep summary. Records are the items' `PROPERTY` values, in any order (workers finish in
    any order); each carries its variant's thresholds (`worst_ssim`, `mean_ssim`, `clip_drop`)."""
    by_variant: dict[str, list[dict]] = {}
    for record in records:
        by_variant.setdefault(record["variant"], []).append(record)
    summary = {}
    for variant in sorted(by_variant):
        rows = sorted(by_variant[variant], key=lambda r: r["index"])
        limits = rows[0]["thresholds"]
        worst = _min(rows, "ssim")
        worst_psnr = _min(rows, "psnr")
        mean_ssim = _mean([r["ssim"] for r in rows])
        clipped = [r for r in rows if r.get("clip_fp16") is not None and r.get("clip_8bit") is not None]
        clip = None
        if clipped:
            fp16, quantized = _mean([r["clip_fp16"] for r in clipped]), _mean([r["clip_8bit"] for r in clipped])
            clip = {"prompts": len(clipped), "mean_fp16": fp16, "mean_8bit": quantized, "drop": fp16 - quantized}
        failures = []
        if worst["ssim"] < limits["worst_ssim"]:
            failures.append(f"worst SSIM {worst['ssim']:.5f} ({prompt_id(worst['index'])}) < {limits['worst_ssim']}")
        if mean_ssim < limits["mean_ssim"]:
            failures.append(f"mean SSIM {mean_ssim:.5f} over {len(rows)} prompts < {limits['mean_ssim']}")
        if clip and clip["drop"] > limits["clip_drop"]:
            failures.append(f"mean CLIP score {clip['drop']:.3f} below FP16's, more than {limits['clip_drop']}")
        summary[variant] = {
            "prompts": len(rows),
            "ssim": {"mean": mean_ssim, "worst": worst["ssim"], "worst_prompt": worst["index"]},
            "psnr": {
                "mean": _mean([r["psnr"] for r in rows if r.get("psnr") is not None]),
                "worst": worst_psnr["psnr"] if worst_psnr else None,
            },
            "clip": clip,
            "clip_note": None if clip else next((r.get("clip_note") for r in rows if r.get("clip_note")), None),
            "thresholds": limits,
            "failures": failures,
            "per_prompt": [
                {k: r.get(k) for k in ("index", "seed", "prompt", "ssim", "psnr", "clip_fp16", "clip_8bit")}
                for r in rows
            ],
        }
    return summary


def _number(value, digits: int) -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else f"{value:.{digits}f}"


def summary_lines(summary: dict) -> list[str]:
    """One line per variant, for the terminal."""
    lines = []
    for variant, s in summary.items():
        clip = (
            f"CLIP {s['clip']['mean_8bit']:.2f} vs FP16 {s['clip']['mean_fp16']:.2f}"
            if s["clip"]
            else "CLIP not measured"
        )
        verdict = "; ".join(s["failures"]) or (
            f"passed (worst >= {s['thresholds']['worst_ssim']}, mean >= {s['thresholds']['mean_ssim']})"
        )
        lines.append(
            f"{variant}: {s['prompts']} prompts  SSIM mean {_number(s['ssim']['mean'], 5)} worst "
            f"{_number(s['ssim']['worst'], 5)} ({prompt_id(s['ssim']['worst_prompt'])})  PSNR mean "
            f"{_number(s['psnr']['mean'], 2)} worst {_number(s['psnr']['worst'], 2)} dB  {clip}  {verdict}"
        )
    return lines


def markdown(summary: dict) -> str:
    """The report for people: a table of the variants, then each variant's prompts."""
    columns = (
        "variant",
        "prompts",
        "SSIM mean",
        "SSIM worst",
        "worst prompt",
        "PSNR mean dB",
        "PSNR worst dB",
        "CLIP 8-bit",
        "CLIP FP16",
        "result",
    )
    rows = []
    for variant, s in summary.items():
        clip = s["clip"] or {}
        rows.append(
            [
                variant,
                s["prompts"],
                _number(s["ssim"]["mean"], 5),
                _number(s["ssim"]["worst"], 5),
                prompt_id(s["ssim"]["worst_prompt"]),
                _number(s["psnr"]["mean"], 2),
                _number(s["psnr"]["worst"], 2),
                _number(clip.get("mean_8bit"), 2),
                _number(clip.get("mean_fp16"), 2),
                "; ".join(s["failures"]) or "passed",
            ]
        )
    out = ["# Quality sweep: 8-bit images against FP16, prompt by prompt", "", markdown_table(columns, rows)]
    for variant, s in summary.items():
        out += [
            "",
            f"## {variant}",
            "",
            f"Thresholds: worst SSIM >= {s['thresholds']['worst_ssim']}, mean SSIM >= "
            f"{s['thresholds']['mean_ssim']}, CLIP drop <= {s['thresholds']['clip_drop']}."
            + (f" CLIP: {s['clip_note']}" if s["clip_note"] else ""),
            "",
            markdown_table(
                ("prompt", "seed", "SSIM", "PSNR dB", "CLIP 8-bit", "CLIP FP16", "text"),
                [
                    [
                        prompt_id(r["index"]),
                        r["seed"],
                        _number(r["ssim"], 5),
                        _number(r["psnr"], 2),
                        _number(r["clip_8bit"], 2),
                        _number(r["clip_fp16"], 2),
                        r["prompt"],
                    ]
                    for r in s["per_prompt"]
                ],
            ),
        ]
    return "\n".join(out) + "\n"


def write_report(path, summary: dict) -> Path:
    """`--quality-report PATH`: markdown where PATH ends in .md, else JSON."""
    from sdxl_core.files import atomic_write_text

    path = Path(path)
    if path.suffix.lower() == ".md":
        text = markdown(summary)
    else:
        text = json.dumps({"variants": summary}, indent=2, allow_nan=False, default=str) + "\n"
    atomic_write_text(path, text)
    return path
