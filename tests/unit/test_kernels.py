"""INT8 (Triton) and FP8 (torch._scaled_mm) GEMM kernels: references on CPU, Triton in the interpreter, GPU."""

import subprocess
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sdxl_core.quant.kernels import cuda_build, fp8_gemm, gemm8_cutlass, int8_gemm, int8_tma, ops, shapes
from sdxl_core.quant.kernels.int8_gemm import CUTLASS_PREFIX
from tests.support.tiny import run_in_interpreter

ROOT = Path(__file__).resolve().parents[2]
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantize_per_tensor_equals_round_clamp_cast_bit_for_bit(dtype):
    """The magic-number rounding (an addition and the float's bits) gives what round-to-integer and a cast give:
    every half-integer tie and every integer of the range, both clamps, infinities, signed zeros, random values."""
    g = torch.Generator().manual_seed(0)
    ties = torch.arange(-300, 301, dtype=torch.float32) / 2
    specials = torch.tensor([0.0, -0.0, 1e30, -1e30, float("inf"), float("-inf"), 127.49, -128.49, 2**-24])
    x = torch.cat([ties, specials, torch.randn(200_000, generator=g) * 150]).to(dtype)
    for scale in (1.0, 0.5, 0.0123, torch.tensor(3.7e-3)):
        inv = 1.0 / torch.as_tensor(scale, dtype=torch.float32)
        expected = torch.round(x.float() * inv).clamp(-128, 127).to(torch.int8)
        assert torch.equal(int8_gemm.quantize_per_tensor(x, scale), expected)


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


def test_int8_kernel_names_are_checked():
    x_q, w_q = rand_int8(4, 48), rand_int8(8, 48)
    ones = torch.ones(8)
    with pytest.raises(ValueError, match=r"INT8 kernel 'best' cannot run .*: choose one of pointer, tma$"):
        int8_gemm.int8_linear(x_q, w_q, 1.0, ones, kernel="best")
    # TMA needs 16-byte rows: K = 40 leaves the pointer kernel only.
    with pytest.raises(ValueError, match=r"INT8 kernel 'tma' cannot run .*K=40.*: choose one of pointer$"):
        int8_gemm.int8_linear(rand_int8(4, 40), rand_int8(8, 40), 1.0, ones, kernel="tma")
    # CUTLASS runs on a Hopper GPU only.
    with pytest.raises(ValueError, match=r"'cutlass:coop_128x128x128' cannot run .*cpu\): choose one of pointer"):
        int8_gemm.int8_linear(x_q, w_q, 1.0, ones, kernel="cutlass:coop_128x128x128")
    reference = int8_gemm.int8_linear_reference(x_q, w_q, 1.0, ones)
    for kernel in ("pointer", "tma"):  # on a CPU each named kernel computes the reference
        assert torch.equal(int8_gemm.int8_linear(x_q, w_q, 1.0, ones, kernel=kernel), reference)


def test_candidate_kernels_on_cpu():
    w_q = rand_int8(24, 48)
    assert int8_gemm.candidate_kernels(rand_int8(7, 48), w_q) == ["pointer", "tma"]
    assert int8_gemm.candidate_kernels(rand_int8(2, 3, 48), w_q, torch.bfloat16) == ["pointer", "tma"]
    assert int8_gemm.candidate_kernels(rand_int8(7, 40), rand_int8(24, 40)) == ["pointer"]
    assert int8_gemm.candidate_kernels(rand_int8(48, 7).T, w_q) == ["pointer", "tma"]  # copied to row-major
    with pytest.raises(ValueError, match="K mismatch"):
        int8_gemm.candidate_kernels(rand_int8(7, 32), w_q)


def test_int8_mm_op_passes_the_kernel_name_through():
    x_q, w_q = rand_int8(6, 32), rand_int8(8, 32)
    a_scale, w_scale, bias = torch.tensor(0.02), torch.rand(8) + 0.1, torch.randn(8)
    out = ops.int8_mm(x_q, w_q, a_scale, w_scale, bias, torch.float32, "tma")
    assert torch.equal(out, int8_gemm.int8_linear_reference(x_q, w_q, a_scale, w_scale, bias, torch.float32))
    with pytest.raises(ValueError, match="INT8 kernel 'fastest' cannot run"):
        ops.int8_mm(x_q, w_q, a_scale, w_scale, bias, torch.float32, "fastest")
    torch.library.opcheck(ops.int8_mm, (x_q, w_q, a_scale, w_scale, bias, torch.float16, "pointer"))


