"""The 8-bit CUTLASS conv (`sdxl_core.quant.kernels.conv_cutlass`, `csrc/conv_sm90.cu`).

CPU: the float64 reference against `F.conv2d` on dequantized values, the SDXL shape table against the diffusers
model, clean refusals without a GPU or library, and (slow) the nvcc build plus the library's host-side checks.
GPU (Hopper only): every config against the reference on ragged shapes and on every SDXL shape, with the output
poisoned first, and a CUDA-graph capture + replay.

Tolerances, against the exact float64 result `ref` before rounding to the output dtype:
- INT8: the int32 sum is exact, the epilogue is float32 (acc to float, a_scale * w_scale, one fma) and one
  rounding to fp16/bf16, so |out - ref| <= eps_out * |ref| + 2**-20 * max|ref| + 2**-24 (one output ulp, plus
  float32 rounding where the bias cancels the product, plus fp16's subnormal spacing).
- FP8: `conv_cutlass.fp8_error_bound(C)` on the relative Frobenius error (Hopper's FP8 MMA accumulates with about
  13 mantissa bits: about 1 % at C=320, 9 % at C=2560, far tighter for the `f32acc` config), and per element
  |out - ref| <= bound * (|ref| + 4 * rms(ref)) + eps_out * |ref|, which still catches any wrong or unwritten element.
"""

from __future__ import annotations

import ctypes

import pytest
import torch
import torch.nn.functional as F

from sdxl_core.quant.kernels import conv_cutlass as cc
from sdxl_core.quant.kernels.cuda_build import KernelUnavailable

HOPPER = cc.is_hopper()
hopper = pytest.mark.skipif(not HOPPER, reason="needs a CUDA Hopper GPU (sm_90)")

# (N, H, W, C, K, R, S, stride, padding): ragged spatial sizes, partial M and N tiles, strides 1 and 2.
RAGGED = [
    (1, 7, 9, 16, 16, 3, 3, 1, 1),
    (2, 13, 11, 48, 80, 3, 3, 1, 1),
    (1, 17, 19, 32, 144, 3, 3, 2, 1),
    (3, 5, 33, 16, 32, 3, 3, 2, 1),
    (2, 9, 8, 64, 48, 3, 3, 1, 0),
    (1, 10, 12, 320, 64, 3, 3, 2, 1),
    (2, 6, 7, 32, 16, 1, 1, 1, 0),
]


def random_8bit(shape, fmt, generator=None, device="cpu"):
    """Uniform int8 over the full range, or e4m3 values from a normal draw (all magnitudes, both signs)."""
    if fmt == "int8":
        return torch.randint(-128, 128, shape, dtype=torch.int8, generator=generator).to(device)
    return (torch.randn(shape, generator=generator) * 64).clamp(-448, 448).to(torch.float8_e4m3fn).to(device)


def make_problem(n, h, w, c, k, r, s, fmt, *, bias=True, bias_dtype=torch.float16, device="cpu", seed=0):
    """x_q [N, C, H, W] channels_last, w [K, R, S, C], a_scale scalar, w_scale [K], bias [K] or None."""
    g = torch.Generator().manual_seed(seed)
    x = random_8bit((n, h, w, c), fmt, g).permute(0, 3, 1, 2).to(device)  # NHWC storage = channels_last
    wq = random_8bit((k, r, s, c), fmt, g).to(device)
    a_scale = (torch.rand((), generator=g) * 0.02 + 0.01).to(device)
    w_scale = (torch.rand(k, generator=g) * 0.02 + 0.005).to(device)
    b = (torch.randn(k, generator=g) * 4).to(bias_dtype).to(device) if bias else None
    return x, wq, a_scale, w_scale, b


def dequantized_conv(x_q, w_krsc, a_scale, w_scale, bias, stride, padding):
    """What the conv means: dequantize both operands (float64), then a plain float conv."""
    x = x_q.double() * a_scale.double()
    w = w_krsc.double().permute(0, 3, 1, 2) * w_scale.double().reshape(-1, 1, 1, 1)
    return F.conv2d(x, w, None if bias is None else bias.double(), stride, padding)


