"""One set of calibration passes for every 8-bit format (CPU, tiny): a recorded-then-replayed calibration gives
ModelOpt's own scales, and an FP8 build after an INT8 one runs no forward pass at all."""

import copy
import dataclasses

import pytest
import torch

from sdxl_core.models import build_builtin
from sdxl_core.quant import activation_record, quantize
from sdxl_core.run import calibration_loop
from sdxl_core.variants import VARIANTS, Variant
from tests.unit.test_engine_reuse import prepare

CPU = torch.device("cpu")
# ModelOpt's FP8 level 4 calibrates through the bmm attention path; the record follows the UNet's own attention
# (scaled_dot_product_attention). In float32 on the CPU the two round differently by ~1e-7 per attention, and
# the scales of later calls drift by up to 5.0e-6 (relative, measured): 20x that is the limit.
FP8_LEVEL4_DRIFT = 1e-4


@pytest.fixture(scope="module")
def components():
    return build_builtin("tiny")


def small(precision, level, percentile=1.0):
    return Variant(
        name="t",
        model="tiny",
        precision=precision,
        quant_level=level,
        quant_percentile=percentile,
        steps=3,
        calibration_size=4,
        height=64,
        width=64,
    )


def modelopt_calibration(components, variant):
    """ModelOpt's own calibration: its quantizers collect during the real calibration loop (the demo's way; the
    bmm attention processor at level 4, whose softmax output ModelOpt quantizes)."""
    import modelopt.torch.quantization as mtq

    unet = copy.deepcopy(components.unet)
    quantize._skip_modelopt_cuda_extension()
    if variant.quant_level == 4.0:
        quantize._use_bmm_attention(unet)
    loop = calibration_loop(dataclasses.replace(components, unet=unet), variant, CPU, torch.float32, False)
    with quantize._modelopt_quiet(verbose=False):
        return mtq.quantize(unet, quantize.quant_config(variant), loop)


def replayed_calibration(components, variant, record=None):
    unet = copy.deepcopy(components.unet)
    loop = calibration_loop(dataclasses.replace(components, unet=unet), variant, CPU, torch.float32, False)
    return quantize.quantize_unet(unet, variant, loop, progress=False, record=record)


def relative_differences(a: torch.nn.Module, b: torch.nn.Module) -> dict[str, float]:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    out = {}
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        if not torch.equal(sa[key], sb[key]):
            scale = sa[key].double().abs().max().clamp_min(1e-30)
            out[key] = ((sa[key].double() - sb[key].double()).abs().max() / scale).item()
    return out


@pytest.mark.parametrize("precision,level,percentile", [("int8", 3.0, 1.0), ("int8", 2.5, 0.6), ("fp8", 3.0, 1.0)])
def test_replayed_record_gives_modelopts_own_calibration_bit_for_bit(components, precision, level, percentile):
    """Every quantizer buffer (amax, SmoothQuant's scales) and every smoothed weight, through the real calibration
    loop (2 batches x 3 steps: the percentile calibrator's per-step averages are in play; at percentile 0.6 only
    the first step's, so the calls must arrive in their order)."""
    variant = small(precision, level, percentile)
    direct, replayed = modelopt_calibration(components, variant), replayed_calibration(components, variant)
    assert relative_differences(direct, replayed) == {}
    amaxes = [k for k, v in replayed.state_dict().items() if k.endswith("_quantizer._amax")]
    assert len(amaxes) > 100


def test_fp8_level4_differs_from_modelopts_bmm_calibration_by_attention_rounding_only(components):
    variant = small("fp8", 4.0)
    direct, replayed = modelopt_calibration(components, variant), replayed_calibration(components, variant)
    drift = relative_differences(direct, replayed)
    print(f"\nFP8 level 4: {len(drift)} buffers differ, at most {max(drift.values(), default=0):.2e} relative")
    assert max(drift.values(), default=0.0) <= FP8_LEVEL4_DRIFT, sorted(drift.items(), key=lambda kv: -kv[1])[:3]
    softmax = [k for k in replayed.state_dict() if k.endswith("softmax_quantizer._amax")]
    assert len(softmax) == 34  # every attention module of tiny got its softmax statistic


