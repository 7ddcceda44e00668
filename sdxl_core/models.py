"""Load the SDXL components: from a hub id or a local diffusers dir, or build a built-in model.

Built-ins need no download:
- `tiny`: SDXL-shaped (two CLIP text encoders, text-time conditioning, cross-attention UNet with
  three levels, 8x VAE) with small channels and seeded random weights; runs on CPU in seconds.
- `sdxl-random`: the full SDXL base architecture (2.567 B-parameter UNet) with seeded random
  weights. It costs exactly what the real model costs per step, so it is what GPU timings use.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import re
import socket
import threading
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import torch

from .errors import UserError

BUILTIN_MODELS = ("tiny", "sdxl-random")
MODEL_NOTES = {
    "tiny": "built-in tiny model: seeded random weights, so its images are noise by design; it checks the "
            "plumbing and CPU timings, not image quality",
    "sdxl-random": "built-in sdxl-random model: the full SDXL architecture with seeded random weights, so its "
                   "images are noise by design; it costs what the real model costs per step",
}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # org/name
HUB_PROBE_TIMEOUT_S = 3.0

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
SDXL_TEXT_ENCODER_CONFIG = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768)
SDXL_TEXT_ENCODER_2_CONFIG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                  num_attention_heads=20, hidden_act="gelu", projection_dim=1280)

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
TINY_VAE_CONFIG = {**SDXL_VAE_CONFIG, "block_out_channels": (8, 16, 16, 16), "layers_per_block": 1,
                   "norm_num_groups": 8, "sample_size": 128, "force_upcast": False}
TINY_TEXT_ENCODER_CONFIG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, hidden_act="quick_gelu", projection_dim=32)
TINY_TEXT_ENCODER_2_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=2, hidden_act="gelu", projection_dim=32)


@dataclass
class Components:
    """What the pipeline needs."""

    name: str
    tokenizer: object
    tokenizer_2: object
    text_encoder: torch.nn.Module
    text_encoder_2: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module
    scheduler_config: dict
    lora: dict = field(default_factory=dict)

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2,
                "unet": self.unet, "vae": self.vae}

    @property
    def has_unet_weights(self) -> bool:
        return not any(p.is_meta for p in self.unet.parameters())

    def to(self, device, dtype: torch.dtype) -> Components:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()  # its "cast with to()" notice is noise for random weights
        for name, module in self.modules().items():
            if name == "unet" and not self.has_unet_weights:
                continue  # a shape-only UNet: the engine brings the weights
            # An SDXL VAE overflows in fp16 (config.force_upcast); keep it in fp32 as diffusers does.
            keep_fp32 = name == "vae" and getattr(module.config, "force_upcast", False)
            module.to(device=device, dtype=torch.float32 if keep_fp32 else dtype).eval().requires_grad_(False)
        return self


def load(model: str, *, lora_path: str | None = None, lora_scale: float = 1.0, seed: int = 0,
         unet_weights: bool = True) -> Components:
    """fp32 components on the CPU, LoRA fused. Callers move them with `Components.to`.

    `unet_weights=False` builds the UNet on the meta device from its config only: enough to load a prebuilt
    engine, which brings its own UNet, and it skips the UNet's 2.6 B parameters (seeding or reading them).
    A LoRA is fused into the UNet, so it keeps the weights.
    """
    unet_weights = unet_weights or bool(lora_path)
    if model in BUILTIN_MODELS:
        components = build_builtin(model, seed=seed, unet_weights=unet_weights)
    else:
        components = _from_pretrained(model, unet_weights=unet_weights)
    if lora_path:
        fuse_lora(components, lora_path, lora_scale)
    return components


def build_builtin(name: str, *, seed: int = 0, device: str | torch.device = "cpu",
                  unet_weights: bool = True) -> Components:
    """Seeded random components. The UNet is seeded last, so building it shape-only (`unet_weights=False`)
    leaves every other component's weights the same."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if name == "tiny":
        unet_cfg, vae_cfg, te_cfg, te2_cfg = (TINY_UNET_CONFIG, TINY_VAE_CONFIG, TINY_TEXT_ENCODER_CONFIG,
                                              TINY_TEXT_ENCODER_2_CONFIG)
    elif name == "sdxl-random":
        unet_cfg, vae_cfg, te_cfg, te2_cfg = (SDXL_UNET_CONFIG, SDXL_VAE_CONFIG, SDXL_TEXT_ENCODER_CONFIG,
                                              SDXL_TEXT_ENCODER_2_CONFIG)
    else:
        raise UserError(f"unknown built-in model {name!r}: choose one of {', '.join(BUILTIN_MODELS)}")

    def clip_config(cfg):
        return CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406,
                              eos_token_id=49407, pad_token_id=49407, **cfg)

    with _seeded(seed), torch.device(device):
        text_encoder = CLIPTextModel(clip_config(te_cfg))
        text_encoder_2 = CLIPTextModelWithProjection(clip_config(te2_cfg))
        vae = AutoencoderKL(**vae_cfg)
        with torch.device(device if unet_weights else "meta"):
            unet = UNet2DConditionModel(**unet_cfg)
    return Components(
        name=name,
        tokenizer=builtin_tokenizer(pad_token="<|endoftext|>"),
        tokenizer_2=builtin_tokenizer(pad_token="!"),
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        unet=unet.eval(),
        vae=vae.eval(),
        scheduler_config=dict(SDXL_SCHEDULER_CONFIG),
    )


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _looks_local(model: str) -> bool:
    return (Path(model).expanduser().exists() or model.startswith((".", "/", "~"))
            or os.sep in model.strip("/").split("/", 1)[-1])


