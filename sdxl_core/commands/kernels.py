"""Per-shape table of the SDXL UNet's GEMMs and 3x3 convs: 16 bits against every 8-bit kernel.

    sdxl-bench kernels --out results/            # on a Hopper GPU
    sdxl-bench kernels --quick --out results/    # three shapes

For each shape and number format a random 8-bit layer is made, and every candidate the build-time dispatch
chooses among (`gemm_dispatch.candidates`: cuBLAS/cuDNN fp16, the INT8 Triton and CUTLASS GEMMs, cuBLAS FP8,
the CUTLASS INT8/FP8 convs; convs channels-last, with the fp16 NCHW conv timed beside for reference) is
first checked against a float64 reference on the same quantized values, then timed with the dispatch's own
timer (`timing.graph_ms`: CUDA-graph replays, median). Each row gives microseconds, TFLOP/s (TOPS for
8-bit) and the speed-up over 16 bits; the file is rewritten after every row. `--ops quantize` adds the
activation quantization as Inductor fuses it into its producers, per formulation (`quantize_glue`); `--ops
attention` SDXL's four attention shapes as the build's attention choice times them (`quant.attention`): SDPA alone
("16bit", the FP16 engine's), SDPA plus the output projection's input quantization ("unfused", the 8-bit engines'
today), and the Triton kernel that quantizes in its epilogue, with an 8-bit and a 16-bit output; `--ops layernorm`
SDXL's transformer-block LayerNorms as the build's LayerNorm choice times them (`quant.layernorm`): the norm (after
its residual add where there is one) compiled by Inductor, in 16 bits ("16bit") and quantizing for the next 8-bit
layer ("unfused"), and the same on the Triton LayerNorm kernel; `--ops geglu_act` SDXL's feed-forward GEGLUs the same
way (`quant.geglu_act`).
"""

from __future__ import annotations

import torch

from sdxl_core.commands import quantize_glue
from sdxl_core.errors import UserError
from sdxl_core.quant import attention, fusions, geglu_act, gemm_dispatch, layernorm, qmodules
from sdxl_core.quant.gemm_dispatch import ShapeTiming
from sdxl_core.quant.kernels import shapes
from sdxl_core.quant.kernels.conv_cutlass import SDXL_CONV3X3
from sdxl_core.reports.measurements import render_kernels
from sdxl_core.reports.results import ResultFile
from sdxl_core.timing import graph_ms

# How many layers of the unfused SDXL UNet run each shape of `shapes.SDXL_LINEAR_SHAPES` (the rest appear
# with fused attention projections).
LAYERS = {
    (154, 2048, 640): 20,
    (154, 2048, 1280): 120,
    (2048, 1280, 1280): 372,
    (2048, 1280, 10240): 60,
    (2048, 5120, 1280): 60,
    (8192, 640, 640): 70,
    (8192, 640, 5120): 10,
    (8192, 2560, 640): 10,
}
QUICK = [(2048, 1280, 1280), (8192, 640, 5120), (154, 2048, 1280)]
# SDXL's attentions at 1024x1024 with classifier-free guidance, (B, Sq, Sk, H, D, cross): layers per UNet step.
SDXL_ATTENTIONS = {
    (2, 4096, 4096, 10, 64, 0): 10,
    (2, 1024, 1024, 20, 64, 0): 60,
    (2, 4096, 77, 10, 64, 1): 10,
    (2, 1024, 77, 20, 64, 1): 60,
}
# SDXL's transformer-block LayerNorms, (tokens, channels, after a residual add): layers per UNet step.
SDXL_NORMS = {(2048, 1280, 0): 60, (2048, 1280, 1): 120, (8192, 640, 0): 10, (8192, 640, 1): 20}
# SDXL's feed-forward GEGLUs, (tokens, output width F): layers per UNet step.
SDXL_GEGLUS = {(2048, 5120): 60, (8192, 2560): 10}
OPS = ("gemm", "conv", "quantize", "attention", "layernorm", "geglu_act")


def add_arguments(p) -> None:
    p.add_argument("--formats", default="int8,fp8", help="8-bit formats to time, from int8,fp8")
    p.add_argument("--quick", action="store_true", help=f"only {len(QUICK)} GEMM shapes and no convs")
    p.add_argument(
        "--ops",
        default="gemm,conv,quantize",
        help="what to time, from gemm,conv,quantize,attention,layernorm,geglu_act (quantize: the quantization fused "
        "into its producers; attention, layernorm, geglu_act: our kernels that quantize their output, against SDPA "
        "and Inductor's kernels)",
    )
    p.add_argument("--out", required=True, help="directory for kernels.json")


