"""The TensorRT backend: ONNX (with ModelOpt Q/DQ for 8-bit UNets) -> TensorRT plans, run on torch's stream.

Four engines, as the reference demo has: clip, clip2, unetxl, vae. Each is a store entry (see `store.py`)
under its own key, so variants that differ only in the UNet share the text-encoder and VAE engines:

    <engine-dir>/<key>/<name>.trt<version>.plan   the serialized engine (name: clip, clip2, unetxl, vae)
    <engine-dir>/<key>/sidecar.json               versions, GPU name + compute capability, I/O shapes and
                                                  dtypes, builder settings, sha256 of the plan
    <engine-dir>/timing_cache.trt<version>.<sm>/timing_cache.bin   the builder's timing cache, shared by
                                                  every build: a store entry of its own, replaced after each build

Build (only when no valid engine exists for the key): export the component to ONNX under `--onnx-dir`
unless that ONNX is already there (INT8/FP8 UNets are calibrated with ModelOpt first, then exported
with Q/DQ), parse it, build with a strongly typed network for Q/DQ graphs and the FP16/BF16 flag
otherwise (TensorRT 11 has strongly typed networks only: there every graph builds strongly typed, and an
FP16 engine comes from the FP16 ONNX export), at a fixed optimization level with a static-shape profile,
publish atomically under a build lock. Load takes no lock: it checks the sidecar (TensorRT version, GPU,
shapes), then reads the plan through `store.Engine.read`, which hashes the bytes it hands to TensorRT and
refuses them unless the engine is trusted (a plan, like the timing cache, is executable: see `store.py`); a
mismatch or a torn file is refused with one line, and rebuilt only when building is allowed.

Runtime: I/O tensors are allocated once as torch tensors, `execute_async_v3` runs on the current torch
CUDA stream, every engine's context shares one device-memory pool (the max of their requirements, the
engines run one after another), and `use_cuda_graph=True` captures the UNet step in a CUDA graph.

Importing this module needs no TensorRT; `prepare` without it raises a UserError naming the fix. The
pure helpers (names, sidecar expectations, profiles, I/O specs, builder settings) need neither TensorRT
nor a GPU and are unit-tested on their own.

Here: `prepare`, `engine_info`, the plan and sidecar naming and loading plans from the store; the builder
side (settings, profiles, `build_plan`, the timing cache, `_Builder`) is `trt_build.py`, the runtime side
(the TensorRT import, `version`, `TRTEngine`, `load_plan`) is `trt_runtime.py`; their names are re-exported.

TensorRT API differences are handled by capability (`hasattr` on the object), never by version strings;
tests/unit/test_trt_api.py checks every TensorRT name and call in these three modules against the real Python
module of TensorRT 10.0.1, the newest 10.x and the newest 11.x (docs/tensorrt.md has the table).
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from sdxl_core import hardware, specs
from sdxl_core.engines import Engines, build_identity, device_tag, store
from sdxl_core.engines.info import EngineInfo
from sdxl_core.engines.trt_build import (  # noqa: F401  re-exported: the backend's names callers and tests use
    OPTIMIZATION_LEVEL,
    TIMING_CACHE,
    _Builder,
    _progress_monitor,
    build_plan,
    builder_settings,
    float_dtype,
    graph_has_qdq,
    has_weak_typing,
    profile_shapes,
    timing_cache_key,
    timing_cache_sidecar,
)
from sdxl_core.engines.trt_runtime import (  # noqa: F401  re-exported: the backend's names callers and tests use
    MEMORY_ALIGNMENT,
    MISSING,
    NAME,
    TORCH_DTYPES,
    TRTEngine,
    _import_tensorrt,
    _logger,
    load_plan,
    shared_memory_bytes,
    version,
)
from sdxl_core.errors import UserError
from sdxl_core.hardware import library_versions
from sdxl_core.startup import Startup
from sdxl_core.variants import Variant

# --------------------------------------------------------------------------- pure helpers


def plan_filename(component: str, trt_version: str) -> str:
    """`unetxl.trt10.8.0.43.plan`: the reference demo's engine file name, inside the key's directory."""
    return f"{specs.get(component).engine_name}.trt{trt_version}.plan"


def io_spec(variant: Variant, component: str, module_config=None, half: torch.dtype = torch.float16) -> dict:
    """{tensor name: {"shape": [...], "dtype": "float16"}} the engine for `component` must have."""
    fdtype = float_dtype(component, module_config, half)
    spec = {}
    for name, shape in specs.get(component).shapes(variant, module_config).items():
        dtype = torch.int32 if name == "input_ids" else torch.float32 if name == "timestep" else fdtype
        spec[name] = {"shape": list(shape), "dtype": str(dtype).removeprefix("torch.")}
    return spec


def expected_sidecar(variant: Variant, component: str, *, trt_version: str, device: str, gpu: str, io: dict) -> dict:
    """Sidecar fields that must match exactly before a plan is loaded (`store.verify`'s `expect`)."""
    return {
        "backend": NAME,
        "backend_version": trt_version,
        "device": device,
        "gpu": gpu,
        "component": component,
        "precision": variant.precision if component == "unet" else None,
        "io": io,
    }


def io_mismatches(actual: dict, expected: dict) -> list[str]:
    """Differences between an engine's I/O ({name: {"shape", "dtype"}}) and what this run needs."""
    problems = [f"missing tensor {n}" for n in expected if n not in actual]
    problems += [f"unexpected tensor {n}" for n in actual if n not in expected]
    for name in sorted(expected.keys() & actual.keys()):
        if list(actual[name]["shape"]) != list(expected[name]["shape"]):
            problems.append(f"{name} shape {list(actual[name]['shape'])} != {list(expected[name]['shape'])}")
        if actual[name]["dtype"] != expected[name]["dtype"]:
            problems.append(f"{name} dtype {actual[name]['dtype']} != {expected[name]['dtype']}")
    return problems


def gpu_facts(device: torch.device) -> tuple[str, str]:
    """(GPU name, compute capability "9.0") for sidecars."""
    major, minor = hardware.capability(device)
    return torch.cuda.get_device_name(device), f"{major}.{minor}"


# --------------------------------------------------------------------------- prepare


def prepare(
    variant: Variant,
    components,
    device: torch.device,
    *,
    engine_dir=None,
    onnx_dir=None,
    half: str = "fp16",
    progress: bool = True,
    use_cuda_graph: bool = False,
    allow_build: bool = True,
    optimization_level: int = OPTIMIZATION_LEVEL,
    workspace_gib: float | None = None,
    forward_loop: Callable[[torch.nn.Module], None] | None = None,
    lock_timeout: float | None = None,
    startup: Startup | None = None,
) -> Engines:
    """Build (or load) the four TensorRT engines for `variant` and return their callables.

    Without `engine_dir` the plans are built in memory and not kept; without `onnx_dir` the ONNX goes
    to a temp dir removed afterwards. `allow_build=False` only loads from `engine_dir`. `forward_loop(unet)`
    calibrates an 8-bit UNet (`sdxl_core.run.calibration_loop`; needed only if it calibrates); `lock_timeout`:
    seconds to wait for another builder. Each engine's time (load, or export and build) and the CUDA-graph
    capture are phases of `startup`.
    """
    startup = startup or Startup()
    _import_tensorrt()
    device = torch.device(device)
    if device.type != "cuda":
        raise UserError("--backend tensorrt needs a CUDA GPU; use --backend torch on the CPU")
    if half not in ("fp16", "bf16"):
        raise UserError(f"--half must be fp16 or bf16, got {half!r}")
    if engine_dir is None and not allow_build:
        raise UserError("loading a prebuilt engine needs --engine-dir")
    if variant.fused_qkv:
        raise UserError("--fused-qkv is a torch-backend option: TensorRT fuses the attention projections itself")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[half]
    variant = variant.replace(backend=NAME)
    trt_version, tag = version(), device_tag(device)
    gpu, capability = gpu_facts(device)
    configs = {name: spec.module(components).config for name, spec in specs.SPECS.items()}
    records = {}
    workspace = int(workspace_gib * 2**30) if workspace_gib else None

    with contextlib.ExitStack() as stack:
        if onnx_dir is None:
            onnx_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="sdxl-onnx-"))
        builder = _Builder(
            variant,
            components,
            device,
            dtype,
            Path(onnx_dir),
            progress,
            optimization_level,
            workspace,
            Path(engine_dir) if engine_dir else None,
            trt_version,
            tag,
            forward_loop,
        )
        engines = {}
        for component in specs.COMPONENTS:
            key = specs.get(component).key(variant, trt_version, tag, build_identity(variant))
            io = io_spec(variant, component, configs[component], dtype)
            expect = expected_sidecar(variant, component, trt_version=trt_version, device=tag, gpu=gpu, io=io)
            with startup.phase(f"{component}_engine", device):
                engine, record = _engine_for(
                    builder,
                    component,
                    key,
                    expect,
                    engine_dir,
                    allow_build,
                    {"capability": capability},
                    device,
                    knobs=variant.engine_knobs() if component == "unet" else None,
                    lock_timeout=lock_timeout,
                )
            engines[component] = engine
            records[component] = record
        builder.release()

    pool_bytes = shared_memory_bytes(e.device_memory_size for e in engines.values())
    pool = torch.empty(pool_bytes, dtype=torch.uint8, device=device)
    for engine in engines.values():
        engine.use_memory(pool)
    if use_cuda_graph:
        with startup.phase("cuda_graph", device):
            engines["unet"].capture_graph()
    info = engine_info(
        variant, records, trt_version=trt_version, engine_dir=engine_dir, cuda_graph=use_cuda_graph, pool=pool_bytes
    )
    return _engines_bundle(engines, device, dtype, info)


