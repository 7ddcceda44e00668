"""Hostile engine files through the torch backend: what loads is what was verified, and every file an engine
holds is checked against its schema before anything is built or loaded from it.

The attacker here can write the engine dir (and re-hash the sidecar, as the owner of an unsigned engine can),
but not sign. Each refusal is one line (UserError) that names the file; none of them loads native code.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdxl_core import models
from sdxl_core.engines import store, torch_backend, unet_stage
from sdxl_core.errors import UserError
from sdxl_core.quant.kernels import cuda_build
from sdxl_core.variants import VARIANTS

CPU = torch.device("cpu")
FP16 = VARIANTS["xl-1.0-fp16"].replace(model="tiny", height=64, width=64, steps=2)
INT8 = VARIANTS["xl-1.0-int8"].replace(model="tiny", height=64, width=64, steps=2, calibration_size=2)


@pytest.fixture(autouse=True)
def clean_trust_settings(monkeypatch):
    monkeypatch.delenv(store.KEY_ENV, raising=False)
    monkeypatch.delenv(store.TRUST_ENV, raising=False)


@pytest.fixture(autouse=True)
def no_native_code(monkeypatch):
    """Every load below must be refused (or done) before any kernel library is built or loaded: a call is a
    failure of its own, whatever the test then sees."""
    calls = []

    def library(name, **kwargs):
        calls.append(name)
        raise cuda_build.KernelUnavailable(f"test: {name} must not be loaded here")

    monkeypatch.setattr(cuda_build, "library", library)
    yield
    assert calls == []


def calibrate(variant):
    """Calibration on one sample of UNet inputs: what the attacks need is a real 8-bit engine, not a good one."""
    return lambda unet: unet_stage(unet)(*torch_backend.unet_inputs(variant, unet, CPU, torch.float32))


def prepare(variant, engine_dir, *, allow_build=False, components=None):
    components = components or models.load("tiny", unet_weights=allow_build)
    return torch_backend.prepare(
        variant,
        components,
        CPU,
        engine_dir=engine_dir,
        progress=False,
        allow_build=allow_build,
        compile=False,
        forward_loop=calibrate(variant),
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """An FP16 and an INT8 engine, copied per test."""
    root = tmp_path_factory.mktemp("engines")
    keys = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(store.KEY_ENV, raising=False)
        for variant in (FP16, INT8):
            engines = prepare(variant, root / variant.precision, allow_build=True)
            keys[variant.precision] = engines.info.engine_key
    return root, keys


@pytest.fixture
def engine(built, tmp_path):
    def copy(precision: str) -> tuple[Path, Path]:
        root, keys = built
        shutil.copytree(root / precision, tmp_path / precision)
        return tmp_path / precision, tmp_path / precision / keys[precision]

    return copy


def rewrite(path: Path, name: str, data: bytes) -> None:
    """Replace an engine file and re-hash it in the (unsigned) sidecar."""
    (path / name).unlink()
    (path / name).write_bytes(data)
    record = json.loads((path / store.SIDECAR).read_text())
    record["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (path / store.SIDECAR).write_text(json.dumps(record))


def refused(variant, engine_dir) -> str:
    with pytest.raises(UserError) as info:
        prepare(variant, engine_dir)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_a_directory_swapped_between_verification_and_load_is_never_read(engine, monkeypatch, tmp_path):
    """The attacker swaps `<key>` for a look-alike whose weights are a symlink to their own file, right after
    the check (the race, won every time): the run loads the verified weights."""
    engine_dir, path = engine("fp16")
    original = load_file(path / "unet.safetensors")
    attacker = tmp_path / "attacker.safetensors"
    save_file({k: torch.zeros_like(v) for k, v in original.items()}, attacker)
    lookalike = tmp_path / "lookalike"
    shutil.copytree(path, lookalike)
    (lookalike / "unet.safetensors").unlink()
    (lookalike / "unet.safetensors").symlink_to(attacker)
    verify = store.verify

    def verify_then_swap(*args, **kwargs):
        found = verify(*args, **kwargs)
        path.rename(tmp_path / "moved-away")
        lookalike.rename(path)
        return found

    monkeypatch.setattr(store, "verify", verify_then_swap)
    components = models.load("tiny", unet_weights=False)
    assert prepare(FP16, engine_dir, components=components).info.mode == "loaded"
    assert not (path / "unet.safetensors").resolve().samefile(tmp_path / "moved-away" / "unet.safetensors")
    loaded = components.unet.state_dict()  # the UNet that runs
    assert all(torch.equal(loaded[name], tensor) for name, tensor in original.items())


def test_a_unet_config_that_is_a_string_is_never_taken_for_a_model(engine, tmp_path):
    """A JSON string would reach diffusers' from_config as a model path or hub id."""
    engine_dir, path = engine("fp16")
    local = tmp_path / "someone-elses-unet"
    local.mkdir()
    (local / "config.json").write_text((path / "unet_config.json").read_text())
    rewrite(path, "unet_config.json", json.dumps(str(local)).encode())
    assert "unet_config.json: a JSON str, not a UNet config object" in refused(FP16, engine_dir)


