"""An 8-bit baseline records which path and kernel each quantized layer ran (`references.layer_paths`), and a
failed comparison says when the current engine's differ from the baseline's (`baselines.failure_cause`): the
per-shape dispatch picks them by timing, so a rebuild may differ without any code change."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from sdxl_core.quant import qmodules
from sdxl_core.quant.plan import PLAN_FORMAT
from sdxl_core.suite import baselines, references

INT8 = "xl-1.0-int8"
KV = "attn2.to_kv"
REGRESSION = "same library versions and device as the baseline: a regression"
LIBRARIES, DEVICE = {"torch": "2.14.1"}, {"name": "cpu"}


def baseline(paths, libraries=LIBRARIES) -> dict:
    """A stored variant record as failure_cause reads it: its engine's paths (None: stored before they were kept)."""
    return {"libraries": libraries, "device": DEVICE, **({"paths": copy.deepcopy(paths)} if paths else {})}


@pytest.fixture(scope="module")
def loaded():
    """The tiny INT8 UNet as an engine load rebuilds it from its layer plan (qmodules.apply_layer_plan), on the
    meta device (a path needs no weights): fused attention projections, every linear layer 8-bit."""
    from diffusers import UNet2DConditionModel

    from sdxl_core.models.configs import builtin_configs

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(builtin_configs("tiny")["unet"])
    qmodules.fuse_qkv(unet)
    spec = {"type": "Int8Linear", "smooth": True, "per_channel": False, "gemm": "8bit", "kernel": "pointer"}
    layers = {name: spec for name, m in unet.named_modules() if isinstance(m, torch.nn.Linear)}
    qmodules.apply_layer_plan(unet, {"format": PLAN_FORMAT, "fused_qkv": True, "layers": layers})
    return unet


@pytest.fixture
def unet(loaded):
    return copy.deepcopy(loaded)


def on_16bit(unet, suffix: str = KV) -> int:
    """Put every layer whose name ends with `suffix` on the 16-bit path, as the dispatch does; how many."""
    layers = [m for name, m in unet.named_modules() if name.endswith(suffix)]
    for module in layers:
        module.set_gemm_path("16bit", torch.float32)
    return len(layers)


def test_the_record_names_each_layers_path_and_kernel(unet):
    before = references.layer_paths(unet)
    total = before["layers_by_path"]["gemm:8bit"]
    assert before["layers_by_path"] == {"gemm:8bit": total} and before["layers_by_kernel"] == {"pointer": total}
    assert before["16bit_groups"] == {}

    moved = on_16bit(unet)
    after = references.layer_paths(unet)
    assert moved > 1
    assert after["layers_by_path"] == {"gemm:16bit": moved, "gemm:8bit": total - moved}
    assert after["layers_by_kernel"] == {"16bit": moved, "pointer": total - moved}
    assert sum(after["16bit_groups"].values()) == moved
    assert all(group.endswith(f".*.{KV}") for group in after["16bit_groups"]), after["16bit_groups"]
    assert after["paths_digest"] != before["paths_digest"]
    assert len(json.dumps(after)) < 1000  # compact: counts, digests and groups, no per-layer list

    # Another 8-bit kernel on one layer: the same paths, other kernels.
    name, module = next((n, m) for n, m in unet.named_modules() if n.endswith("attn1.to_qkv"))
    module.kernel = "tma"
    kernel = references.layer_paths(unet)
    assert kernel["paths_digest"] == after["paths_digest"] and kernel["kernels_digest"] != after["kernels_digest"]


def test_a_layer_behind_the_reused_cross_attention_kv_keeps_its_name(unet):
    from sdxl_core.engines import cross_kv

    on_16bit(unet)
    before = references.layer_paths(unet)
    cross_kv.CrossKV(unet)
    assert references.layer_paths(unet) == before


def test_no_record_without_8bit_layers(tmp_path):
    assert references.layer_paths(torch.nn.Sequential(torch.nn.Linear(2, 2))) is None
    assert references.layer_paths(None) is None


