"""The activation quantization as Inductor fuses it into its producers, timed per formulation
(`sdxl-bench kernels --ops quantize`).

An 8-bit step quantizes each 8-bit layer's input inside the kernel that produces it: the LayerNorms (attention
and feed-forward inputs), the GEGLU pass (the feed-forward's second layer) and, as a pass of its own, the attention
output (cuDNN's SDPA cannot absorb it). On Hopper those kernels took 1.5-2.0 ms more per step than FP16's
(docs/perf.md), so each producer is compiled here at its SDXL shapes with every formulation of the quantization
below and timed against the same producer writing fp16, as the FP16 engine runs it. A formulation must give the
product's values: an INT8 one bit for bit (any difference rejects it), an FP8 one may differ where a division and
a multiplication by the reciprocal round apart (counted, as a fraction of the values).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from sdxl_core.quant.kernels.fp8_gemm import FP8_DTYPE, FP8_MAX, quantize_fp8
from sdxl_core.quant.kernels.int8_gemm import quantize_per_tensor

# (producer, shape, layers per step): LayerNorm and attention output per transformer block at each level
# (60 blocks at 1280 channels, 10 at 640), GEGLU per feed-forward. Batch 2 (classifier-free guidance), 1024x1024.
SDXL_PRODUCERS = [
    ("layernorm", (2048, 1280), 180),
    ("layernorm", (8192, 640), 30),
    ("geglu", (2048, 10240), 60),
    ("geglu", (8192, 5120), 10),
    ("attention_out", (2, 20, 1024, 64), 120),
    ("attention_out", (2, 10, 4096, 64), 20),
]


def _int8_rounded(x, scale, inverse):
    """The formulation before the float-bits rounding: round-to-integer and a float-to-int cast."""
    return torch.round(x.float() * (1.0 / scale)).clamp_(-128, 127).to(torch.int8)


def _fp8_division(x, scale, inverse):
    """The FP8 formulation before the stored reciprocal: a division by the scale."""
    return (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


# name: (format, quantize(x, scale, inverse)); the plain format names are the product's own functions, which the
# layers call with their stored reciprocal; "in-graph-inverse" takes the reciprocal inside the compiled producer.
FORMULATIONS: dict[str, tuple[str, Callable]] = {
    "int8": ("int8", quantize_per_tensor),
    "int8:in-graph-inverse": ("int8", lambda x, scale, inverse: quantize_per_tensor(x, scale)),
    "int8:round-and-cast": ("int8", _int8_rounded),
    "fp8": ("fp8", quantize_fp8),
    "fp8:in-graph-inverse": ("fp8", lambda x, scale, inverse: quantize_fp8(x, scale)),
    "fp8:division": ("fp8", _fp8_division),
}
# Only the INT8 engines smooth (SmoothQuant on their linear layers): the FP8 producers have no per-channel multiply.
SMOOTHED = {"int8": True, "fp8": False}


def producer_inputs(producer: str, shape: tuple, device) -> tuple:
    """Random fp16 inputs of one producer, with the per-channel SmoothQuant scale of the layer it feeds."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*size, scale=1.0):
        return (torch.randn(*size, generator=g) * scale).to(device=device, dtype=torch.float16)

    if producer == "layernorm":
        m, c = shape
        return rand(m, c, scale=3.0), rand(c) + 1.0, rand(c, scale=0.1), rand(c, scale=0.2).abs() + 0.5
    if producer == "geglu":
        m, two_f = shape
        return rand(m, two_f, scale=2.0), rand(two_f // 2, scale=0.2).abs() + 0.5
    if producer == "attention_out":
        # cuDNN's SDPA writes its output in the query's memory order, [batch, tokens, heads, dim]: seen as
        # [batch, heads, tokens, dim] it is a transposed view, and the FP16 engine's reshape for to_out copies nothing.
        b, heads, s, d = shape
        return rand(b, s, heads, d).transpose(1, 2), rand(heads * d, scale=0.2).abs() + 0.5
    raise ValueError(f"unknown producer {producer!r}: choose one of layernorm, geglu, attention_out")


def produce(producer: str, inputs: tuple, smoothed: bool = True) -> torch.Tensor:
    """The producer's fp16 output as the engines compute it before quantizing: smoothed for the next layer (INT8), or
    not (FP8, and the FP16 engine, which writes it as it is)."""
    if producer == "layernorm":
        x, weight, bias, smooth = inputs
        y = F.layer_norm(x, (x.shape[-1],), weight, bias)
    elif producer == "geglu":
        h, smooth = inputs
        value, gate = h.chunk(2, dim=-1)
        y = value * F.gelu(gate)
    else:
        o, smooth = inputs
        b, heads, s, d = o.shape
        y = o.transpose(1, 2).reshape(b * s, heads * d)
    return y * smooth if smoothed else y


def measure(producer: str, shape: tuple, layers: int, device, timer: Callable, formats=("int8", "fp8")) -> list[dict]:
    """One row per format: the fp16 producer as the FP16 engine runs it ("16bit"), smoothed as that format's
    engines compute it but written in fp16 ("16bit:smoothed", INT8 only), and each formulation; ms per call by
    `timer(fn)`, with each formulation's fraction of values that differ from the product's formulation."""
    # Every formulation compiles the same lambda's code, and Dynamo counts recompiles per code object (falling
    # back to eager past its limit of 8): start each producer and shape afresh, 7 graphs stay below it.
    torch._dynamo.reset()
    inputs = producer_inputs(producer, shape, device)
    scale = torch.tensor(0.02, device=device)
    inverse = 1.0 / scale  # once, outside every compiled graph, as the layers keep it

    def compiled(quantize, smoothed):
        if quantize is None:
            return torch.compile(lambda: produce(producer, inputs, smoothed), dynamic=False)
        return torch.compile(lambda: quantize(produce(producer, inputs, smoothed), scale, inverse), dynamic=False)

    with torch.inference_mode():
        # The FP16 engine's attention output is a view: no kernel, so nothing to time (a CUDA graph cannot be empty),
        # and each 8-bit formulation's speed-up over it is 0.
        fp16_ms = 0.0 if producer == "attention_out" else timer(compiled(None, False))
        rows = []
        for fmt in formats:
            smoothed = SMOOTHED[fmt]
            names = [name for name, (f, _) in FORMULATIONS.items() if f == fmt]
            calls = {name: compiled(FORMULATIONS[name][1], smoothed) for name in names}
            product = calls[fmt]().float()
            differ = {name: float((fn().float() != product).float().mean()) for name, fn in calls.items()}
            rejected = {name: frac for name, frac in differ.items() if fmt == "int8" and frac > 0}
            ms = {"16bit": fp16_ms}
            if smoothed:
                ms["16bit:smoothed"] = timer(compiled(None, True))
            ms |= {name: timer(fn) for name, fn in calls.items() if name not in rejected}
            rows.append(
                {
                    "op": f"quantize:{producer}",
                    "fmt": fmt,
                    "shape": list(shape),
                    "layers": layers,
                    "ms": ms,
                    "speedup": {name: round(fp16_ms / t, 3) for name, t in ms.items() if t},
                    "rel_err": differ,
                    "rejected": rejected,
                }
            )
    return rows
