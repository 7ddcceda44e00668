"""Built-in models: seeded random weights, generated on the CPU (or read from the model cache).

Built-ins need no download:
- `tiny`: SDXL-shaped (two CLIP text encoders, text-time conditioning, cross-attention UNet with
  three levels, 8x VAE) with small channels and seeded random weights; runs on CPU in seconds.
- `sdxl-random`: the full SDXL base architecture (2.567 B-parameter UNet) with seeded random
  weights. It costs exactly what the real model costs per step, so it is what GPU timings use.

A built-in's weights are generated on the CPU from one seeded random stream, component by component in a fixed
order (text encoder, text encoder 2, VAE, UNet), so they are the same on every machine, CPU or GPU. Generating
`sdxl-random` takes a while (its 0.9 B text-encoder and VAE parameters are drawn twice: torch's default init, then
transformers' own), so it is generated once per machine and kept in the model cache (`ModelCache`); every later
process loads it. The UNet is generated or loaded only when an engine has to be built (`Components.load_unet_weights`).
"""

from __future__ import annotations

import contextlib
import copy
import gzip
from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch

from sdxl_core.errors import UserError
from sdxl_core.models.cache import BEFORE_UNET, CACHED_BUILTINS, ModelCache
from sdxl_core.models.components import Components
from sdxl_core.models.configs import REACTIVE_GAINS, SDXL_SCHEDULER_CONFIG, SDXL_UNET_CONFIG, builtin_configs
from sdxl_core.startup import Startup


