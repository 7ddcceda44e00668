"""Do the images still look right? Current images against the stored FP16 baselines (SSIM, PSNR, CLIP score).

Baselines live in `--baseline-dir`/<model>/<hardware>/ (see sdxl_core/suite/baselines.py); on CPU CI that is the
committed `baselines/tiny/cpu/`. `--update-baselines` first rewrites them for this model and hardware from
the images this run renders, then every test still compares (the regression tests then pass trivially; the
8-bit tests still compare against the fresh FP16 images). A missing baseline fails, naming the command.

Thresholds come from the manifest; how they were chosen (measured values, margins) is written beside
THRESHOLDS in sdxl_core/suite/baselines.py and in the manifest's "measured" section.
"""

from __future__ import annotations

import re
import statistics
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdxl_core import metrics
from sdxl_core.errors import UserError
from sdxl_core.suite import baselines, sweep
from sdxl_core.suite.baselines import CASES

# Under xdist each test runs on its variant's worker (conftest.py groups them by `needs_variants`); with
# --update-baselines they all run on one worker, which renders every variant and writes the baseline.
pytestmark = [pytest.mark.quality]

FP16 = "xl-1.0-fp16"
OWN_BASELINE = (FP16, "xl-1.0-lcm-lora", "xl-turbo")  # compared with their own stored images
QUANTIZED = ("xl-1.0-int8", "xl-1.0-fp8")  # compared with the stored FP16 images
CASE_IDS = [f"case{i}" for i in range(len(CASES))]


def each_variant(names, *also):
    """`names` as parameters, each marked with the engines its test builds (`--variants` deselects the rest)."""
    return [pytest.param(name, marks=pytest.mark.needs_variants(*also, name)) for name in names]


# ---------------------------------------------------------------------------------------------------------------
# Fixtures: render each variant's cases once per module; open (or first rewrite) the stored baseline.


@pytest.fixture(scope="module")
def rendered(build_engine):
    """name -> the variant's images for CASES, rendered once."""
    cache: dict[str, list[Image.Image]] = {}

    def render(name: str) -> list[Image.Image]:
        if name not in cache:
            engine = build_engine(name)
            cache[name] = [engine.generate(prompt, seed=seed).images[0] for prompt, seed in CASES]
        return cache[name]

    return render


class Stored:
    """A baseline folder: its manifest, and its images checked against what the suite renders now.

    The manifest is opened on first use inside a test, so a missing baseline makes each test FAIL (with the
    command that creates it), rather than error in setup or skip.
    """

    def __init__(self, directory: Path, suite_variant):
        self.directory, self._suite_variant, self._manifest = directory, suite_variant, None

    @property
    def manifest(self) -> dict:
        if self._manifest is None:
            self._manifest = open_baseline(self.directory)
        return self._manifest

    @property
    def thresholds(self) -> dict:
        return self.manifest["thresholds"]

    def threshold(self, name: str) -> float:
        value = self.thresholds.get("ssim", {}).get(name)
        if value is None:
            pytest.fail(
                f"{self.directory / baselines.MANIFEST} has no SSIM threshold for {name}; regenerate it "
                f"with {baselines.CREATE_HINT}",
                pytrace=False,
            )
        return value

    def image(self, name: str, case: int) -> Image.Image:
        prompt, seed = CASES[case]
        wanted = baselines.entry_for(self._suite_variant(name), prompt, seed)
        try:
            entry = baselines.find_entry(self.manifest, name, prompt, seed)
            problem = baselines.mismatch(entry, wanted)
            if problem:
                raise UserError(problem)
            return baselines.load_image(self.directory, entry)
        except UserError as exc:
            pytest.fail(f"{self.directory}: {exc}", pytrace=False)


def open_baseline(directory: Path) -> dict:
    """The manifest, or a test failure (never a skip) that names the command creating it."""
    try:
        return baselines.load_manifest(directory)
    except UserError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="module")
def baseline_root(pytestconfig) -> Path:
    root = Path(pytestconfig.getoption("--baseline-dir"))
    return root if root.is_absolute() else pytestconfig.rootpath / root


@pytest.fixture(scope="module")
def stored(pytestconfig, baseline_root, suite_model, hardware, suite_variant, suite_device, rendered) -> Stored:
    directory = baselines.baseline_dir(baseline_root, suite_model, hardware)
    if pytestconfig.getoption("--update-baselines"):
        update_baselines(directory, suite_model, hardware, suite_variant, suite_device, rendered)
    return Stored(directory, suite_variant)


