"""Run the bug battery: for each bug, a fresh copy of the repository with that one patch, and the quality tests
run there on `tiny`; the battery passes only if every bug makes them fail (kill rate 100 %).

The unpatched copy runs every quality test too, and must pass: a harness that cannot pass (missing baselines, a
broken copy) would otherwise look like a 100 % kill rate. Each copy's own `sdxl_core` is imported (PYTHONPATH and
the working directory point at the copy, and that is checked), never the installed one. `jobs` runs at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from tests.battery.bugs import BUGS, Bug

ROOT = Path(__file__).resolve().parents[2]
COPIED = ("sdxl_core", "tests", "baselines", "pyproject.toml", "conftest.py")
QUALITY = ("tests/suite", "-m", "quality", "-q", "-p", "no:cacheprovider", "-x")
TIMEOUT_S = 900  # one quality run on tiny takes about a minute on a 2-core CPU


class PatchMissing(Exception):
    """A bug's search text is not in its file exactly once: the code moved, and the bug must follow it."""


@dataclass
class Outcome:
    name: str
    area: str
    outcome: str  # "killed", "survived" or "error" (and "passed" / "failed" for the unpatched copy)
    seconds: float
    detail: str  # the first failing test, or why the run did not count


def copy_repository(destination: Path, root: Path = ROOT) -> Path:
    destination.mkdir(parents=True)
    for name in COPIED:
        source = root / name
        if source.is_dir():
            shutil.copytree(source, destination / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif source.exists():
            shutil.copy2(source, destination / name)
    return destination


def apply(bug: Bug, tree: Path) -> None:
    path = tree / bug.file
    text = path.read_text() if path.is_file() else ""
    count = text.count(bug.search)
    if count != 1:
        where = "not found" if count == 0 else f"found {count} times"
        raise PatchMissing(f"bug {bug.name}: its search text is {where} in {bug.file}; update tests/battery/bugs.py")
    path.write_text(text.replace(bug.search, bug.replace))


def _env(tree: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "COV_"))}
    env.update(PYTHONPATH=str(tree), HF_HUB_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    return env


def check_imports_copy(tree: Path) -> None:
    """The copy's sdxl_core, not the installed one, is what a run there imports."""
    probe = "import sdxl_core, sdxl_core.suite.plugin as p; print(sdxl_core.__file__); print(p.__file__)"
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=tree, env=_env(tree), capture_output=True, text=True, timeout=300
    )
    paths = done.stdout.split()
    if (
        done.returncode != 0
        or len(paths) != 2
        or not all(Path(p).resolve().is_relative_to(tree.resolve()) for p in paths)
    ):
        raise RuntimeError(
            f"a run in {tree} imports sdxl_core from {paths or done.stderr.strip()[-300:]}, not the copy"
        )


def run_quality(tree: Path, extra: tuple[str, ...] = ()) -> tuple[int, str, float]:
    started = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pytest", *QUALITY, f"--basetemp={tree / '.pytest-tmp'}", *extra],
            cwd=tree,
            env=_env(tree),
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired:
        code, output = -1, f"timed out after {TIMEOUT_S} s"
    return code, output, time.perf_counter() - started


def _first_failure(output: str) -> str:
    """The first failing test and the first line of what it said (how far the output moved, against what)."""
    found = re.search(r"^(?:FAILED|ERROR) (\S+)", output, re.MULTILINE)
    if not found:
        return output.strip().splitlines()[-1][:160] if output.strip() else "no output"
    # pytest.fail(pytrace=False) prints its message right under the header; an assert prints source, then "E" lines
    said = re.search(r"^_{3,} .+ _{3,}\n(?:(?!_{3,} ).*\n)*?E\s+(.+)$", output, re.MULTILINE) or re.search(
        r"^_{3,} .+ _{3,}\n+(.+)$", output, re.MULTILINE
    )
    return found.group(1).split("::")[-1] + (f": {said.group(1)[:240]}" if said else "")


