"""The PyTorch backend: fp16/bf16 on a GPU (fp32 on the CPU), with real INT8/FP8 UNet engines.

A UNet engine is a directory under `--engine-dir` (see `store.py`):
    unet_config.json, layer_plan.json, unet.safetensors
                       the UNet as it runs (`qmodules.save`): config, which layers are 8-bit and which kernel
                       each runs, weights (int8/fp8 with scales for quantized layers, else fp16)
    gemm_dispatch.json (8-bit, GPU) the per-shape timings that chose those kernels (`gemm_dispatch`)
    compiled_regions.bin
                       the UNet's compiled regions, saved ahead of time (GPU, `precompiled`): a reuse loads them
                       and Dynamo traces nothing
    compile_cache.bin  PyTorch's portable compile caches (GPU), so a reuse that cannot use those recompiles from
                       cache; loading either file runs code, so only from a trusted engine (`store.Engine.read`)
Building an 8-bit engine calibrates with ModelOpt (state kept under `--onnx-dir`, keyed by the engine key);
loading one needs neither the ONNX dir nor calibration. On a GPU the UNet is compiled by regions and its
step replayed from one CUDA graph (`compiled.py`).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

from sdxl_core import settings, specs
from sdxl_core.engines import (
    Engines,
    build_identity,
    compiled,
    cross_kv,
    device_tag,
    precompiled,
    store,
    text_stages,
    unet_stage,
    vae_stage,
)
from sdxl_core.engines.info import EngineInfo
from sdxl_core.errors import UserError
from sdxl_core.files import temp_name, write_failure
from sdxl_core.hardware import library_versions
from sdxl_core.quant import qmodules
from sdxl_core.startup import Startup
from sdxl_core.variants import Variant

NAME = "torch"
COMPILE_CACHE = "compile_cache.bin"
DISPATCH_FILE = "gemm_dispatch.json"  # an 8-bit GPU engine's per-shape kernel timings, for people to read
CACHES = (COMPILE_CACHE, precompiled.FILE)  # what a build keeps of its compile, in `compiled.Compiled`'s order


def version() -> str:
    return torch.__version__.split("+")[0]


def engine_key(variant: Variant, device: torch.device) -> str:
    """The UNet engine's key for `variant` on `device`: its knobs, this torch, the GPU, and what builds it."""
    return variant.engine_key(version(), device_tag(device), build_identity(variant))


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
    forward_loop: Callable[[torch.nn.Module], None] | None = None,
    lock_timeout: float | None = None,
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
    `forward_loop(unet)` runs the calibration prompts through an 8-bit UNet being calibrated
    (`sdxl_core.run.calibration_loop`; needed only if calibration runs). `lock_timeout`: seconds to wait for
    another builder of the same engine. A UNet without weights (`models.load(..., unet_weights=False)`) gets
    them only if the engine is built. Each step's time lands in `startup` (and in `info`: `load_s`, `compile_s`, ...).
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
    if engine_dir is None and not allow_build:
        raise UserError("loading a prebuilt engine needs --engine-dir")
    with startup.phase("to_device", device):
        components.to(device, dtype)
    key = engine_key(variant, device)
    info = EngineInfo(
        backend=NAME,
        backend_version=version(),
        engine_key=key,
        mode="in-memory",
        cuda_graph=use_cuda_graph,
        engine_dir=str(engine_dir) if engine_dir else None,
        compiled=compile,
        compile_mode=compile_mode if compile else None,
        channels_last=channels_last,
        fused_qkv=variant.fused_qkv,
        cross_kv=cross_kv.MODES[reuse_cross_kv],
    )
    reused_kv = []  # the CrossKV of the UNet that runs, with reuse_cross_kv

    def make_runnable(unet, caches=(None, None), keep_cache=False) -> compiled.Compiled:
        # After the engine files are written: both change how the UNet runs, not what the engine stores.
        # caches: (compile cache, precompiled regions) read from the engine.
        if channels_last:
            compiled.channels_last(unet)
        if not (reuse_cross_kv or compile):
            return compiled.Compiled(unet, None, None)
        example = unet_inputs(variant, unet, device, dtype)
        if reuse_cross_kv:  # filled before compiling, so the compiled blocks read the cached K/V
            reused_kv.append(cross_kv.CrossKV(unet))
            reused_kv[-1].fill(example[specs.SPECS["unet"].inputs.index("encoder_hidden_states")])
        if not compile:
            return compiled.Compiled(unet, None, None)
        cache, regions_file = caches
        return compiled.compile_unet(
            unet,
            example,
            mode=compile_mode,
            cache=cache,
            regions_file=regions_file,
            keep_cache=keep_cache,
            info=info,
            startup=startup,
        )

    def build():
        return build_unet(
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
            forward_loop=forward_loop,
        )

    if engine_dir is None:
        unet = build()
        runnable = make_runnable(unet).runnable
    else:
        with contextlib.ExitStack() as staged:
            unet, runnable = _get_or_build(
                engine_dir,
                key,
                variant,
                device,
                dtype,
                info,
                build,
                make_runnable,
                allow_build,
                lock_timeout,
                startup,
                staged,
            )
        components.unet = unet  # the components describe what runs, built or loaded
    info.layers_by_path, info.layers_by_kernel = layer_counts(unet)  # none for an FP16 UNet
    step = unet_stage(runnable)
    if use_cuda_graph:
        with startup.phase("cuda_graph", device) as timed:
            step = compiled.GraphedStep(step, unet_inputs(variant, unet, device, dtype))
        info.cuda_graph_s = round(timed.seconds, 2)
    if reused_kv:  # outside the CUDA graph: a new prompt refills the buffers that the graph's replay reads
        step = cross_kv.RefillingStep(step, reused_kv[-1])
    clip, clip2 = text_stages(components)
    return Engines(device=device, dtype=dtype, clip=clip, clip2=clip2, unet=step, vae=vae_stage(components), info=info)


