"""The Transformer2DModels' input and output modules (`engines.glue`): diffusers' values, the UNet's own weights and
names, a channels-last output."""

import pytest
import torch

from sdxl_core import engines, models
from sdxl_core.engines import glue, torch_backend
from sdxl_core.variants import VARIANTS


@pytest.fixture(scope="module")
def tiny():
    unet = models.build_builtin("tiny").unet.eval()
    variant = VARIANTS["xl-1.0-fp16"].replace(model="tiny", height=64, width=64)
    return unet, torch_backend.unet_inputs(variant, unet, torch.device("cpu"), torch.float32)


def transformer_outputs(unet, inputs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The UNet step's output and every Transformer2DModel's output, in call order."""
    seen = []
    hooks = [
        m.register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
        for m in unet.modules()
        if type(m).__name__ == "Transformer2DModel"
    ]
    try:
        with torch.inference_mode():
            return engines.unet_stage(unet)(*inputs), seen
    finally:
        for hook in hooks:
            hook.remove()


def test_the_glue_gives_diffusers_values_and_leaves_the_image_channels_last(tiny):
    unet, inputs = tiny
    names = [name for name, _ in unet.named_modules()]
    keys = list(unet.state_dict())
    before, before_each = transformer_outputs(unet, inputs)
    installed = glue.install(unet)
    try:
        after, after_each = transformer_outputs(unet, inputs)
        transformers = [name for name, m in unet.named_modules() if type(m).__name__ == "Transformer2DModel"]
        assert [name for name, _ in installed] == [f"{t}:{part}" for t in transformers for part in ("input", "output")]
        assert glue.install(unet) == installed  # made once
        # the modules run the model's own layers and stay out of its module tree
        assert [name for name, _ in unet.named_modules()] == names and list(unet.state_dict()) == keys
        model = unet.get_submodule(transformers[0])
        assert installed[0][1].norm is model.norm and installed[0][1].proj_in is model.proj_in
        assert installed[1][1].proj_out is model.proj_out
        assert len(after_each) == len(before_each) == len(transformers)
        for old, new in zip(before_each, after_each, strict=True):
            assert old.is_contiguous() and new.is_contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-5)
        # the first one's input is the same tensor either way: the same ops give the same bits; later ones read
        # channels-last images, which the CPU's GroupNorm and conv sum in another order
        torch.testing.assert_close(after_each[0], before_each[0], rtol=0, atol=0)
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    finally:
        for model in unet.modules():
            for attribute in (glue._INSTALLED, "_operate_on_continuous_inputs", "_get_output_for_continuous_inputs"):
                model.__dict__.pop(attribute, None)


def test_only_image_transformers_with_linear_projections_are_routed():
    class Other(torch.nn.Module):
        is_input_continuous, use_linear_projection = True, True

    conv_projection = type("Transformer2DModel", (torch.nn.Module,), {"is_input_continuous": True})()
    assert not glue.fits(Other()) and not glue.fits(conv_projection)
    assert glue.install(torch.nn.Sequential(Other(), conv_projection)) == []
