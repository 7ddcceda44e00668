"""Export the SDXL components to ONNX (what TensorRT parses) and count where Q/DQ pairs landed.

Graphs have the static shapes of one variant and named inputs/outputs, as the reference demo's:

    clip   input_ids[int32 B,77] -> hidden_states                 (penultimate layer)
    clip2  input_ids[int32 B,77] -> hidden_states, text_embeds    (penultimate layer, pooled projection)
    unet   sample, timestep[fp32 (1,)], encoder_hidden_states, text_embeds, time_ids -> latent
    vae    latent -> images                                       (decoder only, pixels in [-1, 1])

B is `variant.unet_batch` for the text encoders and the UNet (CFG doubles it), `variant.batch_size`
for the VAE. Floating inputs take the dtype of the module being exported: fp16 modules on a GPU give
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
onnx-opset19.fp16.<digest>`. A directory is written whole into a temp dir and renamed into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from .variants import Variant, _slug

OPSET = 19  # the reference demo's default; needed for FP8 and fp16-scale Q/DQ
TEXT_MAXLEN = 77
TIME_IDS = 6  # (orig h, orig w, crop top, crop left, target h, target w)
COMPONENTS = ("clip", "clip2", "unet", "vae")
EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # protobuf's hard limit is 2 GiB; leave room for the graph
MODEL_FILE = "model.onnx"

UNET_INPUTS = ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids")
UNET_OUTPUTS = ("latent",)

# Defaults for shape helpers when no module config is given: SDXL base.
_SDXL = {"in_channels": 4, "out_channels": 4, "cross_attention_dim": 2048, "addition_time_embed_dim": 256,
         "projection_class_embeddings_input_dim": 2816, "latent_channels": 4, "vae_out_channels": 3,
         "clip_hidden": 768, "clip2_hidden": 1280, "clip2_projection": 1280}


# --------------------------------------------------------------------------- names and shapes

def dtype_tag(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


def component_key(variant: Variant, component: str, backend_version: str, device_tag: str) -> str:
    """The UNet uses `Variant.engine_key`; the other components get a key in the same style.

    e.g. `clip2.bs2.sdxl-random.tensorrt10-8-0-43.sm90.<digest>`, `vae.bs1.h1024w1024.sdxl-random...`.
    """
    if component == "unet":
        return variant.engine_key(backend_version, device_tag)
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}: one of {COMPONENTS}")
    batch = variant.batch_size if component == "vae" else variant.unet_batch
    knobs = {"component": component, "model": variant.model, "batch": batch, "backend": variant.backend,
             "lora": (variant.lora_path, variant.lora_scale) if variant.lora_path else None}
    parts = [component, f"bs{batch}"]
    if component == "vae":
        knobs.update(height=variant.height, width=variant.width)
        parts.append(f"h{variant.height}w{variant.width}")
    parts.append(_slug(variant.model))
    if variant.lora_path:
        parts.append(f"lora{variant.lora_scale:g}")
    parts += [_slug(f"{variant.backend}{backend_version}"), _slug(device_tag)]
    digest = hashlib.sha256(repr(sorted(knobs.items())).encode() + device_tag.encode()
                            + backend_version.encode()).hexdigest()[:10]
    return ".".join(parts + [digest])


def onnx_key(variant: Variant, component: str, dtype: torch.dtype, opset: int = OPSET) -> str:
    """The engine key with the backend part replaced by `onnx-opset<N>` and the device part by the dtype."""
    return component_key(variant.replace(backend="onnx"), component, f"-opset{opset}", dtype_tag(dtype))


def onnx_path(onnx_dir: str | os.PathLike, variant: Variant, component: str, dtype: torch.dtype,
              opset: int = OPSET) -> Path:
    return Path(onnx_dir) / onnx_key(variant, component, dtype, opset) / MODEL_FILE


def _cfg(config, key, default):
    if config is None:
        return default
    value = config.get(key, None) if hasattr(config, "get") else getattr(config, key, None)
    return default if value is None else value


def unet_io_shapes(variant: Variant, config=None) -> dict[str, tuple[int, ...]]:
    """Static shapes of the UNet graph's inputs and its output. `config`: the UNet's (default: SDXL base)."""
    b, h, w = variant.unet_batch, variant.height // 8, variant.width // 8
    time_dim = _cfg(config, "addition_time_embed_dim", _SDXL["addition_time_embed_dim"])
    text_embeds = _cfg(config, "projection_class_embeddings_input_dim",
                       _SDXL["projection_class_embeddings_input_dim"]) - TIME_IDS * time_dim
    return {
        "sample": (b, _cfg(config, "in_channels", _SDXL["in_channels"]), h, w),
        "timestep": (1,),
        "encoder_hidden_states": (b, TEXT_MAXLEN, _cfg(config, "cross_attention_dim", _SDXL["cross_attention_dim"])),
        "text_embeds": (b, text_embeds),
        "time_ids": (b, TIME_IDS),
        "latent": (b, _cfg(config, "out_channels", _SDXL["out_channels"]), h, w),
    }


def text_encoder_io_shapes(variant: Variant, config=None, *, pooled: bool = False) -> dict[str, tuple[int, ...]]:
    b = variant.unet_batch
    default_hidden = _SDXL["clip2_hidden"] if pooled else _SDXL["clip_hidden"]
    hidden = _cfg(config, "hidden_size", default_hidden)
    shapes = {"input_ids": (b, TEXT_MAXLEN), "hidden_states": (b, TEXT_MAXLEN, hidden)}
    if pooled:
        shapes["text_embeds"] = (b, _cfg(config, "projection_dim", _SDXL["clip2_projection"]))
    return shapes


def vae_io_shapes(variant: Variant, config=None) -> dict[str, tuple[int, ...]]:
    b = variant.batch_size
    return {"latent": (b, _cfg(config, "latent_channels", _SDXL["latent_channels"]), variant.height // 8,
                       variant.width // 8),
            "images": (b, _cfg(config, "out_channels", _SDXL["vae_out_channels"]), variant.height, variant.width)}


def io_shapes(variant: Variant, component: str, config=None) -> dict[str, tuple[int, ...]]:
    if component == "unet":
        return unet_io_shapes(variant, config)
    if component == "vae":
        return vae_io_shapes(variant, config)
    return text_encoder_io_shapes(variant, config, pooled=component == "clip2")


IO_NAMES = {
    "clip": (("input_ids",), ("hidden_states",)),
    "clip2": (("input_ids",), ("hidden_states", "text_embeds")),
    "unet": (UNET_INPUTS, UNET_OUTPUTS),
    "vae": (("latent",), ("images",)),
}


# --------------------------------------------------------------------------- wrappers (positional inputs)

class UNetWrapper(torch.nn.Module):
    """The diffusers UNet with the five positional inputs the graph has. Node names start with `/unet/`."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                         added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}, return_dict=False)[0]


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


