"""The PyTorch backend: fp16/bf16 on a GPU (fp32 on the CPU), with real INT8/FP8 UNet engines.

A UNet engine is a directory under `--engine-dir` (see `store.py`):
    unet_config.json   the diffusers UNet config: the engine dir alone rebuilds the module tree
    layer_plan.json    which layers run as 8-bit modules (empty for FP16), and which run their GEMM in 16 bits
    gemm_dispatch.json (8-bit, GPU) the per-shape GEMM timings that chose those paths
    int8_kernels.json  (INT8, GPU) which Triton kernel each GEMM shape runs, so a reload need not time them
    unet.safetensors   weights as they run: int8/fp8 with scales for quantized layers, else fp16
    compile_cache.bin  PyTorch's portable compile caches (GPU only), so a reload skips most of compile
Building an 8-bit engine calibrates with ModelOpt (state kept under `--onnx-dir`, keyed by the engine
key); loading one needs neither the ONNX dir nor calibration.

On a GPU the UNet is compiled region by region (every transformer block, ResNet block and sampler, and
each 8-bit layer between them, with torch.compile; the remaining glue eager), then the whole step is
captured in one CUDA graph, so neither Python nor kernel-launch overhead shows in the step time.
Regional compilation compiles each distinct block shape once instead of tracing the whole UNet as one
graph (`compile_mode="full"`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from ..errors import UserError
from ..variants import Variant
from . import Engines, device_tag, store

NAME = "torch"
CALIBRATION_BATCH = 2  # prompts per calibration batch, as the reference demo
COMPILE_MODES = ("regional", "full")
# The UNet's repeated blocks: most linear layers and all attention live in the transformer blocks, most 3x3
# convs in the ResNet blocks; the samplers hold the other 3x3 convs. The 8-bit layers left between blocks
# (proj_in/proj_out of each Transformer2DModel) are compiled one by one, so their quantize and dequantize
# ops become one fused kernel instead of several eager ones.
COMPILED_REGIONS = ("BasicTransformerBlock", "ResnetBlock2D", "Downsample2D", "Upsample2D")


def version() -> str:
    return torch.__version__.split("+")[0]


def compute_dtype(device: torch.device, half: str = "fp16") -> torch.dtype:
    """What stays unquantized runs in fp16 (or bf16) on a GPU and in fp32 on the CPU."""
    if device.type == "cpu":
        return torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[half]


def text_stages(components):
    def clip(ids):
        return components.text_encoder(ids, output_hidden_states=True).hidden_states[-2]

    def clip2(ids):
        out = components.text_encoder_2(ids, output_hidden_states=True)
        return out.hidden_states[-2], out.text_embeds

    return clip, clip2


def vae_stage(components):
    vae = components.vae
    vae_dtype = next(vae.parameters()).dtype

    def decode(latents):
        return vae.decode(latents.to(vae_dtype), return_dict=False)[0]

    return decode


def unet_stage(unet: torch.nn.Module):
    def step(sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        # One timestep dtype whatever the scheduler hands over (int64 or float32), so a compiled UNet never
        # recompiles for it; diffusers embeds the timestep in float32 either way.
        timestep = torch.as_tensor(timestep, device=sample.device).to(torch.float32)
        return unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                    added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}, return_dict=False)[0]

    return step


class GraphedStep:
    """A UNet step replayed from one CUDA graph: inputs are copied into the captured buffers.

    Warm-up runs on a side stream first (the CUDA graph recipe), which also settles every Triton autotuner
    and lazy compilation before capture. Each call returns a fresh copy of the output.

    The graph holds raw pointers to the UNet's weights, so it keeps `step` (and through it the UNet)
    alive: a reloaded UNet referenced by nothing else was collected once the next capture ran
    `gc.collect()` + `empty_cache()`, and its replay faulted with an illegal memory access (H100, session 2).
    """

    def __init__(self, step, example_inputs, warmup: int = 2):
        self.step = step
        self.inputs = [t.clone() for t in example_inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(warmup):
                step(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.inference_mode():
            self.output = step(*self.inputs)

    def __call__(self, *inputs):
        for captured, given in zip(self.inputs, inputs, strict=True):
            given = torch.as_tensor(given, device=captured.device)
            if given.shape != captured.shape:
                raise UserError(f"the CUDA graph was captured for UNet input shape {tuple(captured.shape)}, "
                                f"got {tuple(given.shape)}")
            captured.copy_(given)
        self.graph.replay()
        return self.output.clone()


def prepare(variant: Variant, components, device: torch.device, *, engine_dir=None, onnx_dir=None,
            half: str = "fp16", progress: bool = True, allow_build: bool = True, compile: bool | None = None,
            compile_mode: str = "regional", use_cuda_graph: bool | None = None, channels_last: bool = False,
            fuse_qkv: bool = False) -> Engines:
    """Move the components to `device` and build or load the UNet engine for `variant`.

    Without `engine_dir` the engine lives in memory only. `allow_build=False` refuses to calibrate or
    build: the engine must already be in `engine_dir`. `compile` and `use_cuda_graph` default to on for a
    CUDA device and off on the CPU. `channels_last` and `fuse_qkv` change how the UNet runs, not what the
    engine stores (see `tune_layout`).
    """
    dtype = compute_dtype(device, half)
    compile = device.type == "cuda" if compile is None else compile
    use_cuda_graph = device.type == "cuda" if use_cuda_graph is None else use_cuda_graph
    if use_cuda_graph and device.type != "cuda":
        raise UserError("--use-cuda-graph needs a CUDA GPU")
    if compile_mode not in COMPILE_MODES:
        raise UserError(f"unknown compile mode {compile_mode!r}: choose one of {', '.join(COMPILE_MODES)}")
    if fuse_qkv and variant.is_quantized:  # refused before any calibration or build is spent
        raise UserError("fused QKV applies to FP16 engines only: 8-bit Q, K and V have separate input scales")
    components.to(device, dtype)
    key = variant.engine_key(version(), device_tag(device))
    expect = {"backend": NAME, "backend_version": version(), "device": device_tag(device), "dtype": str(dtype),
              "precision": variant.precision, "unet_batch": variant.unet_batch,
              "height": variant.height, "width": variant.width}
    info = {"backend": NAME, "backend_version": version(), "engine_key": key, "compiled": compile,
            "compile_mode": compile_mode if compile else None, "cuda_graph": use_cuda_graph,
            "channels_last": channels_last, "fuse_qkv": fuse_qkv, "engine_dir": str(engine_dir) if engine_dir else None}
    compile_options = {"enabled": compile, "mode": compile_mode, "channels_last": channels_last, "fuse_qkv": fuse_qkv}

    if engine_dir is None:
        if not allow_build:
            raise UserError("loading a prebuilt engine needs --engine-dir")
        unet, build_info = _build_unet(variant, components, device, dtype, onnx_dir, key, progress)
        info.update(build_info, mode="in-memory")
        unet = _compile(unet, variant, device, dtype, compile_options, cache_file=None, info=info)
    else:
        with store.lock(engine_dir, key):
            record = _verified_or_none(engine_dir, key, expect, allow_build)
            if record is None:
                if not allow_build:
                    raise UserError(f"no engine {key} in {engine_dir}, and building was not allowed")
                unet, build_info = _build_unet(variant, components, device, dtype, onnx_dir, key, progress)
                info.update(build_info, mode="built")
                unet = _publish(engine_dir, key, unet, variant, device, dtype, compile_options, expect, info)
            else:
                unet = _load_unet(store.engine_path(engine_dir, key), device, dtype, info)
                components.unet = unet  # the components describe what runs, built or loaded
                info.update(mode="loaded")
                unet = _compile(unet, variant, device, dtype, compile_options,
                                cache_file=store.engine_path(engine_dir, key) / "compile_cache.bin", info=info)
        record = store.read_sidecar(store.engine_path(engine_dir, key))
        info.update(engine_path=str(store.engine_path(engine_dir, key)),
                    engine_bytes=store.engine_bytes(record, ("unet.safetensors",)))
    step = unet_stage(unet)
    if use_cuda_graph:
        started = time.perf_counter()
        step = GraphedStep(step, dummy_unet_inputs(unet, variant, device, dtype))
        info["cuda_graph_s"] = round(time.perf_counter() - started, 2)
    clip, clip2 = text_stages(components)
    return Engines(device=device, dtype=dtype, clip=clip, clip2=clip2, unet=step, vae=vae_stage(components),
                   info=info)


def _verified_or_none(engine_dir, key, expect, allow_build):
    try:
        return store.verify(engine_dir, key, expect)
    except store.EngineRefused as refused:
        if not allow_build:
            raise
        print(f"warning: {refused}; rebuilding it", file=sys.stderr)
        return None


def _build_unet(variant, components, device, dtype, onnx_dir, key, progress):
    """FP16: the model's UNet as is. INT8/FP8: calibrate (or reuse calibration), then convert to real 8-bit."""
    unet = components.unet
    if not components.has_unet_weights:
        raise UserError("this engine has to be built, but the UNet weights were not loaded (a load-only run)")
    if not variant.is_quantized:
        return unet, {"calibration": None}
    from .. import qmodules, quantize

    started = time.perf_counter()
    calibration_file = Path(onnx_dir) / key / "calibration.pt" if onnx_dir else None
    meta = {"engine_key": key, "precision": variant.precision, "level": variant.quant_level}
    calibration = "calibrated"
    if calibration_file and calibration_file.exists():
        try:
            quantize.load_calibration(unet, calibration_file, meta)
            calibration = "reused"
        except quantize.CalibrationMismatch as mismatch:
            print(f"warning: {mismatch}; recalibrating", file=sys.stderr)
    if calibration == "calibrated":
        quantize.quantize_unet(unet, variant, calibration_loop(components, variant, device, dtype, progress),
                               progress=progress)
        if calibration_file:
            quantize.save_calibration(unet, calibration_file, meta)
    calibrated_at = time.perf_counter()
    unet, conversion = qmodules.convert_to_real(unet)
    components.unet = unet
    info = {"calibration": calibration, "calibration_s": round(calibrated_at - started, 2),
            "convert_s": round(time.perf_counter() - calibrated_at, 2), "converted": str(conversion)}
    if device.type == "cuda" and os.environ.get("SDXL_BENCH_GEMM_DISPATCH") != "off":
        info.update(_choose_gemm_paths(unet, variant, device, dtype, progress))
    return unet, info


