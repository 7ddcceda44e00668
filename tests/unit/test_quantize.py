"""ModelOpt PTQ of the tiny UNet by level, real 8-bit modules, calibration files and layer plans (CPU).

Calibration here is synthetic: 2 random batches at the tiny UNet's shapes, each counted as one denoising
step (variant.steps=2), run under inference_mode as the pipeline runs them.
"""

import copy
import dataclasses
import json
import re

import pytest
import torch
import torch.utils._python_dispatch
from safetensors.torch import load_file, save_file

from sdxl_core.errors import UserError
from sdxl_core.models import build_builtin
from sdxl_core.quant import qmodules, quantize
from sdxl_core.run import calibration_loop
from sdxl_core.variants import Variant
from tests.support.tiny import run, unet_inputs

LEVELS = [("int8", 1.0), ("int8", 2.0), ("int8", 2.5), ("int8", 3.0), ("fp8", 3.0), ("fp8", 4.0)]
REAL_CASES = [("int8", 1.0), ("int8", 3.0), ("fp8", 3.0), ("fp8", 4.0)]  # conversions cost seconds each
EXCLUDED = re.compile(r"time_emb_proj|time_embedding|add_embedding|conv_in|conv_out|conv_shortcut")

# Counted by hand from the tiny config (blocks: Down, CrossAttnDown, CrossAttnDown / mid / CrossAttnUp,
# CrossAttnUp, Up; 2 resnets per down block, 3 per up block; transformer depth 1, 2, 2 (mid 2)):
# conv: 2 per resnet x 17 resnets + 2 downsamplers + 2 upsamplers = 38 (conv_in, conv_out and the
#   10 conv_shortcuts excluded); transformer blocks: 2 + 4 (down) + 2 (mid) + 6 + 3 (up) = 17, each with
#   2 FFN linears, 6 Q/K/V projections, 2 to_out and 2 attention modules; 11 Transformer2DModels with
#   proj_in + proj_out: other linear = 34 + 22 = 56.
HAND_COUNTS = {"conv": 38, "ffn": 34, "qkv": 102, "other_linear": 56, "attention": 34}

# Per layer, a real module matches its ModelOpt module to float rounding (median ~1.6e-7): the weights are
# the same 8-bit values, the accumulation differs (exact int32 vs fp32), and a rare activation that sits on
# a rounding tie may round the other way (x * (1 / scale) vs ModelOpt's x * (127 / amax)), moving one output
# column by one step (~2e-4 relative). End to end they differ more: each quantized layer amplifies a
# relative difference d to about sqrt(d * step), so any ulp-level difference grows to about the quantization
# noise. The fake-quant model does the same to itself: scaling encoder_hidden_states by (1 + 1e-7) moves its
# int8 output by ~2-3 %. Measured real vs fake: ~0.03 (int8), ~0.05-0.08 (fp8); fake vs fp32: ~0.04-0.05
# (int8), ~0.10 (fp8).
PER_LAYER_MEDIAN_TOL, PER_LAYER_MAX_TOL = 1e-6, 2e-3
REAL_VS_FAKE_TOL = {"int8": 0.06, "fp8": 0.12}


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def tiny_unet():
    return build_builtin("tiny").unet


@pytest.fixture(scope="module")
def data():
    generator = torch.Generator().manual_seed(123)
    calib = [unet_inputs(generator, t) for t in (900, 400)]
    return {"calib": calib, "eval": unet_inputs(generator, 650)}


@pytest.fixture(scope="module")
def fp32_out(tiny_unet, data):
    return run(tiny_unet, data["eval"])


@pytest.fixture(scope="module")
def quantized(tiny_unet, data):
    """(precision, level) -> dict(unet=fake-quant UNet, variant, loop_calls), built once per module."""
    cache = {}

    def get(precision, level):
        if (precision, level) not in cache:
            variant = Variant(name="t", model="tiny", precision=precision, quant_level=level, steps=2)
            calls = []

            def forward_loop(model):
                calls.append(1)
                with torch.inference_mode():
                    for batch in data["calib"]:
                        model(**batch)

            unet = quantize.quantize_unet(copy.deepcopy(tiny_unet), variant, forward_loop, progress=False)
            cache[precision, level] = {"unet": unet, "variant": variant, "loop_calls": len(calls)}
        return cache[precision, level]

    return get


