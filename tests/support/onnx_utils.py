"""ONNX helpers the tests use: where Q/DQ pairs landed in an exported graph, and running a graph on the CPU."""

from __future__ import annotations

import os

import torch

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
        record = {
            "name": node.name,
            "op": node.op_type,
            "module": module,
            "input_dq": input_dq,
            "weight_dq": weight_dq,
            "has_weight": weight_const and not input_const,
        }
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
