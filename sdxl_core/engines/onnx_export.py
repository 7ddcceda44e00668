"""Export the SDXL components to ONNX (what TensorRT parses).

Graphs have the static shapes of one variant and the named inputs and outputs of `specs.SPECS`, as the
reference demo's. Floating inputs take the dtype of the module being exported: fp16 modules on a GPU give
an fp16 graph (what a strongly typed TensorRT network keeps), fp32 modules on the CPU an fp32 one.

Exporter: the TorchScript exporter, `torch.onnx.export(..., dynamo=False)`. It is still in torch 2.14
(deprecated, with a DeprecationWarning) and it is the path ModelOpt's Q/DQ export is written for: a
ModelOpt `TensorQuantizer` exports through `torch.autograd.Function.symbolic` hooks, which only the
TorchScript exporter calls (INT8 -> ONNX QuantizeLinear/DequantizeLinear; FP8 -> `trt::TRT_FP8*`
custom ops that we rewrite to opset-19 FLOAT8E4M3FN Q/DQ below). The dynamo exporter also failed on
the plain tiny UNet here (it wrote an opset-18 `Split` into an opset-17 model that onnxruntime
rejects), so one exporter serves every graph.

Layout: `<onnx_dir>/<onnx key>/model.onnx` (+ `model.onnx.data` when the weights exceed 2 GB), where
the key follows the engine key, e.g. `unetxl-int8.l2.5.bs2.s30.c32.p1.0.a0.8.h1024w1024.sdxl-random.
onnx-opset19.fp16.<digest>`. A directory is written whole into a temp dir and renamed into place; the
temp dir is named with its writer (`files.temp_name`), so what a killed export left is swept by the next.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch

from sdxl_core import specs
from sdxl_core.files import sweep, temp_name
from sdxl_core.variants import Variant

OPSET = 19  # the reference demo's default; needed for FP8 and fp16-scale Q/DQ
EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # protobuf's hard limit is 2 GiB; leave room for the graph
MODEL_FILE = "model.onnx"


def dtype_tag(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


def onnx_key(variant: Variant, component: str, dtype: torch.dtype, opset: int = OPSET) -> str:
    """The engine key with the backend part replaced by `onnx-opset<N>` and the device part by the dtype."""
    return specs.get(component).key(variant.replace(backend="onnx"), f"-opset{opset}", dtype_tag(dtype))


def onnx_path(
    onnx_dir: str | os.PathLike, variant: Variant, component: str, dtype: torch.dtype, opset: int = OPSET
) -> Path:
    return Path(onnx_dir) / onnx_key(variant, component, dtype, opset) / MODEL_FILE


# --------------------------------------------------------------------------- wrappers (positional inputs)


class UNetWrapper(torch.nn.Module):
    """The diffusers UNet with the five positional inputs the graph has. Node names start with `/unet/`."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
            return_dict=False,
        )[0]


class TextEncoderWrapper(torch.nn.Module):
    """input_ids -> penultimate hidden states (+ the pooled projection for CLIPTextModelWithProjection)."""

    def __init__(self, encoder: torch.nn.Module, pooled: bool):
        super().__init__()
        self.encoder, self.pooled = encoder, pooled

    def forward(self, input_ids):
        out = self.encoder(input_ids, output_hidden_states=True)
        hidden = out.hidden_states[-2]
        return (hidden, out.text_embeds) if self.pooled else hidden


