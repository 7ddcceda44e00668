"""LayerNorms whose kernel quantizes their output for the 8-bit layer they feed (`quant.layernorm`,
`kernels.layernorm8`).

CPU: the Triton kernel in the Triton interpreter against float64 LayerNorm and torch's quantization, the fused norms
against diffusers' blocks on calibrated tiny UNets (projections fused and not, with the attention kernel, layers on
the 16-bit path), an 8-bit layer taking its own format as already quantized, the build-time choice, and the layer
plan that carries it. GPU: the kernel on SDXL's norm shapes (its speed is measured by the engine build's dispatch).
"""

import copy

import pytest
import torch

from sdxl_core.errors import UserError
from sdxl_core.models import build_builtin
from sdxl_core.quant import attention, layernorm, qmodules
from sdxl_core.quant import plan as plan_schema
from sdxl_core.quant.kernels import epilogue8, layernorm8, ops
from sdxl_core.quant.kernels.fp8_gemm import FP8_DTYPE
from tests.support.hardware import needs_hopper
from tests.support.tiny import (
    converted_copies,
    grid_index,
    input_dtypes,
    load_saved,
    run,
    run_in_interpreter,
    timer_preferring,
    unet_inputs,
)

TINY_NORMS = 51  # 17 transformer blocks in tiny, three LayerNorms each


@pytest.fixture(scope="module")
def data():
    generator = torch.Generator().manual_seed(12)
    return {"calib": [unet_inputs(generator, t) for t in (900, 400)], "eval": unet_inputs(generator, 650)}


@pytest.fixture(scope="module")
def converted(data):
    """(precision, fused projections) -> a calibrated, converted tiny UNet at level 3."""
    return converted_copies(data["calib"], fused_qkv=True)


def fuse_all(unet) -> dict[str, bool]:
    """Fuse every norm; {name: whether its output is 8-bit}."""
    found = layernorm.norms(unet)
    for entry in found.values():
        layernorm.fuse(entry)
    return {name: entry.feeds is not None and attention.quantizes(entry.feeds) for name, entry in found.items()}


@pytest.mark.slow
def test_layernorm8_kernel_in_interpreter():
    proc = run_in_interpreter("layernorm_interp_check.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK 100 cases" in proc.stdout


@pytest.mark.parametrize("precision", ["int8", "fp8"])
@pytest.mark.parametrize("fused_qkv", [False, True], ids=["projections", "fused-projections"])
def test_fused_norms_compute_what_diffusers_blocks_do(converted, data, precision, fused_qkv):
    """On the CPU the op computes the unfused engine's arithmetic (the residual add, PyTorch's LayerNorm, then the next
    layer's quantization) in float32, so the fusion alone decides whether the UNet's output moves: a norm quantizing
    with another layer's scales, a layer quantizing an input that is already quantized, or a block adding a residual
    twice or not at all, would move it."""
    unet = converted(precision, fused_qkv)
    expected = run(unet, data["eval"])
    eight_bit = fuse_all(unet)
    assert len(eight_bit) == len(layernorm.fused_norms(unet)) == TINY_NORMS
    # norm2 and norm3 feed one layer each; norm1 feeds one only where Q, K and V are one fused projection.
    assert sum(eight_bit.values()) == TINY_NORMS if fused_qkv else sum(eight_bit.values()) == TINY_NORMS * 2 // 3
    fed = [entry.feeds for name, entry in layernorm.norms(unet).items() if eight_bit[name]]
    with input_dtypes(fed) as seen:
        assert torch.equal(run(unet, data["eval"]), expected)
    assert seen == {qmodules.STORAGE[precision]}  # each fed layer got its input quantized by the kernel


def test_fused_norms_and_fused_attentions_together(converted, data):
    unet = converted("int8")
    expected = run(unet, data["eval"])
    fuse_all(unet)
    for attn in [m for m in unet.modules() if attention.fusable(m)]:
        attention.fuse(attn)
    assert torch.equal(run(unet, data["eval"]), expected)


def test_a_norm_whose_layer_runs_16_bits_gets_the_16_bit_output(converted, data):
    unet = converted("int8")
    for entry in layernorm.norms(unet).values():
        entry.feeds.set_gemm_path("16bit", torch.float32)
    expected = run(unet, data["eval"])
    assert not any(fuse_all(unet).values())
    assert torch.equal(run(unet, data["eval"]), expected)


@pytest.mark.parametrize("precision", ["int8", "fp8"])
@pytest.mark.parametrize("path", ["8bit", "16bit"])
def test_an_8_bit_layer_takes_its_own_format_as_already_quantized(converted, precision, path):
    layer = next(m for m in converted(precision).modules() if isinstance(m, qmodules.QLinear))
    assert (layer.smooth is not None) == (precision == "int8")  # SmoothQuant is INT8's
    layer.set_gemm_path(path, torch.float32)
    x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(1))
    x_q = layer.quantize_input(x if layer.smooth is None else x * layer.smooth)
    assert x_q.dtype == qmodules.STORAGE[layer.FMT]
    got = layer(x_q)
    assert got.dtype == layer.act_dtype == torch.float32 and got.shape == (3, 5, layer.out_features)
    assert torch.equal(got, layer(x))