def test_tma_needs_16_byte_rows_and_bases():
    w_q = rand_int8(24, 48)
    assert int8_tma.supports(rand_int8(7, 48), w_q)
    assert not int8_tma.supports(rand_int8(7, 40), rand_int8(24, 40))  # 40-byte rows
    assert not int8_tma.supports(rand_int8(7, 49)[:, 1:], w_q)  # row-major, but the base is 1 byte in
    assert not int8_tma.supports(rand_int8(48, 7).T, w_q)  # column-major


# ---------------------------------------------------------------- CPU: the CUTLASS kernels' wrapper and library


def _cutlass_caches_clear():
    for cached in (gemm8_cutlass._library, gemm8_cutlass.configs, gemm8_cutlass._available):
        cached.cache_clear()


def test_cutlass_is_unavailable_without_a_cuda_device():
    assert not gemm8_cutlass.available("cpu")
    assert gemm8_cutlass.unavailable_reason("cpu") == "needs a CUDA Hopper GPU (sm_90), not cpu"
    w_q, out = rand_int8(16, 32), torch.empty(8, 16, dtype=torch.float16)
    scales = (torch.tensor([0.5]), torch.ones(16))
    # Every operand is checked before anything reaches the library.
    with pytest.raises(ValueError, match="same CUDA device"):
        gemm8_cutlass.launch(rand_int8(8, 32), w_q, out, *scales, None, "coop_128x128x128")
    with pytest.raises(ValueError, match=r"K % 16 == 0, N % 8 == 0, 16-byte aligned rows"):
        gemm8_cutlass.launch(rand_int8(8, 40), rand_int8(16, 40), out, *scales, None, "coop_128x128x128")
    with pytest.raises(ValueError, match="bias must be a contiguous torch.float16 .16. tensor"):
        gemm8_cutlass.launch(rand_int8(8, 32), w_q, out, *scales, torch.zeros(16), "coop_128x128x128")
    with pytest.raises(ValueError, match="out must be a contiguous float16/bfloat16"):
        gemm8_cutlass.launch(rand_int8(8, 32), w_q, out.float(), *scales, None, "coop_128x128x128")
    assert gemm8_cutlass.supports(rand_int8(8, 64)[:, :32], w_q)  # rows 64 bytes apart
    assert not gemm8_cutlass.supports(rand_int8(8, 40)[:, :32], w_q)  # rows 40 bytes apart
    assert not gemm8_cutlass.supports(rand_int8(8, 33)[:, 1:], w_q)  # a base 1 byte into its storage
    assert not gemm8_cutlass.supports(rand_int8(8, 32), rand_int8(12, 32))  # N % 8


def test_cutlass_without_its_library_or_on_another_gpu_is_unavailable(monkeypatch):
    def missing(name, **_):
        raise cuda_build.KernelUnavailable("nvcc not found (set CUDA_HOME or put nvcc on PATH)")

    capability = [(9, 0)]
    monkeypatch.setattr(cuda_build, "library", missing)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[0])
    _cutlass_caches_clear()
    try:
        assert not gemm8_cutlass.available("cuda")
        assert gemm8_cutlass.unavailable_reason("cuda:0") == "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
        with pytest.raises(cuda_build.KernelUnavailable, match="nvcc not found"):
            gemm8_cutlass.configs()
        capability[0] = (8, 0)
        _cutlass_caches_clear()
        assert not gemm8_cutlass.available("cuda:0")
        assert gemm8_cutlass.unavailable_reason("cuda:0") == "needs compute capability 9.0 (Hopper), cuda:0 is 8.0"
    finally:
        _cutlass_caches_clear()


