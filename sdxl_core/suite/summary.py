"""What the run measured, at its end: the quality sweep's means and report, the engines each worker built or
loaded, and one row per quality or speed test (from `record_property`): the same on one GPU as on several."""

from __future__ import annotations

import os

import pytest


def pytest_runtest_logreport(report):
    """Collect the quality sweep's records where the summary is printed (the xdist controller, or the one
    process); workers only send theirs home in their reports."""
    from sdxl_core.suite.sweep import PROPERTY

    if report.when == "call" and not os.environ.get("PYTEST_XDIST_WORKER"):
        _SWEEP_RECORDS.extend(value for key, value in report.user_properties if key == PROPERTY)


_SWEEP_RECORDS: list[dict] = []
SWEEP_SUMMARY = pytest.StashKey[dict]()
# Each engine this process prepared: variant, "built" or "loaded" (from the engine dir), worker, seconds. Workers
# send theirs home at the end (xdist's workeroutput), so the summary shows one run whatever the worker count.
ENGINE_RECORDS: list[dict] = []
ENGINES_OUTPUT = "sdxl_bench_engines"


@pytest.hookimpl(optionalhook=True)  # an xdist hook: absent without pytest-xdist
def pytest_testnodedown(node, error):
    ENGINE_RECORDS.extend(getattr(node, "workeroutput", {}).get(ENGINES_OUTPUT, []))


def pytest_sessionfinish(session):
    """The sweep's mean over every prompt that ran, the report file, and a failed run when a mean fails (each
    prompt's own threshold already failed that prompt's test). A worker sends its engines home."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        if hasattr(session.config, "workeroutput"):
            session.config.workeroutput[ENGINES_OUTPUT] = list(ENGINE_RECORDS)
        return
    if not _SWEEP_RECORDS:
        return
    from sdxl_core.suite import sweep

    summary = session.config.stash[SWEEP_SUMMARY] = sweep.summarise(_SWEEP_RECORDS)
    path = session.config.getoption("--quality-report")
    if path:
        sweep.write_report(path, summary)
    if any(s["failures"] for s in summary.values()) and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, config):
    """What the quality and speed tests measured (from `record_property`), one row a test, by name, and
    the quality sweep's summary: the same on one GPU as on several."""
    from sdxl_core.suite.workers import plain_nodeid

    rows = []
    for outcome in ("passed", "failed"):
        for report in terminalreporter.stats.get(outcome, []):
            props = dict(getattr(report, "user_properties", []))
            measured = {k: v for k, v in props.items() if k in ("ssim", "psnr_db", "speedup", "fp16_ms", "ms")}
            if report.when == "call" and measured:
                rows.append((outcome, plain_nodeid(report.nodeid).split("::")[-1], measured))
    if rows:
        terminalreporter.section("sdxl-bench measurements")
        for outcome, name, measured in sorted(rows, key=lambda row: (row[0] != "passed", row[1])):
            values = "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in measured.items())
            terminalreporter.write_line(f"{outcome:<6} {name:<60} {values}")
    if ENGINE_RECORDS:
        terminalreporter.section("sdxl-bench engines")
        for line in engine_lines(ENGINE_RECORDS):
            terminalreporter.write_line(line)
    summary = config.stash.get(SWEEP_SUMMARY, None)
    if summary:
        from sdxl_core.suite import sweep

        terminalreporter.section("sdxl-bench quality sweep")
        for line in sweep.summary_lines(summary):
            terminalreporter.write_line(line)
        path = config.getoption("--quality-report")
        terminalreporter.write_line(
            f"per-prompt values: {path}" if path else "per-prompt values: --quality-report PATH (.md or .json)"
        )


def show_engine(config, record: dict) -> None:
    """Print one engine's lines the moment it is ready, past pytest's capture: a run stopped at a time limit still
    shows where its minutes went, engine by engine (the summary at the end repeats them, sorted)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return  # a worker has no terminal: its controller prints the summary
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        return
    with capture.global_and_fixture_disabled():
        reporter.ensure_newline()
        for line in _one_engine(record):
            reporter.write_line(f"[engine] {line}")


CALIBRATIONS = {  # EngineInfo.calibration, for people
    "calibrated": "ran the calibration passes (recorded for the other 8-bit formats)",
    "shared": "replayed the calibration passes another 8-bit format recorded",
    "reused": "restored this engine's saved calibration",
}


def _one_engine(record: dict, min_seconds: float = 0.5) -> list[str]:
    """A line for the engine (built or loaded, where, how long), then its phases from the largest down (those of
    `min_seconds` or more), and how long nvcc ran beside them where it ran."""
    lines = [f"{record['variant']:<18} {record['mode']:<10} on {record['worker']:<13} {record['seconds']:.1f} s"]
    phases = sorted(record.get("phases", {}).items(), key=lambda item: -item[1])
    shown = [f"{name} {seconds:.1f} s" for name, seconds in phases if seconds >= min_seconds]
    if shown:
        lines.append(f"{'':<18} phases: {', '.join(shown)}")
    if record.get("calibration") in CALIBRATIONS:
        lines.append(f"{'':<18} calibration: {CALIBRATIONS[record['calibration']]}")
    if record.get("nvcc_s"):
        took = f"the CUTLASS libraries (nvcc, or the kernel cache) took {record['nvcc_s']:.1f} s beside them"
        lines.append(f"{'':<18} {took}")
    return lines


def engine_lines(records: list[dict]) -> list[str]:
    """`_one_engine`'s lines for every engine this run prepared, by variant: where a build's minutes went."""
    lines = []
    for record in sorted(records, key=lambda r: (r["variant"], r["mode"] != "built", r["worker"])):
        lines.extend(_one_engine(record))
    built = sum(r["seconds"] for r in records if r["mode"] == "built")
    if built:
        lines.append(f"building took {built:.1f} s of this run")
    return lines