def test_a_unet_config_with_fields_no_unet_takes_is_refused(engine):
    engine_dir, path = engine("fp16")
    config = json.loads((path / "unet_config.json").read_text())
    rewrite(path, "unet_config.json", json.dumps({**config, "pretrained_model_name_or_path": "org/x"}).encode())
    assert "unet_config.json: unknown field 'pretrained_model_name_or_path'" in refused(FP16, engine_dir)


def _first(plan, kind=None):
    return next(s for s in plan["layers"].values() if kind is None or s["type"] == kind and s["kernel"] == "emulated")


PLANS = {
    # name: (change to the INT8 engine's layer plan, what the refusal says)
    "no layers": (lambda p: p.pop("layers"), "its layers are missing"),
    "layers a list": (lambda p: p.update(layers=list(p["layers"].values())), "its layers are a JSON list"),
    "an int entry": (
        lambda p: p["layers"].update({next(iter(p["layers"])): 5}),
        "is a JSON int, not a layer spec object",
    ),
    "no smooth flag": (lambda p: _first(p).pop("smooth"), "has no smooth flag"),
    "kernel bogus": (lambda p: _first(p).update(kernel="bogus"), "names kernel 'bogus', which this build does"),
    "kernel cutlass:x": (lambda p: _first(p).update(kernel="cutlass:x"), "names kernel 'cutlass:x'"),
    "a GPU conv kernel on the CPU": (
        lambda p: _first(p, "Int8Conv2d").update(kernel="cutlass:128x128x128_1x1"),
        "runs cutlass:128x128x128_1x1, a CUDA GPU kernel, and this run is on the cpu",
    ),
    "a GPU GEMM kernel on the CPU": (
        lambda p: _first(p).update(kernel="cutlass:coop_128x128x128"),
        "a CUDA GPU kernel, and this run is on the cpu",
    ),
}


@pytest.mark.parametrize("case", PLANS)
def test_a_malformed_layer_plan_is_one_line_before_anything_loads(case, engine):
    change, message = PLANS[case]
    engine_dir, path = engine("int8")
    plan = json.loads((path / "layer_plan.json").read_text())
    change(plan)
    rewrite(path, "layer_plan.json", json.dumps(plan).encode())
    found = refused(INT8, engine_dir)
    assert "layer_plan.json: " in found and message in found, found


@pytest.mark.parametrize("name", ["unet_config.json", "layer_plan.json"])
def test_deeply_nested_json_in_an_engine_file_is_one_line(name, engine):
    engine_dir, path = engine("fp16")
    rewrite(path, name, ("[" * 100_000 + "]" * 100_000).encode())
    found = refused(FP16, engine_dir)
    assert f"{name} is not valid JSON (JSON nested 100000 levels deep" in found


def test_weights_that_are_not_safetensors_are_one_line(engine):
    engine_dir, path = engine("fp16")
    rewrite(path, "unet.safetensors", b"\xff" * 64)
    assert "unet.safetensors is not a safetensors file" in refused(FP16, engine_dir)


def test_the_intact_engines_load(engine):
    """The control: untouched copies load (and run no native code on the CPU)."""
    for variant in (FP16, INT8):
        engine_dir, _ = engine(variant.precision)
        assert prepare(variant, engine_dir).info.mode == "loaded"