def _get_or_build(
    engine_dir, key, variant, device, dtype, info, build, make_runnable, allow_build, lock_timeout, startup, staged
):
    """(UNet, runnable UNet) from the store, or built, staged, compiled, then published with its compile cache."""
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
    compile = info.compiled
    refused_on_load = []  # an engine that verified but did not load is rebuilt, not read again

    def load(after_wait: bool):
        if refused_on_load:
            return None
        with startup.phase("engine_verify"):  # readers take no lock
            engine = _verified_or_none(engine_dir, key, expect, allow_build, warn=not after_wait)
        if engine is None:
            return None
        caches = (None, None)
        if compile:  # an untrusted cache is refused here, before any weights
            with startup.phase("compile_cache_read"):
                caches = tuple(engine.read(name) if name in engine.files else None for name in CACHES)
            info.compile_cache = None if caches[0] is not None else "none in the engine"
            info.compiled_regions = None if caches[1] is not None else "none in the engine"
        with startup.phase("engine_load", device) as timed:
            unet = _load_or_none(engine, device, dtype, allow_build)
        if unet is None:
            refused_on_load.append(engine.key)
            return None
        info.load_s = round(timed.seconds, 2)
        info.engine_bytes = store.engine_bytes(engine.record, ("unet.safetensors",))
        return unet, caches

    def build_staged():
        # The engine's files are written to a staging directory beside it before the UNet is compiled (compiling
        # changes its layout, not what it stores); publish then only moves them in, with the compile cache.
        unet = build()
        staging = Path(engine_dir) / temp_name(key)  # a builder's temp dir: swept like publish's if it dies
        staging.mkdir(parents=True)
        staged.callback(shutil.rmtree, staging, ignore_errors=True)
        with startup.phase("engine_save") as timed:
            try:
                qmodules.save(unet, staging)
                if info.gemm_timings:  # what the dispatch measured on this card, kept for people to read
                    (staging / DISPATCH_FILE).write_text(json.dumps(info.gemm_timings, indent=1) + "\n")
            except Exception as exc:  # a full disk or a read-only dir is one line, as publish says it
                failure = write_failure(store.engine_path(engine_dir, key), exc)
                if failure is None:
                    raise
                raise UserError(f"engine {key} not written: {failure}") from None
        info.save_s = round(timed.seconds, 2)
        made = make_runnable(unet, keep_cache=True)

        def write_files(tmp: Path) -> dict:
            for path in staging.iterdir():
                path.rename(tmp / path.name)
            for name, data in zip(CACHES, (made.cache, made.regions), strict=True):
                if data is not None:
                    (tmp / name).write_bytes(data)
            return {}

        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
        return (unet, made.runnable), write_files, {**expect, "libraries": library_versions(), "gpu": gpu}

    found, info.mode = store.get_or_build(
        engine_dir,
        key,
        load=load,
        build=build_staged,
        allow_build=allow_build,
        knobs=variant.engine_knobs(),
        lock_timeout=lock_timeout,
        phase=startup.phase,
    )
    info.engine_path = str(store.engine_path(engine_dir, key))
    if info.mode == "built":
        info.engine_bytes = store.engine_bytes(store.read_sidecar(Path(info.engine_path)), ("unet.safetensors",))
        return found
    unet, caches = found
    return unet, make_runnable(unet, caches).runnable