@pytest.fixture(scope="module")
def converted(quantized):
    cache = {}

    def get(precision, level):
        if (precision, level) not in cache:
            cache[precision, level] = qmodules.convert_to_real(quantized(precision, level)["unet"])
        return cache[precision, level]

    return get


def expected_layers(unet, level):
    """The level rules, applied independently of sdxl_core.quant.quantize."""
    from diffusers.models.attention_processor import Attention

    found = {c: [] for c in HAND_COUNTS}
    for name, module in unet.named_modules():
        if isinstance(module, Attention):
            category = "attention"
        elif EXCLUDED.search(name) or not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        elif isinstance(module, torch.nn.Conv2d):
            category = "conv"
        elif ".ff.net." in name:
            category = "ffn"
        elif re.search(r"\.to_[qkv]$", name):
            category = "qkv"
        else:
            category = "other_linear"
        min_level = {"conv": 1, "ffn": 2, "qkv": 2.5, "other_linear": 3, "attention": 4}[category]
        if level >= min_level:
            found[category].append(name)
    return found


def test_calibration_prompts_cycle_through_64_distinct_prompts():
    prompts = quantize.calibration_prompts(64)
    assert len(set(prompts)) == 64 and all(p and "\n" not in p for p in prompts)
    assert quantize.calibration_prompts(70)[64:] == prompts[:6]
    assert quantize.calibration_prompts(3) == prompts[:3]
    with pytest.raises(UserError):
        quantize.calibration_prompts(0)


def test_percentile_calibrator_takes_min_over_steps_of_the_mean_amax():
    calibrator = quantize.PercentileCalibrator(steps=2, percentile=1.0)
    for amax in (4.0, 1.0, 2.0, 3.0):  # step 0 sees 4 and 2, step 1 sees 1 and 3
        calibrator.collect(torch.tensor([-amax, 0.5]))
    assert calibrator.compute_amax().item() == pytest.approx(2.0)  # min(mean(4, 2), mean(1, 3))
    calibrator.percentile = 0.5  # only the first int(2 * 0.5) = 1 step counts
    assert calibrator.compute_amax().item() == pytest.approx(3.0)


def test_fp16_variant_has_no_quant_config():
    with pytest.raises(UserError, match="only int8 and fp8"):
        quantize.quant_config(Variant(name="t", precision="fp16"))


@pytest.mark.parametrize("precision,level", LEVELS)
def test_level_quantizes_exactly_the_expected_layers(quantized, tiny_unet, precision, level):
    result = quantized(precision, level)
    layers = quantize.quantized_layers(result["unet"])
    expected = expected_layers(tiny_unet, level)
    assert layers == expected
    assert {c: len(v) for c, v in layers.items()} == {
        c: (n if level >= lvl else 0) for (c, n), lvl in zip(HAND_COUNTS.items(), (1, 2, 2.5, 3, 4), strict=True)
    }
    assert result["loop_calls"] == 1  # mtq.quantize runs the forward loop exactly once
    for name in layers["attention"]:
        attention = result["unet"].get_submodule(name)
        assert attention.softmax_quantizer.amax is not None and not attention.bmm2_output_quantizer.is_enabled
    for name, module in result["unet"].named_modules():
        if EXCLUDED.search(name) and hasattr(module, "input_quantizer"):
            assert not module.input_quantizer.is_enabled and not module.weight_quantizer.is_enabled, name


def test_int8_linears_are_smoothed_and_convs_use_the_percentile_calibrator(quantized):
    unet = quantized("int8", 3.0)["unet"]
    ff = unet.down_blocks[1].attentions[0].transformer_blocks[0].ff.net[2]
    assert ff.input_quantizer.pre_quant_scale.shape == (256,) and ff.input_quantizer.amax.numel() == 1
    assert ff.weight_quantizer.amax.shape == (64, 1)  # per output channel
    conv = unet.down_blocks[0].resnets[0].conv1
    assert isinstance(conv.input_quantizer._calibrator, quantize.PercentileCalibrator)
    assert conv.weight_quantizer.amax.shape == (32, 1, 1, 1)


