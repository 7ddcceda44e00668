"""LayerNorms on our Triton LayerNorm kernel, which can also quantize its output for the 8-bit layer it feeds
(`kernels.layernorm8`).

Each SDXL transformer block runs three LayerNorms, and each feeds one linear layer: `norm1` the fused QKV projection,
`norm2` the cross-attention's Q projection (its K and V read the text states), `norm3` the GEGLU projection. In an
8-bit engine Inductor fuses that layer's smoothing and input quantization into the norm's kernel, which on Hopper
took 2-4 us longer per call than the FP16 engine's plain LayerNorm (docs/perf.md). A LayerNorm fused here runs the
Triton kernel instead: where the layer it feeds is an 8-bit layer on an 8-bit GEMM, the kernel writes that layer's
8-bit input and the layer runs its GEMM on it as it is (`QLinear` takes an input in its own 8-bit format as already
quantized); anywhere else (an FP16 engine, a layer on the 16-bit path, a self-attention whose Q, K and V are three
layers with scales of their own) it writes the 16-bit norm.

Whether that pays is measured per norm shape at build time (`choose`), as the GEMM kernels are: the unfused norm (and
the residual add before `norm2` and `norm3`, with the quantization for an 8-bit layer) compiled as the engine
compiles it, against the same with the norm on the kernel. FP16 engines are built with the same choice, so the speed
gates stay like for like. A fused norm is named in the layer plan (`"norms": {module name: kernel}`), and
`apply_fusions` fuses it again when the engine is loaded. The class swap leaves every module and tensor as it is: the
engine files change only by that plan entry.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

import torch

from sdxl_core.errors import UserError
from sdxl_core.quant import qmodules
from sdxl_core.quant.attention import quantizes
from sdxl_core.quant.kernels import layernorm8, ops

KERNEL = layernorm8.KERNEL
KERNELS = (KERNEL,)
UNFUSED = "unfused"
SIXTEEN_BIT = "16bit"  # the "fmt" of a row whose norm feeds a 16-bit input; also the unfused 16-bit norm
KERNEL_16BIT = f"{KERNEL}:16bit"  # the Triton kernel with a 16-bit output
# Per transformer-block norm: the path of the one layer its output feeds (`norm1` feeds one layer only where the
# self-attention's projections are fused), and whether a residual add makes its input.
_FEEDS = {"norm1": ("attn1", "to_qkv"), "norm2": ("attn2", "to_q"), "norm3": ("ff", "net", "0", "proj")}
_AFTER_RESIDUAL = {"norm1": False, "norm2": True, "norm3": True}


class _FusedLayerNormForward:
    """Mixed into a LayerNorm's own class (see `fuse`), so its parameters and state dict stay exactly as they are.
    `feeds` holds the layer its output goes to (in a tuple, so that it is not registered as a submodule)."""

    kernel = KERNEL
    feeds: tuple[torch.nn.Module | None] = (None,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (layer,) = self.feeds
        flat = x.reshape(-1, x.shape[-1])
        if layer is not None and quantizes(layer):
            storage = qmodules.STORAGE[layer.FMT]
            y = ops.layernorm8(flat, self.weight, self.bias, self.eps, layer.smooth, layer.a_inv_scale, storage)
        else:
            y = ops.layernorm8(flat, self.weight, self.bias, self.eps, None, None, x.dtype)
        return y.reshape(x.shape)


@functools.cache
def _fused_class(cls: type) -> type:
    return type(f"KernelFused{cls.__name__}", (_FusedLayerNormForward, cls), {})


def _unfused_class(cls: type) -> type:
    return cls.__mro__[2] if issubclass(cls, _FusedLayerNormForward) else cls


def fusable(norm: torch.nn.Module) -> bool:
    """A LayerNorm over the last dimension with a weight and a bias, of a width the kernel takes."""
    if not isinstance(norm, torch.nn.LayerNorm) or len(norm.normalized_shape) != 1:
        return False
    return norm.weight is not None and norm.bias is not None and norm.normalized_shape[0] <= layernorm8.MAX_CHANNELS


def _plain_block(block: torch.nn.Module) -> bool:
    """A diffusers BasicTransformerBlock as SDXL's are: LayerNorms, a self- and a cross-attention, a feed-forward, no
    positional embedding or chunking. Its norms' outputs then go only to the layers `_FEEDS` names (a UNet step
    always passes the cross-attention its text states)."""
    from diffusers.models.attention import BasicTransformerBlock

    return (
        isinstance(block, BasicTransformerBlock)
        and block.norm_type == "layer_norm"
        and not block.only_cross_attention
        and block.pos_embed is None
        and block._chunk_size is None
        and block.attn2 is not None
        and block.attn2.is_cross_attention
    )


def _layer_at(block: torch.nn.Module, path: tuple[str, ...]) -> torch.nn.Module | None:
    module = block
    for part in path:
        module = getattr(module, part, None) if not part.isdigit() else module[int(part)]
        if module is None:
            return None
    return module


def norms(unet: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, torch.nn.Module | None, bool]]:
    """{module name: (LayerNorm, the layer its output feeds or None, whether a residual add makes its input)} of
    every transformer-block norm the kernel can run."""
    found = {}
    for name, block in unet.named_modules():
        if not _plain_block(block):
            continue
        for norm_name, path in _FEEDS.items():
            norm = getattr(block, norm_name)
            if fusable(norm):
                layer = _layer_at(block, path)
                found[f"{name}.{norm_name}"] = (norm, layer, _AFTER_RESIDUAL[norm_name])
    return found


def fuse(norm: torch.nn.Module, feeds: torch.nn.Module | None, kernel: str = KERNEL) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"{kernel!r} is not a LayerNorm kernel: choose one of {', '.join(KERNELS)}")
    if not fusable(norm):
        raise ValueError(f"this {type(norm).__name__} cannot run on the LayerNorm kernel (see `fusable`)")
    norm.__class__ = _fused_class(_unfused_class(type(norm)))
    norm.feeds = (feeds,)


def unfuse(norm: torch.nn.Module) -> None:
    norm.__class__ = _unfused_class(type(norm))
    norm.__dict__.pop("feeds", None)


def fused_norms(unet: torch.nn.Module) -> dict[str, str]:
    """{module name: kernel} of the fused LayerNorms: the layer plan's "norms" entry."""
    return {name: m.kernel for name, m in unet.named_modules() if isinstance(m, _FusedLayerNormForward)}


