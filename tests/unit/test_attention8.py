"""Attentions whose kernel quantizes their output for the 8-bit output projection (`quant.attention`,
`kernels.attention8`).

CPU: the Triton kernel in the Triton interpreter against float64 attention and torch's quantization, the fused
processor against diffusers' own on calibrated tiny UNets (projections fused and not, cross-attention K/V reused),
the build-time choice, and the layer plan that carries it. GPU: the kernel on SDXL's four attention shapes (its speed
is measured by the engine build's dispatch, per shape).
"""

import pytest
import torch

from sdxl_core.engines import cross_kv
from sdxl_core.errors import UserError
from sdxl_core.models import build_builtin
from sdxl_core.quant import attention, qmodules
from sdxl_core.quant import plan as plan_schema
from sdxl_core.quant.kernels import attention8, ops
from sdxl_core.quant.kernels.fp8_gemm import FP8_DTYPE
from tests.support.hardware import needs_hopper
from tests.support.tiny import (
    converted_copies,
    grid_index,
    load_saved,
    run,
    run_in_interpreter,
    timer_preferring,
    unet_inputs,
)

TINY_ATTENTIONS = 34  # 17 transformer blocks in tiny, a self- and a cross-attention each


@pytest.fixture(scope="module")
def data():
    generator = torch.Generator().manual_seed(11)
    return {"calib": [unet_inputs(generator, t) for t in (900, 400)], "eval": unet_inputs(generator, 650)}


@pytest.fixture(scope="module")
def converted(data):
    """(precision, fused projections) -> a calibrated, converted tiny UNet at level 3 (every attention's output
    projection 8-bit)."""
    return converted_copies(data["calib"], fused_qkv=False)


def fuse_all(unet) -> int:
    attentions = [m for m in unet.modules() if attention.fusable(m)]
    for attn in attentions:
        attention.fuse(attn)
    return len(attentions)


