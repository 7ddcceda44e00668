"""The PyTorch backend: fp16/bf16 on a GPU (fp32 on the CPU), with real INT8/FP8 UNet engines.

A UNet engine is a directory under `--engine-dir` (see `store.py`):
    unet_config.json, layer_plan.json, unet.safetensors
                       the UNet as it runs (`qmodules.save`): config, which layers are 8-bit and which kernel
                       each runs, weights (int8/fp8 with scales for quantized layers, else fp16)
    gemm_dispatch.json (8-bit, GPU) the per-shape timings that chose those kernels (`gemm_dispatch`)
    compile_cache.bin  PyTorch's portable compile caches (GPU), so a reload skips most of compile; loading
                       them runs code, so only from a trusted engine (`store.Engine.read`)
Building an 8-bit engine calibrates with ModelOpt (state kept under `--onnx-dir`, keyed by the engine key);
loading one needs neither the ONNX dir nor calibration. On a GPU the UNet is compiled by regions and its
step replayed from one CUDA graph (`compiled.py`).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import torch

from sdxl_core import specs
from sdxl_core.engines import Engines, compiled, cross_kv, device_tag, store, text_stages, unet_stage, vae_stage
from sdxl_core.errors import UserError
from sdxl_core.quant import qmodules
from sdxl_core.startup import Startup
from sdxl_core.variants import Variant

NAME = "torch"
COMPILE_CACHE = "compile_cache.bin"


def version() -> str:
    return torch.__version__.split("+")[0]


def compute_dtype(device: torch.device, half: str = "fp16") -> torch.dtype:
    """What stays unquantized runs in fp16 (or bf16) on a GPU and in fp32 on the CPU."""
    if device.type == "cpu":
        return torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[half]


def unet_inputs(variant: Variant, unet: torch.nn.Module, device, dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Sample UNet inputs of the variant's shapes: for warm-up, CUDA-graph capture, dispatch and benchmarks."""
    return specs.SPECS["unet"].sample_inputs(variant, unet, device=device, dtype=dtype, seed=seed)