def test_fp8_mm_names_its_kernel_and_runs_the_reference_off_the_gpu():
    g = torch.Generator().manual_seed(3)
    x_q = (torch.randn(6, 32, generator=g) * 30).to(torch.float8_e4m3fn)
    w_q = (torch.randn(16, 32, generator=g) * 30).to(torch.float8_e4m3fn)
    a_scale, w_scale, bias = torch.tensor(0.02), torch.tensor(0.003), torch.randn(16, generator=g)
    expected = x_q.double() @ w_q.double().T * (0.02 * 0.003) + bias.double()
    assert ops.fp8_candidates(x_q, w_q, torch.float16) == ["scaled_mm"]  # no GPU: the exact reference only
    # An engine built on a Hopper GPU names its kernels; off the GPU each of them computes the same reference.
    outs = [
        ops.fp8_mm(x_q, w_q, a_scale, w_scale, bias, torch.float32, kernel)
        for kernel in ("scaled_mm", "scaled_mm_fast", CUTLASS_PREFIX + "coop_128x128x128")
    ]
    assert all(torch.equal(out, outs[0]) for out in outs) and rel_err(outs[0], expected) < 1e-6
    with pytest.raises(ValueError, match="unknown FP8 kernel 'cublas'"):
        ops.fp8_mm(x_q, w_q, a_scale, w_scale, bias, torch.float32, "cublas")
    assert gemm8_cutlass.supports(x_q, w_q) and not gemm8_cutlass.supports(x_q, w_q.view(torch.int8))  # one format


def test_cutlass_gpu_tolerance_takes_one_fused_multiply_add_and_refuses_nan():
    """The GPU tests' comparison, on a CPU model of the kernel's epilogue: float32 fma(acc, scale, bias) rounded
    once to the output dtype (float64 holds the product of two floats exactly)."""
    g = torch.Generator().manual_seed(0)
    x_q, w_q = rand_int8(512, 1280, generator=g), rand_int8(1280, 1280, generator=g)
    a_scale, w_scale = (torch.rand(1, generator=g) + 0.5) * 1e-2, (torch.rand(1280, generator=g) + 0.5) * 1e-3
    acc = (x_q.int() @ w_q.int().T).double()
    product = int8_gemm.int8_linear_reference(x_q, w_q, a_scale, w_scale, out_dtype=torch.float32)
    for dtype in (torch.float16, torch.bfloat16):
        bias = torch.randn(1280, generator=g).to(dtype)
        kernel = (acc * (a_scale * w_scale).double() + bias.double()).float().to(dtype)
        assert cutlass_mismatches(kernel, product, bias, dtype) is None
        no_bias = (acc * (a_scale * w_scale).double()).float().to(dtype)
        assert torch.equal(no_bias, product.to(dtype)) and cutlass_mismatches(no_bias, product, None, dtype) is None
        kernel[3, 5], kernel[7, 9] = float("nan"), kernel[7, 9] + 8 * ulp(kernel[7, 9].float(), dtype)
        assert cutlass_mismatches(kernel, product, bias, dtype).startswith("2 of 655360 elements off (NaN: 1)")


