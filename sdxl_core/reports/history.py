"""Latency over time from pytest-benchmark's saved runs: a markdown table and a PNG plot.

`pytest --benchmark-autosave --benchmark-storage DIR` writes one JSON file per run to
`DIR/<machine-id>/NNNN_<commit>_<datetime>.json`. `history_report(DIR, OUT)` reads them all (DIR may be
the storage root or one machine folder), orders them by run time, and writes `OUT/history.md` (one row
per run, one column per benchmark: median in ms) and `OUT/history.png` (median per benchmark over runs).
"""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from sdxl_core.errors import UserError
from sdxl_core.files import parse_json

HOW_TO_RECORD = "record runs with pytest --benchmark-autosave --benchmark-storage DIR"


@dataclass
class Run:
    path: Path
    number: str  # NNNN from the file name, else the file stem
    machine: str  # the machine-id folder
    when: datetime.datetime | None
    commit: str
    medians_ms: dict[str, float] = field(default_factory=dict)  # benchmark -> median in ms
    label: str = ""


def _history_files(storage: Path) -> list[Path]:
    if not storage.exists():
        raise UserError(f"benchmark history dir {storage} does not exist; {HOW_TO_RECORD}")
    if not storage.is_dir():
        raise UserError(f"{storage} is not a directory; pass the --benchmark-storage dir ({HOW_TO_RECORD})")
    files = sorted({*storage.glob("*.json"), *storage.glob("*/*.json")})
    if not files:
        raise UserError(f"no pytest-benchmark runs in {storage}; {HOW_TO_RECORD}")
    return files


def _parse_time(text) -> datetime.datetime | None:
    try:
        when = datetime.datetime.fromisoformat(str(text))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=datetime.UTC)


def _read_run(path: Path) -> tuple[Run, list[dict]]:
    try:
        data = parse_json(path.read_bytes())  # nesting bounded: deep JSON is a ValueError, not a crash
        benchmarks = data["benchmarks"]
        if not isinstance(benchmarks, list):
            raise TypeError("'benchmarks' is not a list")
        for bench in benchmarks:
            if not isinstance(bench["name"], str) or not isinstance(bench["stats"]["median"], int | float):
                raise TypeError(f"benchmark {bench.get('name')!r} has no numeric stats.median")
            if not isinstance(bench.get("fullname") or "", str):
                raise TypeError(f"benchmark {bench['name']!r} has a fullname that is not a string")
        commit = data.get("commit_info") or {}
        if not isinstance(commit, dict):
            raise TypeError("'commit_info' is not an object")
    except OSError as exc:
        raise UserError(f"{path} is not a pytest-benchmark run (it cannot be read: {exc.strerror or exc})") from None
    except ValueError:
        raise UserError(f"{path} is not a pytest-benchmark run (it is not JSON)") from None
    except (KeyError, TypeError, AttributeError) as exc:
        why = f"it has no {exc.args[0]!r} field" if isinstance(exc, KeyError) else str(exc) or "a field is malformed"
        raise UserError(f"{path} is not a pytest-benchmark run ({why})") from None
    commit_id = str(commit.get("id") or "")
    commit_id = (commit_id[:8] if len(commit_id) == 40 else commit_id) + ("*" if commit.get("dirty") else "")
    run = Run(
        path=path,
        number=path.stem.split("_", 1)[0],
        machine=path.parent.name,
        when=_parse_time(data.get("datetime")),
        commit=commit_id,
    )
    return run, benchmarks


def _benchmark_names(parsed: list[tuple[Run, list[dict]]]) -> dict[tuple[str, str], str]:
    """(name, fullname) -> column: the short name, or the full name where two tests share a short name."""
    fullnames: dict[str, set[str]] = {}
    for _, benchmarks in parsed:
        for bench in benchmarks:
            fullnames.setdefault(bench["name"], set()).add(bench.get("fullname") or bench["name"])
    return {(name, full): (name if len(fulls) == 1 else full) for name, fulls in fullnames.items() for full in fulls}


def load_runs(storage_dir: str | os.PathLike) -> list[Run]:
    """Every saved run under `storage_dir`, oldest first, each with its benchmarks' medians in ms."""
    parsed, skipped = [], 0
    for path in _history_files(Path(storage_dir)):
        try:
            parsed.append(_read_run(path))
        except UserError as exc:  # another tool's JSON beside the runs: the runs still make a history
            print(f"note: skipped {exc}", file=sys.stderr)
            skipped += 1
    if not parsed:
        raise UserError(
            f"no pytest-benchmark runs in {storage_dir} ({skipped} other JSON file(s) skipped); {HOW_TO_RECORD}"
        )
    columns = _benchmark_names(parsed)
    runs = []
    for run, benchmarks in parsed:
        for bench in benchmarks:
            column = columns[(bench["name"], bench.get("fullname") or bench["name"])]
            run.medians_ms[column] = float(bench["stats"]["median"]) * 1000.0
        runs.append(run)
    if not any(run.medians_ms for run in runs):
        raise UserError(f"the runs in {storage_dir} hold no benchmarks; {HOW_TO_RECORD}")
    epoch = datetime.datetime.min.replace(tzinfo=datetime.UTC)
    runs.sort(key=lambda r: (r.when or epoch, r.machine, r.number))
    several_machines = len({r.machine for r in runs}) > 1
    for run in runs:
        run.label = f"{run.machine}:{run.number}" if several_machines else run.number
    return runs


def _ms(value: float | None) -> str | None:
    return None if value is None else f"{value:.4g}"


def history_table(runs: list[Run]) -> str:
    """Markdown: one row per run (label, date, commit), one column per benchmark with its median in ms."""
    from sdxl_core.reports.images import latency_table

    benchmarks: list[str] = []
    for run in runs:
        benchmarks.extend(name for name in run.medians_ms if name not in benchmarks)
    rows = []
    for run in runs:
        row = {
            "run": run.label,
            "date": run.when.strftime("%Y-%m-%d %H:%M") if run.when else None,
            "commit": run.commit or None,
        }
        row.update({name: _ms(run.medians_ms.get(name)) for name in benchmarks})
        rows.append(row)
    return latency_table(rows)


def history_report(storage_dir: str | os.PathLike, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write `out_dir/history.md` and `out_dir/history.png` from the runs in `storage_dir`; return both paths."""
    from sdxl_core.files import atomic_write_text
    from sdxl_core.reports.images import plot_history

    runs = load_runs(storage_dir)
    out = Path(out_dir)
    markdown_path, png_path = out / "history.md", out / "history.png"
    first, last = runs[0], runs[-1]
    span = f"{first.label} .. {last.label}" if len(runs) > 1 else first.label
    text = (
        f"# Benchmark history: median latency, ms\n\n{len(runs)} run(s) ({span}) from {storage_dir}.\n\n"
        + history_table(runs)
    )
    atomic_write_text(markdown_path, text)
    series: dict[str, list[tuple[str, float]]] = {}
    for run in runs:
        for name, value in run.medians_ms.items():
            series.setdefault(name, []).append((run.label, value))
    plot_history(series, png_path, ylabel="median latency (ms)", title="median latency per benchmark over runs")
    return markdown_path, png_path
