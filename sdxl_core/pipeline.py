"""SDXL text-to-image: text encoders -> UNet loop with CFG -> VAE, with per-stage timing.

The loop calls the four stages through an `Engines` bundle (see `engines/`), so compiled, 8-bit
or TensorRT UNets plug in without touching this file.
"""

from __future__ import annotations

import inspect
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from sdxl_core.variants import Variant

SCHEDULER_CLASSES = {
    "DDIM": "DDIMScheduler",
    "DDPM": "DDPMScheduler",
    "EulerA": "EulerAncestralDiscreteScheduler",
    "Euler": "EulerDiscreteScheduler",
    "LCM": "LCMScheduler",
    "LMSD": "LMSDiscreteScheduler",
    "PNDM": "PNDMScheduler",
    "UniPC": "UniPCMultistepScheduler",
}


def make_scheduler(name: str, config: dict, *, turbo: bool = False):
    import diffusers

    cls = getattr(diffusers, SCHEDULER_CLASSES[name])
    overrides = {"timestep_spacing": "trailing"} if turbo else {}
    return cls.from_config({**config, **overrides})


class StageTimer:
    """Per-stage wall time in ms: CUDA events on a GPU (no sync inside the loop), perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._marks: list[tuple[str, object, object]] = []

    @contextmanager
    def stage(self, name: str):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
        else:
            start = time.perf_counter()
            yield
            end = time.perf_counter()
        self._marks.append((name, start, end))

    def results(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
        totals: dict[str, float] = {}
        for name, start, end in self._marks:
            ms = start.elapsed_time(end) if self.cuda else (end - start) * 1000.0
            totals[name] = totals.get(name, 0.0) + ms
        return totals


@dataclass
class Result:
    images: list[Image.Image]
    timings: dict[str, float]  # ms per stage: clip, clip2, unet, vae, total
    unet_calls: int
    latents: torch.Tensor = field(repr=False)

    @property
    def images_per_second(self) -> float:
        return len(self.images) / (self.timings["total"] / 1000.0)


@torch.inference_mode()
def txt2img(
    engines,
    components,
    variant: Variant,
    prompts: list[str],
    *,
    negative_prompt: str = "",
    seed: int = 0,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Result:
    """One batch: `len(prompts)` images. `generator` lets batch counts continue one random stream."""
    device, dtype = engines.device, engines.dtype
    generator = generator or torch.Generator("cpu").manual_seed(seed)
    scheduler = make_scheduler(variant.scheduler, components.scheduler_config, turbo=variant.version == "xl-turbo")
    scheduler.set_timesteps(variant.steps, device=device)
    # Only the stochastic schedulers take a generator (diffusers checks the signature the same way).
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    batch = len(prompts)
    texts = ([negative_prompt] * batch + list(prompts)) if variant.do_cfg else list(prompts)
    warn_truncated(components.tokenizer, texts)  # outside the timed stages: it tokenizes once more

    timer = StageTimer(device)
    with timer.stage("total"):
        with timer.stage("clip"):
            hidden_1 = engines.clip(_token_ids(components.tokenizer, texts, device))
        with timer.stage("clip2"):
            hidden_2, pooled = engines.clip2(_token_ids(components.tokenizer_2, texts, device))
        encoder_hidden_states = torch.cat([hidden_1, hidden_2], dim=-1).to(dtype)
        text_embeds = pooled.to(dtype)
        time_ids = torch.tensor(
            [[variant.height, variant.width, 0, 0, variant.height, variant.width]], device=device, dtype=dtype
        ).repeat(len(texts), 1)

        latent_shape = (batch, 4, variant.height // 8, variant.width // 8)
        latents = torch.randn(latent_shape, generator=generator, dtype=torch.float32).to(device)
        latents = latents * scheduler.init_noise_sigma
        steps = scheduler.timesteps
        with timer.stage("unet"):
            for t in tqdm(steps, desc="unet", disable=not progress, leave=False):
                model_input = torch.cat([latents] * 2) if variant.do_cfg else latents
                model_input = scheduler.scale_model_input(model_input, t).to(dtype)
                noise = engines.unet(model_input, t, encoder_hidden_states, text_embeds, time_ids).float()
                if variant.do_cfg:
                    uncond, cond = noise.chunk(2)
                    noise = uncond + variant.guidance_scale * (cond - uncond)
                latents = scheduler.step(noise, t, latents, **step_kwargs, return_dict=False)[0]
        with timer.stage("vae"):
            pixels = engines.vae(latents / components.vae.config.scaling_factor)
    timings = timer.results()
    return Result(images=_to_pil(pixels), timings=timings, unet_calls=len(steps), latents=latents)


def run(
    engines,
    components,
    variant: Variant,
    prompt: str,
    *,
    negative_prompt: str = "",
    seed: int = 0,
    batch_count: int = 1,
    warmup_runs: int = 0,
    progress: bool = True,
    generator: torch.Generator | None = None,
) -> list[Result]:
    """The demo's loop: warm-up runs (not reported), then `batch_count` batches from one seed. A `generator`
    (seeded with `seed`) lets a caller run the batches in parts: they continue one random stream."""
    prompts = [prompt] * variant.batch_size
    for _ in tqdm(range(warmup_runs), desc="warm-up", disable=not progress or warmup_runs == 0):
        txt2img(engines, components, variant, prompts, negative_prompt=negative_prompt, seed=seed)
    generator = generator or torch.Generator("cpu").manual_seed(seed)
    return [
        txt2img(
            engines,
            components,
            variant,
            prompts,
            negative_prompt=negative_prompt,
            generator=generator,
            progress=progress,
        )
        for _ in range(batch_count)
    ]


_CHECKED: set[str] = set()  # texts already checked for length: each is warned about once per process


def warn_truncated(tokenizer, texts: list[str]) -> None:
    """Say on stderr, once per text, what the text encoders will not see: they read `model_max_length` tokens
    (77 for SDXL's CLIPs) and the rest is cut, as diffusers warns too."""
    limit = tokenizer.model_max_length
    for text in dict.fromkeys(texts):
        if not text or text in _CHECKED:
            continue
        _CHECKED.add(text)
        ids = tokenizer(text, truncation=False, verbose=False).input_ids
        if len(ids) > limit:
            cut = tokenizer.decode(ids[limit - 1 : -1])  # the tokens past the limit, less the end token
            print(
                f"warning: a prompt of {len(ids)} tokens is cut to the {limit} the text encoders read; "
                f"they do not see {_shorten(cut)!r}",
                file=sys.stderr,
            )


def _shorten(text: str, chars: int = 60) -> str:
    return text if len(text) <= chars else f"{text[:chars]}... ({len(text.split())} words)"


def _token_ids(tokenizer, texts: list[str], device) -> torch.Tensor:
    ids = tokenizer(
        texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return ids.to(device)


def _to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    array = ((pixels.float().nan_to_num(0.0).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    array = array.permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in array]