def _module_dtype_device(module: torch.nn.Module) -> tuple[torch.dtype, torch.device]:
    p = next(module.parameters())
    return p.dtype, p.device


def example_inputs(variant: Variant, component: str, module: torch.nn.Module, *, seed: int = 0,
                   device=None, dtype=None) -> tuple[torch.Tensor, ...]:
    """Random inputs of the graph's shapes, in the module's dtype and device (seeded, CPU generator)."""
    mdtype, mdevice = _module_dtype_device(module)
    dtype, device = dtype or mdtype, device or mdevice
    gen = torch.Generator("cpu").manual_seed(seed)
    inputs, _ = IO_NAMES[component]
    shapes = io_shapes(variant, component, getattr(module, "config", None))
    out = []
    for name in inputs:
        shape = shapes[name]
        if name == "input_ids":
            vocab = _cfg(getattr(module, "config", None), "vocab_size", 49408)
            ids = torch.randint(0, vocab - 2, shape, generator=gen, dtype=torch.int32)
            ids[:, 0], ids[:, -1] = vocab - 2, vocab - 1  # BOS ... EOS (pooling takes the EOS position)
            out.append(ids.to(device))
        elif name == "timestep":
            out.append(torch.tensor([999.0], dtype=torch.float32, device=device))
        elif name == "time_ids":
            hw = [variant.height, variant.width, 0, 0, variant.height, variant.width]
            out.append(torch.tensor([hw] * shape[0], dtype=dtype, device=device))
        else:
            out.append(torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype))
    return tuple(out)