def update_baselines(directory, model, hardware, suite_variant, device, rendered) -> None:
    """Render every variant, store the FP16 / LCM-LoRA / Turbo images, record 8-bit vs FP16 as measured."""
    from sdxl_core.reports.run_report import device_info

    entries, images = [], []
    for name in OWN_BASELINE:
        for (prompt, seed), image in zip(CASES, rendered(name), strict=True):
            entries.append(baselines.entry_for(suite_variant(name), prompt, seed))
            images.append(image)
    measured = {
        name: [
            {"prompt": prompt, "seed": seed, **_rounded(metrics.compare(ref, img))}
            for (prompt, seed), ref, img in zip(CASES, rendered(FP16), rendered(name), strict=True)
        ]
        for name in QUANTIZED
    }
    device_facts = {**device_info(device), "slug": baselines.hardware_slug(hardware)}
    baselines.write_baseline(
        directory,
        entries,
        images,
        baselines.default_thresholds(model),
        device=device_facts,
        measured=measured,
        model=model,
    )


def _rounded(values: dict) -> dict:
    return {k: round(v, 5) if np.isfinite(v) else None for k, v in values.items()}


# ---------------------------------------------------------------------------------------------------------------
# The comparison every image test makes; on failure it leaves a side-by-side PNG behind and names it.


def check_similar(reference, candidate, threshold: float, label: str, out_dir: Path) -> dict:
    values = metrics.compare(reference, candidate)
    if values["ssim"] < threshold:
        from sdxl_core.reports.images import side_by_side

        path = Path(out_dir) / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', label)}.png"
        pair = {"reference": reference, "candidate": candidate}
        side_by_side({k: Image.fromarray(metrics.to_array(v)) for k, v in pair.items()}, "reference").save(path)
        pytest.fail(
            f"{label}: SSIM {values['ssim']:.5f} < threshold {threshold} (PSNR {values['psnr']:.2f} dB); "
            f"reference | candidate | SSIM heat map: {path}",
            pytrace=False,
        )
    return values


def _report(record_property, label: str, values: dict, threshold: float) -> None:
    record_property("ssim", round(values["ssim"], 5))
    record_property("psnr_db", round(values["psnr"], 2))
    record_property("ssim_threshold", threshold)
    print(f"{label}: SSIM {values['ssim']:.5f} (>= {threshold}), PSNR {values['psnr']:.2f} dB")


# ---------------------------------------------------------------------------------------------------------------
# Image tests.


@pytest.mark.slow
@pytest.mark.parametrize("case", range(len(CASES)), ids=CASE_IDS)
@pytest.mark.parametrize("name", each_variant(OWN_BASELINE))
def test_matches_own_baseline(name, case, stored, rendered, tmp_path, record_property):
    """FP16, LCM-LoRA and Turbo: today's image against the one stored for this model and hardware."""
    threshold = stored.thresholds["regression_ssim"]
    reference = stored.image(name, case)
    values = check_similar(
        reference, rendered(name)[case], threshold, f"{name} {CASE_IDS[case]} vs stored {name}", tmp_path
    )
    _report(record_property, f"{name} {CASE_IDS[case]}", values, threshold)


@pytest.mark.slow
@pytest.mark.parametrize("case", range(len(CASES)), ids=CASE_IDS)
@pytest.mark.parametrize("name", each_variant(QUANTIZED))
def test_8bit_close_to_fp16(name, case, stored, rendered, tmp_path, record_property):
    """INT8 and FP8 against the stored FP16 image of the same prompt and seed."""
    threshold = stored.threshold(name)
    reference = stored.image(FP16, case)
    values = check_similar(
        reference, rendered(name)[case], threshold, f"{name} {CASE_IDS[case]} vs stored {FP16}", tmp_path
    )
    _report(record_property, f"{name} {CASE_IDS[case]} vs {FP16}", values, threshold)


