"""The front door, through the real entry point in a child process: bad input refused before torch is imported,
a full disk halfway through a batch, `--version`."""

import importlib.util
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from tests.e2e.test_cli import FAST, error_lines, run_cli

# An engine dir entry named as the torch backend names a tiny FP16 engine: the check before torch reads names only.
FP16_KEY = "unetxl-fp16.bs2.h128w128.tiny.torch2-0-0.cpu.0123456789"


def imported_modules(importtime_log: str) -> set[str]:
    """The modules `python -X importtime` logged (`import time: self | cumulative | name`)."""
    return {line.rsplit("|", 1)[-1].strip() for line in importtime_log.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize(
    "args, message",
    [
        pytest.param(["--threads", "0"], "--threads must be between 1 and", id="threads-zero"),
        pytest.param(["--output-dir", "{tmp}/a-file"], "a-file is not a directory", id="output-dir-is-a-file"),
        pytest.param(
            ["--no-build", "--engine-dir", "{tmp}/empty"], "no xl-1.0-fp16 engine", id="no-build-empty-engine-dir"
        ),
        pytest.param(
            ["--int8", "--no-build", "--engine-dir", "{tmp}/engines"],
            f"no xl-1.0-int8 engine (unetxl-int8.l3.bs2.s4.c2.p1.0.a0.8.h128w128.tiny.torch...) in {{tmp}}/engines; "
            f"it holds {FP16_KEY}",
            id="no-build-other-variant",
        ),
        pytest.param(["--lora-path", "{tmp}/empty"], "holds no LoRA weights", id="lora-dir-without-weights"),
        pytest.param(["SDXL_BENCH_CROSS_KV=always"], "SDXL_BENCH_CROSS_KV='always'", id="bad-setting"),
        pytest.param(
            ["--backend", "tensorrt"],
            "--backend tensorrt needs TensorRT",
            id="tensorrt-missing",
            marks=pytest.mark.skipif(
                importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here"
            ),
        ),
    ],
)
def test_bad_input_is_refused_before_torch_is_imported(tmp_path, args, message):
    """The README promises these refusals before any model loads; they come before torch is even imported
    (seconds on a fresh host), seen in the child's own import log rather than timed."""
    (tmp_path / "a-file").write_text("a file, not a directory")
    (tmp_path / "empty").mkdir()
    (tmp_path / "engines" / FP16_KEY).mkdir(parents=True)
    words = [a.replace("{tmp}", str(tmp_path)) for a in args if "=" not in a]
    env = {**os.environ, **dict(a.split("=", 1) for a in args if "=" in a)}  # NAME=value: the environment's
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "sdxl_core.commands.cli", "txt2img", "x", "--model", "tiny", *words],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    lines = [line for line in done.stderr.splitlines() if not line.startswith("import time:")]
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert message.replace("{tmp}", str(tmp_path)) in lines[0]
    modules = imported_modules(done.stderr)
    assert "sdxl_core.run" in modules  # the log is read right
    assert "torch" not in modules, "refused only after importing torch"


def test_a_full_disk_halfway_through_a_batch_leaves_no_image_without_its_report(tmp_path):
    """The first PNG is written, the second finds the disk full: one line, exit 2, and the run's files are gone
    (an image with no report says nothing about how it was made)."""
    code = (
        "import errno, sys\n"
        "from PIL import Image\n"
        "from sdxl_core.commands import cli\n"
        "real_save, saved = Image.Image.save, []\n"
        "def save(self, fp, *args, **kwargs):\n"
        "    if saved:\n"
        "        raise OSError(errno.ENOSPC, 'No space left on device', str(fp))\n"
        "    saved.append(fp)\n"
        "    return real_save(self, fp, *args, **kwargs)\n"
        "Image.Image.save = save\n"
        "sys.exit(cli.main(sys.argv[1:]))\n"
    )
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-c", code, "txt2img", "x", "--model", "tiny", "--output-dir", str(out), "--batch-size", "2"]
        + FAST,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    lines = error_lines(done.stderr)
    assert len(lines) == 1 and "No space left on device" in lines[0], done.stderr
    assert sorted(p.name for p in out.iterdir()) == [], "files of a failed run were left behind"


def test_version_names_the_installed_package():
    done = run_cli("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"sdxl-bench {metadata.version('sdxl-bench')}\n"


def test_every_command_works_from_a_source_tree_that_is_not_installed(monkeypatch, capsys):
    """A GPU host runs the checkout from PYTHONPATH with no package metadata: the parser (which every command
    builds) must not fail, and --version says where it comes from."""
    from sdxl_core.commands import flags

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(flags.metadata, "version", not_installed)
    parser = flags.build_parser()
    assert parser.parse_args(["txt2img", "--model", "tiny"]).command == "txt2img"
    with pytest.raises(SystemExit) as done:
        parser.parse_args(["--version"])
    assert done.value.code == 0
    import tomllib

    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    version = tomllib.loads(pyproject.read_text())["project"]["version"]
    assert capsys.readouterr().out == f"sdxl-bench {version} (source tree, not installed)\n"
