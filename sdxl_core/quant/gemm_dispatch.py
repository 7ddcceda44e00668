"""Which kernel each 8-bit layer runs: timed per shape on the engine's GPU at build time, kept in the layer plan.

An 8-bit kernel is not faster than cuBLAS/cuDNN fp16 at every SDXL shape (small N, the 154-token text K/V
projections, short K), so an 8-bit engine build records the input shape of every quantized layer during
one UNet step, then times each distinct shape once per candidate:

    16bit                   cuBLAS/cuDNN fp16 on the dequantized weight and the quantized-dequantized input
    pointer, tma, cutlass:* the INT8 GEMM kernels (`kernels.int8_gemm.candidate_kernels`)
    scaled_mm(_fast)        cuBLAS FP8 through torch._scaled_mm, float32 or fast accumulation
    cutlass:*               the CUTLASS FP8 GEMMs (`kernels.ops.fp8_candidates`)
    (3x3 convs)             the 8-bit conv kernels where the machine has them

and every layer of that shape takes the fastest. All candidates compute the same quantized values (the 16-bit
path in 16-bit arithmetic), so the choice moves the output by float rounding only. They are timed on an input
already quantized (8-bit) or quantized and dequantized (16-bit): that glue is plain torch that Inductor fuses into
the producing kernel. `SDXL_BENCH_KERNELS=cutlass,scaled_mm`
(names or name prefixes) limits the 8-bit candidates, e.g. to skip the Triton autotuners on a build; the
16-bit path is always timed. The choice lands in each
module's `gemm_path` / `kernel`, hence in `layer_plan.json`: a reload runs exactly what was measured, and
`gemm_dispatch.json` keeps the timings for people to read (`sdxl-bench report` renders it).
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from sdxl_core import settings
from sdxl_core.quant import dispatch_cache, qmodules
from sdxl_core.quant.kernels import ops
from sdxl_core.timing import graph_ms

SIXTEEN_BIT = "16bit"
KERNELS_ENV = "SDXL_BENCH_KERNELS"
# A right 8-bit kernel differs from float64 on the same quantized values by its output's rounding (fp16/bf16:
# ~1e-3); a wrong one (a bad tile, a missed K block) by far more. Such a candidate is never chosen.
MAX_RELATIVE_ERROR = 2e-2


@dataclass
class ShapeTiming:
    fmt: str  # int8 / fp8
    op: str  # "gemm" (linear and 1x1 conv layers) or "conv" (other convs)
    shape: tuple  # gemm: (M, K, N); conv: (N, C, H, W, K, R, S, stride)
    layers: int  # how many layers of the UNet have this shape
    ms: dict[str, float] = field(default_factory=dict)  # candidate -> ms per call
    rejected: dict[str, str] = field(default_factory=dict)  # candidate -> why it was not timed (a wrong result)
    cached: tuple[str, ...] = ()  # the candidates whose ms came from the timing cache, not a timing now

    @property
    def choice(self) -> str:
        return min(self.ms, key=self.ms.get)

    @property
    def speedup(self) -> float:
        """FP16 time over the fastest 8-bit candidate's (below 1: 8 bits lose at this shape)."""
        eight_bit = [ms for name, ms in self.ms.items() if name != SIXTEEN_BIT]
        return self.ms[SIXTEEN_BIT] / min(eight_bit) if eight_bit else 0.0

    def flops(self) -> float:
        if self.op == "gemm":
            m, k, n = self.shape
            return 2.0 * m * k * n
        n, c, h, w, k, r, s, stride = self.shape
        return 2.0 * n * (h // stride) * (w // stride) * k * c * r * s

    def row(self) -> dict:
        return {
            "fmt": self.fmt,
            "op": self.op,
            "shape": list(self.shape),
            "layers": self.layers,
            "ms": {name: round(ms, 5) for name, ms in self.ms.items()},
            "choice": self.choice,
            "rejected": self.rejected,
            "cached": list(self.cached),
            "speedup_8bit": round(self.speedup, 3),
            "gflop": round(self.flops() / 1e9, 3),
        }


def choose(
    unet: torch.nn.Module, run_step: Callable[[], object], *, timer=None, channels_last: bool = False
) -> list[ShapeTiming]:
    """Time every distinct shape of the UNet's 8-bit layers per candidate; set each layer to the fastest.

    `run_step()` runs one eager UNet step so the shapes can be recorded. `timer(fn, candidate, shape)` returns
    ms per call of `fn` (default: `time_candidate`, whose timings are kept in `dispatch_cache` and reused; a
    caller's own timer is not). `channels_last`: the layout the engine will run in; the 8-bit conv kernels are
    NHWC only, so they are candidates only then.
    """
    cache = None if timer is not None else dispatch_cache.open_for(_device(unet))
    timer = timer or time_candidate
    layers = [m for m in unet.modules() if isinstance(m, qmodules.QuantizedModule)]
    shapes = group_by_input(layers, run_step, _shape_key)
    timings = []
    for key, unique in sorted(shapes.items(), key=lambda item: item[0][:3]):
        fmt, op, shape, dtype = key
        with torch.inference_mode():
            calls, x = candidates(unique[0], op, shape, dtype, channels_last=channels_last)
            calls = {name: fn for name, fn in calls.items() if allowed(name)}
            errors = {name: relative_error(unique[0], fn, x, name) for name, fn in calls.items()}
            rejected = {
                name: f"relative error {err:.2e}"
                for name, err in errors.items()
                if not err <= MAX_RELATIVE_ERROR and name != SIXTEEN_BIT
            }
            timed = {name: fn for name, fn in calls.items() if name not in rejected}
            ms, cached = dispatch_cache.measure(cache, timed, timer, (fmt, op, shape, dtype, channels_last))
        timing = ShapeTiming(fmt, op, shape, len(unique), ms, rejected, cached)
        if rejected:
            print(
                f"warning: {fmt} {op} {shape}: not using {', '.join(f'{k} ({v})' for k, v in rejected.items())}",
                file=sys.stderr,
            )
        path = SIXTEEN_BIT if timing.choice == SIXTEEN_BIT else "8bit"
        for module in unique:
            module.set_gemm_path(path, dtype, kernel=None if path == SIXTEEN_BIT else timing.choice)
        timings.append(timing)
    if cache is not None:
        cache.save()
    return timings


def group_by_input(modules, run_step: Callable[[], object], key: Callable) -> dict[tuple, list[torch.nn.Module]]:
    """{key(module, *its arguments): the distinct modules called with such arguments} over one `run_step()`, recorded
    by forward pre-hooks (removed again whatever happens)."""
    groups: dict[tuple, list[torch.nn.Module]] = {}

    def record(module, args, kwargs):
        group = groups.setdefault(key(module, *args, **kwargs), [])
        if module not in group:
            group.append(module)

    hooks = [m.register_forward_pre_hook(record, with_kwargs=True) for m in modules]
    try:
        with torch.inference_mode():
            run_step()
    finally:
        for hook in hooks:
            hook.remove()
    return groups


def _device(unet: torch.nn.Module) -> torch.device:
    return next((p.device for p in unet.parameters()), torch.device("cpu"))


def _conv_candidates(layer, shape: tuple, dtype: torch.dtype, channels_last: bool):
    n, c, h, w, *_ = shape
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(n, c, h, w, device=layer.weight.device, dtype=dtype).contiguous(memory_format=layout)
    x_dq = layer.fake_quantize_input(x)
    w16 = layer.float_weight(dtype).contiguous(memory_format=layout)
    calls = {
        SIXTEEN_BIT: lambda: F.conv2d(x_dq, w16, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    }
    from sdxl_core.quant.kernels import conv_cutlass

    w_krsc = conv_cutlass.weight_krsc(layer.weight)
    if (
        not channels_last
        or not conv_cutlass.available(x.device)
        or layer.groups != 1
        or conv_cutlass.unsupported_reason(x.shape, w_krsc.shape, layer.stride, layer.padding)
    ):
        return calls, x
    x_q = layer.quantize_input(x).contiguous(memory_format=torch.channels_last)
    w_scale = layer.w_scale.reshape(-1).expand(layer.out_channels).contiguous()
    bias = None if layer.bias is None else layer.bias.to(dtype)
    for index, name in enumerate(conv_cutlass.configs(layer.FMT)):
        calls[qmodules.CUTLASS + name] = lambda index=index: ops.conv8(
            x_q, w_krsc, layer.a_scale, w_scale, bias, list(layer.stride), list(layer.padding), dtype, index
        )
    return calls, x


def time_candidate(fn: Callable[[], object], candidate: str, shape: tuple) -> float:
    """GPU ms per call of one candidate: CUDA-graph replays, as the engine runs it (`timing.graph_ms`)."""
    return graph_ms(fn)


def relative_error(layer, fn, x: torch.Tensor, candidate: str) -> float:
    """One candidate's result against float64 on the same quantized values. A wrong kernel is far above the
    fp16/bf16 rounding of a right one."""
    x = layer.fake_quantize_input(x.float())
    out = fn().double()
    w = layer.float_weight(torch.float64)
    bias = layer.bias.double() if layer.bias is not None else None
    if out.dim() == 4:  # a conv
        ref = F.conv2d(x.double(), w, bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    else:
        ref = F.linear(x.double(), w.reshape(out.shape[-1], -1), bias)
    return float((out - ref).norm() / ref.norm())


def timer_and_cache(unet: torch.nn.Module, timer: Callable | None):
    """(timer, timing cache) for a fused kernel's choice (`quant.geglu`, `quant.attention`, `quant.layernorm`): a
    caller's own timer and no cache (its timings are kept nowhere), else `time_candidate` and the cache for the
    UNet's device, which the caller saves when it is done."""
    if timer is not None:
        return timer, None
    return time_candidate, dispatch_cache.open_for(_device(unet))


def fusion_row(fmt: str, op: str, shape: tuple, layers: int, ms: dict, choice: str, rejected: dict) -> dict:
    """One JSON-ready row of a fused kernel's choice (`quant.geglu`, `quant.attention`) for gemm_dispatch.json; each
    rejected candidate is named on stderr."""
    for kernel, why in rejected.items():
        print(f"warning: {fmt} {op} {shape}: not using {kernel} ({why})", file=sys.stderr)
    return {
        "fmt": fmt,
        "op": op,
        "shape": list(shape),
        "layers": layers,
        "ms": {name: round(value, 5) for name, value in ms.items()},
        "choice": choice,
        "rejected": rejected,
    }


def allowed(candidate: str) -> bool:
    """Whether `SDXL_BENCH_KERNELS` (unset: every kernel) lets this candidate be timed."""
    wanted = settings.kernels()
    return candidate == SIXTEEN_BIT or not wanted or any(candidate.startswith(w) for w in wanted)


def summary(timings: list[ShapeTiming]) -> dict:
    """Layers per path and per 8-bit kernel: how much of the engine actually runs in 8 bits."""
    paths, kernels = Counter(), Counter()
    for t in timings:
        paths[f"{t.op}:{SIXTEEN_BIT if t.choice == SIXTEEN_BIT else '8bit'}"] += t.layers
        kernels[t.choice] += t.layers
    return {"layers_by_path": dict(paths), "layers_by_kernel": dict(kernels)}


def print_table(timings: list[ShapeTiming], file=sys.stderr) -> None:
    print(
        f"{'fmt':>4} {'op':>4} {'shape':>34} {'layers':>6} {'16bit ms':>9} {'best 8-bit ms':>13} "
        f"{'speed-up':>8}  choice",
        file=file,
    )
    for t in timings:
        eight = [ms for name, ms in t.ms.items() if name != SIXTEEN_BIT]
        best = f"{min(eight):.4f}" if eight else "-"
        print(
            f"{t.fmt:>4} {t.op:>4} {'x'.join(map(str, t.shape)):>34} {t.layers:>6} {t.ms[SIXTEEN_BIT]:>9.4f} "
            f"{best:>13} {t.speedup:>7.2f}x  {t.choice}",
            file=file,
        )


def _shape_key(module, x) -> tuple:
    if isinstance(module, qmodules.QLinear) or module.as_gemm:
        k = module.in_features if isinstance(module, qmodules.QLinear) else module.in_channels
        n = module.out_features if isinstance(module, qmodules.QLinear) else module.out_channels
        return module.FMT, "gemm", (x.numel() // k, k, n), x.dtype
    n, c, h, w = x.shape
    r, s = module.kernel_size
    return module.FMT, "conv", (n, c, h, w, module.out_channels, r, s, module.stride[0]), x.dtype


def candidates(
    layer, op: str, shape: tuple, dtype: torch.dtype, *, channels_last: bool = False
) -> tuple[dict[str, Callable], torch.Tensor]:
    """({name: a call that runs this layer's work at `shape` that way}, the random (never zero) input they use,
    before quantization)."""
    device = layer.weight.device
    if op == "conv":
        return _conv_candidates(layer, shape, dtype, channels_last)
    m, k, n = shape
    weight = layer.weight.reshape(n, k)
    x = torch.randn(m, k, device=device, dtype=dtype)
    w16 = layer.float_weight(dtype).reshape(n, k)
    x_dq = layer.fake_quantize_input(x)
    calls = {SIXTEEN_BIT: lambda: F.linear(x_dq, w16, layer.bias)}
    x_q = qmodules.quantize(x, layer.a_scale, layer.FMT)
    if layer.FMT == "int8":
        from sdxl_core.quant.kernels import int8_gemm

        for kernel in int8_gemm.candidate_kernels(x_q, weight, dtype):
            calls[kernel] = lambda kernel=kernel: ops.int8_mm(
                x_q, weight, layer.a_scale, layer.w_scale, layer.bias, dtype, kernel
            )
    else:
        for kernel in ops.fp8_candidates(x_q, weight, dtype):
            calls[kernel] = lambda kernel=kernel: ops.fp8_mm(
                x_q, weight, layer.a_scale, layer.w_scale, layer.bias, dtype, kernel
            )
    return calls, x
