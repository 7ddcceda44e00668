"""`sdxl-bench` end to end on the tiny model: files and their names and modes, the report, help, bad input."""

import json
import os
import resource
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from sdxl_core import files, hardware, run
from sdxl_core.commands import cli
from sdxl_core.engines.info import QUANTIZED_FIELDS
from sdxl_core.reports import run_report
from sdxl_core.variants import TINY_CALIBRATION_SIZE, TINY_MAX_STEPS, VARIANTS

PROMPT = run.DEFAULT_PROMPT
FAST = ["--denoising-steps", "2", "--num-warmup-runs", "0", "--no-progress"]  # a tiny run in about a second


def run_cli(*args, cwd=None, umask=0o022, limits=None):
    """The real entry point in a child process with a known umask (and, optionally, resource limits)."""

    def child():
        os.umask(umask)
        for limit, value in (limits or {}).items():
            resource.setrlimit(limit, (value, value))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past RLIMIT_FSIZE fails with EFBIG instead

    return subprocess.run(
        [sys.executable, "-m", "sdxl_core.commands.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
        preexec_fn=child,
    )


def error_lines(stderr: str) -> list[str]:
    """stderr without the phase lines (`sdxl-bench: ...`), which long work prints before it fails, and the notes
    (`note: ...`) on what was passed over, e.g. a JSON file in a history dir that is no benchmark run."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith(("sdxl-bench: ", "note: "))]


# ---------------------------------------------------------------------------------------------------------------
# A whole FP16 run on the CPU: the README's main job.


@pytest.fixture(scope="module")
def fp16_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fp16-run")
    done = run_cli(
        "txt2img", PROMPT, "--model", "tiny", "--output-dir", str(out), "--denoising-steps", "6", "--no-progress"
    )
    assert done.returncode == 0, done.stderr
    (report_path,) = out.glob("xl-1.0-fp16-s0-*.json")
    return done, out, report_path, json.loads(report_path.read_text())


def test_txt2img_writes_png_and_report_and_prints_the_table(fp16_run):
    done, out, report_path, report = fp16_run
    for row in ("CLIP ", "CLIP2", "UNet x 6", "VAE-Dec", "Pipeline", "Throughput"):
        assert row in done.stdout
    image_path = out / f"{report_path.stem}-b0-0.png"
    assert Image.open(image_path).size == (128, 128)
    assert [k for k in report if k in run_report.REPORT_KEYS] == list(run_report.REPORT_KEYS)
    assert report["variant"]["model"] == "tiny" and report["unet_steps"] == 6 and report["prompt"] == PROMPT
    assert set(report["timings_ms"]) == set(run_report.TIMED_STAGES)
    assert report["engine"]["engine_key"].startswith("unetxl-fp16.bs2.h128w128.tiny.torch")
    assert report["images"] == [str(image_path)]
    assert done.stdout.splitlines()[-1] == f"wrote 1 image(s): {image_path}"  # the last line: what to open next

    summary = run_cli("report", str(report_path))
    assert summary.returncode == 0 and "| xl-1.0-fp16 | tiny | " in summary.stdout


def test_output_files_take_the_umask_mode(fp16_run):
    """Written under umask 022, images and reports are 0644: other users of a shared directory can read them."""
    _, out, _, _ = fp16_run
    written = list(out.iterdir())
    assert {p.suffix for p in written} == {".png", ".json"}
    assert {stat.S_IMODE(p.stat().st_mode) for p in written} == {0o644}


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077], ids=oct)
def test_atomic_writes_create_files_with_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        files.atomic_write_text(tmp_path / "report.json", "{}")
        with files.atomic_path(tmp_path / "image.png") as tmp:
            tmp.write_bytes(b"png")
    finally:
        os.umask(old)
    for name in ("report.json", "image.png"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask


def test_report_on_the_cpu_tells_what_ran(fp16_run):
    """fp32 compute (not "fp16"), no --half, no quantization fields, no CUDA version, the CPU's model name in
    the report and in the stage table, and the note that a built-in model makes noise."""
    done, _, _, report = fp16_run
    assert report["variant"]["precision"] == "fp32" and report["compute_dtype"] == "fp32"
    assert report["half"] is None
    assert "quantization" not in report
    assert not {"quant_level", "quant_alpha", "quant_percentile", "calibration_size"} & set(report["variant"])
    assert not set(QUANTIZED_FIELDS) & set(report["engine"])
    assert "cuda" not in report["libraries"] and report["libraries"]["torch"]
    device = report["device"]
    assert device["type"] == "cpu" and device["name"] == hardware.cpu_model() and device["threads"] == 1
    assert device["name"] in done.stdout
    assert "noise by design" in report["model_note"]


# ---------------------------------------------------------------------------------------------------------------
# 8-bit runs on tiny with the defaults: a small calibration set, one CPU thread, a line per phase.


@pytest.fixture(scope="module", params=["--int8", "--fp8"])
def quantized_run(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("quantized-run")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = run_cli("txt2img", PROMPT, request.param, "--model", "tiny", "--output-dir", str(out), "--no-progress")
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert done.returncode == 0, done.stderr
    (report_path,) = out.glob("*.json")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return request.param, done, json.loads(report_path.read_text()), wall, cpu


@pytest.mark.slow
def test_8bit_tiny_run_costs_under_a_minute_of_cpu_time(quantized_run, record_property):
    """The whole command with its defaults (calibration included) costs less than a minute of CPU time. It runs
    on one thread, so on an idle machine that is about its wall time; on a busy one the wall time is longer,
    and is only recorded, not checked."""
    flag, done, report, wall, cpu = quantized_run
    record_property("ms", round(wall * 1000))
    record_property("cpu_s", round(cpu, 1))
    assert cpu < 60, f"{flag} on tiny took {cpu:.1f} s of CPU time ({wall:.1f} s wall)"


@pytest.mark.slow
def test_8bit_report_has_the_quantization_fields(quantized_run):
    flag, _, report, _, _ = quantized_run
    precision = flag.removeprefix("--")
    quantization = report["quantization"]
    assert quantization["precision"] == precision == report["variant"]["precision"]
    assert quantization["calibration_prompts"] == TINY_CALIBRATION_SIZE
    assert quantization["calibration_steps"] == TINY_MAX_STEPS and quantization["calibration"] == "calibrated"
    assert quantization["level"] == VARIANTS[f"xl-1.0-{precision}"].quant_level
    assert ("alpha" in quantization) == (precision == "int8")
    assert report["compute_dtype"] == "fp32" and report["engine"]["calibration"] == "calibrated"
    assert "cuda" not in report["libraries"] and report["device"]["threads"] == 1


@pytest.mark.slow
def test_long_work_prints_a_line_per_phase_without_progress_bars(quantized_run):
    _, done, _, _, _ = quantized_run
    phases = [line for line in done.stderr.splitlines() if line.startswith("sdxl-bench: ")]
    assert any(f"calibrates on 2 prompt(s) x {TINY_MAX_STEPS} steps" in line for line in phases), done.stderr
    for words in ("loading tiny on cpu (1 thread(s))", "noise by design", "engine in-memory", "warm-up", "generating"):
        assert any(words in line for line in phases), (words, done.stderr)
    (engine_line,) = [line for line in phases if "engine in-memory" in line]
    assert "), calibrated in " in engine_line and "calibration calibrated" not in engine_line, engine_line
    assert "calibrating:" not in done.stderr  # no progress bar


def test_cli_threads(monkeypatch):
    """1 thread for tiny, every usable CPU for full-size models, what was asked, and OMP_NUM_THREADS when set."""
    import torch

    threads = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        assert run.set_cpu_threads(None, "tiny") == 1 == torch.get_num_threads()
        assert run.set_cpu_threads(None, "sdxl-random") == hardware.usable_cpus() == torch.get_num_threads()
        assert run.set_cpu_threads(2, "tiny") == 2 == torch.get_num_threads()
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(3)
        assert run.set_cpu_threads(None, "tiny") == 3
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------------
# Output names: distinct runs never overwrite each other.


def test_distinct_runs_get_distinct_files_and_a_rerun_replaces_its_own(tmp_path, capsys):
    base = ["txt2img", "--model", "tiny", "--output-dir", str(tmp_path), *FAST]
    runs = [
        ["a red cube"],
        ["a blue cube"],
        ["a red cube", "--negative-prompt", "blur"],
        ["a red cube", "--width", "64"],
        ["a red cube", "--guidance-scale", "7"],
        ["a red cube"],
    ]
    for args in runs:
        assert cli.main([*base, *args]) == 0, capsys.readouterr().err
    reports = sorted(tmp_path.glob("*.json"))
    assert len(reports) == len(runs) - 1 == len(list(tmp_path.glob("*.png")))  # the last run replaced the first
    prompts = {json.loads(p.read_text())["prompt"] for p in reports}
    assert prompts == {"a red cube", "a blue cube"}


def test_output_names_hash_the_model_and_the_settings():
    import torch

    cpu, v = torch.device("cpu"), VARIANTS["xl-1.0-fp16"].replace(model="tiny")
    stem = cli.output_stem(v, PROMPT, "", 0, 1, cpu, "fp16")
    assert stem.startswith("xl-1.0-fp16-s0-") and len(stem) == len("xl-1.0-fp16-s0-") + 8
    others = [
        cli.output_stem(v.replace(model="sdxl-random"), PROMPT, "", 0, 1, cpu, "fp16"),
        cli.output_stem(v.replace(steps=4), PROMPT, "", 0, 1, cpu, "fp16"),
        cli.output_stem(v, PROMPT + ".", "", 0, 1, cpu, "fp16"),
        cli.output_stem(v, PROMPT, "", 0, 2, cpu, "fp16"),
    ]
    assert len({stem, *others}) == 5
    assert cli.output_stem(v, PROMPT, "", 0, 1, cpu, "bf16") == stem  # --half does not apply on the CPU


# ---------------------------------------------------------------------------------------------------------------
# Help.


@pytest.mark.parametrize("command", ["txt2img", "build", "report", "history"])
def test_every_option_has_help_and_shows_its_default(command):
    parser = cli.build_parser().subcommands[command]
    formatter = parser._get_formatter()
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert options
    for action in options:
        assert action.help and len(action.help) > 10, action.option_strings
        if action.nargs != 0:  # on/off flags are off unless given; every flag that takes a value says its default
            assert "default" in formatter._get_help_string(action), action.option_strings


def test_help_names_every_subcommand_and_the_quantization_levels():
    parser = cli.build_parser()
    top = parser.format_help()
    assert all(name in top for name in ("txt2img", "build", "report", "history"))
    txt2img = " ".join(parser.subcommands["txt2img"].format_help().split())
    assert "INT8 takes 1, 2, 2.5 or 3; FP8 3 or 4" in txt2img


def test_unknown_flag_points_at_the_subcommands_help():
    done = run_cli("txt2img", "--model", "tiny", "--bogus")
    assert done.returncode == 2
    assert done.stderr == "error: unrecognized arguments: --bogus (see sdxl-bench txt2img --help)\n"


def test_argparse_type_errors_are_one_line_too(tmp_path):
    """A malformed flag value is refused by argparse in the same one-line form, from the real entry point."""
    done = run_cli("txt2img", "--model", "tiny", "--height", "abc")
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1
    assert "invalid int value" in done.stderr and "see sdxl-bench txt2img --help" in done.stderr


# ---------------------------------------------------------------------------------------------------------------
# Every kind of bad input: exit 2, one line, nothing written, refused in seconds.

ROW_SECONDS = 30  # a refusal is a check, not work; the slowest rows load the tiny model first


@pytest.fixture(scope="module")
def tiny_engine_dir(tmp_path_factory):
    """An FP16 tiny engine as `sdxl-bench build` makes it, for the rows that damage a copy of it."""
    engine_dir = tmp_path_factory.mktemp("tiny-engine")
    assert (
        cli.main(
            ["build", "--variants", "xl-1.0-fp16", "--model", "tiny", "--engine-dir", str(engine_dir), "--no-progress"]
        )
        == 0
    )
    return engine_dir


def _engine(tmp_path) -> Path:
    (key,) = [p for p in (tmp_path / "engines").iterdir() if p.is_dir()]
    return key


def _sidecar_list(tmp_path, monkeypatch):
    (_engine(tmp_path) / "sidecar.json").write_text("[]")


def _sidecar_without_files(tmp_path, monkeypatch):
    path = _engine(tmp_path) / "sidecar.json"
    record = json.loads(path.read_text())
    del record["files"]
    path.write_text(json.dumps(record))


def _edited_unet_config(tmp_path, monkeypatch):
    """A config that no longer fits the weights, with the sidecar's checksum updated to match it."""
    from sdxl_core.engines import store

    engine = _engine(tmp_path)
    config = json.loads((engine / "unet_config.json").read_text())
    config["block_out_channels"] = [32, 64, 96]
    (engine / "unet_config.json").write_text(json.dumps(config))
    record = json.loads((engine / "sidecar.json").read_text())
    record["files"]["unet_config.json"] = {
        "sha256": store.sha256_file(engine / "unet_config.json"),
        "bytes": (engine / "unet_config.json").stat().st_size,
    }
    (engine / "sidecar.json").write_text(json.dumps(record))


def _unreadable_engine_file(tmp_path, monkeypatch):
    import errno

    from sdxl_core.engines import digests

    def refuse(path):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(digests, "sha256_file", refuse)


def _disk_full_in_output_dir(tmp_path, monkeypatch):
    import errno

    def full(self, fp, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(fp))

    monkeypatch.setattr(Image.Image, "save", full)


def _disk_full_in_engine_dir(tmp_path, monkeypatch):
    """safetensors reports a full disk in its own words (a Rust io::Error), not as an OSError."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )

    monkeypatch.setattr(safetensors.torch, "save_file", full)


def _hub_unreachable(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from sdxl_core import models

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    models.hub_reachable.cache_clear()
    monkeypatch.setattr(models.hub, "hub_reachable", models.hub_reachable.__wrapped__)


# (id, arguments, what the one line says, setup(tmp_path, monkeypatch), refused before any model loads)
# In the arguments, {tmp} is the test's directory: it holds a-file (a file), empty/ (an empty dir), and for the
# engine rows engines/ (a copy of the tiny FP16 engine); txt2img rows add --model tiny, a fresh
# --output-dir and FAST, so that a row that is not refused finishes in seconds instead of running for minutes.
TXT2IMG_ROWS = [
    ("scheduler", ["--scheduler", "Heun"], "unknown scheduler 'Heun'"),
    ("scheduler-near-miss", ["--scheduler", "euler"], "did you mean Euler?"),
    ("steps-negative", ["--denoising-steps", "-3"], "--denoising-steps must be between 1 and 1000, got -3"),
    ("steps-huge", ["--denoising-steps", str(10**9)], "--denoising-steps must be between 1 and 1000"),
    ("width-not-multiple-of-8", ["--width", "1001"], "--width must be a positive multiple of 8"),
    ("width-huge", ["--width", "100000"], "--width must be between 8 and 2048"),
    ("height-zero", ["--height", "0"], "--height must be a positive multiple of 8"),
    ("batch-size-huge", ["--batch-size", "1000000"], "--batch-size must be between 1 and 16"),
    ("batch-size-zero", ["--batch-size", "0"], "--batch-size must be between 1 and 16"),
    ("batch-size-above-512", ["--batch-size", "8", "--height", "1024"], "at most 4 above 512x512"),
    ("calibration-size-huge", ["--int8", "--calibration-size", str(10**9)], "--calibration-size must be between"),
    ("calibration-size-zero", ["--int8", "--calibration-size", "0"], "--calibration-size must be between 1 and"),
    ("batch-count-huge", ["--batch-count", str(10**9)], "--batch-count must be between 1 and 1000"),
    ("batch-count-zero", ["--batch-count", "0"], "--batch-count must be between 1 and 1000"),
    ("warmup-negative", ["--num-warmup-runs", "-1"], "--num-warmup-runs must be between 0 and 100"),
    ("seed-2**70", ["--seed", str(2**70)], "--seed must be between 0 and 18446744073709551615"),
    ("seed-negative", ["--seed", "-1"], "--seed must be between 0 and"),
    ("guidance-inf", ["--guidance-scale", "inf"], "--guidance-scale must be a finite number"),
    ("guidance-1e308", ["--guidance-scale", "1e308"], "--guidance-scale must be between 0.0 and 100.0"),
    ("guidance-nan", ["--guidance-scale", "nan"], "--guidance-scale must be a finite number"),
    ("guidance-negative", ["--guidance-scale", "-1"], "--guidance-scale must be between"),
    ("lora-scale-nan", ["--lora-scale", "nan"], "--lora-scale must be a finite number"),
    ("lora-path-missing", ["--lora-path", "/no/such/lora.safetensors"], "--lora-path /no/such/lora.safetensors"),
    ("int8-and-fp8", ["--int8", "--fp8"], "not allowed with argument"),
    ("int8-level", ["--int8", "--quantization-level", "7"], "--quantization-level for INT8 must be one of"),
    ("fp8-level", ["--fp8", "--quantization-level", "2.5"], "--quantization-level for FP8 must be one of 3, 4"),
    ("level-nan", ["--int8", "--quantization-level", "nan"], "--quantization-level must be a finite number"),
    ("alpha", ["--int8", "--quantization-alpha", "2"], "--quantization-alpha must be in [0, 1]"),
    ("percentile", ["--int8", "--quantization-percentile", "0"], "--quantization-percentile must be in (0, 1]"),
    ("model-near-miss", ["--model", "tinyy"], "unknown model 'tinyy' (did you mean tiny?)"),
    ("model-missing-dir", ["--model", "/no/such/model"], "not a diffusers model directory"),
    (
        "model-hub-unreachable",
        ["--model", "stabilityai/stable-diffusion-xl-base-1.0"],
        "is unreachable",
        _hub_unreachable,
    ),
    ("lora-hub-offline", ["--variant", "xl-1.0-lcm-lora"], "cannot load LoRA 'latent-consistency/lcm-lora-sdxl'"),
    ("backend", ["--backend", "onnxruntime"], "unknown backend"),
    ("variant", ["--variant", "xl-9"], "unknown variant 'xl-9'"),
    ("variant-near-miss", ["--variant", "xl-1.0-int9"], "did you mean xl-1.0-int8?"),
    ("device-tpu", ["--device", "tpu"], "--device 'tpu' is not a device"),
    ("device-cuda-abc", ["--device", "cuda:abc"], "--device 'cuda:abc' is not a device"),
    ("device-no-such-gpu", ["--device", "cuda:99"], "CUDA GPU"),
    ("cuda-graph-on-cpu", ["--device", "cpu", "--use-cuda-graph"], "--use-cuda-graph needs a CUDA GPU"),
    ("threads-zero", ["--threads", "0"], "--threads must be between 1 and"),
    ("half", ["--half", "fp32"], "invalid choice: 'fp32'"),
    ("height-abc", ["--height", "abc"], "invalid int value: 'abc'"),
    ("unknown-flag", ["--bogus"], "unrecognized arguments: --bogus (see sdxl-bench txt2img --help)"),
    ("output-dir-is-a-file", ["--output-dir", "{tmp}/a-file"], "a-file is not a directory"),
    ("output-dir-under-a-file", ["--output-dir", "{tmp}/a-file/out"], "a-file is not a directory"),
    ("output-dir-forbidden", ["--output-dir", "/proc/forbidden"], "--output-dir /proc/forbidden cannot be written"),
    ("engine-dir-is-a-file", ["--int8", "--engine-dir", "{tmp}/a-file"], "--engine-dir"),
    ("engine-dir-forbidden", ["--int8", "--engine-dir", "/proc/forbidden"], "--engine-dir /proc/forbidden cannot"),
    ("onnx-dir-is-a-file", ["--int8", "--onnx-dir", "{tmp}/a-file"], "--onnx-dir"),
    ("no-build-without-engine-dir", ["--no-build"], "--no-build loads a prebuilt engine: it needs --engine-dir"),
    ("no-build-missing-engine-dir", ["--no-build", "--engine-dir", "{tmp}/none"], "nothing to load with --no-build"),
    ("no-build-empty-engine-dir", ["--no-build", "--engine-dir", "{tmp}/empty"], "no xl-1.0-fp16 engine"),
    ("no-build-other-variant", ["--int8", "--no-build", "--engine-dir", "{tmp}/engines"], "it holds unetxl-fp16"),
    ("lora-path-dir-without-weights", ["--lora-path", "{tmp}/empty"], "holds no LoRA weights"),
    (
        "sidecar-is-a-list",
        ["--no-build", "--engine-dir", "{tmp}/engines"],
        "sidecar is malformed",
        _sidecar_list,
        False,
    ),
    (
        "sidecar-without-files",
        ["--no-build", "--engine-dir", "{tmp}/engines"],
        "sidecar is malformed",
        _sidecar_without_files,
        False,
    ),
    (
        "edited-unet-config",
        ["--no-build", "--engine-dir", "{tmp}/engines"],
        "does not load",
        _edited_unet_config,
        False,
    ),
    (
        "unreadable-engine-file",
        ["--no-build", "--engine-dir", "{tmp}/engines"],
        "Permission denied",
        _unreadable_engine_file,
        False,
    ),
    ("disk-full-output-dir", [], "No space left on device", _disk_full_in_output_dir, False),
    (
        "disk-full-engine-dir",
        ["--engine-dir", "{tmp}/new-engines"],
        "No space left on device",
        _disk_full_in_engine_dir,
        False,
    ),
]
OTHER_ROWS = [
    ("build-no-variants", ["build", "--variants", ",,,", "--engine-dir", "{tmp}/e"], "names no variant"),
    (
        "build-variant-near-miss",
        ["build", "--variants", "xl-1.0-int9", "--engine-dir", "{tmp}/e"],
        "did you mean xl-1.0-int8?",
    ),
    ("build-without-engine-dir", ["build"], "needs --engine-dir"),
    (
        "build-engine-dir-forbidden",
        ["build", "--model", "tiny", "--engine-dir", "/proc/forbidden"],
        "cannot be written to",
    ),
    (
        "build-model-near-miss",
        ["build", "--model", "sdxl_random", "--engine-dir", "{tmp}/e"],
        "did you mean sdxl-random?",
    ),
    (
        "build-calibration-size-zero",
        ["build", "--variants", "xl-1.0-int8", "--model", "tiny", "--calibration-size", "0", "--engine-dir", "{tmp}/e"],
        "--calibration-size must be between 1 and",
    ),
    (
        "build-report-under-a-file",
        ["build", "--model", "tiny", "--report", "{tmp}/a-file/build.json", "--engine-dir", "{tmp}/e"],
        "--report",
    ),
    ("report-list", ["report", "{tmp}/list.json"], "list.json is not a txt2img report"),
    ("report-benchmarks-not-a-list", ["report", "{tmp}/benchmarks-int.json"], "is not a pytest-benchmark run"),
    ("report-machine-info-list", ["report", "{tmp}/machine-list.json"], "is not a pytest-benchmark run"),
    ("report-output-under-a-file", ["report", "{tmp}/run.json", "--output", "{tmp}/a-file/x.md"], "is not a directory"),
    (
        "history-commit-info-list",  # skipped with a note; then no run is left
        ["history", "{tmp}/history", "--output-dir", "{tmp}/h"],
        "no pytest-benchmark runs in",
    ),
    ("history-missing", ["history", "{tmp}/none", "--output-dir", "{tmp}/h"], "does not exist"),
    (
        "history-output-dir-is-a-file",
        ["history", "{tmp}/history", "--output-dir", "{tmp}/a-file"],
        "is not a directory",
    ),
]
RUN = {"name": "t", "stats": {"median": 0.1, "min": 0.1, "max": 0.1, "rounds": 1}}
JSON_FILES = {
    "list.json": [],
    "benchmarks-int.json": {"benchmarks": 5},
    "machine-list.json": {"benchmarks": [RUN], "machine_info": ["a list"]},
    "run.json": {"benchmarks": [RUN]},
    "history/0001_x.json": {"benchmarks": [RUN], "commit_info": ["a list"]},
}


def _rows():
    for row in TXT2IMG_ROWS:
        name, args, message, setup, before_work = (*row, None, True)[:5]
        yield pytest.param(
            ["txt2img", "x", "--model", "tiny", "--output-dir", "{tmp}/out", *FAST, *args],
            message,
            setup,
            before_work,
            id=name,
        )
    for name, args, message in OTHER_ROWS:
        yield pytest.param(args, message, None, True, id=name)


def _written(root: Path) -> dict:
    """Every file under `root` with its size and mtime; lock files (left by design) aside."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file() and not p.name.endswith(".lock")
    }


