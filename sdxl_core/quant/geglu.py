"""Feed-forwards whose GEGLU runs in the epilogue of their first 8-bit GEMM (`kernels.geglu8`, Triton, or the
CUTLASS GEGLU GEMM of `kernels.gemm8_cutlass`).

A diffusers `FeedForward` with a GEGLU activation is  net = [GEGLU(proj), Dropout, Linear]. When both linears are
8-bit layers of one format and the second runs an 8-bit GEMM, one kernel can compute the projection, the GEGLU,
the second layer's SmoothQuant scale and its input quantization, and hand the second GEMM its 8-bit input
directly: the 16-bit [M, 2F] intermediate is never written. Whether that is faster than the best GEMM for the
projection plus the pointwise kernel Inductor makes of the rest is measured per shape at build time (`choose`),
for each fused kernel; a fused projection names its kernel (one of `FUSED_KERNELS`) in the layer plan, and
`apply_fusions` fuses its feed-forward again when the engine is loaded. The fused forward is for inference: the
dropout between the two (identity in eval mode) is skipped.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

import torch

from sdxl_core.errors import UserError
from sdxl_core.quant import qmodules
from sdxl_core.quant.kernels import geglu8, gemm8_cutlass, ops

KERNEL = geglu8.KERNEL
FUSED_KERNELS = (KERNEL, *gemm8_cutlass.GEGLU_KERNELS)
UNFUSED = "unfused"


class _FusedGegluForward:
    """Mixed into a FeedForward's own class (see `fuse`), so its modules and state dict stay exactly as they are."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        proj, out = self.net[0].proj, self.net[2]
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        if x.dtype != qmodules.STORAGE[proj.FMT]:  # else the LayerNorm before it quantized it (`quant.layernorm`)
            x = proj.quantize_input(x if proj.smooth is None else x * proj.smooth)
        y_q = _fused(proj, out, x, proj.act_dtype)
        y = out.forward_quantized(y_q, proj.act_dtype)
        return y.reshape(*hidden_states.shape[:-1], out.out_features)