def layer_for(fmt: str, m: int, k: int, n: int, device, dtype=torch.float16) -> qmodules.QLinear:
    """A random 8-bit linear layer of this shape, as a calibrated engine would hold it."""
    linear = torch.nn.Linear(k, n, device=device, dtype=dtype)
    cls = qmodules.Int8Linear if fmt == "int8" else qmodules.Fp8Linear
    per_channel = fmt == "int8"
    w_amax = linear.weight.detach().float().abs().amax(dim=1 if per_channel else None)
    return cls.from_float(linear, w_amax=w_amax, a_amax=torch.tensor(4.0, device=device)).eval()


def smoothed_layer_for(fmt: str, k: int, n: int, device) -> qmodules.QLinear:
    """`layer_for` with a SmoothQuant scale for INT8, as the engines' INT8 layers have: the layer whose input our
    attention, LayerNorm and GEGLU kernels quantize."""
    layer = layer_for(fmt, 1, k, n, device)
    if fmt == "int8":
        layer.smooth = torch.rand(k, device=device, dtype=torch.float16) + 0.5
    return layer


def conv_layer_for(fmt: str, c: int, k: int, stride: int, device, dtype=torch.float16) -> qmodules.QConv2d:
    """A random 8-bit 3x3 conv layer (padding 1), as a calibrated engine would hold it."""
    conv = torch.nn.Conv2d(c, k, 3, stride=stride, padding=1, device=device, dtype=dtype)
    cls = qmodules.Int8Conv2d if fmt == "int8" else qmodules.Fp8Conv2d
    w_amax = conv.weight.detach().float().abs().amax(dim=(1, 2, 3) if fmt == "int8" else None)
    return cls.from_float(conv, w_amax=w_amax, a_amax=torch.tensor(4.0, device=device)).eval()


def main(args) -> int:
    if not torch.cuda.is_available():
        raise UserError("sdxl-bench kernels times GPU kernels: PyTorch sees no CUDA GPU")
    formats = [f for f in args.formats.split(",") if f]
    if any(f not in ("int8", "fp8") for f in formats):
        raise UserError(f"--formats takes int8 and fp8, got {args.formats!r}")
    ops = [o for o in args.ops.split(",") if o]
    if any(o not in OPS for o in ops):
        raise UserError(f"--ops takes {', '.join(OPS)}, got {args.ops!r}")
    device = torch.device("cuda")
    result = ResultFile(args.out, "kernels", device)
    work = []
    if "gemm" in ops:
        work += [("gemm", shape, LAYERS.get(shape)) for shape in (QUICK if args.quick else shapes.SDXL_LINEAR_SHAPES)]
    if "conv" in ops and not args.quick:
        work += [("conv", (n, c, h, w, k, 3, 3, stride), layers) for n, h, w, c, k, stride, layers in SDXL_CONV3X3]
    for op, shape, layers in work:
        for fmt in formats:
            row = result.add(measure(op, fmt, shape, layers, device))
            best = min((name for name in row["ms"] if name != "16bit"), key=row["ms"].get, default=None)
            speedup = f"best 8-bit {best} {row['ms'][best] * 1e3:.1f} us ({row['speedup'][best]:.2f}x)" if best else ""
            print(
                f"{fmt} {op} {'x'.join(map(str, shape))}: 16bit {row['ms']['16bit'] * 1e3:.1f} us, {speedup}"
                f"{', rejected ' + str(row['rejected']) if row['rejected'] else ''}",
                flush=True,
            )
    if "quantize" in ops:
        producers = quantize_glue.SDXL_PRODUCERS[::2] if args.quick else quantize_glue.SDXL_PRODUCERS
        for producer, shape, layers in producers:
            for row in quantize_glue.measure(producer, shape, layers, device, graph_ms, formats):
                result.add(row)
                times = ", ".join(f"{name} {t * 1e3:.1f}" for name, t in row["ms"].items())
                print(f"{row['fmt']} {row['op']} {'x'.join(map(str, shape))}: us {times}", flush=True)
    ours = {
        "attention": (SDXL_ATTENTIONS, measure_attention),
        "layernorm": (SDXL_NORMS, measure_layernorm),
        "geglu_act": (SDXL_GEGLUS, measure_geglu_act),
    }
    for op in (op for op in ours if op in ops):
        shapes_of_op, measure_op = ours[op]
        for shape, layers in shapes_of_op.items():
            for fmt in formats:
                row = result.add(measure_op(fmt, shape, layers, device))
                times = ", ".join(f"{name} {t * 1e3:.1f}" for name, t in row["ms"].items())
                print(f"{fmt} {op} {'x'.join(map(str, shape))}: us {times}", flush=True)
    print(render_kernels(result.data))
    return 0