def test_attention_statistics_equal_modelopts_bmm_quantizers_on_the_same_inputs(components):
    """One attention module, one input: what ModelOpt's level-4 quantizers collect through the bmm path and what
    the record takes from the scaled_dot_product_attention call are the same numbers, bit for bit."""
    import modelopt.torch.quantization as mtq

    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"  # cross-attention: Q and K/V differ in length
    attn = components.unet.get_submodule(name)
    generator = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, 64, attn.to_q.in_features, generator=generator)
    context = torch.randn(2, 77, attn.to_k.in_features, generator=generator) * 3
    variant = small("fp8", 4.0)

    def run(module):
        return lambda m: m(hidden, encoder_hidden_states=context)

    direct = copy.deepcopy(components.unet.get_submodule(name))
    quantize._skip_modelopt_cuda_extension()
    from diffusers.models.attention_processor import AttnProcessor

    direct.set_processor(AttnProcessor())
    config = quantize.quant_config(variant)
    with quantize._modelopt_quiet(verbose=False):
        mtq.quantize(direct, config, run(direct))
    recorded = copy.deepcopy(components.unet.get_submodule(name))
    record = activation_record.record(recorded, run(recorded), attention=True)
    assert set(record.attention[""]) == set(activation_record.ATTENTION_STATS)
    for stat, quantizer in activation_record.ATTENTION_QUANTIZERS.items():
        assert torch.equal(getattr(direct, quantizer).amax, record.attention[""][stat].to(torch.float32)), stat


def test_one_record_serves_int8_and_fp8_and_each_gets_its_own_calibration(components):
    """Recorded once and replayed for INT8 and for FP8, each equals the calibration recorded for it alone."""
    int8, fp8 = small("int8", 3.0), small("fp8", 3.0)
    assert int8.calibration_knobs() == fp8.calibration_knobs()
    unet = copy.deepcopy(components.unet)
    loop = calibration_loop(dataclasses.replace(components, unet=unet), int8, CPU, torch.float32, False)
    record = activation_record.record(unet, loop, attention=False)
    assert record.attention == {}  # no format here quantizes attention: no bmm attention computed on the side
    for variant in (int8, fp8):
        shared = replayed_calibration(components, variant, record=record)
        alone = replayed_calibration(components, variant)
        assert relative_differences(alone, shared) == {}


def test_replaying_a_record_of_another_unet_layout_is_refused(components):
    """A record from the unfused UNet has nothing for a fused to_qkv layer: refused, never half-calibrated."""
    from sdxl_core.quant import qmodules

    variant = small("int8", 3.0)
    unet = copy.deepcopy(components.unet)
    loop = calibration_loop(dataclasses.replace(components, unet=unet), variant, CPU, torch.float32, False)
    record = activation_record.record(unet, loop, attention=False)
    fused = qmodules.fuse_qkv(copy.deepcopy(components.unet))
    with pytest.raises(activation_record.RecordMismatch, match="nothing for 34 layers"):  # 17 to_qkv, 17 to_kv
        activation_record.check_fits(record, fused, attention=False)
    with pytest.raises(activation_record.RecordMismatch, match="nothing for"):
        quantize.quantize_unet(fused, variant.replace(fused_qkv=True), progress=False, record=record)
    activation_record.check_fits(record, copy.deepcopy(components.unet), attention=False)
    with pytest.raises(activation_record.RecordMismatch, match="nothing for 34 layers"):  # no attention statistics
        activation_record.check_fits(record, copy.deepcopy(components.unet), attention=True)


# ---------------------------------------------------------------------------------------------------------------
# Through the torch backend: the record is kept in the ONNX dir, beside the calibrations.

INT8 = VARIANTS["xl-1.0-int8"].replace(model="tiny", height=64, width=64, steps=3, calibration_size=2)
FP8 = VARIANTS["xl-1.0-fp8"].replace(model="tiny", height=64, width=64, steps=3, calibration_size=2)