def engine_info(variant: Variant, records: dict[str, dict], *, trt_version, engine_dir, cuda_graph, pool) -> EngineInfo:
    """The UNet engine's record (key, mode, plan) as the info every backend gives, the four engines' records
    beside it. An 8-bit UNet was "calibrated" when this run exported it, "reused" when its Q/DQ ONNX was
    already in the ONNX dir, and needed no calibration (None) when its plan was loaded."""
    unet = records["unet"]
    calibration = None
    if variant.is_quantized and unet["mode"] != "loaded":
        calibration = "calibrated" if "calibration_s" in unet else "reused"
    return EngineInfo(
        backend=NAME,
        backend_version=trt_version,
        engine_key=unet["key"],
        mode=unet["mode"],
        cuda_graph=cuda_graph,
        engine_dir=str(engine_dir) if engine_dir else None,
        engine_path=unet.get("path"),
        engine_bytes=unet.get("bytes"),
        calibration=calibration,
        calibration_s=unet.get("calibration_s"),
        load_s=round(sum(r.get("load_s", 0.0) for r in records.values()), 2),
        build_s=round(sum(r.get("build_s", 0.0) for r in records.values()), 2),
        engines=records,
        device_memory_bytes=pool,
    )


def _engines_bundle(engines: dict[str, TRTEngine], device, dtype, info) -> Engines:
    clip_e, clip2_e, unet_e, vae_e = (engines[c] for c in specs.COMPONENTS)

    def clip(ids):
        return clip_e(ids)[0]

    def clip2(ids):
        hidden, pooled = clip2_e(ids)
        return hidden, pooled

    def unet(sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        return unet_e(sample, timestep, encoder_hidden_states, text_embeds, time_ids)[0]

    def vae(latents):
        return vae_e(latents)[0]

    return Engines(device=device, dtype=dtype, clip=clip, clip2=clip2, unet=unet, vae=vae, info=info)


def _engine_for(
    builder: _Builder, component, key, expect, engine_dir, allow_build, extra, device, *, knobs, lock_timeout
):
    """Deserialize the plan for `key` and check its I/O; a stored plan that fails either is rebuilt when
    building is allowed (its checksum was fine, so TensorRT itself refused it), else refused."""

    def load(plan: bytes) -> TRTEngine:
        engine = TRTEngine(plan, device, key)
        problems = io_mismatches(engine.io, expect["io"])
        if problems:
            raise store.EngineRefused(f"engine {key}: {'; '.join(problems[:3])}; delete it to rebuild")
        return engine

    where = {"knobs": knobs, "lock_timeout": lock_timeout}
    plan, record = _plan_for(builder, component, key, expect, engine_dir, allow_build, extra, **where)
    try:
        return load(plan), record
    except store.EngineRefused as refused:
        if not allow_build or record["mode"] != "loaded":
            raise
        print(f"warning: {refused}; rebuilding it", file=sys.stderr)
    plan, record = _plan_for(builder, component, key, expect, engine_dir, allow_build, extra, **where, rebuild=True)
    return load(plan), record


def _plan_for(
    builder: _Builder,
    component,
    key,
    expect,
    engine_dir,
    allow_build,
    extra,
    *,
    knobs=None,
    lock_timeout=None,
    rebuild: bool = False,
) -> tuple[bytes, dict]:
    """The plan bytes for `key`: loaded from `engine_dir` when whole and built for this run, else built and
    published (`store.get_or_build`)."""
    filename = plan_filename(component, expect["backend_version"])
    record = {"key": key, "component": component}
    if engine_dir is None:
        plan, built = builder.build(component, key)
        return plan, {**record, **built, "mode": "in-memory", "bytes": len(plan)}
    path = store.engine_path(engine_dir, key)

    def load(after_wait: bool):
        if rebuild:
            return None
        return _stored_plan(engine_dir, key, expect, filename, allow_build, warn=not after_wait)

    def build():
        plan, built = builder.build(component, key)

        def write_files(tmp: Path) -> dict:
            (tmp / filename).write_bytes(plan)
            return {}

        return (plan, built), write_files, {**expect, **extra, **built, "libraries": library_versions()}

    found, mode = store.get_or_build(
        engine_dir, key, load=load, build=build, allow_build=allow_build, knobs=knobs, lock_timeout=lock_timeout
    )
    plan, detail = found
    detail = {**detail} if mode == "built" else {"load_s": detail}
    return plan, {**record, **detail, "mode": mode, "path": str(path / filename), "bytes": len(plan)}


def _stored_plan(engine_dir, key, expect, filename, allow_build, warn: bool = True) -> tuple[bytes, float] | None:
    """(plan bytes, seconds) from the store, or None when there is none, or it was refused and may be rebuilt.

    The plan is hashed as it is read (no check-then-reopen) and refused unless the engine is trusted."""
    started = time.perf_counter()
    try:
        found = store.verify(engine_dir, key, expect, required=(filename,), checksums=False)
        if found is None:
            return None
        plan = found.read(filename)
    except store.EngineRefused as refused:
        if not allow_build:
            raise
        if warn:
            print(f"warning: {refused}; rebuilding it", file=sys.stderr)
        return None
    return plan, round(time.perf_counter() - started, 2)
