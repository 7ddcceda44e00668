"""Built-in models, real-weights loading errors, tokenizers, LoRA fusing."""

import pytest
import torch

from sdxl_core import models
from sdxl_core.errors import UserError


def test_sdxl_random_has_the_full_sdxl_unet():
    components = models.build_builtin("sdxl-random", device="meta")
    assert round(models.count_parameters(components.unet) / 1e9, 3) == 2.567
    assert models.count_parameters(components.text_encoder) == pytest.approx(123e6, rel=0.01)
    assert models.count_parameters(components.text_encoder_2) == pytest.approx(695e6, rel=0.01)
    assert models.count_parameters(components.vae) == pytest.approx(83.65e6, rel=0.01)


def test_tiny_is_sdxl_shaped_and_seeded():
    a, b = models.build_builtin("tiny", seed=0), models.build_builtin("tiny", seed=0)
    c = models.build_builtin("tiny", seed=1)
    assert a.unet.config.addition_embed_type == "text_time"
    assert a.unet.config.cross_attention_dim == a.text_encoder.config.hidden_size + a.text_encoder_2.config.hidden_size
    wa, wb, wc = (x.unet.conv_in.weight for x in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_builtin_tokenizer_is_clip_bpe_without_download():
    import open_clip

    text = "a photo of an astronaut riding a horse on mars"
    ids = models.builtin_tokenizer("!")([text], padding="max_length", max_length=77).input_ids[0]
    assert ids == open_clip.tokenize([text])[0].tolist()  # open_clip pads with 0 == "!"


def test_missing_local_model_names_the_builtins(tmp_path):
    with pytest.raises(UserError, match="--model tiny"):
        models.load(str(tmp_path / "nowhere"))


def test_offline_hub_id_fails_with_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="cannot load model .*--model tiny") as info:
        models.load("stabilityai/stable-diffusion-xl-base-1.0")
    assert "\n" not in str(info.value)


def test_local_diffusers_dir_round_trip(tmp_path):
    """The real loading path (from_pretrained) on a directory written by save_pretrained."""
    tiny = models.build_builtin("tiny")
    for sub, module in (
        ("unet", tiny.unet),
        ("vae", tiny.vae),
        ("text_encoder", tiny.text_encoder),
        ("text_encoder_2", tiny.text_encoder_2),
    ):
        module.save_pretrained(tmp_path / sub)
    tiny.tokenizer.save_pretrained(tmp_path / "tokenizer")
    tiny.tokenizer_2.save_pretrained(tmp_path / "tokenizer_2")
    from diffusers import EulerDiscreteScheduler

    EulerDiscreteScheduler.from_config(tiny.scheduler_config).save_pretrained(tmp_path / "scheduler")
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    loaded = models.load(str(tmp_path))
    assert torch.equal(loaded.unet.conv_in.weight, tiny.unet.conv_in.weight)
    assert loaded.tokenizer_2("a cat").input_ids == tiny.tokenizer_2("a cat").input_ids


def test_missing_lora_file_is_one_line(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        models.load("tiny", lora_path=str(tmp_path / "missing.safetensors"))


def test_random_lora_for_sdxl_random_covers_every_attention_projection(tmp_path):
    """The suite's LCM-LoRA stand-in on the full-size random model: made from shapes alone, in seconds."""
    from diffusers import UNet2DConditionModel
    from safetensors import safe_open

    path = models.make_builtin_lora("sdxl-random", tmp_path)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**models.SDXL_UNET_CONFIG)
    targets = {name for name, _ in unet.named_modules() if name.endswith(("to_q", "to_k", "to_v", "to_out.0"))}
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        lora_a = f.get_tensor("unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight")
    assert {k.removeprefix("unet.").rsplit(".lora_", 1)[0] for k in keys} == targets
    assert len(keys) == 2 * len(targets) == 1120
    assert lora_a.shape == (4, 2048) and lora_a.isfinite().all() and lora_a.std() > 0