def _choose_gemm_paths(unet, variant, device, dtype, progress) -> dict:
    """Per GEMM shape, the faster of the 8-bit kernel and a 16-bit GEMM on the same quantized values."""
    from .. import qmodules

    started = time.perf_counter()
    inputs = dummy_unet_inputs(unet, variant, device, dtype)
    timings = qmodules.choose_gemm_paths(unet, lambda: unet_stage(unet)(*inputs))
    if progress:
        print(f"{'GEMM M x K -> N':>24} {'layers':>6} {'8-bit ms':>9} {'16-bit ms':>9} {'8-bit speed-up':>14}  path",
              file=sys.stderr)
        for t in timings:
            print(f"{t.fmt:>5} {t.m:>6} x {t.k:>5} -> {t.n:>5} {t.layers:>6} {t.ms_8bit:>9.4f} {t.ms_16bit:>9.4f} "
                  f"{t.ms_16bit / t.ms_8bit:>13.2f}x  {t.path}", file=sys.stderr)
    paths = {path: sum(t.layers for t in timings if t.path == path) for path in qmodules.GEMM_PATHS}
    return {"gemm_paths": paths, "gemm_timings": _with_int8_kernels([t.row() for t in timings]),
            "gemm_dispatch_s": round(time.perf_counter() - started, 2)}