def int8_tolerance(ref, out_dtype):
    return torch.finfo(out_dtype).eps * ref.abs() + 2.0**-20 * ref.abs().max() + 2.0**-24


def check_close(out, ref, fmt, out_dtype, c, r, s, promoted=False, what=""):
    """Asserts the kernel output `out` matches the exact `ref` (float64) within the module docstring's bounds."""
    assert out.dtype == out_dtype and out.shape == ref.shape, what
    assert out.is_contiguous(memory_format=torch.channels_last), what
    assert not out.isnan().any(), f"{what}: unwritten (NaN-poisoned) elements remain"
    err = (out.double() - ref).abs()
    if fmt == "int8":
        bad = err > int8_tolerance(ref, out_dtype)
        assert not bad.any(), f"{what}: {int(bad.sum())} elements off, max error {err.max().item():.3g}"
        return
    bound = cc.fp8_error_bound(c, r, s, promoted)
    rel = (err.norm() / ref.norm()).item()
    assert rel <= bound, f"{what}: relative error {rel:.3g} > bound {bound:.3g}"
    rms = ref.pow(2).mean().sqrt()
    bad = err > bound * (ref.abs() + 4 * rms) + torch.finfo(out_dtype).eps * ref.abs()
    assert not bad.any(), f"{what}: {int(bad.sum())} elements off, max error {err.max().item():.3g}"


