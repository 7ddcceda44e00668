"""Times the SDXL UNet's 3x3 convs on one Hopper GPU: cuDNN fp16 against the 8-bit CUTLASS convs.

    python3 benchmarks/conv_shapes.py [--out DIR] [--quick] [--formats int8,fp8] [--configs 0,2] [--shapes 0,5]

Shapes are every distinct (N, H, W, C -> K, stride) 3x3 conv of the SDXL UNet at 1024x1024 with CFG (batch 2),
found by a meta-device forward of the diffusers model (the static table in `conv_cutlass.SDXL_CONV3X3` when
diffusers is missing); conv_in and conv_out stay fp16 and are left out. Rows per shape, fp16 output throughout:
  fp16_cl       cuDNN F.conv2d on channels_last fp16 input and weight (what a channels-last UNet runs)
  fp16_nchw     cuDNN F.conv2d on contiguous NCHW fp16 (for reference)
  quant_int8    the glue an 8-bit conv needs unless its producer fuses it: fp16 NHWC activation -> int8, one
  quant_fp8     fused elementwise kernel (torch.compile); the same to e4m3
  int8/<config> the CUTLASS INT8 conv on the quantized NHWC input, dequantize + bias in its epilogue
  fp8/<config>  the CUTLASS FP8 (e4m3) conv, same
Columns: time_us (median of triton.testing.do_bench, which flushes L2 before each run), TFLOP/s (TOPS for int8),
vs_fp16 (time of the faster fp16 layout / this time), +quant (the same with this format's quantize time added:
does conv + quantize beat fp16?), err_exact (relative Frobenius error against the exact float64 conv of the same
8-bit inputs: the kernel's own accuracy) and err_fp16 (against fp16 cuDNN on the unquantized activation: what
quantization costs). Inputs are random normal (never zero), weights scaled by 1/sqrt(fan_in).

A summary weights each shape by how many UNet layers run it: the conv time of one UNet step for fp16 and for the
best 8-bit config per shape, with and without the quantize glue. The JSON (DIR/conv_shapes.json) is rewritten
after every row, so a run cut short keeps what it measured. Needs python3 with CUDA torch, triton and (for the
shape derivation) diffusers; the kernel library comes from the kernel cache (SDXL_BENCH_KERNEL_CACHE) or is built
with nvcc + the nvidia-cutlass headers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sdxl_core.kernels import conv_cutlass as cc  # noqa: E402

QMAX = {"int8": 127.0, "fp8": 448.0}
QUICK_SHAPES = (0, 6, 13)  # 128x128 320->320, 64x64 640->640, 32x32 1280->1280: the most common shape per level


def sdxl_shapes() -> tuple[list[tuple[int, ...]], str]:
    try:
        from sdxl_core.models import SDXL_UNET_CONFIG

        shapes = cc.unet_conv3x3_shapes(SDXL_UNET_CONFIG, batch=2, latent=128)
    except Exception as err:  # no diffusers, or one whose UNet cannot run on the meta device
        return list(cc.SDXL_CONV3X3), f"static table (diffusers UNet unavailable: {one_line(err)})"
    if shapes != list(cc.SDXL_CONV3X3):
        print("warning: the diffusers UNet's conv shapes differ from conv_cutlass.SDXL_CONV3X3", file=sys.stderr)
    return shapes, "diffusers UNet2DConditionModel (SDXL config), meta-device forward"


def quantizer(fmt: str, compile_it: bool):
    """x (fp16, any memory format) -> 8-bit with the same layout: one fused kernel when compiled."""

    def quantize_int8(x, scale):
        return torch.round(x.float() * (1.0 / scale)).clamp(-128, 127).to(torch.int8)

    def quantize_fp8(x, scale):
        return (x.float() / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)

    fn = quantize_int8 if fmt == "int8" else quantize_fp8
    if not compile_it:
        return fn, "eager"
    try:
        return torch.compile(fn, dynamic=True), "torch.compile"
    except Exception as err:  # keep timing with the eager ops rather than stop
        print(f"torch.compile unavailable ({type(err).__name__}): timing eager quantize", file=sys.stderr)
        return fn, "eager"


def rel_err(out, ref) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


class Bench:
    def __init__(self, args, meta):
        from triton.testing import do_bench

        self.do_bench, self.args, self.meta = do_bench, args, meta
        self.rows: list[dict] = []
        self.quant = {fmt: quantizer(fmt, not args.eager_quantize) for fmt in args.formats}
        meta["quantize_kernel"] = {fmt: q[1] for fmt, q in self.quant.items()}

    def time_us(self, fn) -> float:
        return self.do_bench(fn, warmup=self.args.warmup, rep=self.args.rep, return_mode="median") * 1e3

    def add(self, row: dict):
        self.rows.append(row)
        print(format_row(row), flush=True)
        self.save()

    def save(self, summary=None):
        if not self.args.out:
            return
        self.args.out.mkdir(parents=True, exist_ok=True)
        data = {"meta": self.meta, "rows": self.rows, "summary": summary or summarize(self.rows)}
        tmp = self.args.out / "conv_shapes.json.tmp"
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(self.args.out / "conv_shapes.json")

    def run_shape(self, index, n, h, w, c, k, stride, layers):
        p, q = cc.output_hw(h, w, 3, 3, stride, 1)
        flops = 2.0 * n * p * q * k * c * 9
        base = {"shape": index, "N": n, "H": h, "W": w, "C": c, "K": k, "stride": stride, "layers": layers,
                "gflop": flops / 1e9}
        g = torch.Generator(device="cuda").manual_seed(index)
        x = torch.randn(n, c, h, w, device="cuda", dtype=torch.float16, generator=g)
        weight = torch.randn(k, c, 3, 3, device="cuda", dtype=torch.float16, generator=g) / (9 * c) ** 0.5
        bias = torch.randn(k, device="cuda", dtype=torch.float16, generator=g) * 0.1
        x_cl, w_cl = x.to(memory_format=torch.channels_last), weight.to(memory_format=torch.channels_last)
        ref16 = F.conv2d(x_cl, w_cl, bias, stride, 1)

        fp16_rows = []
        for name, xi, wi in (("fp16_cl", x_cl, w_cl), ("fp16_nchw", x, weight)):
            row = dict(base, kernel=name)
            try:
                t = self.time_us(lambda xi=xi, wi=wi: F.conv2d(xi, wi, bias, stride, 1))
                row.update(time_us=t, tflops=flops / (t * 1e-6) / 1e12)
            except Exception as err:
                row["error"] = one_line(err)
            fp16_rows.append(row)
        best16 = min((r["time_us"] for r in fp16_rows if "time_us" in r), default=None)
        for row in fp16_rows:
            if best16 and "time_us" in row:
                row["vs_fp16"] = best16 / row["time_us"]
            self.add(row)

        for fmt in self.args.formats:
            self.run_format(fmt, base, x_cl, weight, bias, stride, flops, ref16, best16)

    def run_format(self, fmt, base, x_cl, weight, bias, stride, flops, ref16, best16):
        quantize, _ = self.quant[fmt]
        a_scale = (x_cl.float().abs().amax() / QMAX[fmt]).reshape(())
        if fmt == "int8":
            w_scale = weight.float().abs().amax(dim=(1, 2, 3)) / 127.0
            w_q = torch.round(weight.float() / w_scale.reshape(-1, 1, 1, 1)).clamp(-128, 127).to(torch.int8)
        else:  # the engines' FP8 weights are per-tensor; the kernel takes it expanded to [K]
            w_scale = (weight.float().abs().amax() / 448.0).expand(weight.shape[0]).contiguous()
            w_q = (weight.float() / w_scale[0]).clamp(-448, 448).to(torch.float8_e4m3fn)
        w_krsc = cc.weight_krsc(w_q)
        row = dict(base, kernel=f"quant_{fmt}")
        quant_us = None
        try:
            x_q = quantize(x_cl, a_scale)
            if not x_q.is_contiguous(memory_format=torch.channels_last):  # the compiled kernel chose NCHW
                self.quant[fmt] = quantizer(fmt, False)
                quantize = self.quant[fmt][0]
                self.meta["quantize_kernel"][fmt] = "eager (the compiled one lost channels_last)"
                x_q = quantize(x_cl, a_scale)
            quant_us = self.time_us(lambda: quantize(x_cl, a_scale))
            row["time_us"] = quant_us
            row["gbytes_per_s"] = x_cl.numel() * 3 / (quant_us * 1e-6) / 1e9  # read fp16, write 8-bit
        except Exception as err:
            row["error"] = one_line(err)
            x_q = None
        self.add(row)
        if x_q is None:
            return
        with torch.backends.cudnn.flags(enabled=True, benchmark=False):  # no algorithm search for float64 convs
            exact = cc.conv2d_reference(x_q, w_krsc, a_scale, w_scale, bias, stride, 1, out_dtype=torch.float64)
        for config, name in enumerate(cc.configs(fmt)):
            if self.args.configs is not None and config not in self.args.configs:
                continue
            row = dict(base, kernel=f"{fmt}/{name}", config=config)
            try:
                out = cc.conv2d(x_q, w_krsc, a_scale, w_scale, bias, stride, 1, torch.float16, config)
                torch.cuda.synchronize()
                row["err_exact"] = rel_err(out, exact)
                row["err_fp16"] = rel_err(out, ref16)
                t = self.time_us(lambda config=config: cc.conv2d(x_q, w_krsc, a_scale, w_scale, bias, stride, 1,
                                                                  torch.float16, config))
                row.update(time_us=t, tflops=flops / (t * 1e-6) / 1e12)
                if best16:
                    row["vs_fp16"] = best16 / t
                    if quant_us:
                        row["vs_fp16_with_quant"] = best16 / (t + quant_us)
            except Exception as err:  # one failing config must not hide the others
                row["error"] = one_line(err)
            self.add(row)
        del exact


def one_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def format_row(r: dict) -> str:
    shape = f"{r['N']}x{r['H']}x{r['W']} {r['C']}->{r['K']} s{r['stride']}"
    head = f"{shape:>24} x{r['layers']:<2} {r['kernel']:<28}"
    if "error" in r:
        return f"{head} ERROR {r['error']}"

    def col(key, fmt):
        return format(r[key], fmt) if key in r else " " * len(format(0.0, fmt))

    return (f"{head} {r['time_us']:9.1f} {col('tflops', '8.1f')} {col('vs_fp16', '7.2f')} "
            f"{col('vs_fp16_with_quant', '7.2f')} {col('err_exact', '9.2e')} {col('err_fp16', '9.2e')}")


HEADER = (f"{'shape':>24} {'n':<3} {'kernel':<28} {'time_us':>9} {'TFLOP/s':>8} {'vs_fp16':>7} {'+quant':>7} "
          f"{'err_exact':>9} {'err_fp16':>9}")


def summarize(rows: list[dict]) -> dict:
    """One UNet step's 3x3-conv time (us) for fp16 (faster layout per shape) and for each 8-bit format (its best
    config per shape), with and without a separate quantize kernel per conv."""
    shapes = {}
    for r in rows:
        if "time_us" in r:
            shapes.setdefault(r["shape"], {"layers": r["layers"]})[r["kernel"]] = r["time_us"]
    total: dict = {}
    best_configs: dict = {}
    for index, times in shapes.items():
        layers = times["layers"]
        fp16 = [t for name, t in times.items() if name.startswith("fp16")]
        if not fp16:
            continue
        entries = {"fp16": min(fp16)}
        for fmt in ("int8", "fp8"):
            convs = {name: t for name, t in times.items() if name.startswith(f"{fmt}/")}
            if convs:
                best = min(convs, key=convs.get)
                best_configs.setdefault(fmt, {})[index] = best.split("/", 1)[1]
                entries[fmt] = convs[best]
                if f"quant_{fmt}" in times:
                    entries[f"{fmt}+quant"] = convs[best] + times[f"quant_{fmt}"]
        for name, t in entries.items():
            total[name] = total.get(name, 0.0) + layers * t
    covered = sorted(shapes)
    return {"us_per_unet_step": total, "best_config_per_shape": best_configs, "shapes_measured": covered,
            "speedup_vs_fp16": {k: total["fp16"] / v for k, v in total.items() if k != "fp16" and v} if total
            else {}}


def best_table(rows: list[dict]) -> list[str]:
    """One line per shape: the faster fp16 layout, then each format's best config with its speed-up alone and
    with the quantize glue added, and its error against the exact conv."""
    lines = [f"{'shape':>24} {'n':<3} {'fp16_us':>8} | {'format':<5} {'best config':<22} {'us':>7} {'vs_fp16':>7} "
             f"{'+quant':>7} {'err_exact':>9}"]
    by_shape: dict = {}
    for r in rows:
        by_shape.setdefault(r["shape"], []).append(r)
    for group in by_shape.values():
        r0 = group[0]
        shape = f"{r0['N']}x{r0['H']}x{r0['W']} {r0['C']}->{r0['K']} s{r0['stride']}"
        fp16 = min((r["time_us"] for r in group if r["kernel"].startswith("fp16") and "time_us" in r), default=None)
        head = f"{shape:>24} x{r0['layers']:<2} {fp16 or float('nan'):8.1f}"
        for fmt in ("int8", "fp8"):
            convs = [r for r in group if r["kernel"].startswith(f"{fmt}/") and "time_us" in r]
            if not convs:
                continue
            best = min(convs, key=lambda r: r["time_us"])
            speedup, with_quant = best.get("vs_fp16", float("nan")), best.get("vs_fp16_with_quant", float("nan"))
            lines.append(f"{head} | {fmt:<5} {best['kernel'].split('/', 1)[1]:<22} {best['time_us']:7.1f} "
                         f"{speedup:7.2f} {with_quant:7.2f} {best.get('err_exact', float('nan')):9.2e}")
            head = " " * len(head)
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="directory for conv_shapes.json (rewritten after every row)")
    parser.add_argument("--quick", action="store_true", help=f"only shapes {QUICK_SHAPES}")
    parser.add_argument("--shapes", default=None, help="comma-separated shape indices (default: all)")
    parser.add_argument("--formats", default="int8,fp8", help="comma-separated subset of int8,fp8")
    parser.add_argument("--configs", default=None, help="comma-separated config indices (default: all)")
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    parser.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    parser.add_argument("--eager-quantize", action="store_true", help="time the quantize glue as eager torch ops")
    parser.add_argument("--no-cudnn-benchmark", action="store_true", help="leave cudnn.benchmark off for fp16")
    args = parser.parse_args(argv)
    args.formats = [f for f in args.formats.split(",") if f]
    args.configs = None if args.configs is None else {int(i) for i in args.configs.split(",")}
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    reason = cc.unavailable_reason()
    if reason:
        sys.exit(f"the 8-bit CUTLASS conv cannot run here: {reason}")
    torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark

    shapes, source = sdxl_shapes()
    chosen = QUICK_SHAPES if args.quick else range(len(shapes))
    if args.shapes:
        chosen = [int(i) for i in args.shapes.split(",")]
    import triton

    meta = {
        "device": torch.cuda.get_device_name(),
        "capability": list(torch.cuda.get_device_capability()),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "shape_source": source,
        "configs": {fmt: cc.configs(fmt) for fmt in args.formats},
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    print(" ".join(f"{k}={v}" for k, v in meta.items() if k != "configs"))
    for fmt, names in meta["configs"].items():
        print(f"{fmt} configs: " + ", ".join(f"{i}={n}" for i, n in enumerate(names)))
    bench = Bench(args, meta)
    print(HEADER)
    for index in chosen:
        bench.run_shape(index, *shapes[index])
    summary = summarize(bench.rows)
    bench.save(summary)
    print("\nbest 8-bit config per shape:")
    print("\n".join(best_table(bench.rows)))
    print("one UNet step's 3x3 convs (us):", {k: round(v, 1) for k, v in summary["us_per_unet_step"].items()})
    print("speed-up vs fp16:", {k: round(v, 3) for k, v in summary["speedup_vs_fp16"].items()})
    if args.out:
        print(f"wrote {args.out / 'conv_shapes.json'}")


if __name__ == "__main__":
    main()
