"""GEGLU activations whose kernel quantizes their output for the 8-bit layer after them (`quant.geglu_act`,
`kernels.geglu_act8`).

CPU: the Triton kernel in the Triton interpreter against float64 GEGLU and torch's quantization, the fused GEGLUs
against diffusers' feed-forwards on calibrated tiny UNets (alone, with our attention and LayerNorm kernels, with the
layers on the 16-bit path, FP16), the build-time choice, and the layer plan that carries it. GPU: the kernel on SDXL's
two GEGLU shapes (its speed is measured by the engine build's dispatch).
"""

import pytest
import torch
import torch.nn.functional as F

from sdxl_core.errors import UserError
from sdxl_core.models import build_builtin
from sdxl_core.quant import attention, geglu, geglu_act, layernorm, qmodules
from sdxl_core.quant import plan as plan_schema
from sdxl_core.quant.kernels import geglu_act8, ops
from sdxl_core.quant.kernels.epilogue8 import quantize_output
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

TINY_FEED_FORWARDS = 17  # one per transformer block of tiny


@pytest.fixture(scope="module")
def data():
    generator = torch.Generator().manual_seed(13)
    return {"calib": [unet_inputs(generator, t) for t in (900, 400)], "eval": unet_inputs(generator, 650)}


@pytest.fixture(scope="module")
def converted(data):
    """precision -> a calibrated, converted tiny UNet at level 3 on fused attention projections."""
    return converted_copies(data["calib"], fused_qkv=True)


def fuse_all(unet) -> int:
    found = geglu_act.activations(unet)
    for entry in found.values():
        geglu_act.fuse(entry)
    return len(found)