def test_wrong_images_fail(stored, tmp_path):
    """The thresholds can fail: clearly wrong candidates score below every one of them, and the failure
    message names a side-by-side PNG that exists."""
    reference = np.asarray(stored.image(FP16, 0))
    rng = np.random.default_rng(0)
    wrong = {
        "another seed": np.asarray(stored.image(FP16, 1)),
        "uniform noise": rng.integers(0, 256, reference.shape, dtype=np.uint8),
        "shifted 1 px": np.roll(reference, 1, axis=1),
        "pixel noise sigma 8": np.clip(reference + rng.normal(0, 8, reference.shape), 0, 255).round().astype(np.uint8),
    }
    assert CASES[0][1] != CASES[1][1], "'another seed' needs the two cases to use different seeds"
    thresholds = [stored.thresholds["regression_ssim"], *(stored.threshold(n) for n in QUANTIZED)]
    for label, candidate in wrong.items():
        with pytest.raises(pytest.fail.Exception) as failure:
            check_similar(reference, candidate, min(thresholds), label, tmp_path)
        path = Path(str(failure.value.msg).rsplit(": ", 1)[-1])
        assert path.is_file() and path.parent == tmp_path, failure.value.msg
        assert Image.open(path).width > 3 * reference.shape[1]  # reference, candidate, heat map


@pytest.mark.slow
@pytest.mark.parametrize("name", each_variant(QUANTIZED))
def test_clip_score_drop(name, stored, rendered, suite_model, suite_device, record_property):
    """Mean CLIP score of the 8-bit images may fall at most `clip_drop` below the stored FP16 images'."""
    from sdxl_core.models import BUILTIN_MODELS

    if baselines.model_slug(suite_model) in BUILTIN_MODELS:
        pytest.skip(
            f"needs real SDXL weights (--model stabilityai/stable-diffusion-xl-base-1.0 or a local "
            f"diffusers dir) and the open_clip ViT-B-32 'openai' weights in the local Hugging Face cache: "
            f"'{suite_model}' has random weights, so its CLIP scores mean nothing"
        )
    try:
        scorer = metrics.ClipScorer("openai", device=str(suite_device))
    except metrics.MissingWeights as exc:
        pytest.skip(str(exc))
    prompts = [prompt for prompt, _ in CASES]
    reference = statistics.fmean(scorer.score([stored.image(FP16, i) for i in range(len(CASES))], prompts))
    candidate = statistics.fmean(scorer.score(rendered(name), prompts))
    limit = stored.thresholds["clip_drop"]
    record_property("clip_fp16", round(reference, 3))
    record_property(f"clip_{name}", round(candidate, 3))
    print(f"CLIP score: {FP16} {reference:.3f}, {name} {candidate:.3f}, drop {reference - candidate:.3f}")
    assert reference - candidate <= limit, (
        f"{name} CLIP score {candidate:.3f} is {reference - candidate:.3f} below "
        f"{FP16}'s {reference:.3f}: more than the allowed {limit}"
    )


# ---------------------------------------------------------------------------------------------------------------
# The quality sweep (`--prompts N|FILE`): one test per prompt and 8-bit variant, spread over the workers.


@pytest.fixture(scope="module")
def sweep_limits(baseline_root, suite_model, hardware):
    """variant -> the sweep's thresholds: the stored baseline's where there is one, else THRESHOLDS'."""
    try:
        stored = baselines.load_manifest(baselines.baseline_dir(baseline_root, suite_model, hardware))["thresholds"]
    except UserError:
        stored = None
    return lambda name: baselines.sweep_thresholds(suite_model, stored, name)


@pytest.fixture(scope="module")
def sweep_clip(suite_model, suite_device):
    """A CLIP scorer, or why there is none: SSIM and PSNR do not need one, so its absence skips no prompt."""
    from sdxl_core.models import BUILTIN_MODELS

    if baselines.model_slug(suite_model) in BUILTIN_MODELS:
        return f"not measured: '{suite_model}' has random weights, so its CLIP scores mean nothing"
    try:
        return metrics.ClipScorer("openai", device=str(suite_device))
    except metrics.MissingWeights as exc:
        return f"not measured: {exc}"


@pytest.fixture(scope="module")
def fp16_image(build_engine):
    """(index, prompt) -> the FP16 image at seed `index`, rendered once per worker."""
    cache = {}

    def render(index: int, prompt: str):
        if index not in cache:
            cache[index] = build_engine(FP16).generate(prompt, seed=index).images[0]
        return cache[index]

    return render


