"""Cross-attention K and V depend only on the prompt: compute them once per prompt, reuse them at every step.

Each transformer block's cross-attention (`attn2`) projects the text encoders' states (77 tokens x 2048 per
image and CFG half) to keys and values at every denoising step, though they change only with the prompt.
`CrossKV(unet)` puts a `CachedProjection` in place of each cross-attention's K/V projection (`to_kv` where the
projections are fused, else `to_k` and `to_v`): it returns what `fill(encoder_hidden_states)` computed with the
real projection, so the attention processors run unchanged on the same tensors. `RefillingStep` wraps the UNet
stage outside any CUDA graph (whose replay then reads the filled buffers) and fills them again whenever the
encoder states change, i.e. for a new prompt.

What it computes is what the step computed: the same projections of the same states. Where the step is compiled,
`fill` runs them eagerly, so an 8-bit projection may round its quantized input differently from the compiled
block by a unit in the last place. Runtime only: nothing of it is stored in an engine. FP16 and 8-bit engines get
it alike (the speed gates stay like for like) with SDXL_BENCH_CROSS_KV=reuse; the default, per-step, leaves
the UNet as it is.
"""

from __future__ import annotations

import torch

from sdxl_core import settings
from sdxl_core.errors import UserError

ENV = "SDXL_BENCH_CROSS_KV"
MODES = settings.CROSS_KV_MODES


def mode() -> str:
    """SDXL_BENCH_CROSS_KV's value (default per-step); anything else is one line for the user."""
    return settings.cross_kv()


class CachedProjection(torch.nn.Module):
    """Stands in for one cross-attention projection: returns the output `fill` computed with the real one.

    The buffer keeps its storage from one fill to the next (a CUDA graph and the compiled blocks read it in
    place) unless the shape, dtype or device changes."""

    def __init__(self, projection: torch.nn.Module):
        super().__init__()
        self.projection = projection
        self.register_buffer("cached", None, persistent=False)

    def fill(self, encoder_hidden_states: torch.Tensor) -> None:
        out = self.projection(encoder_hidden_states)
        cached = self.cached
        if cached is None or cached.shape != out.shape or cached.dtype != out.dtype or cached.device != out.device:
            self.cached = out  # a fresh tensor of the projection's own: kept, not copied
        else:
            cached.copy_(out)

    def forward(self, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        if self.cached is None:
            raise RuntimeError("cross-attention K/V used before CrossKV.fill")
        return self.cached


def _cross_attentions(unet: torch.nn.Module):
    from diffusers.models.attention_processor import Attention

    return [m for m in unet.modules() if isinstance(m, Attention) and m.is_cross_attention]


class CrossKV:
    """The cached K/V projections of every cross-attention of `unet`, installed in place."""

    def __init__(self, unet: torch.nn.Module):
        self.projections: list[CachedProjection] = []
        for attn in _cross_attentions(unet):
            names = ("to_kv",) if getattr(attn, "to_kv", None) is not None else ("to_k", "to_v")
            for name in names:
                projection = getattr(attn, name)
                if not isinstance(projection, CachedProjection):
                    projection = CachedProjection(projection)
                    setattr(attn, name, projection)
                self.projections.append(projection)
        if not self.projections:
            raise UserError("this UNet has no cross-attention whose K/V could be reused")

    @torch.inference_mode()
    def fill(self, encoder_hidden_states: torch.Tensor) -> None:
        for projection in self.projections:
            projection.fill(encoder_hidden_states)


class RefillingStep:
    """A UNet stage (sample, t, encoder_hidden_states, text_embeds, time_ids) -> noise whose cross-attention
    K/V come from `cross_kv`: refilled before the step when `encoder_hidden_states` is another tensor than last
    time or was changed in place, else reused. Keeps the last states alive, so an identity check cannot be
    fooled by a new tensor at a freed one's address."""

    def __init__(self, step, cross_kv: CrossKV):
        self.step, self.cross_kv = step, cross_kv
        self.states: torch.Tensor | None = None
        self.version = -1
        self.fills = 0

    def __call__(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        version = _version(encoder_hidden_states)
        if encoder_hidden_states is not self.states or version != self.version:
            self.cross_kv.fill(encoder_hidden_states)
            self.states, self.version = encoder_hidden_states, version
            self.fills += 1
        return self.step(sample, timestep, encoder_hidden_states, text_embeds, time_ids)


def _version(tensor: torch.Tensor) -> int:
    """The tensor's in-place version counter; an inference-mode tensor keeps none (and outside inference mode
    it cannot be changed in place), so only its identity tells it apart."""
    return -2 if tensor.is_inference() else tensor._version