def _int8_kernel_rows(timing_rows: list[dict]) -> list[dict]:
    """This process's INT8 kernel choices (`int8_gemm.kernel_choices()`) for the INT8 shapes of one engine."""
    shapes = {(r["M"], r["K"], r["N"]) for r in timing_rows if r["fmt"] == "int8"}
    if not shapes:
        return []
    from ..kernels import int8_gemm

    return [c for c in int8_gemm.kernel_choices() if (c["M"], c["K"], c["N"]) in shapes]


def _with_int8_kernels(rows: list[dict]) -> list[dict]:
    """Add to each INT8 row which Triton kernel ran its 8-bit GEMM (pointer or TMA) and both kernels' times."""
    from ..kernels import int8_gemm

    choices = {(c["M"], c["K"], c["N"]): c for c in int8_gemm.kernel_choices()}
    for row in rows:
        choice = choices.get((row["M"], row["K"], row["N"])) if row["fmt"] == "int8" else None
        if choice:
            row.update(int8_kernel=choice["kernel"], ms_pointer=round(choice["ms_pointer"], 4),
                       ms_tma=None if choice["ms_tma"] is None else round(choice["ms_tma"], 4),
                       tma_error=choice["error"])
    return rows


def calibration_loop(components, variant: Variant, device, dtype, progress: bool):
    """ModelOpt's forward_loop: the real pipeline on the packaged prompts at the variant's step count."""
    from tqdm.auto import tqdm

    from .. import pipeline, quantize

    prompts = quantize.calibration_prompts(variant.calibration_size)
    clip, clip2 = text_stages(components)

    def forward_loop(unet):
        engines = Engines(device=device, dtype=dtype, clip=clip, clip2=clip2, unet=unet_stage(unet),
                          vae=lambda latents: latents)  # calibration needs no pixels
        batches = [prompts[i:i + CALIBRATION_BATCH] for i in range(0, len(prompts), CALIBRATION_BATCH)]
        for i, batch in enumerate(tqdm(batches, desc="calibrating", disable=not progress)):
            pipeline.txt2img(engines, components, variant.replace(batch_size=len(batch)), batch, seed=i)

    return forward_loop


