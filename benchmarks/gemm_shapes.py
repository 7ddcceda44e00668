"""Times the SDXL UNet linear GEMMs on one GPU: cuBLAS fp16 against every INT8 kernel and FP8.

    python3 benchmarks/gemm_shapes.py [--out DIR|FILE.json] [--quick] [--kernels fp16,tri_int8,cutlass,...]
                                      [--timer graph|do_bench] [--rotate 3] [--bias] [--no-peak] [--list]

Shapes are `sdxl_core.kernels.shapes.SDXL_LINEAR_SHAPES` (M tokens, K, N at batch 2 x 1024x1024). Kernels, all
fp16 in / fp16 out except where noted (default: fp16, tri_int8, tri_int8_tma, cutlass, fp8_mm; `all` for every one):
  fp16            cuBLAS `x @ w.T`
  int_mm          torch._int_mm on pre-quantized int8 (int32 out, no dequantization)
  tri_int8        our Triton W8A8 GEMM on pre-quantized int8 A, dequantization in the epilogue ("pointer" kernel)
  tri_int8_tma    the same GEMM, persistent Triton kernel with TMA loads ("tma")
  cutlass:<name>  each CUTLASS configuration (Hopper; `cutlass` selects them all), same contract
  tri_int8+quant  torch quantize_per_tensor, then tri_int8 (what an unfused W8A8 linear costs)
  tri_fused       our Triton W8A8 GEMM that quantizes A in registers
  fp8_mm          torch._scaled_mm, per-tensor scales, on pre-quantized e4m3 A
  fp8_linear      fp8_linear: quantize A to e4m3, then _scaled_mm with per-channel weight scales
Each kernel is first checked against an fp32 matmul of the same fp16 inputs (relative Frobenius error), then
timed: `graph` (default) captures 20 calls cycling over --rotate input sets in one CUDA graph and takes the median
replay, so host launch overhead (which the engine's own CUDA graph removes) does not count; `do_bench` is Triton's
(L2 flushed between calls). Every row is printed as it is measured and the JSON rewritten after it, so a run cut
short keeps what it measured. Unless --no-peak, an 8192^3 GEMM at the end measures each format's reachable peak.
Needs only python3 with CUDA torch and triton (plus nvidia-cutlass and nvcc or a prebuilt kernel cache for the
CUTLASS rows); inputs are random normal, never zeros.
"""

import argparse
import itertools
import json
import os
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sdxl_core.kernels.shapes import SDXL_LINEAR_SHAPES  # noqa: E402

QUICK_SHAPES = [(2048, 1280, 1280), (8192, 640, 5120), (154, 2048, 1280)]
PEAK_SHAPE = (8192, 8192, 8192)
DEFAULT_KERNELS = "fp16,tri_int8,tri_int8_tma,cutlass,fp8_mm"
TRITON_KERNELS = {"tri_int8": "pointer", "tri_int8_tma": "tma"}
FORMAT = {"fp16": "fp16", "int_mm": "int8", "tri_int8": "int8", "tri_int8_tma": "int8", "tri_int8+quant": "int8",
          "tri_fused": "int8", "fp8_mm": "fp8", "fp8_linear": "fp8"}
DEVICE = "cuda"


def fmt_of(name: str) -> str:
    return "int8" if name.startswith("cutlass:") else FORMAT[name]


def cutlass_configs() -> tuple[list[str], str | None]:
    """The CUTLASS configuration names runnable here, and why there are none when so."""
    from sdxl_core.kernels import int8_cutlass

    reason = int8_cutlass.unavailable_reason()
    return ([] if reason else list(int8_cutlass.configs())), reason


def kernel_names(spec: str, cutlass: list[str]) -> list[str]:
    names = []
    for name in spec.split(","):
        if name == "all":
            names += ["fp16", "int_mm", "tri_int8", "tri_int8_tma", *("cutlass:" + c for c in cutlass),
                      "tri_int8+quant", "tri_fused", "fp8_mm", "fp8_linear"]
        elif name == "cutlass":
            names += ["cutlass:" + c for c in cutlass]
        elif name in FORMAT or name.startswith("cutlass:"):
            names.append(name)
        else:
            sys.exit(f"unknown kernel {name!r}: choose from {', '.join(FORMAT)}, cutlass, cutlass:<config>, all")
    return list(dict.fromkeys(names))


def rel_err(out, ref):
    return ((out.float() - ref).norm() / ref.norm()).item()


