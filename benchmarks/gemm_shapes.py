"""Times the SDXL UNet linear GEMMs on one GPU: cuBLAS fp16 against the INT8 and FP8 paths.

    python benchmarks/gemm_shapes.py [--quick] [--out results.json] [--rotate 3] [--fp8-fast-accum]
                                     [--kernels fp16,tri_int8,fp8_mm]

Shapes are (M tokens, K, N) at batch 2 x 1024x1024. Kernels, all fp16 in / fp16 out except where noted:
  fp16           cuBLAS `x @ w.T`
  int_mm         torch._int_mm on pre-quantized int8 (int32 out, no dequantization)
  tri_int8       our Triton W8A8 GEMM on pre-quantized int8 A (dequantization in the epilogue), pointer kernel
  tri_int8_tma   the same GEMM, persistent kernel with TMA loads (sdxl_core/kernels/int8_tma.py)
  tri_int8+quant torch quantize_per_tensor, then tri_int8 (what an unfused W8A8 linear costs)
  tri_fused      our Triton W8A8 GEMM that quantizes A in registers
  fp8_mm         torch._scaled_mm, per-tensor scales, on pre-quantized e4m3 A
  fp8_linear     fp8_linear: quantize A to e4m3, then _scaled_mm with per-channel weight scales
Each kernel is first checked against an fp32 matmul of the same fp16 inputs (relative Frobenius error), then
timed with triton.testing.do_bench (median; do_bench flushes L2 between runs), cycling --rotate input sets.
A first 8192^3 GEMM measures the card's reachable peak for fp16, int8 (our kernel) and fp8; every row then
reports its fraction of the peak of its own number format. The JSON is rewritten after every shape, so a run
cut short keeps what it measured.
"""

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

SHAPES = [
    (8192, 640, 640),
    (8192, 640, 5120),
    (8192, 2560, 640),
    (2048, 1280, 1280),
    (2048, 1280, 10240),
    (2048, 5120, 1280),
    (8192, 2048, 640),
    (2048, 2048, 1280),
    (8192, 640, 1920),
    (2048, 1280, 3840),
    (32768, 320, 320),  # 1x1 conv at 128x128 latents as a GEMM
]
QUICK_SHAPES = [(8192, 640, 640), (8192, 640, 5120), (2048, 1280, 10240)]
PEAK_SHAPE = (8192, 8192, 8192)
PEAK_KERNELS = {"fp16": "fp16", "tri_int8": "int8", "tri_int8_tma": "int8", "fp8_mm": "fp8"}  # kernel -> format
FORMAT = {"fp16": "fp16", "int_mm": "int8", "tri_int8": "int8", "tri_int8_tma": "int8", "tri_int8+quant": "int8",
          "tri_fused": "int8", "fp8_mm": "fp8", "fp8_linear": "fp8"}
DEVICE = "cuda"


def load_kernels():
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    from sdxl_core.kernels import fp8_gemm, int8_gemm

    return int8_gemm, fp8_gemm


def rel_err(out, ref):
    return ((out.float() - ref).norm() / ref.norm()).item()


def make_kernels(m, k, n, rotate, fast_accum, int8_gemm, fp8_gemm):
    """Returns ({name: (fn, [args per input set], dequantize-for-checking or None)}, fp32 reference)."""
    w = torch.randn(n, k, device=DEVICE, dtype=torch.float16) / k**0.5
    xs = [torch.randn(m, k, device=DEVICE, dtype=torch.float16) for _ in range(rotate)]
    ref = xs[0].float() @ w.float().T

    w_q, w_scale = int8_gemm.quantize_per_channel(w)
    a_scales = [x.float().abs().amax() / 127 for x in xs]
    x_qs = [int8_gemm.quantize_per_tensor(x, s) for x, s in zip(xs, a_scales, strict=True)]
    w_qt = w_q.t()  # column-major view, the layout int8 tensor cores want

    w8_scale = w.float().abs().amax() / fp8_gemm.FP8_MAX
    w8 = fp8_gemm.quantize_fp8(w, w8_scale)
    w8c, w8c_scale = fp8_gemm.quantize_fp8_per_channel(w)
    a8_scales = [x.float().abs().amax() / fp8_gemm.FP8_MAX for x in xs]
    x8s = [fp8_gemm.quantize_fp8(x, s) for x, s in zip(xs, a8_scales, strict=True)]

    def fp16(x):
        return x @ w.T

    def int_mm(x_q, s):
        return torch._int_mm(x_q, w_qt)

    def tri_int8(x_q, s):
        return int8_gemm.int8_linear(x_q, w_q, s, w_scale, kernel="pointer")

    def tri_int8_tma(x_q, s):
        return int8_gemm.int8_linear(x_q, w_q, s, w_scale, kernel="tma")

    def tri_int8_quant(x, s):
        return int8_gemm.int8_linear(int8_gemm.quantize_per_tensor(x, s), w_q, s, w_scale)

    def tri_fused(x, s):
        return int8_gemm.int8_linear_fused(x, w_q, s, w_scale)

    def fp8_mm(x8, s):
        return torch._scaled_mm(
            x8, w8.t(), scale_a=s, scale_b=w8_scale, out_dtype=torch.float16, use_fast_accum=fast_accum
        )

    def fp8_linear(x, s):
        return fp8_gemm.fp8_linear(x, w8c, s, w8c_scale, use_fast_accum=fast_accum)

    def dequant_int32(out, x_q, s):
        return out.float() * (s * w_scale)

    fp16_in = list(zip(xs, a_scales, strict=True))
    int8_in = list(zip(x_qs, a_scales, strict=True))
    kernels = {
        "fp16": (fp16, [(x,) for x in xs], None),
        "int_mm": (int_mm, int8_in, dequant_int32),
        "tri_int8": (tri_int8, int8_in, None),
        "tri_int8_tma": (tri_int8_tma, int8_in, None),
        "tri_int8+quant": (tri_int8_quant, fp16_in, None),
        "tri_fused": (tri_fused, fp16_in, None),
        "fp8_mm": (fp8_mm, list(zip(x8s, a8_scales, strict=True)), None),
        "fp8_linear": (fp8_linear, list(zip(xs, a8_scales, strict=True)), None),
    }
    return kernels, ref


