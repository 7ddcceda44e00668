"""The PyTorch backend: eager (or compiled) modules; fp16/bf16 on a GPU, fp32 on the CPU."""

from __future__ import annotations

import torch

from ..errors import UserError
from ..variants import Variant
from . import Engines, device_tag

NAME = "torch"


def version() -> str:
    return torch.__version__.split("+")[0]


def compute_dtype(device: torch.device, precision: str = "fp16", half: str = "fp16") -> torch.dtype:
    """8-bit engines keep fp16 (or bf16) for what stays unquantized; the CPU runs fp32."""
    if device.type == "cpu":
        return torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[half]


def text_stages(components):
    def clip(ids):
        out = components.text_encoder(ids, output_hidden_states=True)
        return out.hidden_states[-2]

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
        return unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                    added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}, return_dict=False)[0]

    return step


def prepare(variant: Variant, components, device: torch.device, *, engine_dir=None, onnx_dir=None,
            half: str = "fp16", progress: bool = True) -> Engines:
    if variant.is_quantized:
        raise UserError(f"--{variant.precision} engines are not available in this build of the torch backend yet")
    dtype = compute_dtype(device, variant.precision, half)
    components.to(device, dtype)
    clip, clip2 = text_stages(components)
    return Engines(device=device, dtype=dtype, clip=clip, clip2=clip2, unet=unet_stage(components.unet),
                   vae=vae_stage(components),
                   info={"backend": NAME, "backend_version": version(), "mode": "eager",
                         "engine_key": variant.engine_key(version(), device_tag(device))})