@pytest.mark.parametrize("precision,level", REAL_CASES)
def test_real_modules_match_fake_quant(quantized, converted, fp32_out, data, precision, level):
    fake = quantized(precision, level)["unet"]
    real, report = converted(precision, level)
    counts = {c: len(v) for c, v in quantize.quantized_layers(fake).items()}
    prefix = "Int8" if precision == "int8" else "Fp8"
    assert report.counts.get(f"{prefix}Conv2d", 0) == counts["conv"]
    assert report.counts.get(f"{prefix}Linear", 0) == counts["ffn"] + counts["qkv"] + counts["other_linear"]
    assert report.dropped_attention == counts["attention"]
    assert not any("modelopt" in type(m).__module__ for m in real.modules())

    # Each real module against its ModelOpt module, on the input the fake-quant UNet gave it.
    seen = {}
    real_modules = dict(real.named_modules())
    hooks = [
        m.register_forward_hook(lambda m, args, out, n=n: seen.__setitem__(n, (args[0], out)))
        for n, m in fake.named_modules()
        if isinstance(real_modules.get(n), qmodules.QuantizedModule)
    ]
    fake_out = run(fake, data["eval"])
    for hook in hooks:
        hook.remove()
    assert len(seen) == sum(report.counts.values())
    with torch.inference_mode():
        layer_errors = sorted(rel_err(real_modules[n](x), y) for n, (x, y) in seen.items())
    worst = layer_errors[-1]
    assert layer_errors[len(layer_errors) // 2] < PER_LAYER_MEDIAN_TOL and worst < PER_LAYER_MAX_TOL

    real_out = run(real, data["eval"])
    errors = {
        "fake_vs_fp32": rel_err(fake_out, fp32_out),
        "real_vs_fake": rel_err(real_out, fake_out),
        "real_vs_fp32": rel_err(real_out, fp32_out),
        "worst_layer": worst,
    }
    print(f"\n{precision} level {level:g}: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    assert errors["real_vs_fake"] < REAL_VS_FAKE_TOL[precision]
    assert errors["real_vs_fp32"] < 1.25 * errors["fake_vs_fp32"]  # as accurate as the fake-quant model


def engine_bytes(unet):
    return sum(t.numel() * t.element_size() for t in qmodules.real_state_dict(unet).values())


def test_int8_engine_is_at_most_55_percent_of_fp16(converted, tiny_unet):
    real16 = copy.deepcopy(converted("int8", 3.0)[0]).to(torch.float16)
    conv = real16.down_blocks[0].resnets[0].conv1
    assert conv.weight.dtype == torch.int8 and conv.w_scale.dtype == torch.float32
    assert conv.bias.dtype == torch.float16 and conv.w_dq.dtype == torch.float16
    assert copy.deepcopy(converted("fp8", 3.0)[0]).half().conv_in.weight.dtype == torch.float16
    assert copy.deepcopy(converted("fp8", 3.0)[0]).half().mid_block.resnets[0].conv1.weight.dtype == torch.float8_e4m3fn
    tiny_ratio = engine_bytes(real16) / sum(t.numel() * 2 for t in tiny_unet.state_dict().values())

    # The full SDXL UNet, on the meta device: the same 8-bit modules, planted by the level-3 rules.
    from diffusers import UNet2DConditionModel

    from sdxl_core.models import SDXL_UNET_CONFIG

    with torch.device("meta"):
        sdxl = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    fp16_bytes = sum(t.numel() * 2 for t in sdxl.state_dict().values())
    layers = {
        name: {
            "type": "Int8Linear" if category != "conv" else "Int8Conv2d",
            "smooth": category != "conv",
            "per_channel": True,
        }
        for category, names in expected_layers(sdxl, 3.0).items()
        for name in names
    }
    sdxl = qmodules.apply_layer_plan(sdxl, {"format": qmodules.PLAN_FORMAT, "layers": layers}).to(torch.float16)
    sdxl_ratio = engine_bytes(sdxl) / fp16_bytes
    print(f"\nint8 level 3 engine / fp16 engine: SDXL {sdxl_ratio:.1%}, tiny {tiny_ratio:.1%}")
    assert sdxl_ratio <= 0.55  # measured 50.9 % (level 2.5: 55.4 %)
    # The tiny UNet keeps 7.3 % of its fp16 bytes in excluded layers (time_emb_proj alone 3.8 %), and its
    # float32 per-channel scales add 1.4 %: measured 56.0 %.
    assert tiny_ratio <= 0.57


def test_one_by_one_conv_runs_as_a_gemm():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(24, 40, 1)
    x = torch.randn(2, 24, 5, 7)
    w_amax, a_amax = conv.weight.abs().amax(dim=(1, 2, 3)), x.abs().amax()
    for cls, qmax in ((qmodules.Int8Conv2d, 127.0), (qmodules.Fp8Conv2d, 448.0)):
        module = cls.from_float(conv, w_amax=w_amax, a_amax=a_amax)
        assert module.as_gemm and module.w_dq is None
        fmt = module.FMT
        w_fq = qmodules.fake_quantize(conv.weight, (w_amax / qmax).reshape(-1, 1, 1, 1), fmt)
        expected = torch.nn.functional.conv2d(qmodules.fake_quantize(x, a_amax / qmax, fmt), w_fq, conv.bias)
        assert rel_err(module(x), expected) < 1e-6
        module.set_gemm_path("16bit", torch.float32)  # what the GEMM dispatch picks where 8 bits lose:
        assert module.w_dq is not None and not module.runs_8bit_gemm  # 16-bit compute, the same 8-bit numerics
        assert rel_err(module(x), expected) < 1e-6
        module.set_gemm_path("8bit")
        module.to(memory_format=torch.channels_last)  # `compiled.channels_last`: the int8/fp8 weight keeps its dtype
        assert module.weight.dtype == qmodules.STORAGE[fmt]
        assert rel_err(module(x.contiguous(memory_format=torch.channels_last)), expected) < 1e-6


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_layer_plan_rebuilds_the_engine_bit_exactly(converted, data, tmp_path, precision):
    real, _ = converted(precision, 3.0)
    save_file(qmodules.real_state_dict(real), tmp_path / "unet.safetensors")
    (tmp_path / "plan.json").write_text(json.dumps(qmodules.layer_plan(real)))
    (tmp_path / "config.json").write_text(real.to_json_string())
    config = json.loads((tmp_path / "config.json").read_text())
    plan = json.loads((tmp_path / "plan.json").read_text())
    rebuilt = qmodules.load_real(config, plan, load_file(tmp_path / "unet.safetensors"))
    assert qmodules.module_counts(rebuilt) == qmodules.module_counts(real)
    expected = run(real, data["eval"])
    assert torch.equal(run(rebuilt, data["eval"]), expected)
    if precision == "int8":  # also without the meta device: a plain CPU UNet, loaded by copying
        from diffusers import UNet2DConditionModel

        plain = qmodules.apply_layer_plan(UNet2DConditionModel.from_config(config), plan)
        plain.load_state_dict(load_file(tmp_path / "unet.safetensors"), strict=True)
        assert torch.equal(run(plain.eval(), data["eval"]), expected)
    plan["layers"]["conv_in"] = {"type": "Int8Linear", "smooth": False, "per_channel": True}
    with pytest.raises(UserError, match="conv_in"):
        qmodules.load_real(config, plan, load_file(tmp_path / "unet.safetensors"))


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_layers_quantize_with_a_reciprocal_made_once_not_inside_each_call(converted, tmp_path, precision):
    """Taken inside the compiled producers, 1 / a_scale was computed for every element on Hopper: each layer keeps
    it as a float32 buffer, made when the engine loads and whenever the suite moves a_scale in place."""
    from sdxl_core.suite import references

    real, _ = converted(precision, 3.0)
    save_file(qmodules.real_state_dict(real), tmp_path / "unet.safetensors")
    assert not any(name.endswith("a_inv_scale") for name in load_file(tmp_path / "unet.safetensors"))  # not stored
    rebuilt = qmodules.load_real(
        json.loads(real.to_json_string()), qmodules.layer_plan(real), load_file(tmp_path / "unet.safetensors")
    ).half()
    layers = [m for m in rebuilt.modules() if isinstance(m, qmodules.QuantizedModule)]
    assert layers

    def inverses_match():
        return all(m.a_inv_scale.dtype == torch.float32 and torch.equal(m.a_inv_scale, 1.0 / m.a_scale) for m in layers)

    assert inverses_match()
    with references._scales(rebuilt, 0.01):  # another device's calibration, as the noise floor runs it
        assert not torch.equal(layers[0].a_scale, real.get_submodule(_name_of(rebuilt, layers[0])).a_scale)
        assert inverses_match()
    assert inverses_match()

    # What a compiled layer traces: a multiplication by the stored reciprocal, no division. The same layer without
    # it divides (so the check can see a division).
    layer = copy.deepcopy(next(m for m in layers if isinstance(m, qmodules.QLinear))).float()
    x = torch.randn(4, layer.in_features)
    for inverse, divides in ((layer.a_inv_scale, False), (None, True)):
        layer.a_inv_scale = inverse
        graphs = []

        def record(gm, example_inputs, graphs=graphs):
            graphs.append(gm)
            return gm.forward

        torch._dynamo.reset()
        with torch.inference_mode():
            torch.compile(layer, backend=record, dynamic=False)(x)
        ops = {str(node.target) for gm in graphs for node in gm.graph.nodes}
        assert any("div" in op or "reciprocal" in op for op in ops) == divides, ops  # truediv, div, reciprocal
    torch._dynamo.reset()


def _name_of(root: torch.nn.Module, module: torch.nn.Module) -> str:
    return next(name for name, m in root.named_modules() if m is module)


@pytest.mark.parametrize("precision,level", [("int8", 3.0), ("fp8", 4.0)])
def test_calibration_round_trip(quantized, tiny_unet, data, tmp_path, precision, level):
    fake = quantized(precision, level)["unet"]
    meta = {"variant": "t", "precision": precision, "level": level}
    path = tmp_path / "unet.calib.pt"
    quantize.save_calibration(fake, path, meta)
    restored = quantize.load_calibration(copy.deepcopy(tiny_unet), path, meta)
    assert quantize.quantized_layers(restored) == quantize.quantized_layers(fake)
    assert torch.equal(run(restored, data["eval"]), run(fake, data["eval"]))


def test_bad_calibration_files_raise_calibration_mismatch(quantized, tiny_unet, tmp_path):
    meta = {"variant": "t", "level": 2.5}
    good = tmp_path / "good.pt"
    quantize.save_calibration(quantized("int8", 2.5)["unet"], good, meta)
    data = good.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.pt").write_bytes(bytes(range(256)) * 64)
    torch.save({"something": "else"}, tmp_path / "foreign.pt")
    fresh = copy.deepcopy(tiny_unet)
    for name in ("truncated.pt", "garbage.pt", "foreign.pt", "missing.pt"):
        with pytest.raises(quantize.CalibrationMismatch):
            quantize.load_calibration(fresh, tmp_path / name, meta)
    with pytest.raises(quantize.CalibrationMismatch, match="level"):
        quantize.load_calibration(fresh, good, {**meta, "level": 3.0})
    assert issubclass(quantize.CalibrationMismatch, UserError)
    assert not any(hasattr(m, "input_quantizer") for m in fresh.modules())  # checked before touching the UNet


def prefer(wins: dict):
    """A stand-in for the GPU timer: at GEMM shapes where `wins[shape]` the 8-bit candidates time faster, at
    the others the 16-bit path; convs (only the 16-bit candidate without an 8-bit conv kernel) time 1 ms."""

    def timer(fn, candidate, shape):
        fn()  # every candidate must run at the recorded shape
        eight_bit = candidate != "16bit"
        return (1.0 if eight_bit else 2.0) if wins.get(shape, False) else (2.0 if eight_bit else 1.0)

    return timer


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_gemm_dispatch_follows_the_timings_and_survives_the_layer_plan(converted, tiny_unet, data, precision):
    from sdxl_core.quant import gemm_dispatch

    real, _ = converted(precision, 3.0)
    real = copy.deepcopy(real)
    expected = run(real, data["eval"])
    layers = [m for m in real.modules() if isinstance(m, qmodules.QuantizedModule)]
    seen = []
    timings = gemm_dispatch.choose(
        real, lambda: run(real, data["eval"]), timer=lambda fn, candidate, shape: seen.append((candidate, shape)) or 1.0
    )
    assert len(seen) == sum(len(t.ms) for t in timings) and len(set(seen)) == len(seen)
    assert sum(t.layers for t in timings) == len(layers)
    assert {t.op for t in timings} == {"gemm", "conv"}

    for layer in layers:
        layer.set_gemm_path("8bit", torch.float32)
    wins = {t.shape: i % 2 == 0 for i, t in enumerate(t for t in timings if t.op == "gemm")}
    timings = gemm_dispatch.choose(real, lambda: run(real, data["eval"]), timer=prefer(wins))
    for t in timings:
        assert (t.choice == "16bit") == (t.op == "conv" or not wins[t.shape])
    assert {m.gemm_path for m in layers} == {"8bit", "16bit"}
    assert all((m.w_dq is None) == m.runs_8bit_gemm for m in layers)

    # The 16-bit path computes the 8-bit path's quantized values in 16-bit arithmetic: the same layer output up to
    # float rounding (the per-layer test below measures <= 3.2e-7), far from the original float layer.
    originals = dict(tiny_unet.named_modules())
    for name, layer in [(n, m) for n, m in real.named_modules() if isinstance(m, qmodules.QLinear)][:12]:
        x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0))
        path = layer.gemm_path
        outs = {}
        for p in qmodules.GEMM_PATHS:
            layer.set_gemm_path(p, torch.float32)
            outs[p] = layer(x)
        layer.set_gemm_path(path, torch.float32)
        assert rel_err(outs["16bit"], outs["8bit"]) < 1e-6
        assert rel_err(outs["16bit"], originals[name](x)) > 1e-4

    plan = qmodules.layer_plan(real)
    assert {spec["gemm"] for spec in plan["layers"].values()} == {"8bit", "16bit"}
    rebuilt = qmodules.load_real(
        json.loads(real.to_json_string()), json.loads(json.dumps(plan)), qmodules.real_state_dict(real)
    )
    assert [(m.gemm_path, m.kernel) for m in rebuilt.modules() if isinstance(m, qmodules.QuantizedModule)] == [
        (m.gemm_path, m.kernel) for m in real.modules() if isinstance(m, qmodules.QuantizedModule)
    ]
    assert torch.equal(run(rebuilt, data["eval"]), run(real, data["eval"]))
    for layer in layers:
        layer.set_gemm_path("8bit", torch.float32)
    assert torch.equal(run(real, data["eval"]), expected)  # all 8-bit again: exactly the converted UNet
    name = next(iter(plan["layers"]))
    plan["layers"][name]["gemm"] = "4bit"
    with pytest.raises(UserError, match="GEMM path '4bit'"):
        qmodules.load_real(json.loads(real.to_json_string()), plan, qmodules.real_state_dict(real))


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_a_path_choice_moves_each_layer_by_float_rounding_only(converted, data, precision):
    """The dispatch picks each shape's path by timing, so two builds of the same code may differ where timings are
    close; the numbers must not. Every quantized layer, on the input it gets in a UNet step, on the 16-bit path
    against the 8-bit path: measured relative difference <= 3.2e-7 (float32); an input left unquantized on the
    16-bit path moves the worst layer by 0.40 (INT8) and 0.08 (FP8). Checked per layer because the 8-bit UNet
    is chaotic on tiny: a 1e-6 relative change of one cross-attention projection's output moves the UNet's output
    by 2.4 %."""
    from sdxl_core.quant import gemm_dispatch

    real, _ = converted(precision, 3.0)
    real = copy.deepcopy(real)
    layers = [m for m in real.modules() if isinstance(m, qmodules.QuantizedModule)]
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda m, args: inputs.setdefault(m, args[0])) for m in layers]
    run(real, data["eval"])
    for hook in hooks:
        hook.remove()
    assert len(inputs) == len(layers)
    worst = 0.0
    with torch.inference_mode():
        for layer, x in inputs.items():
            layer.set_gemm_path("8bit", torch.float32)
            eight_bit = layer(x)
            layer.set_gemm_path(gemm_dispatch.SIXTEEN_BIT, torch.float32)
            worst = max(worst, rel_err(layer(x), eight_bit))
    assert worst < 2e-6