def autotuned_config(name, int8_gemm):
    from sdxl_core.kernels import int8_tma

    tuner = {"tri_int8": int8_gemm._int8_gemm_kernel, "tri_fused": int8_gemm._fused_gemm_kernel,
             "tri_int8_tma": int8_tma._autotuned(False, int8_gemm._QUICK)}.get(name)
    config = getattr(tuner, "best_config", None)
    return str(config) if config is not None else None


def run_shape(m, k, n, args, int8_gemm, fp8_gemm, only=None):
    kernels, ref = make_kernels(m, k, n, args.rotate, args.fp8_fast_accum, int8_gemm, fp8_gemm)
    flops = 2.0 * m * n * k
    rows = []
    for name, (fn, arg_sets, dequant) in kernels.items():
        if only and name not in only:
            continue
        row = {"M": m, "K": k, "N": n, "kernel": name}
        try:
            out = fn(*arg_sets[0])  # also triggers autotuning for the Triton kernels
            row["rel_err"] = rel_err(dequant(out, *arg_sets[0]) if dequant else out, ref)
            row["config"] = autotuned_config(name, int8_gemm)
            cycle = itertools.cycle(arg_sets)
            ms = do_bench(lambda fn=fn, cycle=cycle: fn(*next(cycle)), warmup=25, rep=100, return_mode="median")
            row["ms"] = ms
            row["tflops"] = flops / (ms * 1e-3) / 1e12
        except Exception as err:  # one broken kernel should not hide the others
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        rows.append(row)
    base = next((r["ms"] for r in rows if r["kernel"] == "fp16" and "ms" in r), None)
    for row in rows:
        if base is not None and "ms" in row:
            row["speedup_vs_fp16"] = base / row["ms"]
    return rows


def print_rows(rows):
    for r in rows:
        shape = f"{r['M']}x{r['K']}->{r['N']}"
        if "error" in r:
            print(f"{shape:>18} {r['kernel']:<15} ERROR {r['error']}")
            continue
        print(
            f"{shape:>18} {r['kernel']:<15} {r['ms'] * 1e3:9.1f} {r['tflops']:9.1f} "
            f"{r.get('speedup_vs_fp16', float('nan')):8.2f}x {r['rel_err']:9.2e} "
            f"{r['config'] or ''}"
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"only {len(QUICK_SHAPES)} shapes")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--rotate", type=int, default=3, help="input sets cycled through while timing")
    parser.add_argument("--fp8-fast-accum", action="store_true", help="use_fast_accum=True for _scaled_mm")
    parser.add_argument("--kernels", default=None, help="comma-separated subset of the kernels (default: all)")
    args = parser.parse_args(argv)
    only = set(args.kernels.split(",")) if args.kernels else None
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    int8_gemm, fp8_gemm = load_kernels()
    torch.manual_seed(0)

    meta = {
        "device": torch.cuda.get_device_name(),
        "capability": list(torch.cuda.get_device_capability()),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "rotate": args.rotate,
        "fp8_fast_accum": args.fp8_fast_accum,
    }
    print(" ".join(f"{k}={v}" for k, v in meta.items()))
    print(f"{'M x K -> N':>18} {'kernel':<15} {'time_us':>9} {'TFLOP/s':>9} {'vs_fp16':>9} {'rel_err':>9}")
    peak_rows = run_shape(*PEAK_SHAPE, args, int8_gemm, fp8_gemm, only=set(PEAK_KERNELS))
    print_rows(peak_rows)
    meta["peak_tflops"] = {}
    for r in peak_rows:  # the best kernel of each format sets its peak
        if "tflops" in r:
            fmt = PEAK_KERNELS[r["kernel"]]
            meta["peak_tflops"][fmt] = max(r["tflops"], meta["peak_tflops"].get(fmt, 0.0))
    print("reachable peak TFLOP/s (TOPS for int8):", meta["peak_tflops"])
    results = []
    for m, k, n in QUICK_SHAPES if args.quick else SHAPES:
        rows = run_shape(m, k, n, args, int8_gemm, fp8_gemm, only)
        for row in rows:
            peak = meta["peak_tflops"].get(FORMAT[row["kernel"]])
            if peak and "tflops" in row:
                row["fraction_of_peak"] = row["tflops"] / peak
        print_rows(rows)
        results.extend(rows)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"meta": meta, "peak": peak_rows, "results": results}, indent=2))
    if args.out:
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