# ----------------------------------------------------------------------------------------------- CPU: reference


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("shape", RAGGED, ids=lambda t: "x".join(map(str, t)))
def test_reference_is_the_dequantized_conv(fmt, shape):
    n, h, w, c, k, r, s, stride, padding = shape
    x, wq, a, ws, b = make_problem(n, h, w, c, k, r, s, fmt, bias_dtype=torch.float64)
    ref = cc.conv2d_reference(x, wq, a, ws, b, stride, padding, out_dtype=torch.float64)
    expect = dequantized_conv(x, wq, a, ws, b, stride, padding)
    p, q = cc.output_hw(h, w, r, s, stride, padding)
    assert ref.shape == (n, k, p, q)
    torch.testing.assert_close(ref, expect, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
def test_reference_rounds_once_to_the_output_dtype(out_dtype):
    x, wq, a, ws, b = make_problem(2, 9, 7, 32, 48, 3, 3, "int8", bias_dtype=out_dtype)
    exact = cc.conv2d_reference(x, wq, a, ws, b, 1, 1, out_dtype=torch.float64)
    rounded = cc.conv2d_reference(x, wq, a, ws, b, 1, 1, out_dtype=out_dtype)
    assert rounded.dtype == out_dtype
    assert torch.equal(rounded, exact.to(out_dtype))


def im2col_int64(x_q, w_krsc, stride, padding):
    """Integer conv by unfold + int64 matmul: the exact sums, with no floating point anywhere."""
    n, c, h, w = x_q.shape
    k, r, s, _ = w_krsc.shape
    cols = F.unfold(x_q.double(), (r, s), padding=padding, stride=stride).round().long()  # [N, C*R*S, L]
    wmat = w_krsc.permute(0, 3, 1, 2).reshape(k, -1).long()  # [K, C*R*S], same (c, r, s) order as unfold
    p, q = cc.output_hw(h, w, r, s, stride, padding)
    return torch.einsum("kj,njl->nkl", wmat, cols).reshape(n, k, p, q)


@pytest.mark.parametrize("c", [64, 2560])
def test_int8_reference_sums_are_exact(c):
    """Extreme int8 values (the largest sums SDXL can produce at C=2560) against integer arithmetic."""
    g = torch.Generator().manual_seed(1)
    x = torch.where(torch.rand(1, c, 4, 5, generator=g) < 0.9, -128, 127).to(torch.int8)
    wq = torch.where(torch.rand(3, 3, 3, c, generator=g) < 0.9, -128, 127).to(torch.int8)
    one = torch.ones(())
    ref = cc.conv2d_reference(x, wq, one, torch.ones(3), None, 1, 1, out_dtype=torch.float64)
    exact = im2col_int64(x, wq, 1, 1)
    if c == 2560:
        assert exact.abs().max() > 2**24  # beyond float32's exact integers
    assert torch.equal(ref, exact.double())


def test_sdxl_shape_table_matches_the_unet():
    pytest.importorskip("diffusers")
    from sdxl_core.models import SDXL_UNET_CONFIG

    derived = cc.unet_conv3x3_shapes(SDXL_UNET_CONFIG, batch=2, latent=128)
    assert derived == list(cc.SDXL_CONV3X3)
    assert sum(t[-1] for t in derived) == 38
    assert all(cc.unsupported_reason((n, c, h, w), (k, 3, 3, c), st, 1) is None for n, h, w, c, k, st, _ in derived)


# ------------------------------------------------------------------------------------ CPU: refusing cleanly


def test_unsupported_reasons_name_the_rule():
    assert "multiples of 16" in cc.unsupported_reason((1, 24, 8, 8), (32, 3, 3, 24))
    assert "multiples of 16" in cc.unsupported_reason((1, 32, 8, 8), (40, 3, 3, 32))
    assert "groups" in cc.unsupported_reason((1, 32, 8, 8), (32, 3, 3, 32), groups=2)
    assert "dilation" in cc.unsupported_reason((1, 32, 8, 8), (32, 3, 3, 32), dilation=2)
    assert "C=16" in cc.unsupported_reason((1, 32, 8, 8), (32, 3, 3, 16))
    assert "im2col" in cc.unsupported_reason((1, 32, 8, 8), (32, 3, 3, 32), 1, 129)
    assert cc.unsupported_reason((2, 320, 128, 128), (320, 3, 3, 320), 2, 1) is None


def test_conv2d_refuses_bad_tensors_before_any_launch():
    x, wq, a, ws, b = make_problem(1, 8, 8, 32, 32, 3, 3, "int8")
    with pytest.raises(cc.ConvUnsupported, match="channels_last"):
        cc.conv2d(x.contiguous(), wq, a, ws, b)
    with pytest.raises(cc.ConvUnsupported, match="dtype"):
        cc.conv2d(x, wq.to(torch.float8_e4m3fn), a, ws, b)
    with pytest.raises(cc.ConvUnsupported, match="int8 or float8"):
        cc.conv2d(x.float(), wq, a, ws, b)
    with pytest.raises(cc.ConvUnsupported, match="a_scale"):
        cc.conv2d(x, wq, a.double(), ws, b)
    with pytest.raises(cc.ConvUnsupported, match="float16 or bfloat16"):
        cc.conv2d(x, wq, a, ws, b, out_dtype=torch.float32)
    x24, w24, *_ = make_problem(1, 8, 8, 24, 32, 3, 3, "int8")
    with pytest.raises(cc.ConvUnsupported, match="multiples of 16"):
        cc.conv2d(x24, w24, a, ws, b)


@pytest.mark.skipif(HOPPER, reason="checks the refusal on a machine without a Hopper GPU")
def test_conv2d_without_a_hopper_gpu_is_unavailable():
    x, wq, a, ws, b = make_problem(1, 8, 8, 32, 32, 3, 3, "fp8")
    assert not cc.available()
    assert "Hopper" in cc.unavailable_reason()
    with pytest.raises(KernelUnavailable, match="Hopper"):
        cc.conv2d(x, wq, a, ws, b)


def test_missing_library_is_reported_not_raised(monkeypatch):
    from sdxl_core.quant.kernels import cuda_build

    def no_library(name, **kwargs):
        raise KernelUnavailable("nvcc not found (set CUDA_HOME or put nvcc on PATH)")

    monkeypatch.setattr(cuda_build, "library", no_library)
    monkeypatch.setattr(cc, "is_hopper", lambda device=None: True)
    cc.library.cache_clear()
    try:
        assert cc.available() is False
        assert cc.unavailable_reason() == "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
        with pytest.raises(KernelUnavailable, match="nvcc"):
            cc.configs("int8")
    finally:
        cc.library.cache_clear()


def test_weight_krsc_and_output_size():
    w = torch.arange(2 * 3 * 3 * 5).reshape(2, 5, 3, 3)  # [K, C, R, S]
    krsc = cc.weight_krsc(w)
    assert krsc.shape == (2, 3, 3, 5) and krsc.is_contiguous()
    assert krsc[1, 2, 0, 4] == w[1, 4, 2, 0]
    assert cc.output_hw(128, 128, 3, 3, 2, 1) == (64, 64)
    assert cc.output_hw(17, 19, 3, 3, 2, 1) == (9, 10)
    with pytest.raises(ValueError, match="unknown 8-bit format"):
        cc._fmt("int4")


# ------------------------------------------------------------------------------- CPU: build + host-side checks


def _toolchain_reason() -> str | None:
    from sdxl_core.quant.kernels import cuda_build

    try:
        cuda_build.nvcc()
    except KernelUnavailable:
        return "needs nvcc (CUDA toolkit) to compile the CUTLASS conv"
    try:
        cuda_build.cutlass_include()
    except KernelUnavailable:
        return "needs the CUTLASS headers (pip install nvidia-cutlass) to compile the conv"
    return None


@pytest.fixture(scope="module")
def built():
    """The compiled library (minutes the first time, then from the kernel cache)."""
    reason = _toolchain_reason()
    if reason:
        pytest.skip(reason)
    return cc.library()


@pytest.mark.slow
def test_library_builds_and_lists_its_configs(built):
    int8, fp8 = cc.configs("int8"), cc.configs("fp8")
    assert len(int8) >= 4 and fp8[: len(int8)] == int8
    assert [name for name in fp8 if "f32acc" in name] == fp8[len(int8) :]
    assert built.sdxl_conv8_num_configs(7) == 0 and built.sdxl_conv8_config_name(0, 99) is None
    assert all(built.sdxl_conv8_workspace(f, 2, 128, 128, 320, 320, 3, 3, 1, 1, 1, 1, 0, 0) == 0 for f in (0, 1))


@pytest.mark.slow
def test_library_accepts_every_sdxl_shape_with_every_config(built):
    """The library's checks, CUTLASS's can_implement included (TMA alignment, im2col corners and offsets), pass
    for every SDXL shape, config and output dtype; no CUDA call is made."""
    refused = []
    for fmt in ("int8", "fp8"):
        for config in range(len(cc.configs(fmt))):
            for out_dtype in cc.OUT_DTYPES:
                for n, h, w, c, k, stride, _ in cc.SDXL_CONV3X3:
                    reason = cc.library_refusal(fmt, (n, c, h, w), (k, 3, 3, c), stride, 1, out_dtype, config)
                    if reason:
                        refused.append((fmt, config, (n, h, w, c, k, stride), reason))
    assert not refused, refused[:5]
    for shape in RAGGED:
        n, h, w, c, k, r, s, stride, padding = shape
        assert cc.library_refusal("fp8", (n, c, h, w), (k, r, s, c), stride, padding) is None, shape


@pytest.mark.slow
def test_python_rules_agree_with_the_library(built):
    """`unsupported_reason` (no library needed) refuses exactly what the library's checks refuse."""
    for c, k in ((16, 16), (24, 32), (32, 40), (64, 48)):
        for r in (1, 3, 5, 131, 200):
            for padding in (0, 1, 2, 64, 128, 129, 200):
                for stride in (1, 2, 8, 9):
                    x, w = (1, c, 40, 40), (k, r, r, c)
                    python = cc.unsupported_reason(x, w, stride, padding)
                    library = cc.library_refusal("int8", x, w, stride, padding)
                    assert (python is None) == (library is None), (x, w, stride, padding, python, library)


@pytest.mark.slow
def test_library_refuses_in_one_line_before_any_cuda_call(built):
    assert "multiples of 16" in cc.library_refusal("int8", (1, 24, 8, 8), (32, 3, 3, 24))
    assert "multiples of 16" in cc.library_refusal("fp8", (1, 32, 8, 8), (40, 3, 3, 32))
    assert "invalid conv shape" in cc.library_refusal("int8", (1, 32, 2, 2), (32, 5, 5, 32), 1, 0)
    assert "unknown config" in cc.library_refusal("int8", (1, 32, 8, 8), (32, 3, 3, 32), config=99)
    fp8_only = len(cc.configs("int8"))  # the promoted-accumulation config does not exist for INT8
    assert "unknown config" in cc.library_refusal("int8", (1, 32, 8, 8), (32, 3, 3, 32), config=fp8_only)
    assert built.sdxl_conv8_check(5, 1, 8, 8, 32, 32, 3, 3, 1, 1, 1, 1, 0, 0) != 0
    assert "unknown format" in built.sdxl_conv8_last_error().decode()
    # fake pointers: both refusals happen before the first CUDA call, so this is safe on any machine
    odd = ctypes.c_void_p(0x100008)
    status = built.sdxl_conv8_fprop(
        0, odd, odd, odd, odd, odd, None, 1, 8, 8, 32, 32, 3, 3, 1, 1, 1, 1, 0, 0, None, 0, None
    )
    assert status == cc.UNSUPPORTED and "16-byte aligned" in built.sdxl_conv8_last_error().decode()
    status = built.sdxl_conv8_fprop(
        0, None, odd, odd, odd, odd, None, 1, 8, 8, 32, 32, 3, 3, 1, 1, 1, 1, 0, 0, None, 0, None
    )
    assert status == 1 and "null tensor pointer" in built.sdxl_conv8_last_error().decode()
    messages = [cc.library_refusal("int8", (1, 24, 8, 8), (32, 3, 3, 24)), built.sdxl_conv8_last_error().decode()]
    assert all("\n" not in m for m in messages)
    assert built.sdxl_conv8_set_pdl(7) == 1 and built.sdxl_conv8_set_pdl(0) == 0  # dependent launch on, off again


# ------------------------------------------------------------------------------------------------------- GPU


@pytest.fixture(scope="module")
def gpu_library():
    try:
        return cc.library()
    except KernelUnavailable as err:  # a Hopper host that cannot build or load the library is a failure
        pytest.fail(f"the CUTLASS conv library is unavailable on this Hopper GPU: {err}")


def _run_all_configs(fmt, shape, out_dtype, bias, seed=0):
    n, h, w, c, k, r, s, stride, padding = shape
    x, wq, a, ws, b = make_problem(n, h, w, c, k, r, s, fmt, bias=bias, bias_dtype=out_dtype, device="cuda", seed=seed)
    ref = cc.conv2d_reference(x, wq, a, ws, b, stride, padding, out_dtype=torch.float64)
    p, q = cc.output_hw(h, w, r, s, stride, padding)
    failures = []
    for config, name in enumerate(cc.configs(fmt)):
        out = torch.empty((n, k, p, q), dtype=out_dtype, device="cuda", memory_format=torch.channels_last).fill_(
            float("nan")
        )
        try:
            got = cc.conv2d(x, wq, a, ws, b, stride, padding, out_dtype, config, out=out)
            torch.cuda.synchronize()
            assert got is out
            check_close(out, ref, fmt, out_dtype, c, r, s, promoted="f32acc" in name, what=f"{fmt} {name} {shape}")
        except AssertionError as err:
            failures.append(str(err).splitlines()[0])
    assert not failures, "\n".join(failures)


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", RAGGED, ids=lambda t: "x".join(map(str, t)))
def test_every_config_on_ragged_shapes(gpu_library, fmt, out_dtype, shape):
    _run_all_configs(fmt, shape, out_dtype, bias=shape[0] != 1)


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("shape", cc.SDXL_CONV3X3, ids=lambda t: "N{}_H{}_C{}_K{}_s{}".format(*t[:2], *t[3:6]))
def test_every_config_on_every_sdxl_shape(gpu_library, fmt, shape):
    n, h, w, c, k, stride, _ = shape
    _run_all_configs(fmt, (n, h, w, c, k, 3, 3, stride, 1), torch.float16, bias=True)


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_cuda_graph_capture_and_replay_reads_new_inputs_and_scales(gpu_library, fmt):
    n, h, w, c, k = 2, 24, 20, 64, 96
    x, wq, a, ws, b = make_problem(n, h, w, c, k, 3, 3, fmt, device="cuda", seed=3)
    for config in range(len(cc.configs(fmt))):
        cc.prepare(fmt, torch.float16, config)  # the one-time setup, outside capture; no launch before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        with torch.cuda.graph(graph, stream=stream):
            outs = [cc.conv2d(x, wq, a, ws, b, 1, 1, torch.float16, config) for config in range(len(cc.configs(fmt)))]
    x2, _, a2, *_ = make_problem(n, h, w, c, k, 3, 3, fmt, device="cuda", seed=4)
    x.copy_(x2)
    a.copy_(a2)  # a_scale is read by the kernel on every replay
    for out in outs:
        out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    ref = cc.conv2d_reference(x, wq, a, ws, b, 1, 1, out_dtype=torch.float64)
    for config, (out, name) in enumerate(zip(outs, cc.configs(fmt), strict=True)):
        check_close(out, ref, fmt, torch.float16, c, 3, 3, promoted="f32acc" in name, what=f"graph {fmt} {config}")


@pytest.mark.gpu
@hopper
def test_gpu_refusals_carry_the_library_message(gpu_library):
    x, wq, a, ws, b = make_problem(1, 8, 8, 32, 32, 3, 3, "int8", device="cuda")
    with pytest.raises(RuntimeError, match="unknown config"):
        cc.conv2d(x, wq, a, ws, b, config=99)
    with pytest.raises(cc.ConvUnsupported, match="aligned"):
        flat = torch.empty(8 + x.numel(), dtype=torch.int8, device="cuda")[8:]
        cc.conv2d(flat.view(1, 8, 8, 32).permute(0, 3, 1, 2), wq, a, ws, b)
    x24, w24, *_ = make_problem(1, 8, 8, 24, 32, 3, 3, "int8", device="cuda")
    with pytest.raises(cc.ConvUnsupported, match="multiples of 16"):
        cc.conv2d(x24, w24, a, ws, b)
    # per-tensor FP8 weight scale (expanded to [K]) and a bias of another dtype (cast) are accepted
    x8, w8, a8, _, b8 = make_problem(1, 8, 8, 32, 32, 3, 3, "fp8", device="cuda", bias_dtype=torch.float32)
    scalar = torch.tensor(0.01, device="cuda")
    out = cc.conv2d(x8, w8, a8, scalar, b8, out_dtype=torch.bfloat16)
    ref = cc.conv2d_reference(x8, w8, a8, scalar, b8, 1, 1, out_dtype=torch.float64)
    check_close(out, ref, "fp8", torch.bfloat16, 32, 3, 3)


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_an_8bit_conv_layer_on_the_cutlass_kernel_matches_its_emulation(gpu_library, fmt):
    """What the engine runs: a converted 3x3 conv layer switched to each CUTLASS config (as the dispatch does) gives
    the emulated 8-bit conv's result (the same quantized values) eagerly and under torch.compile."""
    from sdxl_core.quant import qmodules

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(320, 640, 3, padding=1).cuda().half()
    cls = qmodules.Int8Conv2d if fmt == "int8" else qmodules.Fp8Conv2d
    w_amax = conv.weight.detach().float().abs().amax(dim=(1, 2, 3) if fmt == "int8" else None)
    layer = cls.from_float(conv, w_amax=w_amax, a_amax=torch.tensor(4.0, device="cuda")).eval()
    x = torch.randn(2, 320, 64, 64, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        emulated = layer(x).float()
        for name in cc.configs(fmt):
            layer.set_gemm_path("8bit", torch.float16, kernel=qmodules.CUTLASS + name)
            assert layer.runs_cutlass_conv and layer.w_dq is None and layer.w_krsc.is_contiguous()
            out = layer(x)
            assert out.is_contiguous(memory_format=torch.channels_last)
            err = ((out.float() - emulated).norm() / emulated.norm()).item()
            assert err < (2e-3 if fmt == "int8" or "f32acc" in name else 3e-2), (name, err)
        torch._dynamo.reset()
        compiled = torch.compile(layer, fullgraph=True)
        torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)
