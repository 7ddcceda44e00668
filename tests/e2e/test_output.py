"""What a run prints, through the real entry point: stdout holds the tables and the files written, nothing else;
what the user should know (a prompt cut to the text encoders' length) is said once on stderr."""

import os
import subprocess
import sys

LONG_PROMPT = "a castle on a hill at dawn, " * 40  # ~280 tokens: CLIP reads 77


def test_an_8bit_run_prints_tables_only_and_says_once_that_a_long_prompt_is_cut(tmp_path):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "sdxl_core.commands.cli", "txt2img", LONG_PROMPT, "--model", "tiny", "--int8"]
        + ["--output-dir", str(tmp_path), "--denoising-steps", "2", "--num-warmup-runs", "0", "--batch-count", "2"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    cut = [line for line in done.stderr.splitlines() if "is cut to the 77 the text encoders read" in line]
    assert len(cut) == 1 and cut[0].startswith("warning: a prompt of "), done.stderr
    # ModelOpt's own counts ("Inserted N quantizers", ...) go to stderr: stdout starts with the latency table.
    lines = done.stdout.splitlines()
    assert lines[0].startswith("|---") and "quantizers" not in done.stdout, done.stdout
    assert all(line.startswith(("|", "UNet per step", "wrote ")) for line in lines), done.stdout


def test_no_engine_says_which_engines_are_there_and_how_they_differ(tmp_path):
    """The suite builds engines with fused QKV; a txt2img without --fused-qkv asks for another key."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}, "HF_HUB_OFFLINE": "1"}
    run = [sys.executable, "-m", "sdxl_core.commands.cli", "txt2img", "x", "--model", "tiny"]
    run += ["--engine-dir", str(tmp_path / "e"), "--output-dir", str(tmp_path / "o"), "--no-progress"]
    fast = ["--denoising-steps", "1", "--num-warmup-runs", "0"]
    built = subprocess.run([*run, *fast, "--fused-qkv"], capture_output=True, text=True, timeout=600, env=env)
    assert built.returncode == 0, built.stderr
    (key,) = [p.name for p in (tmp_path / "e").iterdir() if p.is_dir()]
    done = subprocess.run([*run, "--no-build"], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert f"it holds {key} (differs in fused_qkv=True, this run: unset)" in done.stderr, done.stderr