def _publish(engine_dir, key, unet, variant, device, dtype, compile_options, expect, info):
    """Write the engine files (and, compiling, the compile caches) into the store; return the runnable UNet."""
    from safetensors.torch import save_file

    from .. import qmodules
    from ..runinfo import library_versions

    runnable = unet

    def write_files(tmp: Path) -> dict:
        nonlocal runnable
        started = time.perf_counter()
        (tmp / "unet_config.json").write_text(json.dumps(dict(unet.config), indent=1, default=list))
        (tmp / "layer_plan.json").write_text(json.dumps(qmodules.layer_plan(unet), indent=1, sort_keys=True))
        if info.get("gemm_timings"):  # what the GEMM dispatch measured on this card, kept for people to read
            (tmp / "gemm_dispatch.json").write_text(json.dumps(info["gemm_timings"], indent=1) + "\n")
        kernel_rows = _int8_kernel_rows(info.get("gemm_timings") or [])
        if kernel_rows:
            (tmp / "int8_kernels.json").write_text(json.dumps(kernel_rows, indent=1) + "\n")
        save_file({k: v.detach().contiguous() for k, v in unet.state_dict().items()}, str(tmp / "unet.safetensors"))
        info["save_s"] = round(time.perf_counter() - started, 2)
        runnable = _compile(unet, variant, device, dtype, compile_options, cache_file=tmp / "compile_cache.bin",
                            info=info)
        return {}

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    store.publish(engine_dir, key, write_files, {**expect, "libraries": library_versions(), "gpu": gpu})
    return runnable


def _load_unet(path: Path, device, dtype, info) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from .. import qmodules

    started = time.perf_counter()
    try:  # files that pass their checksums but do not fit together (an edited config) are refused in one line
        config = json.loads((path / "unet_config.json").read_text())
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(config)
        qmodules.apply_layer_plan(unet, json.loads((path / "layer_plan.json").read_text()))
        state = load_file(str(path / "unet.safetensors"), device=str(device))
        unet.load_state_dict(state, strict=True, assign=True)
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as exc:
        reason = " ".join(line.strip() for line in str(exc).splitlines()[:2] if line.strip())[:200]
        reason = reason or type(exc).__name__
        raise store.EngineRefused(f"engine {path.name} does not load ({reason}); delete {path} to rebuild it") from None
    qmodules.dequantize_weights(unet, dtype)
    if (path / "int8_kernels.json").exists():
        from ..kernels import int8_gemm

        int8_gemm.load_choices(json.loads((path / "int8_kernels.json").read_text()))
        info["int8_kernels"] = "loaded"
    info["load_s"] = round(time.perf_counter() - started, 2)
    return unet.eval().requires_grad_(False)