# --------------------------------------------------------------------------- export

def export_unet(unet: torch.nn.Module, variant: Variant, path: str | os.PathLike, *, opset: int = OPSET,
                external_data: bool | None = None, progress: bool = False) -> Path:
    """Export a diffusers UNet (plain or ModelOpt fake-quant) to `path` (a `.../model.onnx`)."""
    args = example_inputs(variant, "unet", unet)
    return _export(UNetWrapper(unet).eval(), args, path, "unet", opset=opset, external_data=external_data,
                   progress=progress)


def export_text_encoder(encoder: torch.nn.Module, variant: Variant, path: str | os.PathLike, *,
                        pooled: bool | None = None, opset: int = OPSET, external_data: bool | None = None,
                        progress: bool = False) -> Path:
    """CLIPTextModel -> `clip` graph; CLIPTextModelWithProjection (pooled) -> `clip2` graph."""
    if pooled is None:
        pooled = hasattr(encoder, "text_projection")
    component = "clip2" if pooled else "clip"
    args = example_inputs(variant, component, encoder)
    return _export(TextEncoderWrapper(encoder, pooled).eval(), args, path, component, opset=opset,
                   external_data=external_data, progress=progress)


def export_vae(vae: torch.nn.Module, variant: Variant, path: str | os.PathLike, *, opset: int = OPSET,
               external_data: bool | None = None, progress: bool = False) -> Path:
    args = example_inputs(variant, "vae", vae)
    return _export(VaeDecoderWrapper(vae).eval(), args, path, "vae", opset=opset, external_data=external_data,
                   progress=progress)


def export_component(components, variant: Variant, component: str, onnx_dir: str | os.PathLike, *,
                     opset: int = OPSET, unet: torch.nn.Module | None = None, progress: bool = False) -> Path:
    """Export one component of `components` into its place under `onnx_dir`, unless it is already there.

    `unet` overrides `components.unet` (e.g. the ModelOpt-quantized UNet). Holds a build lock on the directory.
    """
    from .files import build_lock

    module = {"clip": components.text_encoder, "clip2": components.text_encoder_2,
              "unet": unet if unet is not None else components.unet, "vae": components.vae}[component]
    dtype, _ = _module_dtype_device(module)
    path = onnx_path(onnx_dir, variant, component, dtype, opset)
    with build_lock(path.parent):
        if path.is_file():
            return path
        if component == "unet":
            return export_unet(module, variant, path, opset=opset, progress=progress)
        if component == "vae":
            return export_vae(module, variant, path, opset=opset, progress=progress)
        return export_text_encoder(module, variant, path, pooled=component == "clip2", opset=opset,
                                   progress=progress)


