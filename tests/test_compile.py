"""The 8-bit modules under torch.compile: one graph (the GEMMs are opaque custom ops), same numbers.

This is what lets Inductor fuse the activation quantization into the producing kernel on the GPU: a graph
break at every quantized layer would leave the quantize ops as separate kernels (measured slower than
fp16 on H100, docs/perf).
"""

import pytest
import torch

from sdxl_core import qmodules


def quantized_mlp(module_cls):
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.LayerNorm(64), torch.nn.Linear(64, 128), torch.nn.GELU(),
                              torch.nn.Linear(128, 64))
    for i in (1, 3):
        linear = mlp[i]
        mlp[i] = module_cls.from_float(linear, w_amax=linear.weight.detach().abs().amax(dim=1),
                                       a_amax=torch.tensor(4.0))
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
        compiled = torch.compile(mlp, backend="aot_eager", fullgraph=True)
        assert torch.equal(compiled(x), mlp(x))


@pytest.mark.slow
def test_whole_converted_int8_unet_traces_as_one_graph():
    from sdxl_core import models, quantize
    from sdxl_core.engines.torch_backend import dummy_unet_inputs, unet_stage
    from sdxl_core.variants import VARIANTS

    variant = VARIANTS["xl-1.0-int8"].replace(model="tiny", height=128, width=128, steps=2, calibration_size=2)
    unet = models.build_builtin("tiny").unet
    inputs = dummy_unet_inputs(unet, variant, torch.device("cpu"), torch.float32)

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
