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

TensorRT API differences are handled by capability (`hasattr` on the object), never by version strings;
tests/unit/test_trt_api.py checks every TensorRT name and call here against the real Python module of
TensorRT 10.0.1, the newest 10.x and the newest 11.x (docs/tensorrt.md has the table).
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
from sdxl_core.engines import onnx_export as export
from sdxl_core.engines.info import EngineInfo
from sdxl_core.errors import UserError
from sdxl_core.hardware import library_versions
from sdxl_core.startup import Startup
from sdxl_core.variants import Variant

NAME = "tensorrt"
MISSING = "--backend tensorrt needs TensorRT: pip install 'sdxl-bench[trt]' (see README)"
OPTIMIZATION_LEVEL = 3  # the reference demo's default
MEMORY_ALIGNMENT = 256  # TensorRT's required alignment for context device memory

# TensorRT DataType member names -> torch dtypes (by name, so this table needs no TensorRT import).
TORCH_DTYPES = {
    "FLOAT": torch.float32,
    "HALF": torch.float16,
    "BF16": torch.bfloat16,
    "INT8": torch.int8,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "BOOL": torch.bool,
    "UINT8": torch.uint8,
    "FP8": torch.float8_e4m3fn,
}


# --------------------------------------------------------------------------- TensorRT import and version


def _import_tensorrt():
    try:
        import tensorrt
    except Exception:  # not installed, a registry stub, or its CUDA libraries missing
        raise UserError(MISSING) from None
    if not hasattr(tensorrt, "Builder"):
        raise UserError(MISSING)
    if not hasattr(tensorrt, "ExecutionContextAllocationStrategy"):  # added in 10.0
        raise UserError(
            f"TensorRT {tensorrt.__version__} is too old for --backend tensorrt: it needs TensorRT "
            ">= 10.0 (user-managed context memory)"
        )
    return tensorrt


def has_weak_typing(trt) -> bool:
    """Whether this TensorRT still builds weakly typed networks with the FP16/BF16 builder flags (10.x);
    TensorRT 11 removed those flags: every network is strongly typed, the graph's types decide."""
    return hasattr(trt.BuilderFlag, "FP16") and hasattr(trt.BuilderFlag, "BF16")


def version() -> str:
    try:
        import tensorrt

        return str(tensorrt.__version__)
    except Exception:
        return "not-installed"


# --------------------------------------------------------------------------- pure helpers


def plan_filename(component: str, trt_version: str) -> str:
    """`unetxl.trt10.8.0.43.plan`: the reference demo's engine file name, inside the key's directory."""
    return f"{specs.get(component).engine_name}.trt{trt_version}.plan"


TIMING_CACHE = "timing_cache.bin"


def timing_cache_key(trt_version: str, device: str) -> str:
    """The store key of the builder's timing cache, one per TensorRT version and GPU architecture."""
    return f"timing_cache.trt{trt_version}.{device}"


def timing_cache_sidecar(trt_version: str, device: str) -> dict:
    return {"backend": NAME, "backend_version": trt_version, "device": device, "component": "timing-cache"}


def float_dtype(component: str, module_config, half: torch.dtype) -> torch.dtype:
    """The dtype an engine's floating I/O has: `half`, except an SDXL VAE with force_upcast stays fp32."""
    if component == "vae" and specs.config_value(module_config, "force_upcast", False):
        return torch.float32
    return half


def io_spec(variant: Variant, component: str, module_config=None, half: torch.dtype = torch.float16) -> dict:
    """{tensor name: {"shape": [...], "dtype": "float16"}} the engine for `component` must have."""
    fdtype = float_dtype(component, module_config, half)
    spec = {}
    for name, shape in specs.get(component).shapes(variant, module_config).items():
        dtype = torch.int32 if name == "input_ids" else torch.float32 if name == "timestep" else fdtype
        spec[name] = {"shape": list(shape), "dtype": str(dtype).removeprefix("torch.")}
    return spec


def profile_shapes(variant: Variant, component: str, module_config=None) -> dict[str, tuple[tuple, tuple, tuple]]:
    """Static shapes as an optimization profile: {input: (min, opt, max)}, all three equal."""
    shapes = specs.get(component).shapes(variant, module_config)
    return {name: (tuple(shapes[name]),) * 3 for name in specs.get(component).inputs}


