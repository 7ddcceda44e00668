"""Load the SDXL components: from a hub id or a local diffusers dir, or build a built-in model.

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
import gzip
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import torch

from sdxl_core.errors import UserError
from sdxl_core.startup import Startup

BUILTIN_MODELS = ("tiny", "sdxl-random")
MODEL_NOTES = {
    "tiny": "built-in tiny model: seeded random weights, so its images are noise by design; it checks the "
    "plumbing and CPU timings, not image quality",
    "sdxl-random": "built-in sdxl-random model: the full SDXL architecture with seeded random weights, so its "
    "images are noise by design; it costs what the real model costs per step",
}
# Built-ins whose generated weights are kept in the model cache: generating them costs more than reading them.
CACHED_BUILTINS = ("sdxl-random",)
MODEL_CACHE_ENV = "SDXL_BENCH_MODEL_CACHE"  # the cache's directory, or "off"
MODEL_CACHE_FORMAT = 1
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
        components = _from_pretrained(model, unet_weights=unet_weights, startup=startup)
    if lora_path:
        with startup.phase("lora"):
            fuse_lora(components, lora_path, lora_scale)
    return components


def _builtin_configs(name: str) -> dict[str, dict]:
    """Per component, the config a built-in model is built from."""
    if name == "tiny":
        configs = (TINY_TEXT_ENCODER_CONFIG, TINY_TEXT_ENCODER_2_CONFIG, TINY_VAE_CONFIG, TINY_UNET_CONFIG)
    elif name == "sdxl-random":
        configs = (SDXL_TEXT_ENCODER_CONFIG, SDXL_TEXT_ENCODER_2_CONFIG, SDXL_VAE_CONFIG, SDXL_UNET_CONFIG)
    else:
        raise UserError(f"unknown built-in model {name!r}: choose one of {', '.join(BUILTIN_MODELS)}")
    return dict(zip(("text_encoder", "text_encoder_2", "vae", "unet"), configs, strict=True))


def _builtin_makers(name: str) -> dict[str, Callable[[], torch.nn.Module]]:
    """Per component, what builds it with fresh random weights (on the current default device)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    configs = _builtin_configs(name)

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


BEFORE_UNET = ("text_encoder", "text_encoder_2", "vae")  # generated in this order, then the UNet


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


