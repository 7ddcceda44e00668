"""GEGLU activations on our Triton GEGLU kernel, which can also quantize its output for the 8-bit layer after it
(`kernels.geglu_act8`).

A diffusers feed-forward is  net = [GEGLU(proj), Dropout, Linear]: the GEGLU module runs its projection, then
value * gelu(gate), and the second linear layer (`net[2]`) takes that. In an 8-bit engine Inductor fuses the second
layer's smoothing and input quantization into the GEGLU's pointwise kernel, which on Hopper took 0.32 ms per INT8
step longer than the FP16 engine's GEGLU kernel (docs/perf.md). A GEGLU fused here runs its projection as before
(whatever GEMM the dispatch chose for it) and then the Triton kernel: where `net[2]` is an 8-bit layer on an 8-bit
GEMM, the kernel writes that layer's 8-bit input (which `QLinear` takes as already quantized); anywhere else (an FP16
engine, a layer on the 16-bit path) it writes the 16-bit GEGLU. Feed-forwards whose projection runs a GEMM with the
GEGLU in its epilogue (`quant.geglu`) never call their GEGLU module, so they are never timed or fused here.

Whether that pays is measured per shape at build time (`choose`), as the GEMM kernels are: the GEGLU and the
quantization compiled as the engine compiles them, against the kernel. FP16 engines are built with the same choice,
so the speed gates stay like for like. A fused GEGLU is named in the layer plan (`"activations": {module name:
kernel}`), and `apply_fusions` fuses it again when the engine is loaded; the engine files change only by that entry.
"""

from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Callable
from typing import NamedTuple

import torch

from sdxl_core.errors import UserError
from sdxl_core.quant import fusions, qmodules
from sdxl_core.quant.attention import quantizes
from sdxl_core.quant.kernels import geglu_act8, ops

KERNEL = geglu_act8.KERNEL
KERNELS = (KERNEL,)
UNFUSED = fusions.UNFUSED
SIXTEEN_BIT = fusions.SIXTEEN_BIT
KERNEL_16BIT = f"{KERNEL}:16bit"  # the Triton kernel with a 16-bit output


class _FusedGegluActForward:
    """Mixed into a GEGLU module's own class (see `fuse`). `feeds` holds the feed-forward's second layer (in a tuple,
    so that it is not registered as a submodule)."""

    kernel = KERNEL
    feeds: tuple[torch.nn.Module | None] = (None,)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        h = self.proj(hidden_states)
        (layer,) = self.feeds
        if layer is not None and quantizes(layer):
            out = (layer.smooth, layer.a_inv_scale, qmodules.STORAGE[layer.FMT])
        else:
            out = (None, None, h.dtype)
        y = ops.geglu_act8(h.reshape(-1, h.shape[-1]), *out)
        return y.reshape(*h.shape[:-1], h.shape[-1] // 2)


def _fused_class(cls: type) -> type:
    return fusions.fused_class(_FusedGegluActForward, cls, __name__)


def __getattr__(name: str):
    """A fused class is pickled by name (an engine's precompiled regions): it is made when it is looked up."""
    if name != "KernelFusedGEGLU":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return _fused_class(importlib.import_module("diffusers.models.activations").GEGLU)


class Act(NamedTuple):
    """A GEGLU module the kernel can run and the layer its output feeds (the feed-forward's second linear)."""

    module: torch.nn.Module
    feeds: torch.nn.Module


def fusable(ff: torch.nn.Module) -> bool:
    """A diffusers FeedForward [GEGLU, Dropout, linear] whose GEGLU uses the exact gelu and whose output width the
    kernel takes."""
    from diffusers.models.activations import GEGLU
    from diffusers.models.attention import FeedForward

    if not isinstance(ff, FeedForward) or len(ff.net) != 3 or not isinstance(ff.net[1], torch.nn.Dropout):
        return False
    act, out = ff.net[0], ff.net[2]
    if not isinstance(act, GEGLU) or not isinstance(out, torch.nn.Linear | qmodules.QLinear):
        return False
    return getattr(act, "approximate", "none") == "none" and act.proj.out_features % 16 == 0


def activations(unet: torch.nn.Module) -> dict[str, Act]:
    """{module name of the GEGLU: `Act`} of every feed-forward the kernel can run."""
    return {f"{name}.net.0": Act(ff.net[0], ff.net[2]) for name, ff in unet.named_modules() if fusable(ff)}


def fuse(found: Act, kernel: str = KERNEL) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"{kernel!r} is not a GEGLU kernel: choose one of {', '.join(KERNELS)}")
    found.module.__class__ = _fused_class(fusions.unfused_class(_FusedGegluActForward, type(found.module)))
    found.module.feeds = (found.feeds,)


def unfuse(found: Act) -> None:
    found.module.__class__ = fusions.unfused_class(_FusedGegluActForward, type(found.module))
    found.module.__dict__.pop("feeds", None)


def fused_activations(unet: torch.nn.Module) -> dict[str, str]:
    """{module name: kernel} of the fused GEGLU modules: the layer plan's "activations" entry."""
    return {name: m.kernel for name, m in unet.named_modules() if isinstance(m, _FusedGegluActForward)}


