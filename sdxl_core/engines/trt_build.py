"""The TensorRT builder side: builder settings and optimization profiles, parsing an ONNX file and building a
serialized plan (`build_plan`), the builder's timing cache (a store entry of its own, shared by every build),
and `_Builder`, which exports each component (calibrating 8-bit UNets first) and builds its plan for
`tensorrt.prepare`. Importing this module needs no TensorRT.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from sdxl_core import specs
from sdxl_core.engines import onnx_export as export
from sdxl_core.engines import store
from sdxl_core.engines.trt_runtime import NAME, _import_tensorrt, _logger, version
from sdxl_core.errors import UserError
from sdxl_core.variants import Variant

OPTIMIZATION_LEVEL = 3  # the reference demo's default
TIMING_CACHE = "timing_cache.bin"


def has_weak_typing(trt) -> bool:
    """Whether this TensorRT still builds weakly typed networks with the FP16/BF16 builder flags (10.x);
    TensorRT 11 removed those flags: every network is strongly typed, the graph's types decide."""
    return hasattr(trt.BuilderFlag, "FP16") and hasattr(trt.BuilderFlag, "BF16")


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


# --------------------------------------------------------------------------- build (needs TensorRT)


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