def build_unet(
    variant,
    components,
    device,
    dtype,
    onnx_dir,
    key,
    progress,
    info: EngineInfo,
    startup: Startup | None = None,
    *,
    channels_last: bool = False,
    forward_loop: Callable[[torch.nn.Module], None] | None = None,
) -> torch.nn.Module:
    """FP16: the model's UNet as is, on a GPU with each attention, GEGLU and LayerNorm shape's kernel timed
    (`quant.attention`, `quant.geglu_act`, `quant.layernorm`). INT8/FP8: calibrate (or reuse the calibration under
    the ONNX dir), convert to real 8-bit modules, then on a GPU time each layer shape's kernels (`gemm_dispatch`,
    `geglu`, `attention`, `geglu_act`, `layernorm`) in the layout the UNet will run in. A shape-only UNet gets its
    weights first."""
    startup = startup or Startup()
    kernels = None
    if variant.is_quantized:
        from sdxl_core.quant.kernels import cuda_build

        kernels = cuda_build.start_8bit(device, progress=progress)  # nvcc on the CPUs while the GPU calibrates
    unet = components.load_unet_weights()
    if variant.fused_qkv and not qmodules.has_fused_qkv(unet):
        qmodules.fuse_qkv(unet)
    if not variant.is_quantized:
        if dispatches(device):  # our attention, GEGLU and LayerNorm kernels, where they win: FP16 gets what 8 bits get
            with startup.phase("gemm_dispatch", device) as timed:
                info.gemm_timings = _choose_kernels(unet, unet_inputs(variant, unet, device, dtype), progress)
            info.gemm_dispatch_s = round(timed.seconds, 2)
        return unet
    with startup.phase("modelopt_import"):
        from sdxl_core.quant import quantize

    calibration_file = Path(onnx_dir) / key / "calibration.pt" if onnx_dir else None
    record_meta = record_knobs(variant, device, dtype)
    record_file = quantize.activation_record.path_in(onnx_dir, record_meta) if onnx_dir else None
    with startup.phase("calibration", device) as calibration:
        info.calibration = quantize.calibrate_or_reuse(
            unet,
            variant,
            forward_loop,
            calibration_file,
            {"engine_key": key, "precision": variant.precision, "level": variant.quant_level},
            progress,
            record_file=record_file,
            record_meta=record_meta,
        )
    if info.calibration == "reused":
        startup.note("calibration", f"reused from {calibration_file}")
    elif info.calibration == "shared":
        startup.note("calibration", f"replayed the activations recorded in {record_file}")
    if kernels is not None:
        with startup.phase("kernel_build"):  # what of the CUTLASS build the work above did not hide
            kernels.wait()
        info.kernel_build_s = round(kernels.seconds, 2)
        startup.note("kernel_build", f"waited for; nvcc or the cache ran {kernels.seconds:.1f} s in the background")
    with startup.phase("convert", device) as convert:
        unet, conversion = qmodules.convert_to_real(unet)
    components.unet = unet
    info.calibration_s = round(calibration.seconds, 2)
    info.convert_s = round(convert.seconds, 2)
    info.converted = str(conversion)
    if dispatches(device):
        with startup.phase("gemm_dispatch", device) as timed:
            info.gemm_timings = _dispatch(unet, variant, device, dtype, progress, channels_last)
        info.gemm_dispatch_s = round(timed.seconds, 2)
    return unet


