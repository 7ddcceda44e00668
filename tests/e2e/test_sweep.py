"""The quality sweep (`pytest -m quality --prompts N|FILE`): its prompts, its summary of mean and worst, its
report, and its items sharded over two workers with the same result as one process (fake devices, `tiny`)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sdxl_core.errors import UserError
from sdxl_core.suite import sweep

REPO = Path(__file__).resolve().parents[2]
LIMITS = {"worst_ssim": 0.99, "mean_ssim": 0.995, "clip_drop": 1.0}


def test_prompts_by_count_hold_out_the_calibration_prompts_first():
    packaged = sweep.packaged_prompts()
    assert len(packaged) == 64
    chosen = sweep.load_prompts("3")
    assert chosen == [(63, packaged[63]), (62, packaged[62]), (61, packaged[61])]
    assert sorted(i for i, _ in sweep.load_prompts("64")) == list(range(64))


def test_prompts_from_a_file_in_file_order(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# a comment\na red cube\n\n  a blue sphere  \n")
    assert sweep.load_prompts(str(path)) == [(0, "a red cube"), (1, "a blue sphere")]


@pytest.mark.parametrize(
    "value, message",
    [
        ("0", "--prompts 0: give 1 to 64"),
        ("65", "--prompts 65: give 1 to 64"),
        ("no-such-file.txt", "--prompts no-such-file.txt: neither a count nor a readable prompt file"),
    ],
)
def test_bad_prompts_are_one_line(value, message):
    with pytest.raises(UserError, match=f"^{message}") as info:
        sweep.load_prompts(value)
    assert "\n" not in str(info.value)


def test_an_empty_prompt_file_is_refused(tmp_path):
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(UserError, match="holds no prompt"):
        sweep.load_prompts(str(tmp_path / "empty.txt"))


def test_thresholds_come_from_the_stored_baseline_where_it_holds_them():
    from sdxl_core.suite.baselines import THRESHOLDS, sweep_thresholds

    stored = {"ssim": {"xl-1.0-int8": 0.97}, "clip_drop": 0.5}  # a manifest older than mean_ssim
    assert sweep_thresholds("tiny", stored, "xl-1.0-int8") == {
        "worst_ssim": 0.97,
        "mean_ssim": THRESHOLDS["tiny"]["mean_ssim"]["xl-1.0-int8"],
        "clip_drop": 0.5,
    }
    assert sweep_thresholds("sdxl-random", None, "xl-1.0-fp8") == {
        "worst_ssim": THRESHOLDS["default"]["ssim"]["xl-1.0-fp8"],
        "mean_ssim": THRESHOLDS["default"]["mean_ssim"]["xl-1.0-fp8"],
        "clip_drop": THRESHOLDS["default"]["clip_drop"],
    }
    for limits in THRESHOLDS.values():  # the mean is held to at least what every prompt is
        assert all(limits["mean_ssim"][name] >= worst for name, worst in limits["ssim"].items())


def record(variant, index, ssim, psnr=40.0, clip=None, limits=LIMITS):
    return {
        "variant": variant,
        "index": index,
        "seed": index,
        "prompt": f"prompt {index}",
        "ssim": ssim,
        "psnr": psnr,
        "thresholds": limits,
        "clip_fp16": clip and clip[0],
        "clip_8bit": clip and clip[1],
        "clip_note": None if clip else "not measured: random weights",
    }


def test_summary_mean_worst_and_failures_whatever_order_records_arrive_in():
    records = [
        record("int8", 2, 0.999, 42.0),
        record("int8", 0, 0.998, 41.0),
        record("int8", 1, 0.9985, None),
        record("fp8", 5, 0.97, 30.0, clip=(31.0, 29.5), limits={**LIMITS, "worst_ssim": 0.96}),
    ]
    summary = sweep.summarise(records)
    assert summary == sweep.summarise(list(reversed(records)))
    int8 = summary["int8"]
    assert int8["prompts"] == 3 and int8["failures"] == []
    assert int8["ssim"] == {"mean": pytest.approx(0.9985), "worst": 0.998, "worst_prompt": 0}
    assert int8["psnr"] == {"mean": pytest.approx(41.5), "worst": 41.0}  # identical images (PSNR inf) skipped
    assert [r["index"] for r in int8["per_prompt"]] == [0, 1, 2]
    assert int8["clip"] is None and int8["clip_note"] == "not measured: random weights"
    fp8 = summary["fp8"]
    assert fp8["clip"] == {"prompts": 1, "mean_fp16": 31.0, "mean_8bit": 29.5, "drop": 1.5}
    assert fp8["failures"] == [
        "mean SSIM 0.97000 over 1 prompts < 0.995",
        "mean CLIP score 1.500 below FP16's, more than 1.0",
    ]
    lines = sweep.summary_lines(summary)
    assert lines[0].startswith("fp8: 1 prompts  SSIM mean 0.97000 worst 0.97000 (p005)") and "mean SSIM" in lines[0]
    assert lines[1].endswith("passed (worst >= 0.99, mean >= 0.995)")


def test_a_worst_prompt_below_its_threshold_fails_the_summary_too():
    summary = sweep.summarise([record("int8", 7, 0.98), record("int8", 8, 0.9999)])
    assert summary["int8"]["failures"][0] == "worst SSIM 0.98000 (p007) < 0.99"


def test_report_as_json_or_markdown(tmp_path):
    summary = sweep.summarise([record("int8", 0, 0.998), record("int8", 1, 0.999, clip=(30.0, 29.9))])
    data = json.loads(sweep.write_report(tmp_path / "q.json", summary).read_text())
    assert data["variants"]["int8"]["ssim"]["worst"] == 0.998 and len(data["variants"]["int8"]["per_prompt"]) == 2
    text = sweep.write_report(tmp_path / "q.md", summary).read_text()
    assert "| int8 | 2 | 0.99850 | 0.99800 | p000 |" in text and "| p001 | 1 | 0.99900 |" in text


# ---------------------------------------------------------------------------------------------------------------
# The real sweep on `tiny`: two workers on two fake GPUs against this process rendering the same prompts.

FP16, INT8 = "xl-1.0-fp16", "xl-1.0-int8"


@pytest.mark.slow
@pytest.mark.needs_variants(FP16, INT8)
def test_sweep_shards_prompts_over_workers_and_merges_as_one_process(tmp_path, engine_dir, build_engine, hardware):
    """Three prompts on two workers: both workers render, the report equals what one process computes from
    the same engines, and a mean below its threshold fails the run while every prompt passes."""
    import shutil

    from sdxl_core import metrics
    from sdxl_core.suite import baselines

    if hardware["cuda"]:
        pytest.skip("needs a machine without a CUDA GPU: its fake devices 0 and 1 would be real GPUs here")
    stored = tmp_path / "baselines" / "tiny" / "cpu"
    shutil.copytree(REPO / "baselines" / "tiny" / "cpu", stored)
    manifest = json.loads((stored / baselines.MANIFEST).read_text())
    manifest["thresholds"]["mean_ssim"] = {INT8: 0.9999}  # tiny's INT8 mean is 0.998; each prompt passes 0.99
    (stored / baselines.MANIFEST).write_text(json.dumps(manifest))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")} | {"CUDA_VISIBLE_DEVICES": "0,1"}
    report = tmp_path / "report.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "tests/suite/test_quality.py",
            "-p",
            "no:cacheprovider",
            "-v",
            "-p",
            "no:hypothesispytest",
            "-n",
            "2",
            "-k",
            "sweep or close_to_fp16",
            f"--variants={FP16},{INT8}",
            "--prompts=3",
            f"--engine-dir={engine_dir}",
            f"--baseline-dir={tmp_path / 'baselines'}",
            f"--quality-report={report}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == pytest.ExitCode.TESTS_FAILED, done.stdout[-4000:] + done.stderr[-2000:]
    assert "5 passed" in done.stdout  # every prompt (and both cases) passed: the mean failed the run
    ran_on = {line.split()[0] for line in done.stdout.splitlines() if "PASSED" in line and "test_sweep_" in line}
    assert ran_on == {"[gw0]", "[gw1]"}, done.stdout  # the prompts were shared out

    # The same prompts rendered here, in one process, from the same engines.
    limits = baselines.sweep_thresholds("tiny", manifest["thresholds"], INT8)
    expected = []
    for index, prompt in sweep.load_prompts("3"):
        images = [build_engine(name).generate(prompt, seed=index).images[0] for name in (FP16, INT8)]
        values = metrics.compare(*images)
        expected.append(
            {
                "variant": INT8,
                "index": index,
                "seed": index,
                "prompt": prompt,
                "thresholds": limits,
                "ssim": round(values["ssim"], 5),
                "psnr": round(values["psnr"], 2),
                "clip_fp16": None,
                "clip_8bit": None,
                "clip_note": "not measured: 'tiny' has random weights, so its CLIP scores mean nothing",
            }
        )
    summary = sweep.summarise(expected)
    assert json.loads(report.read_text())["variants"] == json.loads(json.dumps(summary))
    assert summary[INT8]["failures"] == [f"mean SSIM {summary[INT8]['ssim']['mean']:.5f} over 3 prompts < 0.9999"]

    # The end-of-run sections: the sweep's summary from every worker's prompts, and the measurements by name,
    # as one process names them (no "@xl-1.0-int8" from the variant's worker group).
    lines = done.stdout.splitlines()
    assert sweep.summary_lines(summary)[0] in lines
    measured = [line.split()[1] for line in lines if line.startswith("passed test_8bit_close_to_fp16")]
    assert measured == [f"test_8bit_close_to_fp16[{INT8}-case0]", f"test_8bit_close_to_fp16[{INT8}-case1]"]
    # Which worker prepared which engine, sent home by both: each rendered both variants, none built one twice.
    engines = [line.split() for line in lines if re.match(r"xl-1\.0-(fp16|int8) +(built|loaded) +on gw[01] ", line)]
    assert {(row[0], row[3]) for row in engines} == {(v, w) for v in (FP16, INT8) for w in ("gw0", "gw1")}, lines
    assert all(sum(row[1] == "built" for row in engines if row[0] == v) <= 1 for v in (FP16, INT8)), engines
