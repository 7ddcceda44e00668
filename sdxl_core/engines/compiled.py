"""How the torch backend makes a UNet fast on a GPU: regional torch.compile, layout tunings, one CUDA graph.

The UNet is compiled region by region: every transformer block, ResNet block and sampler, the work of each
Transformer2DModel around its blocks (`glue`), the GroupNorm before conv_out, and each 8-bit layer left between
them (what remains runs eagerly: embeddings, concatenations, conv_in, conv_out). Blocks of one class share their
code, so each distinct block shape compiles once instead of the whole UNet tracing as one graph (`mode="full"`). The
whole step is then captured in one CUDA graph, so neither Python nor kernel-launch overhead shows in the
step time. An engine built on a GPU keeps PyTorch's portable compile caches, so a reuse recompiles from cache, and
with SDXL_BENCH_PRECOMPILE=1 its regions compiled ahead of time (`precompiled`), so a reuse loads them and traces
nothing (loading either runs code: see `compile_unet`).
"""

from __future__ import annotations

import sys
from typing import NamedTuple

import torch

from sdxl_core import settings
from sdxl_core.engines import glue, unet_stage
from sdxl_core.engines.info import EngineInfo
from sdxl_core.errors import UserError
from sdxl_core.startup import Startup

COMPILE_MODES = ("regional", "full")
# The UNet's repeated blocks: most linear layers and all attention live in the transformer blocks, most 3x3
# convs in the ResNet blocks; the samplers hold the other 3x3 convs. Each Transformer2DModel's proj_in and
# proj_out compile with the work around them (`glue`); an 8-bit layer left outside every region still compiles
# on its own, so its quantize and dequantize ops become one fused kernel instead of several eager ones.
COMPILED_REGIONS = ("BasicTransformerBlock", "ResnetBlock2D", "Downsample2D", "Upsample2D")


class GraphedStep:
    """A UNet step replayed from one CUDA graph: inputs are copied into the captured buffers.

    Warm-up runs on a side stream first (the CUDA graph recipe), which also settles every Triton autotuner
    and lazy compilation before capture. Each call returns a fresh copy of the output.

    The graph holds raw pointers to the UNet's weights, so it keeps `step` (and through it the UNet) alive:
    a reloaded UNet that nothing else referenced was collected once the next capture ran `gc.collect()` +
    `empty_cache()`, and its replay faulted with an illegal memory access.
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
            if given.numel() == captured.numel():
                given = given.reshape(captured.shape)  # a scalar timestep fills the captured (1,) buffer
            if given.shape != captured.shape:
                raise UserError(
                    f"the CUDA graph was captured for UNet input shape {tuple(captured.shape)}, "
                    f"got {tuple(given.shape)}"
                )
            captured.copy_(given)
        self.graph.replay()
        return self.output.clone()


def channels_last(unet: torch.nn.Module) -> torch.nn.Module:
    """Channels-last weights, in place, after the engine files are written (it changes how the UNet runs, not
    what the engine stores): every conv after conv_in then runs NHWC. 8-bit weights keep their dtype."""
    return unet.to(memory_format=torch.channels_last)


def regions(unet: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every region that is compiled on its own: each block in COMPILED_REGIONS, each
    Transformer2DModel's input and output modules (`glue.install`: made on the first call, so from then on the
    UNet runs through them), each GroupNorm outside them (conv_norm_out: PyTorch's CUDA GroupNorm copies a
    channels-last input to NCHW first), then each 8-bit layer outside them all."""
    from sdxl_core.quant.qmodules import QuantizedModule

    # By class name through the class's bases: a block whose norms run our kernel is a subclass (`quant.layernorm`).
    blocks = [
        (name, m) for name, m in unet.named_modules() if any(c.__name__ in COMPILED_REGIONS for c in type(m).__mro__)
    ]
    if not blocks:
        raise UserError(f"no {' or '.join(COMPILED_REGIONS)} in this UNet to compile")
    blocks += glue.install(unet)
    inside = {id(m) for _, block in blocks for m in block.modules()}
    outside = [(name, m) for name, m in unet.named_modules() if id(m) not in inside]
    return (
        blocks
        + [(name, m) for name, m in outside if isinstance(m, torch.nn.GroupNorm)]
        + [(name, m) for name, m in outside if isinstance(m, QuantizedModule)]
    )


REGION_GRAPHS = 256  # compiled graphs kept per region function (all UNets of a process)


def compile_regions(unet: torch.nn.Module, backend: str = "inductor") -> torch.nn.Module:
    """Compile every region (`regions`) in place (diffusers' `compile_repeated_blocks`, more classes).

    Blocks of one class share their code, so Dynamo keeps one compiled graph per distinct block shape, for every
    UNet a process compiles: the SDXL UNet has more ResNet block shapes than Dynamo's default of 8 per function,
    and a suite run compiles up to five UNets (their own sizes, batches and layer types). At a limit of 64 the
    fresh five-variant gpu_bench reached it at its fifth UNet (xl-turbo), whose other ResNet shapes then ran
    uncompiled; 256 is Dynamo's own cap on a function's graphs (`accumulated_recompile_limit`).
    """
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, REGION_GRAPHS)
    for _, module in regions(unet):
        module.compile(backend=backend, dynamic=False)
    return unet