def test_a_layers_activation_dtype_follows_the_module(converted):
    layer = next(m for m in converted("int8").modules() if isinstance(m, qmodules.QLinear))
    layer.half()
    assert layer.act_dtype == torch.float16 and layer.weight.dtype == torch.int8


def test_a_fused_unet_traces_as_one_graph_and_matches_eager(converted, data):
    """The op is opaque to torch.compile (a custom op with a fake implementation), so the fused norms cost no graph
    break: everything around them still fuses on the GPU."""
    unet = converted("int8")
    fuse_all(unet)
    with torch.inference_mode():
        eager = unet(**data["eval"]).sample
        explanation = torch._dynamo.explain(unet)(**data["eval"])
        assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons[:3]
        torch._dynamo.reset()
        graph = torch.compile(unet, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(graph(**data["eval"]).sample, eager, rtol=1e-5, atol=1e-5)
        torch._dynamo.reset()


def test_a_16_bit_unet_fused_computes_what_diffusers_blocks_do(data):
    unet = build_builtin("tiny").unet.eval()
    expected = run(unet, data["eval"])
    assert not any(fuse_all(unet).values())
    assert len(layernorm.fused_norms(unet)) == TINY_NORMS
    assert torch.equal(run(unet, data["eval"]), expected)


def test_a_norm_without_weight_or_bias_is_not_fusable():
    assert layernorm.fusable(torch.nn.LayerNorm(32))
    for norm in (torch.nn.LayerNorm(32, elementwise_affine=False), torch.nn.LayerNorm(32, bias=False)):
        assert not layernorm.fusable(norm)
        with pytest.raises(ValueError, match="cannot run on the LayerNorm kernel"):
            layernorm.fuse(layernorm.Norm(norm, None, False, torch.nn.Module()))
    assert not layernorm.fusable(torch.nn.LayerNorm((4, 8)))


def test_a_block_whose_norms_take_the_residual_add_is_still_a_compiled_region_and_unfuses(converted, data):
    from sdxl_core.engines import compiled

    unet = converted("int8")
    blocks = {name for name, _ in compiled.regions(copy.deepcopy(unet))}
    found = layernorm.norms(unet)
    for entry in found.values():
        layernorm.fuse(entry)
    fused_blocks = {id(entry.block) for entry in found.values()}
    assert all(isinstance(b, layernorm._AddNormBlock) for b in (e.block for e in found.values()))
    assert {name for name, _ in compiled.regions(copy.deepcopy(unet))} == blocks  # each block still its own region
    for name, entry in found.items():
        if name.endswith("norm2"):
            layernorm.unfuse(entry)
    assert all(isinstance(b, layernorm._AddNormBlock) for b in (e.block for e in found.values()))  # norm3 still is
    for name, entry in found.items():
        if name.endswith("norm3"):
            layernorm.unfuse(entry)
    assert not any(isinstance(m, layernorm._AddNormBlock) for m in unet.modules()) and len(fused_blocks) == 17
    assert layernorm.fused_norms(unet) == {n: layernorm.KERNEL for n in found if n.endswith("norm1")}


@pytest.mark.parametrize("kernel_wins", [True, False])
def test_choose_fuses_where_the_kernel_is_faster_and_the_plan_keeps_it(converted, data, kernel_wins, tmp_path):
    unet = converted("int8")
    expected = run(unet, data["eval"])
    rows = layernorm.choose(
        unet,
        lambda: run(unet, data["eval"]),
        timer=timer_preferring(kernel_wins, layernorm.KERNEL, where=lambda shape: shape[-1] == 1),
        max_error=2e-2,
    )
    assert sum(r["layers"] for r in rows) == TINY_NORMS
    assert {r["op"] for r in rows} == {"layernorm"} and {r["fmt"] for r in rows} == {"int8"}
    assert {r["shape"][-1] for r in rows} == {0, 1}  # after a residual add or not
    for row in rows:
        assert set(row["ms"]) == {layernorm.UNFUSED, layernorm.KERNEL}
        fused = kernel_wins and row["shape"][-1] == 1
        assert row["choice"] == (layernorm.KERNEL if fused else layernorm.UNFUSED)
    plan = qmodules.layer_plan(unet)
    if not kernel_wins:
        assert "norms" not in plan  # plans of engines without fused norms stay as they were
        return
    assert len(plan["norms"]) == TINY_NORMS * 2 // 3 and all(n.endswith(("norm2", "norm3")) for n in plan["norms"])
    plan_schema.check_layer_plan(plan, "cpu")
    qmodules.save(unet, tmp_path)
    loaded = load_saved(tmp_path)
    assert layernorm.fused_norms(loaded) == plan["norms"]
    assert torch.equal(run(loaded, data["eval"]), expected)
    # A build that finds the kernel slower undoes the fusion it inherited.
    layernorm.choose(
        loaded, lambda: run(loaded, data["eval"]), timer=timer_preferring(False, layernorm.KERNEL), max_error=2e-2
    )
    assert not layernorm.fused_norms(loaded)


def test_a_16_bit_unet_times_the_kernel_with_its_16_bit_output(data):
    """What the FP16 engines get, so that the speed gates compare like for like."""
    unet = build_builtin("tiny").unet.eval()
    rows = layernorm.choose(
        unet,
        lambda: run(unet, data["eval"]),
        timer=timer_preferring(True, layernorm.KERNEL_16BIT),
        max_error=2e-2,
    )
    assert rows and {r["fmt"] for r in rows} == {layernorm.SIXTEEN_BIT}
    assert all(set(r["ms"]) == {layernorm.SIXTEEN_BIT, layernorm.KERNEL_16BIT} for r in rows)
    assert len(layernorm.fused_norms(unet)) == TINY_NORMS


def test_choose_rejects_a_kernel_whose_output_is_wrong(converted, data, monkeypatch):
    unet = converted("fp8")
    right, right_add = ops.layernorm8, ops.add_layernorm8

    def wrong(x, weight, bias, eps, smooth, inv_scale, out_dtype):
        return right(x, bias, weight, eps, smooth, inv_scale, out_dtype)  # weight and bias swapped

    def wrong_stream(x, residual, *args):
        total, y = right_add(x, residual, *args)
        return total - residual, y  # the norm right, the residual stream without the residual

    monkeypatch.setattr(ops, "layernorm8", wrong)
    monkeypatch.setattr(ops, "add_layernorm8", wrong_stream)
    rows = layernorm.choose(
        unet, lambda: run(unet, data["eval"]), timer=timer_preferring(True, layernorm.KERNEL), max_error=2e-2
    )
    assert rows and all(r["choice"] == layernorm.UNFUSED and layernorm.KERNEL in r["rejected"] for r in rows)
    assert not layernorm.fused_norms(unet)


def test_the_dispatch_filter_can_leave_the_kernel_out(converted, data):
    unet = converted("int8")
    rows = layernorm.choose(
        unet,
        lambda: run(unet, data["eval"]),
        timer=timer_preferring(True, layernorm.KERNEL),
        max_error=2e-2,
        allowed=lambda k: False,
    )
    assert rows == [] and not layernorm.fused_norms(unet)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"down_blocks.1.attentions.0.transformer_blocks.0.norm1": "apex"}, "does not have"),
        ({"not a name": layernorm.KERNEL}, "not a module name"),
        (["down_blocks.1.attentions.0.transformer_blocks.0.norm1"], "not an object"),
    ],
)
def test_a_plan_with_a_foreign_norms_entry_is_refused(converted, entry, message):
    plan = qmodules.layer_plan(converted("int8"))
    plan["norms"] = entry
    with pytest.raises(UserError, match=message):
        plan_schema.check_layer_plan(plan)