def _builtin_makers(name: str) -> dict[str, Callable[[], torch.nn.Module]]:
    """Per component, what builds it with fresh random weights (on the current default device)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    configs = builtin_configs(name)

    def clip_config(cfg):
        return CLIPTextConfig(
            vocab_size=49408,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
            **cfg,
        )

    return {
        "text_encoder": lambda: CLIPTextModel(clip_config(configs["text_encoder"])),
        "text_encoder_2": lambda: CLIPTextModelWithProjection(clip_config(configs["text_encoder_2"])),
        "vae": lambda: AutoencoderKL(**configs["vae"]),
        "unet": lambda: UNet2DConditionModel(**configs["unet"]),
    }


def build_builtin(
    name: str,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    unet_weights: bool = True,
    startup: Startup | None = None,
    cache: bool | None = None,
) -> Components:
    """Seeded random components: text encoder, text encoder 2 and VAE from one seeded CPU random stream, then
    the UNet from where that stream stopped (its state is kept), so a UNet generated later (`unet_weights=False`,
    then `Components.load_unet_weights`) has exactly the weights it gets here.

    `cache` (default: the model is in CACHED_BUILTINS and `device` is the CPU) keeps the generated weights in the
    model cache and loads them from there when they are in it: the same tensors, bit for bit, in a fraction of
    the time (see `ModelCache` for why a cache rather than seeding on the GPU).
    """
    startup = startup or Startup()
    with startup.phase("imports"):  # nothing left to import when the CLI imported it first
        makers = _builtin_makers(name)
    on_cpu = torch.device(device).type == "cpu"
    entry = ModelCache.entry(name, seed) if (name in CACHED_BUILTINS if cache is None else cache) and on_cpu else None
    with startup.phase("tokenizers"):
        tokenizer, tokenizer_2 = builtin_tokenizer(pad_token="<|endoftext|>"), builtin_tokenizer(pad_token="!")
    cached = entry.load_front(makers, startup) if entry is not None else None
    if cached is not None:
        front, unet_rng = cached
    else:
        front = {}
        with _seeded(seed), torch.device(device):
            for component in BEFORE_UNET:
                with startup.phase(component, note="generated"):
                    front[component] = makers[component]()
            unet_rng = torch.get_rng_state()
        if entry is not None:
            entry.save_front(front, unet_rng, startup)

    def load_unet() -> torch.nn.Module:
        unet = entry.load("unet", makers["unet"], startup) if entry is not None else None
        if unet is not None:
            return unet
        with startup.phase("unet", note="generated"), torch.random.fork_rng(devices=[]), torch.device(device):
            torch.set_rng_state(unet_rng)
            unet = makers["unet"]()
            make_reactive(unet)
        if entry is not None:
            entry.save({"unet": unet}, startup)
        return unet

    if unet_weights:
        unet = load_unet()
    else:
        with startup.phase("unet_shape"), torch.device("meta"):
            unet = makers["unet"]()
    return Components(
        name=name,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        text_encoder=front["text_encoder"].eval(),
        text_encoder_2=front["text_encoder_2"].eval(),
        unet=unet.eval(),
        vae=front["vae"].eval(),
        scheduler_config=dict(SDXL_SCHEDULER_CONFIG),
        unet_loader=load_unet,
    )


@torch.no_grad()
def make_reactive(unet: torch.nn.Module) -> dict[str, int]:
    """Scale a freshly initialised built-in UNet's weights by REACTIVE_GAINS, in place (meta tensors too); how
    many modules of each kind were scaled. Real models never pass here."""
    from diffusers.models.attention import FeedForward
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    gains, scaled = REACTIVE_GAINS, dict.fromkeys(("attention", "feed_forward", "transformer", "resnet"), 0)
    for module in unet.modules():
        if isinstance(module, Attention):
            qk = gains["cross_attention_qk"] if module.is_cross_attention else gains["self_attention_qk"]
            module.to_q.weight.mul_(qk)
            module.to_k.weight.mul_(qk)
            module.to_out[0].weight.mul_(gains["attention_out"])
            scaled["attention"] += 1
        elif isinstance(module, FeedForward):
            [*(m for m in module.net if isinstance(m, torch.nn.Linear))][-1].weight.mul_(gains["feed_forward_out"])
            scaled["feed_forward"] += 1
        elif isinstance(module, Transformer2DModel):
            module.proj_out.weight.mul_(gains["transformer_proj_out"])
            scaled["transformer"] += 1
        elif isinstance(module, ResnetBlock2D):
            module.time_emb_proj.weight.mul_(gains["resnet_time_emb_proj"])
            scaled["resnet"] += 1
    unet.add_embedding.linear_2.weight.mul_(gains["add_embedding_out"])
    unet.conv_out.weight.mul_(gains["conv_out"])
    return scaled


@contextlib.contextmanager
def _seeded(seed: int):
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@cache
def builtin_tokenizer(pad_token: str):
    """A real CLIP BPE tokenizer built from the vocabulary that open_clip ships: no download.

    The vocabulary file is found without importing open_clip, whose package import (its models, timm) took
    1.4-6 s on a CPU and is needed for nothing else."""
    from importlib.util import find_spec

    from transformers import CLIPTokenizer

    package = find_spec("open_clip")
    if package is None or not package.submodule_search_locations:
        raise UserError("the built-in models' tokenizer needs open_clip (pip install open-clip-torch)")
    vocab_file = Path(package.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    bpe_lines = gzip.open(vocab_file, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in bpe_lines[1 : 49152 - 256 - 2 + 1]]  # CLIP's own slice
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(
        vocab={tok: i for i, tok in enumerate(tokens)}, merges=merges, pad_token=pad_token, model_max_length=77
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> character table that CLIP's BPE works on: printable bytes map to themselves,
    the others to characters from 256 up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {
        b: chr(c) for b, c in zip(printable + others, printable + [256 + n for n in range(len(others))], strict=True)
    }


def make_lora(unet, directory: Path, rank: int = 4, seed: int = 0) -> Path:
    """A random diffusers-format SDXL LoRA on every attention projection of `unet`, written into `directory`: the
    stand-in the suite uses for the LCM-LoRA on random-weight models (the real one cannot be downloaded there)."""
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

    if model == "tiny":
        return make_lora(build_builtin("tiny").unet, directory)
    if model != "sdxl-random":
        raise ValueError(f"no built-in model {model!r}")
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    return make_lora(unet, directory)