@pytest.mark.slow
def test_geglu_act8_kernel_in_interpreter():
    proc = run_in_interpreter("geglu_act_interp_check.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK 40 cases" in proc.stdout


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_fused_geglus_compute_what_diffusers_feed_forwards_do(converted, data, precision):
    """On the CPU the op computes the unfused engine's arithmetic (diffusers' GEGLU, then the next layer's
    quantization) in float32, so the fusion alone decides whether the UNet's output moves: a GEGLU quantizing with
    another layer's scales, or value and gate swapped, would move it."""
    unet = converted(precision)
    expected = run(unet, data["eval"])
    assert fuse_all(unet) == len(geglu_act.fused_activations(unet)) == TINY_FEED_FORWARDS
    layers = [entry.feeds for entry in geglu_act.activations(unet).values()]
    with input_dtypes(layers) as seen:
        assert torch.equal(run(unet, data["eval"]), expected)
    assert seen == {qmodules.STORAGE[precision]}  # each second layer got its input quantized by the kernel


def test_fused_geglus_with_our_attention_and_layernorm_kernels(converted, data):
    unet = converted("int8")
    expected = run(unet, data["eval"])
    fuse_all(unet)
    for entry in layernorm.norms(unet).values():
        layernorm.fuse(entry)
    for attn in [m for m in unet.modules() if attention.fusable(m)]:
        attention.fuse(attn)
    assert torch.equal(run(unet, data["eval"]), expected)
    with torch.inference_mode():  # all three are custom ops: the UNet still traces as one graph
        explanation = torch._dynamo.explain(unet)(**data["eval"])
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons[:3]
    torch._dynamo.reset()


def test_a_geglu_whose_next_layer_runs_16_bits_gets_the_16_bit_output(converted, data):
    unet = converted("int8")
    for entry in geglu_act.activations(unet).values():
        entry.feeds.set_gemm_path("16bit", torch.float32)
    expected = run(unet, data["eval"])
    fuse_all(unet)
    assert not any(attention.quantizes(entry.feeds) for entry in geglu_act.activations(unet).values())
    assert torch.equal(run(unet, data["eval"]), expected)


def test_a_16_bit_unet_fused_computes_what_diffusers_feed_forwards_do(data):
    unet = build_builtin("tiny").unet.eval()
    expected = run(unet, data["eval"])
    assert fuse_all(unet) == TINY_FEED_FORWARDS
    assert torch.equal(run(unet, data["eval"]), expected)


@pytest.mark.parametrize("kernel_wins", [True, False])
def test_choose_fuses_where_the_kernel_is_faster_and_the_plan_keeps_it(converted, data, kernel_wins, tmp_path):
    unet = converted("int8")
    expected = run(unet, data["eval"])
    rows = geglu_act.choose(
        unet, lambda: run(unet, data["eval"]), timer=timer_preferring(kernel_wins, geglu_act.KERNEL), max_error=2e-2
    )
    assert sum(r["layers"] for r in rows) == TINY_FEED_FORWARDS
    assert {r["op"] for r in rows} == {"geglu_act"} and {r["fmt"] for r in rows} == {"int8"}
    for row in rows:
        assert set(row["ms"]) == {geglu_act.UNFUSED, geglu_act.KERNEL}
        assert row["choice"] == (geglu_act.KERNEL if kernel_wins else geglu_act.UNFUSED)
    plan = qmodules.layer_plan(unet)
    if not kernel_wins:
        assert "activations" not in plan  # plans of engines without fused GEGLUs stay as they were
        return
    assert len(plan["activations"]) == TINY_FEED_FORWARDS and all(n.endswith(".ff.net.0") for n in plan["activations"])
    plan_schema.check_layer_plan(plan, "cpu")
    qmodules.save(unet, tmp_path)
    loaded = load_saved(tmp_path)
    assert geglu_act.fused_activations(loaded) == plan["activations"]
    assert torch.equal(run(loaded, data["eval"]), expected)
    # A build that finds the kernel slower undoes the fusion it inherited.
    geglu_act.choose(
        loaded, lambda: run(loaded, data["eval"]), timer=timer_preferring(False, geglu_act.KERNEL), max_error=2e-2
    )
    assert not geglu_act.fused_activations(loaded)


def test_a_feed_forward_with_the_geglu_in_its_gemm_is_not_timed(converted, data):
    """A feed-forward whose projection runs a GEMM with the GEGLU in its epilogue (`quant.geglu`) never calls its
    GEGLU module: nothing of it is timed or fused here."""
    unet = converted("int8")
    ffs = list(geglu.feed_forwards(unet).values())
    for ff in ffs[:5]:
        geglu.fuse(ff, torch.float32)
    rows = geglu_act.choose(
        unet, lambda: run(unet, data["eval"]), timer=timer_preferring(True, geglu_act.KERNEL), max_error=2e-2
    )
    assert sum(r["layers"] for r in rows) == TINY_FEED_FORWARDS - 5
    in_gemm = {id(ff.net[0]) for ff in ffs[:5]}
    fused = [m for m in unet.modules() if isinstance(m, geglu_act._FusedGegluActForward)]
    assert len(fused) == TINY_FEED_FORWARDS - 5 and not in_gemm & {id(m) for m in fused}


def test_a_16_bit_unet_times_the_kernel_with_its_16_bit_output(data):
    """What the FP16 engines get, so that the speed gates compare like for like."""
    unet = build_builtin("tiny").unet.eval()
    timer = timer_preferring(True, geglu_act.KERNEL_16BIT)
    rows = geglu_act.choose(unet, lambda: run(unet, data["eval"]), timer=timer, max_error=2e-2)
    assert rows and {r["fmt"] for r in rows} == {geglu_act.SIXTEEN_BIT}
    assert all(set(r["ms"]) == {geglu_act.SIXTEEN_BIT, geglu_act.KERNEL_16BIT} for r in rows)
    assert len(geglu_act.fused_activations(unet)) == TINY_FEED_FORWARDS


def test_choose_rejects_a_kernel_whose_output_is_wrong(converted, data, monkeypatch):
    unet = converted("fp8")
    right = ops.geglu_act8

    def wrong(h, smooth, inv_scale, out_dtype):
        value, gate = h.chunk(2, dim=-1)
        return right(torch.cat([gate, value], dim=-1), smooth, inv_scale, out_dtype)  # value and gate swapped

    monkeypatch.setattr(ops, "geglu_act8", wrong)
    rows = geglu_act.choose(
        unet, lambda: run(unet, data["eval"]), timer=timer_preferring(True, geglu_act.KERNEL), max_error=2e-2
    )
    assert rows and all(r["choice"] == geglu_act.UNFUSED and geglu_act.KERNEL in r["rejected"] for r in rows)
    assert not geglu_act.fused_activations(unet)


def test_the_dispatch_filter_can_leave_the_kernel_out(converted, data):
    unet = converted("int8")
    rows = geglu_act.choose(
        unet,
        lambda: run(unet, data["eval"]),
        timer=timer_preferring(True, geglu_act.KERNEL),
        max_error=2e-2,
        allowed=lambda k: False,
    )
    assert rows == [] and not geglu_act.fused_activations(unet)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0": "tanh"}, "does not have"),
        ({"not a name": geglu_act.KERNEL}, "not a module name"),
        (["down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0"], "not an object"),
    ],
)
def test_a_plan_with_a_foreign_activations_entry_is_refused(converted, entry, message):
    plan = qmodules.layer_plan(converted("int8"))
    plan["activations"] = entry
    with pytest.raises(UserError, match=message):
        plan_schema.check_layer_plan(plan)


