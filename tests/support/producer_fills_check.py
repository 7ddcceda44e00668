"""Runs our three producer kernels (attention, LayerNorm, GEGLU: `kernels.epilogue8`'s users) in the Triton
interpreter with each output dtype and logs the aten ops each call dispatches. A call must allocate its outputs and
launch its kernel, nothing else: a tensor filled per call (a placeholder scale, say) is one more kernel per layer
in every engine's CUDA graph.

Needs SDXL_BENCH_TRITON_ON_CPU=1 before it starts (see tests/unit/test_epilogue8.py). Prints "OK <n> calls", or
fails with an AssertionError naming the call and the op.
"""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sdxl_core.quant.kernels import attention8, geglu_act8, layernorm8
from sdxl_core.quant.kernels.fp8_gemm import FP8_DTYPE
from sdxl_core.quant.kernels.int8_gemm import _INTERPRET

FILLS = ("ones", "zeros", "fill", "full", "scalar_tensor")  # in any spelling: new_ones, fill_, full_like, ...


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def calls(out_dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 32, generator=g).half()
    q, k, v = (torch.randn(1, 16, 2, 16, generator=g).half() for _ in range(3))
    weight, bias = torch.rand(32, generator=g).half(), torch.randn(32, generator=g).half()
    smooth = (torch.rand(32, generator=g) + 0.5).half()
    inv = torch.tensor(8.0)  # a stored float32 reciprocal, as the engines keep it
    scale = (smooth, inv) if out_dtype != torch.float16 else (None, None)
    yield "attention", lambda: attention8.attention8(q, k, v, *scale, out_dtype)
    yield "layernorm", lambda: layernorm8.layernorm8(x, weight, bias, 1e-5, *scale, out_dtype)
    yield "add_layernorm", lambda: layernorm8.add_layernorm8(x, x, weight, bias, 1e-5, *scale, out_dtype)
    yield "geglu_act", lambda: geglu_act8.geglu_act8(torch.cat([x, x], 1)[:, :32], *scale[:1], scale[1], out_dtype)


def main():
    assert _INTERPRET, "set SDXL_BENCH_TRITON_ON_CPU=1 so the kernels run in the Triton interpreter"
    n = 0
    for out_dtype in (torch.float16, torch.int8, FP8_DTYPE):
        for name, call in calls(out_dtype):
            with OpLog() as log:
                call()
            fills = [op for op in log.ops if any(f in op for f in FILLS)]
            assert not fills, f"{name} -> {out_dtype}: the call dispatched {fills} besides its outputs and kernel"
            n += 1
    print(f"OK {n} calls")


if __name__ == "__main__":
    main()
