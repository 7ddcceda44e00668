"""`Components`: what the pipeline needs from a model, whichever way it was loaded."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from sdxl_core.errors import UserError


@dataclass
class Components:
    """What the pipeline needs. The UNet may be shape-only (on the meta device) with `unet_loader` to get its
    weights: a run that reuses an engine never needs them, a run that builds one calls `load_unet_weights`."""

    name: str
    tokenizer: object
    tokenizer_2: object
    text_encoder: torch.nn.Module
    text_encoder_2: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module
    scheduler_config: dict
    lora: dict = field(default_factory=dict)
    unet_loader: Callable[[], torch.nn.Module] | None = field(default=None, repr=False)
    placement: tuple | None = field(default=None, repr=False)  # (device, dtype) of the last `to`

    def modules(self) -> dict[str, torch.nn.Module]:
        return {
            "text_encoder": self.text_encoder,
            "text_encoder_2": self.text_encoder_2,
            "unet": self.unet,
            "vae": self.vae,
        }

    @property
    def has_unet_weights(self) -> bool:
        return not any(p.is_meta for p in self.unet.parameters())

    def load_unet_weights(self) -> torch.nn.Module:
        """The UNet with its weights (loaded now if it was shape-only), placed where `to` put the others."""
        if self.has_unet_weights:
            return self.unet
        if self.unet_loader is None:
            raise UserError("this engine has to be built, but the UNet weights were not loaded (a load-only run)")
        unet = self.unet_loader().eval().requires_grad_(False)
        if self.placement is not None:
            unet.to(device=self.placement[0], dtype=self.placement[1])
        self.unet = unet
        return unet

    def to(self, device, dtype: torch.dtype) -> Components:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()  # its "cast with to()" notice is noise for random weights
        self.placement = (device, dtype)
        for name, module in self.modules().items():
            if name == "unet" and not self.has_unet_weights:
                continue  # a shape-only UNet: the engine brings the weights
            # An SDXL VAE overflows in fp16 (config.force_upcast); keep it in fp32 as diffusers does.
            keep_fp32 = name == "vae" and getattr(module.config, "force_upcast", False)
            module.to(device=device, dtype=torch.float32 if keep_fp32 else dtype).eval().requires_grad_(False)
        return self


def import_libraries() -> None:
    """Import what `load` builds components with, so a run can time its imports apart from its components."""
    import diffusers.models.autoencoders.autoencoder_kl  # noqa: F401
    import diffusers.models.unets.unet_2d_condition  # noqa: F401
    import transformers.models.clip.modeling_clip  # noqa: F401
    import transformers.models.clip.tokenization_clip  # noqa: F401


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