@pytest.mark.slow
def test_attention8_kernel_in_interpreter():
    proc = run_in_interpreter("attention_interp_check.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK 35 cases" in proc.stdout


@pytest.mark.parametrize("precision", ["int8", "fp8"])
@pytest.mark.parametrize("fused_qkv", [False, True], ids=["projections", "fused-projections"])
def test_fused_attention_computes_what_diffusers_processor_does(converted, data, precision, fused_qkv):
    """On the CPU the op computes the unfused engine's arithmetic (torch's SDPA, then `to_out`'s quantization) in
    float32, so the processor alone decides whether the UNet's output moves: a Q, K or V taken from the wrong slice
    of a fused projection, or heads split the wrong way, would move it."""
    unet = converted(precision, fused_qkv)
    expected = run(unet, data["eval"])
    assert fuse_all(unet) == TINY_ATTENTIONS
    assert len(attention.fused_attentions(unet)) == TINY_ATTENTIONS
    assert torch.equal(run(unet, data["eval"]), expected)


@pytest.mark.slow
def test_a_fused_unet_traces_as_one_graph_and_matches_eager(converted, data):
    """The op is opaque to torch.compile (a custom op with a fake implementation), so the fused processors cost no
    graph break: everything around them still fuses on the GPU."""
    unet = converted("int8", True)
    fuse_all(unet)
    with torch.inference_mode():
        eager = unet(**data["eval"]).sample
        explanation = torch._dynamo.explain(unet)(**data["eval"])
        assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons[:3]
        torch._dynamo.reset()
        graph = torch.compile(unet, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(graph(**data["eval"]).sample, eager, rtol=1e-5, atol=1e-5)
        torch._dynamo.reset()


def test_fused_attention_reads_reused_cross_attention_keys_and_values(converted, data):
    unet = converted("int8", True)
    expected = run(unet, data["eval"])
    fuse_all(unet)
    kv = cross_kv.CrossKV(unet)
    kv.fill(data["eval"]["encoder_hidden_states"])
    assert torch.equal(run(unet, data["eval"]), expected)


def test_an_attention_whose_projection_runs_16_bits_gets_the_16_bit_output(converted, data):
    unet = converted("int8")
    attentions = [m for m in unet.modules() if attention.fusable(m)]
    for attn in attentions:
        attn.to_out[0].set_gemm_path("16bit", torch.float32)
        assert not attention.quantizes(attn.to_out[0])
    expected = run(unet, data["eval"])
    for attn in attentions:
        attention.fuse(attn)
    assert torch.equal(run(unet, data["eval"]), expected)


def test_an_attention_that_rescales_its_output_is_not_fusable(converted):
    attn = next(m for m in converted("int8").modules() if attention.fusable(m))
    attn.rescale_output_factor = 2.0
    assert not attention.fusable(attn)
    with pytest.raises(ValueError, match="cannot run on the attention kernel"):
        attention.fuse(attn)


@pytest.mark.parametrize("fused_qkv", [False, True], ids=["projections", "fused-projections"])
def test_a_16_bit_unet_fused_computes_what_diffusers_processor_does(data, fused_qkv):
    unet = build_builtin("tiny").unet.eval()
    if fused_qkv:
        qmodules.fuse_qkv(unet)
    expected = run(unet, data["eval"])
    assert fuse_all(unet) == TINY_ATTENTIONS
    assert torch.equal(run(unet, data["eval"]), expected)


@pytest.mark.parametrize("fused_wins", [True, False])
def test_a_16_bit_unet_fuses_where_the_kernel_beats_sdpa_and_the_plan_keeps_it(data, fused_wins, tmp_path):
    """What the FP16 engines get, so that the speed gates compare like for like."""
    unet = build_builtin("tiny").unet.eval()
    qmodules.fuse_qkv(unet)
    expected = run(unet, data["eval"])
    timer = timer_preferring(fused_wins, attention.KERNEL_16BIT)
    rows = attention.choose(unet, lambda: run(unet, data["eval"]), timer=timer, max_error=2e-2)
    assert sum(r["layers"] for r in rows) == TINY_ATTENTIONS
    for row in rows:
        assert row["fmt"] == attention.SIXTEEN_BIT
        assert set(row["ms"]) == {attention.SDPA, attention.KERNEL_16BIT}
        assert row["choice"] == (attention.KERNEL if fused_wins else attention.UNFUSED)
    plan = qmodules.layer_plan(unet)
    assert ("attention" in plan) == fused_wins
    if fused_wins:
        qmodules.save(unet, tmp_path)
        loaded = load_saved(tmp_path)
        assert attention.fused_attentions(loaded) == plan["attention"]
        assert torch.equal(run(loaded, data["eval"]), expected)


@pytest.mark.parametrize("fused_wins", [True, False])
def test_choose_fuses_where_the_kernel_is_faster_and_the_plan_keeps_it(converted, data, fused_wins, tmp_path):
    unet = converted("int8", True)
    expected = run(unet, data["eval"])
    rows = attention.choose(
        unet, lambda: run(unet, data["eval"]), timer=timer_preferring(fused_wins, attention.KERNEL), max_error=2e-2
    )
    # tiny's attentions: self-attention at two token counts, cross-attention at the same two
    assert sum(r["layers"] for r in rows) == TINY_ATTENTIONS
    assert {r["op"] for r in rows} == {"attention"}
    assert {tuple(r["shape"][-1:]) for r in rows} == {(0,), (1,)}
    for row in rows:
        assert set(row["ms"]) == {attention.UNFUSED, attention.SDPA, attention.KERNEL, attention.KERNEL_16BIT}
        assert row["choice"] == (attention.KERNEL if fused_wins else attention.UNFUSED)
    plan = qmodules.layer_plan(unet)
    if not fused_wins:
        assert "attention" not in plan  # plans of engines without fused attentions stay as they were
        return
    assert len(plan["attention"]) == TINY_ATTENTIONS
    plan_schema.check_layer_plan(plan, "cpu")
    qmodules.save(unet, tmp_path)
    loaded = load_saved(tmp_path)
    assert attention.fused_attentions(loaded) == plan["attention"]
    assert torch.equal(run(loaded, data["eval"]), expected)


def test_choose_rejects_a_kernel_whose_output_is_wrong(converted, data, monkeypatch):
    unet = converted("fp8")
    right = ops.attention8

    def wrong(q, k, v, smooth, inv_scale, out_dtype):
        return right(q, v, k, smooth, inv_scale, out_dtype)  # keys and values swapped

    monkeypatch.setattr(ops, "attention8", wrong)
    rows = attention.choose(
        unet, lambda: run(unet, data["eval"]), timer=timer_preferring(True, attention.KERNEL), max_error=2e-2
    )
    assert rows and all(r["choice"] == attention.UNFUSED and attention.KERNEL in r["rejected"] for r in rows)
    assert not attention.fused_attentions(unet)


def test_the_dispatch_filter_can_leave_the_kernel_out(converted, data):
    unet = converted("int8")
    rows = attention.choose(
        unet,
        lambda: run(unet, data["eval"]),
        timer=timer_preferring(True, attention.KERNEL),
        max_error=2e-2,
        allowed=lambda k: False,
    )
    assert rows == [] and not attention.fused_attentions(unet)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"down_blocks.1.attentions.0.transformer_blocks.0.attn1": "flash"}, "does not have"),
        ({"not a name": attention.KERNEL}, "not a module name"),
        (["down_blocks.1.attentions.0.transformer_blocks.0.attn1"], "not an object"),
    ],
)
def test_a_plan_with_a_foreign_attention_entry_is_refused(converted, entry, message):
    plan = qmodules.layer_plan(converted("int8"))
    plan["attention"] = entry
    with pytest.raises(UserError, match=message):
        plan_schema.check_layer_plan(plan)


