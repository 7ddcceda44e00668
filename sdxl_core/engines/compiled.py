"""How the torch backend makes a UNet fast on a GPU: regional torch.compile, layout tunings, one CUDA graph.

The UNet is compiled region by region: every transformer block, ResNet block and sampler, and each 8-bit
layer left between them (the remaining glue runs eagerly). Blocks of one class share their code, so each
distinct block shape compiles once instead of the whole UNet tracing as one graph (`mode="full"`). The
whole step is then captured in one CUDA graph, so neither Python nor kernel-launch overhead shows in the
step time. PyTorch's portable compile caches are saved into the engine when it is built, so a reload
recompiles from cache (loading them runs code: see `compile_unet`).
"""

from __future__ import annotations

import torch

from sdxl_core.engines import unet_stage
from sdxl_core.engines.info import EngineInfo
from sdxl_core.errors import UserError
from sdxl_core.startup import Startup

COMPILE_MODES = ("regional", "full")
# The UNet's repeated blocks: most linear layers and all attention live in the transformer blocks, most 3x3
# convs in the ResNet blocks; the samplers hold the other 3x3 convs. The 8-bit layers left between blocks
# (proj_in/proj_out of each Transformer2DModel) are compiled one by one, so their quantize and dequantize
# ops become one fused kernel instead of several eager ones.
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


def compile_regions(unet: torch.nn.Module, backend: str = "inductor") -> torch.nn.Module:
    """Compile every block in COMPILED_REGIONS in place (diffusers' `compile_repeated_blocks`, more classes).

    Blocks of one class share their code, so Dynamo keeps one compiled graph per distinct block shape; the
    SDXL UNet has more ResNet block shapes than Dynamo's default of 8 per function, hence the higher limit.
    """
    from sdxl_core.quant.qmodules import QuantizedModule

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    regions = [m for m in unet.modules() if type(m).__name__ in COMPILED_REGIONS]
    if not regions:
        raise UserError(f"no {' or '.join(COMPILED_REGIONS)} in this UNet to compile")
    inside = {id(m) for region in regions for m in region.modules()}
    regions += [m for m in unet.modules() if isinstance(m, QuantizedModule) and id(m) not in inside]
    for module in regions:
        module.compile(backend=backend, dynamic=False)
    return unet


def compile_unet(
    unet,
    example_inputs,
    *,
    mode: str,
    info: EngineInfo,
    cache: bytes | None = None,
    keep_cache: bool = False,
    startup: Startup | None = None,
) -> tuple[torch.nn.Module, bytes | None]:
    """torch.compile the UNet (by regions or whole) and run one step, so compile time is paid here.

    `cache`: PyTorch's portable compile caches to load first. Loading them unpickles Inductor and AOTAutograd
    entries, i.e. runs code: pass only bytes the engine store returned (`store.Engine.read` checks their hash
    and trust). `keep_cache`: also return the caches this compile made (bytes, for an engine being built).
    Loading the caches, compiling (with the first step) and collecting them are phases of `startup`.
    """
    if mode not in COMPILE_MODES:
        raise UserError(f"unknown compile mode {mode!r}: choose one of {', '.join(COMPILE_MODES)}")
    startup = startup or Startup()
    if cache is not None:
        with startup.phase("compile_cache_load"):
            torch.compiler.load_cache_artifacts(cache)
        info.compile_cache = "loaded"
    note = "from the engine's compile cache" if cache is not None else None
    with startup.phase("compile", example_inputs[0].device, note=note) as timed:
        compiled = torch.compile(unet, dynamic=False) if mode == "full" else compile_regions(unet)
        with torch.inference_mode():
            unet_stage(compiled)(*example_inputs)
    info.compile_s = round(timed.seconds, 2)
    kept = None
    if keep_cache:
        with startup.phase("compile_cache_save"):
            artifacts = torch.compiler.save_cache_artifacts()
            if artifacts is not None:
                kept = artifacts[0]
                info.compile_cache = "saved"
    return compiled, kept
