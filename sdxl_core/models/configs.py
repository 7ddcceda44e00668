"""The built-in models' configs: SDXL base's architecture, and `tiny`, the same shape with small channels."""

from __future__ import annotations

from sdxl_core.errors import UserError

BUILTIN_MODELS = ("tiny", "sdxl-random")
MODEL_NOTES = {
    "tiny": "built-in tiny model: seeded random weights, so its images are noise by design; it checks the "
    "plumbing and CPU timings, not image quality",
    "sdxl-random": "built-in sdxl-random model: the full SDXL architecture with seeded random weights, so its "
    "images are noise by design; it costs what the real model costs per step",
}

SDXL_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "sample_max_value": 1.0,
    "skip_prk_steps": True,
}

SDXL_UNET_CONFIG = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
}
SDXL_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}
SDXL_TEXT_ENCODER_CONFIG = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    hidden_act="quick_gelu",
    projection_dim=768,
)
SDXL_TEXT_ENCODER_2_CONFIG = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    hidden_act="gelu",
    projection_dim=1280,
)

TINY_UNET_CONFIG = {
    **SDXL_UNET_CONFIG,
    "sample_size": 16,
    "block_out_channels": (32, 64, 64),
    "transformer_layers_per_block": (1, 1, 2),
    "attention_head_dim": (2, 4, 4),
    "cross_attention_dim": 96,
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 32 + 6 * 8,
}
TINY_VAE_CONFIG = {
    **SDXL_VAE_CONFIG,
    "block_out_channels": (8, 16, 16, 16),
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 128,
    "force_upcast": False,
}
TINY_TEXT_ENCODER_CONFIG = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    hidden_act="quick_gelu",
    projection_dim=32,
)
TINY_TEXT_ENCODER_2_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    hidden_act="gelu",
    projection_dim=32,
)


# Built-in UNets only: gains on the freshly initialised weights, so that every input and every block visibly
# moves what the UNet predicts. With the libraries' default init (uniform, std 1/sqrt(3 fan_in) per layer)
# cross-attention is nearly uniform (logits of std ~0.15) and returns about the mean of the 77 token states
# whatever the prompt; the residual branches, the time and text-time embeddings and conv_out come out at
# 0.1-0.3 of what they feed. Measured on `tiny` (128x128, 4 Euler steps, guidance 5), default init -> these
# gains: conditional vs unconditional noise prediction 6 % -> 33 % apart; guidance 1.0 instead of 5.0 moves
# the final latents 5 % -> 50 % (image SSIM 0.996 -> 0.76); each path switched off moves them 11-89 %
# (tests/unit/test_models.py). The price is a model that also reacts more to rounding: the UNet in bf16
# moves the latents 1.2 % -> 3.3 %, INT8 vs FP16 images SSIM 0.998 -> 0.991-0.994, FP8 0.995 -> 0.957-0.966.
# Sharpening self-attention too (QK 2.5) made the mid block matter 4x more but rounding 2x more (FP8 SSIM
# 0.83-0.89), so it is left as drawn. The gains are constants (no data-dependent scale, no random draw): the
# weights stay the same on every machine and the seeded stream is untouched; they are part of the model
# cache's key. Activations stay well inside fp16 (residual std ~2 in tiny's mid block).
REACTIVE_GAINS = {
    "self_attention_qk": 1.0,  # left as drawn: sharper self-attention made 8-bit noise grow 3x more
    "cross_attention_qk": 2.0,  # to_q and to_k of each cross-attention: the text states are not normalised
    "attention_out": 3.0,  # to_out of each attention
    "feed_forward_out": 2.0,
    "transformer_proj_out": 1.5,  # each Transformer2DModel's proj_out, back into the resnet stream
    "resnet_time_emb_proj": 4.0,  # the time and text-time embedding into each resnet
    "add_embedding_out": 4.0,  # pooled text embedding and time ids -> the text-time embedding
    "conv_out": 3.0,  # the noise prediction: std ~1, as a trained model's is
}


def builtin_configs(name: str) -> dict[str, dict]:
    """Per component, the config a built-in model is built from."""
    if name == "tiny":
        configs = (TINY_TEXT_ENCODER_CONFIG, TINY_TEXT_ENCODER_2_CONFIG, TINY_VAE_CONFIG, TINY_UNET_CONFIG)
    elif name == "sdxl-random":
        configs = (SDXL_TEXT_ENCODER_CONFIG, SDXL_TEXT_ENCODER_2_CONFIG, SDXL_VAE_CONFIG, SDXL_UNET_CONFIG)
    else:
        raise UserError(f"unknown built-in model {name!r}: choose one of {', '.join(BUILTIN_MODELS)}")
    return dict(zip(("text_encoder", "text_encoder_2", "vae", "unet"), configs, strict=True))
