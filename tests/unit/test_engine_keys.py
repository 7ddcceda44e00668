"""An engine's key covers what built it: a library upgrade, a change to the build code or to a built-in model's
recipe is a new key, so the suite never lets an engine built by other code answer for this code."""

from __future__ import annotations

from pathlib import Path

from sdxl_core import engines
from sdxl_core.models import configs
from sdxl_core.variants import VARIANTS

INT8 = VARIANTS["xl-1.0-int8"].replace(model="tiny")
FP16 = VARIANTS["xl-1.0-fp16"].replace(model="tiny")


def key(variant) -> str:
    return variant.engine_key("2.11.0", "sm90", engines.build_identity(variant))


def test_a_library_that_builds_the_engine_is_in_its_key(monkeypatch):
    before = {v.name: key(v) for v in (FP16, INT8)}
    real = engines.build_identity

    def upgraded(variant):
        identity = real(variant)
        if "modelopt" in identity:
            identity["modelopt"] = "99.0"
        return identity

    monkeypatch.setattr(engines, "build_identity", upgraded)
    assert key(INT8) != before[INT8.name]  # ModelOpt calibrates 8-bit engines
    assert key(FP16) == before[FP16.name]  # and does not touch FP16 ones
    assert "modelopt" not in real(FP16)
    monkeypatch.setattr(engines, "build_identity", lambda v: {**real(v), "diffusers": "0.0.1"})
    assert key(FP16) != before[FP16.name]


def test_the_build_code_is_in_the_key(monkeypatch):
    before = key(INT8)
    read = Path.read_bytes

    def edited(path):
        data = read(path)
        return data + b"\n# edited\n" if path.name == "qmodules.py" else data

    engines._build_code_digest.cache_clear()
    monkeypatch.setattr(Path, "read_bytes", edited)
    try:
        assert key(INT8) != before
    finally:
        monkeypatch.undo()
        engines._build_code_digest.cache_clear()
    assert key(INT8) == before


def test_a_builtin_models_recipe_is_in_the_key(monkeypatch):
    before = key(FP16)
    monkeypatch.setattr(configs, "REACTIVE_GAINS", {**configs.REACTIVE_GAINS, "conv_out": 1.0})
    assert key(FP16) != before
    hub = FP16.replace(model="stabilityai/stable-diffusion-xl-base-1.0")
    assert "model" not in engines.build_identity(hub)  # real weights are named by the model, as before
