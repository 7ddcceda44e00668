"""Markdown for the GPU measurements' result files (`sdxl-bench engines|kernels|profile`, see results.py).

`sdxl-bench report` renders any of them; the profile's kernel groups are defined here, where they are shown.
"""

from __future__ import annotations

import re

from sdxl_core.errors import UserError
from sdxl_core.reports.tables import markdown_table

GROUPS = [  # (group, pattern over the lower-cased kernel or op name); the first match wins
    ("Inductor norm/pointwise", r"^triton_(poi|per|red)_"),
    ("Inductor GEMM template", r"^triton_tem_"),
    ("LayerNorm (Triton, ours)", r"_layernorm8|sdxl_bench::(add_)?layernorm8"),  # before "norm (eager)"
    ("GEGLU (Triton, ours)", r"_geglu_act8|sdxl_bench::geglu_act8"),
    ("8-bit GEMM (Triton, ours)", r"_w8a8|sdxl_bench::int8_mm"),  # the op name is what a CPU profile sees
    ("8-bit conv (CUTLASS, ours)", r"cutlass.*conv|conv.*cutlass"),
    ("8-bit GEMM (CUTLASS, ours)", r"cutlass"),
    ("attention", r"sdpa|flash|fmha|attention|softmax"),
    ("convolution (cuDNN)", r"fprop|implicit_convolve|conv|winograd|dgrad"),
    # cuBLAS names its FP8 kernels by operand types: nvjet_sm90_qqhsh_... takes two e4m3 ("qq") operands
    ("8-bit GEMM (cuBLAS FP8)", r"e4m3|f8f8|_scaled_mm|qgmma|nvjet_sm\d+_qq|sdxl_bench::fp8_mm"),
    ("16-bit GEMM (cuBLAS)", r"gemm|nvjet|xmma|cublas|sm90_|\bmm\b|addmm|aten::linear|aten::matmul"),
    ("norm (eager)", r"norm"),
    ("copy/cast", r"copy|cast|contiguous|\bcat\b|catarray"),
    ("pointwise (eager)", r"elementwise|vectorized|unrolled|reduce_kernel|aten::(add|mul|div|sub|round|clamp|silu)"),
]


def group_of(name: str) -> str:
    lowered = name.lower()
    return next((group for group, pattern in GROUPS if re.search(pattern, lowered)), "other")


def fmt(value, spec: str = "{:.2f}"):
    return None if value is None else spec.format(value)


def render(data: dict) -> str:
    """Markdown for any result file: a line on where it ran, the command, then its kind's tables."""
    renderers = {"engines": render_engines, "kernels": render_kernels, "profile": render_profile}
    if data.get("kind") not in renderers:
        raise UserError(f"not a result file of kind {', '.join(renderers)}")
    device = data.get("device", {})
    libs = data.get("libraries", {})
    head = (
        f"**{data['kind']}** · {data.get('created', '')} · {device.get('name', '?')} · torch "
        f"{libs.get('torch', '?')}, triton {libs.get('triton', '?')}, CUDA {libs.get('cuda', '-')}\n\n"
        f"    {data.get('command', '')}\n"
    )
    return head + "\n" + renderers[data["kind"]](data)


def render_engines(data: dict) -> str:
    columns = [
        "engine",
        "run",
        "ms/step",
        "TFLOP/s",
        "vs FP16",
        "vs best FP16",
        "rel. err vs FP16",
        "image SSIM",
        "8-bit layers",
        "calibrate s",
        "compile s",
        "graph s",
        "load s",
        "prepare s",
        "engine MiB",
    ]
    rows = []
    for r in data["rows"]:
        paths = r.get("layers_by_path") or {}
        eight = sum(n for p, n in paths.items() if p.endswith("8bit"))
        rows.append(
            [
                r["engine"],
                data.get("mode"),
                fmt(r.get("ms_per_step")),
                fmt(r.get("tflops"), "{:.0f}"),
                fmt(r.get("speedup_vs_fp16"), "{:.3f}x"),
                fmt(r.get("speedup_vs_best_fp16"), "{:.3f}x"),
                fmt(r.get("rel_err_vs_fp16"), "{:.4f}"),
                fmt(r.get("ssim_vs_fp16"), "{:.4f}"),
                f"{eight}/{sum(paths.values())}" if paths else None,
                r.get("calibration_s"),
                r.get("compile_s"),
                r.get("cuda_graph_s"),
                r.get("load_s"),
                r.get("prepare_s"),
                fmt(r["engine_bytes"] / 2**20 if r.get("engine_bytes") else None, "{:.0f}"),
            ]
        )
    return (
        f"`{data.get('model')}` {data.get('size')}x{data.get('size')}, calibration prompts "
        f"{data.get('calibration_size')}\n\n" + markdown_table(columns, rows) + "\n"
    )


def _us(row: dict, name: str) -> str:
    """Microseconds, with TFLOP/s where the row has them (the quantization rows, which move bytes, do not)."""
    tflops = row.get("tflops", {})
    return f"{row['ms'][name] * 1e3:.1f}" + (f" ({tflops[name]:.0f})" if name in tflops else "")


def _err(err) -> str:
    """A rejected candidate's error: a number (GEMM and conv rows), or the reason in words (attention rows)."""
    return f"{err:.1e}" if isinstance(err, int | float) else str(err)


def render_kernels(data: dict) -> str:
    rows = []
    for r in data["rows"]:
        eight = {name: t for name, t in r["ms"].items() if not name.startswith("16bit")}
        best = min(eight, key=eight.get) if eight else None
        rows.append(
            [
                r["fmt"],
                r["op"],
                " x ".join(map(str, r["shape"])),
                r.get("layers"),
                _us(r, "16bit"),
                f"{best}: {_us(r, best)}" if best else None,
                f"{r['speedup'][best]:.2f}x" if best else None,
                ", ".join(f"{name} {r['speedup'][name]:.2f}x" for name in eight),
                ", ".join(f"{name} {_err(err)}" for name, err in r.get("rejected", {}).items()) or None,
            ]
        )
    columns = [
        "fmt",
        "op",
        "shape",
        "layers",
        "16-bit us (TFLOP/s)",
        "best 8-bit us (TOPS)",
        "speed-up",
        "every 8-bit candidate",
        "rejected (rel. err)",
    ]
    return markdown_table(columns, rows) + "\n"


def render_profile(data: dict) -> str:
    engines = [r["engine"] for r in data["rows"]]
    groups = [g for g, _ in GROUPS] + ["other"]
    rows = [
        [g, *[f"{r['ms_by_group'].get(g, 0.0):.2f}" for r in data["rows"]]]
        for g in groups
        if any(r["ms_by_group"].get(g) for r in data["rows"])
    ]
    rows.append(["total", *[f"{r['total_ms']:.2f}" for r in data["rows"]]])
    if all("kernels_per_step" in r for r in data["rows"]):
        rows.append(["kernels per step", *[f"{r['kernels_per_step']:.0f}" for r in data["rows"]]])
    text = [
        f"ms per UNet step (profiler, no CUDA graph), `{data.get('model')}` {data.get('size')}px",
        "",
        markdown_table(["kernel group", *engines], rows),
    ]
    for r in data["rows"]:
        text += [
            "",
            f"{r['engine']}: top kernels (ms per step)",
            "",
            markdown_table(["ms", "kernel"], [[f"{ms:.3f}", f"`{name[:100]}`"] for name, ms in r["top_kernels_ms"]]),
        ]
    return "\n".join(text) + "\n"