def test_dispatch_never_chooses_a_kernel_that_computes_wrong(converted, data, monkeypatch):
    from sdxl_core.quant import gemm_dispatch

    real = copy.deepcopy(converted("int8", 3.0)[0])
    right = gemm_dispatch.candidates

    def wrong_8bit(layer, op, shape, dtype, **layout):
        calls, x = right(layer, op, shape, dtype, **layout)
        for name, correct in list(calls.items()):
            if name != "16bit":  # kernels with a broken epilogue, and the fastest
                calls[name] = lambda correct=correct: correct() * 1.5
        return calls, x

    monkeypatch.setattr(gemm_dispatch, "candidates", wrong_8bit)
    timings = gemm_dispatch.choose(
        real, lambda: run(real, data["eval"]), timer=lambda fn, candidate, shape: 1.0 if candidate == "16bit" else 0.1
    )
    gemms = [t for t in timings if t.op == "gemm"]
    assert gemms and all(t.choice == "16bit" and "pointer" in t.rejected and t.ms == {"16bit": 1.0} for t in gemms)
    assert all(m.gemm_path == "16bit" for m in real.modules() if isinstance(m, qmodules.QLinear))


# ---------------------------------------------------------------------------------------------------------------
# Calibration without host syncs: the same scales as ModelOpt's own max calibrator, bit for bit.


class HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts reads of a tensor's value back to Python (`.item()`, `bool(tensor)`): on a GPU each one waits
    for every kernel queued before it."""

    def __init__(self):
        super().__init__()
        self.count = 0

    READS = (
        torch.ops.aten._local_scalar_dense.default,
        torch.ops.aten.is_nonzero.default,
        torch.ops.aten.item.default,
    )  # under inference_mode `bool(t)` reaches dispatch as is_nonzero

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in self.READS
        return func(*args, **(kwargs or {}))


def calibrate_through_the_pipeline(components, variant, monkeypatch, max_calibrator, product=False):
    """Calibrate tiny's UNet with the real calibration loop and the given max calibrator class: ModelOpt's own way
    (its quantizers collect inside each UNet call), or the product's (`quantize_unet`: the calls are recorded, then
    replayed into the quantizers). Returns the UNet and, per UNet call, (host reads, reductions of a weight
    parameter) made inside the call."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization import utils as quant_utils

    from sdxl_core import engines

    monkeypatch.setattr(quantize, "SyncFreeMaxCalibrator", max_calibrator)
    calls, inside = [], []
    reduce_amax, stage = quant_utils.reduce_amax, engines.unet_stage

    def counting_reduce_amax(x, *args, **kwargs):
        if inside and isinstance(x, torch.nn.Parameter):
            inside[-1] += 1
        return reduce_amax(x, *args, **kwargs)

    def counting_stage(unet):
        step = stage(unet)

        def counted(*inputs):
            inside.append(0)
            with HostReads() as reads:
                out = step(*inputs)
            calls.append((reads.count, inside.pop()))
            return out

        return counted

    monkeypatch.setattr(quant_utils, "reduce_amax", counting_reduce_amax)
    monkeypatch.setattr(engines, "unet_stage", counting_stage)
    unet = copy.deepcopy(components.unet)
    loop_components = dataclasses.replace(components, unet=unet)
    loop = calibration_loop(loop_components, variant, torch.device("cpu"), torch.float32, False)
    if product:
        quantize.quantize_unet(unet, variant, loop, progress=False)
    else:
        quantize._skip_modelopt_cuda_extension()
        if variant.quant_level == 4.0:
            quantize._use_bmm_attention(unet)
        with quantize._modelopt_quiet(verbose=False):
            mtq.quantize(unet, quantize.quant_config(variant), loop)
    monkeypatch.undo()
    return unet, calls


