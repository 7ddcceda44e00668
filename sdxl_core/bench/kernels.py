"""Per-shape table of the SDXL UNet's GEMMs (and 8-bit convs where available): 16 bits against every 8-bit kernel.

    sdxl-bench kernels --out results/            # on a Hopper GPU
    sdxl-bench kernels --quick --out results/    # three shapes

For each shape and number format a random 8-bit layer is made, and every candidate the build-time dispatch
chooses among (`gemm_dispatch.candidates`: cuBLAS fp16, the INT8 Triton and CUTLASS kernels, cuBLAS FP8) is
first checked against a float64 reference on the same quantized values, then timed with the dispatch's own
timer (`timing.graph_ms`: CUDA-graph replays, median). Each row gives microseconds, TFLOP/s (TOPS for
8-bit) and the speed-up over 16 bits; the file is rewritten after every row.
"""

from __future__ import annotations

import torch

from .. import gemm_dispatch, qmodules
from ..errors import UserError
from ..kernels import shapes
from ..timing import graph_ms
from .results import ResultFile, table

# How many layers of the unfused SDXL UNet run each shape of `shapes.SDXL_LINEAR_SHAPES` (the rest appear
# with fused attention projections).
LAYERS = {(154, 2048, 640): 20, (154, 2048, 1280): 120, (2048, 1280, 1280): 372, (2048, 1280, 10240): 60,
          (2048, 5120, 1280): 60, (8192, 640, 640): 70, (8192, 640, 5120): 10, (8192, 2560, 640): 10}
QUICK = [(2048, 1280, 1280), (8192, 640, 5120), (154, 2048, 1280)]


def add_arguments(p) -> None:
    p.add_argument("--formats", default="int8,fp8", help="8-bit formats to time, from int8,fp8")
    p.add_argument("--quick", action="store_true", help=f"only {len(QUICK)} shapes")
    p.add_argument("--out", required=True, help="directory for kernels.json")


def layer_for(fmt: str, m: int, k: int, n: int, device, dtype=torch.float16) -> qmodules.QLinear:
    """A random 8-bit linear layer of this shape, as a calibrated engine would hold it."""
    linear = torch.nn.Linear(k, n, device=device, dtype=dtype)
    cls = qmodules.Int8Linear if fmt == "int8" else qmodules.Fp8Linear
    per_channel = fmt == "int8"
    w_amax = linear.weight.detach().float().abs().amax(dim=1 if per_channel else None)
    return cls.from_float(linear, w_amax=w_amax, a_amax=torch.tensor(4.0, device=device)).eval()


def main(args) -> int:
    if not torch.cuda.is_available():
        raise UserError("sdxl-bench kernels times GPU kernels: PyTorch sees no CUDA GPU")
    formats = [f for f in args.formats.split(",") if f]
    if any(f not in ("int8", "fp8") for f in formats):
        raise UserError(f"--formats takes int8 and fp8, got {args.formats!r}")
    device = torch.device("cuda")
    result = ResultFile(args.out, "kernels", device)
    gemms = QUICK if args.quick else shapes.SDXL_LINEAR_SHAPES
    for (m, k, n) in gemms:
        for fmt in formats:
            layer = layer_for(fmt, m, k, n, device)
            with torch.inference_mode():
                calls, x = gemm_dispatch.candidates(layer, "gemm", (m, k, n), torch.float16)
                errors = {name: gemm_dispatch.relative_error(layer, fn, x, name) for name, fn in calls.items()}
                ms = {name: graph_ms(fn) for name, fn in calls.items()}
            flop = 2.0 * m * k * n
            row = result.add({"op": "gemm", "fmt": fmt, "shape": [m, k, n], "layers": LAYERS.get((m, k, n)),
                              "ms": ms, "tflops": {name: round(flop / t / 1e9, 1) for name, t in ms.items()},
                              "speedup": {name: round(ms["16bit"] / t, 3) for name, t in ms.items()},
                              "rel_err": errors})
            best = min((name for name in ms if name != "16bit"), key=ms.get)
            print(f"{fmt} {m}x{k}->{n}: 16bit {ms['16bit'] * 1e3:.1f} us, best 8-bit {best} "
                  f"{ms[best] * 1e3:.1f} us ({row['speedup'][best]:.2f}x)", flush=True)
    print(render(result.data))
    return 0


def render(data: dict) -> str:
    rows = []
    for r in data["rows"]:
        eight = {name: t for name, t in r["ms"].items() if name != "16bit"}
        best = min(eight, key=eight.get)
        rows.append([r["fmt"], r["op"], " x ".join(map(str, r["shape"])), r.get("layers"),
                     f"{r['ms']['16bit'] * 1e3:.1f} ({r['tflops']['16bit']:.0f})",
                     f"{best}: {eight[best] * 1e3:.1f} ({r['tflops'][best]:.0f})", f"{r['speedup'][best]:.2f}x",
                     ", ".join(f"{name} {r['speedup'][name]:.2f}x" for name in eight),
                     f"{max(r['rel_err'].values()):.1e}"])
    columns = ["fmt", "op", "shape", "layers", "16-bit us (TFLOP/s)", "best 8-bit us (TOPS)", "speed-up",
               "every 8-bit candidate", "max rel. err"]
    return table(columns, rows) + "\n"