def prepare(
    variant: Variant,
    components,
    device: torch.device,
    *,
    engine_dir=None,
    onnx_dir=None,
    half: str = "fp16",
    progress: bool = True,
    allow_build: bool = True,
    compile: bool | None = None,
    compile_mode: str = "regional",
    use_cuda_graph: bool | None = None,
    channels_last: bool | None = None,
    reuse_cross_kv: bool | None = None,
    startup: Startup | None = None,
) -> Engines:
    """Move the components to `device` and build or load the UNet engine for `variant`.

    Without `engine_dir` the engine lives in memory only. `allow_build=False` refuses to calibrate or
    build: the engine must already be in `engine_dir`. `compile` and `use_cuda_graph` default to on for a
    CUDA device and off on the CPU; so does `channels_last` (NHWC activations): cuDNN's fp16 3x3 convs ran
    1.2-1.9x faster channels-last than NCHW at every SDXL shape on a Hopper GPU, and the 8-bit conv kernels
    need it. `channels_last` changes how the UNet runs, not what the engine stores; so does `reuse_cross_kv`
    (default: SDXL_BENCH_CROSS_KV=reuse), which computes the cross-attention K/V once per prompt (`cross_kv`).
    `variant.fused_qkv` is part of the engine (8-bit engines are calibrated on the fused projections).
    A UNet without weights (`models.load(..., unet_weights=False)`) gets them only if the engine is built.
    Each step's time lands in `startup` (and, as before, in `info`: `load_s`, `compile_s`, ...).
    """
    startup = startup or Startup()
    dtype = compute_dtype(device, half)
    compile = device.type == "cuda" if compile is None else compile
    use_cuda_graph = device.type == "cuda" if use_cuda_graph is None else use_cuda_graph
    channels_last = device.type == "cuda" if channels_last is None else channels_last
    reuse_cross_kv = cross_kv.mode() == "reuse" if reuse_cross_kv is None else reuse_cross_kv
    if use_cuda_graph and device.type != "cuda":
        raise UserError("--use-cuda-graph needs a CUDA GPU")
    if compile_mode not in compiled.COMPILE_MODES:
        raise UserError(f"unknown compile mode {compile_mode!r}: choose one of {', '.join(compiled.COMPILE_MODES)}")
    with startup.phase("to_device", device):
        components.to(device, dtype)
    key = variant.engine_key(version(), device_tag(device))
    expect = {
        "backend": NAME,
        "backend_version": version(),
        "device": device_tag(device),
        "dtype": str(dtype),
        "precision": variant.precision,
        "unet_batch": variant.unet_batch,
        "height": variant.height,
        "width": variant.width,
    }
    info = {
        "backend": NAME,
        "backend_version": version(),
        "engine_key": key,
        "compiled": compile,
        "compile_mode": compile_mode if compile else None,
        "cuda_graph": use_cuda_graph,
        "channels_last": channels_last,
        "fused_qkv": variant.fused_qkv,
        "cross_kv": cross_kv.MODES[reuse_cross_kv],
        "engine_dir": str(engine_dir) if engine_dir else None,
    }
    reused_kv = []  # the CrossKV of the UNet that runs, with reuse_cross_kv

    def make_runnable(unet, cache=None, save_cache=None):
        # After the engine files are written: both change how the UNet runs, not what the engine stores.
        if channels_last:
            compiled.channels_last(unet)
        if not (reuse_cross_kv or compile):
            return unet
        example = unet_inputs(variant, unet, device, dtype)
        if reuse_cross_kv:  # filled before compiling, so the compiled blocks read the cached K/V
            reused_kv.append(cross_kv.CrossKV(unet))
            reused_kv[-1].fill(example[specs.SPECS["unet"].inputs.index("encoder_hidden_states")])
        if not compile:
            return unet
        return compiled.compile_unet(
            unet, example, mode=compile_mode, cache=cache, save_cache=save_cache, info=info, startup=startup
        )

    def read_compile_cache(engine):
        if not compile:
            return None
        if COMPILE_CACHE not in engine.files:
            info["compile_cache"] = "none in the engine"
            return None
        with startup.phase("compile_cache_read"):  # an untrusted cache is refused here, before any weights load
            return engine.read(COMPILE_CACHE)

    def load(engine, loader):
        with startup.phase("engine_load", device) as timed:
            unet = loader(engine.path, device, dtype)
        info["load_s"] = round(timed.seconds, 2)
        return unet

    if engine_dir is None:
        if not allow_build:
            raise UserError("loading a prebuilt engine needs --engine-dir")
        unet = build_unet(
            variant, components, device, dtype, onnx_dir, key, progress, info, startup, channels_last=channels_last
        )
        info["mode"] = "in-memory"
        runnable = make_runnable(unet)
    else:
        path = store.engine_path(engine_dir, key)
        with startup.phase("engine_verify"):
            engine = _verified_or_none(engine_dir, key, expect, allow_build)  # readers take no lock
        unet = cache = None
        if engine is not None:
            cache = read_compile_cache(engine)
            unet = load(engine, lambda *a: _load_or_none(*a, allow_build))
        if unet is None:
            if not allow_build:
                raise UserError(f"no engine {key} in {engine_dir}, and building was not allowed")
            with contextlib.ExitStack() as held:
                with startup.phase("build_lock"):  # a second builder waits here, then finds the first one's engine
                    held.enter_context(store.lock(engine_dir, key))
                # An engine that did not load is rebuilt, not read again.
                found = None
                if engine is None:
                    with startup.phase("engine_verify"):
                        found = _verified_or_none(engine_dir, key, expect, allow_build, warn=False)
                if found is None:
                    engine = None
                    unet = build_unet(
                        variant,
                        components,
                        device,
                        dtype,
                        onnx_dir,
                        key,
                        progress,
                        info,
                        startup,
                        channels_last=channels_last,
                    )
                    runnable = _publish(engine_dir, key, unet, device, expect, info, make_runnable, startup)
                    info["mode"] = "built"
                    info.pop("load_s", None)  # a refused engine's load attempt
                else:  # another builder published it while this one waited
                    engine = found
                    cache = read_compile_cache(engine)
                    unet = load(engine, qmodules.load)
        if info.get("mode") != "built":
            info["mode"] = "loaded"
            runnable = make_runnable(unet, cache)
        components.unet = unet  # the components describe what runs, built or loaded
        record = engine.record if engine is not None else store.read_sidecar(path)
        info.update(engine_path=str(path), engine_bytes=store.engine_bytes(record, ("unet.safetensors",)))
    step = unet_stage(runnable)
    if use_cuda_graph:
        with startup.phase("cuda_graph", device) as timed:
            step = compiled.GraphedStep(step, unet_inputs(variant, unet, device, dtype))
        info["cuda_graph_s"] = round(timed.seconds, 2)
    if reused_kv:  # outside the CUDA graph: a new prompt refills the buffers that the graph's replay reads
        step = cross_kv.RefillingStep(step, reused_kv[-1])
    clip, clip2 = text_stages(components)
    return Engines(device=device, dtype=dtype, clip=clip, clip2=clip2, unet=step, vae=vae_stage(components), info=info)


