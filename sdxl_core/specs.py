"""One spec per SDXL component: its names, graph inputs and outputs, shapes, sample inputs and engine key.

Export, both backends and the models read these, in the manner of the TensorRT demo's per-model
`get_input_names / get_output_names / get_shape_dict / get_sample_input`:

    clip   input_ids[int32 B,77] -> hidden_states                 (penultimate layer)
    clip2  input_ids[int32 B,77] -> hidden_states, text_embeds    (penultimate layer, pooled projection)
    unet   sample, timestep[fp32 (1,)], encoder_hidden_states, text_embeds, time_ids -> latent
    vae    latent -> images                                       (decoder only, pixels in [-1, 1])

B is `variant.unet_batch` for the text encoders and the UNet (CFG doubles it), `variant.batch_size` for the
VAE. Shapes come from the module's config when one is given, else from SDXL base.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdxl_core.variants import Variant, make_key

TEXT_MAXLEN = 77
TIME_IDS = 6  # (orig h, orig w, crop top, crop left, target h, target w)

# Shapes when no module config is given: SDXL base.
_SDXL = {
    "in_channels": 4,
    "out_channels": 4,
    "cross_attention_dim": 2048,
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "latent_channels": 4,
    "vae_out_channels": 3,
    "clip_hidden": 768,
    "clip2_hidden": 1280,
    "clip2_projection": 1280,
}


def config_value(config, key, default):
    """`config[key]` for a dict or a diffusers/transformers config object, else `default`."""
    if config is None:
        return default
    value = config.get(key, None) if hasattr(config, "get") else getattr(config, key, None)
    return default if value is None else value


@dataclass(frozen=True)
class ComponentSpec:
    name: str  # clip, clip2, unet, vae
    engine_name: str  # the reference demo's engine name: clip, clip2, unetxl, vae
    attribute: str  # where `models.Components` keeps the module
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    def module(self, components) -> torch.nn.Module:
        return getattr(components, self.attribute)

    def batch(self, variant: Variant) -> int:
        return variant.batch_size if self.name == "vae" else variant.unet_batch

    def shapes(self, variant: Variant, config=None) -> dict[str, tuple[int, ...]]:
        """Static shapes of every graph input and output."""
        b, h, w = self.batch(variant), variant.height // 8, variant.width // 8
        cfg = lambda key, default_key=None: config_value(config, key, _SDXL[default_key or key])  # noqa: E731
        if self.name == "unet":
            text_embeds = cfg("projection_class_embeddings_input_dim") - TIME_IDS * cfg("addition_time_embed_dim")
            return {
                "sample": (b, cfg("in_channels"), h, w),
                "timestep": (1,),
                "encoder_hidden_states": (b, TEXT_MAXLEN, cfg("cross_attention_dim")),
                "text_embeds": (b, text_embeds),
                "time_ids": (b, TIME_IDS),
                "latent": (b, cfg("out_channels"), h, w),
            }
        if self.name == "vae":
            return {
                "latent": (b, cfg("latent_channels"), h, w),
                "images": (b, cfg("out_channels", "vae_out_channels"), variant.height, variant.width),
            }
        pooled = self.name == "clip2"
        shapes = {
            "input_ids": (b, TEXT_MAXLEN),
            "hidden_states": (b, TEXT_MAXLEN, cfg("hidden_size", "clip2_hidden" if pooled else "clip_hidden")),
        }
        if pooled:
            shapes["text_embeds"] = (b, cfg("projection_dim", "clip2_projection"))
        return shapes

    def sample_inputs(
        self, variant: Variant, module: torch.nn.Module | None = None, *, seed: int = 0, device=None, dtype=None
    ) -> tuple[torch.Tensor, ...]:
        """Seeded random inputs of the graph's shapes (never zeros), in the module's dtype and device unless
        given. Used for export, warm-up, CUDA-graph capture, dispatch timing and benchmarks."""
        config = getattr(module, "config", None)
        if module is not None and (dtype is None or device is None):
            p = next(module.parameters())
            dtype, device = dtype or p.dtype, device or p.device
        dtype, device = dtype or torch.float32, device or "cpu"
        gen = torch.Generator("cpu").manual_seed(seed)
        shapes = self.shapes(variant, config)
        out = []
        for name in self.inputs:
            shape = shapes[name]
            if name == "input_ids":
                vocab = config_value(config, "vocab_size", 49408)
                ids = torch.randint(0, vocab - 2, shape, generator=gen, dtype=torch.int32)
                ids[:, 0], ids[:, -1] = vocab - 2, vocab - 1  # BOS ... EOS (pooling takes the EOS position)
                out.append(ids.to(device))
            elif name == "timestep":
                out.append(torch.tensor([999.0], dtype=torch.float32, device=device))
            elif name == "time_ids":
                hw = [variant.height, variant.width, 0, 0, variant.height, variant.width]
                out.append(torch.tensor([hw] * shape[0], dtype=dtype, device=device))
            else:
                out.append(torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype))
        return tuple(out)

    def key(self, variant: Variant, backend_version: str, device_tag: str, identity: dict | None = None) -> str:
        """The UNet's is `Variant.engine_key`; the others are keys in the same style, e.g.
        `clip2.bs2.sdxl-random.tensorrt10-8-0-43.sm90.<digest>`, `vae.bs1.h1024w1024.sdxl-random...`."""
        if self.name == "unet":
            return variant.engine_key(backend_version, device_tag, identity)
        batch = self.batch(variant)
        knobs = {
            "component": self.name,
            "model": variant.model,
            "batch": batch,
            "backend": variant.backend,
            "lora": (variant.lora_path, variant.lora_scale) if variant.lora_path else None,
        }
        readable = [self.name, f"bs{batch}"]
        if self.name == "vae":
            knobs.update(height=variant.height, width=variant.width)
            readable.append(f"h{variant.height}w{variant.width}")
        return make_key(readable, knobs, variant, backend_version, device_tag, identity)


SPECS = {
    spec.name: spec
    for spec in (
        ComponentSpec("clip", "clip", "text_encoder", ("input_ids",), ("hidden_states",)),
        ComponentSpec("clip2", "clip2", "text_encoder_2", ("input_ids",), ("hidden_states", "text_embeds")),
        ComponentSpec(
            "unet",
            "unetxl",
            "unet",
            ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"),
            ("latent",),
        ),
        ComponentSpec("vae", "vae", "vae", ("latent",), ("images",)),
    )
}
COMPONENTS = tuple(SPECS)  # in the order the pipeline runs them


def get(name: str) -> ComponentSpec:
    try:
        return SPECS[name]
    except KeyError:
        raise ValueError(f"unknown component {name!r}: one of {COMPONENTS}") from None