def run_one(bug: Bug | None, workdir: Path, extra: tuple[str, ...] = (), root: Path = ROOT) -> Outcome:
    """The quality tests on a copy with `bug` applied (None: the unpatched copy)."""
    name, area = (bug.name, bug.area) if bug else ("(no bug)", "harness")
    tree = copy_repository(workdir / (bug.name if bug else "unpatched"), root)
    try:
        if bug:
            apply(bug, tree)
        else:  # every copy is made and run the same way: checking one is enough
            check_imports_copy(tree)
    except (PatchMissing, RuntimeError) as exc:
        return Outcome(name, area, "error", 0.0, str(exc))
    selects = (f"--variants={','.join(bug.variants)}",) if bug else ()
    code, output, seconds = run_quality(tree, (*selects, *extra))
    if bug is None:
        outcome = "passed" if code == 0 else "failed"
        detail = "" if code == 0 else _first_failure(output)
    elif code == 0:
        outcome, detail = "survived", "every selected quality test passed"
    elif code in (1, 2):  # tests failed, or the patched code no longer even imports: the suite stops either way
        outcome, detail = "killed", _first_failure(output)
    else:
        outcome, detail = "error", f"pytest exit {code}: {_first_failure(output)}"
    shutil.rmtree(tree, ignore_errors=True)
    return Outcome(name, area, outcome, round(seconds, 1), detail)


def run_battery(
    bugs=BUGS, *, jobs: int = 2, extra: tuple[str, ...] = (), root: Path = ROOT, progress=print
) -> tuple[Outcome, list]:
    """(the unpatched run, one outcome per bug); the outcomes count only if the unpatched copy passed."""
    with tempfile.TemporaryDirectory(prefix="sdxl-bench-battery-") as work:
        workdir = Path(work)
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            # The unpatched copy runs every quality test, beside the first bug rather than before all of them.
            futures = [pool.submit(run_one, bug, workdir, extra, root) for bug in [None, *bugs]]
            done = []
            for future in futures:
                done.append(future.result())
                progress(_line(done[-1]))
    return done[0], done[1:]


def _line(outcome: Outcome) -> str:
    return f"{outcome.outcome:9s} {outcome.name:28s} {outcome.area:24s} {outcome.seconds:6.1f} s  {outcome.detail}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.battery", description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="bugs run at a time (default 2: CI's two cores)")
    parser.add_argument("--only", action="append", default=[], help="run only this bug (repeatable)")
    parser.add_argument("--json", type=Path, help="also write the outcomes to this JSON file")
    parser.add_argument("--root", type=Path, default=ROOT, help="the repository to copy (default: this one)")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments for every quality run (after --)")
    args = parser.parse_args(argv)
    names = {b.name for b in BUGS}
    unknown = [n for n in args.only if n not in names]
    if unknown:
        print(f"error: unknown bug {', '.join(unknown)}: choose from {', '.join(sorted(names))}", file=sys.stderr)
        return 2
    bugs = [b for b in BUGS if not args.only or b.name in args.only]
    started = time.perf_counter()
    print(f"bug battery: {len(bugs)} bugs, {args.jobs} at a time, `pytest {' '.join(QUALITY)}` in a copy each")
    clean, outcomes = run_battery(bugs, jobs=args.jobs, extra=tuple(args.pytest_args), root=args.root.resolve())
    wall = time.perf_counter() - started
    killed = sum(o.outcome == "killed" for o in outcomes)
    if clean.outcome != "passed":
        print(f"battery: the unpatched copy does not pass its quality tests ({clean.detail}): no bug counts")
    else:
        print(
            f"battery: kill rate {killed}/{len(outcomes)} ({100 * killed / max(len(outcomes), 1):.0f} %), {wall:.0f} s"
        )
    if args.json:
        report = {
            "unpatched": asdict(clean),
            "bugs": [asdict(o) for o in outcomes],
            "kill_rate": killed / max(len(outcomes), 1),
            "seconds": round(wall, 1),
        }
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0 if clean.outcome == "passed" and killed == len(outcomes) else 1
