"""SSIM / PSNR properties and CLIP-score plumbing; CPU-only and without pretrained weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from sdxl_core import metrics
from sdxl_core.errors import UserError

FAST = settings(max_examples=30, deadline=None)
COMPARISONS = [metrics.ssim, metrics.psnr, metrics.ssim_map, metrics.compare]


def image_shapes(min_side: int = 7, max_side: int = 24):
    side = st.integers(min_side, max_side)
    return st.tuples(side, side, st.just(3))


@st.composite
def image_pairs(draw, min_side: int = 7):
    shape = draw(image_shapes(min_side))
    return draw(arrays(np.uint8, shape)), draw(arrays(np.uint8, shape))


@given(arrays(np.uint8, image_shapes(min_side=3)))
@FAST
def test_identical_images_have_ssim_one_and_infinite_psnr(img):
    assert metrics.ssim(img, img) == pytest.approx(1.0, abs=1e-6)
    assert metrics.psnr(img, img) == math.inf
    assert np.allclose(metrics.ssim_map(img, img), 1.0, atol=1e-6)


@given(image_pairs())
@FAST
def test_ssim_and_psnr_are_symmetric(pair):
    a, b = pair
    assert metrics.ssim(a, b) == pytest.approx(metrics.ssim(b, a), abs=1e-12)
    assert metrics.psnr(a, b) == metrics.psnr(b, a)


@given(image_pairs(min_side=3))
@FAST
def test_ssim_and_psnr_bounds(pair):
    a, b = pair
    assert -1.0 - 1e-9 <= metrics.ssim(a, b) <= 1.0 + 1e-9
    assert metrics.psnr(a, b) >= 0.0
    ssim_map = metrics.ssim_map(a, b)
    assert ssim_map.shape == a.shape[:2]
    assert np.all(ssim_map <= 1.0 + 1e-9) and np.all(ssim_map >= -1.0 - 1e-9)


@given(arrays(np.uint8, image_shapes()), st.integers(0, 2**32 - 1), st.floats(2.0, 60.0))
@FAST
def test_noise_lowers_ssim(img, seed, sigma):
    noise = np.random.default_rng(seed).normal(0.0, sigma, img.shape)
    noisy = np.clip(img + noise, 0, 255).round().astype(np.uint8)
    assume(not np.array_equal(img, noisy))
    assert metrics.ssim(img, noisy) < metrics.ssim(img, img) - 1e-9
    assert math.isfinite(metrics.psnr(img, noisy))


def test_psnr_known_values():
    black = np.zeros((8, 8, 3), np.uint8)
    assert metrics.psnr(black, np.full_like(black, 255)) == pytest.approx(0.0)
    assert metrics.psnr(black, np.ones_like(black)) == pytest.approx(20 * math.log10(255))


def test_compare_returns_both_metrics():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + 10, 0, 255).astype(np.uint8)
    result = metrics.compare(a, b)
    assert set(result) == {"ssim", "psnr"}
    assert result["ssim"] == metrics.ssim(a, b) and result["psnr"] == metrics.psnr(a, b)


def test_pil_images_are_accepted_and_converted_to_rgb():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
    rgba = Image.fromarray(np.dstack([rgb, np.full((10, 12), 255, np.uint8)]), "RGBA")
    assert metrics.to_array(rgba).shape == (10, 12, 3)
    assert metrics.to_array(Image.fromarray(rgb)).dtype == np.uint8
    assert metrics.ssim(Image.fromarray(rgb), rgb) == pytest.approx(1.0)


@pytest.mark.parametrize("side", [3, 4, 5, 6])
def test_small_images_shrink_the_ssim_window(side):
    img = np.random.default_rng(side).integers(0, 256, (side, side + 5, 3), dtype=np.uint8)
    assert metrics.ssim(img, img) == pytest.approx(1.0)


@pytest.mark.parametrize("fn", [metrics.ssim, metrics.ssim_map, metrics.compare])
def test_too_small_images_raise_for_ssim(fn):
    img = np.zeros((2, 9, 3), np.uint8)
    with pytest.raises(UserError, match=r"SSIM needs images of at least 3x3 pixels, got 2x9"):
        fn(img, img)


def test_psnr_works_for_a_single_pixel():
    assert metrics.psnr(np.zeros((1, 1, 3), np.uint8), np.full((1, 1, 3), 255, np.uint8)) == pytest.approx(0.0)


@given(st.sampled_from([np.float32, np.float64, np.int16, np.uint16, np.int64, np.bool_]), st.sampled_from(COMPARISONS))
@settings(max_examples=20, deadline=None)
def test_wrong_dtype_raises_with_expected_format(dtype, fn):
    img = np.zeros((8, 8, 3), dtype)
    with pytest.raises(UserError, match=rf"expected a uint8 HxWx3 RGB image, got dtype {np.dtype(dtype)}"):
        fn(img, img)


@pytest.mark.parametrize("shape", [(8, 8), (8, 8, 4), (8, 8, 1), (2, 8, 8, 3)])
@pytest.mark.parametrize("fn", COMPARISONS)
def test_wrong_channel_layout_raises(shape, fn):
    img = np.zeros(shape, np.uint8)
    with pytest.raises(UserError, match=rf"expected a uint8 HxWx3 RGB image, got shape \({shape[0]}, "):
        fn(img, img)


@pytest.mark.parametrize("fn", COMPARISONS)
def test_empty_image_raises(fn):
    img = np.zeros((0, 8, 3), np.uint8)
    with pytest.raises(UserError, match=r"got an empty array of shape \(0, 8, 3\)"):
        fn(img, img)


@pytest.mark.parametrize("fn", COMPARISONS)
def test_shape_mismatch_raises(fn):
    with pytest.raises(UserError, match=r"image shapes differ: \(8, 8, 3\) vs \(8, 9, 3\)"):
        fn(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9, 3), np.uint8))


def test_non_image_raises():
    with pytest.raises(UserError, match="numpy array or PIL.Image\\), got list"):
        metrics.to_array([[1, 2, 3]])


def test_error_messages_are_one_line():
    for bad in (np.zeros((8, 8), np.uint8), np.zeros((8, 8, 3), np.float32), "x"):
        with pytest.raises(UserError) as info:
            metrics.to_array(bad)
        assert "\n" not in str(info.value)


# --- CLIP score -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_scorer():
    import torch

    torch.manual_seed(0)
    return metrics.ClipScorer(pretrained=None)


# A ViT-B-32 forward pass takes seconds on a small CPU, so the tests share one scored batch. Random weights
# often give negative cosines, which score() clips to 0, so determinism is checked on the raw similarity.
IMAGE = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
PROMPT = "an astronaut riding a horse"
BATCH = ([IMAGE, Image.fromarray(IMAGE)], [PROMPT, PROMPT])


@pytest.fixture(scope="module")
def batch_similarity(random_scorer):
    return random_scorer.similarity(*BATCH)


def test_random_clip_similarity_is_deterministic(random_scorer, batch_similarity):
    assert all(s != 0.0 and -100.0 <= s <= 100.0 for s in batch_similarity)
    assert random_scorer.similarity(*BATCH) == batch_similarity


def test_clip_similarity_treats_pil_and_array_alike(batch_similarity):
    assert batch_similarity[0] == pytest.approx(batch_similarity[1], abs=1e-4)


def test_random_clip_scores_one_per_image_in_range(random_scorer, batch_similarity):
    scores = random_scorer.score(*BATCH)
    assert len(scores) == 2
    assert all(isinstance(s, float) and 0.0 <= s <= 100.0 for s in scores)
    assert scores == [max(0.0, s) for s in batch_similarity]


def test_score_clips_negative_similarity_at_zero(random_scorer, monkeypatch):
    monkeypatch.setattr(random_scorer, "similarity", lambda images, prompts, batch_size=32: [-12.5, 0.0, 31.7])
    assert random_scorer.score([IMAGE] * 3, ["a", "b", "c"]) == [0.0, 0.0, 31.7]


def test_clip_score_of_nothing_is_empty(random_scorer):
    assert random_scorer.score([], []) == []


def test_clip_score_rejects_mismatched_inputs(random_scorer):
    with pytest.raises(UserError, match="got 2 images but 1 prompts"):
        random_scorer.score([IMAGE, IMAGE], ["only one"])
    with pytest.raises(UserError, match="not a single string"):
        random_scorer.score([IMAGE], "a string")
    with pytest.raises(UserError, match="prompts must be strings, got int"):
        random_scorer.score([IMAGE], [3])
    with pytest.raises(UserError, match="expected a uint8 HxWx3 RGB image"):
        random_scorer.score([np.zeros((8, 8), np.uint8)], ["x"])
    with pytest.raises(UserError, match="batch_size must be at least 1, got 0"):
        random_scorer.score([IMAGE], ["x"], batch_size=0)


@pytest.mark.slow
def test_pretrained_clip_score_prefers_the_matching_prompt():
    if not metrics.clip_weights_available():
        pytest.skip("open_clip ViT-B-32 openai pretrained weights not in the local cache")
    scorer = metrics.ClipScorer("openai")
    red = np.zeros((224, 224, 3), np.uint8)
    red[..., 0] = 255
    matching, unrelated = scorer.score([red, red], ["a plain red square", "a photo of a dog on a beach"])
    assert 0.0 <= unrelated < matching <= 100.0


def test_missing_weights_raise_without_downloading(tmp_path, monkeypatch):
    import open_clip.factory
    import open_clip.pretrained

    def no_network(*args, **kwargs):
        raise AssertionError("tried to download weights")

    for module in (open_clip.factory, open_clip.pretrained):
        for name in ("download_pretrained", "download_pretrained_from_hf", "download_pretrained_from_url"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, no_network)
    assert not metrics.clip_weights_available("openai", cache_dir=str(tmp_path))
    with pytest.raises(metrics.MissingWeights, match="open_clip ViT-B-32 'openai' weights are not in the local cache"):
        metrics.ClipScorer(pretrained="openai", cache_dir=str(tmp_path))
    assert issubclass(metrics.MissingWeights, UserError)


def test_missing_weights_in_default_cache():
    if metrics.clip_weights_available():
        pytest.skip("open_clip ViT-B-32 openai pretrained weights are in the local cache")
    with pytest.raises(metrics.MissingWeights, match="'openai' weights are not in the local cache"):
        metrics.ClipScorer(pretrained="openai")


def test_weights_found_in_a_hub_cache_layout(tmp_path):
    repo = tmp_path / "models--timm--vit_base_patch32_clip_224.openai"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_model.safetensors").write_bytes(b"placeholder")
    assert metrics.clip_weights_available("openai", cache_dir=str(tmp_path))
    assert metrics.cached_clip_weights("openai", cache_dir=str(tmp_path)).endswith("open_clip_model.safetensors")


def test_unknown_pretrained_tag_raises():
    with pytest.raises(UserError, match="unknown open_clip ViT-B-32 pretrained tag 'nope'"):
        metrics.ClipScorer(pretrained="nope")
