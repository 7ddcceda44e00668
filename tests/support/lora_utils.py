"""A small random diffusers-format SDXL LoRA, made by the tests themselves with peft."""

import copy
from pathlib import Path

import torch


def make_lora(unet, directory: Path, rank: int = 4, seed: int = 0) -> Path:
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    unet = copy.deepcopy(unet)
    unet.add_adapter(
        LoraConfig(
            r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False
        )
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_" in name and not param.is_meta:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    layers = get_peft_model_state_dict(unet)
    if any(t.is_meta for t in layers.values()):  # a meta-device UNet: values scaled like a default init
        layers = {k: torch.randn(t.shape, generator=generator) * (0.3 / t.shape[-1] ** 0.5) for k, t in layers.items()}
    StableDiffusionXLPipeline.save_lora_weights(directory, unet_lora_layers=layers, safe_serialization=True)
    return directory / "pytorch_lora_weights.safetensors"


def make_builtin_lora(model: str, directory: Path) -> Path:
    """A random LoRA for a built-in model. The full-size UNet only lends its shapes: built on the meta device,
    never materialised, so making the LoRA for `sdxl-random` takes seconds, not the UNet's seeding minute."""
    from diffusers import UNet2DConditionModel

    from sdxl_core import models

    if model == "tiny":
        return make_lora(models.build_builtin("tiny").unet, directory)
    if model != "sdxl-random":
        raise ValueError(f"no built-in model {model!r}")
    with torch.device("meta"):
        unet = UNet2DConditionModel(**models.SDXL_UNET_CONFIG)
    return make_lora(unet, directory)
