"""Load the SDXL components: from a hub id or a local diffusers dir (`hub`), or build a built-in model (`builtin`).

The package's parts, by job: `configs` (the built-in architectures), `components` (what the pipeline gets),
`builtin` (seeded random weights that react to every input), `cache` (generated weights kept on disk), `hub`
(real models and LoRAs). Callers use the names re-exported here.
"""

from __future__ import annotations

from sdxl_core.models.builtin import build_builtin, builtin_tokenizer, make_builtin_lora, make_lora, make_reactive
from sdxl_core.models.cache import BEFORE_UNET, CACHED_BUILTINS, MODEL_CACHE_ENV, MODEL_CACHE_FORMAT, ModelCache
from sdxl_core.models.components import Components, count_parameters, import_libraries
from sdxl_core.models.configs import (
    BUILTIN_MODELS,
    MODEL_NOTES,
    REACTIVE_GAINS,
    SDXL_SCHEDULER_CONFIG,
    SDXL_TEXT_ENCODER_2_CONFIG,
    SDXL_TEXT_ENCODER_CONFIG,
    SDXL_UNET_CONFIG,
    SDXL_VAE_CONFIG,
    TINY_TEXT_ENCODER_2_CONFIG,
    TINY_TEXT_ENCODER_CONFIG,
    TINY_UNET_CONFIG,
    TINY_VAE_CONFIG,
)
from sdxl_core.models.hub import (
    check_hub_source,
    check_model_name,
    diffusers_pipeline,
    from_pretrained,
    fuse_lora,
    hub_reachable,
    is_hub_id,
)
from sdxl_core.startup import Startup

__all__ = [
    "BEFORE_UNET",
    "BUILTIN_MODELS",
    "CACHED_BUILTINS",
    "MODEL_CACHE_ENV",
    "MODEL_CACHE_FORMAT",
    "MODEL_NOTES",
    "REACTIVE_GAINS",
    "SDXL_SCHEDULER_CONFIG",
    "SDXL_TEXT_ENCODER_2_CONFIG",
    "SDXL_TEXT_ENCODER_CONFIG",
    "SDXL_UNET_CONFIG",
    "SDXL_VAE_CONFIG",
    "TINY_TEXT_ENCODER_2_CONFIG",
    "TINY_TEXT_ENCODER_CONFIG",
    "TINY_UNET_CONFIG",
    "TINY_VAE_CONFIG",
    "Components",
    "ModelCache",
    "build_builtin",
    "builtin_tokenizer",
    "check_hub_source",
    "check_model_name",
    "diffusers_pipeline",
    "count_parameters",
    "from_pretrained",
    "fuse_lora",
    "hub_reachable",
    "import_libraries",
    "is_hub_id",
    "load",
    "make_builtin_lora",
    "make_lora",
    "make_reactive",
]


def load(
    model: str,
    *,
    lora_path: str | None = None,
    lora_scale: float = 1.0,
    seed: int = 0,
    unet_weights: bool = True,
    startup: Startup | None = None,
) -> Components:
    """fp32 components on the CPU, LoRA fused. Callers move them with `Components.to`.

    `unet_weights=False` builds the UNet on the meta device from its config only: enough to load a prebuilt
    engine, which brings its own UNet. Its 2.6 B parameters are seeded or read only if an engine has to be
    built (`Components.load_unet_weights`). A LoRA is fused into the UNet, so it keeps the weights. Each
    component's time is recorded in `startup`.
    """
    startup = startup or Startup()
    unet_weights = unet_weights or bool(lora_path)
    if model in BUILTIN_MODELS:
        components = build_builtin(model, seed=seed, unet_weights=unet_weights, startup=startup)
    else:
        components = from_pretrained(model, unet_weights=unet_weights, startup=startup)
    if lora_path:
        with startup.phase("lora"):
            fuse_lora(components, lora_path, lora_scale)
    return components
