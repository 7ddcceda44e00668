"""One run, assembled in one place: check the input, pick the device and its CPU threads, load the model, build or
reuse its UNet engine, generate.

Every caller that runs a model goes through here: `sdxl-bench txt2img` and `build`, the demo, the GPU measurement
commands and the suite's engine fixtures; an 8-bit build calibrates through `calibration_loop`. The layers below
(models, engines, pipeline) each do one step; this module says in which order and with which options.

    options = run.Options(engine_dir="engines")
    device = run.check(variant, options)   # bad input refused here, most of it before torch is imported
    ready = run.prepare(variant, options, device=device)
    image = ready.generate("a red cube").images[0]
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdxl_core.errors import UserError
from sdxl_core.startup import Startup
from sdxl_core.variants import Variant, check_range

if TYPE_CHECKING:  # importing torch takes seconds: `check` refuses what it can before it does
    import torch

    from sdxl_core.engines import Engines
    from sdxl_core.engines.info import EngineInfo
    from sdxl_core.pipeline import Result

DEFAULT_PROMPT = "a photo of an astronaut riding a horse on mars"  # the reference demo's
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
LORA_WEIGHTS = ("*.safetensors", "*.bin")  # what diffusers' load_lora_weights finds in a LoRA dir


@dataclass(frozen=True)
class Options:
    """How a run is prepared; the variant says what it computes."""

    engine_dir: str | None = None  # engines built and reused there; None: the engine lives in memory
    onnx_dir: str | None = None  # ONNX exports and calibration state, reused when present
    output_dir: str | None = None  # only checked (writable, not a file) before any work
    device: str = "auto"  # auto, cpu, cuda or cuda:N
    half: str = "fp16"  # dtype of unquantized GPU work; the CPU always computes in fp32
    threads: int | None = None  # PyTorch's CPU threads (set_cpu_threads says what None means)
    allow_build: bool = True  # False: only load an engine from engine_dir
    progress: bool = True  # progress bars
    phase_lines: bool = False  # one `sdxl-bench: ...` line per phase on stderr, with or without progress bars
    use_cuda_graph: bool | None = None  # None: the backend's default
    lock_timeout: float | None = None  # seconds to wait for another process's build; None: the backend's
    backend_options: Mapping[str, Any] = field(default_factory=dict)  # e.g. compile, channels_last (measurements)


# ---------------------------------------------------------------------------------------------------------------
# Checks: everything that can be refused before any model loads.


def check(variant: Variant, options: Options, startup: Startup | None = None) -> torch.device:
    """Refuse bad input in one line (UserError) before any model loads; returns the device.

    The checks that need no torch come first, so a typo costs no import of torch (seconds on a fresh host):
    the SDXL_BENCH_* settings, threads, the device's spelling, the backend, the LoRA path and the directories.
    """
    startup = startup or Startup()
    with startup.phase("checks"):
        check_before_imports(variant, options)
    quiet_library_notices()
    with startup.phase("imports"):
        import torch  # noqa: F401  (the device and model checks need it)
    with startup.phase("checks"):
        return _check_with_torch(variant, options)


def check_before_imports(variant: Variant, options: Options) -> None:
    from sdxl_core import settings
    from sdxl_core.engines import check_backend

    settings.check()  # a bad SDXL_BENCH_* value is one line here

    if options.threads is not None:
        check_range("--threads", options.threads)
    if not DEVICE.fullmatch(options.device):
        raise UserError(f"--device {options.device!r} is not a device: use auto, cpu, cuda or cuda:N")
    check_backend(variant.backend)
    if variant.backend == "tensorrt" and importlib.util.find_spec("tensorrt") is None:
        raise UserError("--backend tensorrt needs TensorRT: pip install 'sdxl-bench[trt]' (see README)")
    if variant.lora_path:
        _check_lora_path(variant.lora_path)
    _check_dirs(variant, options)


def _check_lora_path(lora_path: str) -> None:
    path = Path(lora_path).expanduser()
    if path.suffix == ".safetensors" and not path.exists():
        raise UserError(f"--lora-path {lora_path} does not exist")
    if path.is_dir() and not any(next(path.glob(pattern), None) for pattern in LORA_WEIGHTS):
        raise UserError(
            f"--lora-path {lora_path} holds no LoRA weights (no .safetensors or .bin file): pass a diffusers "
            "LoRA dir or its .safetensors file"
        )


def _check_dirs(variant: Variant, options: Options) -> None:
    """An output, engine or ONNX dir that is a file or cannot be written to, and a --no-build run whose engine
    dir holds no engine of this variant."""
    from sdxl_core.files import check_writable_dir

    if options.output_dir is not None:
        check_writable_dir(options.output_dir, "--output-dir")
    if not options.allow_build:
        _check_engine_present(variant, options.engine_dir)
        return
    if options.engine_dir and not Path(options.engine_dir).is_dir():
        # An existing engine dir may be a shared, read-only store: loading from it writes nothing, and a build
        # that would have to write there is refused in one line by the store.
        check_writable_dir(options.engine_dir, "--engine-dir")
    if options.onnx_dir:
        check_writable_dir(options.onnx_dir, "--onnx-dir")


def _check_engine_present(variant: Variant, engine_dir: str | None) -> None:
    """The whole engine key holds the backend's version and the GPU generation, which need torch (seconds) to
    tell; every key of this variant starts the same way without them, so a dir holding none is refused here.
    An engine that starts right but was built elsewhere, or is damaged, is found by the store when it loads."""
    if not engine_dir:
        raise UserError("--no-build loads a prebuilt engine: it needs --engine-dir")
    root = Path(engine_dir)
    if not root.is_dir():
        raise UserError(f"--engine-dir {engine_dir} is not a directory: nothing to load with --no-build")
    prefix = variant.engine_key_prefix()
    present = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not any(name.startswith(prefix) for name in present):
        from sdxl_core.engines.store import engines_instead  # sidecars only: no torch

        raise UserError(
            f"--no-build: no {variant.name} engine ({prefix}...) in {engine_dir}; "
            f"{engines_instead(root, variant.engine_knobs())}: build it first (sdxl-bench build) or drop --no-build"
        )


def _check_with_torch(variant: Variant, options: Options) -> torch.device:
    from sdxl_core import models

    device = resolve_device(options.device)
    models.check_model_name(variant.model)
    if models.is_hub_id(variant.model):
        models.check_hub_source(variant.model, "unet/config.json", "model", "use --model tiny or a local diffusers dir")
    if variant.lora_path and models.is_hub_id(variant.lora_path):
        models.check_hub_source(
            variant.lora_path,
            "pytorch_lora_weights.safetensors",
            "LoRA",
            "pass a local .safetensors file with --lora-path",
        )
    if options.use_cuda_graph and device.type != "cuda":
        raise UserError("--use-cuda-graph needs a CUDA GPU")
    return device


def resolve_device(name: str) -> torch.device:
    if not DEVICE.fullmatch(name):
        raise UserError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N")
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but PyTorch sees no CUDA GPU")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: PyTorch sees {torch.cuda.device_count()} CUDA GPU(s), numbered from 0")
    return device


def set_cpu_threads(requested: int | None, model: str) -> int:
    """PyTorch's CPU threads: what was asked, else what OMP_NUM_THREADS says, else 1 for `tiny` (its ops are too
    small to gain from threads, and on a busy machine extra threads made its steps 18x slower), else every CPU
    this process may use."""
    import torch

    from sdxl_core.hardware import usable_cpus

    if requested is None and os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    threads = requested or (1 if model == "tiny" else usable_cpus())
    torch.set_num_threads(threads)
    return threads


def quiet_library_notices() -> None:
    """Import-time notices that say nothing about the run: torch's "no CUDA runtime" on a CPU machine, ModelOpt's
    deprecated torch.jit use and its untested-transformers-version warning. Phase lines stay readable."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated")
    warnings.filterwarnings("ignore", message=r".* is not tested with current version of modelopt")