def make_kernels(m, k, n, names, args):
    """Returns ({name: (fn, [args per input set], dequantize-for-checking or None)}, fp32 reference)."""
    from sdxl_core.kernels import fp8_gemm, int8_gemm

    w = torch.randn(n, k, device=DEVICE, dtype=torch.float16) / k**0.5
    bias = torch.randn(n, device=DEVICE, dtype=torch.float16) if args.bias else None
    xs = [torch.randn(m, k, device=DEVICE, dtype=torch.float16) for _ in range(args.rotate)]
    ref = xs[0].float() @ w.float().T + (bias.float() if bias is not None else 0)

    w_q, w_scale = int8_gemm.quantize_per_channel(w)
    a_scales = [x.float().abs().amax() / 127 for x in xs]
    x_qs = [int8_gemm.quantize_per_tensor(x, s) for x, s in zip(xs, a_scales, strict=True)]
    fp16_in = list(zip(xs, a_scales, strict=True))
    int8_in = list(zip(x_qs, a_scales, strict=True))

    def int8_kernel(kernel):
        return lambda x_q, s: int8_gemm.int8_linear(x_q, w_q, s, w_scale, bias, kernel=kernel), int8_in, None

    def fp16():
        return lambda x: torch.nn.functional.linear(x, w, bias), [(x,) for x in xs], None

    def int_mm():
        w_qt = w_q.t()  # column-major view, the layout int8 tensor cores want

        def dequantize(out, x_q, s):
            return out.float() * (s * w_scale) + (bias.float() if bias is not None else 0)
        return lambda x_q, s: torch._int_mm(x_q, w_qt), int8_in, dequantize

    def int8_then_quant():
        return (lambda x, s: int8_gemm.int8_linear(int8_gemm.quantize_per_tensor(x, s), w_q, s, w_scale, bias),
                fp16_in, None)

    def fused():
        return lambda x, s: int8_gemm.int8_linear_fused(x, w_q, s, w_scale, bias), fp16_in, None

    a8_scales = [x.float().abs().amax() / fp8_gemm.FP8_MAX for x in xs]

    def fp8_mm():
        w8_scale = w.float().abs().amax() / fp8_gemm.FP8_MAX
        w8 = fp8_gemm.quantize_fp8(w, w8_scale)
        x8s = [fp8_gemm.quantize_fp8(x, s) for x, s in zip(xs, a8_scales, strict=True)]
        return (lambda x8, s: torch._scaled_mm(x8, w8.t(), scale_a=s, scale_b=w8_scale, bias=bias,
                                               out_dtype=torch.float16, use_fast_accum=args.fp8_fast_accum),
                list(zip(x8s, a8_scales, strict=True)), None)

    def fp8_linear():
        w8c, w8c_scale = fp8_gemm.quantize_fp8_per_channel(w)
        return (lambda x, s: fp8_gemm.fp8_linear(x, w8c, s, w8c_scale, bias, use_fast_accum=args.fp8_fast_accum),
                list(zip(xs, a8_scales, strict=True)), None)

    builders = {"fp16": fp16, "int_mm": int_mm, "tri_int8+quant": int8_then_quant, "tri_fused": fused,
                "fp8_mm": fp8_mm, "fp8_linear": fp8_linear}
    kernels = {}
    for name in names:
        if name in TRITON_KERNELS:
            kernels[name] = int8_kernel(TRITON_KERNELS[name])
        elif name.startswith("cutlass:"):
            kernels[name] = int8_kernel(name)
        else:
            kernels[name] = builders[name]()
    return kernels, ref