EXPORTS = {
    "sdxl_gemm8",
    "sdxl_gemm8_workspace",
    "sdxl_gemm8_num_configs",
    "sdxl_gemm8_config_name",
    "sdxl_gemm8_format",
    "sdxl_gemm8_set_pdl",
    "sdxl_last_error",
    "sdxl_geglu8",
    "sdxl_geglu8_workspace",
    "sdxl_geglu8_num_configs",
    "sdxl_geglu8_config_name",
}


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_cutlass_library_builds_and_refuses_cleanly(fmt):
    """Compiles csrc/gemm8_sm90.cu for sm_90a as the INT8 or the FP8 library (minutes on first use; then cached
    in the kernel cache) and calls its C functions: its format, config names, and refusals that need no GPU
    (bad config, misaligned shapes, no device)."""
    import ctypes
    import re
    import shutil

    try:
        cuda_build.nvcc()
        cuda_build.cutlass_include()
    except cuda_build.KernelUnavailable as err:
        pytest.skip(f"needs nvcc and the CUTLASS headers (nvidia-cutlass): {err}")
    _cutlass_caches_clear()
    lib = gemm8_cutlass._library(fmt)
    names = gemm8_cutlass.configs(fmt)
    assert lib.sdxl_gemm8_format().decode() == fmt
    assert len(names) == lib.sdxl_gemm8_num_configs() >= 4 and len(set(names)) == len(names)
    assert all(re.fullmatch(r"(coop|pingpong)_\d+x\d+x\d+(_\w+)?", name) for name in names), names
    assert lib.sdxl_gemm8_config_name(len(names)) is None
    assert lib.sdxl_gemm8_set_pdl(7) == 1 and lib.sdxl_gemm8_set_pdl(0) == 0  # dependent launch on, off again
    if shutil.which("nm"):  # built with hidden visibility: the C entry points are all it exports
        symbols = subprocess.run(["nm", "-D", "--defined-only", lib._name], capture_output=True, text=True).stdout
        assert {line.split()[-1] for line in symbols.splitlines() if " T " in line} == EXPORTS

    def gemm(m, n, k, config=0, pointer=4096, lda=None):
        lda = k if lda is None else lda
        # Fake, 16-byte aligned device pointers: every call below must be refused before touching them.
        return lib.sdxl_gemm8(pointer, pointer, pointer, pointer, pointer, None, m, n, k, lda, 0, config, None, 0, None)

    assert gemm(64, 64, 64, config=len(names)) == 1
    assert "out of range" in gemm8_cutlass._last_error(lib)
    assert gemm(64, 64, 40) == 2 and "K % 16 == 0, N % 8 == 0" in gemm8_cutlass._last_error(lib)
    assert gemm(64, 60, 64) == 2
    assert gemm(64, 64, 64, lda=72) == 2 and gemm(64, 64, 64, lda=48) == 2
    assert gemm(64, 64, 64, pointer=4104) == 2 and "16-byte aligned" in gemm8_cutlass._last_error(lib)
    assert gemm(0, 64, 64) == 0  # nothing to do
    if not torch.cuda.is_available():
        assert gemm(64, 64, 64) == 5 and "cudaGetDevice" in gemm8_cutlass._last_error(lib)
        assert lib.sdxl_gemm8_workspace(64, 64, 64, 0) == ctypes.c_size_t(-1).value

    # The GEGLU GEMM's entry point: M x K -> 2F, W1 interleaved (its configs are checked by `configs` above).
    geglu_names = gemm8_cutlass.GEGLU_CONFIG_NAMES
    assert [lib.sdxl_geglu8_config_name(i).decode() for i in range(lib.sdxl_geglu8_num_configs())] == list(geglu_names)

    def geglu(m, f, k, config=0, pointer=4096, out=4096):
        # a, w, out, a_scale, w_scale (per channel), bias, smooth, out_scale, sizes, lda, fp16, config, no workspace
        args = (pointer, pointer, out, pointer, pointer, 1, None, None, pointer, m, f, k, k, 0, config, None, 0, None)
        return lib.sdxl_geglu8(*args)

    assert geglu(64, 64, 64, config=len(geglu_names)) == 1 and "out of range" in gemm8_cutlass._last_error(lib)
    assert geglu(64, 60, 64) == 2 and "F % 8 == 0" in gemm8_cutlass._last_error(lib)
    assert geglu(64, 64, 40) == 2
    assert geglu(64, 64, 64, pointer=4104) == 2 and "16-byte aligned" in gemm8_cutlass._last_error(lib)
    assert geglu(64, 64, 64, out=4097) == 2 and "2-byte aligned" in gemm8_cutlass._last_error(lib)
    assert geglu(0, 64, 64) == 0
    if not torch.cuda.is_available():
        assert geglu(64, 64, 64) == 5 and "cudaGetDevice" in gemm8_cutlass._last_error(lib)


# ---------------------------------------------------------------- CPU: Triton kernels in the interpreter


@pytest.mark.slow
def test_triton_int8_kernels_in_interpreter():
    proc = run_in_interpreter("interp_check.py", "unfused", "fused", "tma")
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


# ---------------------------------------------------------------- GPU: the CUTLASS kernels (Hopper)

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
needs_hopper = pytest.mark.skipif(not HOPPER, reason="needs a CUDA Hopper GPU (sm_90)")
# M ragged against every tile (1, 77, 154, 1000, 129); K not a multiple of the 128-wide K tile (16, 208, 336,
# 1040); N a multiple of 8 but not of 16 (136, 1032); then every SDXL linear shape.
CUTLASS_SHAPES = [
    (1, 16, 16),
    (77, 2048, 640),
    (129, 208, 72),
    (154, 336, 136),
    (1000, 1040, 1032),
    *shapes.SDXL_LINEAR_SHAPES,
]


