"""What a backend says about the engines it prepared: one typed record, read by the CLI, reports and suite.

Every backend fills the fields that apply to it; a field stays None where it does not apply (TensorRT
compiles nothing at run time, an FP16 UNet is not calibrated, a loaded engine was not built).
tests/unit/test_engine_info.py checks that every field a reader uses is one of these, and that each
backend writes it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# What a quantized engine's info says about calibration and 8-bit kernels: left out of FP16 reports.
QUANTIZED_FIELDS = (
    "calibration",
    "calibration_s",
    "convert_s",
    "converted",
    "layers_by_path",
    "layers_by_kernel",
    "gemm_timings",
    "gemm_dispatch_s",
    "kernel_build_s",
)


@dataclass
class EngineInfo:
    backend: str  # "torch" or "tensorrt"
    backend_version: str
    engine_key: str  # the UNet engine's store key (`Variant.engine_key`)
    mode: str  # "built", "loaded" (from the engine dir) or "in-memory" (no engine dir)
    cuda_graph: bool  # the UNet step replays one CUDA graph
    engine_dir: str | None = None
    engine_path: str | None = None  # the UNet engine's directory (torch) or plan file (tensorrt)
    engine_bytes: int | None = None  # the UNet engine's stored weights (torch) or plan (tensorrt)
    # torch: how the UNet runs (these change how it runs, not what the engine stores)
    compiled: bool | None = None
    compile_mode: str | None = None  # `compiled.COMPILE_MODES`; None: eager (or TensorRT)
    compile_cache: str | None = None  # "loaded", "saved" or "none in the engine"
    # the regions compiled ahead of time (`precompiled`): "saved: ...", "loaded", "none in the engine",
    # "not saved: <why>" or "not used: <why>" (the regions were compiled instead)
    compiled_regions: str | None = None
    dynamo_frames: int | None = None  # frames Dynamo traced to make the UNet runnable (0: precompiled regions)
    channels_last: bool | None = None
    fused_qkv: bool | None = None
    cross_kv: str | None = None  # `cross_kv.MODES`
    # 8-bit UNets
    calibration: str | None = None  # "calibrated", "shared" or "reused" (quantize.calibrate_or_reuse); None: none ran
    converted: str | None = None  # what became real 8-bit modules
    layers_by_path: dict[str, int] | None = None  # "gemm:8bit", "conv:16bit", ... -> layers (torch)
    layers_by_kernel: dict[str, int] | None = None  # the kernel each layer runs -> layers (torch)
    gemm_timings: list[dict] | None = None  # the per-shape kernel timings that chose those (torch, GPU)
    # seconds per phase, where it ran
    load_s: float | None = None
    calibration_s: float | None = None
    convert_s: float | None = None
    gemm_dispatch_s: float | None = None
    kernel_build_s: float | None = None  # the CUTLASS libraries built or found cached, in the background (Hopper)
    save_s: float | None = None
    build_s: float | None = None
    compile_s: float | None = None
    cuda_graph_s: float | None = None
    # tensorrt: one record per engine (clip, clip2, unet, vae) and the shared device-memory pool
    engines: dict[str, dict] = field(default_factory=dict)
    device_memory_bytes: int | None = None

    def as_dict(self, *, quantized: bool = True) -> dict:
        """The info as JSON-ready data; `quantized=False` leaves out what only an 8-bit engine has."""
        data = dataclasses.asdict(self)
        if not quantized:
            for name in QUANTIZED_FIELDS:
                data.pop(name)
        return data