@pytest.mark.parametrize(
    "name", ["down_blocks.1.attentions.0.norm", "down_blocks.1.attentions.0.transformer_blocks.0.norm9"]
)
def test_a_plan_that_fuses_something_else_than_a_block_norm_is_refused(converted, name):
    from diffusers import UNet2DConditionModel

    unet = converted("int8")
    plan = qmodules.layer_plan(unet)
    plan["norms"] = {name: layernorm.KERNEL}
    with torch.device("meta"):
        plain = UNet2DConditionModel.from_config(unet.config)
    with pytest.raises(UserError, match="rebuild the engine"):
        qmodules.apply_layer_plan(plain, plan)


def test_the_op_refuses_what_the_kernel_cannot_write():
    x, weight, bias = torch.randn(4, 16).half(), torch.ones(16).half(), torch.zeros(16).half()
    with pytest.raises(ValueError, match="activation dtype"):
        layernorm8.layernorm8(x, weight, bias, 1e-5, None, None, torch.float32)
    with pytest.raises(ValueError, match="inverse input scale"):
        layernorm8.layernorm8(x, weight, bias, 1e-5, None, None, torch.int8)


def test_supports_takes_rows_with_unit_stride_and_nothing_else():
    x, weight, bias = torch.randn(4, 24).half(), torch.ones(16).half(), torch.zeros(16).half()
    assert layernorm8.supports(x[:, 4:20], weight, bias)  # a row stride wider than the rows
    assert not layernorm8.supports(x[:, 4:20].float(), weight.float(), bias.float())  # 16-bit inputs only
    assert not layernorm8.supports(x.t()[:16], weight, bias)  # C not contiguous
    assert not layernorm8.supports(x[:, :16], weight, None)
    wide = torch.randn(2, layernorm8.MAX_CHANNELS + 1).half()
    assert not layernorm8.supports(wide, torch.ones(wide.shape[1]).half(), torch.zeros(wide.shape[1]).half())


