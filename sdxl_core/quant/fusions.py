"""What the choices of our fused kernels share (`quant.attention`, `quant.layernorm`, `quant.geglu_act`): the fused
modules' classes, the output check before timing, the printed table. Each of those modules finds its modules,
records their shapes over one UNet step (`gemm_dispatch.group_by_input`), times per shape the unfused ops (compiled
as the engine compiles them) against our kernel, and fuses where the kernel is faster; the layer plan names what it
fused, and a reload fuses the same modules without timing again."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

import torch

UNFUSED = "unfused"  # a row's choice where the unfused ops stay
SIXTEEN_BIT = "16bit"  # the "fmt" of a row whose module feeds a 16-bit input; also its unfused candidate


@functools.cache
def fused_class(mixin: type, cls: type, module: str) -> type:
    """`cls` with `mixin`'s forward first, named `KernelFused<cls>` in `module`: a module swapped to it keeps its
    parameters and state dict. The owning module must make the class when it is looked up by that name (a module
    `__getattr__`), since an engine's precompiled regions pickle it by name."""
    name = f"KernelFused{cls.__name__}"
    return type(name, (mixin, cls), {"__module__": module, "__qualname__": name})


def unfused_class(mixin: type, cls: type) -> type:
    return cls.__mro__[2] if issubclass(cls, mixin) else cls


def choose_per_shape(
    op: str,
    kernel: str,
    modules: list[torch.nn.Module],
    run_step: Callable[[], object],
    key: Callable,
    time: Callable,
    fuse: Callable[[torch.nn.Module, str], None],
    unet: torch.nn.Module,
    timer: Callable | None,
) -> list[dict]:
    """The choice each of our fused kernels makes: per (fmt, shape, dtype) that `key(module, *call args)` gives over
    one `run_step()`, `time(first module, fmt, shape, dtype, timer, cache)` -> ({candidate: ms}, {candidate: why not
    timed}); every module of a shape where the kernel (`kernel`, or `kernel:16bit` for a 16-bit output) beats the
    unfused ops is fused with `fuse(module, kernel)`. One JSON-ready row per shape for gemm_dispatch.json. The modules
    come unfused: a fused one may not be called as `key` expects."""
    from sdxl_core.quant import gemm_dispatch

    timer, cache = gemm_dispatch.timer_and_cache(unet, timer)
    rows = []
    shapes = gemm_dispatch.group_by_input(modules, run_step, key)
    for (fmt, shape, dtype), unique in sorted(shapes.items(), key=lambda item: item[0][:2]):
        with torch.inference_mode():
            ms, rejected = time(unique[0], fmt, shape, dtype, timer, cache)
        unfused, fused = (SIXTEEN_BIT, f"{kernel}:16bit") if fmt == SIXTEEN_BIT else (UNFUSED, kernel)
        choice = kernel if fused in ms and ms[fused] < ms[unfused] else UNFUSED
        for module in unique if choice != UNFUSED else ():
            fuse(module, choice)
        rows.append(gemm_dispatch.fusion_row(fmt, op, shape, len(unique), ms, choice, rejected))
    if cache is not None:
        cache.save()
    return rows


def output_error(got: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor | None) -> float:
    """A kernel's output (dequantized with `scale` where it is 8-bit) against the unfused ops': a right kernel differs
    by float rounding, which moves a few 8-bit outputs to the neighbouring value."""
    got_f, ref_f = got.float(), ref.float()
    if scale is not None:
        got_f, ref_f = got_f * scale.float(), ref_f * scale.float()
    return float((got_f - ref_f).norm() / ref_f.norm().clamp(min=1e-30))


def print_table(rows: list[dict], op: str, kernel: str, kernel_16bit: str, file=sys.stderr) -> None:
    for row in rows:
        ms = row["ms"]
        unfused, fused = (SIXTEEN_BIT, kernel_16bit) if row["fmt"] == SIXTEEN_BIT else (UNFUSED, kernel)
        timed = f"{ms[fused]:.4f}" if fused in ms else "-"
        print(
            f"{row['fmt']:>5} {op} {'x'.join(map(str, row['shape'])):>16} {row['layers']:>6} "
            f"unfused {ms[unfused]:.4f} ms, kernel {timed} ms  choice {row['choice']}",
            file=file,
        )