def test_shape_only_unet_leaves_every_other_component_identical():
    """A load-only run builds the UNet on the meta device; the seeded text encoders and VAE must not change."""
    full, light = models.build_builtin("tiny"), models.build_builtin("tiny", unet_weights=False)
    assert full.has_unet_weights and not light.has_unet_weights
    for name in ("text_encoder", "text_encoder_2", "vae"):
        a, b = getattr(full, name).state_dict(), getattr(light, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert dict(light.unet.config) == dict(full.unet.config)
    light.to("cpu", torch.float32)  # the shape-only UNet is left where it is, nothing raises
    assert next(light.unet.parameters()).is_meta


def test_hub_ids_refused_offline_unless_cached(tmp_path, monkeypatch):
    """Offline (or with the hub unreachable) a hub id loads from the local cache or is refused at once, naming the
    download; a cached one passes. Nothing waits on the network."""
    from huggingface_hub import constants

    from sdxl_core.errors import UserError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(UserError, match="HF_HUB_OFFLINE is set .*huggingface-cli download org/model"):
        models.check_hub_source("org/model", "unet/config.json", "model", "use --model tiny")
    snapshot = tmp_path / "models--org--model" / "snapshots" / "abc123"
    (snapshot / "unet").mkdir(parents=True)
    (snapshot / "unet" / "config.json").write_text("{}")
    (tmp_path / "models--org--model" / "refs").mkdir()
    (tmp_path / "models--org--model" / "refs" / "main").write_text("abc123")
    models.check_hub_source("org/model", "unet/config.json", "model", "use --model tiny")


def _weights(components) -> dict:
    return {f"{c}.{n}": t for c, m in components.modules().items() for n, t in m.state_dict().items()}


def _same_weights(a, b) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def eager_tiny():
    return models.build_builtin("tiny")


def test_a_unet_loaded_later_has_the_weights_an_eager_load_has(eager_tiny):
    """The UNet is generated from where the seeded stream stopped after the VAE, whenever it is generated."""
    lazy = models.build_builtin("tiny", unet_weights=False)
    assert not lazy.has_unet_weights
    assert lazy.load_unet_weights() is lazy.unet and lazy.has_unet_weights
    assert _same_weights(lazy, eager_tiny)


@pytest.fixture
def model_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(models.MODEL_CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_the_model_cache_holds_the_generated_weights_bit_for_bit(model_cache, eager_tiny):
    """A first run generates and keeps the text encoders and VAE (and the UNet's random state); the next loads
    them; the UNet is kept once it was needed. Every way gives the eagerly generated weights."""
    from sdxl_core.startup import Startup

    first = Startup()
    cold = models.build_builtin("tiny", cache=True, unet_weights=False, startup=first)
    (entry,) = model_cache.iterdir()
    assert sorted(p.name for p in entry.iterdir()) == [
        "text_encoder.safetensors",
        "text_encoder_2.safetensors",
        "unet_rng.safetensors",
        "vae.safetensors",
    ]
    assert first.notes == {c: "generated" for c in models.BEFORE_UNET}
    cold.load_unet_weights()  # an engine had to be built: the UNet is generated, then kept
    assert (entry / "unet.safetensors").is_file() and first.notes["unet"] == "generated"
    assert _same_weights(cold, eager_tiny)

    second = Startup()
    warm = models.build_builtin("tiny", cache=True, startup=second)
    assert second.notes == {c: "from the model cache" for c in (*models.BEFORE_UNET, "unet")}
    assert _same_weights(warm, eager_tiny)
    assert not any(t.is_meta for t in [*warm.text_encoder.buffers(), *warm.unet.buffers()])


def test_a_torn_cache_file_is_generated_again(model_cache, eager_tiny, capfd):
    models.build_builtin("tiny", cache=True, unet_weights=False)
    (entry,) = model_cache.iterdir()
    torn = entry / "text_encoder_2.safetensors"
    torn.write_bytes(torn.read_bytes()[:1000])
    again = models.build_builtin("tiny", cache=True)
    assert "does not load" in capfd.readouterr().err
    assert _same_weights(again, eager_tiny)
    assert torn.stat().st_size > 1000  # written whole again


def test_a_new_entry_replaces_the_same_models_stale_ones(model_cache):
    stale, other_seed = model_cache / "tiny-s0-000000000000", model_cache / "tiny-s1-000000000000"
    for path in (stale, other_seed):
        path.mkdir(parents=True)
    models.build_builtin("tiny", cache=True, unet_weights=False)
    assert not stale.exists() and other_seed.exists()


def test_a_cache_that_cannot_be_written_only_warns(tmp_path, monkeypatch, eager_tiny, capfd):
    (tmp_path / "a-file").write_text("not a directory")
    monkeypatch.setenv(models.MODEL_CACHE_ENV, str(tmp_path / "a-file"))
    components = models.build_builtin("tiny", cache=True)
    assert "could not keep" in capfd.readouterr().err
    assert _same_weights(components, eager_tiny)


def test_which_builtins_are_cached(model_cache, monkeypatch):
    """sdxl-random by default, on the CPU only (a meta-device build generates nothing); tiny is cheaper to
    generate than to read; SDXL_BENCH_MODEL_CACHE=off turns the cache off."""
    assert models.CACHED_BUILTINS == ("sdxl-random",)
    models.build_builtin("sdxl-random", device="meta", unet_weights=False)
    models.build_builtin("tiny")
    assert not model_cache.exists()
    assert models.ModelCache.entry("sdxl-random", 0).path.parent == model_cache
    monkeypatch.setenv(models.MODEL_CACHE_ENV, "off")
    assert models.ModelCache.entry("sdxl-random", 0) is None
