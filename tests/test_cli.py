"""`sdxl-bench` end to end on the tiny model, and every kind of bad input."""

import json
import subprocess
import sys

import pytest
from PIL import Image

from sdxl_core import cli, runinfo

PROMPT = "a photo of an astronaut riding a horse on mars"


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "sdxl_core.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def test_txt2img_writes_png_and_report_and_prints_the_table(tmp_path):
    done = run_cli("txt2img", PROMPT, "--model", "tiny", "--output-dir", str(tmp_path), "--denoising-steps", "6",
                   "--no-progress")
    assert done.returncode == 0, done.stderr
    for row in ("CLIP ", "CLIP2", "UNet x 6", "VAE-Dec", "Pipeline", "Throughput"):
        assert row in done.stdout
    image = Image.open(tmp_path / "xl-1.0-fp16-s0-b0-0.png")
    assert image.size == (128, 128)
    report = json.loads((tmp_path / "xl-1.0-fp16-s0.json").read_text())
    assert tuple(report) == runinfo.REPORT_KEYS
    assert report["variant"]["model"] == "tiny" and report["unet_steps"] == 6 and report["prompt"] == PROMPT
    assert set(report["timings_ms"]) == set(runinfo.TIMED_STAGES)
    assert report["engine"]["engine_key"].startswith("unetxl-fp16.bs2.h128w128.tiny.torch")
    assert report["libraries"]["torch"] and report["device"]["type"] == "cpu"
    assert report["images"] == [str(tmp_path / "xl-1.0-fp16-s0-b0-0.png")]

    summary = run_cli("report", str(tmp_path / "xl-1.0-fp16-s0.json"))
    assert summary.returncode == 0 and "| xl-1.0-fp16 | tiny | " in summary.stdout


@pytest.mark.parametrize("args, message", [
    (["--scheduler", "Heun"], "unknown scheduler 'Heun'"),
    (["--denoising-steps", "-3"], "--denoising-steps must be at least 1"),
    (["--width", "1001"], "--width must be a positive multiple of 8"),
    (["--lora-path", "/no/such/lora.safetensors"], "--lora-path /no/such/lora.safetensors does not exist"),
    (["--int8", "--fp8"], "not allowed with argument"),
    (["--model", "/no/such/model"], "not a diffusers model directory"),
    (["--backend", "onnxruntime"], "unknown backend"),
    (["--variant", "xl-9"], "unknown variant"),
    (["--batch-count", "0"], "--batch-count must be >= 1"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path, capsys):
    try:
        status = cli.main(["txt2img", "x", "--model", "tiny", "--output-dir", str(tmp_path), *args])
    except SystemExit as exit_:  # argparse's own refusals
        status = exit_.code
    stderr = capsys.readouterr().err
    assert status == 2, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], stderr
    assert not list(tmp_path.iterdir()), "a refused run must not write anything"


def test_flags_override_the_named_variant():
    args = cli.build_parser().parse_args(["txt2img", "--variant", "xl-turbo", "--denoising-steps", "2",
                                          "--model", "tiny", "--width", "64"])
    v = cli.variant_from_args(args)
    assert (v.name, v.steps, v.scheduler, v.guidance_scale, v.height, v.width) == ("xl-turbo", 2, "EulerA", 0.0,
                                                                                   128, 64)
    int8 = cli.variant_from_args(cli.build_parser().parse_args(["txt2img", "--int8", "--quantization-level", "3"]))
    assert (int8.precision, int8.quant_level, int8.model) == ("int8", 3.0, "stabilityai/stable-diffusion-xl-base-1.0")


def test_report_on_a_non_report_is_one_line(tmp_path, capsys):
    bad = tmp_path / "x.json"
    bad.write_text("{}")
    assert cli.main(["report", str(bad)]) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("error: ") and len(stderr.splitlines()) == 1


def test_argparse_type_errors_are_one_line_too(tmp_path):
    """A malformed flag value is refused by argparse in the same one-line form, from the real entry point."""
    done = run_cli("txt2img", "--model", "tiny", "--height", "abc")
    assert done.returncode == 2 and "invalid int value" in done.stderr and "Traceback" not in done.stderr


def test_build_makes_engines_once_and_then_finds_them(tmp_path, capsys):
    args = ["build", "--variants", "xl-1.0-fp16,xl-turbo", "--model", "tiny", "--engine-dir", str(tmp_path),
            "--no-progress"]
    assert cli.main(args) == 0
    first = capsys.readouterr().out
    assert first.count(": built ") == 2
    assert cli.main(args) == 0
    assert capsys.readouterr().out.count(": loaded ") == 2
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2  # turbo at 128x128 has its own key


@pytest.mark.parametrize("args, message", [
    (["build", "--variants", "xl-1.0-fp16"], "needs --engine-dir"),
    (["build", "--variants", "xl-1.0-fp16,nope", "--engine-dir", "x"], "unknown variant 'nope'"),
    (["history", "/no/such/history"], "does not exist"),
])
def test_build_and_history_refuse_bad_input_in_one_line(args, message, capsys):
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and message in err