def _compile(unet, variant, device, dtype, options: dict, *, cache_file: Path | None, info: dict):
    """torch.compile the UNet (by regions or whole) and run one step so compile time is paid here.

    With `cache_file`: load PyTorch's portable compile caches from it if present, else save them.
    """
    tune_layout(unet, channels_last=options.get("channels_last", False), fuse_qkv=options.get("fuse_qkv", False))
    if not options["enabled"]:
        return unet
    if cache_file is not None and cache_file.exists():
        torch.compiler.load_cache_artifacts(cache_file.read_bytes())
        info["compile_cache"] = "loaded"
    started = time.perf_counter()
    compiled = torch.compile(unet, dynamic=False) if options["mode"] == "full" else compile_regions(unet)
    with torch.inference_mode():
        unet_stage(compiled)(*dummy_unet_inputs(unet, variant, device, dtype))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    info["compile_s"] = round(time.perf_counter() - started, 2)
    if cache_file is not None and not cache_file.exists():
        artifacts = torch.compiler.save_cache_artifacts()
        if artifacts is not None:
            cache_file.write_bytes(artifacts[0])
            info["compile_cache"] = "saved"
    return compiled


def tune_layout(unet: torch.nn.Module, *, channels_last: bool, fuse_qkv: bool) -> torch.nn.Module:
    """Two FP16 tunings of issue 6, in place, after the engine files are written (they change how the UNet
    runs, not its weights): channels-last weights, so every conv after conv_in runs NHWC, and fused QKV
    (diffusers' `fuse_qkv_projections`: one GEMM for Q, K and V in self-attention, one for K and V in
    cross-attention). An 8-bit UNet cannot fuse: its Q, K and V have separate smoothing and input scales."""
    from ..qmodules import module_counts

    if fuse_qkv:
        if sum(module_counts(unet).values()):
            raise UserError("fused QKV applies to FP16 engines only: 8-bit Q, K and V have separate input scales")
        unet.fuse_qkv_projections()
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    return unet


def compile_regions(unet: torch.nn.Module, backend: str = "inductor") -> torch.nn.Module:
    """Compile every block in COMPILED_REGIONS in place (diffusers' `compile_repeated_blocks`, more classes).

    Blocks of one class share their code, so Dynamo keeps one compiled graph per distinct block shape; the
    SDXL UNet has more ResNet block shapes than Dynamo's default of 8 per function, hence the higher limit.
    """
    from ..qmodules import _Quantized

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    regions = [m for m in unet.modules() if type(m).__name__ in COMPILED_REGIONS]
    if not regions:
        raise UserError(f"no {' or '.join(COMPILED_REGIONS)} in this UNet to compile")
    inside = {id(m) for region in regions for m in region.modules()}
    regions += [m for m in unet.modules() if isinstance(m, _Quantized) and id(m) not in inside]
    for module in regions:
        module.compile(backend=backend, dynamic=False)
    return unet


def dummy_unet_inputs(unet, variant: Variant, device, dtype, seed: int = 0):
    """UNet inputs of the variant's shapes (random, never zeros): for warm-up and benchmarks."""
    g = torch.Generator("cpu").manual_seed(seed)
    batch = variant.unet_batch
    cross = unet.config.cross_attention_dim
    text_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    sample = torch.randn(batch, 4, variant.height // 8, variant.width // 8, generator=g)
    hidden = torch.randn(batch, 77, cross, generator=g)
    text_embeds = torch.randn(batch, text_dim, generator=g)
    time_ids = torch.tensor([[variant.height, variant.width, 0, 0, variant.height, variant.width]] * batch)
    sample, hidden, text_embeds, time_ids = (t.to(device=device, dtype=dtype)
                                             for t in (sample, hidden, text_embeds, time_ids))
    timestep = torch.tensor(500.0, device=device)  # float32, as `unet_stage` passes it on
    return sample, timestep, hidden, text_embeds, time_ids