def test_bad_input_table_has_every_case():
    assert len(TXT2IMG_ROWS) + len(OTHER_ROWS) >= 30


@pytest.mark.parametrize("args, message, setup, before_work", _rows())
def test_bad_input_is_one_line_and_exit_2(
    args, message, setup, before_work, tmp_path, capsys, monkeypatch, tiny_engine_dir, record_property
):
    import shutil

    (tmp_path / "a-file").write_text("a file, not a directory")
    (tmp_path / "empty").mkdir()
    shutil.copytree(tiny_engine_dir, tmp_path / "engines")
    for name, data in JSON_FILES.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(json.dumps(data))
    if setup:
        setup(tmp_path, monkeypatch)
    before = _written(tmp_path)

    started = time.perf_counter()
    try:
        status = cli.main([a.replace("{tmp}", str(tmp_path)) for a in args])
    except SystemExit as exit_:  # argparse's own refusals
        status = exit_.code
    seconds = time.perf_counter() - started
    record_property("ms", round(seconds * 1000))

    stderr = capsys.readouterr().err
    assert status == 2, stderr
    lines = error_lines(stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], stderr
    if before_work:
        assert "sdxl-bench: loading" not in stderr, "refused only after the model was loaded"
    assert _written(tmp_path) == before, "a refused run must not write or change files"
    if before_work:
        assert not (tmp_path / "out").exists(), "a refused run must not even create its output dir"
    assert seconds < ROW_SECONDS


