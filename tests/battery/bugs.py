"""Plausible bugs, the kind a library upgrade or a careless change brings, as search/replace patches.

Each patch names a file of the repository, a text that must occur in it exactly once (the battery fails loudly,
naming the bug, when the code moved and the text is gone) and what replaces it. Together they cover quantization
scales and rounding, SmoothQuant, the calibration record, GEMM epilogue terms, weight layout and QKV fusion order,
scheduler timesteps and sigmas, guidance, CFG batch order, VAE scaling, LoRA scale, pooled text embeddings, the text
encoder's layer, the size conditioning, the stochastic schedulers' noise, batches of several prompts and dtype
downcasts. Every one must make `pytest -m quality` fail on `tiny` (CPU) and on `sdxl-random` (Hopper).

Each bug also names the variants it changes, and its run selects only their quality tests (`--variants`): one
engine to build instead of five. That can only make a kill harder (a bug that a left-out variant's test would
catch counts as surviving), so it never inflates the kill rate.
"""

from __future__ import annotations

from dataclasses import dataclass

FP16, INT8, FP8, LCM_LORA, TURBO = "xl-1.0-fp16", "xl-1.0-int8", "xl-1.0-fp8", "xl-1.0-lcm-lora", "xl-turbo"


@dataclass(frozen=True)
class Bug:
    name: str
    variants: tuple[str, ...]  # the variants whose quality tests a run of this bug selects (`--variants`)
    area: str
    file: str
    search: str
    replace: str
    what: str