@pytest.mark.parametrize("precision,level", [("int8", 3.0), ("fp8", 4.0)])
def test_sync_free_calibration_gives_modelopts_scales_bit_for_bit(precision, level, monkeypatch):
    """The real calibration loop on tiny (2 batches of 2 prompts x 3 steps): INT8 level 3 (SmoothQuant, per-channel
    weights, percentile conv inputs) and FP8 level 4 (max everywhere, attention quantizers too). Every quantizer
    buffer (amax, SmoothQuant's pre_quant_scale) and every weight SmoothQuant rescaled equals ModelOpt's own
    max calibrator's result exactly. The product's calibration (recorded, then replayed) reads nothing back to the
    host and reduces no weight inside a UNet call, where ModelOpt's calibrator syncs 3 times per quantizer."""
    from modelopt.torch.quantization.calib.max import MaxCalibrator

    variant = Variant(
        name="t", model="tiny", precision=precision, quant_level=level, steps=3, calibration_size=4, height=64, width=64
    )
    components = build_builtin("tiny")
    slow, slow_calls = calibrate_through_the_pipeline(components, variant, monkeypatch, MaxCalibrator)
    fast, _ = calibrate_through_the_pipeline(components, variant, monkeypatch, quantize.SyncFreeMaxCalibrator)
    _, fast_calls = calibrate_through_the_pipeline(
        components, variant, monkeypatch, quantize.SyncFreeMaxCalibrator, product=True
    )
    slow_state, fast_state = slow.state_dict(), fast.state_dict()
    assert slow_state.keys() == fast_state.keys()
    differing = [k for k in slow_state if not torch.equal(slow_state[k], fast_state[k])]
    assert not differing, differing[:5]
    amaxes = [k for k in fast_state if k.endswith("_quantizer._amax")]
    assert len(amaxes) > 100 and all(fast_state[k].isfinite().all() for k in amaxes)
    if precision == "int8":
        scales = [k for k in fast_state if k.endswith("input_quantizer._pre_quant_scale")]
        assert len(scales) == HAND_COUNTS["ffn"] + HAND_COUNTS["qkv"] + HAND_COUNTS["other_linear"]
        smoothed = [
            (n, m)
            for n, m in fast.named_modules()
            if hasattr(m, "input_quantizer") and getattr(m.input_quantizer, "_amax_for_smoothing", None) is not None
        ]
        assert len(smoothed) == len(scales)
        for name, module in smoothed:
            assert torch.equal(
                module.input_quantizer._amax_for_smoothing, slow.get_submodule(name).input_quantizer._amax_for_smoothing
            ), name
    assert len(fast_calls) == len(slow_calls) == 2 * variant.steps
    print(f"\nper UNet call, (host reads, weight reductions): ModelOpt's {slow_calls[0]}, recorded {fast_calls[0]}")
    max_quantizers = [
        m
        for m in slow.modules()
        if isinstance(getattr(m, "_calibrator", None), MaxCalibrator)
        and not isinstance(m._calibrator, quantize.PercentileCalibrator)
        and m.is_enabled
    ]
    assert all(reads >= 3 * len(max_quantizers) for reads, _ in slow_calls)  # ModelOpt's asserts: 3 per quantizer
    assert all(reduced > 0 for _, reduced in slow_calls)
    assert fast_calls == [(0, 0)] * len(fast_calls)