def measure(op: str, fmt: str, shape: tuple, layers, device) -> dict:
    """One row: every candidate's relative error against float64 and its time (CUDA-graph replays)."""
    if op == "gemm":
        m, k, n = shape
        layer = layer_for(fmt, m, k, n, device)
    else:
        _, c, _, _, k, _, _, stride = shape
        layer = conv_layer_for(fmt, c, k, stride, device)
    with torch.inference_mode():
        calls, x = gemm_dispatch.candidates(layer, op, shape, torch.float16, channels_last=op == "conv")
        errors = {name: gemm_dispatch.relative_error(layer, fn, x, name) for name, fn in calls.items()}
        rejected = {name: err for name, err in errors.items() if not err <= gemm_dispatch.MAX_RELATIVE_ERROR}
        ms = {name: graph_ms(fn) for name, fn in calls.items() if name not in rejected}
        if op == "conv":  # the NCHW fp16 conv, for whether channels-last is the faster FP16 layout
            nchw, _ = gemm_dispatch.candidates(layer, op, shape, torch.float16, channels_last=False)
            ms["16bit-nchw"] = graph_ms(nchw["16bit"])
    flop = ShapeTiming(fmt, op, shape, layers or 0).flops()
    return {
        "op": op,
        "fmt": fmt,
        "shape": list(shape),
        "layers": layers,
        "ms": ms,
        "tflops": {name: round(flop / t / 1e9, 1) for name, t in ms.items()},
        "speedup": {name: round(ms["16bit"] / t, 3) for name, t in ms.items()},
        "rel_err": errors,
        "rejected": rejected,
    }


def measure_attention(fmt: str, shape: tuple, layers: int, device, timer=gemm_dispatch.time_candidate) -> dict:
    """One attention row, timed as the engine build times it (`attention.time_shape`), its output projection a random
    8-bit layer (with a SmoothQuant scale for INT8, as the engines' have). `timer(fn, name, shape)`: ms per call."""
    batch, _, _, heads, head_dim, _ = shape
    out = smoothed_layer_for(fmt, heads * head_dim, heads * head_dim, device)
    with torch.inference_mode():
        ms, rejected = attention.time_shape(out, shape, torch.float16, timer, None, gemm_dispatch.MAX_RELATIVE_ERROR)
    _, sq, sk, _, _, _ = shape
    flop = 4.0 * batch * heads * sq * sk * head_dim
    return {
        "op": "attention",
        "fmt": fmt,
        "shape": list(shape),
        "layers": layers,
        "ms": ms,
        "tflops": {name: round(flop / t / 1e9, 1) for name, t in ms.items()},
        "speedup": {name: round(ms[attention.SDPA] / t, 3) for name, t in ms.items()},
        "rejected": rejected,
    }


def measure_layernorm(fmt: str, shape: tuple, layers: int, device, timer=gemm_dispatch.time_candidate) -> dict:
    """One LayerNorm row, timed as the engine build times it (`layernorm.time_shape`): the 16-bit norm and the norm
    quantizing for a random 8-bit layer, each unfused and on the kernel. `timer(fn, name, shape)`: ms per call."""
    channels = shape[1]
    norm = torch.nn.LayerNorm(channels, device=device, dtype=torch.float16)
    torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
    torch.nn.init.normal_(norm.bias, std=0.1)

    def time(feeds):
        return layernorm.time_shape(norm, feeds, shape, torch.float16, timer, None, gemm_dispatch.MAX_RELATIVE_ERROR)

    return _both_outputs_row("layernorm", fmt, shape, layers, smoothed_layer_for(fmt, channels, channels, device), time)


def measure_geglu_act(fmt: str, shape: tuple, layers: int, device, timer=gemm_dispatch.time_candidate) -> dict:
    """One GEGLU row, timed as the engine build times it (`geglu_act.time_shape`): the 16-bit GEGLU and the GEGLU
    quantizing for a random 8-bit layer, each unfused and on the kernel. `timer(fn, name, shape)`: ms per call."""
    width = shape[1]

    def time(feeds):
        return geglu_act.time_shape(feeds, shape, torch.float16, device, timer, None, gemm_dispatch.MAX_RELATIVE_ERROR)

    return _both_outputs_row("geglu_act", fmt, shape, layers, smoothed_layer_for(fmt, width, 320, device), time)


def _both_outputs_row(op: str, fmt: str, shape: tuple, layers: int, layer, time) -> dict:
    """A row of one of our producer kernels with both outputs: `time(None)` (16-bit) and `time(layer)` (quantizing
    for `layer`), each -> ({candidate: ms}, {candidate: why not timed}); speed-ups over the 16-bit unfused op."""
    ms, rejected = {}, {}
    with torch.inference_mode():
        for feeds in (None, layer):
            timed, why = time(feeds)
            ms.update(timed)
            rejected.update(why)
    return {
        "op": op,
        "fmt": fmt,
        "shape": list(shape),
        "layers": layers,
        "ms": ms,
        "speedup": {name: round(ms[fusions.SIXTEEN_BIT] / t, 3) for name, t in ms.items()},
        "rejected": rejected,
    }
