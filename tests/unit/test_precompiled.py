"""Precompiled UNet regions: built with the engine, loaded on reuse with nothing traced, refused safely.

On the CPU these compile with `aot_eager` (no C++ compiler); a GPU build uses Inductor and the same code path.
tests/suite/test_reuse.py checks the real thing on a GPU: a fresh `txt2img --no-build` that traces nothing.
"""

from pathlib import Path

import pytest
import torch

from sdxl_core import engines, models
from sdxl_core.engines import compiled, precompiled, store, torch_backend
from sdxl_core.engines.info import EngineInfo
from sdxl_core.variants import VARIANTS

pytestmark = pytest.mark.skipif(not precompiled.supported(), reason="needs a torch with aot_compile (2.11 or later)")

CPU = torch.device("cpu")
FP16 = VARIANTS["xl-1.0-fp16"].replace(model="tiny", height=64, width=64, steps=2, fused_qkv=True)  # as the suite runs


def info() -> EngineInfo:
    return EngineInfo(backend="torch", backend_version="x", engine_key="k", mode="loaded", cuda_graph=False)


def tiny_unet():
    torch.manual_seed(0)
    return models.build_builtin("tiny").unet.eval()


def inputs_for(unet, variant=FP16):
    return torch_backend.unet_inputs(variant, unet, CPU, torch.float32)


def eager(unet, inputs):
    with torch.inference_mode():
        return engines.unet_stage(unet)(*inputs)


@pytest.fixture(scope="module")
def regions_file():
    """The tiny FP16 UNet's regions, precompiled as an engine build does (then Dynamo is reset: a reuse is a
    fresh process)."""
    unet = tiny_unet()
    built = info()
    made = compiled.compile_unet(
        unet, inputs_for(unet), mode="regional", info=built, keep_cache=True, precompile=True, backend="aot_eager"
    )
    torch._dynamo.reset()
    assert made.regions is not None, built.compiled_regions
    assert built.compiled_regions.startswith("saved: "), built.compiled_regions
    return made.regions


def test_a_reuse_runs_the_precompiled_regions_and_traces_nothing(regions_file):
    unet = tiny_unet()
    inputs = inputs_for(unet)
    expected = eager(unet, inputs)
    loaded = info()
    made = compiled.compile_unet(
        unet, inputs, mode="regional", info=loaded, regions_file=regions_file, backend="aot_eager"
    )
    assert loaded.compiled_regions == "loaded"
    assert loaded.dynamo_frames == 0
    regions = compiled.regions(unet)
    assert all(type(module.forward.func).__name__ == "AOTCompiledFunction" for _, module in regions)
    names = [name for name, _ in regions]
    index, blobs = precompiled.unpack(regions_file)
    assert sorted(index) == sorted(names) and len(blobs) < len(names)  # a class's repeated blocks share one
    for seed in (1, 2):
        other = torch_backend.unet_inputs(FP16, unet, CPU, torch.float32, seed=seed)
        torch.testing.assert_close(eager(made.runnable, other), eager(tiny_unet(), other), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eager(made.runnable, inputs), expected, rtol=1e-5, atol=1e-5)


def test_regions_whose_guards_fail_are_compiled_instead(regions_file, capfd):
    """Another input shape fails the saved guards: the reuse says so in one line and compiles the regions."""
    variant = FP16.replace(height=128, width=128)
    unet = tiny_unet()
    inputs = inputs_for(unet, variant)
    expected = eager(unet, inputs)
    torch._dynamo.reset()
    loaded = info()
    made = compiled.compile_unet(
        unet, inputs, mode="regional", info=loaded, regions_file=regions_file, backend="aot_eager"
    )
    assert loaded.compiled_regions.startswith("not used: "), loaded.compiled_regions
    assert "mismatch" in loaded.compiled_regions or "Guard" in loaded.compiled_regions, loaded.compiled_regions
    assert loaded.dynamo_frames > 0
    assert all("forward" not in module.__dict__ for _, module in compiled.regions(unet))
    assert "precompiled regions were not used" in capfd.readouterr().err
    torch.testing.assert_close(eager(made.runnable, inputs), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda data: b"not a regions file" + data, "not a compiled_regions.bin"),
        (lambda data: data[:-1], "do not add up"),
        (lambda data: data + b"\0", "do not add up"),
    ],
    ids=["foreign", "truncated", "appended"],
)
def test_a_malformed_regions_file_is_refused_before_any_function_loads(regions_file, damage, message):
    with pytest.raises(ValueError, match=message):
        precompiled.unpack(damage(regions_file))