def build_unet(
    variant,
    components,
    device,
    dtype,
    onnx_dir,
    key,
    progress,
    info,
    startup: Startup | None = None,
    *,
    channels_last: bool = False,
) -> torch.nn.Module:
    """FP16: the model's UNet as is. INT8/FP8: calibrate (or reuse the calibration under the ONNX dir),
    convert to real 8-bit modules, then on a GPU time each layer shape's kernels (`gemm_dispatch`) in the
    layout the UNet will run in. A shape-only UNet gets its weights first."""
    startup = startup or Startup()
    unet = components.load_unet_weights()
    if variant.fused_qkv and not qmodules.has_fused_qkv(unet):
        qmodules.fuse_qkv(unet)
    if not variant.is_quantized:
        info["calibration"] = None
        return unet
    with startup.phase("modelopt_import"):
        from sdxl_core.quant import quantize

    calibration_file = Path(onnx_dir) / key / "calibration.pt" if onnx_dir else None
    with startup.phase("calibration", device) as calibration:
        info["calibration"] = quantize.calibrate_or_reuse(
            unet,
            variant,
            components,
            device,
            dtype,
            calibration_file,
            {"engine_key": key, "precision": variant.precision, "level": variant.quant_level},
            progress,
        )
    if info["calibration"] == "reused":
        startup.note("calibration", f"reused from {calibration_file}")
    with startup.phase("convert", device) as convert:
        unet, conversion = qmodules.convert_to_real(unet)
    components.unet = unet
    info.update(
        calibration_s=round(calibration.seconds, 2), convert_s=round(convert.seconds, 2), converted=str(conversion)
    )
    if dispatches(device):
        with startup.phase("gemm_dispatch", device) as timed:
            info.update(_dispatch(unet, variant, device, dtype, progress, channels_last))
        info["gemm_dispatch_s"] = round(timed.seconds, 2)
    return unet


def dispatches(device: torch.device) -> bool:
    """Kernels are timed per shape on a GPU (SDXL_BENCH_GEMM_DISPATCH=off keeps every layer's default)."""
    return device.type == "cuda" and os.environ.get("SDXL_BENCH_GEMM_DISPATCH") != "off"


def _dispatch(unet, variant, device, dtype, progress, channels_last) -> dict:
    from sdxl_core.quant import gemm_dispatch

    inputs = unet_inputs(variant, unet, device, dtype)
    timings = gemm_dispatch.choose(unet, lambda: unet_stage(unet)(*inputs), channels_last=channels_last)
    if progress:
        gemm_dispatch.print_table(timings)
    return {**gemm_dispatch.summary(timings), "gemm_timings": [t.row() for t in timings]}


def _load_or_none(path: Path, device, dtype, allow_build):
    """The stored UNet; files that pass their checksums but do not fit together (an edited config, a foreign
    plan) are refused in one line, or rebuilt (None) where building is allowed."""
    try:
        return qmodules.load(path, device, dtype)
    except UserError as err:
        refused = store.EngineRefused(f"engine {path.name} does not load ({err}); delete {path} to rebuild it")
    if not allow_build:
        raise refused
    print(f"warning: {refused}; rebuilding it", file=sys.stderr)
    return None


def _verified_or_none(engine_dir, key, expect, allow_build, warn: bool = True) -> store.Engine | None:
    try:
        return store.verify(engine_dir, key, expect, required=qmodules.UNET_FILES)
    except store.EngineRefused as refused:
        if not allow_build:
            raise
        if warn:
            print(f"warning: {refused}; rebuilding it", file=sys.stderr)
        return None


def _publish(engine_dir, key, unet, device, expect, info, make_runnable, startup: Startup):
    """Write the engine files (and, compiling, the compile caches) into the store; return the runnable UNet."""
    from sdxl_core.reports.run_report import library_versions

    runnable = unet

    def write_files(tmp: Path) -> dict:
        nonlocal runnable
        with startup.phase("engine_save") as timed:
            qmodules.save(unet, tmp)
            if info.get("gemm_timings"):  # what the dispatch measured on this card, kept for people to read
                (tmp / "gemm_dispatch.json").write_text(json.dumps(info["gemm_timings"], indent=1) + "\n")
        info["save_s"] = round(timed.seconds, 2)
        runnable = make_runnable(unet, save_cache=tmp / COMPILE_CACHE)
        return {}

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    with startup.phase("engine_publish"):  # what is left once the files are written: checksums, fsync, rename
        store.publish(engine_dir, key, write_files, {**expect, "libraries": library_versions(), "gpu": gpu})
    return runnable