class VaeDecoderWrapper(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        return self.vae.decode(latent, return_dict=False)[0]


# --------------------------------------------------------------------------- export


def export_unet(
    unet: torch.nn.Module,
    variant: Variant,
    path: str | os.PathLike,
    *,
    opset: int = OPSET,
    external_data: bool | None = None,
    progress: bool = False,
) -> Path:
    """Export a diffusers UNet (plain or ModelOpt fake-quant) to `path` (a `.../model.onnx`)."""
    args = specs.SPECS["unet"].sample_inputs(variant, unet)
    return _export(
        UNetWrapper(unet).eval(), args, path, "unet", opset=opset, external_data=external_data, progress=progress
    )


def export_text_encoder(
    encoder: torch.nn.Module,
    variant: Variant,
    path: str | os.PathLike,
    *,
    pooled: bool | None = None,
    opset: int = OPSET,
    external_data: bool | None = None,
    progress: bool = False,
) -> Path:
    """CLIPTextModel -> `clip` graph; CLIPTextModelWithProjection (pooled) -> `clip2` graph."""
    if pooled is None:
        pooled = hasattr(encoder, "text_projection")
    component = "clip2" if pooled else "clip"
    args = specs.SPECS[component].sample_inputs(variant, encoder)
    return _export(
        TextEncoderWrapper(encoder, pooled).eval(),
        args,
        path,
        component,
        opset=opset,
        external_data=external_data,
        progress=progress,
    )


def export_vae(
    vae: torch.nn.Module,
    variant: Variant,
    path: str | os.PathLike,
    *,
    opset: int = OPSET,
    external_data: bool | None = None,
    progress: bool = False,
) -> Path:
    args = specs.SPECS["vae"].sample_inputs(variant, vae)
    return _export(
        VaeDecoderWrapper(vae).eval(), args, path, "vae", opset=opset, external_data=external_data, progress=progress
    )


def export_component(
    components,
    variant: Variant,
    component: str,
    onnx_dir: str | os.PathLike,
    *,
    opset: int = OPSET,
    unet: torch.nn.Module | None = None,
    progress: bool = False,
) -> Path:
    """Export one component of `components` into its place under `onnx_dir`, unless it is already there.

    `unet` overrides `components.unet` (e.g. the ModelOpt-quantized UNet). Holds a build lock on the directory.
    """
    from sdxl_core.files import build_lock

    module = unet if component == "unet" and unet is not None else specs.get(component).module(components)
    dtype = next(module.parameters()).dtype
    path = onnx_path(onnx_dir, variant, component, dtype, opset)
    with build_lock(path.parent):
        if path.is_file():
            return path
        if component == "unet":
            return export_unet(module, variant, path, opset=opset, progress=progress)
        if component == "vae":
            return export_vae(module, variant, path, opset=opset, progress=progress)
        return export_text_encoder(module, variant, path, pooled=component == "clip2", opset=opset, progress=progress)


def _export(
    module: torch.nn.Module,
    args: tuple,
    path,
    component: str,
    *,
    opset: int,
    external_data: bool | None,
    progress: bool,
) -> Path:
    import onnx

    path = Path(path)
    final_dir = path.parent
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    input_names, output_names = specs.SPECS[component].inputs, specs.SPECS[component].outputs
    start = time.perf_counter()
    if progress:
        print(f"[export] {component} -> {path} (opset {opset}) ...", file=sys.stderr, flush=True)
    sweep(final_dir.parent, prefix=f".{final_dir.name}.")  # what exports killed before us left
    work = final_dir.parent / temp_name(final_dir.name)
    work.mkdir()
    try:
        raw_dir, out_dir = work / "raw", work / "out"
        raw_dir.mkdir()
        out_dir.mkdir()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)  # "legacy TorchScript-based export"
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message="Exporting aten::index operator")  # indices are >= 0
            torch.onnx.export(
                module,
                args,
                str(raw_dir / MODEL_FILE),
                input_names=list(input_names),
                output_names=list(output_names),
                opset_version=opset,
                dynamo=False,
            )
        model = onnx.load(str(raw_dir / MODEL_FILE), load_external_data=True)
        model = fp8_custom_ops_to_onnx(model)
        _save(model, out_dir / path.name, external_data)
        shutil.rmtree(raw_dir)
        _replace_dir(out_dir, final_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if progress:
        print(f"[export] {component} done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return path


def _tensor_bytes(model) -> int:
    total = sum(len(t.raw_data) or t.ByteSize() for t in model.graph.initializer)
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                total += len(attr.t.raw_data) or attr.t.ByteSize()
    return total


def _save(model, path: Path, external_data: bool | None) -> None:
    import onnx

    if external_data is None:
        external_data = _tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD
    if external_data:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + ".data",
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(path))


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`; an existing `dst` (another writer's equal result) is moved aside first."""
    if dst.exists():
        old = dst.with_name(temp_name(dst.name, kind="stale"))
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


# --------------------------------------------------------------------------- FP8 custom ops -> ONNX Q/DQ


def fp8_custom_ops_to_onnx(model):
    """Rewrite ModelOpt's `trt::TRT_FP8QuantizeLinear` / `TRT_FP8DequantizeLinear` to standard opset-19
    QuantizeLinear / DequantizeLinear with a FLOAT8E4M3FN zero point (the form TensorRT and onnxruntime read).

    A no-op for graphs without those nodes. Both forms take the same (x, scale) and compute x / scale
    (saturated to e4m3) and q * scale, so only the op type, domain and zero point change.
    """
    import onnx
    from onnx import TensorProto, helper

    kinds = {"TRT_FP8QuantizeLinear": "QuantizeLinear", "TRT_FP8DequantizeLinear": "DequantizeLinear"}
    nodes = [n for n in model.graph.node if n.op_type in kinds]
    if not nodes:
        return model
    zp_name = "fp8_e4m3_zero_point"
    model.graph.initializer.append(helper.make_tensor(zp_name, TensorProto.FLOAT8E4M3FN, [], [0.0]))
    retyped = set()
    for node in nodes:
        node.op_type, node.domain = kinds[node.op_type], ""
        del node.attribute[:]
        while len(node.input) < 3:
            node.input.append(zp_name)
        retyped.update(node.output)
    # The exporter typed the quantized tensors uint8; drop those entries and let inference retype them.
    kept = [v for v in model.graph.value_info if v.name not in retyped]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    used = {n.domain for n in model.graph.node}
    keep = [o for o in model.opset_import if o.domain in used or o.domain in ("", "ai.onnx")]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version < 19:
            opset.version = 19
    # The exporter typed the custom ops' outputs itself; let shape inference redo what it can.
    with contextlib.suppress(Exception):
        model = onnx.shape_inference.infer_shapes(model)
    return model