def test_malformed_sidecar_is_rebuilt_where_building_is_allowed(tmp_path, tiny_engine_dir, capsys):
    import shutil

    from sdxl_core.engines import store

    shutil.copytree(tiny_engine_dir, tmp_path / "engines")
    _sidecar_list(tmp_path, None)
    args = [
        "txt2img",
        "x",
        "--model",
        "tiny",
        "--output-dir",
        str(tmp_path / "out"),
        "--engine-dir",
        str(tmp_path / "engines"),
        *FAST,
    ]
    assert cli.main(args) == 0
    assert "sidecar is malformed" in capsys.readouterr().err
    engine = _engine(tmp_path)
    assert store.verify(tmp_path / "engines", engine.name, {}) is not None


def test_a_write_past_the_file_size_limit_is_one_line(tmp_path):
    """A real write error from the kernel (EFBIG past `ulimit -f`), through PIL, in the real entry point."""
    done = run_cli(
        "txt2img",
        "x",
        "--model",
        "tiny",
        "--output-dir",
        str(tmp_path / "out"),
        *FAST,
        limits={resource.RLIMIT_FSIZE: 16 * 1024},
    )
    assert done.returncode == 2, done.stderr
    lines = error_lines(done.stderr)
    assert len(lines) == 1 and "File too large" in lines[0] and "ulimit -f" in lines[0], done.stderr
    assert not [p for p in (tmp_path / "out").iterdir()], "the half-written image must be gone"