def graph_ms(fn, arg_sets, iters=20, replays=10) -> float:
    """GPU milliseconds per call: `iters` calls cycling over the input sets, captured in one CUDA graph after a
    warm-up (autotuning, one-time kernel setup) on a side stream; the median of `replays` replays."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for args in arg_sets:
            fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(iters):
            fn(*arg_sets[i % len(arg_sets)])
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / iters)
    del graph
    return statistics.median(times)


def bench_ms(fn, arg_sets) -> float:
    from triton.testing import do_bench

    cycle = itertools.cycle(arg_sets)
    return do_bench(lambda: fn(*next(cycle)), warmup=25, rep=100, return_mode="median")


def triton_config(name):
    """The autotuned Triton config a Triton row ran (after its first call), as text."""
    from sdxl_core.kernels import int8_gemm, int8_tma

    tuner = {"tri_int8": int8_gemm._int8_gemm_kernel, "tri_int8+quant": int8_gemm._int8_gemm_kernel,
             "tri_fused": int8_gemm._fused_gemm_kernel,
             "tri_int8_tma": int8_tma._autotuned(False, int8_gemm._QUICK)}.get(name)
    config = getattr(tuner, "best_config", None)
    return str(config) if config is not None else None


def measure(m, k, n, names, args, emit):
    """Measure each kernel at one shape; `emit(row)` gets every row as soon as it is measured."""
    kernels, ref = make_kernels(m, k, n, names, args)
    flops = 2.0 * m * n * k
    base = None
    for name, (fn, arg_sets, dequant) in kernels.items():
        row = {"M": m, "K": k, "N": n, "kernel": name, "format": fmt_of(name)}
        try:
            out = fn(*arg_sets[0])  # also autotunes the Triton kernels
            row["rel_err"] = rel_err(dequant(out, *arg_sets[0]) if dequant else out, ref)
            row["config"] = name.removeprefix("cutlass:") if name.startswith("cutlass:") else triton_config(name)
            ms = graph_ms(fn, arg_sets) if args.timer == "graph" else bench_ms(fn, arg_sets)
            row.update(us=ms * 1e3, tflops=flops / (ms * 1e-3) / 1e12)
            if name == "fp16":
                base = ms
            if base is not None:
                row["speedup_vs_fp16"] = base / ms
        except Exception as err:  # one broken kernel should not hide the others
            message = str(err).strip().splitlines()
            row["error"] = f"{type(err).__name__}: {message[0] if message else ''}"[:300]
        emit(row)
    del kernels
    torch.cuda.empty_cache()


def print_row(r):
    shape = f"{r['M']}x{r['K']}->{r['N']}"
    if "error" in r:
        print(f"{shape:>18} {r['kernel']:<40} ERROR {r['error']}", flush=True)
        return
    print(f"{shape:>18} {r['kernel']:<40} {r['us']:9.2f} {r['tflops']:9.1f} "
          f"{r.get('speedup_vs_fp16', float('nan')):8.2f}x {r['rel_err']:9.2e}  {r['config'] or ''}", flush=True)


def out_file(out: Path | None) -> Path | None:
    if out is None:
        return None
    path = out if out.suffix == ".json" else out / "gemm_shapes.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_json(path: Path | None, report: dict) -> None:
    if path is None:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, path)  # a run killed mid-write keeps the previous complete file


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"only {len(QUICK_SHAPES)} shapes")
    parser.add_argument("--out", type=Path, help="a directory (writes gemm_shapes.json in it) or a .json file")
    parser.add_argument("--kernels", default=DEFAULT_KERNELS, help=f"comma-separated (default {DEFAULT_KERNELS})")
    parser.add_argument("--timer", choices=("graph", "do_bench"), default="graph")
    parser.add_argument("--rotate", type=int, default=3, help="input sets cycled through while timing")
    parser.add_argument("--bias", action="store_true", help="every kernel adds a bias (fp16 [N])")
    parser.add_argument("--fp8-fast-accum", action="store_true", help="use_fast_accum=True for _scaled_mm")
    parser.add_argument("--no-peak", action="store_true", help="skip the closing 8192^3 peak measurement")
    parser.add_argument("--list", action="store_true", help="print the shapes and kernels that would run, then exit")
    args = parser.parse_args(argv)
    shapes = QUICK_SHAPES if args.quick else SDXL_LINEAR_SHAPES
    cuda = torch.cuda.is_available()
    cutlass, why_not = cutlass_configs() if cuda else ([], "needs a CUDA Hopper GPU (sm_90)")
    names = kernel_names(args.kernels, cutlass)
    if args.list:
        print("shapes (M, K, N):", ", ".join("x".join(map(str, s)) for s in shapes))
        print("kernels:", ", ".join(names))
        if why_not:
            print("no CUTLASS kernels:", why_not)
        return
    if not cuda:
        sys.exit("needs a CUDA GPU")
    import triton

    torch.manual_seed(0)
    meta = {
        "device": torch.cuda.get_device_name(),
        "capability": list(torch.cuda.get_device_capability()),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "timer": args.timer,
        "rotate": args.rotate,
        "bias": args.bias,
        "fp8_fast_accum": args.fp8_fast_accum,
        "cutlass_configs": cutlass,
        "cutlass_unavailable": why_not,
    }
    print(" ".join(f"{k}={v}" for k, v in meta.items()), flush=True)
    print(f"{'M x K -> N':>18} {'kernel':<40} {'time_us':>9} {'TOPS':>9} {'vs_fp16':>9} {'rel_err':>9}  config",
          flush=True)
    path = out_file(args.out)
    report = {"meta": meta, "results": [], "peak": []}

    def emit(into):
        def add(row):
            print_row(row)
            report[into].append(row)
            write_json(path, report)
        return add

    for m, k, n in shapes:
        measure(m, k, n, names, args, emit("results"))
    if not args.no_peak:
        measure(*PEAK_SHAPE, [n for n in names if n in ("fp16", "fp8_mm") or fmt_of(n) == "int8"
                              and n not in ("int_mm", "tri_int8+quant", "tri_fused")], args, emit("peak"))
        peak = {}
        for r in report["peak"]:  # the best kernel of each format sets its peak
            if "tflops" in r:
                peak[r["format"]] = max(r["tflops"], peak.get(r["format"], 0.0))
        meta["peak_tflops"] = peak
        for row in report["results"]:
            if "tflops" in row and peak.get(row["format"]):
                row["fraction_of_peak"] = row["tflops"] / peak[row["format"]]
        print("reachable peak TFLOP/s (TOPS for int8):", peak, flush=True)
        write_json(path, report)
    if path:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