def test_an_fp8_build_after_an_int8_build_replays_its_record(tmp_path, monkeypatch):
    onnx_dir = tmp_path / "onnx"
    _, int8 = prepare(INT8, tmp_path / "engines", onnx_dir)
    assert int8.info.calibration == "calibrated"
    assert len(list((onnx_dir / "activation-records").glob("*.pt"))) == 1

    monkeypatch.setattr(activation_record, "record", lambda *a, **k: pytest.fail("ran the calibration passes again"))
    _, fp8 = prepare(FP8, tmp_path / "engines", onnx_dir)
    assert fp8.info.calibration == "shared"
    monkeypatch.undo()

    # The same FP8 engine as one calibrated on its own
    _, alone = prepare(FP8, tmp_path / "engines-alone", tmp_path / "onnx-alone")
    assert alone.info.calibration == "calibrated"
    shared_file = next((tmp_path / "engines").glob("unetxl-fp8*/unet.safetensors"))
    alone_file = next((tmp_path / "engines-alone").glob("unetxl-fp8*/unet.safetensors"))
    assert shared_file.read_bytes() == alone_file.read_bytes()


def test_a_record_made_for_other_knobs_or_torn_is_recorded_again(tmp_path, capfd):
    onnx_dir = tmp_path / "onnx"
    prepare(INT8, tmp_path / "e1", onnx_dir)
    (record_file,) = (onnx_dir / "activation-records").glob("*.pt")
    record_file.write_bytes(record_file.read_bytes()[:1000])
    _, fp8 = prepare(FP8, tmp_path / "e2", onnx_dir)
    assert fp8.info.calibration == "calibrated"
    assert "unreadable" in capfd.readouterr().err
    # Another step count is another set of passes: its own record, the first one untouched
    _, other = prepare(FP8.replace(steps=2), tmp_path / "e3", onnx_dir)
    assert other.info.calibration == "calibrated"
    assert len(list((onnx_dir / "activation-records").glob("*.pt"))) == 2


def test_a_record_that_does_not_fit_the_unet_is_recorded_again_before_modelopt_touches_it(tmp_path, capfd):
    onnx_dir = tmp_path / "onnx"
    prepare(INT8, tmp_path / "e1", onnx_dir)
    (record_file,) = (onnx_dir / "activation-records").glob("*.pt")
    payload = torch.load(record_file, weights_only=True)
    dropped = next(k for k in payload["tensors"] if k.startswith("linear/"))
    del payload["tensors"][dropped]
    torch.save(payload, record_file)
    _, fp8 = prepare(FP8, tmp_path / "e2", onnx_dir)
    assert fp8.info.calibration == "calibrated"
    assert f"nothing for 1 layers of this UNet ({dropped.removeprefix('linear/')}" in capfd.readouterr().err


def test_fp8_level4_records_again_with_attention_statistics_which_then_serve_the_rest(tmp_path):
    onnx_dir = tmp_path / "onnx"
    _, int8 = prepare(INT8, tmp_path / "engines", onnx_dir)
    _, fp8_level4 = prepare(FP8.replace(quant_level=4.0), tmp_path / "engines", onnx_dir)
    assert (int8.info.calibration, fp8_level4.info.calibration) == ("calibrated", "calibrated")
    _, fp8 = prepare(FP8, tmp_path / "engines", onnx_dir)
    assert fp8.info.calibration == "shared"
    assert len(list((onnx_dir / "activation-records").glob("*.pt"))) == 1


def test_a_record_file_is_checked_against_its_knobs(tmp_path, components):
    record = activation_record.ActivationRecord(calls=1, linear={"a": torch.ones(1, 1, 4)})
    path = tmp_path / "r.pt"
    activation_record.save(record, path, {"steps": 3})
    assert torch.equal(activation_record.load(path, {"steps": 3}, CPU).linear["a"], torch.ones(1, 1, 4))
    with pytest.raises(activation_record.RecordMismatch, match="different steps"):
        activation_record.load(path, {"steps": 4}, CPU)
    activation_record.save(record, path, {"steps": 3, "attention": True})
    assert activation_record.load(path, {"steps": 3, "attention": False}, CPU).calls == 1
    activation_record.save(record, path, {"steps": 3, "attention": False})
    with pytest.raises(activation_record.RecordMismatch, match="different attention"):
        activation_record.load(path, {"steps": 3, "attention": True}, CPU)
    with pytest.raises(activation_record.RecordMismatch, match="no activation record"):
        activation_record.load(tmp_path / "absent.pt", {"steps": 3}, CPU)
