"""The 8-bit modules under torch.compile: one graph (the GEMMs are opaque custom ops), same numbers.

This is what lets Inductor fuse the activation quantization into the producing kernel on the GPU: a graph
break at every quantized layer would leave the quantize ops as separate kernels (measured slower than
fp16 on a Hopper GPU).
"""

import pytest
import torch

from sdxl_core import engines
from sdxl_core.engines import compiled, torch_backend
from sdxl_core.quant import qmodules


def quantized_mlp(module_cls):
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(
        torch.nn.LayerNorm(64), torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64)
    )
    for i in (1, 3):
        linear = mlp[i]
        mlp[i] = module_cls.from_float(
            linear, w_amax=linear.weight.detach().abs().amax(dim=1), a_amax=torch.tensor(4.0)
        )
    return mlp.eval()


@pytest.mark.parametrize("module_cls", [qmodules.Int8Linear, qmodules.Fp8Linear])
def test_8bit_linears_trace_as_one_graph_and_match_eager(module_cls):
    mlp = quantized_mlp(module_cls)
    x = torch.randn(3, 10, 64)
    with torch.inference_mode():
        explanation = torch._dynamo.explain(mlp)(x)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1
        torch._dynamo.reset()
        graph = torch.compile(mlp, backend="aot_eager", fullgraph=True)
        assert torch.equal(graph(x), mlp(x))


@pytest.mark.slow
def test_whole_converted_int8_unet_traces_as_one_graph():
    from sdxl_core import models
    from sdxl_core.engines import unet_stage
    from sdxl_core.engines.torch_backend import unet_inputs
    from sdxl_core.quant import quantize
    from sdxl_core.variants import VARIANTS

    variant = VARIANTS["xl-1.0-int8"].replace(model="tiny", height=128, width=128, steps=2, calibration_size=2)
    unet = models.build_builtin("tiny").unet
    inputs = unet_inputs(variant, unet, torch.device("cpu"), torch.float32)

    def forward_loop(model):
        with torch.inference_mode():
            for _ in range(variant.steps):
                unet_stage(model)(*inputs)

    quantize.quantize_unet(unet, variant, forward_loop, progress=False)
    real, report = qmodules.convert_to_real(unet)
    assert report.counts == {"Int8Conv2d": 38, "Int8Linear": 192}
    with torch.inference_mode():
        explanation = torch._dynamo.explain(unet_stage(real))(*inputs)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons[:3]


def eager_then_regional(unet, inputs):
    """The UNet step's output eagerly, then after `compile_regions` (aot_eager: no C++ compiler needed). Both run
    through the Transformer2DModels' glue modules (`compiled.regions` installs them): its channels-last output
    moves float32 sums on the CPU by ulps, enough to flip an 8-bit rounding (test_glue.py)."""
    step = engines.unet_stage(unet)
    compiled.regions(unet)
    with torch.inference_mode():
        eager = step(*inputs)
        torch._dynamo.reset()
        compiled.compile_regions(unet, backend="aot_eager")
        return eager, step(*inputs)


def test_regional_compile_compiles_every_block_and_matches_eager():
    from sdxl_core import models
    from sdxl_core.variants import VARIANTS

    variant = VARIANTS["xl-1.0-fp16"].replace(model="tiny", height=64, width=64)
    unet = models.build_builtin("tiny").unet.eval()
    inputs = torch_backend.unet_inputs(variant, unet, torch.device("cpu"), torch.float32)
    eager, regional = eager_then_regional(unet, inputs)
    regions = [m for _, m in compiled.regions(unet)]
    kinds = {type(m).__name__ for m in regions}
    assert kinds == {*compiled.COMPILED_REGIONS, "TransformerInput", "TransformerOutput", "GroupNorm"}
    transformers = [m for m in unet.modules() if type(m).__name__ == "Transformer2DModel"]
    assert transformers and sum(type(m).__name__ == "TransformerInput" for m in regions) == len(transformers)
    assert [name for name, m in compiled.regions(unet) if type(m).__name__ == "GroupNorm"] == ["conv_norm_out"]
    assert all(m._compiled_call_impl is not None for m in regions)
    inside = {id(part) for m in regions for part in m.modules()}
    others = [m for m in unet.modules() if id(m) not in inside]
    assert all(getattr(m, "_compiled_call_impl", None) is None for m in others)
    torch.testing.assert_close(regional, eager, rtol=1e-5, atol=1e-5)


def test_unet_stage_hands_the_unet_a_float32_timestep_whatever_the_scheduler_gives():
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, sample, timestep, **kwargs):
            seen.append(timestep)
            return (sample,)

    from sdxl_core.engines import unet_stage

    for t in (torch.tensor(999), torch.tensor(965.5), 981):
        unet_stage(Probe())(torch.zeros(1), t, None, None, None)
    assert [(t.dtype, t.ndim) for t in seen] == [(torch.float32, 0)] * 3
    assert [float(t) for t in seen] == [999.0, 965.5, 981.0]


