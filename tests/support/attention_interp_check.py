"""Runs the attention kernel with the quantizing epilogue (`kernels.attention8`) in the Triton interpreter on CPU
against float64 attention, its epilogue
against torch's quantization of the kernel's own 16-bit output, and INT8 against the unfused torch reference.

Needs SDXL_BENCH_TRITON_ON_CPU=1 (or TRITON_INTERPRET=1) before it starts, which is why tests/unit/test_attention8.py
runs it in a subprocess. Prints "OK <n> cases" and exits 0, or fails with an AssertionError naming the case.
"""

import itertools

import torch

from sdxl_core.quant.kernels import attention8
from sdxl_core.quant.kernels.fp8_gemm import FP8_DTYPE
from sdxl_core.quant.kernels.int8_gemm import _INTERPRET

# (B, Sq, Sk, H, D): ragged against the interpreter's 16 x 16 tile in queries and keys; 77 keys as SDXL's
# cross-attention has; one query; a single key.
SHAPES = [(2, 40, 77, 2, 16), (1, 17, 33, 3, 32), (2, 1, 5, 2, 16), (1, 23, 1, 1, 64), (2, 32, 32, 2, 16)]


def operands(b, sq, sk, h, d, cross, seed):
    """Q, K, V as the attention processors make them: views of the fused projections' outputs."""
    g = torch.Generator().manual_seed(seed)
    if cross:
        q = torch.randn(b, sq, h * d, generator=g).half().view(b, sq, h, d)
        kv = torch.randn(b, sk, 2 * h * d, generator=g).half()
        k, v = (t.view(b, sk, h, d) for t in kv.split(h * d, dim=-1))
    else:
        qkv = torch.randn(b, sq, 3 * h * d, generator=g).half()
        q, k, v = (t.view(b, sq, h, d) for t in qkv.split(h * d, dim=-1))
        k, v = k[:, :sk], v[:, :sk]
    return q, k, v


def exact(q, k, v) -> torch.Tensor:
    b, sq, h, d = q.shape
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / d**0.5
    o = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v.double())
    return o.reshape(b * sq, h * d)


def case(shape, out_dtype, with_smooth, cross, seed):
    b, sq, sk, h, d = shape
    name = f"{out_dtype} B={b} Sq={sq} Sk={sk} H={h} D={d} smooth={with_smooth} cross={cross}"
    q, k, v = operands(*shape, cross, seed)
    assert attention8.supports(q, k, v), name
    smooth = (torch.rand(h * d, generator=torch.Generator().manual_seed(seed)) + 0.5).half() if with_smooth else None
    qmax = 127.0 if out_dtype == torch.int8 else 448.0
    # An input scale that clamps the largest few outputs, so both paths of the quantization are exercised.
    inv_scale = torch.tensor(qmax / (0.8 * float(exact(q, k, v).abs().max())), dtype=torch.float32)
    got = attention8.attention8(q, k, v, smooth, inv_scale, out_dtype)
    assert got.dtype == out_dtype and got.shape == (b * sq, h * d), name
    # The attention: P is rounded to fp16 for P V, as in flash attention, so within a few fp16 ulps of the exact
    # output.
    o16 = got if out_dtype == torch.float16 else attention8.attention8(q, k, v, None, None, torch.float16)
    err = (o16.double() - exact(q, k, v)).abs().max() / exact(q, k, v).abs().max()
    assert err < 4e-3, f"{name}: relative error {float(err):.2e}"
    if out_dtype == torch.float16:
        return
    # The epilogue: exactly `to_out`'s smoothing and quantization of the kernel's own 16-bit output.
    own = attention8.quantize_output(o16, smooth, inv_scale, out_dtype)
    assert torch.equal(got.float(), own.float()), f"{name}: {int((got.float() != own.float()).sum())} outputs differ"
    assert int((own.float() != 0).sum()) > got.numel() // 2, name
    if out_dtype == torch.int8:
        # Against what the unfused engine computes (torch's SDPA, then the quantization): its float32 softmax rounds
        # differently, so an output within an fp16 ulp of a rounding boundary may land on the neighbouring value.
        ref = attention8.attention_reference(q, k, v, smooth, inv_scale, out_dtype)
        steps = (got.int() - ref.int()).abs()
        assert int(steps.max()) <= 1, f"{name}: an output is {int(steps.max())} steps off the reference"
        assert int((steps > 0).sum()) <= max(2, got.numel() // 50), f"{name}: {int((steps > 0).sum())} differ"


def main():
    assert _INTERPRET, "set SDXL_BENCH_TRITON_ON_CPU=1 so the kernel runs in the Triton interpreter"
    cases = 0
    combos = itertools.product(SHAPES, (torch.int8, FP8_DTYPE, torch.float16), (True, False), (True, False))
    for seed, (shape, out_dtype, with_smooth, cross) in enumerate(combos):
        if out_dtype == torch.float16 and with_smooth:
            continue  # the 16-bit output is neither smoothed nor quantized
        if not cross and shape[2] > shape[1]:
            continue  # self-attention: as many keys as queries at most (the views are cut from one tensor)
        case(shape, out_dtype, with_smooth, cross, seed)
        cases += 1
    print(f"OK {cases} cases")


if __name__ == "__main__":
    main()