@pytest.mark.parametrize(
    "name", ["down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2", "down_blocks.1.attentions.0.proj_in"]
)
def test_a_plan_that_fuses_something_else_than_a_geglu_is_refused(converted, name):
    from diffusers import UNet2DConditionModel

    unet = converted("int8")
    plan = qmodules.layer_plan(unet)
    plan["activations"] = {name: geglu_act.KERNEL}
    with torch.device("meta"):
        plain = UNet2DConditionModel.from_config(unet.config)
    with pytest.raises(UserError, match="rebuild the engine"):
        qmodules.apply_layer_plan(plain, plan)


def test_the_op_refuses_what_the_kernel_cannot_write():
    h = torch.randn(4, 32).half()
    with pytest.raises(ValueError, match="activation dtype"):
        geglu_act8.geglu_act8(h, None, None, torch.float32)
    with pytest.raises(ValueError, match="inverse input scale"):
        geglu_act8.geglu_act8(h, None, None, torch.int8)


def test_supports_takes_rows_with_unit_stride_and_whole_column_groups():
    h = torch.randn(4, 48).half()
    assert geglu_act8.supports(h[:, 8:40])  # a row stride wider than the rows
    assert not geglu_act8.supports(h[:, 8:40].float())  # 16-bit inputs only
    assert not geglu_act8.supports(h.t()[:32])  # columns not contiguous
    assert not geglu_act8.supports(h[:, :24])  # F = 12, not a multiple of 8


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_the_kernels_command_times_a_geglu_as_the_build_does(fmt):
    from sdxl_core.commands import kernels
    from sdxl_core.reports.measurements import render_kernels

    timed = []

    def timer(fn, candidate, shape):
        fn()
        timed.append(candidate)
        return {geglu_act.SIXTEEN_BIT: 2.0, geglu_act.UNFUSED: 3.0}.get(candidate, 1.5)

    row = kernels.measure_geglu_act(fmt, (6, 40), 60, torch.device("cpu"), timer)
    names = [geglu_act.SIXTEEN_BIT, geglu_act.KERNEL_16BIT, geglu_act.UNFUSED, geglu_act.KERNEL]
    assert sorted(timed) == sorted(names)
    assert row["speedup"][geglu_act.KERNEL] == 1.333 and row["speedup"][geglu_act.UNFUSED] == 0.667
    assert "| geglu_act |" in render_kernels({"rows": [row]})


def diffusers_geglu(h, smooth, inv_scale, out_dtype):
    """diffusers' GEGLU on 16-bit `h`, then the next layer's smoothing and quantization for an 8-bit `out_dtype`."""
    value, gate = h.chunk(2, dim=-1)
    return quantize_output(value * F.gelu(gate), smooth, inv_scale, out_dtype)


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("out_dtype", [torch.int8, FP8_DTYPE, torch.float16], ids=["int8", "fp8", "fp16"])
@pytest.mark.parametrize("shape", [(2048, 5120), (8192, 2560)], ids=lambda s: "x".join(map(str, s)))
def test_geglu_act8_on_sdxl_shapes(shape, out_dtype):
    torch.manual_seed(0)
    rows, width = shape
    h = (torch.randn(rows, 2 * width, device="cuda") * 2).half()
    y16 = geglu_act8.geglu_act8(h, None, None, torch.float16)
    exact = geglu_act8.geglu_reference(h.float(), None, None, torch.float32)
    assert float((y16.float() - exact).abs().max()) <= 2 * float(exact.abs().max()) * 2**-11
    # What the engine runs unfused: diffusers' GEGLU and the next layer's quantization, compiled by Inductor, which
    # fuses them in float32 and rounds nothing in between (rounding the gelu to fp16 first, as eager PyTorch does,
    # changed 25 % of these outputs by an ulp).
    unfused = torch.compile(diffusers_geglu, dynamic=False)
    differ = int((y16 != unfused(h, None, None, torch.float16)).sum())
    assert differ <= y16.numel() // 1000, f"{differ} outputs differ from Inductor's GEGLU"
    if out_dtype == torch.float16:
        return
    smooth = (torch.rand(width, device="cuda") + 0.5).half()
    qmax = 127.0 if out_dtype == torch.int8 else 448.0
    inv_scale = torch.tensor(qmax / (0.8 * float((exact * smooth.float()).abs().max())), device="cuda")
    got = geglu_act8.geglu_act8(h, smooth, inv_scale, out_dtype)
    ref = unfused(h, smooth, inv_scale, out_dtype)
    steps = (grid_index(got) - grid_index(ref)).abs()
    assert int(steps.max()) <= 1 and int((steps > 0).sum()) <= got.numel() // 1000, "against the unfused GEGLU"
