"""INT8 (Triton) and FP8 (torch._scaled_mm) GEMM kernels: references on CPU, Triton in the interpreter, GPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sdxl_core.kernels import fp8_gemm, int8_gemm, int8_tma

ROOT = Path(__file__).resolve().parents[1]
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# SDXL UNet linear shapes (M tokens, K, N) at batch 2 x 1024x1024, plus a 1x1 conv as a GEMM.
SDXL_SHAPES = [(8192, 640, 640), (8192, 640, 5120), (8192, 2560, 640), (2048, 1280, 10240), (32768, 320, 320)]
RAGGED_SHAPES = [(1, 16, 16), (7, 40, 24), (129, 200, 72), (300, 328, 136), (1000, 1032, 1030)]


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def rand_int8(*shape, device="cpu", generator=None):
    return torch.randint(-128, 128, shape, dtype=torch.int8, device=device, generator=generator)


def float64_product(x_q, w_q):
    """The integer product computed independently in float64 (exact while K * 128 * 128 < 2**53)."""
    return x_q.cpu().double() @ w_q.cpu().double().T


# ---------------------------------------------------------------- CPU: references and quantizers


def test_quantize_per_tensor_rounds_half_to_even_and_clamps():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.4999, 126.5, 127.5, -128.5, 1e6, -1e6, 0.0])
    q = int8_gemm.quantize_per_tensor(x, 1.0)
    assert q.dtype == torch.int8
    assert q.tolist() == [0, 2, 2, 0, -2, -2, 3, 126, 127, -128, 127, -128, 0]
    # A power-of-two scale makes x * (1 / scale) exact, so ties stay ties.
    q = int8_gemm.quantize_per_tensor(torch.tensor([0.125, 0.375, -0.625, 40.0]), torch.tensor(0.25))
    assert q.tolist() == [0, 2, -2, 127]


def test_quantize_per_tensor_fp16_input_is_computed_in_float32():
    x = torch.randn(64, 64, dtype=torch.float16) * 10
    scale = torch.tensor(0.0731)
    assert torch.equal(int8_gemm.quantize_per_tensor(x, scale), int8_gemm.quantize_per_tensor(x.float(), scale))


def test_quantize_per_channel_roundtrip():
    w = torch.randn(24, 40)
    w_q, w_scale = int8_gemm.quantize_per_channel(w)
    assert w_q.dtype == torch.int8 and w_scale.shape == (24,)
    assert (w_q.abs().amax(dim=1) == 127).all()
    assert (w_q.float() * w_scale[:, None] - w).abs().max() <= w_scale.max() / 2 + 1e-6


def test_int8_reference_integer_product_is_exact():
    g = torch.Generator().manual_seed(0)
    x_q, w_q = rand_int8(37, 96, generator=g), rand_int8(29, 96, generator=g)
    out = int8_gemm.int8_linear_reference(x_q, w_q, 1.0, torch.ones(29), out_dtype=torch.float32)
    assert torch.equal(out.double(), float64_product(x_q, w_q))
    # The extremes: every product is (-128) * (-128).
    x_min = torch.full((3, 64), -128, dtype=torch.int8)
    out = int8_gemm.int8_linear_reference(x_min, x_min, 1.0, 1.0, out_dtype=torch.float32)
    assert (out == 64 * 128 * 128).all()


def test_int8_reference_scales_and_bias():
    g = torch.Generator().manual_seed(1)
    x_q, w_q = rand_int8(2, 9, 48, generator=g), rand_int8(20, 48, generator=g)
    a_scale, w_scale, bias = torch.tensor(0.013), torch.rand(20, generator=g) + 0.01, torch.randn(20, generator=g)
    out = int8_gemm.int8_linear_reference(x_q, w_q, a_scale, w_scale, bias, out_dtype=torch.float32)
    expected = float64_product(x_q.reshape(-1, 48), w_q) * (a_scale.double() * w_scale.double()) + bias.double()
    assert out.shape == (2, 9, 20)
    torch.testing.assert_close(out.reshape(-1, 20).double(), expected, rtol=1e-6, atol=1e-6)
    out16 = int8_gemm.int8_linear_reference(x_q, w_q, a_scale, w_scale, bias)
    assert out16.dtype == torch.float16


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 24),
    k=st.integers(1, 80),
    n=st.integers(1, 24),
    seed=st.integers(0, 2**31 - 1),
    with_bias=st.booleans(),
)
def test_int8_reference_random_shapes(m, k, n, seed, with_bias):
    g = torch.Generator().manual_seed(seed)
    x_q, w_q = rand_int8(m, k, generator=g), rand_int8(n, k, generator=g)
    a_scale = torch.rand((), generator=g) + 1e-3
    w_scale = torch.rand(n, generator=g) + 1e-3
    bias = torch.randn(n, generator=g) if with_bias else None
    out = int8_gemm.int8_linear_reference(x_q, w_q, a_scale, w_scale, bias, out_dtype=torch.float32)
    expected = float64_product(x_q, w_q) * (a_scale.double() * w_scale.double())
    if bias is not None:
        expected += bias.double()
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-5)


def test_int8_cpu_dispatch_uses_the_reference():
    x = torch.randn(6, 32)
    w_q = rand_int8(8, 32)
    a_scale, w_scale = x.abs().amax() / 127, torch.rand(8) + 0.1
    x_q = int8_gemm.quantize_per_tensor(x, a_scale)
    expected = int8_gemm.int8_linear_reference(x_q, w_q, a_scale, w_scale, out_dtype=torch.float32)
    assert torch.equal(int8_gemm.int8_linear_fused(x, w_q, a_scale, w_scale), expected)


def test_quantize_fp8_clamps_and_keeps_representable_values():
    x = torch.tensor([1000.0, -1000.0, 448.0, 1.0, 0.5, -0.375, 0.0])
    q = fp8_gemm.quantize_fp8(x, 1.0)
    assert q.dtype == torch.float8_e4m3fn
    assert q.float().tolist() == [448.0, -448.0, 448.0, 1.0, 0.5, -0.375, 0.0]
    assert fp8_gemm.quantize_fp8(torch.tensor([3.0]), torch.tensor(2.0)).float().item() == 1.5


@pytest.mark.parametrize("per_channel", [True, False])
def test_fp8_reference_close_to_float(per_channel):
    g = torch.Generator().manual_seed(2)
    x, w, bias = torch.randn(3, 50, 256, generator=g), torch.randn(96, 256, generator=g) * 0.05, torch.randn(96)
    if per_channel:
        w_fp8, w_scale = fp8_gemm.quantize_fp8_per_channel(w)
    else:
        w_scale = w.abs().amax() / fp8_gemm.FP8_MAX
        w_fp8 = fp8_gemm.quantize_fp8(w, w_scale)
    a_scale = x.abs().amax() / fp8_gemm.FP8_MAX
    out = fp8_gemm.fp8_linear(x, w_fp8, a_scale, w_scale, bias)  # CPU: the reference
    assert out.shape == (3, 50, 96) and out.dtype == torch.float32
    assert rel_err(out, x @ w.T + bias) < 5e-2
    assert rel_err(out - bias, x @ w.T) < 5e-2


# ---------------------------------------------------------------- CPU: which INT8 kernel runs


def test_int8_kernel_choice_is_checked(monkeypatch):
    from sdxl_core.errors import UserError

    monkeypatch.setenv(int8_gemm.KERNEL_ENV, "fastest")
    with pytest.raises(UserError, match="SDXL_BENCH_INT8_KERNEL='fastest': choose auto, pointer or tma"):
        int8_gemm._kernel_mode()
    with pytest.raises(ValueError, match="'best': choose auto, pointer or tma"):
        int8_gemm._pick_kernel(None, rand_int8(4, 16), rand_int8(8, 16), None, "best")


def test_tma_needs_16_byte_rows_and_bases():
    w_q = rand_int8(24, 48)
    assert int8_tma.supports(rand_int8(7, 48), w_q)
    assert not int8_tma.supports(rand_int8(7, 40), rand_int8(24, 40))  # 40-byte rows
    assert not int8_tma.supports(rand_int8(7, 49)[:, 1:], w_q)  # row-major, but the base is 1 byte in
    assert not int8_tma.supports(rand_int8(48, 7).T, w_q)  # column-major


def _fake_do_bench(times):
    def do_bench(fn, **_):
        fn()
        return times.pop(0)
    return do_bench


def test_time_kernels_picks_the_faster_and_survives_a_broken_tma(monkeypatch):
    import triton.testing

    ran = []
    monkeypatch.setattr(triton.testing, "do_bench", _fake_do_bench([0.5, 0.3]))
    assert int8_gemm._time_kernels(ran.append) == int8_gemm.KernelChoice("tma", 0.5, 0.3)
    monkeypatch.setattr(triton.testing, "do_bench", _fake_do_bench([0.5, 0.7]))
    assert int8_gemm._time_kernels(ran.append).kernel == "pointer"
    assert ran == ["pointer", "tma", "pointer", "tma"]

    def run(name):
        if name == "tma":
            raise RuntimeError("PassManager::run failed\nmore detail")

    monkeypatch.setattr(triton.testing, "do_bench", _fake_do_bench([0.5]))
    choice = int8_gemm._time_kernels(run)
    assert choice == int8_gemm.KernelChoice("pointer", 0.5, None, "RuntimeError: PassManager::run failed")


def test_kernel_choices_are_json_ready(monkeypatch):
    import json

    monkeypatch.setattr(int8_gemm, "_choices", {(64, 32, 48, torch.float16, True): int8_gemm.KernelChoice(
        "tma", 0.2, 0.1)})
    rows = int8_gemm.kernel_choices()
    assert json.loads(json.dumps(rows)) == [{"M": 64, "N": 32, "K": 48, "out_dtype": "float16", "bias": True,
                                             "kernel": "tma", "ms_pointer": 0.2, "ms_tma": 0.1, "error": None}]


def test_saved_kernel_choices_load_back_and_bad_ones_are_refused(monkeypatch):
    from sdxl_core.errors import UserError

    monkeypatch.setattr(int8_gemm, "_choices", {})
    row = {"M": 64, "N": 32, "K": 48, "out_dtype": "bfloat16", "bias": False, "kernel": "pointer",
           "ms_pointer": 0.2, "ms_tma": None, "error": "CompilationError: x"}
    int8_gemm.load_choices([row])
    assert int8_gemm._choices == {(64, 32, 48, torch.bfloat16, False): int8_gemm.KernelChoice(
        "pointer", 0.2, None, "CompilationError: x")}
    for bad in ({**row, "kernel": "fastest"}, {**row, "out_dtype": "float99"}, {**row, "out_dtype": "abs"},
                {k: v for k, v in row.items() if k != "M"}):
        with pytest.raises(UserError, match="malformed INT8 kernel choice .* rebuild the engine"):
            int8_gemm.load_choices([bad])


# ---------------------------------------------------------------- CPU: Triton kernels in the interpreter


@pytest.mark.slow
def test_triton_int8_kernels_in_interpreter():
    # The interpreter has to be chosen before triton is imported, hence a fresh process. The opt-in variable
    # (rather than TRITON_INTERPRET itself) also covers the module's translation of it.
    pythonpath = os.pathsep.join(p for p in [str(ROOT), os.environ.get("PYTHONPATH", "")] if p)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "_interp_check.py"), "unfused", "fused", "tma"],
        env={**env, "SDXL_BENCH_TRITON_ON_CPU": "1", "PYTHONPATH": pythonpath},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK" in proc.stdout


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("shape", RAGGED_SHAPES + SDXL_SHAPES)
def test_triton_int8_matches_reference_on_gpu(shape):
    m, k, n = shape
    g = torch.Generator(device="cuda").manual_seed(m * 31 + k * 7 + n)
    x_q, w_q = rand_int8(m, k, device="cuda", generator=g), rand_int8(n, k, device="cuda", generator=g)
    ones = torch.ones(n, device="cuda")
    out = int8_gemm.int8_linear(x_q, w_q, 1.0, ones, out_dtype=torch.float32)
    ref = int8_gemm.int8_linear_reference(x_q, w_q, 1.0, ones, out_dtype=torch.float32)
    assert torch.equal(out, ref), "integer product differs"

    a_scale = torch.rand((), device="cuda", generator=g) * 0.01 + 1e-4
    w_scale = torch.rand(n, device="cuda", generator=g) * 0.01 + 1e-4
    bias = torch.randn(n, device="cuda", generator=g)
    for dtype in (torch.float16, torch.bfloat16):
        out = int8_gemm.int8_linear(x_q, w_q, a_scale, w_scale, bias.to(dtype), out_dtype=dtype)
        ref = int8_gemm.int8_linear_reference(x_q, w_q, a_scale, w_scale, bias.to(dtype), out_dtype=torch.float32)
        assert out.dtype == dtype
        assert rel_err(out, ref) < (1e-3 if dtype == torch.float16 else 8e-3)


# Ragged M and N, K a multiple of 16 (TMA's row alignment for int8) but not of the 128-wide K tile.
TMA_SHAPES = [(1, 16, 16), (7, 48, 24), (129, 208, 72), (300, 336, 136), (1000, 1040, 1030)]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("shape", TMA_SHAPES + SDXL_SHAPES)
def test_tma_int8_matches_reference_on_gpu(shape, monkeypatch):
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("TMA needs a Hopper GPU (compute capability 9.0+)")
    launches = []
    launch = int8_tma.launch
    monkeypatch.setattr(int8_tma, "launch", lambda *a, **kw: launches.append(1) or launch(*a, **kw))
    m, k, n = shape
    g = torch.Generator(device="cuda").manual_seed(m * 17 + k * 3 + n)
    x_q, w_q = rand_int8(m, k, device="cuda", generator=g), rand_int8(n, k, device="cuda", generator=g)
    ones = torch.ones(n, device="cuda")
    out = int8_gemm.int8_linear(x_q, w_q, 1.0, ones, out_dtype=torch.float32, kernel="tma")
    assert launches, "the TMA kernel did not run"
    assert torch.equal(out, int8_gemm.int8_linear_reference(x_q, w_q, 1.0, ones, out_dtype=torch.float32))

    a_scale = torch.rand((), device="cuda", generator=g) * 0.01 + 1e-4
    w_scale = torch.rand(n, device="cuda", generator=g) * 0.01 + 1e-4
    bias = torch.randn(n, device="cuda", generator=g, dtype=torch.float16)
    out = int8_gemm.int8_linear(x_q, w_q, a_scale, w_scale, bias, out_dtype=torch.float16, kernel="tma")
    pointer = int8_gemm.int8_linear(x_q, w_q, a_scale, w_scale, bias, out_dtype=torch.float16, kernel="pointer")
    assert torch.equal(out, pointer), "same integers and the same epilogue must give the same halves"


@pytest.mark.gpu
@needs_gpu
def test_auto_kernel_choice_times_both_on_gpu(monkeypatch):
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("TMA needs a Hopper GPU (compute capability 9.0+)")
    monkeypatch.delenv(int8_gemm.KERNEL_ENV, raising=False)
    monkeypatch.setattr(int8_gemm, "_choices", {})
    m, k, n = SDXL_SHAPES[1]
    x_q, w_q = rand_int8(m, k, device="cuda"), rand_int8(n, k, device="cuda")
    int8_gemm.int8_linear(x_q, w_q, 0.01, torch.full((n,), 0.01, device="cuda"))
    (row,) = int8_gemm.kernel_choices()
    assert row["error"] is None, row["error"]
    assert row["ms_pointer"] > 0 and row["ms_tma"] > 0
    assert row["kernel"] == ("tma" if row["ms_tma"] < row["ms_pointer"] else "pointer")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("shape", RAGGED_SHAPES + SDXL_SHAPES)
def test_triton_int8_fused_matches_reference_on_gpu(shape):
    m, k, n = shape
    g = torch.Generator(device="cuda").manual_seed(m * 13 + k * 5 + n)
    x = torch.randn(m, k, device="cuda", generator=g) * 3
    w_q = rand_int8(n, k, device="cuda", generator=g)
    a_scale = x.abs().amax() / 127
    x_q = int8_gemm.quantize_per_tensor(x, a_scale)

    # float32 x, w_scale = 1, no bias: out = float(acc) * a_scale rounded once, identical to the reference.
    ones = torch.ones(n, device="cuda")
    out = int8_gemm.int8_linear_fused(x, w_q, a_scale, ones)
    ref = int8_gemm.int8_linear_reference(x_q, w_q, a_scale, ones, out_dtype=torch.float32)
    assert torch.equal(out, ref), "fused quantization or integer product differs"

    w_scale = torch.rand(n, device="cuda", generator=g) * 0.01 + 1e-4
    bias = torch.randn(n, device="cuda", generator=g)
    for dtype in (torch.float16, torch.bfloat16):
        xd = x.to(dtype)
        bd, xd_q = bias.to(dtype), int8_gemm.quantize_per_tensor(xd, a_scale)
        out = int8_gemm.int8_linear_fused(xd, w_q, a_scale, w_scale, bd)
        unfused = int8_gemm.int8_linear(xd_q, w_q, a_scale, w_scale, bd, out_dtype=dtype)
        ref = int8_gemm.int8_linear_reference(xd_q, w_q, a_scale, w_scale, bd, out_dtype=torch.float32)
        assert out.dtype == dtype
        assert rel_err(out, ref) < (1e-3 if dtype == torch.float16 else 8e-3)
        assert rel_err(out, unfused) < 1e-3  # same integers, same epilogue: differences are output rounding


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("shape", [(7, 40, 24), (300, 328, 136), (1000, 1024, 1024), *SDXL_SHAPES[:3]])
def test_fp8_linear_on_gpu(shape, per_channel):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs compute capability 8.9+")
    m, k, n = shape
    g = torch.Generator(device="cuda").manual_seed(m + k + n)
    x = torch.randn(m, k, device="cuda", generator=g, dtype=torch.float16)
    w = torch.randn(n, k, device="cuda", generator=g, dtype=torch.float16) * 0.05
    bias = torch.randn(n, device="cuda", generator=g, dtype=torch.float16)
    if per_channel:
        w_fp8, w_scale = fp8_gemm.quantize_fp8_per_channel(w)
    else:
        w_scale = w.float().abs().amax() / fp8_gemm.FP8_MAX
        w_fp8 = fp8_gemm.quantize_fp8(w, w_scale)
    a_scale = x.float().abs().amax() / fp8_gemm.FP8_MAX
    out = fp8_gemm.fp8_linear(x, w_fp8, a_scale, w_scale, bias)
    assert out.shape == (m, n) and out.dtype == torch.float16
    assert rel_err(out, x.float() @ w.float().T + bias.float()) < 5e-2
    assert rel_err(out, fp8_gemm.fp8_linear_reference(x, w_fp8, a_scale, w_scale, bias)) < 1e-2