def builder_settings(
    has_qdq: bool, dtype: torch.dtype, optimization_level: int = OPTIMIZATION_LEVEL, weak_typing: bool = True
) -> dict:
    """Q/DQ graphs build as strongly typed networks (the graph's own types decide every layer, which the
    FP16/INT8/FP8 flags may not override); other graphs build weakly typed with the FP16 or BF16 flag,
    except where TensorRT has no weak typing (`weak_typing=False`, TensorRT 11): there every graph builds
    strongly typed, so an FP16 or BF16 engine comes from the FP16/BF16 ONNX export itself."""
    strongly_typed = bool(has_qdq) or not weak_typing
    return {
        "strongly_typed": strongly_typed,
        "fp16": not strongly_typed and dtype == torch.float16,
        "bf16": not strongly_typed and dtype == torch.bfloat16,
        "optimization_level": optimization_level,
    }


def graph_has_qdq(onnx_file: str | Path) -> bool:
    import onnx

    model = onnx.load(str(onnx_file), load_external_data=False)
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


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


def shared_memory_bytes(sizes) -> int:
    """One pool for every context: the largest requirement, rounded up to TensorRT's alignment."""
    size = max([0, *sizes])
    return -(-size // MEMORY_ALIGNMENT) * MEMORY_ALIGNMENT


def gpu_facts(device: torch.device) -> tuple[str, str]:
    """(GPU name, compute capability "9.0") for sidecars."""
    major, minor = hardware.capability(device)
    return torch.cuda.get_device_name(device), f"{major}.{minor}"


# --------------------------------------------------------------------------- build (needs TensorRT)


def _logger(trt):
    global _LOGGER
    if _LOGGER is None:
        _LOGGER = trt.Logger(trt.Logger.WARNING)
    return _LOGGER


_LOGGER = None


def _progress_monitor(trt, label: str):
    """A trt.IProgressMonitor that prints top-level phases and a step count (TensorRT >= 10.0)."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.steps: dict[str, int] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.steps[phase_name] = num_steps
            if parent_phase is None:
                print(f"[trt {label}] {phase_name} ({num_steps} steps)", file=sys.stderr, flush=True)

        def step_complete(self, phase_name, step):
            return True  # never cancel

        def phase_finish(self, phase_name):
            self.steps.pop(phase_name, None)

    return Monitor()


def build_plan(
    onnx_file: str | Path,
    settings: dict,
    profile: dict,
    *,
    timing_cache: bytes = b"",
    workspace_bytes: int | None = None,
    progress: bool = True,
    label: str = "",
) -> tuple[bytes, bytes]:
    """Parse `onnx_file` and build a serialized engine, starting from `timing_cache` (a serialized timing
    cache, or empty). Returns the plan and the updated timing cache."""
    trt = _import_tensorrt()
    logger = _logger(trt)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if settings["strongly_typed"] else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_file)):  # reads external data beside the file
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise UserError(f"TensorRT cannot parse {onnx_file}: {errors[0] if errors else 'unknown error'}")

    config = builder.create_builder_config()
    if settings["fp16"] or settings["bf16"]:
        if not hasattr(trt.BuilderFlag, "FP16"):  # 11.x: BF16 went with it
            raise UserError(
                f"TensorRT {version()} has no FP16/BF16 builder flags (strongly typed networks only); "
                "these settings need builder_settings(..., weak_typing=False)"
            )
        config.set_flag(trt.BuilderFlag.FP16 if settings["fp16"] else trt.BuilderFlag.BF16)
    config.builder_optimization_level = settings["optimization_level"]
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    cache_bytes = bytes(timing_cache)
    config.set_timing_cache(config.create_timing_cache(cache_bytes), False)

    # Static shapes: the graph's inputs are already fixed; check them against the profile, and give
    # the profile to any input the parser left dynamic.
    trt_profile, dynamic = builder.create_optimization_profile(), False
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = tuple(tensor.shape)
        wanted = profile.get(tensor.name)
        if wanted is None:
            raise UserError(f"{onnx_file}: unexpected input {tensor.name}; delete it to re-export")
        if any(d < 0 for d in shape):
            low, opt, high = wanted
            trt_profile.set_shape(tensor.name, low, opt, high)
            dynamic = True
        elif shape != tuple(wanted[1]):
            raise UserError(
                f"{onnx_file}: input {tensor.name} has shape {list(shape)}, this variant needs "
                f"{list(wanted[1])}; delete it to re-export"
            )
    if dynamic:
        config.add_optimization_profile(trt_profile)
    monitor = _progress_monitor(trt, label) if progress else None  # must outlive the build
    if monitor is not None:
        config.progress_monitor = monitor

    plan = builder.build_serialized_network(network, config)
    del monitor
    if plan is None:
        raise UserError(f"TensorRT failed to build an engine from {onnx_file} (see the log above)")
    return bytes(plan), bytes(config.get_timing_cache().serialize())


# --------------------------------------------------------------------------- runtime (needs TensorRT + CUDA)


class TRTEngine:
    """One deserialized engine with I/O torch tensors allocated once and a context without own memory."""

    def __init__(self, plan: bytes, device: torch.device, label: str):
        trt = _import_tensorrt()
        self.label, self.device = label, device
        self.runtime = trt.Runtime(_logger(trt))
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise store.EngineRefused(
                f"engine {label}: TensorRT {version()} cannot deserialize it; delete it to rebuild"
            )
        self.context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if hasattr(self.engine, "device_memory_size_v2"):  # TensorRT >= 10.1; 11 has only this one
            self.device_memory_size = int(self.engine.device_memory_size_v2)
        else:
            self.device_memory_size = int(self.engine.device_memory_size)
        self.inputs, self.outputs, self.tensors, self.io = [], [], {}, {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            shape = tuple(self.engine.get_tensor_shape(name))
            dtype = TORCH_DTYPES[self.engine.get_tensor_dtype(name).name]
            is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            if is_input:
                self.context.set_input_shape(name, shape)
            (self.inputs if is_input else self.outputs).append(name)
            self.tensors[name] = torch.zeros(shape, dtype=dtype, device=device)
            self.context.set_tensor_address(name, self.tensors[name].data_ptr())
            self.io[name] = {"shape": list(shape), "dtype": str(dtype).removeprefix("torch.")}
        self.memory: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.side_stream = torch.cuda.Stream(device)  # for callers on the legacy default stream

    def use_memory(self, pool: torch.Tensor) -> None:
        """Point the context at a shared pool (kept alive here) that is at least `device_memory_size`."""
        self.memory = pool
        if hasattr(self.context, "set_device_memory"):  # TensorRT >= 10.1: (pointer, size)
            self.context.set_device_memory(pool.data_ptr(), pool.numel())
        else:  # TensorRT 10.0: the pointer alone
            self.context.device_memory = pool.data_ptr()

    def _enqueue(self, stream: torch.cuda.Stream) -> None:
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT engine {self.label} failed to enqueue")

    def capture_graph(self) -> None:
        """Run once (TensorRT finishes lazy setup on the first enqueue), then capture one enqueue."""
        self.run()
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # captures on a side stream that torch makes current
            self._enqueue(torch.cuda.current_stream(self.device))
        self.graph = graph

    def run(self) -> None:
        """Enqueue on the caller's current stream. TensorRT adds synchronizations when handed the legacy
        default stream, so then it runs on a side stream ordered after and before the caller's work."""
        current = torch.cuda.current_stream(self.device)
        if self.graph is not None:
            self.graph.replay()
        elif current.cuda_stream != 0:
            self._enqueue(current)
        else:
            self.side_stream.wait_stream(current)
            self._enqueue(self.side_stream)
            current.wait_stream(self.side_stream)

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Copy inputs into the bound buffers (converting dtype), run. Outputs are the bound buffers:
        valid until the next call (the pipeline consumes them at once)."""
        for name, value in zip(self.inputs, inputs, strict=True):
            buffer = self.tensors[name]
            buffer.copy_(value.reshape(buffer.shape), non_blocking=True)
        self.run()
        return tuple(self.tensors[n] for n in self.outputs)


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


class _Builder:
    """Exports (calibrating 8-bit UNets first) and builds; moves the torch modules to the GPU only if needed."""

    def __init__(
        self,
        variant,
        components,
        device,
        dtype,
        onnx_dir,
        progress,
        optimization_level,
        workspace,
        engine_dir,
        trt_version,
        tag,
        forward_loop=None,
    ):
        self.variant, self.components, self.device, self.dtype = variant, components, device, dtype
        self.forward_loop = forward_loop
        self.onnx_dir, self.progress, self.optimization_level = onnx_dir, progress, optimization_level
        self.workspace, self.engine_dir, self.trt_version, self.tag = workspace, engine_dir, trt_version, tag
        self.moved = False

    def _on_device(self) -> None:
        if not self.moved:
            self.components.to(self.device, self.dtype)
            self.moved = True

    def onnx_file(self, component: str) -> tuple[Path, dict]:
        """Export unless the ONNX for this component/variant/dtype is already in the ONNX dir."""
        module_dtype = float_dtype(component, specs.get(component).module(self.components).config, self.dtype)
        path = export.onnx_path(self.onnx_dir, self.variant, component, module_dtype)
        if path.is_file():
            return path, {"onnx": str(path), "export": "reused"}
        self._on_device()
        if component == "unet":
            self.components.load_unet_weights()  # a shape-only UNet (a run that meant to reuse an engine)
        started = time.perf_counter()
        meta = {}
        unet = None
        if component == "unet" and self.variant.is_quantized:
            unet, meta = self._quantized_unet()
        path = export.export_component(
            self.components, self.variant, component, self.onnx_dir, unet=unet, progress=self.progress
        )
        return path, {
            "onnx": str(path),
            "export": "exported",
            "export_s": round(time.perf_counter() - started, 2),
            **meta,
        }

    def _quantized_unet(self):
        """ModelOpt PTQ (fake quant) on the GPU in the compute dtype, with the pipeline as forward loop."""
        from sdxl_core.quant import quantize

        started = time.perf_counter()
        if self.forward_loop is None:
            raise ValueError(f"{self.variant.name}: calibrating needs a forward loop (sdxl_core.run.calibration_loop)")
        unet = quantize.quantize_unet(self.components.unet, self.variant, self.forward_loop, progress=self.progress)
        self.components.unet = unet
        return unet, {"calibration_s": round(time.perf_counter() - started, 2)}

    def build(self, component: str, key: str) -> tuple[bytes, dict]:
        onnx_file, meta = self.onnx_file(component)
        has_qdq = graph_has_qdq(onnx_file)
        config = specs.get(component).module(self.components).config
        settings = builder_settings(
            has_qdq,
            float_dtype(component, config, self.dtype),
            self.optimization_level,
            weak_typing=has_weak_typing(_import_tensorrt()),
        )
        if self.progress:
            print(f"[trt] building {specs.get(component).engine_name} ({key}) ...", file=sys.stderr, flush=True)
        timing_cache = self.timing_cache()
        started = time.perf_counter()
        label = specs.get(component).engine_name
        plan, timing_cache = build_plan(
            onnx_file,
            settings,
            profile_shapes(self.variant, component, config),
            timing_cache=timing_cache,
            workspace_bytes=self.workspace,
            progress=self.progress,
            label=label,
        )
        build_s = round(time.perf_counter() - started, 2)
        self.save_timing_cache(timing_cache)
        if self.progress:
            print(
                f"[trt] built {specs.get(component).engine_name} in {build_s:.1f} s ({len(plan) / 2**20:.1f} MiB)",
                file=sys.stderr,
                flush=True,
            )
        return plan, {**meta, "builder": settings, "qdq": has_qdq, "build_s": build_s}

    def timing_cache(self) -> bytes:
        """The engine dir's timing cache (b"" when there is none, or a torn one). A timing cache is a TensorRT
        binary like a plan: read verified, and refused (EngineUntrusted) from an untrusted directory."""
        if self.engine_dir is None:
            return b""
        key = timing_cache_key(self.trt_version, self.tag)
        try:
            found = store.verify(
                self.engine_dir,
                key,
                timing_cache_sidecar(self.trt_version, self.tag),
                required=(TIMING_CACHE,),
                checksums=False,
            )
            return found.read(TIMING_CACHE) if found is not None else b""
        except store.EngineRefused as refused:
            print(f"warning: {refused}; building without it", file=sys.stderr)
            return b""

    def save_timing_cache(self, data: bytes) -> None:
        """Publish the updated timing cache in place of the old one (under its own lock)."""
        if self.engine_dir is None or not data:
            return
        key = timing_cache_key(self.trt_version, self.tag)

        def write_files(tmp: Path) -> dict:
            (tmp / TIMING_CACHE).write_bytes(data)
            return {}

        with store.lock(self.engine_dir, key):
            store.publish(self.engine_dir, key, write_files, timing_cache_sidecar(self.trt_version, self.tag))

    def release(self) -> None:
        """The engines replace the torch modules: give their GPU memory back."""
        if self.moved:
            for module in self.components.modules().values():
                module.to("cpu")
            torch.cuda.empty_cache()


def load_plan(path: str | Path, device: torch.device) -> TRTEngine:
    """Deserialize one plan file of a store entry (no expectations): listed, trusted, hashed as read."""
    path = Path(path)
    found = store.verify(path.parent.parent, path.parent.name, {}, required=(path.name,), checksums=False)
    if found is None:
        raise UserError(f"no engine at {path.parent}")
    return TRTEngine(found.read(path.name), torch.device(device), path.parent.name)