@pytest.mark.parametrize(
    "error, words",
    [
        (
            RuntimeError(
                "[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file data/0: "
                "file write failed"
            ),
            "No space left on device",
        ),
        (RuntimeError("Error while serializing: IoError(Os { code: 30, kind: ReadOnlyFilesystem })"), "read-only"),
        (PermissionError(13, "Permission denied", "/x/unet.safetensors"), "Permission denied (/x/unet.safetensors)"),
        (MemoryError(), "out of memory"),
        (
            RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory"),
            "out of memory",
        ),
    ],
)
def test_environment_errors_become_one_line(error, words):
    line = cli.environment_error(error)
    assert line and words in line and "\n" not in line


def test_programming_errors_are_not_hidden():
    assert cli.environment_error(ValueError("a bug")) is None
    assert cli.environment_error(KeyError("x")) is None


# ---------------------------------------------------------------------------------------------------------------


def test_flags_override_the_named_variant():
    args = cli.build_parser().parse_args(
        ["txt2img", "--variant", "xl-turbo", "--denoising-steps", "2", "--model", "tiny", "--width", "64"]
    )
    v = cli.variant_from_args(args)
    assert (v.name, v.steps, v.scheduler, v.guidance_scale, v.height, v.width) == (
        "xl-turbo",
        2,
        "EulerA",
        0.0,
        128,
        64,
    )
    assert v.calibration_size == TINY_CALIBRATION_SIZE
    tiny = cli.variant_from_args(cli.build_parser().parse_args(["txt2img", "--model", "tiny"]))
    assert (tiny.steps, tiny.height, tiny.width) == (TINY_MAX_STEPS, 128, 128)
    int8 = cli.variant_from_args(cli.build_parser().parse_args(["txt2img", "--int8", "--quantization-level", "3"]))
    assert (int8.precision, int8.quant_level, int8.model) == ("int8", 3.0, "stabilityai/stable-diffusion-xl-base-1.0")
    assert int8.calibration_size == 32
    asked = cli.variant_from_args(
        cli.build_parser().parse_args(["txt2img", "--int8", "--model", "tiny", "--calibration-size", "8"])
    )
    assert asked.calibration_size == 8


def test_build_makes_engines_once_and_then_finds_them(tmp_path, capsys):
    args = [
        "build",
        "--variants",
        "xl-1.0-fp16,xl-turbo",
        "--model",
        "tiny",
        "--engine-dir",
        str(tmp_path),
        "--no-progress",
    ]
    assert cli.main(args) == 0
    first = capsys.readouterr().out
    assert first.count(": built ") == 2
    assert cli.main(args) == 0
    assert capsys.readouterr().out.count(": loaded ") == 2
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2  # turbo at 128x128 has its own key