def _export(module: torch.nn.Module, args: tuple, path, component: str, *, opset: int,
            external_data: bool | None, progress: bool) -> Path:
    import onnx

    path = Path(path)
    final_dir = path.parent
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    input_names, output_names = IO_NAMES[component]
    start = time.perf_counter()
    if progress:
        print(f"[export] {component} -> {path} (opset {opset}) ...", file=sys.stderr, flush=True)
    work = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.", suffix=".tmp", dir=final_dir.parent))
    try:
        raw_dir, out_dir = work / "raw", work / "out"
        raw_dir.mkdir()
        out_dir.mkdir()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)  # "legacy TorchScript-based export"
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message="Exporting aten::index operator")  # indices are >= 0
            torch.onnx.export(module, args, str(raw_dir / MODEL_FILE), input_names=list(input_names),
                              output_names=list(output_names), opset_version=opset, dynamo=False)
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
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`; an existing `dst` (another writer's equal result) is moved aside first."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.{os.getpid()}.old")
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


# --------------------------------------------------------------------------- Q/DQ census

GEMM_OPS = ("MatMul", "Gemm", "Conv")
_PASS_THROUGH = ("Transpose", "Reshape", "Cast", "Identity", "Squeeze", "Unsqueeze", "Flatten")


def module_name_of(node_name: str, root: str = "unet") -> str:
    """`/unet/down_blocks.1/attentions.0/proj_in/MatMul` -> `down_blocks.1.attentions.0.proj_in`.

    The TorchScript exporter names nodes `/<module path with / for .>/<Op>[_<n>]`; the wrapper's
    attribute (`unet`, `encoder`, `vae`) is the first component and is dropped.
    """
    parts = [p for p in node_name.split("/") if p]
    parts = parts[:-1]
    if parts and parts[0] == root:
        parts = parts[1:]
    return ".".join(parts)


def count_qdq(onnx_file: str | os.PathLike, *, root: str = "unet") -> dict:
    """Which MatMul/Gemm/Conv nodes read a DequantizeLinear on their data (input 0) and weight (input 1).

    Walks back through layout ops (Transpose, Reshape, Cast, ...) from each input. Returns
      quantize_linear / dequantize_linear: node counts;
      by_op: {op: {"total", "quantized" (both inputs DQ), "weight_only", "input_only"}};
      layers: {module name: {"op", "input_dq", "weight_dq"}} for nodes with a constant weight;
      quantized: sorted module names whose weighted node has DQ on both inputs;
      bmm: sorted module names of weightless MatMuls (attention BMMs) with DQ on both inputs;
      nodes: per-node records (name, op, module, input_dq, weight_dq, has_weight).
    """
    import onnx

    model = onnx.load(str(onnx_file), load_external_data=False)
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    constants = {t.name for t in graph.initializer}
    constants |= {out for node in graph.node if node.op_type == "Constant" for out in node.output}

    def trace(name: str, depth: int = 6) -> tuple[bool, bool]:
        """(reaches a DequantizeLinear, comes from a constant weight) for tensor `name`."""
        dq = False
        for _ in range(depth):
            if name in constants:
                return dq, True
            node = producer.get(name)
            if node is None:
                return dq, False
            if node.op_type == "DequantizeLinear":
                dq = True
                name = node.input[0]
            elif node.op_type == "QuantizeLinear" or node.op_type in _PASS_THROUGH:
                name = node.input[0]
            else:
                return dq, False
        return dq, False

    by_op = {op: {"total": 0, "quantized": 0, "weight_only": 0, "input_only": 0} for op in GEMM_OPS}
    nodes, layers, bmm = [], {}, set()
    for node in graph.node:
        if node.op_type not in GEMM_OPS or len(node.input) < 2:
            continue
        input_dq, input_const = trace(node.input[0])
        weight_dq, weight_const = trace(node.input[1])
        module = module_name_of(node.name, root)
        record = {"name": node.name, "op": node.op_type, "module": module, "input_dq": input_dq,
                  "weight_dq": weight_dq, "has_weight": weight_const and not input_const}
        nodes.append(record)
        counts = by_op[node.op_type]
        counts["total"] += 1
        counts["quantized"] += input_dq and weight_dq
        counts["weight_only"] += weight_dq and not input_dq
        counts["input_only"] += input_dq and not weight_dq
        if record["has_weight"]:
            layers[module] = {"op": node.op_type, "input_dq": input_dq, "weight_dq": weight_dq}
        elif input_dq and weight_dq:
            bmm.add(module)
    ops = [n.op_type for n in graph.node]
    return {
        "quantize_linear": ops.count("QuantizeLinear"),
        "dequantize_linear": ops.count("DequantizeLinear"),
        "by_op": by_op,
        "layers": layers,
        "quantized": sorted(m for m, r in layers.items() if r["input_dq"] and r["weight_dq"]),
        "bmm": sorted(bmm),
        "nodes": nodes,
    }


def ort_session(onnx_file: str | os.PathLike, threads: int = 1):
    """An onnxruntime CPU session (for parity checks; one thread suits the tiny models)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = options.inter_op_num_threads = threads
    return ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])


def run_onnx(onnx_file: str | os.PathLike, inputs: tuple[torch.Tensor, ...] | dict) -> list:
    """Run a graph on onnxruntime's CPU provider; positional inputs follow the graph's input order."""
    session = ort_session(onnx_file)
    names = [i.name for i in session.get_inputs()]
    feed = inputs if isinstance(inputs, dict) else dict(zip(names, inputs, strict=True))
    return session.run(None, {k: v.detach().cpu().numpy() for k, v in feed.items()})