def test_update_writes_the_record_and_the_manifest_keeps_it(unet, tmp_path):
    """Through the suite's own writer (`--update-baselines`): the 8-bit record is stored and read back; FP16's
    record has none; a record with a part missing is refused as a manifest."""
    from sdxl_core.variants import get_variant

    on_16bit(unet)
    paths = references.layer_paths(unet)
    tol = references.tolerance({"rerun": 0.0}, 1e-7)
    for name, record_paths in (("xl-1.0-fp16", None), (INT8, paths)):
        variant = get_variant(name).replace(model="tiny", height=16, width=16, steps=2)
        renders = [
            (baselines.entry_for(variant, prompt, seed), references.image_copy(_image(seed)), {"latents": _latents()})
            for prompt, seed in baselines.CASES
        ]
        record = baselines.write_variant(
            tmp_path,
            name,
            renders,
            {"unet.t999": _latents()},
            dict.fromkeys(references.KINDS, tol),
            device=DEVICE,
            libraries=LIBRARIES,
            command="test",
            paths=record_paths,
        )
        baselines.write_manifest(tmp_path, "tiny", "cpu", {name: record}, {})
    manifest = baselines.load_manifest(tmp_path)
    assert manifest["variants"][INT8]["paths"] == paths
    assert "paths" not in manifest["variants"]["xl-1.0-fp16"]

    del manifest["variants"][INT8]["paths"]["paths_digest"]
    (tmp_path / baselines.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(baselines.UserError, match=r"lacks .*paths\.paths_digest"):
        baselines.load_manifest(tmp_path)


def _image(seed):
    from PIL import Image

    return Image.new("RGB", (16, 16), (seed, seed, seed))


def _latents():
    return torch.ones((1, 4, 2, 2))


def test_other_paths_are_named_instead_of_a_regression(unet):
    stored = references.layer_paths(unet)  # the baseline's engine: every to_kv on the 8-bit path
    moved = on_16bit(unet)
    current = references.layer_paths(unet)
    for over in ({"latents"}, {"image"}, {"unet"}, {"unet", "quant"}):
        cause = baselines.failure_cause(baseline(stored), LIBRARIES, DEVICE, over, current)
        assert f"the engine runs {moved} layers on another path than the baseline's engine" in cause, cause
        assert f"(8bit -> 16bit: ...{KV} x{moved})" in cause and "the difference may come from that choice" in cause
        # The calibrated numbers are taken before the paths are chosen: their difference is still a regression.
        assert cause.endswith("a regression") == ("quant" in over), cause
    # The other way round: the baseline's engine ran them 16-bit, this one 8-bit.
    cause = baselines.failure_cause(baseline(current), LIBRARIES, DEVICE, {"unet"}, stored)
    assert f"(16bit -> 8bit: ...{KV} x{moved})" in cause and "regression" not in cause, cause
    # With a library upgrade too, both are named.
    cause = baselines.failure_cause(baseline(stored, {"torch": "2.14.0"}), LIBRARIES, DEVICE, {"latents"}, current)
    assert "torch 2.14.0 -> 2.14.1" in cause and "another path than the baseline's engine (8bit -> 16bit" in cause


def one_layer() -> dict:
    layer = qmodules.Int8Linear.empty_like(torch.nn.Linear(2, 2), smooth=False, per_channel=False)
    return references.layer_paths(torch.nn.Sequential(layer))


def test_the_same_paths_or_no_record_keep_the_regression_wording(unet):
    on_16bit(unet)
    paths = references.layer_paths(unet)
    assert baselines.failure_cause(baseline(paths), LIBRARIES, DEVICE, {"latents"}, paths) == REGRESSION
    # A baseline stored before the records were kept, and an engine without 8-bit layers.
    assert baselines.failure_cause(baseline(None), LIBRARIES, DEVICE, {"latents"}, paths) == REGRESSION
    assert baselines.failure_cause(baseline(paths), LIBRARIES, DEVICE, {"latents"}, None) == REGRESSION
    # Other paths do not explain the calibrated numbers alone.
    on_16bit(unet, "attn1.to_qkv")
    other = references.layer_paths(unet)
    assert baselines.failure_cause(baseline(paths), LIBRARIES, DEVICE, {"quant"}, other) == REGRESSION


def test_other_kernels_and_other_layers_are_named(unet):
    stored = references.layer_paths(unet)
    layers = [m for name, m in unet.named_modules() if name.endswith(KV)]
    for module in layers:
        module.kernel = "tma"
    cause = baselines.failure_cause(baseline(stored), LIBRARIES, DEVICE, {"unet"}, references.layer_paths(unet))
    total = stored["layers_by_kernel"]["pointer"]
    assert f"other 8-bit kernels than the baseline's engine (layers per kernel: pointer {total} -> " in cause, cause
    assert f"tma 0 -> {len(layers)})" in cause
    # Another number of quantized layers: another engine layout, whose calibrated numbers differ as well.
    for over in ({"unet"}, {"quant"}, {"unet", "quant"}):
        cause = baselines.failure_cause(baseline(stored), LIBRARIES, DEVICE, over, one_layer())
        assert f"the engine has 1 quantized layers, the baseline's engine had {total}" in cause, cause
        assert "regression" not in cause, cause


def _fuse_attentions(unet) -> int:
    from sdxl_core.quant import attention

    fused = [m for m in unet.modules() if attention.fusable(m)]
    for attn in fused:
        attention.fuse(attn)
    return len(fused)


def _fuse_geglus(unet) -> int:
    from sdxl_core.quant import geglu_act

    found = geglu_act.activations(unet)
    for entry in found.values():
        geglu_act.fuse(entry)
    return len(found)


def _fuse_norms(unet) -> int:
    from sdxl_core.quant import layernorm

    found = layernorm.norms(unet)
    for entry in found.values():
        layernorm.fuse(entry)
    return len(found)


@pytest.mark.parametrize(
    ("key", "fuse", "kernel", "count", "named"),
    [
        ("attention_kernels", _fuse_attentions, "attention_triton", 34, "attentions on our attention kernel"),
        ("norm_kernels", _fuse_norms, "layernorm_triton", 51, "LayerNorms on our LayerNorm kernel"),
        ("activation_kernels", _fuse_geglus, "geglu_act_triton", 17, "GEGLUs on our GEGLU kernel"),
    ],
    ids=["attention", "layernorm", "geglu_act"],
)
def test_modules_on_our_kernels_are_named(unet, key, fuse, kernel, count, named):
    """Which attentions, LayerNorms and GEGLUs run our kernels is chosen by timing too (`quant.attention`,
    `quant.layernorm`, `quant.geglu_act`): a baseline stored before they could, or by an engine that fused others, is
    named as the possible cause."""
    stored = references.layer_paths(unet)
    assert stored[key] == {}
    assert fuse(unet) == count
    now = references.layer_paths(unet)
    assert now[key] == {kernel: count}
    expected = f"{named} where the baseline's did not ({kernel} 0 -> {count})"
    old = {k: value for k, value in stored.items() if k != key}  # stored before the key
    for record in (stored, old):
        cause = baselines.failure_cause(baseline(record), LIBRARIES, DEVICE, {"latents"}, now)
        assert expected in cause and "regression" not in cause, cause
    assert baselines.failure_cause(baseline(now), LIBRARIES, DEVICE, {"latents"}, now) == REGRESSION