class Compiled(NamedTuple):
    runnable: torch.nn.Module
    cache: bytes | None  # the portable compile caches this compile made (`keep_cache`)
    regions: bytes | None  # the regions' ahead-of-time compiled functions (`precompiled.pack`; `keep_cache`)


def compile_unet(
    unet,
    example_inputs,
    *,
    mode: str,
    info: EngineInfo,
    cache: bytes | None = None,
    regions_file: bytes | None = None,
    keep_cache: bool = False,
    precompile: bool | None = None,
    backend: str = "inductor",
    startup: Startup | None = None,
) -> Compiled:
    """torch.compile the UNet (by regions or whole) and run one step, so compile time is paid here.

    `regions_file`: the engine's precompiled regions (`precompiled`); when they load and their guards pass, nothing
    is traced and `cache` is not needed. Otherwise (none stored, refused by this torch, a guard failed) the regions
    are compiled, after loading `cache`, PyTorch's portable compile caches. Both run code when loaded: pass only
    bytes the engine store returned (`store.Engine.read` checks their hash and trust). `keep_cache`: also return
    the caches this compile made and, with `precompile` (default: on a GPU with SDXL_BENCH_PRECOMPILE=1, regional
    mode), the precompiled regions (bytes, for an engine being built). `backend`: torch.compile's (tests use
    "aot_eager").
    Loading, compiling (with the first step) and saving are phases of `startup`; `info.dynamo_frames` counts the
    frames Dynamo traced (0 when the precompiled regions ran).
    """
    if mode not in COMPILE_MODES:
        raise UserError(f"unknown compile mode {mode!r}: choose one of {', '.join(COMPILE_MODES)}")
    from torch._dynamo.utils import counters

    startup = startup or Startup()
    device = example_inputs[0].device
    frames = counters["frames"]["total"]
    step = unet_stage(unet)
    if regions_file is not None and mode == "regional":
        if _run_precompiled(unet, step, example_inputs, regions_file, info, startup, device):
            info.dynamo_frames = counters["frames"]["total"] - frames
            return Compiled(unet, None, None)
    kept_regions = None
    if precompile is None:  # opt-in: Hopper builds pay 36-53 s for 0-7 s saved per reuse (docs/perf.md)
        precompile = device.type == "cuda" and settings.precompile()
    if keep_cache and mode == "regional" and precompile:
        kept_regions = _precompile(unet, step, example_inputs, info, startup, backend)
    if cache is not None:
        with startup.phase("compile_cache_load"):
            torch.compiler.load_cache_artifacts(cache)
        info.compile_cache = "loaded"
    note = "from the engine's compile cache" if cache is not None else None
    with startup.phase("compile", device, note=note) as timed:
        compiled = torch.compile(unet, dynamic=False) if mode == "full" else compile_regions(unet, backend)
        with torch.inference_mode():
            unet_stage(compiled)(*example_inputs)
    info.compile_s = round(timed.seconds, 2)
    info.dynamo_frames = counters["frames"]["total"] - frames
    kept = None
    if keep_cache:
        with startup.phase("compile_cache_save"):
            artifacts = torch.compiler.save_cache_artifacts()
            if artifacts is not None:
                kept = artifacts[0]
                info.compile_cache = "saved"
    return Compiled(compiled, kept, kept_regions)


def _run_precompiled(unet, step, example_inputs, regions_file, info, startup, device) -> bool:
    """Bind the precompiled regions and run the first step with them; on any refusal, undo and say why."""
    from sdxl_core.engines import precompiled

    undo = None
    try:
        with startup.phase("compiled_regions_load", device):
            undo = precompiled.bind(regions_file, regions(unet))
        with startup.phase("compile", device, note="precompiled regions: nothing traced") as timed:
            with torch.inference_mode():
                step(*example_inputs)
    except Exception as exc:  # another torch, a failed guard, a damaged file: compile the regions instead
        if undo is not None:
            undo()
        reason = _reason(exc)
        print(f"warning: the engine's precompiled regions were not used ({reason}); compiling them", file=sys.stderr)
        info.compiled_regions = f"not used: {reason}"
        return False
    info.compiled_regions = "loaded"
    info.compile_s = round(timed.seconds, 2)
    return True


def _precompile(unet, step, example_inputs, info, startup, backend) -> bytes | None:
    """The regions compiled ahead of time for the engine, or None (said in `info`) where torch cannot."""
    from sdxl_core.engines import precompiled

    if not precompiled.supported():
        info.compiled_regions = f"not saved: torch {torch.__version__} has no aot_compile"
        return None
    with startup.phase("precompile", example_inputs[0].device):
        try:
            index, functions = precompiled.build(regions(unet), lambda: step(*example_inputs), backend)
            data = precompiled.pack(index, functions)
        except Exception as exc:  # the engine still works without them: a reuse compiles its regions
            reason = _reason(exc)
            print(f"warning: the UNet's regions could not be precompiled ({reason})", file=sys.stderr)
            info.compiled_regions = f"not saved: {reason}"
            return None
    info.compiled_regions = f"saved: {len(index)} regions, {len(functions)} functions"
    return data


def _reason(exc: Exception) -> str:
    """An exception in one line: a failed guard's message spans lines, and the guard that failed is on the third."""
    text = " ".join(str(exc).split())
    return text[:400] if text else type(exc).__name__
