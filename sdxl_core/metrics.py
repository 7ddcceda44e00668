"""Image-quality metrics for comparing quantized SDXL images against stored FP16 baselines.

SSIM and PSNR work on uint8 RGB images (numpy HxWx3 or PIL). CLIP score uses open_clip ViT-B-32 with the
OpenAI weights, as MLPerf's SDXL benchmark does; those weights are only ever read from the local cache.
open_clip takes seconds to import, so it is imported only when a ClipScorer is built.
"""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image
from skimage.metrics import structural_similarity

from sdxl_core.errors import UserError

CLIP_ARCH = "ViT-B-32"
DATA_RANGE = 255
_SSIM_WINDOW = 7  # skimage's default Gaussian-free 7x7 window
_EXPECTED = "expected a uint8 HxWx3 RGB image"


class MissingWeights(UserError):
    """Pretrained CLIP weights are not in the local cache (this suite never downloads them)."""


def to_array(img) -> np.ndarray:
    """Return `img` (numpy array or PIL.Image) as a uint8 HxWx3 array; PIL images are converted to RGB."""
    if isinstance(img, Image.Image):
        img = np.asarray(img.convert("RGB"))
    if not isinstance(img, np.ndarray):
        raise UserError(f"{_EXPECTED} (numpy array or PIL.Image), got {type(img).__name__}")
    if img.dtype != np.uint8:
        raise UserError(f"{_EXPECTED}, got dtype {img.dtype}; convert with (x * 255).round().astype(np.uint8)")
    if img.ndim != 3 or img.shape[-1] != 3:
        raise UserError(f"{_EXPECTED}, got shape {img.shape}")
    if img.size == 0:
        raise UserError(f"{_EXPECTED}, got an empty array of shape {img.shape}")
    return img


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = to_array(a), to_array(b)
    if a.shape != b.shape:
        raise UserError(f"image shapes differ: {a.shape} vs {b.shape}; compare images of the same size")
    return a, b


def _win_size(shape: tuple[int, ...]) -> int:
    side = min(shape[:2])
    if side < 3:
        raise UserError(f"SSIM needs images of at least 3x3 pixels, got {shape[0]}x{shape[1]}")
    # Shrink the window to the largest odd size that fits; skimage rejects windows larger than the image.
    return min(_SSIM_WINDOW, side if side % 2 else side - 1)


def _ssim(a: np.ndarray, b: np.ndarray, full: bool):
    return structural_similarity(a, b, win_size=_win_size(a.shape), channel_axis=-1, data_range=DATA_RANGE, full=full)


def ssim(a, b) -> float:
    """Mean structural similarity over the image and its three channels: 1.0 for identical images."""
    a, b = _pair(a, b)
    return float(_ssim(a, b, full=False))


def ssim_map(a, b) -> np.ndarray:
    """Per-pixel SSIM (float64 HxW, averaged over channels), for a heat map of where images differ."""
    a, b = _pair(a, b)
    _, full_map = _ssim(a, b, full=True)
    return full_map.mean(axis=-1)


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio in dB for data range 255; math.inf for identical images."""
    a, b = _pair(a, b)
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(DATA_RANGE**2 / mse)


def compare(reference, candidate) -> dict:
    """SSIM and PSNR of `candidate` against `reference`."""
    reference, candidate = _pair(reference, candidate)
    return {"ssim": ssim(reference, candidate), "psnr": psnr(reference, candidate)}


def _pretrained_cfg(pretrained: str) -> dict:
    import open_clip

    cfg = open_clip.get_pretrained_cfg(CLIP_ARCH, pretrained)
    if not cfg:
        known = ", ".join(open_clip.list_pretrained_tags_by_model(CLIP_ARCH))
        raise UserError(f"unknown open_clip {CLIP_ARCH} pretrained tag {pretrained!r}; known tags: {known}")
    if not cfg.get("hf_hub"):
        raise UserError(f"open_clip {CLIP_ARCH} '{pretrained}' weights are not on the Hugging Face hub; use 'openai'")
    return cfg


def _hub_location(cfg: dict) -> tuple[str, list[str]]:
    """The hub repo and the file names open_clip would download for a pretrained config, preferred first."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    repo, filename = os.path.split(cfg["hf_hub"])  # a trailing "/" means the repo's default file
    filename = filename or HF_WEIGHTS_NAME
    if filename == HF_WEIGHTS_NAME:
        names = [HF_SAFE_WEIGHTS_NAME, filename]
    elif filename.endswith((".bin", ".pth")):
        names = [filename[:-4] + ".safetensors", filename]
    else:
        names = [filename]
    return repo, names