def record_knobs(variant, device, dtype) -> dict:
    """What an activation record depends on: the calibration passes' knobs, and what rounds their arithmetic
    (dtype, device, library versions)."""
    from sdxl_core.quant import quantize

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "format": quantize.activation_record.RECORD_FORMAT,
        **variant.calibration_knobs(),
        "calibration_batch": quantize.CALIBRATION_BATCH,
        "attention": quantize.needs_attention(variant),
        "dtype": str(dtype),
        "device": gpu or device.type,
        "libraries": library_versions(),
    }


def layer_counts(unet: torch.nn.Module) -> tuple[dict[str, int], dict[str, int]]:
    """Layers per path ("gemm:8bit", "conv:16bit", ...) and per kernel ("16bit" or the 8-bit kernel), as the
    UNet runs them (built or loaded): how much of the engine actually runs in 8 bits."""
    paths, kernels = Counter(), Counter()
    for module in unet.modules():
        if isinstance(module, qmodules.QuantizedModule):
            op = "gemm" if isinstance(module, qmodules.QLinear) or module.as_gemm else "conv"
            sixteen = module.gemm_path == "16bit"
            paths[f"{op}:{'16bit' if sixteen else '8bit'}"] += 1
            kernels["16bit" if sixteen else module.kernel] += 1
    return dict(paths), dict(kernels)


def dispatches(device: torch.device) -> bool:
    """Kernels are timed per shape on a GPU (SDXL_BENCH_GEMM_DISPATCH=off keeps every layer's default)."""
    return device.type == "cuda" and settings.gemm_dispatch()


def _dispatch(unet, variant, device, dtype, progress, channels_last) -> list[dict]:
    from sdxl_core.quant import geglu, gemm_dispatch

    inputs = unet_inputs(variant, unet, device, dtype)
    timings = gemm_dispatch.choose(unet, lambda: unet_stage(unet)(*inputs), channels_last=channels_last)
    if progress:
        gemm_dispatch.print_table(timings)
    # Then whether each GEGLU projection runs fused with what follows it, against the kernels just chosen, and
    # whether each attention, GEGLU and LayerNorm runs our kernel, which quantizes its output for the layer after it.
    return (
        [t.row() for t in timings]
        + _choose_fused(geglu, unet, inputs, progress)
        + _choose_kernels(unet, inputs, progress)
    )


def _choose_kernels(unet, inputs, progress) -> list[dict]:
    """Which attentions, GEGLUs and LayerNorms run our kernels (`quant.attention`, `quant.geglu_act`,
    `quant.layernorm`), timed per shape: rows for gemm_dispatch.json. They come after the GEMMs: whether a kernel's
    output is 8-bit depends on the GEMM chosen for the layer it feeds."""
    from sdxl_core.quant import attention, geglu_act, layernorm

    return [
        row for fusion in (attention, geglu_act, layernorm) for row in _choose_fused(fusion, unet, inputs, progress)
    ]


def _choose_fused(fusion, unet, inputs, progress) -> list[dict]:
    """`fusion.choose` (`quant.geglu`, `quant.attention` or `quant.layernorm`) with the dispatch's error bound and
    kernel filter."""
    from sdxl_core.quant import gemm_dispatch

    rows = fusion.choose(
        unet,
        lambda: unet_stage(unet)(*inputs),
        max_error=gemm_dispatch.MAX_RELATIVE_ERROR,
        allowed=gemm_dispatch.allowed,
    )
    if progress:
        fusion.print_table(rows)
    return rows


def _load_or_none(engine: store.Engine, device, dtype, allow_build):
    """The stored UNet; files that pass their checksums but do not fit together (an edited config, a foreign
    plan) are refused in one line, or rebuilt (None) where building is allowed."""
    path = engine.path
    try:
        return qmodules.load(engine, device, dtype)  # reads the verified files, never the path again
    except store.EngineRefused as err:
        refused = err
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
