"""The engine info: every field a reader uses exists, and every backend writes it where it applies."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch

from sdxl_core import models, run
from sdxl_core.engines import tensorrt as trt_backend
from sdxl_core.engines import torch_backend
from sdxl_core.engines.info import QUANTIZED_FIELDS, EngineInfo
from sdxl_core.variants import VARIANTS

ROOT = Path(__file__).resolve().parents[2]
FIELDS = {f.name for f in dataclasses.fields(EngineInfo)}
TINY_INT8 = VARIANTS["xl-1.0-int8"].replace(model="tiny", height=64, width=64, steps=2, calibration_size=1)
TINY_FP16 = VARIANTS["xl-1.0-fp16"].replace(model="tiny", height=64, width=64, steps=2)


def reader_fields() -> dict[str, list[str]]:
    """Field -> where it is read: `<anything>.info.<field>`, and `info.<field>` in a function that took
    `info = <anything>.info`, across the package and the tests (the backends that write it included)."""
    found: dict[str, list[str]] = {}
    for path in sorted([*ROOT.joinpath("sdxl_core").rglob("*.py"), *ROOT.joinpath("tests").rglob("*.py")]):
        tree = ast.parse(path.read_text(), str(path))
        for scope in [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef))]:
            aliased = any(
                isinstance(n, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "info" for t in n.targets)
                and isinstance(n.value, ast.Attribute)
                and n.value.attr == "info"
                for n in ast.walk(scope)
            )
            for node in ast.walk(scope):
                if not isinstance(node, ast.Attribute) or not isinstance(node.ctx, ast.Load):
                    continue
                on_info = isinstance(node.value, ast.Attribute) and node.value.attr == "info"
                on_alias = aliased and isinstance(node.value, ast.Name) and node.value.id == "info"
                if on_info or on_alias:
                    found.setdefault(node.attr, []).append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


READ = reader_fields()


def test_every_field_a_reader_uses_is_a_field():
    unknown = {name: where for name, where in READ.items() if name not in FIELDS and not hasattr(EngineInfo, name)}
    assert not unknown, f"read but no backend can write them: {unknown}"
    assert set(QUANTIZED_FIELDS) <= FIELDS
    assert {"mode", "engine_key", "layers_by_path", "calibration"} <= set(READ)  # the scan finds the readers


def applies(info: EngineInfo, name: str, quantized: bool) -> bool:
    """Where a field has a value: what each backend does, and what a run asked for."""
    if name in ("compile_mode", "compile_cache", "compile_s"):
        return bool(info.compiled)
    if name in ("cuda_graph_s",):
        return info.cuda_graph
    if name in ("compiled", "channels_last", "fused_qkv", "cross_kv", "layers_by_path", "layers_by_kernel"):
        return info.backend == "torch"
    if name in ("gemm_timings", "gemm_dispatch_s", "kernel_build_s"):  # kernels are built and timed on Hopper only
        return False
    if name in ("calibration", "calibration_s", "convert_s", "converted"):
        return quantized and info.mode != "loaded" and (info.backend == "torch" or name.startswith("calibration"))
    if name in ("engines", "device_memory_bytes"):
        return info.backend == "tensorrt"
    if name in ("load_s",):
        return info.mode == "loaded"
    if name in ("save_s",):
        return info.backend == "torch" and info.mode == "built"
    if name in ("build_s",):
        return info.backend == "tensorrt"
    return True


def unwritten(info: EngineInfo, quantized: bool) -> list[str]:
    return sorted(
        name for name in READ if name in FIELDS and applies(info, name, quantized) and getattr(info, name) is None
    )


@pytest.mark.parametrize("variant", [TINY_FP16, TINY_INT8], ids=["fp16", "int8"])
def test_the_torch_backend_writes_every_field_readers_use(tmp_path, variant):
    for mode in ("built", "loaded"):
        components, cpu = models.load("tiny"), torch.device("cpu")
        loop = run.calibration_loop(components, variant, cpu, torch.float32, False)
        engines = torch_backend.prepare(
            variant, components, cpu, engine_dir=tmp_path, progress=False, forward_loop=loop
        )
        assert engines.info.mode == mode
        assert unwritten(engines.info, variant.is_quantized) == [], mode
    if variant.is_quantized:  # counted from the UNet that runs, so a loaded engine says it as a built one did
        assert sum(engines.info.layers_by_kernel.values()) == sum(engines.info.layers_by_path.values()) > 0
        assert set(engines.info.as_dict(quantized=False)).isdisjoint(QUANTIZED_FIELDS)


class _StandInBuilder:
    """Where TensorRT would export (calibrating an 8-bit UNet) and build: the records `prepare` gets."""

    def build(self, component, key):
        meta = {"calibration_s": 1.5} if component == "unet" else {}
        return f"{component} plan".encode() * 8, {"build_s": 2.0, "export": "exported", "qdq": False, **meta}


@pytest.mark.parametrize("variant", [TINY_FP16, TINY_INT8], ids=["fp16", "int8"])
def test_the_tensorrt_backend_writes_every_field_readers_use(tmp_path, variant):
    expect = {"backend": "tensorrt", "backend_version": "10.8.0.43"}
    for mode in ("built", "loaded"):
        records = {
            component: trt_backend._plan_for(
                _StandInBuilder(), component, f"{component}-key", expect, tmp_path, True, {}
            )[1]
            for component in ("clip", "clip2", "unet", "vae")
        }
        info = trt_backend.engine_info(
            variant, records, trt_version="10.8.0.43", engine_dir=tmp_path, cuda_graph=False, pool=1 << 20
        )
        assert info.mode == mode and info.engine_key == "unet-key"
        assert unwritten(info, variant.is_quantized) == [], mode
    assert info.engine_bytes == len(b"unet plan" * 8)