def apply_fusions(unet: torch.nn.Module, planned: dict[str, str]) -> int:
    """Fuse every GEGLU the layer plan names (its 8-bit layers planted first); refuse the plan if one is not the
    GEGLU of a feed-forward the kernel runs. Returns how many were fused."""
    found = activations(unet) if planned else {}
    for name, kernel in planned.items():
        if name not in found or kernel not in KERNELS:
            raise UserError(f"layer plan runs {name[:80]!r} on the GEGLU kernel, which it cannot: rebuild the engine")
        fuse(found[name], kernel)
    return len(planned)


def choose(
    unet: torch.nn.Module,
    run_step: Callable[[], object],
    timer: Callable | None = None,
    *,
    max_error: float,
    allowed=lambda _: True,
) -> list[dict]:
    """Per distinct GEGLU shape and output kind: the unfused GEGLU against the kernel (`allowed` here); fuse every
    GEGLU of that kind and shape where the kernel is faster and its output matches. One JSON-ready row per shape.
    `timer(fn, candidate, shape)` gives ms per call; by default the dispatch's own, kept in its timing cache."""
    found = activations(unet)
    if not found or not any(allowed(kernel) for kernel in KERNELS):
        return []
    by_module = {id(entry.module): entry for entry in found.values()}
    for entry in found.values():  # another build's choice: undone, so that every GEGLU is timed afresh
        unfuse(entry)

    def key(module, x, *args, **kwargs):
        layer = by_module[id(module)].feeds
        fmt = layer.FMT if quantizes(layer) else SIXTEEN_BIT
        # The activation dtype: the GEGLU's input may be 8-bit already (a fused LayerNorm before its projection).
        dtype = layer.act_dtype if isinstance(layer, qmodules.QLinear) else layer.weight.dtype
        return fmt, (x.numel() // x.shape[-1], module.proj.out_features // 2), dtype

    def time(module, fmt, shape, dtype, timer, cache):
        layer = by_module[id(module)].feeds if fmt != SIXTEEN_BIT else None
        return time_shape(layer, shape, dtype, module.proj.weight.device, timer, cache, max_error, allowed)

    def fuse_module(module, kernel):
        fuse(by_module[id(module)], kernel)

    modules = [entry.module for entry in found.values()]
    return fusions.choose_per_shape("geglu_act", KERNEL, modules, run_step, key, time, fuse_module, unet, timer)


def time_shape(layer, shape, dtype, device, timer, cache, max_error, allowed=lambda _: True) -> tuple[dict, dict]:
    """({candidate: ms per call}, {kernel candidate: why it was not timed}) for a GEGLU of `shape` = (rows, F) whose
    output feeds `layer` quantized (an 8-bit layer on an 8-bit GEMM) or, with `layer` None, in 16 bits: the GEGLU
    and any quantization compiled together (UNFUSED, or SIXTEEN_BIT) against the kernel (KERNEL, or KERNEL_16BIT),
    where the kernel runs and computes right."""
    # One compiled graph per shape and output kind: past Dynamo's limit the unfused GEGLU would run eagerly and be
    # timed slower than the engine runs it.
    with torch._dynamo.config.patch(recompile_limit=max(torch._dynamo.config.recompile_limit, 64)):
        return _time_shape(layer, shape, dtype, device, timer, cache, max_error, allowed)


def _time_shape(layer, shape, dtype, device, timer, cache, max_error, allowed) -> tuple[dict, dict]:
    from sdxl_core.quant import dispatch_cache

    rows, width = shape
    h = torch.randn(rows, 2 * width, device=device, dtype=dtype) * 2
    if layer is not None:
        args, names = (h, layer.smooth, layer.a_inv_scale, qmodules.STORAGE[layer.FMT]), (UNFUSED, KERNEL)
    else:
        args, names = (h, None, None, dtype), (SIXTEEN_BIT, KERNEL_16BIT)
    timed = {names[0]: functools.partial(_compiled_reference(h.is_cuda), *args)}
    rejected = {}
    if allowed(KERNEL) and geglu_act8.can_run(h):
        candidate = functools.partial(ops.geglu_act8, *args)
        error = fusions.output_error(candidate(), timed[names[0]](), layer.a_scale if layer is not None else None)
        if error <= max_error:
            timed[names[1]] = candidate
        else:
            rejected[names[1]] = f"relative error {error:.2e}"
    fmt = layer.FMT if layer is not None else SIXTEEN_BIT
    ms, _ = dispatch_cache.measure(cache, timed, timer, (fmt, "geglu_act", shape, dtype, False))
    return ms, rejected


@functools.cache
def _compiled_reference(on_gpu: bool):
    """The GEGLU and the next layer's smoothing and quantization as the unfused engine runs them: one Inductor kernel
    on a GPU."""
    reference = geglu_act8.geglu_reference
    return torch.compile(reference, dynamic=False) if on_gpu else reference


def print_table(rows: list[dict], file=sys.stderr) -> None:
    fusions.print_table(rows, "geglu_act", KERNEL, KERNEL_16BIT, file)
