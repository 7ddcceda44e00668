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
    """The UNet step's output eagerly, then after `compile_regions` (aot_eager: no C++ compiler needed)."""
    step = engines.unet_stage(unet)
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
    regions = [m for m in unet.modules() if type(m).__name__ in compiled.COMPILED_REGIONS]
    assert {type(m).__name__ for m in regions} == set(compiled.COMPILED_REGIONS)
    assert {type(m).__name__ for m in regions} >= {"BasicTransformerBlock", "ResnetBlock2D"}
    assert all(m._compiled_call_impl is not None for m in regions)
    others = [m for m in unet.modules() if m not in regions]
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


def test_regional_compile_also_compiles_the_8bit_layers_between_blocks():
    """proj_in/proj_out sit outside every block: compiled one by one, the rest of an 8-bit UNet is untouched."""
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
    standalone = {
        name
        for name, m in real.named_modules()
        if isinstance(m, qmodules.QuantizedModule) and m._compiled_call_impl is not None
    }
    assert standalone and all(name.endswith(("proj_in", "proj_out")) for name in standalone)
    assert len(standalone) == 2 * sum(type(m).__name__ == "Transformer2DModel" for m in real.modules())
    torch.testing.assert_close(regional, eager, rtol=1e-4, atol=1e-4)
