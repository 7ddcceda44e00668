"""Variant table and engine keys: stable, collision-free, file-name safe."""

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdxl_core.errors import UserError
from sdxl_core.variants import INT8_LEVELS, SCHEDULERS, VARIANTS, Variant, get_variant

SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")

variants = st.builds(
    Variant,
    name=st.just("v"),
    model=st.sampled_from(["tiny", "sdxl-random", "stabilityai/stable-diffusion-xl-base-1.0", "/models/my sdxl/"]),
    precision=st.sampled_from(["fp16", "int8"]),
    steps=st.integers(1, 60),
    scheduler=st.sampled_from(SCHEDULERS),
    guidance_scale=st.sampled_from([0.0, 1.0, 5.0, 7.5]),
    height=st.integers(1, 160).map(lambda n: n * 8),
    width=st.integers(1, 160).map(lambda n: n * 8),
    batch_size=st.integers(1, 4),
    lora_path=st.sampled_from([None, "latent-consistency/lcm-lora-sdxl", "/tmp/lora.safetensors"]),
    lora_scale=st.sampled_from([0.0, 0.5, 1.0]),
    quant_level=st.sampled_from(INT8_LEVELS),
    quant_alpha=st.sampled_from([0.5, 0.8]),
    quant_percentile=st.sampled_from([0.999, 1.0]),
    calibration_size=st.sampled_from([8, 32]),
    backend=st.sampled_from(["torch", "tensorrt"]),
)
backend_versions = st.sampled_from(["2.11.0", "2.14.1", "10.13.0"])
device_tags = st.sampled_from(["cpu", "sm90", "sm89"])


@settings(max_examples=300, deadline=None)
@given(variants, variants, backend_versions, backend_versions, device_tags, device_tags)
def test_different_engine_knobs_never_share_a_key(a, b, va, vb, da, db):
    same_inputs = a.engine_knobs() == b.engine_knobs() and va == vb and da == db
    assert (a.engine_key(va, da) == b.engine_key(vb, db)) == same_inputs


@settings(max_examples=100, deadline=None)
@given(variants, backend_versions, device_tags)
def test_same_knobs_give_the_same_key_and_it_is_a_safe_file_name(v, version, tag):
    key = v.engine_key(version, tag)
    assert key == v.replace(name="another-name").engine_key(version, tag)
    assert SAFE_NAME.match(key) and len(key) < 200
    assert key.startswith(f"unetxl-{v.precision}.")
    assert f"h{v.height}w{v.width}" in key and f"bs{v.unet_batch}" in key


def test_fp16_engine_ignores_knobs_that_only_matter_for_calibration():
    base = VARIANTS["xl-1.0-fp16"]
    assert base.engine_key("2.11.0", "sm90") == base.replace(steps=4, scheduler="LCM").engine_key("2.11.0", "sm90")
    int8 = VARIANTS["xl-1.0-int8"]
    assert int8.engine_key("2.11.0", "sm90") != int8.replace(steps=20).engine_key("2.11.0", "sm90")


def test_key_reads_like_the_reference_demo():
    key = VARIANTS["xl-1.0-int8"].replace(model="sdxl-random", quant_level=2.5).engine_key("2.11.0", "sm90")
    assert key.startswith("unetxl-int8.l2.5.bs2.s30.c32.p1.0.a0.8.h1024w1024.sdxl-random.torch2-11-0.sm90.")


def test_variant_table_matches_the_reference_workflow():
    assert {"xl-1.0-fp16", "xl-1.0-int8", "xl-1.0-fp8", "xl-1.0-lcm-lora", "xl-turbo"} <= set(VARIANTS)
    lcm, turbo = VARIANTS["xl-1.0-lcm-lora"], VARIANTS["xl-turbo"]
    assert (lcm.steps, lcm.scheduler, lcm.guidance_scale, lcm.lora_path) == (
        4,
        "LCM",
        0.0,
        "latent-consistency/lcm-lora-sdxl",
    )
    assert (turbo.steps, turbo.scheduler, turbo.guidance_scale, turbo.height, turbo.width) == (
        1,
        "EulerA",
        0.0,
        512,
        512,
    )
    for name in ("xl-1.0-fp16", "xl-1.0-int8", "xl-1.0-fp8"):
        v = VARIANTS[name]
        assert (v.steps, v.guidance_scale, v.height, v.width, v.unet_batch) == (30, 5.0, 1024, 1024, 2)
    assert not lcm.do_cfg and lcm.unet_batch == 1


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"scheduler": "Heun"}, "unknown scheduler"),
        ({"steps": -1}, "--denoising-steps"),
        ({"width": 1020}, "--width must be a positive multiple of 8"),
        ({"precision": "int4"}, "unknown precision"),
        ({"precision": "int8", "quant_level": 4.0}, "--quantization-level for INT8 must be one of 1, 2, 2.5, 3"),
        ({"batch_size": 0}, "--batch-size"),
    ],
)
def test_bad_knobs_are_refused_with_one_clear_line(changes, message):
    with pytest.raises(UserError, match=message) as info:
        VARIANTS["xl-1.0-fp16"].replace(**changes)
    assert "\n" not in str(info.value)


def test_unknown_variant_names_the_choices():
    with pytest.raises(UserError, match="xl-1.0-fp16"):
        get_variant("xl-2.0")