def _fused(proj, out, x_q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The 8-bit input of `out` from the quantized input of `proj`, on the fused kernel `proj` names."""
    if proj.kernel == KERNEL:
        return ops.geglu8_mm(x_q, proj.weight, proj.a_scale, proj.w_scale, proj.bias, out.smooth, out.a_scale, dtype)
    config = proj.kernel.removeprefix(gemm8_cutlass.GEGLU_PREFIX)
    weight, w_scale, bias = proj.geglu_weight, proj.geglu_w_scale, proj.geglu_bias  # interleaved
    return ops.geglu8_cutlass(x_q, weight, proj.a_scale, w_scale, bias, out.smooth, out.a_scale, dtype, config)


@functools.cache
def _fused_class(cls: type) -> type:
    name = f"GegluFused{cls.__name__}"
    return type(name, (_FusedGegluForward, cls), {"__module__": __name__, "__qualname__": name})


def __getattr__(name: str):
    """A fused class is pickled by name (an engine's precompiled regions): it is made when it is looked up."""
    if name != "GegluFusedFeedForward":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from diffusers.models.attention import FeedForward

    return _fused_class(FeedForward)


def _unfused_class(cls: type) -> type:
    return cls.__mro__[2] if issubclass(cls, _FusedGegluForward) else cls


def fusable(ff: torch.nn.Module) -> bool:
    """A FeedForward whose GEGLU (exact gelu) projection and output layer are 8-bit linears of one format, the
    output layer on an 8-bit GEMM."""
    from diffusers.models.activations import GEGLU

    net = getattr(ff, "net", None)
    if not isinstance(net, torch.nn.ModuleList) or len(net) != 3:
        return False
    act, out = net[0], net[2]
    if type(act) is not GEGLU or not isinstance(net[1], torch.nn.Dropout):
        return False
    proj = act.proj
    return (
        isinstance(proj, qmodules.QLinear)
        and isinstance(out, qmodules.QLinear)
        and proj.FMT == out.FMT
        and out.runs_8bit_gemm
        and proj.out_features == 2 * out.in_features
    )


def feed_forwards(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """{name: feed-forward} of every fusable feed-forward in the UNet."""
    return {name: m for name, m in unet.named_modules() if hasattr(m, "net") and fusable(m)}


def fuse(ff: torch.nn.Module, dtype: torch.dtype | None = None, kernel: str = KERNEL) -> None:
    """Run this feed-forward through the fused `kernel` (one of `FUSED_KERNELS`; its projection names it)."""
    if kernel not in FUSED_KERNELS:
        raise ValueError(f"{kernel!r} is not a fused GEGLU kernel: choose one of {', '.join(FUSED_KERNELS)}")
    ff.net[0].proj.set_gemm_path("8bit", dtype, kernel=kernel)
    ff.__class__ = _fused_class(_unfused_class(type(ff)))


def apply_fusions(unet: torch.nn.Module) -> int:
    """Fuse every feed-forward whose projection a loaded layer plan names a fused kernel; refuse the plan if such a
    layer is anything but the projection of a fusable feed-forward. Returns how many were fused."""
    named = [
        (name, m) for name, m in unet.named_modules() if isinstance(m, qmodules.QLinear) and m.kernel in FUSED_KERNELS
    ]
    if not named:
        return 0
    owners = {f"{name}.net.0.proj": ff for name, ff in unet.named_modules() if hasattr(ff, "net")}
    for name, module in named:
        ff = owners.get(name)
        if ff is None or not fusable(ff):
            raise UserError(
                f"layer plan runs {name!r} on {module.kernel}, which only a GEGLU feed-forward can: rebuild the engine"
            )
        ff.__class__ = _fused_class(_unfused_class(type(ff)))
    return len(named)


def choose(
    unet: torch.nn.Module,
    run_step: Callable[[], object],
    timer: Callable | None = None,
    *,
    max_error: float,
    allowed=lambda _: True,
) -> list[dict]:
    """Per distinct GEGLU projection shape: the unfused cost (the projection's chosen kernel on a quantized input,
    then the GEGLU and quantization as one compiled pointwise kernel) against each fused kernel `allowed` here;
    fuse every feed-forward of that shape on the fastest fused kernel where it beats the unfused pair and its
    output matches the reference. Returns one JSON-ready row per shape. `timer(fn, candidate, shape)` gives ms per
    call; by default the dispatch's own (`gemm_dispatch.time_candidate`), whose timings the kernel timing cache
    keeps (`dispatch_cache`)."""
    from sdxl_core.quant import gemm_dispatch

    ffs = feed_forwards(unet)
    if not ffs or not any(allowed(kernel) for kernel in FUSED_KERNELS):
        return []
    timer, cache = gemm_dispatch.timer_and_cache(unet, timer)
    shapes = gemm_dispatch.group_by_input(ffs.values(), run_step, _shape_key)
    rows = []
    for (fmt, shape, dtype), unique in sorted(shapes.items(), key=lambda item: item[0][:2]):
        ff = unique[0]
        with torch.inference_mode():
            ms, rejected = _time_shape(ff, shape, dtype, timer, cache, max_error, gemm_dispatch, allowed)
        choice = min((k for k in FUSED_KERNELS if k in ms), key=ms.get, default=UNFUSED)
        if choice != UNFUSED and ms[choice] >= ms[UNFUSED]:
            choice = UNFUSED
        if choice != UNFUSED:
            for module in unique:
                fuse(module, dtype, choice)
        rows.append(gemm_dispatch.fusion_row(fmt, "geglu", shape, len(unique), ms, choice, rejected))
    if cache is not None:
        cache.save()
    return rows


def _shape_key(ff, x) -> tuple:
    proj = ff.net[0].proj
    return proj.FMT, (x.numel() // proj.in_features, proj.in_features, proj.out_features), proj.act_dtype


def _time_shape(ff, shape, dtype, timer, cache, max_error, gemm_dispatch, allowed) -> tuple[dict, dict]:
    """({UNFUSED: the projection's chosen GEMM + the pointwise kernel, each part, and each fused kernel that runs
    here and computes right}, {fused kernel: why it was not timed})."""
    from sdxl_core.quant import dispatch_cache

    proj, out = ff.net[0].proj, ff.net[2]
    calls, x = gemm_dispatch.candidates(proj, "gemm", shape, dtype)
    chosen = gemm_dispatch.SIXTEEN_BIT if proj.gemm_path == gemm_dispatch.SIXTEEN_BIT else proj.kernel
    h = calls[chosen]()
    pointwise = _compiled_pointwise(x.is_cuda)
    timed = {
        f"gemm:{chosen}": calls[chosen],
        "pointwise": lambda: pointwise(h, out.smooth, out.a_scale, out.FMT, out.a_inv_scale),
    }
    x_q = proj.quantize_input(x)
    rejected = {}
    for kernel, fused in _fused_candidates(proj, out, x_q, dtype).items():
        if not allowed(kernel):
            continue
        error = _relative_error(fused(), x_q, proj, out, dtype)
        if error <= max_error:
            timed[kernel] = fused
        else:
            rejected[kernel] = f"relative error {error:.2e}"
    ms, _ = dispatch_cache.measure(cache, timed, timer, (proj.FMT, "geglu", shape, dtype, False))
    ms[UNFUSED] = ms[f"gemm:{chosen}"] + ms["pointwise"]
    return ms, rejected


def _fused_candidates(proj, out, x_q, dtype) -> dict[str, Callable[[], torch.Tensor]]:
    """{fused kernel: a call computing this projection's fused output} for the kernels that can run it here: the
    Triton kernel wherever TMA's rules hold, the CUTLASS configs on a Hopper GPU where the library loads."""
    calls = {}
    if geglu8.supports(x_q, proj.weight):
        calls[KERNEL] = lambda: ops.geglu8_mm(
            x_q, proj.weight, proj.a_scale, proj.w_scale, proj.bias, out.smooth, out.a_scale, dtype
        )
    if not _cutlass_runs_here(x_q, proj.FMT):
        return calls
    w_i = gemm8_cutlass.interleave(proj.weight)
    if not gemm8_cutlass.geglu_supports(x_q, w_i):
        return calls
    w_scale = proj.w_scale.reshape(-1)
    w_scale_i = gemm8_cutlass.interleave(w_scale) if w_scale.numel() > 1 else w_scale
    bias_i = None if proj.bias is None else gemm8_cutlass.interleave(proj.bias)
    for kernel in gemm8_cutlass.GEGLU_KERNELS:
        config = kernel.removeprefix(gemm8_cutlass.GEGLU_PREFIX)
        calls[kernel] = functools.partial(
            ops.geglu8_cutlass, x_q, w_i, proj.a_scale, w_scale_i, bias_i, out.smooth, out.a_scale, dtype, config
        )
    return calls


def _cutlass_runs_here(x_q: torch.Tensor, fmt: str) -> bool:
    return x_q.is_cuda and gemm8_cutlass.available(x_q.device, fmt)


def _relative_error(got, x_q, proj, out, dtype) -> float:
    """The fused kernel's dequantized output against the torch reference of the same computation."""
    ref = geglu8.geglu8_reference(
        x_q, proj.weight, proj.a_scale, proj.w_scale, proj.bias, out.smooth, out.a_scale, dtype
    )
    scale = out.a_scale.float()
    ref_f, got_f = ref.float() * scale, got.float() * scale
    return float((got_f - ref_f).norm() / ref_f.norm().clamp(min=1e-30))


@functools.cache
def _compiled_pointwise(on_gpu: bool):
    """The GEGLU, smoothing and quantization as the unfused engine runs them: one Inductor kernel on a GPU."""
    return torch.compile(geglu8.geglu_quantize_reference, dynamic=False) if on_gpu else geglu8.geglu_quantize_reference


def print_table(rows: list[dict], file=sys.stderr) -> None:
    for row in rows:
        ms = row["ms"]
        best = min((k for k in FUSED_KERNELS if k in ms), key=ms.get, default=None)
        fused = f"{ms[best]:.4f} ({best})" if best else "-"
        print(
            f"{row['fmt']:>4} geglu {'x'.join(map(str, row['shape'])):>28} {row['layers']:>6} "
            f"unfused {ms[UNFUSED]:.4f} ms, fused {fused} ms  choice {row['choice']}",
            file=file,
        )