def apply_fusions(unet: torch.nn.Module, planned: dict[str, str]) -> int:
    """Fuse every LayerNorm the layer plan names (its 8-bit layers planted first); refuse the plan if one is not a
    transformer-block norm the kernel runs. Returns how many were fused."""
    found = norms(unet) if planned else {}
    for name, kernel in planned.items():
        if name not in found or kernel not in KERNELS:
            raise UserError(
                f"layer plan runs {name[:80]!r} on the LayerNorm kernel, which it cannot: rebuild the engine"
            )
        norm, layer, _ = found[name]
        fuse(norm, layer, kernel)
    return len(planned)


def choose(
    unet: torch.nn.Module,
    run_step: Callable[[], object],
    timer: Callable | None = None,
    *,
    max_error: float,
    allowed=lambda _: True,
) -> list[dict]:
    """Per distinct norm shape and output kind: the unfused norm against the kernel (`allowed` here); fuse every
    norm of that kind and shape where the kernel is faster and its output matches. One JSON-ready row per shape.
    `timer(fn, candidate, shape)` gives ms per call; by default the dispatch's own, kept in its timing cache."""
    from sdxl_core.quant import dispatch_cache, gemm_dispatch

    found = norms(unet)
    if not found or not any(allowed(kernel) for kernel in KERNELS):
        return []
    cache = None
    if timer is None:
        cache = dispatch_cache.open_for(next(unet.parameters()).device)
        timer = gemm_dispatch.time_candidate
    where = {id(norm): (layer, residual) for norm, layer, residual in found.values()}

    def key(norm, x):
        layer, residual = where[id(norm)]
        fmt = layer.FMT if layer is not None and quantizes(layer) else SIXTEEN_BIT
        return fmt, (x.numel() // x.shape[-1], x.shape[-1], int(residual)), x.dtype

    rows = []
    shapes = gemm_dispatch.group_by_input([norm for norm, _, _ in found.values()], run_step, key)
    for (fmt, shape, dtype), unique in sorted(shapes.items(), key=lambda item: item[0][:2]):
        layer = where[id(unique[0])][0] if fmt != SIXTEEN_BIT else None
        with torch.inference_mode():
            ms, rejected = time_shape(unique[0], layer, shape, dtype, timer, cache, max_error, allowed)
        unfused, fused = (UNFUSED, KERNEL) if layer is not None else (SIXTEEN_BIT, KERNEL_16BIT)
        choice = KERNEL if fused in ms and ms[fused] < ms[unfused] else UNFUSED
        for norm in unique:
            if choice != UNFUSED:
                fuse(norm, where[id(norm)][0], choice)
            elif isinstance(norm, _FusedLayerNormForward):  # another build's choice: undone, else untouched
                unfuse(norm)
        rows.append(gemm_dispatch.fusion_row(fmt, "layernorm", shape, len(unique), ms, choice, rejected))
    if cache is not None:
        cache.save()
    return rows


def time_shape(norm, layer, shape, dtype, timer, cache, max_error, allowed=lambda _: True) -> tuple[dict, dict]:
    """({candidate: ms per call}, {kernel candidate: why it was not timed}) for a norm of `shape` = (rows, C,
    residual) whose output feeds `layer` quantized (an 8-bit layer on an 8-bit GEMM) or, with `layer` None, in 16
    bits. The unfused candidate (UNFUSED, or SIXTEEN_BIT) is the residual add, the norm and any quantization compiled
    together; the kernel candidate (KERNEL, or KERNEL_16BIT) is the same with the norm on the kernel, where the
    kernel runs and computes right."""
    # One compiled graph per shape and output kind: past Dynamo's limit the unfused norm would run eagerly and be
    # timed slower than the engine runs it.
    with torch._dynamo.config.patch(recompile_limit=max(torch._dynamo.config.recompile_limit, 64)):
        return _time_shape(norm, layer, shape, dtype, timer, cache, max_error, allowed)


def _time_shape(norm, layer, shape, dtype, timer, cache, max_error, allowed) -> tuple[dict, dict]:
    from sdxl_core.quant import dispatch_cache

    rows, channels, residual = shape
    device = norm.weight.device
    x = torch.randn(rows, channels, device=device, dtype=dtype) * 3 + torch.randn(rows, 1, device=device, dtype=dtype)
    r = torch.randn(rows, channels, device=device, dtype=dtype) if residual else None
    weight, bias = norm.weight.to(dtype), norm.bias.to(dtype)
    if layer is not None:
        scales, out_dtype, names = (layer.smooth, layer.a_inv_scale), qmodules.STORAGE[layer.FMT], (UNFUSED, KERNEL)
    else:
        scales, out_dtype, names = (None, None), dtype, (SIXTEEN_BIT, KERNEL_16BIT)
    args = (x, r, weight, bias, norm.eps, *scales, out_dtype)
    unfused_fn, kernel_fn = _compiled(x.is_cuda)
    timed = {names[0]: functools.partial(unfused_fn, *args)}
    rejected = {}
    if allowed(KERNEL) and layernorm8.can_run(x, weight, bias):
        candidate = functools.partial(kernel_fn, *args)
        error = _relative_error(candidate()[1], timed[names[0]]()[1], layer.a_scale if layer is not None else None)
        if error <= max_error:
            timed[names[1]] = candidate
        else:
            rejected[names[1]] = f"relative error {error:.2e}"
    fmt = layer.FMT if layer is not None else SIXTEEN_BIT
    ms, _ = dispatch_cache.measure(cache, timed, timer, (fmt, "layernorm", shape, dtype, False))
    return ms, rejected


def _relative_error(got: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor | None) -> float:
    """The kernel's output (dequantized with `scale` where it is 8-bit) against the unfused norm's: a right kernel
    differs by the norm's float rounding, which moves a few 8-bit outputs to the neighbouring value."""
    got_f, ref_f = got.float(), ref.float()
    if scale is not None:
        got_f, ref_f = got_f * scale.float(), ref_f * scale.float()
    return float((got_f - ref_f).norm() / ref_f.norm().clamp(min=1e-30))


def _unfused(x, residual, weight, bias, eps, smooth, inv_scale, out_dtype):
    """The residual add, the norm and the next layer's smoothing and quantization, as the unfused engine runs them."""
    if residual is not None:
        x = x + residual
    return x, layernorm8.layernorm_reference(x, weight, bias, eps, smooth, inv_scale, out_dtype)


def _on_kernel(x, residual, weight, bias, eps, smooth, inv_scale, out_dtype):
    """The same with the norm on the kernel: Inductor's kernel for the residual add, then the kernel."""
    if residual is not None:
        x = x + residual
    return x, ops.layernorm8(x, weight, bias, eps, smooth, inv_scale, out_dtype)


@functools.cache
def _compiled(on_gpu: bool):
    """(`_unfused`, `_on_kernel`) compiled as the engine compiles its blocks (Inductor on a GPU), plain elsewhere."""
    if not on_gpu:
        return _unfused, _on_kernel
    return torch.compile(_unfused, dynamic=False), torch.compile(_on_kernel, dynamic=False)


def print_table(rows: list[dict], file=sys.stderr) -> None:
    for row in rows:
        ms = row["ms"]
        unfused, fused = (SIXTEEN_BIT, KERNEL_16BIT) if row["fmt"] == SIXTEEN_BIT else (UNFUSED, KERNEL)
        kernel = f"{ms[fused]:.4f}" if fused in ms else "-"
        print(
            f"{row['fmt']:>5} layernorm {'x'.join(map(str, row['shape'])):>16} {row['layers']:>6} "
            f"unfused {ms[unfused]:.4f} ms, kernel {kernel} ms  choice {row['choice']}",
            file=file,
        )