@pytest.mark.parametrize("name", ["down_blocks.1.attentions.0.proj_in", "down_blocks.1.attentions.0.nothing_here"])
def test_a_plan_that_fuses_something_else_than_an_attention_is_refused(converted, name):
    from diffusers import UNet2DConditionModel

    unet = converted("int8")
    plan = qmodules.layer_plan(unet)
    plan["attention"] = {name: attention.KERNEL}
    with torch.device("meta"):
        plain = UNet2DConditionModel.from_config(unet.config)
    with pytest.raises(UserError, match="rebuild the engine"):
        qmodules.apply_layer_plan(plain, plan)


def test_the_op_refuses_what_the_kernel_cannot_write():
    q = k = v = torch.randn(1, 4, 2, 16).half()
    with pytest.raises(ValueError, match="activation dtype"):
        attention8.attention8(q, k, v, None, None, torch.float32)
    with pytest.raises(ValueError, match="inverse input scale"):
        attention8.attention8(q, k, v, None, None, torch.int8)


def test_supports_takes_the_layouts_the_processors_make_and_nothing_else():
    q, k, v = attention.operands((2, 5, 77, 2, 64, 1), torch.float16, "cpu")
    assert attention8.supports(q, k, v)
    assert attention8.supports(*attention.operands((2, 5, 5, 2, 64, 0), torch.float16, "cpu"))
    assert not attention8.supports(q.float(), k.float(), v.float())  # the kernel computes on 16-bit operands
    assert not attention8.supports(*attention.operands((2, 5, 77, 2, 48, 1), torch.float16, "cpu"))
    assert not attention8.supports(q.transpose(2, 3), k, v)  # D not contiguous


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_the_kernels_command_times_an_attention_as_the_build_does(fmt):
    from sdxl_core.commands import kernels
    from sdxl_core.reports.measurements import render_kernels

    timed = []

    def timer(fn, candidate, shape):
        fn()
        timed.append(candidate)
        return {attention.SDPA: 2.0, attention.UNFUSED: 3.0}.get(candidate, 1.5)

    row = kernels.measure_attention(fmt, (2, 8, 5, 2, 16, 1), 60, torch.device("cpu"), timer)
    assert sorted(timed) == sorted([attention.SDPA, attention.UNFUSED, attention.KERNEL, attention.KERNEL_16BIT])
    assert row["speedup"] == {
        attention.SDPA: 1.0,
        attention.UNFUSED: 0.667,
        attention.KERNEL: 1.333,
        attention.KERNEL_16BIT: 1.333,
    }
    assert row["tflops"][attention.SDPA] == round(4 * 2 * 2 * 8 * 5 * 16 / 2.0 / 1e9, 1)
    row["rejected"] = {"x": "relative error 1.00e+00"}  # how an attention row says why
    assert "| attention |" in render_kernels({"rows": [row]}) and "relative error" in render_kernels({"rows": [row]})


