"""Backends turn loaded components into four callables the pipeline runs: clip, clip2, unet, vae.

A backend is a module with `NAME`, `version()` and `prepare(variant, components, device, ...)`
returning `Engines`; `prepare` builds the UNet engine into `--engine-dir` or reuses the one there.
`text_stages`, `unet_stage` and `vae_stage` make those callables from plain torch modules (the torch
backend's engines and calibration use them), so no backend needs the pipeline.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sdxl_core.engines.info import EngineInfo
from sdxl_core.errors import UserError
from sdxl_core.hardware import device_tag  # noqa: F401 (part of every engine key; backends import it from here)

if TYPE_CHECKING:  # importing torch takes seconds: the CLI checks backend names before it does
    import torch

BACKENDS = {"torch": "sdxl_core.engines.torch_backend", "tensorrt": "sdxl_core.engines.tensorrt"}


@dataclass
class Engines:
    device: torch.device
    dtype: torch.dtype
    clip: Callable[[torch.Tensor], torch.Tensor]  # token ids -> penultimate hidden states
    clip2: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # -> (penultimate hidden, pooled)
    unet: Callable[..., torch.Tensor]  # (sample, t, encoder_hidden_states, text_embeds, time_ids) -> noise
    vae: Callable[[torch.Tensor], torch.Tensor]  # scaled latents -> pixels in [-1, 1]
    info: EngineInfo | None = None  # engine key, artifact path, built or loaded, seconds per phase (None: a
    # bundle that prepared no engine, as calibration's forward loop)


BUILD_CODE = ("quant", "engines")  # the package folders whose code makes an engine's bytes


def build_identity(variant) -> dict:
    """What an engine depends on beyond the variant's knobs, the backend's version and the GPU, folded into its
    key: the libraries whose code builds it (diffusers' UNet; ModelOpt's calibration for 8-bit), this package's
    build code, and for a built-in model the recipe its weights are drawn with. The suite is run to learn whether
    an upgrade still gives the right images: an engine built by other code must never answer for this code."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    identity = {"diffusers": installed("diffusers"), "code": _build_code_digest()}
    if variant.is_quantized:
        identity["modelopt"] = installed("nvidia-modelopt")
    from sdxl_core.models.configs import BUILTIN_MODELS, REACTIVE_GAINS, builtin_configs

    if variant.model in BUILTIN_MODELS:
        identity["model"] = {"configs": builtin_configs(variant.model), "gains": REACTIVE_GAINS}
    return identity


@functools.cache
def _build_code_digest() -> str:
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for folder in BUILD_CODE:
        for path in sorted((root / folder).rglob("*")):
            if path.suffix in (".py", ".cu", ".cuh"):
                digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def check_backend(name: str) -> None:
    if name not in BACKENDS:
        raise UserError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")


def get_backend(name: str):
    check_backend(name)
    return importlib.import_module(BACKENDS[name])


def text_stages(components):
    """The two text encoders as stages: token ids -> penultimate hidden states (+ pooled, for clip2)."""

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
    """A UNet as the five-input stage the loop calls: (sample, t, hidden, text_embeds, time_ids) -> noise."""
    import torch

    def step(sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        # One timestep dtype whatever the scheduler hands over (int64 or float32), so a compiled UNet never
        # recompiles for it; diffusers embeds the timestep in float32 either way.
        timestep = torch.as_tensor(timestep, device=sample.device).to(torch.float32)
        return unet(
            sample,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
            return_dict=False,
        )[0]

    return step
