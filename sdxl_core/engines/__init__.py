"""Backends turn loaded components into four callables the pipeline runs: clip, clip2, unet, vae.

A backend is a module with `NAME`, `version()` and `prepare(variant, components, device, ...)`
returning `Engines`; `prepare` builds the UNet engine into `--engine-dir` or reuses the one there.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import UserError

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
    info: dict = field(default_factory=dict)  # engine key, artifact path, built or loaded, build seconds


def check_backend(name: str) -> None:
    if name not in BACKENDS:
        raise UserError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")


def get_backend(name: str):
    check_backend(name)
    return importlib.import_module(BACKENDS[name])


def device_tag(device: torch.device) -> str:
    """Part of every engine key: an engine built for one GPU generation never loads on another."""
    import torch

    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"sm{major}{minor}"
    return device.type