def cached_clip_weights(pretrained: str = "openai", cache_dir: str | None = None) -> str | None:
    """Path of the cached open_clip ViT-B-32 checkpoint for tag `pretrained`, or None if it is not cached."""
    from huggingface_hub import try_to_load_from_cache

    repo, names = _hub_location(_pretrained_cfg(pretrained))
    for name in names:
        path = try_to_load_from_cache(repo, name, cache_dir=cache_dir)
        # try_to_load_from_cache also returns a sentinel object for "known not to exist upstream".
        if isinstance(path, str) and os.path.isfile(path):
            return path
    return None


def clip_weights_available(pretrained: str = "openai", cache_dir: str | None = None) -> bool:
    """True when the open_clip ViT-B-32 weights for tag `pretrained` are in the local cache."""
    return cached_clip_weights(pretrained, cache_dir) is not None


class ClipScorer:
    """CLIP score of images against prompts with open_clip ViT-B-32.

    `pretrained=None` builds the architecture with random weights: only for testing the plumbing.
    """

    def __init__(self, pretrained: str | None = "openai", device: str = "cpu", cache_dir: str | None = None):
        import open_clip

        self.pretrained = pretrained
        self.device = device
        checkpoint = None
        quick_gelu = True  # the OpenAI weights were trained with QuickGELU; random weights use the same graph
        preprocess = {}
        if pretrained is not None:
            cfg = _pretrained_cfg(pretrained)
            checkpoint = cached_clip_weights(pretrained, cache_dir)
            if checkpoint is None:
                repo, _ = _hub_location(cfg)
                raise MissingWeights(
                    f"open_clip {CLIP_ARCH} '{pretrained}' weights are not in the local cache "
                    f"(Hugging Face hub repo {repo}); fetch them once on a machine with network access"
                )
            quick_gelu = cfg.get("quick_gelu", False)
            preprocess = {f"image_{k}": cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in cfg}
        # Loading from the cached file path (not the tag) means open_clip never touches the network. It also
        # needs force_quick_gelu: open_clip 3.x builds 'ViT-B-32' with plain GELU even for the OpenAI tag.
        model, _, transform = open_clip.create_model_and_transforms(
            CLIP_ARCH,
            pretrained=checkpoint,
            device=device,
            force_quick_gelu=quick_gelu,
            **preprocess,
        )
        self._model = model.eval()
        self._preprocess = transform
        self._tokenizer = open_clip.get_tokenizer(CLIP_ARCH)

    def score(self, images: list, prompts: list[str], batch_size: int = 32) -> list[float]:
        """One CLIP score per (image, prompt) pair: 100 * cosine(image, text embedding) clipped at 0, as in MLPerf."""
        return [max(0.0, s) for s in self.similarity(images, prompts, batch_size)]

    def similarity(self, images: list, prompts: list[str], batch_size: int = 32) -> list[float]:
        """100 * cosine(image embedding, text embedding) per pair, not clipped: in [-100, 100]."""
        import torch
        import torch.nn.functional as F

        if batch_size < 1:
            raise UserError(f"batch_size must be at least 1, got {batch_size}")
        if isinstance(prompts, str):
            raise UserError("prompts must be a list of strings, one per image, not a single string")
        if len(images) != len(prompts):
            raise UserError(f"got {len(images)} images but {len(prompts)} prompts; pass one prompt per image")
        for prompt in prompts:
            if not isinstance(prompt, str):
                raise UserError(f"prompts must be strings, got {type(prompt).__name__}")
        arrays = [to_array(img) for img in images]
        similarities: list[float] = []
        with torch.inference_mode():
            for start in range(0, len(arrays), batch_size):
                batch = arrays[start : start + batch_size]
                pixels = torch.stack([self._preprocess(Image.fromarray(a)) for a in batch]).to(self.device)
                tokens = self._tokenizer(list(prompts[start : start + batch_size])).to(self.device)
                image_emb = F.normalize(self._model.encode_image(pixels).float(), dim=-1)
                text_emb = F.normalize(self._model.encode_text(tokens).float(), dim=-1)
                similarities.extend(100.0 * c for c in (image_emb * text_emb).sum(dim=-1).tolist())
        return similarities