def say(message: str) -> None:
    """One line per phase on stderr, with or without progress bars: long work never runs silent."""
    print(f"sdxl-bench: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Prepare and generate.


@dataclass
class Run:
    """A variant with its loaded components and engines on a device, ready to generate."""

    variant: Variant
    components: Any
    engines: Engines
    device: torch.device
    threads: int | None = None  # PyTorch's CPU threads, on the CPU

    @property
    def info(self) -> EngineInfo:
        return self.engines.info

    def info_dict(self) -> dict:
        """The engine info as JSON-ready data, without the per-shape kernel timings (long, and in the engine)."""
        return {k: v for k, v in self.engines.info.as_dict().items() if k != "gemm_timings"}

    def generate(
        self, prompt: str = DEFAULT_PROMPT, *, seed: int = 0, negative_prompt: str = "", steps: int | None = None
    ) -> Result:
        """One batch: the variant's batch size of images of `prompt` (`steps` instead of the variant's: a warm-up)."""
        from sdxl_core import pipeline

        variant = self.variant if steps is None else self.variant.replace(steps=steps)
        prompts = [prompt] * variant.batch_size
        return pipeline.txt2img(
            self.engines, self.components, variant, prompts, negative_prompt=negative_prompt, seed=seed
        )

    def batches(self, prompt: str, *, batch_count: int, warmup_runs: int = 0, **options) -> list[Result]:
        """`warmup_runs` untimed batches, then `batch_count` timed ones (pipeline.run: seed, generator, ...)."""
        from sdxl_core import pipeline

        return pipeline.run(
            self.engines,
            self.components,
            self.variant,
            prompt,
            batch_count=batch_count,
            warmup_runs=warmup_runs,
            **options,
        )


def prepare(
    variant: Variant,
    options: Options,
    *,
    device: torch.device | None = None,
    components=None,
    startup: Startup | None = None,
) -> Run:
    """Load the model's components (unless given) and build or reuse the UNet engine for `variant`.

    Without `device` the input is checked first (`check`). Each phase's time lands in `startup`.
    """
    startup = startup or Startup()
    if device is None:
        device = check(variant, options, startup)
    with startup.phase("imports"):
        from sdxl_core import models, pipeline  # noqa: F401  (the pipeline's imports too: numpy, PIL, tqdm)
        from sdxl_core.engines import get_backend

        backend = get_backend(variant.backend)
        models.import_libraries()
    threads = set_cpu_threads(options.threads, variant.model) if device.type == "cpu" else None
    if components is None:
        if options.phase_lines:
            say(f"loading {variant.model} on {device}" + (f" ({threads} thread(s))" if threads else ""))
        components = load_components(variant, options, startup)
    if options.phase_lines:
        say(_engine_phase(variant, options))
    chosen = _backend_options(variant, components, device, options)
    engines = backend.prepare(variant, components, device, startup=startup, **chosen)
    if options.phase_lines:
        say(_engine_done(engines.info, startup))
    return Run(variant, components, engines, device, threads)


def start_kernel_builds(variants, device: torch.device) -> None:
    """Where a run will build or load 8-bit torch engines on Hopper, start the CUTLASS libraries' nvcc builds in
    the background now: a session that prepares several engines compiles while the GPU builds the first one."""
    if device.type == "cuda" and any(v.is_quantized and v.backend == "torch" for v in variants):
        from sdxl_core.quant.kernels import cuda_build

        cuda_build.start_8bit(device, progress=False)


def load_components(variant: Variant, options: Options, startup: Startup | None = None):
    """The model's components. With an engine dir the UNet is shape-only: its weights are generated or read
    only if the engine has to be built (a reused engine brings its own UNet)."""
    from sdxl_core import models

    if options.phase_lines and variant.model in models.MODEL_NOTES:
        say(models.MODEL_NOTES[variant.model])
    return models.load(
        variant.model,
        lora_path=variant.lora_path,
        lora_scale=variant.lora_scale,
        unet_weights=options.allow_build and not options.engine_dir,
        startup=startup,
    )


def _backend_options(variant: Variant, components, device, options: Options) -> dict:
    chosen = dict(
        engine_dir=options.engine_dir,
        onnx_dir=options.onnx_dir,
        half=options.half,
        progress=options.progress,
        allow_build=options.allow_build,
        **options.backend_options,
    )
    # Left out unless set, so each backend keeps its own default.
    if options.use_cuda_graph is not None:
        chosen["use_cuda_graph"] = options.use_cuda_graph
    if options.lock_timeout is not None:
        chosen["lock_timeout"] = options.lock_timeout
    if variant.is_quantized and options.allow_build:
        chosen["forward_loop"] = calibration_loop(
            components, variant, device, _dtype(device, options.half), options.progress
        )
    return chosen


def _dtype(device, half: str):
    from sdxl_core.engines.torch_backend import compute_dtype

    return compute_dtype(device, half)


def _engine_phase(variant: Variant, options: Options) -> str:
    where = f"from {options.engine_dir}" if options.engine_dir else "in memory"
    if not options.allow_build:
        return f"{variant.name}: loading the UNet engine {where}"
    work = (
        f"; a build first calibrates on {variant.calibration_size} prompt(s) x {variant.steps} steps"
        if variant.is_quantized
        else ""
    )
    kind = f"{variant.precision.upper()} " if variant.is_quantized else ""
    return f"{variant.name}: preparing the {kind}UNet engine {where}{work}"


def _engine_done(info: EngineInfo, startup: Startup) -> str:
    calibration = {
        "calibrated": f", calibrated in {info.calibration_s or 0:.1f} s",
        "shared": f", calibrated in {info.calibration_s or 0:.1f} s from the passes another 8-bit format recorded",
        "reused": ", calibration reused",
    }.get(info.calibration, "")
    return f"engine {info.mode} ({time.perf_counter() - startup.origin:.1f} s since start){calibration}"


# ---------------------------------------------------------------------------------------------------------------
# Calibration: the 8-bit builds' forward loop over the real pipeline.


def calibration_loop(components, variant: Variant, device, dtype, progress: bool) -> Callable[[torch.nn.Module], None]:
    """The calibration passes, recorded by `quant.activation_record`: the real pipeline on the packaged prompts at
    the variant's step count, in batches of CALIBRATION_BATCH prompts (as the reference demo), decoding nothing
    (calibration needs no pixels). Both backends calibrate through it. Cheap to make: the stages are taken from
    `components` when it runs, after the backend has moved them to the device."""

    def forward_loop(unet) -> None:
        from tqdm.auto import tqdm

        from sdxl_core import pipeline
        from sdxl_core.engines import Engines, text_stages, unet_stage
        from sdxl_core.quant.quantize import CALIBRATION_BATCH, calibration_prompts

        prompts = calibration_prompts(variant.calibration_size)
        batches = [prompts[i : i + CALIBRATION_BATCH] for i in range(0, len(prompts), CALIBRATION_BATCH)]
        clip, clip2 = text_stages(components)
        engines = Engines(
            device=device, dtype=dtype, clip=clip, clip2=clip2, unet=unet_stage(unet), vae=lambda latents: latents
        )
        for i, batch in enumerate(tqdm(batches, desc="calibrating", disable=not progress)):
            pipeline.txt2img(engines, components, variant.replace(batch_size=len(batch)), batch, seed=i)

    return forward_loop