# SDXL's attentions at 1024x1024 with classifier-free guidance: self-attention at 4096 and 1024 tokens, and
# cross-attention to the 77 prompt tokens at both.
SDXL_SHAPES = [
    (2, 4096, 4096, 10, 64, 0),
    (2, 1024, 1024, 20, 64, 0),
    (2, 4096, 77, 10, 64, 1),
    (2, 1024, 77, 20, 64, 1),
]


def test_grid_index_counts_neighbouring_8_bit_values_one_apart():
    fp8 = torch.tensor([-448.0, -0.0, 0.0, 2.0**-9, 0.25, 448.0]).to(FP8_DTYPE)
    assert grid_index(fp8).tolist() == [0, 126, 126, 127, 166, 252]  # 7 subnormals, then 8 values per power of 2
    assert grid_index(torch.tensor([-128, 0, 127], dtype=torch.int8)).tolist() == [-128, 0, 127]


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("out_dtype", [torch.int8, FP8_DTYPE], ids=["int8", "fp8"])
@pytest.mark.parametrize("shape", SDXL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attention8_on_sdxl_shapes(shape, out_dtype, monkeypatch):
    torch.manual_seed(0)
    q, k, v = attention.operands(shape, torch.float16, "cuda")
    smooth = (torch.rand(shape[3] * shape[4], device="cuda") + 0.5).half()
    o16 = attention8.attention8(q, k, v, None, None, torch.float16)
    exact = attention8.attention_reference(q.float(), k.float(), v.float(), None, None, torch.float32)
    err = float((o16.float() - exact).abs().max() / exact.abs().max())
    assert err < 4e-3, f"relative error {err:.2e}"
    qmax = 127.0 if out_dtype == torch.int8 else 448.0
    inv_scale = torch.tensor(qmax / (0.8 * float(exact.abs().max())), device="cuda")
    got = attention8.attention8(q, k, v, smooth, inv_scale, out_dtype)
    # On one tile config the 8-bit output is the 16-bit one quantized but for that rounding: within one 8-bit step.
    # The autotuned calls may pick different tiles (the 8-bit and 16-bit outputs tune apart), and P is rounded to
    # fp16 per key block, so their outputs differ at fp16 level, which near zero spans many e4m3 steps (14 on Hopper).
    monkeypatch.setattr(attention8, "_QUICK", True)
    one16 = attention8.attention8(q, k, v, None, None, torch.float16)
    one8 = attention8.attention8(q, k, v, smooth, inv_scale, out_dtype)
    steps = (grid_index(one8) - grid_index(attention8.quantize_output(one16, smooth, inv_scale, out_dtype))).abs()
    assert int(steps.max()) <= 1 and int((steps > 0).sum()) <= got.numel() // 100
    ref = attention8.attention_reference(q, k, v, smooth, inv_scale, out_dtype)
    rel = float((got.float() - ref.float()).norm() / ref.float().norm())
    assert rel < 2e-2, f"against the unfused pair: relative error {rel:.2e}"
