"""Runs the fused GEGLU kernel (`kernels.geglu8`) in the Triton interpreter on CPU against its torch reference.

Needs SDXL_BENCH_TRITON_ON_CPU=1 (or TRITON_INTERPRET=1) before it starts, which is why tests/unit/test_geglu.py
runs it in a subprocess. Prints "OK <n> cases" and exits 0, or fails with an AssertionError naming the case.
"""

import itertools

import torch

from sdxl_core.quant.kernels import geglu8
from sdxl_core.quant.kernels.fp8_gemm import quantize_fp8
from sdxl_core.quant.kernels.int8_gemm import _INTERPRET, quantize_per_tensor

# (M, K, F): ragged against the interpreter's 32 x 16 x 32 tile in M, F and K (K a multiple of 16 for TMA).
SHAPES = [(5, 32, 8), (33, 48, 24), (40, 96, 40), (1, 16, 16), (23, 80, 17)]


def grid_index(q: torch.Tensor) -> torch.Tensor:
    """Each 8-bit value's position among all values of its format, in order (so neighbours differ by 1)."""
    if q.dtype == torch.int8:
        return q.int()
    values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = torch.unique(values[~values.isnan()])  # sorted; +0 and -0 are one value
    return torch.searchsorted(grid, q.float())


def case(fmt, m, k, f, per_channel, with_bias, with_smooth, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(2 * f, k, generator=g)
    qmax = 127.0 if fmt == "int8" else 448.0
    a_scale = x.abs().amax() / qmax
    w_scale = (w.abs().amax(dim=1) if per_channel else w.abs().amax()) / qmax
    w_b = w_scale[:, None] if per_channel else w_scale
    if fmt == "int8":
        x_q, w_q = quantize_per_tensor(x, a_scale), torch.round(w / w_b).clamp(-128, 127).to(torch.int8)
    else:
        x_q, w_q = quantize_fp8(x, a_scale), quantize_fp8(w, w_b)
    bias = torch.randn(2 * f, generator=g).half() if with_bias else None
    smooth = (torch.rand(f, generator=g) + 0.5).half() if with_smooth else None
    # An output scale that leaves most values inside the range and clamps a few, so both paths are exercised.
    out_scale = torch.tensor(0.6 * (k**0.5) / qmax)
    got = geglu8.geglu8(x_q, w_q, a_scale, w_scale, bias, smooth, out_scale, torch.float16)
    ref = geglu8.geglu8_reference(x_q, w_q, a_scale, w_scale, bias, smooth, out_scale, torch.float16)
    name = f"{fmt} M={m} K={k} F={f} per_channel={per_channel} bias={with_bias} smooth={with_smooth}"
    assert got.dtype == ref.dtype == x_q.dtype and got.shape == (m, f), name
    # The interpreter's erf (Python's) and torch's differ in the last bit, and 1 + erf(g) cancels for negative
    # gates, so a value within ~1e-3 of a rounding boundary may land on the neighbouring 8-bit value: allow that,
    # rarely, and nothing else.
    differs = got.float() != ref.float()
    steps = (grid_index(got) - grid_index(ref)).abs()
    assert int(steps.max()) <= 1, f"{name}: an output is {int(steps.max())} steps off the reference"
    assert int(differs.sum()) <= max(1, got.numel() // 200), f"{name}: {int(differs.sum())} outputs differ"
    assert ref.float().abs().max() > 0, name


def main():
    assert _INTERPRET, "set SDXL_BENCH_TRITON_ON_CPU=1 so the kernel runs in the Triton interpreter"
    cases = 0
    for seed, (fmt, shape, flags) in enumerate(
        itertools.product(("int8", "fp8"), SHAPES, [(True, True, True), (False, False, False), (True, True, False)])
    ):
        per_channel, with_bias, with_smooth = flags
        case(fmt, *shape, per_channel and fmt == "int8", with_bias, with_smooth, seed)
        cases += 1
    print(f"OK {cases} cases")


if __name__ == "__main__":
    main()