BUGS = (
    # -- quantization scales and rounding
    Bug(
        "int8_activation_scale_3pct",
        (INT8,),
        "quantization scale",
        "sdxl_core/quant/kernels/ops.py",
        "return int8_gemm.int8_linear(x_q, w_q, a_scale, w_scale, bias, out_dtype=out_dtype, kernel=kernel)",
        "return int8_gemm.int8_linear(x_q, w_q, a_scale * 1.03, w_scale, bias, out_dtype=out_dtype, kernel=kernel)",
        "the INT8 GEMM dequantizes with an activation scale 3 % off the one it quantized with",
    ),
    Bug(
        "fp8_qmax_e4m3fnuz",
        (FP8,),
        "quantization scale",
        "sdxl_core/quant/qmodules.py",
        'QMAX = {"int8": 127.0, "fp8": 448.0}',
        'QMAX = {"int8": 127.0, "fp8": 240.0}',
        "FP8 scales computed for e4m3fnuz's range (240) while values are stored as e4m3fn",
    ),
    Bug(
        "int8_rounding_truncates",
        (INT8,),
        "quantization rounding",
        "sdxl_core/quant/kernels/int8_gemm.py",
        "return round_to_int8(x.float() * inverse)",
        "return round_to_int8((x.float() * inverse).trunc())",
        "INT8 quantization truncates toward zero instead of rounding to nearest",
    ),
    # -- SmoothQuant
    Bug(
        "smoothquant_scale_inverted",
        (INT8,),
        "smoothing",
        "sdxl_core/quant/qmodules.py",
        "            x = x * self.smooth\n",
        "            x = x / self.smooth\n",
        "the SmoothQuant input scale divides the activation instead of multiplying it",
    ),
    Bug(
        "smoothquant_alpha_flipped",
        (INT8,),
        "smoothing",
        "sdxl_core/quant/quantize.py",
        '"alpha": variant.quant_alpha}',
        '"alpha": 1.0 - variant.quant_alpha}',
        "SmoothQuant's migration strength read the other way round (alpha 0.2 for 0.8)",
    ),
    # -- calibration record
    Bug(
        "record_linear_inputs_per_tensor",
        (INT8,),
        "calibration",
        "sdxl_core/quant/activation_record.py",
        "keep_max(maxima, name, _abs_max(args[0], per_channel=True))",
        "keep_max(maxima, name, _abs_max(args[0], per_channel=False).expand(args[0].shape[-1]).reshape(1, 1, -1))",
        "the record keeps one max per linear input instead of one per channel, so SmoothQuant smooths nothing",
    ),
    Bug(
        "record_keeps_the_signed_max",
        (INT8, FP8),
        "calibration",
        "sdxl_core/quant/activation_record.py",
        "    low, high = torch.aminmax(x.reshape(-1, x.shape[-1]), dim=0)\n    return torch.maximum(-low, high)",
        "    low, high = torch.aminmax(x.reshape(-1, x.shape[-1]), dim=0)\n    return high.clamp(min=0)",
        "the record keeps each channel's largest value instead of its largest magnitude (negative inputs clip)",
    ),
    # -- GEMM epilogue terms
    Bug(
        "int8_bias_dropped",
        (INT8,),
        "epilogue bias",
        "sdxl_core/quant/qmodules.py",
        "return ops.int8_mm(x_q, w, a_scale, w_scale, bias, out_dtype, kernel)",
        "return ops.int8_mm(x_q, w, a_scale, w_scale, None, out_dtype, kernel)",
        "the INT8 GEMM epilogue drops the bias",
    ),
    Bug(
        "fp8_bias_before_scale",
        (FP8,),
        "epilogue scales",
        "sdxl_core/quant/kernels/ops.py",
        "        out = (x_q.float() @ w_q.float().T) * (a_scale.float() * w_scale.float())\n"
        "        return (out if bias is None else out + bias.float()).to(out_dtype)\n",
        "        out = x_q.float() @ w_q.float().T\n"
        "        out = out if bias is None else out + bias.float()\n"
        "        return (out * (a_scale.float() * w_scale.float())).to(out_dtype)\n",
        "the FP8 epilogue adds the bias before the dequantization scale, so the bias is scaled too",
    ),
    # -- weight layout and QKV fusion order
    Bug(
        "conv_weight_flipped",
        (INT8,),
        "weight layout",
        "sdxl_core/quant/qmodules.py",
        "        return (self.weight.float() * scale).to(dtype)\n",
        "        return (self.weight.float().flip(-1) * scale).to(dtype)\n",
        "the dequantized weight comes back mirrored along its last axis (a 3x3 kernel flipped left-right)",
    ),
    Bug(
        "qkv_fusion_kv_swapped",
        (FP16,),
        "QKV fusion order",
        "sdxl_core/quant/unet_plan.py",
        "    unet.fuse_qkv_projections()\n",
        "    unet.fuse_qkv_projections()\n"
        "    for fused in (m.to_qkv for m in unet.modules() if getattr(m, 'to_qkv', None) is not None):\n"
        "        q, k, v = fused.weight.data.chunk(3)\n"
        "        fused.weight.data = torch.cat([q, v, k])\n",
        "the fused self-attention projection stacks Q, V, K instead of Q, K, V",
    ),
    # -- scheduler timesteps and sigmas
    Bug(
        "scheduler_steps_offset_0",
        (FP16,),
        "scheduler timesteps",
        "sdxl_core/models/configs.py",
        '"steps_offset": 1,',
        '"steps_offset": 0,',
        "the built-in models' scheduler loses SDXL's steps_offset: every timestep one lower",
    ),
    Bug(
        "turbo_leading_spacing",
        (TURBO,),
        "scheduler timesteps",
        "sdxl_core/pipeline.py",
        'overrides = {"timestep_spacing": "trailing"} if turbo else {}',
        'overrides = {"timestep_spacing": "leading"} if turbo else {}',
        "Turbo's one step runs at the 'leading' timestep instead of the last one",
    ),
    Bug(
        "karras_sigmas",
        (FP16,),
        "scheduler sigmas",
        "sdxl_core/pipeline.py",
        'overrides = {"timestep_spacing": "trailing"} if turbo else {}',
        'overrides = {"timestep_spacing": "trailing"} if turbo else {"use_karras_sigmas": True}',
        "the schedulers switch to Karras sigmas (a changed library default)",
    ),
    # -- guidance and CFG batch order
    Bug(
        "guidance_off_by_one",
        (FP16,),
        "guidance",
        "sdxl_core/pipeline.py",
        "noise = uncond + variant.guidance_scale * (cond - uncond)",
        "noise = cond + variant.guidance_scale * (cond - uncond)",
        "classifier-free guidance starts from the conditional prediction: guidance scale + 1 in effect",
    ),
    Bug(
        "cfg_halves_swapped",
        (FP16,),
        "CFG batch order",
        "sdxl_core/pipeline.py",
        "uncond, cond = noise.chunk(2)",
        "cond, uncond = noise.chunk(2)",
        "the CFG batch is split in the wrong order: guidance pushes away from the prompt",
    ),
    # -- VAE scaling, LoRA scale, pooled text embeddings
    Bug(
        "vae_scaling_factor_sd15",
        (FP16,),
        "VAE scaling",
        "sdxl_core/models/configs.py",
        '"scaling_factor": 0.13025,',
        '"scaling_factor": 0.18215,',
        "the VAE latents are scaled with SD 1.5's factor instead of SDXL's",
    ),
    Bug(
        "lora_scale_halved",
        (LCM_LORA,),
        "LoRA scale",
        "sdxl_core/models/hub.py",
        'pipe.fuse_lora(lora_scale=scale, adapter_names=["sdxl_bench"])',
        'pipe.fuse_lora(lora_scale=scale * 0.5, adapter_names=["sdxl_bench"])',
        "the LoRA is fused at half its scale (alpha / rank applied twice)",
    ),
    Bug(
        "pooled_uncond_zeroed",
        (FP16,),
        "pooled text embeddings",
        "sdxl_core/pipeline.py",
        "        text_embeds = pooled.to(dtype)\n",
        "        text_embeds = pooled.to(dtype)\n"
        "        if variant.do_cfg:  # zeros for the empty negative prompt\n"
        "            text_embeds = torch.cat([torch.zeros_like(text_embeds[:batch]), text_embeds[batch:]])\n",
        "the negative prompt's pooled embedding is replaced by zeros (force_zeros_for_empty_prompt)",
    ),
    # -- text conditioning and SDXL's micro-conditioning
    Bug(
        "clip_last_hidden_layer",
        (FP16,),
        "text conditioning",
        "sdxl_core/engines/__init__.py",
        "return components.text_encoder(ids, output_hidden_states=True).hidden_states[-2]",
        "return components.text_encoder(ids, output_hidden_states=True).hidden_states[-1]",
        "the first text encoder's last hidden layer instead of the penultimate one SDXL conditions on",
    ),
    Bug(
        "negative_prompt_dropped",
        (FP16,),
        "text conditioning",
        "sdxl_core/pipeline.py",
        "texts = ([negative_prompt] * batch + list(prompts))",
        'texts = ([""] * batch + list(prompts))',
        "the unconditional half of the CFG batch encodes the empty prompt whatever negative prompt was given",
    ),
    Bug(
        "cfg_halves_interleaved",
        (FP16,),
        "CFG batch order",
        "sdxl_core/pipeline.py",
        "texts = ([negative_prompt] * batch + list(prompts)) if variant.do_cfg else list(prompts)",
        "texts = [t for p in prompts for t in (negative_prompt, p)] if variant.do_cfg else list(prompts)",
        "the texts of a batch interleave negative and positive prompts while the UNet output is split in halves:"
        " the same as before at batch 1",
    ),
    Bug(
        "batch_noise_shared",
        (FP16,),
        "initial noise",
        "sdxl_core/pipeline.py",
        "latents = torch.randn(latent_shape, generator=generator, dtype=torch.float32).to(device)",
        "latents = torch.randn((1, *latent_shape[1:]), generator=generator, dtype=torch.float32)"
        ".repeat(batch, 1, 1, 1).to(device)",
        "every image of a batch starts from the first image's noise: the same as before at batch 1",
    ),
    Bug(
        "time_ids_height_width_swapped",
        (FP16,),
        "micro-conditioning",
        "sdxl_core/pipeline.py",
        "[[variant.height, variant.width, 0, 0, variant.height, variant.width]]",
        "[[variant.width, variant.height, 0, 0, variant.width, variant.height]]",
        "the size conditioning gives (width, height) where SDXL takes (height, width): the same for square images",
    ),
    Bug(
        "time_ids_in_latent_units",
        (FP16,),
        "micro-conditioning",
        "sdxl_core/pipeline.py",
        "[[variant.height, variant.width, 0, 0, variant.height, variant.width]]",
        "[[variant.height // 8, variant.width // 8, 0, 0, variant.height // 8, variant.width // 8]]",
        "the size conditioning (original and target size) is given in latent pixels instead of image pixels",
    ),
    # -- scheduler noise
    Bug(
        "scheduler_noise_unseeded",
        (LCM_LORA, TURBO),
        "scheduler noise",
        "sdxl_core/pipeline.py",
        'step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}',
        "step_kwargs = {}",
        "a stochastic scheduler (LCM, Euler ancestral) draws its per-step noise from the global RNG, not the seed's",
    ),
    # -- dtype downcasts
    Bug(
        "unet_output_bf16",
        (FP16,),
        "dtype downcast",
        "sdxl_core/pipeline.py",
        "noise = engines.unet(model_input, t, encoder_hidden_states, text_embeds, time_ids).float()",
        "noise = engines.unet(model_input, t, encoder_hidden_states, text_embeds, time_ids).bfloat16().float()",
        "the UNet's noise prediction passes through bfloat16 before guidance and the scheduler step",
    ),
    Bug(
        "int8_quantize_from_bf16",
        (INT8,),
        "dtype downcast",
        "sdxl_core/quant/kernels/int8_gemm.py",
        "return round_to_int8(x.float() * inverse)",
        "return round_to_int8(x.bfloat16().float() * inverse)",
        "activations are rounded to bfloat16 before INT8 quantization",
    ),
)