def test_cuda_graph_on_the_cpu_is_refused_in_one_line():
    from sdxl_core import models
    from sdxl_core.errors import UserError
    from sdxl_core.variants import VARIANTS

    variant = VARIANTS["xl-1.0-fp16"].replace(model="tiny", height=64, width=64)
    with pytest.raises(UserError, match="--use-cuda-graph needs a CUDA GPU"):
        torch_backend.prepare(
            variant, models.build_builtin("tiny"), torch.device("cpu"), use_cuda_graph=True, progress=False
        )


@pytest.mark.gpu
def test_graphed_step_replays_the_eager_step_and_refuses_other_shapes():
    from sdxl_core import models
    from sdxl_core.errors import UserError
    from sdxl_core.variants import VARIANTS

    cuda = torch.device("cuda")
    variant = VARIANTS["xl-1.0-fp16"].replace(model="tiny", height=64, width=64)
    unet = models.build_builtin("tiny").unet.to(cuda, torch.float16).eval()
    step = engines.unet_stage(unet)
    graphed = compiled.GraphedStep(step, torch_backend.unet_inputs(variant, unet, cuda, torch.float16))
    for seed in (1, 2):  # new inputs each call: the graph must read them, not the captured ones
        inputs = torch_backend.unet_inputs(variant, unet, cuda, torch.float16, seed=seed)
        with torch.inference_mode():
            torch.testing.assert_close(graphed(*inputs), step(*inputs), rtol=2e-3, atol=2e-3)
    bigger = torch_backend.unet_inputs(variant.replace(height=128, width=128), unet, cuda, torch.float16)
    with pytest.raises(UserError, match="captured for UNet input shape"):
        graphed(*bigger)


@pytest.mark.gpu
def test_graphed_step_keeps_its_unet_alive():
    """Regression: the graph replays raw pointers, so a UNet that nothing else references must not be freed.
    Before GraphedStep kept its step, a reloaded engine's replay hit an illegal memory access on a Hopper GPU."""
    import gc
    import weakref

    from sdxl_core import models
    from sdxl_core.variants import VARIANTS

    cuda = torch.device("cuda")
    variant = VARIANTS["xl-1.0-fp16"].replace(model="tiny", height=64, width=64)
    unet = models.build_builtin("tiny").unet.to(cuda, torch.float16).eval()
    inputs = torch_backend.unet_inputs(variant, unet, cuda, torch.float16, seed=3)
    step = engines.unet_stage(unet)
    with torch.inference_mode():
        expected = step(*inputs)
    graphed = compiled.GraphedStep(step, inputs)
    alive = weakref.ref(unet)
    del unet, step
    gc.collect()
    torch.cuda.empty_cache()
    assert alive() is not None
    torch.testing.assert_close(graphed(*inputs), expected, rtol=2e-3, atol=2e-3)


def test_regional_compile_runs_no_8bit_layer_eagerly():
    """proj_in/proj_out sit outside every block: they compile in their Transformer2DModel's input and output regions
    (with the GroupNorm whose output proj_in quantizes), so every 8-bit layer runs compiled."""
    from sdxl_core import models
    from sdxl_core.quant import quantize
    from sdxl_core.variants import VARIANTS

    variant = VARIANTS["xl-1.0-int8"].replace(model="tiny", height=64, width=64, steps=1, calibration_size=2)
    unet = models.build_builtin("tiny").unet.eval()
    inputs = torch_backend.unet_inputs(variant, unet, torch.device("cpu"), torch.float32)

    def forward_loop(model):
        with torch.inference_mode():
            engines.unet_stage(model)(*inputs)

    quantize.quantize_unet(unet, variant, forward_loop, progress=False)
    real, _ = qmodules.convert_to_real(unet)
    eager, regional = eager_then_regional(real, inputs)
    regions = compiled.regions(real)
    assert all(m._compiled_call_impl is not None for _, m in regions)
    inside = {id(part) for _, m in regions for part in m.modules()}
    quantized = [m for m in real.modules() if isinstance(m, qmodules.QuantizedModule)]
    assert quantized and all(id(m) in inside for m in quantized)
    assert not any(isinstance(m, qmodules.QuantizedModule) for _, m in regions)  # none compiled on its own
    transformers = [m for m in real.modules() if type(m).__name__ == "Transformer2DModel"]
    in_glue = {id(part) for name, m in regions if ":" in name for part in m.modules()}
    assert all(id(t.proj_in) in in_glue and id(t.proj_out) in in_glue for t in transformers)
    assert all(isinstance(t.proj_in, qmodules.QuantizedModule) for t in transformers)
    torch.testing.assert_close(regional, eager, rtol=1e-4, atol=1e-4)