def test_a_regions_file_of_another_unet_is_refused(regions_file):
    unet = tiny_unet()
    regions = compiled.regions(unet)[:-1]
    with pytest.raises(ValueError, match="regions"):
        precompiled.bind(regions_file, regions)
    assert all("forward" not in module.__dict__ for _, module in regions)


def test_a_built_engine_keeps_its_regions_and_a_reuse_loads_them(tmp_path, monkeypatch):
    """Through the engine store: the file is published with the engine and listed in its sidecar, and a reuse
    traces nothing. (Read back only through the store, as an executable artifact: test_engine_trust.py.)"""
    monkeypatch.setattr(
        compiled, "compile_unet", _with_defaults(compiled.compile_unet, backend="aot_eager", precompile=True)
    )

    def prepare(allow_build):
        components = models.load("tiny", unet_weights=allow_build)
        return torch_backend.prepare(
            FP16, components, CPU, engine_dir=tmp_path, progress=False, allow_build=allow_build, compile=True
        )

    built = prepare(allow_build=True).info
    assert built.mode == "built" and built.compiled_regions.startswith("saved: ")
    sidecar = store.read_sidecar(Path(built.engine_path))
    assert precompiled.FILE in sidecar["files"] and torch_backend.COMPILE_CACHE in sidecar["files"]
    torch._dynamo.reset()
    reused = prepare(allow_build=False).info
    assert (reused.mode, reused.compiled_regions, reused.dynamo_frames) == ("loaded", "loaded", 0)


def _with_defaults(function, **defaults):
    def call(*args, **kwargs):
        return function(*args, **{**defaults, **kwargs})

    return call


@pytest.mark.parametrize("ours", ["attention", "layernorm", "geglu_act"])
def test_regions_with_our_kernels_precompile_and_reuse_without_tracing(ours):
    """An engine whose attentions run our attention kernel (`quant.attention`: another processor class), or whose
    LayerNorms run ours (`quant.layernorm`: subclasses of the norms and their blocks): its regions save and load like
    diffusers' own, and a UNet whose modules were not swapped is refused."""
    from sdxl_core.quant import attention, geglu_act, layernorm, qmodules

    def fused_unet():
        unet = tiny_unet()
        qmodules.fuse_qkv(unet)
        if ours != "attention":
            fusion = layernorm if ours == "layernorm" else geglu_act
            found = layernorm.norms(unet) if ours == "layernorm" else geglu_act.activations(unet)
            for entry in found.values():
                fusion.fuse(entry)
            return unet
        for module in unet.modules():
            if attention.fusable(module):
                attention.fuse(module)
        return unet

    unet = fused_unet()
    inputs = inputs_for(unet)
    built = info()
    made = compiled.compile_unet(
        unet, inputs, mode="regional", info=built, keep_cache=True, precompile=True, backend="aot_eager"
    )
    torch._dynamo.reset()
    assert made.regions is not None, built.compiled_regions
    reused, loaded = fused_unet(), info()
    expected = eager(fused_unet(), inputs)
    runnable = compiled.compile_unet(
        reused, inputs, mode="regional", info=loaded, regions_file=made.regions, backend="aot_eager"
    ).runnable
    assert (loaded.compiled_regions, loaded.dynamo_frames) == ("loaded", 0)
    torch.testing.assert_close(eager(runnable, inputs), expected, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
    plain, refused = tiny_unet(), info()
    qmodules.fuse_qkv(plain)
    compiled.compile_unet(plain, inputs, mode="regional", info=refused, regions_file=made.regions, backend="aot_eager")
    assert refused.compiled_regions.startswith("not used: "), refused.compiled_regions
    torch._dynamo.reset()