@pytest.mark.slow
@pytest.mark.parametrize("name", each_variant(QUANTIZED, FP16))
def test_sweep_8bit_close_to_fp16(
    name, sweep_prompt, fp16_image, build_engine, sweep_limits, sweep_clip, tmp_path, record_property
):
    """One prompt of the sweep: FP16 and 8-bit images rendered here (so prompts shard over workers), this prompt
    held to the worst-prompt threshold; the mean over all prompts is checked at the end of the run (conftest.py),
    from the record each prompt sends home."""
    index, prompt = sweep_prompt
    reference = fp16_image(index, prompt)
    candidate = build_engine(name).generate(prompt, seed=index).images[0]
    values = metrics.compare(reference, candidate)
    limits = sweep_limits(name)
    record = {
        "variant": name,
        "index": index,
        "seed": index,
        "prompt": prompt,
        "ssim": round(values["ssim"], 5),
        "psnr": round(values["psnr"], 2) if np.isfinite(values["psnr"]) else None,
        "thresholds": limits,
        "clip_fp16": None,
        "clip_8bit": None,
        "clip_note": None,
    }
    if isinstance(sweep_clip, str):
        record["clip_note"] = sweep_clip
    else:
        record["clip_fp16"], record["clip_8bit"] = (
            round(v, 3) for v in sweep_clip.score([reference, candidate], [prompt, prompt])
        )
    record_property(sweep.PROPERTY, record)
    check_similar(reference, candidate, limits["worst_ssim"], f"{name} {sweep.prompt_id(index)} vs {FP16}", tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# The baseline store itself (fast: no rendering).


def test_missing_baseline_fails_with_the_command(tmp_path):
    with pytest.raises(UserError, match=re.escape("pytest -m quality --update-baselines")) as info:
        baselines.load_manifest(tmp_path / "tiny" / "cpu")
    assert "nox -s baselines" in str(info.value)
    with pytest.raises(pytest.fail.Exception, match="--update-baselines"):  # a failure, not a skip
        open_baseline(tmp_path / "tiny" / "cpu")


def test_baseline_round_trip_and_checksum(tmp_path):
    from sdxl_core.variants import get_variant

    variant = get_variant(FP16).replace(model="tiny", height=16, width=16, steps=2)
    images = [Image.fromarray(np.full((16, 16, 3), v, dtype=np.uint8)) for v in (10, 200)]
    entries = [baselines.entry_for(variant, prompt, seed) for prompt, seed in CASES]
    directory = baselines.baseline_dir(tmp_path, "tiny", "cpu")
    (directory).mkdir(parents=True)
    (directory / "stale.png").write_bytes(b"old")
    baselines.write_baseline(directory, entries, images, baselines.default_thresholds("tiny"), libraries={})

    manifest = baselines.load_manifest(directory)
    assert manifest["thresholds"]["regression_ssim"] == baselines.THRESHOLDS["tiny"]["regression_ssim"]
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        [baselines.MANIFEST] + [e["file"] for e in manifest["entries"]]
    )
    entry = baselines.find_entry(manifest, FP16, *CASES[1])
    assert np.array_equal(np.asarray(baselines.load_image(directory, entry)), np.asarray(images[1]))
    assert baselines.mismatch(entry, baselines.entry_for(variant, *CASES[1])) is None
    assert "steps=2 (now 4)" in baselines.mismatch(entry, baselines.entry_for(variant.replace(steps=4), *CASES[1]))

    (directory / entry["file"]).write_bytes(baselines._png_bytes(images[0]))
    with pytest.raises(UserError, match="sha256"):
        baselines.load_image(directory, entry)


@pytest.mark.parametrize(
    "device, slug",
    [
        ("cpu", "cpu"),
        ({"cuda": False, "name": "cpu", "capability": None}, "cpu"),
        ("NVIDIA H100 80GB HBM3", "hopper"),
        ({"cuda": True, "name": "NVIDIA H100 PCIe", "capability": (9, 0)}, "hopper"),
        ("NVIDIA H200", "hopper"),
        ({"cuda": True, "name": "NVIDIA Graphics Device", "capability": (9, 0)}, "hopper"),
        ("NVIDIA A100-SXM4-80GB", "ampere"),
        ("NVIDIA GeForce RTX 4090", "ada"),
        ("Tesla T4", "t4"),
        ({"cuda": True, "name": "NVIDIA Graphics Device", "capability": (7, 0)}, "sm70"),
    ],
)
def test_hardware_slug(device, slug):
    assert baselines.hardware_slug(device) == slug
    assert baselines.baseline_dir("b", "stabilityai/sdxl-turbo", device) == Path("b", "sdxl-turbo", slug)