@dataclass(frozen=True)
class ModelCache:
    """A built-in model's generated weights, one safetensors file per component, in the user's cache dir
    (`$SDXL_BENCH_MODEL_CACHE`, else `$XDG_CACHE_HOME/sdxl-bench/models`, else `~/.cache/sdxl-bench/models`;
    `SDXL_BENCH_MODEL_CACHE=off` turns it off).

    Why a cache and not seeding on the GPU: seeding on the GPU is fast but makes another model (CUDA's random
    streams are not the CPU's), one that would differ between the CPU and GPUs and could differ between GPUs
    (how a kernel spreads its random numbers over threads depends on its launch grid). Every engine, baseline
    and comparison made so far was made with the CPU-seeded weights; the cache keeps exactly those, on every
    machine, and costs one generation per machine plus the disk: about 3.6 GB for `sdxl-random`'s text encoders
    and VAE, 10.3 GB more for its UNet once an engine is built (fp32, as generated).

    An entry is keyed by model, seed, configs and the torch, diffusers and transformers versions (whose init
    code draws the numbers), so it always holds what this code would generate; writing a new one removes the
    entries of the same model and seed made with other versions. Safetensors carry no code, so loading one is
    safe from any directory; a file that does not load is generated again. Files are written atomically.
    """

    path: Path

    @staticmethod
    def root() -> Path | None:
        value = os.environ.get(MODEL_CACHE_ENV, "")
        if value.lower() == "off":
            return None
        if value:
            return Path(value).expanduser()
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sdxl-bench" / "models"

    @classmethod
    def entry(cls, name: str, seed: int) -> ModelCache | None:
        root = cls.root()
        if root is None:
            return None
        import diffusers
        import transformers

        facts = {
            "format": MODEL_CACHE_FORMAT,
            "model": name,
            "seed": seed,
            "configs": _builtin_configs(name),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
        }
        digest = hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:12]
        return cls(root / f"{name}-s{seed}-{digest}")

    def file(self, component: str) -> Path:
        return self.path / f"{component}.safetensors"

    def load(self, component: str, make: Callable[[], torch.nn.Module], startup: Startup) -> torch.nn.Module | None:
        """The cached component, built on the meta device and given the stored tensors; None when absent or
        unreadable (then it is generated again)."""
        from safetensors.torch import load_file

        file = self.file(component)
        if not file.is_file():
            return None
        with startup.phase(component, note="from the model cache"):
            try:
                tensors = load_file(str(file))
                with torch.device("meta"):
                    module = make()
                _assign(module, tensors)
            except Exception as exc:  # torn, truncated or foreign file: any reason means "generate it again"
                print(
                    f"warning: model cache file {file} does not load ({_first_line(exc)}); generating it again",
                    file=sys.stderr,
                )
                return None
        return module

    def load_front(self, makers, startup: Startup):
        """(text encoders and VAE, the random state the UNet is generated from), or None unless all are cached."""
        from safetensors.torch import load_file

        rng = self.path / "unet_rng.safetensors"
        if not rng.is_file() or not all(self.file(c).is_file() for c in BEFORE_UNET):
            return None
        front = {c: self.load(c, makers[c], startup) for c in BEFORE_UNET}
        try:
            state = load_file(str(rng))["state"]
        except Exception:  # as in `load`: generate it again
            state = None
        if state is None or any(m is None for m in front.values()):
            return None
        return front, state

    def save_front(self, front: dict, unet_rng: torch.Tensor, startup: Startup) -> None:
        """Keep the text encoders, the VAE and the UNet's random state; drop this model's stale entries."""
        if self.save(front, startup):
            self._write(self.path / "unet_rng.safetensors", {"state": unet_rng})
            name, seed, _ = self.path.name.rsplit("-", 2)
            for stale in self.path.parent.glob(f"{name}-{seed}-*"):
                if stale != self.path and stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)

    def save(self, modules: dict[str, torch.nn.Module], startup: Startup) -> bool:
        """Write each module's tensors; a failure (a full disk, no permission) only warns: it is a cache."""
        with startup.phase("model_cache_write"):
            try:
                for component, module in modules.items():
                    self._write(self.file(component), _tensors(module))
            except Exception as exc:  # a cache that cannot be kept costs time, not the run
                print(
                    f"warning: could not keep {self.path.name} in the model cache ({_first_line(exc)}); it will "
                    "be generated again next time",
                    file=sys.stderr,
                )
                return False
        return True

    @staticmethod
    def _write(path: Path, tensors: dict) -> None:
        from safetensors.torch import save_file

        from sdxl_core.files import atomic_path

        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp))


def _tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (non-persistent ones too: a module rebuilt on the meta device needs them)."""
    return {n: t.detach().contiguous() for n, t in [*module.named_parameters(), *module.named_buffers()]}


def _assign(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Give a meta-device module the stored tensors (no copies); they must match it name for name and shape."""
    wanted = {n: t for n, t in [*module.named_parameters(), *module.named_buffers()]}
    if wanted.keys() != tensors.keys():
        raise ValueError(f"{len(wanted.keys() ^ tensors.keys())} tensor names differ from the module's")
    for name, tensor in tensors.items():
        if tensor.shape != wanted[name].shape or tensor.dtype != wanted[name].dtype:
            raise ValueError(
                f"{name} is {tuple(tensor.shape)} {tensor.dtype}, the module has "
                f"{tuple(wanted[name].shape)} {wanted[name].dtype}"
            )
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        if leaf in owner._parameters:
            owner._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=wanted[name].requires_grad)
        else:
            owner._buffers[leaf] = tensor


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:160] if text else type(exc).__name__


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _looks_local(model: str) -> bool:
    return (
        Path(model).expanduser().exists()
        or model.startswith((".", "/", "~"))
        or os.sep in model.strip("/").split("/", 1)[-1]
    )