def check_model_name(model: str) -> None:
    """Refuse, before anything loads or asks the hub, a --model that is no built-in, local diffusers dir or hub id.

    A near miss of a built-in (`tinyy`) gets a "did you mean", instead of a hub lookup that waits on the network.
    """
    from .variants import did_you_mean

    if model in BUILTIN_MODELS:
        return
    if _looks_local(model):
        if not (Path(model).expanduser() / "model_index.json").is_file():
            raise UserError(f"{model} is not a diffusers model directory (no model_index.json); "
                            "pass a hub id, a local diffusers dir, or --model tiny / --model sdxl-random")
        return
    if not HUB_ID.fullmatch(model):
        raise UserError(f"unknown model {model!r}{did_you_mean(model, BUILTIN_MODELS)}: pass a built-in "
                        f"({', '.join(BUILTIN_MODELS)}), a local diffusers dir, or a hub id (org/name)")


def is_hub_id(name: str) -> bool:
    return name not in BUILTIN_MODELS and not _looks_local(name) and HUB_ID.fullmatch(name) is not None


def check_hub_source(repo_id: str, filename: str, what: str, instead: str) -> None:
    """Refuse up front a hub id that cannot load here: the hub offline or unreachable, and `filename` of it not in
    the local cache. Without this, the hub client waits minutes on its retries before it fails."""
    from huggingface_hub import try_to_load_from_cache

    if not _hub_offline() and hub_reachable():
        return
    if isinstance(try_to_load_from_cache(repo_id, filename), str):
        return
    why = "HF_HUB_OFFLINE is set" if _hub_offline() else f"the hub ({_hub_address()[0]}) is unreachable"
    raise UserError(f"cannot load {what} {repo_id!r}: {why} and it is not in the local cache; download it where the "
                    f"hub is reachable (huggingface-cli download {repo_id}), or {instead}")


