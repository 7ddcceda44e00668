"""Cross-attention K/V computed once per prompt (`engines.cross_kv`): the same images, fewer projections."""

from __future__ import annotations

import pytest
import torch

from sdxl_core import engines, models, pipeline, run
from sdxl_core.engines import compiled, cross_kv, torch_backend
from sdxl_core.errors import UserError
from sdxl_core.quant import qmodules
from sdxl_core.variants import VARIANTS

CPU = torch.device("cpu")


def tiny(name: str = "xl-1.0-fp16", **changes):
    return VARIANTS[name].replace(model="tiny", height=64, width=64, steps=3, calibration_size=1, **changes)


def images(variant, reuse: bool, prompts=("a red cube", "a blue sphere")):
    components = models.load("tiny")
    loop = run.calibration_loop(components, variant, CPU, torch.float32, False)
    ready = torch_backend.prepare(variant, components, CPU, progress=False, reuse_cross_kv=reuse, forward_loop=loop)
    out = [pipeline.txt2img(ready, components, variant, [prompt], seed=1).latents for prompt in prompts]
    return out, ready, components


@pytest.mark.parametrize("name, fused", [("xl-1.0-fp16", False), ("xl-1.0-fp16", True), ("xl-1.0-int8", True)])
def test_reused_kv_give_the_same_latents_bit_for_bit(name, fused):
    variant = tiny(name, fused_qkv=fused)
    per_step, plain, _ = images(variant, reuse=False)
    reused, ready, components = images(variant, reuse=True)
    assert plain.info.cross_kv == "per-step" and ready.info.cross_kv == "reuse"
    assert all(torch.equal(a, b) for a, b in zip(per_step, reused, strict=True))
    assert not torch.equal(reused[0], reused[1])  # the second prompt got its own K/V
    assert isinstance(ready.unet, cross_kv.RefillingStep) and ready.unet.fills == 2  # once per prompt
    cached = [m for m in components.unet.modules() if isinstance(m, cross_kv.CachedProjection)]
    attn2 = [m for m in components.unet.modules() if getattr(m, "is_cross_attention", False)]
    assert len(cached) == len(attn2) * (1 if fused else 2) > 0
    if variant.is_quantized:  # the 8-bit projections are kept, behind the cache
        assert all(isinstance(m.projection, qmodules.QuantizedModule) for m in cached)


def test_the_projections_run_once_per_prompt_not_once_per_step():
    variant = tiny()
    components = models.load("tiny")
    calls = []
    for attn in [m for m in components.unet.modules() if getattr(m, "is_cross_attention", False)]:
        attn.to_k.register_forward_hook(lambda *_: calls.append(1))
    for reuse, expected in ((False, 2 * variant.steps), (True, 2)):
        ready = torch_backend.prepare(variant, components, CPU, progress=False, reuse_cross_kv=reuse)
        calls.clear()
        for prompt in ("a red cube", "a blue sphere"):
            pipeline.txt2img(ready, components, variant, [prompt], seed=0)
        layers = sum(1 for m in components.unet.modules() if getattr(m, "is_cross_attention", False))
        assert len(calls) == expected * layers


def test_states_changed_in_place_are_projected_again():
    unet = models.build_builtin("tiny").unet.eval()
    kv = cross_kv.CrossKV(unet)
    step = cross_kv.RefillingStep(engines.unet_stage(unet), kv)
    inputs = list(torch_backend.unet_inputs(tiny(), unet, CPU, torch.float32))
    with torch.no_grad():
        first = step(*inputs)
        buffers = [p.cached.data_ptr() for p in kv.projections]
        assert torch.equal(step(*inputs), first) and step.fills == 1
        inputs[2].mul_(0.5)  # same tensor, new values: the version counter says so
        halved = step(*inputs)
    assert step.fills == 2 and not torch.equal(halved, first)
    assert [p.cached.data_ptr() for p in kv.projections] == buffers  # refilled in place, where a CUDA graph reads
    with torch.inference_mode():  # inference tensors keep no version: a new tensor is a new prompt
        states = inputs[2].clone()
        step(inputs[0], inputs[1], states, inputs[3], inputs[4])
        step(inputs[0], inputs[1], states, inputs[3], inputs[4])
    assert step.fills == 3


def test_compiled_blocks_read_the_refilled_kv():
    """Regional compile over the cached projections: one trace, and a new prompt's K/V reach the compiled
    blocks (a buffer Dynamo took for a constant would keep the first prompt's)."""
    unet = models.build_builtin("tiny").unet.eval()
    plain = engines.unet_stage(unet)
    inputs = list(torch_backend.unet_inputs(tiny(), unet, CPU, torch.float32))
    other = torch.randn_like(inputs[2])
    with torch.inference_mode():
        expected = [plain(*inputs), plain(inputs[0], inputs[1], other, *inputs[3:])]
        kv = cross_kv.CrossKV(unet)
        kv.fill(inputs[2])
        torch._dynamo.reset()
        compiled.compile_regions(unet, backend="aot_eager")
        step = cross_kv.RefillingStep(engines.unet_stage(unet), kv)
        got = [step(*inputs), step(inputs[0], inputs[1], other, *inputs[3:]), step(*inputs)]
    torch._dynamo.reset()
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[2], expected[0], rtol=1e-5, atol=1e-5)


def test_a_cached_projection_refuses_to_run_before_it_is_filled():
    projection = cross_kv.CachedProjection(torch.nn.Linear(4, 4))
    with pytest.raises(RuntimeError, match="before CrossKV.fill"):
        projection(torch.zeros(1, 4))


@pytest.mark.parametrize("value, expected", [(None, "per-step"), ("reuse", "reuse"), ("per-step", "per-step")])
def test_mode_comes_from_the_environment(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv(cross_kv.ENV, raising=False)
    else:
        monkeypatch.setenv(cross_kv.ENV, value)
    assert cross_kv.mode() == expected


def test_a_bad_mode_is_one_line_and_exit_2_before_any_model_loads(monkeypatch, capsys):
    from sdxl_core.commands import cli

    monkeypatch.setenv(cross_kv.ENV, "always")
    with pytest.raises(UserError, match=r"SDXL_BENCH_CROSS_KV='always': choose one of per-step, reuse"):
        cross_kv.mode()
    loaded = []
    monkeypatch.setattr(models, "load", lambda *a, **k: loaded.append(1))
    assert cli.main(["txt2img", "--model", "tiny", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: SDXL_BENCH_CROSS_KV='always': choose one of per-step, reuse" and not loaded