@pytest.fixture
def cutlass_configs():
    reason = gemm8_cutlass.unavailable_reason()
    assert reason is None, f"the CUTLASS INT8 kernels should run on this Hopper GPU: {reason}"
    return gemm8_cutlass.configs()


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of `dtype` at |x| (x float32), subnormals included."""
    mantissa_bits = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23}[dtype]
    return torch.exp2(torch.floor(torch.log2(x.abs().clamp(min=torch.finfo(dtype).tiny))) - mantissa_bits)


def cutlass_mismatches(out, product, bias, dtype) -> str | None:
    """None when `out` matches the reference's float32 epilogue, product + bias (product = acc * scale, the
    float32 reference without bias), as closely as the kernel's one fused multiply-add allows: within one
    output ulp plus two float32 ulps of the summands, which covers the reference's two roundings where the
    sum cancels (without bias both round once, identically, and half an output ulp is the bound). NaN, the
    poison the output starts as, counts as wrong. Else a one-line summary."""
    bias = torch.zeros_like(product) if bias is None else bias.float().expand_as(product)
    expected = product + bias
    tolerance = ulp(expected, dtype) + 2 * ulp(product.abs() + bias.abs(), torch.float32)
    diff = (out.float() - expected).abs()
    bad = ~(diff <= tolerance)
    if not bad.any():
        return None
    worst = torch.nan_to_num(diff / ulp(expected, dtype), nan=float("inf")).max().item()
    return f"{bad.sum().item()} of {bad.numel()} elements off (NaN: {out.isnan().sum().item()}), worst {worst:.3g} ulp"


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("shape", CUTLASS_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cutlass_int8_configs_match_reference_on_gpu(shape, cutlass_configs):
    """Every config, float16 and bfloat16, with and without bias, writes every element (the output starts as
    NaN) as `int8_linear_reference` computes it, to within the rounding of one fused multiply-add."""
    m, k, n = shape
    g = torch.Generator(device="cuda").manual_seed(m * 29 + k * 11 + n)
    x_q, w_q = rand_int8(m, k, device="cuda", generator=g), rand_int8(n, k, device="cuda", generator=g)
    a_scale = (torch.rand(1, device="cuda", generator=g) + 0.5) * 1e-2
    w_scale = (torch.rand(n, device="cuda", generator=g) + 0.5) * 1e-3
    failures = []
    # The integer product, exactly: ternary operands keep |acc| far below 2048, where float16 holds every
    # integer, and power-of-two scales (a different one per column) keep the scaling exact too.
    t_x = torch.randint(-1, 2, (m, k), dtype=torch.int8, device="cuda", generator=g)
    t_w = torch.randint(-1, 2, (n, k), dtype=torch.int8, device="cuda", generator=g)
    col_scale = torch.exp2(-(torch.arange(n, device="cuda") % 5).float())
    exact = int8_gemm.int8_linear_reference(t_x, t_w, 0.5, col_scale, out_dtype=torch.float32)
    for config in cutlass_configs:
        out = torch.full((m, n), float("nan"), dtype=torch.float16, device="cuda")
        gemm8_cutlass.launch(t_x, t_w, out, torch.tensor([0.5], device="cuda"), col_scale, None, config)
        if not torch.equal(out.float(), exact):
            failures.append(f"{config}: the integer product differs at {(out.float() != exact).sum().item()} elements")

    product = int8_gemm.int8_linear_reference(x_q, w_q, a_scale, w_scale, out_dtype=torch.float32)
    for dtype in (torch.float16, torch.bfloat16):
        for bias in (None, torch.randn(n, device="cuda", generator=g).to(dtype)):
            for config in cutlass_configs:
                out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
                try:
                    gemm8_cutlass.launch(x_q, w_q, out, a_scale, w_scale, bias, config)
                    torch.cuda.synchronize()
                except gemm8_cutlass.CutlassError as err:
                    failures.append(f"{config} {dtype} bias={bias is not None}: {err}")
                    continue
                if problem := cutlass_mismatches(out, product, bias, dtype):
                    failures.append(f"{config} {dtype} bias={bias is not None}: {problem}")
    assert not failures, "\n".join(failures)


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("shape", CUTLASS_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cutlass_fp8_configs_match_reference_on_gpu(shape):
    """The FP8 library, every config: an exact integer product on ternary e4m3 operands (|acc| < 2**13, which
    even the fast accumulation's reduced-precision adds hold exactly; power-of-two scales), then random e4m3
    operands with scales and bias within the fast accumulation's error bound of the float64 product, no NaN,
    through `ops.fp8_mm` as an engine calls it."""
    from sdxl_core.quant.kernels import conv_cutlass

    reason = gemm8_cutlass.unavailable_reason(fmt="fp8")
    assert reason is None, f"the CUTLASS FP8 kernels should run on this Hopper GPU: {reason}"
    configs = [CUTLASS_PREFIX + name for name in gemm8_cutlass.configs("fp8")]
    m, k, n = shape
    g = torch.Generator(device="cuda").manual_seed(m * 31 + k * 7 + n)
    fp8 = torch.float8_e4m3fn
    t_x = torch.randint(-1, 2, (m, k), device="cuda", generator=g).to(fp8)
    t_w = torch.randint(-1, 2, (n, k), device="cuda", generator=g).to(fp8)
    col_scale = torch.exp2(-(torch.arange(n, device="cuda") % 5).float())
    exact = (t_x.double() @ t_w.double().T) * 0.5 * col_scale.double()
    x_q = (torch.randn(m, k, device="cuda", generator=g) * 40).to(fp8)
    w_q = (torch.randn(n, k, device="cuda", generator=g) * 40).to(fp8)
    a_scale, w_scale = torch.tensor(0.01, device="cuda"), torch.tensor(0.002, device="cuda")
    bias = torch.randn(n, device="cuda", generator=g).to(torch.float16)
    reference = (x_q.double() @ w_q.double().T) * (0.01 * 0.002) + bias.double()
    bound = conv_cutlass.fp8_error_bound(k, 1, 1)  # K adds of one MMA's depth each, as in the conv
    assert ops.fp8_candidates(x_q, w_q, torch.float16)[-len(configs) :] == configs
    failures = []
    for kernel in configs:
        out = ops.fp8_mm(t_x, t_w, torch.tensor(0.5, device="cuda"), col_scale, None, torch.float16, kernel)
        if not torch.equal(out.double(), exact.half().double()):
            failures.append(f"{kernel}: the exact product differs at {(out.double() != exact.half().double()).sum()}")
        out = ops.fp8_mm(x_q, w_q, a_scale, w_scale, bias, torch.float16, kernel)
        if out.isnan().any() or not rel_err(out, reference) <= bound:
            failures.append(
                f"{kernel}: relative error {rel_err(out, reference):.2e} (bound {bound:.2e}), "
                f"{out.isnan().sum().item()} NaN"
            )
    assert not failures, "\n".join(failures)


@pytest.mark.gpu
@needs_hopper
def test_int8_linear_runs_the_named_cutlass_kernel_on_gpu(cutlass_configs):
    x_q, w_q = rand_int8(2, 77, 2048, device="cuda"), rand_int8(640, 2048, device="cuda")
    a_scale, w_scale = torch.tensor(0.01, device="cuda"), torch.full((640,), 1e-3, device="cuda")
    bias = torch.randn(640, device="cuda", dtype=torch.float16)
    names = [CUTLASS_PREFIX + config for config in cutlass_configs]
    assert int8_gemm.candidate_kernels(x_q, w_q)[-len(names) :] == names
    assert not any(k.startswith(CUTLASS_PREFIX) for k in int8_gemm.candidate_kernels(x_q, w_q, torch.float32))
    assert int8_gemm.candidate_kernels(rand_int8(7, 40, device="cuda"), rand_int8(64, 40, device="cuda")) == ["pointer"]
    product = int8_gemm.int8_linear_reference(x_q, w_q, a_scale, w_scale, out_dtype=torch.float32)
    for name in names:
        out = int8_gemm.int8_linear(x_q, w_q, a_scale, w_scale, bias, out_dtype=torch.float16, kernel=name)
        assert out.shape == (2, 77, 640) and out.dtype == torch.float16
        assert cutlass_mismatches(out, product, bias, torch.float16) is None, name
    # A view into a wider tensor: rows 2112 bytes apart.
    x_wide = rand_int8(154, 2112, device="cuda")[:, :2048]
    product = int8_gemm.int8_linear_reference(x_wide, w_q, a_scale, w_scale, out_dtype=torch.float32)
    for name in names:
        out = int8_gemm.int8_linear(x_wide, w_q, a_scale, w_scale, bias, out_dtype=torch.float16, kernel=name)
        assert cutlass_mismatches(out, product, bias, torch.float16) is None, name
    with pytest.raises(ValueError, match="bias must be a contiguous torch.float16"):
        int8_gemm.int8_linear(x_q, w_q, a_scale, w_scale, bias.float(), out_dtype=torch.float16, kernel=names[0])


@pytest.mark.gpu
@needs_hopper
def test_cutlass_int8_gemm_in_a_cuda_graph(cutlass_configs):
    """Each config captured in a CUDA graph (after one warm-up call, which does its one-time setup) and replayed
    on new inputs: the launch takes the capturing stream, reads a_scale on the device and allocates nothing."""
    m, k, n = 2048, 1280, 1280
    w_q = rand_int8(n, k, device="cuda")
    w_scale = (torch.rand(n, device="cuda") + 0.5) * 1e-3
    bias = torch.randn(n, device="cuda", dtype=torch.float16)
    static_x, static_scale = rand_int8(m, k, device="cuda"), torch.tensor(0.01, device="cuda")
    for config in cutlass_configs:

        def gemm(config=config):
            return int8_gemm.int8_linear(
                static_x, w_q, static_scale, w_scale, bias, torch.float16, kernel=CUTLASS_PREFIX + config
            )

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            gemm()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = gemm()
        for _ in range(2):
            static_x.copy_(rand_int8(m, k, device="cuda"))
            static_scale.fill_(float(torch.rand(())) * 0.01 + 1e-3)
            graph.replay()
            torch.cuda.synchronize()
            product = int8_gemm.int8_linear_reference(static_x, w_q, static_scale, w_scale, None, torch.float32)
            assert cutlass_mismatches(out, product, bias, torch.float16) is None, config


@pytest.mark.gpu
@needs_hopper
def test_a_dependent_launch_reads_what_the_gemm_before_it_wrote(cutlass_configs):
    """Programmatic dependent launch: each GEMM may start while the one before it ends (that one lets it start as
    its mainloop ends, before its epilogue stores), so the second must wait for the first's output before reading
    it. A chain of two GEMMs, the second reading the first's fp16 output as int8 bytes, back to back on one stream
    and replayed from a CUDA graph, gives what the second gives on the finished output."""
    from sdxl_core import settings

    lib = gemm8_cutlass._library("int8")
    assert lib.sdxl_gemm8_set_pdl(1) == 1  # SDXL_BENCH_PDL=1
    m, k, n = 2048, 1280, 640
    g = torch.Generator(device="cuda").manual_seed(5)
    x_q, w1 = rand_int8(m, k, device="cuda", generator=g), rand_int8(n, k, device="cuda", generator=g)
    w2 = rand_int8(k, 2 * n, device="cuda", generator=g)  # the second GEMM: [m, 2n] int8 -> [m, k]
    a_scale, w_scale = torch.tensor([1e-3], device="cuda"), torch.full((n,), 1e-2, device="cuda")
    w2_scale = torch.full((k,), 1e-2, device="cuda")
    first = torch.empty(m, n, dtype=torch.float16, device="cuda")

    def chain(config):
        gemm8_cutlass.launch(x_q, w1, first, a_scale, w_scale, None, "coop_128x160x128")
        out = torch.empty(m, k, dtype=torch.float16, device="cuda")
        return gemm8_cutlass.launch(first.view(torch.int8), w2, out, a_scale, w2_scale, None, config)

    failures = []
    for config in cutlass_configs:
        first.fill_(0)
        back_to_back = chain(config)
        torch.cuda.synchronize()
        settled = gemm8_cutlass.launch(
            first.view(torch.int8), w2, torch.empty_like(back_to_back), a_scale, w2_scale, None, config
        )
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            replayed = chain(config)
        first.fill_(0)
        graph.replay()
        torch.cuda.synchronize()
        for what, got in (("back to back", back_to_back), ("graph replay", replayed)):
            if not torch.equal(got, settled):
                failures.append(f"{config} {what}: {(got != settled).sum().item()} of {got.numel()} elements differ")
    lib.sdxl_gemm8_set_pdl(int(settings.pdl()))
    assert not failures, "\n".join(failures)
