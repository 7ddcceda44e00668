"""Runs the GEGLU activation kernel with the quantizing epilogue (`kernels.geglu_act8`) in the Triton interpreter on
CPU against float64 GEGLU, and both its outputs against the unfused arithmetic: the gelu and the product in float32 as
Inductor computes them on the GPU (x / 2 * (1 + erf(x / sqrt 2)), nothing rounded before the output), rounded to
fp16 or quantized.

Needs SDXL_BENCH_TRITON_ON_CPU=1 (or TRITON_INTERPRET=1) before it starts, which is why
tests/unit/test_geglu_act8.py runs it in a subprocess. Prints "OK <n> cases" and exits 0, or fails with an
AssertionError naming the case.
"""

import itertools
import math

import torch

from sdxl_core.quant.kernels import epilogue8, geglu_act8
from sdxl_core.quant.kernels.fp8_gemm import FP8_DTYPE
from sdxl_core.quant.kernels.int8_gemm import _INTERPRET

# (M, F): ragged against the interpreter's 4 x 16 tile in rows and columns, one row.
SHAPES = [(5, 40), (9, 24), (1, 16), (6, 80)]


def operands(m, f, strided, seed):
    g = torch.Generator().manual_seed(seed)
    wide = (torch.randn(m, 2 * f + (16 if strided else 0), generator=g) * 2).half()
    return wide[:, 8 : 8 + 2 * f] if strided else wide


def exact(h):
    f = h.shape[1] // 2
    value, gate = h[:, :f].double(), h[:, f:].double()
    return value * 0.5 * gate * (1 + torch.special.erf(gate / math.sqrt(2)))


def unfused(h, smooth, inv_scale, out_dtype):
    """`geglu_act8.geglu_reference`'s arithmetic with the float32 gelu of the GPU kernels."""
    f = h.shape[1] // 2
    gate = h[:, f:].float()
    y = h[:, :f].float() * (0.5 * gate * (1.0 + torch.special.erf(gate * 0.7071067811865476)))
    if out_dtype == torch.float16:
        return y.half()
    return epilogue8.quantize_output(y, smooth, inv_scale, out_dtype)


def case(shape, out_dtype, with_smooth, strided, seed):
    m, f = shape
    name = f"{out_dtype} M={m} F={f} smooth={with_smooth} strided={strided}"
    h = operands(m, f, strided, seed)
    assert geglu_act8.supports(h), name
    smooth = (torch.rand(f, generator=torch.Generator().manual_seed(seed)) + 0.5).half() if with_smooth else None
    qmax = 127.0 if out_dtype == torch.int8 else 448.0
    ref64 = exact(h)
    inv_scale = torch.tensor(qmax / (0.8 * float(ref64.abs().max())), dtype=torch.float32)  # clamps the largest few
    got = geglu_act8.geglu_act8(h, smooth, inv_scale, out_dtype)
    assert got.dtype == out_dtype and got.shape == (m, f), name
    y16 = got if out_dtype == torch.float16 else geglu_act8.geglu_act8(h, None, None, torch.float16)
    # Within fp16 rounding of the exact GEGLU (erf in float32 rounds far below that), and the unfused GEGLU bit for
    # bit but where the two erfs round a product to neighbouring fp16 values.
    err = ((y16.double() - ref64).abs() / (ref64.abs() + 1e-2)).max()
    assert err < 1.5e-3, f"{name}: relative error {float(err):.2e}"
    differ16 = int((y16 != unfused(h, None, None, torch.float16)).sum())
    assert differ16 <= max(1, y16.numel() // 100), f"{name}: {differ16} 16-bit outputs differ from the reference"
    if out_dtype == torch.float16:
        return
    # Against the unfused ops (the float32 product, then the quantization): the same arithmetic,
    # so the same values but where the erfs round apart.
    ref = unfused(h, smooth, inv_scale, out_dtype).float()
    assert int((ref != 0).sum()) > got.numel() // 2, name
    if out_dtype == torch.int8:
        assert float((got.float() - ref).abs().max()) <= 1, f"{name}: an output is more than one step off"
    else:
        near = (got.float() - ref).abs() <= ref.abs() * 2**-3 + 2**-9
        assert bool(near.all()), f"{name}: an output is more than one e4m3 step off the reference"
    differ = int((got.float() != ref).sum())
    assert differ <= max(1, got.numel() // 100), f"{name}: {differ} outputs differ from the reference"


def main():
    assert _INTERPRET, "set SDXL_BENCH_TRITON_ON_CPU=1 so the kernel runs in the Triton interpreter"
    cases = 0
    combos = itertools.product(SHAPES, (torch.int8, FP8_DTYPE, torch.float16), (True, False), (True, False))
    for seed, (shape, out_dtype, with_smooth, strided) in enumerate(combos):
        if out_dtype == torch.float16 and with_smooth:
            continue  # the 16-bit output is neither smoothed nor quantized
        case(shape, out_dtype, with_smooth, strided, seed)
        cases += 1
    print(f"OK {cases} cases")


if __name__ == "__main__":
    main()
