"""Runs the LayerNorm kernel with the quantizing epilogue (`kernels.layernorm8`), alone and with the residual add
before it, in the Triton interpreter on CPU against float64 LayerNorm, its epilogue against torch's quantization of
the kernel's own 16-bit output, and the 8-bit outputs against the unfused torch reference.

Needs SDXL_BENCH_TRITON_ON_CPU=1 (or TRITON_INTERPRET=1) before it starts, which is why tests/unit/test_layernorm8.py
runs it in a subprocess. Prints "OK <n> cases" and exits 0, or fails with an AssertionError naming the case.
"""

import itertools

import torch

from sdxl_core.quant.kernels import epilogue8, layernorm8
from sdxl_core.quant.kernels.fp8_gemm import FP8_DTYPE
from sdxl_core.quant.kernels.int8_gemm import _INTERPRET

# (M, C): ragged against the interpreter's 4-row programs and against the power-of-two row block (40, 77, 320, 1280
# channels), one row, and rows read from a wider tensor (row stride > C).
SHAPES = [(5, 40), (9, 77), (3, 320), (1, 16), (6, 1280)]


def operands(m, c, strided, seed):
    g = torch.Generator().manual_seed(seed)
    # An offset and a spread per row, as a residual stream has: the mean and variance both matter.
    wide = (torch.randn(m, c + 8 if strided else c, generator=g) * 3 + torch.randn(m, 1, generator=g) * 5).half()
    x = wide[:, 4 : 4 + c] if strided else wide
    weight = (torch.rand(c, generator=g) + 0.5).half()
    bias = (torch.randn(c, generator=g) * 0.1).half()
    return x, weight, bias


def exact(x, weight, bias, eps):
    x64 = x.double()
    mean = x64.mean(-1, keepdim=True)
    var = ((x64 - mean) ** 2).mean(-1, keepdim=True)
    return (x64 - mean) / (var + eps).sqrt() * weight.double() + bias.double()


def case(shape, out_dtype, with_smooth, strided, seed, residual, eps=1e-5):
    m, c = shape
    name = f"{out_dtype} M={m} C={c} smooth={with_smooth} strided={strided} residual={residual}"
    x, weight, bias = operands(m, c, strided, seed)
    assert layernorm8.supports(x, weight, bias), name
    if residual:  # the kernel adds a residual (read contiguous) first; the norm then sees the rounded sum
        r = operands(m, c, False, seed + 1000)[0]
        total, y = layernorm8.add_layernorm8(x, r, weight, bias, eps, None, None, torch.float16)
        assert torch.equal(total, x + r), f"{name}: the residual sum differs from torch's"
        assert torch.equal(y, layernorm8.layernorm8(total, weight, bias, eps, None, None, torch.float16)), name
        return check_norm(name, total, weight, bias, eps, out_dtype, with_smooth, seed, r=(x, r))
    return check_norm(name, x, weight, bias, eps, out_dtype, with_smooth, seed)


def check_norm(name, x, weight, bias, eps, out_dtype, with_smooth, seed, r=None):
    """The norm of x (with `r` = (addend, residual): the fused add's, whose sum is x) against the references."""
    m, c = x.shape

    def norm(smooth, inv_scale, out):
        if r is None:
            return layernorm8.layernorm8(x, weight, bias, eps, smooth, inv_scale, out)
        total, y = layernorm8.add_layernorm8(*r, weight, bias, eps, smooth, inv_scale, out)
        assert torch.equal(total, x), name
        return y

    smooth = (torch.rand(c, generator=torch.Generator().manual_seed(seed)) + 0.5).half() if with_smooth else None
    qmax = 127.0 if out_dtype == torch.int8 else 448.0
    ref16 = exact(x, weight, bias, eps)
    # An input scale that clamps the largest few outputs, so both paths of the quantization are exercised.
    inv_scale = torch.tensor(qmax / (0.8 * float(ref16.abs().max())), dtype=torch.float32)
    got = norm(smooth, inv_scale, out_dtype)
    assert got.dtype == out_dtype and got.shape == (m, c), name
    y16 = got if out_dtype == torch.float16 else norm(None, None, torch.float16)
    # Within fp16 rounding of the exact norm (float32 sums round too, far below that).
    err = ((y16.double() - ref16).abs() / (ref16.abs() + 1e-2)).max()
    assert err < 1.5e-3, f"{name}: relative error {float(err):.2e}"
    if out_dtype == torch.float16:
        return
    # The epilogue: exactly the next layer's smoothing and quantization of the kernel's own 16-bit output.
    own = epilogue8.quantize_output(y16, smooth, inv_scale, out_dtype)
    assert torch.equal(got.float(), own.float()), f"{name}: {int((got.float() != own.float()).sum())} outputs differ"
    assert int((own.float() != 0).sum()) > got.numel() // 2, name
    # Against the unfused engine (PyTorch's LayerNorm, then the quantization): its sums round in another order, so
    # an output within an fp16 ulp of a rounding boundary may land on the neighbouring value.
    ref = layernorm8.layernorm_reference(x, weight, bias, eps, smooth, inv_scale, out_dtype).float()
    if out_dtype == torch.int8:
        steps = (got.float() - ref).abs()
        assert float(steps.max()) <= 1, f"{name}: an output is {float(steps.max())} steps off the reference"
    else:
        near = (got.float() - ref).abs() <= ref.abs() * 2**-3 + 2**-9  # one e4m3 step
        assert bool(near.all()), f"{name}: an output is more than one e4m3 step off the reference"
    differ = int((got.float() != ref).sum())
    assert differ <= max(2, got.numel() // 50), f"{name}: {differ} outputs differ from the reference"


def main():
    assert _INTERPRET, "set SDXL_BENCH_TRITON_ON_CPU=1 so the kernel runs in the Triton interpreter"
    cases = 0
    outputs = (torch.int8, FP8_DTYPE, torch.float16)
    combos = itertools.product(SHAPES, outputs, (True, False), (True, False), (False, True))
    for seed, (shape, out_dtype, with_smooth, strided, residual) in enumerate(combos):
        if out_dtype == torch.float16 and with_smooth:
            continue  # the 16-bit output is neither smoothed nor quantized
        case(shape, out_dtype, with_smooth, strided, seed, residual)
        cases += 1
    print(f"OK {cases} cases")


if __name__ == "__main__":
    main()