# SDXL's transformer-block norms at 1024x1024 with classifier-free guidance: 2048 tokens of 1280 channels (60 blocks)
# and 8192 tokens of 640 channels (10 blocks).
SDXL_SHAPES = [(2048, 1280), (8192, 640)]


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("out_dtype", [torch.int8, FP8_DTYPE, torch.float16], ids=["int8", "fp8", "fp16"])
@pytest.mark.parametrize("shape", SDXL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_layernorm8_on_sdxl_shapes(shape, out_dtype):
    torch.manual_seed(0)
    rows, channels = shape
    x = (torch.randn(rows, channels, device="cuda") * 3 + torch.randn(rows, 1, device="cuda") * 5).half()
    weight = (torch.rand(channels, device="cuda") + 0.5).half()
    bias = (torch.randn(channels, device="cuda") * 0.1).half()
    y16 = layernorm8.layernorm8(x, weight, bias, 1e-5, None, None, torch.float16)
    ref16 = torch.nn.functional.layer_norm(x, (channels,), weight, bias, 1e-5)
    assert float((y16.float() - ref16.float()).abs().max()) <= 2 * float(ref16.float().abs().max()) * 2**-11
    if out_dtype == torch.float16:
        return
    smooth = (torch.rand(channels, device="cuda") + 0.5).half()
    qmax = 127.0 if out_dtype == torch.int8 else 448.0
    inv_scale = torch.tensor(qmax / (0.8 * float((ref16.float() * smooth.float()).abs().max())), device="cuda")
    got = layernorm8.layernorm8(x, weight, bias, 1e-5, smooth, inv_scale, out_dtype)
    own = epilogue8.quantize_output(y16, smooth, inv_scale, out_dtype)
    # The 8-bit and 16-bit outputs are two autotuned kernels, whose warps may sum a row in another order: an output
    # within an fp16 ulp of a rounding boundary may land on the neighbouring 8-bit value, and nothing more.
    steps = (grid_index(got) - grid_index(own)).abs()
    assert int(steps.max()) <= 1 and int((steps > 0).sum()) <= got.numel() // 1000
    ref = layernorm8.layernorm_reference(x, weight, bias, 1e-5, smooth, inv_scale, out_dtype)
    rel = float((got.float() - ref.float()).norm() / ref.float().norm())
    assert rel < 1e-2, f"against the unfused norm: relative error {rel:.2e}"


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_the_kernels_command_times_a_norm_as_the_build_does(fmt):
    from sdxl_core.commands import kernels
    from sdxl_core.reports.measurements import render_kernels

    timed = []

    def timer(fn, candidate, shape):
        fn()
        timed.append(candidate)
        return {layernorm.SIXTEEN_BIT: 2.0, layernorm.UNFUSED: 3.0}.get(candidate, 1.5)

    row = kernels.measure_layernorm(fmt, (6, 40, 1), 120, torch.device("cpu"), timer)
    names = [layernorm.SIXTEEN_BIT, layernorm.KERNEL_16BIT, layernorm.UNFUSED, layernorm.KERNEL]
    assert sorted(timed) == sorted(names)
    assert row["speedup"] == {
        layernorm.SIXTEEN_BIT: 1.0,
        layernorm.KERNEL_16BIT: 1.333,
        layernorm.UNFUSED: 0.667,
        layernorm.KERNEL: 1.333,
    }
    assert "| layernorm |" in render_kernels({"rows": [row]})


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("layernorm", "KernelFusedLayerNorm"),
        ("layernorm", "KernelFusedBasicTransformerBlock"),
        ("geglu", "GegluFusedFeedForward"),
    ],
)
def test_a_fused_class_pickles_by_name(module, name):
    """An engine's precompiled regions pickle the classes of the modules they run: a fused module's class must be
    found by its name, also in a process that has not fused anything yet."""
    import importlib
    import pickle

    cls = getattr(importlib.import_module(f"sdxl_core.quant.{module}"), name)
    assert cls.__name__ == name and pickle.loads(pickle.dumps(cls)) is cls


def test_a_loaded_unets_8_bit_layers_take_the_activation_dtype_of_its_tensors(converted, tmp_path):
    """An engine is built on the meta device in the default dtype and its tensors assigned: its 8-bit layers must
    still return the dtype the UNet runs in (fp16 on a GPU), also those without a bias or a SmoothQuant scale."""
    unet = converted("fp8").half()
    qmodules.save(unet, tmp_path)
    import json

    from safetensors.torch import load_file

    config = json.loads((tmp_path / "unet_config.json").read_text())
    plan = json.loads((tmp_path / "layer_plan.json").read_text())
    loaded = qmodules.load_real(config, plan, load_file(str(tmp_path / "unet.safetensors")))
    layers = [m for m in loaded.modules() if isinstance(m, qmodules.QuantizedModule)]
    assert layers and {m.act_dtype for m in layers} == {torch.float16}
    assert any(m.bias is None and getattr(m, "smooth", None) is None for m in layers)