def check_model_name(model: str) -> None:
    """Refuse, before anything loads or asks the hub, a --model that is no built-in, local diffusers dir or hub id.

    A near miss of a built-in (`tinyy`) gets a "did you mean", instead of a hub lookup that waits on the network.
    """
    from sdxl_core.variants import did_you_mean

    if model in BUILTIN_MODELS:
        return
    if _looks_local(model):
        if not (Path(model).expanduser() / "model_index.json").is_file():
            raise UserError(
                f"{model} is not a diffusers model directory (no model_index.json); "
                "pass a hub id, a local diffusers dir, or --model tiny / --model sdxl-random"
            )
        return
    if not HUB_ID.fullmatch(model):
        raise UserError(
            f"unknown model {model!r}{did_you_mean(model, BUILTIN_MODELS)}: pass a built-in "
            f"({', '.join(BUILTIN_MODELS)}), a local diffusers dir, or a hub id (org/name)"
        )


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
    raise UserError(
        f"cannot load {what} {repo_id!r}: {why} and it is not in the local cache; download it where the "
        f"hub is reachable (huggingface-cli download {repo_id}), or {instead}"
    )


def _from_pretrained(model: str, *, unet_weights: bool = True, startup: Startup | None = None) -> Components:
    startup = startup or Startup()
    with startup.phase("imports"):
        from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    check_model_name(model)
    local = Path(model).expanduser()
    looks_local = _looks_local(model)
    source = str(local) if looks_local else model
    unreachable = not looks_local and not _hub_offline() and not hub_reachable()
    kwargs = {"local_files_only": looks_local or _hub_offline() or unreachable}
    note = f"from {source}"

    def load_unet() -> torch.nn.Module:
        with _one_line_load_error(model, unreachable), startup.phase("unet", note=note):
            return UNet2DConditionModel.from_pretrained(source, subfolder="unet", **kwargs)

    with _one_line_load_error(model, unreachable):
        with startup.phase("tokenizers", note=note):
            tokenizers = [
                CLIPTokenizer.from_pretrained(source, subfolder=s, **kwargs) for s in ("tokenizer", "tokenizer_2")
            ]
        with startup.phase("text_encoder", note=note):
            text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **kwargs)
        with startup.phase("text_encoder_2", note=note):
            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder_2", **kwargs)
        with startup.phase("vae", note=note):
            vae = AutoencoderKL.from_pretrained(source, subfolder="vae", **kwargs)
        if not unet_weights:
            with startup.phase("unet_shape"):
                unet = _shape_only_unet(UNet2DConditionModel.load_config(source, subfolder="unet", **kwargs))
        scheduler_config = dict(EulerDiscreteScheduler.load_config(source, subfolder="scheduler", **kwargs))
    return Components(
        name=model,
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        unet=load_unet() if unet_weights else unet,
        vae=vae,
        scheduler_config=scheduler_config,
        unet_loader=load_unet,
    )


@contextlib.contextmanager
def _one_line_load_error(model: str, unreachable: bool):
    """diffusers, transformers and the hub raise many types; people need one line."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        if unreachable:
            reason = f"the hub ({_hub_address()[0]}) is unreachable and the model is not in the local cache"
        raise UserError(
            f"cannot load model {model!r} ({reason}); without hub access use --model tiny "
            "or --model sdxl-random, or pass a local diffusers directory"
        ) from None


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
        vae=components.vae,
        text_encoder=components.text_encoder,
        text_encoder_2=components.text_encoder_2,
        tokenizer=components.tokenizer,
        tokenizer_2=components.tokenizer_2,
        unet=components.unet,
        scheduler=_any_scheduler(components.scheduler_config),
    )
    weight_name = path.name if path.is_file() else None
    source = str(path.parent if path.is_file() else path) if is_local else lora_path
    try:
        pipe.load_lora_weights(
            source,
            weight_name=weight_name,
            adapter_name="sdxl_bench",
            local_files_only=is_local or _hub_offline() or not hub_reachable(),
        )
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