def _from_pretrained(model: str, *, unet_weights: bool = True) -> Components:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    check_model_name(model)
    local = Path(model).expanduser()
    looks_local = _looks_local(model)
    source = str(local) if looks_local else model
    unreachable = not looks_local and not _hub_offline() and not hub_reachable()
    try:
        kwargs = {"local_files_only": looks_local or _hub_offline() or unreachable}
        components = Components(
            name=model,
            tokenizer=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kwargs),
            tokenizer_2=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **kwargs),
            text_encoder=CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **kwargs),
            text_encoder_2=CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder_2", **kwargs),
            unet=(UNet2DConditionModel.from_pretrained(source, subfolder="unet", **kwargs) if unet_weights
                  else _shape_only_unet(UNet2DConditionModel.load_config(source, subfolder="unet", **kwargs))),
            vae=AutoencoderKL.from_pretrained(source, subfolder="vae", **kwargs),
            scheduler_config=dict(EulerDiscreteScheduler.load_config(source, subfolder="scheduler", **kwargs)),
        )
    except UserError:
        raise
    except Exception as exc:  # diffusers/transformers/hub raise many types; people need one line
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        if unreachable:
            reason = f"the hub ({_hub_address()[0]}) is unreachable and the model is not in the local cache"
        raise UserError(f"cannot load model {model!r} ({reason}); without hub access use --model tiny "
                        "or --model sdxl-random, or pass a local diffusers directory") from None
    return components


def _shape_only_unet(config: dict) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config).eval()


def fuse_lora(components: Components, lora_path: str, scale: float) -> None:
    """Load a diffusers-format SDXL LoRA (hub id, dir or .safetensors file) and fuse it at `scale`."""
    from diffusers import StableDiffusionXLPipeline

    path = Path(lora_path).expanduser()
    is_local = path.exists() or lora_path.endswith(".safetensors") or lora_path.startswith((".", "/", "~"))
    if is_local and not path.exists():
        raise UserError(f"--lora-path {lora_path} does not exist")
    pipe = StableDiffusionXLPipeline(
        vae=components.vae, text_encoder=components.text_encoder, text_encoder_2=components.text_encoder_2,
        tokenizer=components.tokenizer, tokenizer_2=components.tokenizer_2, unet=components.unet,
        scheduler=_any_scheduler(components.scheduler_config),
    )
    weight_name = path.name if path.is_file() else None
    source = str(path.parent if path.is_file() else path) if is_local else lora_path
    try:
        pipe.load_lora_weights(source, weight_name=weight_name, adapter_name="sdxl_bench",
                               local_files_only=is_local or _hub_offline() or not hub_reachable())
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load LoRA {lora_path!r}: {reason}") from None
    pipe.fuse_lora(lora_scale=scale, adapter_names=["sdxl_bench"])
    pipe.unload_lora_weights()
    components.lora = {"path": lora_path, "scale": scale}


def _any_scheduler(config: dict):
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler.from_config(config)


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def _hub_address() -> tuple[str, int]:
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    url = urlsplit(constants.ENDPOINT)
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


@cache
def hub_reachable() -> bool:
    """Whether a TCP connection to the hub opens within HUB_PROBE_TIMEOUT_S (name lookup included).

    Where it does not, models and LoRAs load from the local cache only: an offline machine would otherwise wait
    minutes on the hub client's retries.
    """
    result = []

    def probe():
        with contextlib.suppress(OSError), socket.create_connection(_hub_address(), timeout=HUB_PROBE_TIMEOUT_S):
            result.append(True)

    thread = threading.Thread(target=probe, daemon=True)  # a stuck name lookup must not hold the run
    thread.start()
    thread.join(HUB_PROBE_TIMEOUT_S)
    return bool(result)


@contextlib.contextmanager
def _seeded(seed: int):
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@cache
def builtin_tokenizer(pad_token: str):
    """A real CLIP BPE tokenizer built from the vocabulary that open_clip ships: no download."""
    import open_clip.tokenizer as oct
    from transformers import CLIPTokenizer

    bpe_lines = gzip.open(oct.default_bpe(), "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in bpe_lines[1 : 49152 - 256 - 2 + 1]]  # CLIP's own slice
    byte_chars = list(oct.bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={tok: i for i, tok in enumerate(tokens)}, merges=merges, pad_token=pad_token,
                         model_max_length=77)
