"""The GPU measurements (`sdxl-bench engines | profile | kernels`) run end to end on `tiny` on the CPU and their
result files render, so a GPU call is never spent on a typo."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdxl_core.commands import profile, quantize_glue
from sdxl_core.reports import measurements, results

ROOT = Path(__file__).resolve().parents[2]
ENV = {
    **{k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")},
    "HF_HUB_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
}


def sdxl_bench(*args, rc=0):
    done = subprocess.run(
        [sys.executable, "-m", "sdxl_core.commands.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env=ENV,
    )
    assert done.returncode == rc, done.stderr[-2000:]
    return done


@pytest.mark.slow
def test_profile_groups_every_op_and_sees_the_8bit_gemm(tmp_path):
    done = sdxl_bench(
        "profile",
        "--model",
        "tiny",
        "--precisions",
        "fp16,int8",
        "--engine-dir",
        str(tmp_path / "E"),
        "--onnx-dir",
        str(tmp_path / "X"),
        "--steps",
        "2",
        "--out",
        str(tmp_path),
    )
    data = json.loads((tmp_path / "profile.json").read_text())
    fp16, int8 = data["rows"]
    for row in (fp16, int8):
        assert row["total_ms"] > 0
        assert sum(row["ms_by_group"].values()) == pytest.approx(row["total_ms"])
        assert row["kernels_per_step"] >= len(row["top_kernels_ms"]) > 0
    assert fp16["ms_by_group"].get("16-bit GEMM (cuBLAS)", 0) > 0
    assert not any(group.startswith("8-bit") for group in fp16["ms_by_group"])
    assert sum(ms for group, ms in int8["ms_by_group"].items() if group.startswith("8-bit")) > 0
    assert "top kernels" in done.stdout
    assert fp16["gemm_timings"] is None and int8["gemm_timings"] is None  # the per-shape timings are a GPU build's
    rendered = sdxl_bench("report", str(tmp_path / "profile.json")).stdout
    assert "| kernel group | fp16 | int8 |" in rendered
    assert "| kernels per step |" in rendered


def test_profile_rows_carry_the_per_shape_timings_of_a_build_or_of_the_engine(tmp_path):
    from sdxl_core.engines.info import EngineInfo

    def info(**kw):
        return EngineInfo(backend="torch", backend_version="2", engine_key="k", mode="loaded", cuda_graph=True, **kw)

    measured = [{"fmt": "int8", "op": "gemm", "shape": [2048, 1280, 1280], "choice": "cutlass:coop_128x160x128"}]
    assert profile.dispatch_timings(info(gemm_timings=measured, engine_path=str(tmp_path / "absent"))) == measured
    (tmp_path / "gemm_dispatch.json").write_text(json.dumps(measured))
    assert profile.dispatch_timings(info(engine_path=str(tmp_path))) == measured  # a reloaded engine's own file
    assert profile.dispatch_timings(info(engine_path=str(tmp_path / "fp16"))) is None
    assert profile.dispatch_timings(info()) is None


@pytest.mark.parametrize(
    "name, group",
    [
        ("triton_poi_fused__to_copy_clamp_int8_mm_mul_round_1", "Inductor norm/pointwise"),  # names a GEMM it feeds
        ("triton_red_fused_native_layer_norm_0", "Inductor norm/pointwise"),
        ("_w8a8_tma_kernel", "8-bit GEMM (Triton, ours)"),
        ("_layernorm8_kernel", "LayerNorm (Triton, ours)"),  # not the eager norms its name would match
        ("_geglu_act8_kernel", "GEGLU (Triton, ours)"),
        ("_attention8_kernel", "attention"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64", "attention"),
        ("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x128x64", "convolution (cuDNN)"),
        ("nvjet_hsh_256x128_64x4_2x1_v_bz_coopA_TNT", "16-bit GEMM (cuBLAS)"),
        ("sm90_xmma_gemm_e4m3e4m3_e4m3f32_f32_tn_n_tilesize128x128x128", "8-bit GEMM (cuBLAS FP8)"),
        ("nvjet_sm90_qqhsh_128x160_128x5_2x1_v_bz_coopA_bias_TNT", "8-bit GEMM (cuBLAS FP8)"),  # two e4m3 operands
        ("nvjet_sm90_hsh_64x56_64x14_4x1_v_bz_TNT", "16-bit GEMM (cuBLAS)"),
        ("void cutlass::device_kernel<cutlass::gemm::kernel::GemmUniversal<int8_t>>", "8-bit GEMM (CUTLASS, ours)"),
    ],
)
def test_profile_groups_kernels_by_origin_before_substrings(name, group):
    assert profile.group_of(name) == group


# An INT8 UNet step's relative error against FP16 on tiny: quantization noise (0.21 measured on its random
# weights with their gains), well below a broken engine's (about 1: zeros or noise).
INT8_NOISE = 0.5


@pytest.mark.slow
def test_engines_builds_tunes_and_reloads(tmp_path):
    common = [
        "--model",
        "tiny",
        "--precisions",
        "fp16,int8,fp16+qkv",
        "--calibration-size",
        "2",
        "--engine-dir",
        str(tmp_path / "E"),
        "--rounds",
        "1",
        "--iters",
        "1",
    ]
    sdxl_bench(
        "engines",
        *common,
        "--onnx-dir",
        str(tmp_path / "X"),
        "--fp16-tunings",
        "nchw",
        "--layout",
        "channels-last",
        "--out",
        str(tmp_path / "build"),
    )
    build = {row["engine"]: row for row in json.loads((tmp_path / "build" / "engines.json").read_text())["rows"]}
    assert list(build) == ["fp16", "int8", "fp16+qkv", "fp16-nchw"]
    assert (build["fp16"]["channels_last"], build["fp16-nchw"]["channels_last"]) == (True, False)
    assert build["fp16+qkv"]["fused_qkv"] is True
    assert build["fp16-nchw"]["mode"] == "in-memory" and build["fp16+qkv"]["mode"] == "built"
    # The same function: fused projections round alike; NCHW convs take other oneDNN algorithms than channels-last
    # ones, whose float32 rounding differs more (1.9e-4 measured on tiny), still far below 8-bit noise (below).
    assert build["fp16+qkv"]["rel_err_vs_fp16"] < 1e-5
    assert build["fp16-nchw"]["rel_err_vs_fp16"] < 1e-3
    assert 0 < build["int8"]["rel_err_vs_fp16"] < INT8_NOISE
    best = min(row["ms_per_step"] for name, row in build.items() if name.startswith("fp16"))
    assert build["int8"]["speedup_vs_best_fp16"] == round(best / build["int8"]["ms_per_step"], 3)

    sdxl_bench("engines", *common, "--reload", "--layout", "channels-last", "--out", str(tmp_path / "reload"))
    data = json.loads((tmp_path / "reload" / "engines.json").read_text())
    assert [(row["mode"], row["channels_last"]) for row in data["rows"]] == [("loaded", True)] * 3
    assert data["rows"][1]["rel_err_vs_fp16"] < INT8_NOISE
    rendered = sdxl_bench("report", str(tmp_path / "reload" / "engines.json")).stdout
    assert "| int8 | reload |" in rendered


def test_a_result_file_is_written_before_the_first_row_and_after_each(tmp_path):
    import torch

    result = results.ResultFile(tmp_path / "out", "kernels", torch.device("cpu"))
    assert json.loads(result.path.read_text())["rows"] == []  # a run killed now still leaves a file
    result.add(
        {
            "op": "gemm",
            "fmt": "int8",
            "shape": [2048, 1280, 10240],
            "layers": 60,
            "ms": {"16bit": 0.0814, "pointer": 0.0712, "tma": 0.0648},
            "tflops": {"16bit": 660.0, "pointer": 754.6, "tma": 829.0},
            "speedup": {"16bit": 1.0, "pointer": 1.143, "tma": 1.256},
            "rel_err": {"16bit": 1e-4, "tma": 2e-4},
        }
    )
    data = json.loads(result.path.read_text())
    assert len(data["rows"]) == 1
    text = measurements.render(data)
    assert "| int8 | gemm | 2048 x 1280 x 10240 | 60 | 81.4 (660) | tma: 64.8 (829) | 1.26x |" in text


def test_kernels_refuses_without_a_gpu_in_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without a CUDA GPU: it checks the refusal there")
    done = sdxl_bench("kernels", "--out", str(tmp_path), rc=2)
    assert done.stderr.strip().count("\n") == 0 and "no CUDA GPU" in done.stderr


def _once_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


@pytest.mark.parametrize("producer, shape", [("geglu", (64, 96)), ("attention_out", (2, 3, 16, 8))])
def test_quantize_glue_compiles_each_formulation_and_int8_ones_are_bit_identical(producer, shape):
    import torch

    rows = quantize_glue.measure(producer, shape, 1, torch.device("cpu"), _once_ms)
    assert [row["fmt"] for row in rows] == ["int8", "fp8"]
    int8, fp8 = rows
    assert set(int8["ms"]) == {"16bit", "16bit:smoothed", "int8", "int8:in-graph-inverse", "int8:round-and-cast"}
    assert not int8["rejected"] and set(int8["rel_err"].values()) == {0.0}
    assert set(fp8["ms"]) == {"16bit", "fp8", "fp8:in-graph-inverse", "fp8:division"}
    assert fp8["rel_err"]["fp8:in-graph-inverse"] == 0.0 and fp8["rel_err"]["fp8:division"] < 1e-2
    text = measurements.render({"kind": "kernels", "rows": rows})
    assert f"| int8 | quantize:{producer} |" in text
    if producer == "attention_out":  # as cuDNN's SDPA leaves it: the FP16 engine's reshape for to_out is a view
        o = quantize_glue.producer_inputs(producer, shape, "cpu")[0]
        assert o.transpose(1, 2).is_contiguous() and int8["ms"]["16bit"] == fp8["ms"]["16bit"] == 0.0


def test_quantize_glue_rejects_an_int8_formulation_that_rounds_differently(monkeypatch):
    import torch

    def truncating(x, scale, inverse):
        return torch.trunc(x.float() * inverse).clamp_(-128, 127).to(torch.int8)

    monkeypatch.setitem(quantize_glue.FORMULATIONS, "int8:truncating", ("int8", truncating))
    (int8,) = quantize_glue.measure("layernorm", (32, 64), 1, torch.device("cpu"), _once_ms, formats=("int8",))
    assert set(int8["rejected"]) == {"int8:truncating"} and "int8:truncating" not in int8["ms"]
