"""A small random diffusers-format SDXL LoRA, made by the tests themselves with peft."""

import copy
from pathlib import Path

import torch


def make_lora(unet, directory: Path, rank: int = 4, seed: int = 0) -> Path:
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    unet = copy.deepcopy(unet)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights=False))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    StableDiffusionXLPipeline.save_lora_weights(directory, unet_lora_layers=get_peft_model_state_dict(unet),
                                                safe_serialization=True)
    return directory / "pytorch_lora_weights.safetensors"
