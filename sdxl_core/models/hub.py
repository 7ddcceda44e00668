"""Real models: from a hub id or a local diffusers directory, and LoRAs fused into them."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import threading
from functools import cache
from pathlib import Path

import torch

from sdxl_core.errors import UserError
from sdxl_core.models.components import Components
from sdxl_core.models.configs import BUILTIN_MODELS
from sdxl_core.startup import Startup

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # org/name
HUB_PROBE_TIMEOUT_S = 3.0


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


def from_pretrained(model: str, *, unet_weights: bool = True, startup: Startup | None = None) -> Components:
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


def diffusers_pipeline(components: Components, scheduler, **options):
    """diffusers' StableDiffusionXLPipeline over `components` (shared, not copied): what loads a LoRA, and the
    reference the suite holds this project's pipeline against."""
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        text_encoder_2=components.text_encoder_2,
        tokenizer=components.tokenizer,
        tokenizer_2=components.tokenizer_2,
        unet=components.unet,
        scheduler=scheduler,
        **options,
    )


def fuse_lora(components: Components, lora_path: str, scale: float) -> None:
    """Load a diffusers-format SDXL LoRA (hub id, dir or .safetensors file) and fuse it at `scale`."""
    path = Path(lora_path).expanduser()
    is_local = path.exists() or lora_path.endswith(".safetensors") or lora_path.startswith((".", "/", "~"))
    if is_local and not path.exists():
        raise UserError(f"--lora-path {lora_path} does not exist")
    pipe = diffusers_pipeline(components, _any_scheduler(components.scheduler_config))
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
