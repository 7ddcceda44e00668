"""txt2img on the tiny model: determinism, every scheduler, LoRA fusing, timings."""

import numpy as np
import pytest
import torch

from sdxl_core import models, pipeline
from sdxl_core.engines import torch_backend
from sdxl_core.models import make_lora
from sdxl_core.variants import SCHEDULERS, VARIANTS

CPU = torch.device("cpu")
TINY = VARIANTS["xl-1.0-fp16"].replace(model="tiny", height=128, width=128, steps=4)


def generate(variant, components=None, prompt="a red fox in the snow", seed=0):
    components = components or models.load("tiny")
    engines = torch_backend.prepare(variant, components, CPU)
    return pipeline.txt2img(engines, components, variant, [prompt] * variant.batch_size, seed=seed)


def pixels(result):
    return np.stack([np.asarray(im) for im in result.images])


def test_same_seed_gives_the_same_image_bytes():
    a, b = generate(TINY), generate(TINY)
    assert a.images[0].tobytes() == b.images[0].tobytes()
    assert generate(TINY, seed=1).images[0].tobytes() != a.images[0].tobytes()


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_scheduler_runs(scheduler):
    guidance = 0.0 if scheduler == "LCM" else 5.0
    result = generate(TINY.replace(scheduler=scheduler, steps=3, guidance_scale=guidance))
    assert result.unet_calls == 3 if scheduler != "PNDM" else result.unet_calls >= 3
    image = pixels(result)
    assert image.shape == (1, 128, 128, 3) and image.std() > 0
    assert torch.isfinite(result.latents).all()


def test_batch_size_cfg_and_sizes():
    variant = TINY.replace(batch_size=2, height=64, width=96)
    result = generate(variant)
    assert pixels(result).shape == (2, 64, 96, 3)
    assert set(result.timings) == {"clip", "clip2", "unet", "vae", "total"}
    parts = sum(result.timings[k] for k in ("clip", "clip2", "unet", "vae"))
    assert 0 < parts <= result.timings["total"] * 1.001


def test_guidance_changes_the_image_and_zero_guidance_skips_cfg():
    with_cfg = generate(TINY)
    without = generate(TINY.replace(guidance_scale=0.0))
    assert not np.array_equal(pixels(with_cfg), pixels(without))


def test_batch_count_continues_one_random_stream():
    components = models.load("tiny")
    engines = torch_backend.prepare(TINY, components, CPU)
    results = pipeline.run(engines, components, TINY, "a lighthouse", seed=3, batch_count=2, progress=False)
    assert len(results) == 2 and not np.array_equal(pixels(results[0]), pixels(results[1]))
    again = pipeline.run(engines, components, TINY, "a lighthouse", seed=3, batch_count=2, progress=False)
    assert np.array_equal(pixels(results[1]), pixels(again[1]))


def test_lora_fusing_changes_the_output_and_scale_zero_does_not(tmp_path):
    base_components = models.load("tiny")
    lora_file = make_lora(base_components.unet, tmp_path)
    plain = pixels(generate(TINY))
    fused = models.load("tiny", lora_path=str(lora_file), lora_scale=1.0)
    assert fused.lora == {"path": str(lora_file), "scale": 1.0}
    assert not np.array_equal(pixels(generate(TINY, fused)), plain)
    zero = models.load("tiny", lora_path=str(tmp_path), lora_scale=0.0)  # a directory works too
    assert np.array_equal(pixels(generate(TINY, zero)), plain)
    assert torch.equal(
        zero.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.weight,
        base_components.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.weight,
    )
