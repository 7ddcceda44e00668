"""The work of each Transformer2DModel around its blocks, made into two modules so it compiles as regions.

Around its transformer blocks, diffusers' Transformer2DModel runs a GroupNorm, turns the image into tokens and
projects them (`proj_in`), then projects back (`proj_out`), turns the tokens into an NCHW image and adds the
residual. Regional compile (`compiled.regions`) leaves that eager, and on a GPU eager it costs more than it
should: PyTorch's CUDA GroupNorm copies its channels-last input to NCHW first and reduces 64 long rows per
call, and `.contiguous()` copies the output back to NCHW, so every following block reads the other layout. As
two compiled regions (`TransformerInput`, `TransformerOutput`) the GroupNorm reads NHWC in place, the token
views are free, an 8-bit `proj_in`'s input quantization fuses into the GroupNorm's kernel, and the residual add
is one pointwise kernel after `proj_out` with no copy.

The values are diffusers' own, op for op; only the output's memory layout differs: it stays channels-last (a
view of the tokens) where diffusers copies it to NCHW. Nothing the engine stores changes: `install` runs after
the engine files are written, as `compiled.channels_last` does, and the two modules hold the model's own `norm`,
`proj_in` and `proj_out` without becoming part of the UNet's module tree (its state dict and layer names stay).
"""

from __future__ import annotations

import torch

_INSTALLED = "_sdxl_glue"  # the Transformer2DModel's attribute holding its (input, output) modules


class TransformerInput(torch.nn.Module):
    """GroupNorm, NCHW image to tokens, `proj_in`: Transformer2DModel's `_operate_on_continuous_inputs`."""

    def __init__(self, norm: torch.nn.Module, proj_in: torch.nn.Module):
        super().__init__()
        self.norm = norm
        self.proj_in = proj_in

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, int]:
        batch, channels, height, width = hidden_states.shape
        hidden_states = self.norm(hidden_states)
        hidden_states = hidden_states.permute(0, 2, 3, 1).reshape(batch, height * width, channels)
        return self.proj_in(hidden_states), channels


class TransformerOutput(torch.nn.Module):
    """`proj_out`, tokens to an image, plus the residual: Transformer2DModel's `_get_output_for_continuous_inputs`,
    with the image left channels-last (the tokens' own memory order) instead of copied to NCHW."""

    def __init__(self, proj_out: torch.nn.Module):
        super().__init__()
        self.proj_out = proj_out

    def forward(self, hidden_states, residual, batch_size: int, height: int, width: int, inner_dim: int):
        hidden_states = self.proj_out(hidden_states)
        hidden_states = hidden_states.reshape(batch_size, height, width, inner_dim).permute(0, 3, 1, 2)
        return hidden_states + residual


def fits(module: torch.nn.Module) -> bool:
    """A Transformer2DModel of SDXL's kind: image input, linear projections (the only kind `install` takes)."""
    return (
        type(module).__name__ == "Transformer2DModel"
        and getattr(module, "is_input_continuous", False)
        and getattr(module, "use_linear_projection", False)
    )


def install(unet: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Route every fitting Transformer2DModel's input and output work through two modules of its own (made on the
    first call; later calls return the same) and return them as (name, module): `<model>:input`,
    `<model>:output`."""
    found = []
    for name, model in unet.named_modules():
        if not fits(model):
            continue
        if _INSTALLED not in model.__dict__:
            made = (TransformerInput(model.norm, model.proj_in), TransformerOutput(model.proj_out))
            # object.__setattr__: plain instance attributes, so neither becomes a submodule of the UNet
            object.__setattr__(model, _INSTALLED, made)
            object.__setattr__(model, "_operate_on_continuous_inputs", made[0])
            object.__setattr__(model, "_get_output_for_continuous_inputs", made[1])
        first, second = model.__dict__[_INSTALLED]
        found += [(f"{name}:input", first), (f"{name}:output", second)]
    return found
