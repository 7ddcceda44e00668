"""Runs the Triton INT8 kernels in the Triton interpreter on CPU and checks them against the torch reference.

Needs TRITON_INTERPRET=1 or SDXL_BENCH_TRITON_ON_CPU=1 in the environment before it starts, which is why
tests/unit/test_kernels.py runs it in a subprocess.
Usage: python tests/support/interp_check.py [unfused] [fused] [tma]  (all by default)
Prints "OK <n> cases" and exits 0, or fails with an AssertionError.
"""

import functools
import sys

import torch

from sdxl_core.quant.kernels import int8_gemm as g
from sdxl_core.quant.kernels import int8_tma

# (M, K, N): ragged against the interpreter's 32x32x32 tile in every dimension, plus single-tile shapes.
SHAPES = [(5, 32, 8), (17, 48, 24), (40, 96, 72), (33, 72, 40), (1, 40, 16), (32, 64, 32), (23, 56, 65)]
# The TMA kernel needs K % 16 == 0 (16-byte int8 rows); M, N and K stay ragged against the 32x32x32 tile.
TMA_SHAPES = [(5, 32, 8), (17, 48, 24), (40, 96, 72), (33, 80, 40), (1, 16, 16), (32, 64, 32), (23, 112, 65)]


def rand_int8(*shape):
    return torch.randint(-128, 128, shape, dtype=torch.int8)


def exact_int32(x_q, w_q):
    return x_q.to(torch.int32) @ w_q.to(torch.int32).T


def assert_close(out, ref, rtol):
    err = ((out.double() - ref.double()).norm() / ref.double().norm().clamp(min=1e-30)).item()
    assert err <= rtol, f"relative error {err:.3g} > {rtol}"


def check_unfused(m, k, n, kernel="pointer"):
    linear = functools.partial(g.int8_linear, kernel=kernel)
    x_q, w_q = rand_int8(m, k), rand_int8(n, k)
    # Unit scales, float32 out: the output is the int32 product itself (exact below 2**24).
    out = linear(x_q, w_q, 1.0, torch.ones(n), out_dtype=torch.float32)
    assert torch.equal(out, exact_int32(x_q, w_q).float()), "integer product differs"

    a_scale = torch.rand(()) * 0.1 + 1e-3
    w_scale = torch.rand(n) * 0.02 + 1e-4
    bias = torch.randn(n)
    out = linear(x_q, w_q, a_scale, w_scale, bias, out_dtype=torch.float32)
    ref = g.int8_linear_reference(x_q, w_q, a_scale, w_scale, bias, out_dtype=torch.float32)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    # Dividing the scale back out recovers the integer product exactly (the scaling rounds only once).
    out = linear(x_q, w_q, a_scale, w_scale, out_dtype=torch.float32)
    recovered = torch.round(out.double() / (a_scale * w_scale).double())
    assert torch.equal(recovered, exact_int32(x_q, w_q).double()), "scaled integer product differs"

    out16 = linear(x_q, w_q, a_scale, w_scale, bias, out_dtype=torch.float16)
    assert out16.dtype == torch.float16
    assert_close(out16, ref, 1e-3)
    # Leading dims and a strided (non-contiguous) activation.
    x3 = rand_int8(2, m, 2 * k)[..., ::2]
    out3 = linear(x3, w_q, a_scale, w_scale, bias, out_dtype=torch.float32)
    ref3 = g.int8_linear_reference(x3, w_q, a_scale, w_scale, bias, out_dtype=torch.float32)
    assert out3.shape == (2, m, n)
    torch.testing.assert_close(out3, ref3, rtol=1e-5, atol=1e-6)


def check_fused(m, k, n):
    w_q = rand_int8(n, k)
    x = torch.randn(m, k) * 4
    a_scale = x.abs().amax() / 127
    x[0, 0] = 1e4  # far outside the int8 range: must clamp to 127
    x[-1, -1] = -1e4
    x_q = g.quantize_per_tensor(x, a_scale)
    assert (x_q == 127).any() and (x_q == -128).any()

    # w_scale = 1, no bias: out = float(acc) * a_scale, rounded once, so it must match bit for bit.
    out = g.int8_linear_fused(x, w_q, a_scale, torch.ones(n))
    ref = g.int8_linear_reference(x_q, w_q, a_scale, torch.ones(n), out_dtype=torch.float32)
    assert torch.equal(out, ref), "fused quantization or integer product differs"
    recovered = torch.round(out.double() / a_scale.double())
    assert torch.equal(recovered, exact_int32(x_q, w_q).double())

    # Exact .5 ties: scale 0.25 and x on a 0.125 grid make x / scale land on halves; half-to-even must win.
    x_tie = torch.randint(-260, 261, (m, k)).float() * 0.125
    x_tie_q = g.quantize_per_tensor(x_tie, 0.25)
    out = g.int8_linear_fused(x_tie, w_q, 0.25, torch.ones(n))
    assert torch.equal(out, exact_int32(x_tie_q, w_q).float() * 0.25), "round-half-even differs"

    w_scale = torch.rand(n) * 0.02 + 1e-4
    bias = torch.randn(n)
    out = g.int8_linear_fused(x, w_q, a_scale, w_scale, bias)
    ref = g.int8_linear_reference(x_q, w_q, a_scale, w_scale, bias, out_dtype=torch.float32)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)

    x16 = x.half()
    out16 = g.int8_linear_fused(x16, w_q, a_scale, w_scale, bias)
    ref16 = g.int8_linear_reference(g.quantize_per_tensor(x16, a_scale), w_q, a_scale, w_scale, bias, torch.float32)
    assert out16.dtype == torch.float16
    assert_close(out16, ref16, 1e-3)


def check_tma(m, k, n):
    """The unfused checks, forced onto the persistent TMA kernel; asserts that it really ran."""
    launches = []
    launch = int8_tma.launch
    int8_tma.launch = lambda *args, **kwargs: launches.append(1) or launch(*args, **kwargs)
    try:
        check_unfused(m, k, n, kernel="tma")
    finally:
        int8_tma.launch = launch
    assert launches, "the TMA kernel did not run"


def main(modes):
    assert g._INTERPRET, "the Triton interpreter is not enabled; the torch reference would be tested instead"
    torch.manual_seed(1234)
    checks = {"unfused": (check_unfused, SHAPES), "fused": (check_fused, SHAPES), "tma": (check_tma, TMA_SHAPES)}
    cases = 0
    for mode in modes:
        check, shapes = checks[mode]
        for shape in shapes:
            try:
                check(*shape)
            except AssertionError as err:
                raise AssertionError(f"{mode} M,K,N={shape}: {err}") from err
            cases += 1
    print(f"OK {cases} cases")


if __name__ == "__main__":
    main(sys.argv[1:] or ["unfused", "fused", "tma"])
