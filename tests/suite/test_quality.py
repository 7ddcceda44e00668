"""Is every variant still right? Each variant's renders against its own stored references, 8-bit against FP16.

Baselines live in `--baseline-dir`/<model>/<hardware>/ (sdxl_core/suite/baselines.py); on CPU CI that is the
committed `baselines/tiny/cpu/`. Per variant (FP16, INT8, FP8, LCM-LoRA, Turbo) they hold the final latents of
each case, the UNet output for fixed inputs and an image copy; sdxl_core/suite/references.py says how each is
compared and how its tolerance was measured (written into the manifest beside the value, with its factor). A
failure writes stored | current | SSIM heat map to a PNG and says whether library versions or the device changed
since the baseline was made (drift after an upgrade), whether an 8-bit engine runs some layers on another path or
kernel than the baseline's engine (the dispatch's timing-dependent choice), or neither (a regression). 8-bit vs FP16
(the quantization gap) is SSIM against limits set from measured values.

`--update-baselines` first rewrites the variants this run selects (`--variants`; the others' stored entries stay),
measuring the tolerances, then every test still compares. A missing baseline fails, naming the command.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdxl_core import metrics
from sdxl_core.errors import UserError
from sdxl_core.suite import baselines, references, sweep
from sdxl_core.suite.baselines import CASES, QUANTIZED, VARIANTS

# Under xdist each test runs on its variant's worker (the plugin groups them by `needs_variants`); with
# --update-baselines they all run on one worker, which renders every selected variant and writes the baseline.
pytestmark = [pytest.mark.quality]

FP16 = "xl-1.0-fp16"
CASE_IDS = [f"case{i}" for i in range(len(CASES))]
# With the prompt as its own negative prompt, how far the render may move with the guidance scale, as a fraction of
# how far it moves with an empty negative prompt: measured 0 (bit-identical halves) on tiny on the CPU and 0.0042
# on sdxl-random on Hopper (0.00119 against 0.282, the GPU's kernels round the two identical halves apart); a dropped
# negative prompt measures 1 by construction. 0.04: ten times Hopper's value, 25 times under the bug's.
NEGATIVE_PROMPT_LIMIT = 0.04
# A batch of two against renders alone (`test_a_batch_renders_each_prompt_as_it_renders_alone`), as fractions of
# what another prompt moves the latents. On tiny on the CPU: the first image moves by 5e-6 of it (other batch
# shapes round apart), the second image's other prompt by 0.96 and one prompt twice by 3.4; interleaved CFG halves
# move the first image by 1.6 (0.634 against 0.402) and shared noise leaves one prompt twice at 0. On sdxl-random on
# Hopper: the first image by 0.0027 (0.00096 against 0.353: batched kernels round apart), the second by 0.99, one
# prompt twice by 3.2. The limit: ten times Hopper's first-image value, 50 times under interleaved halves; the share
# a quarter of the smallest correct value (0.96).
BATCH_LIMIT = 0.03
# Our pipeline against diffusers' SDXL pipeline on `tiny` on the CPU, as the largest relative difference of any UNet
# input or the final latents: measured 2.2e-6 (FP16: the pooled embeddings round apart by a batch's make-up, and the
# latents carry it), 0 for LCM-LoRA and Turbo. 1e-4: 45 times that; height and width swapped in the size
# conditioning measure 0.39 there (0.51 in the next step's latents).
REFERENCE_LIMIT = 1e-4
DISTINCT_SHARE = 0.25


def each_variant(names, *also):
    """`names` as parameters, each marked with the engines its test builds (`--variants` deselects the rest)."""
    return [pytest.param(name, marks=pytest.mark.needs_variants(*also, name)) for name in names]


# ---------------------------------------------------------------------------------------------------------------
# Fixtures: render each variant's cases once per module; open (or first rewrite) the stored baseline.


@dataclass
class Rendered:
    engine: object
    results: list  # pipeline.Result per case
    _probe: dict = field(default_factory=dict)

    @property
    def images(self) -> list[Image.Image]:
        return [result.images[0] for result in self.results]

    @property
    def probe(self) -> dict:
        if not self._probe:
            self._probe.update(references.unet_probe(self.engine))
        return self._probe

    @property
    def paths(self) -> dict | None:
        """Which path and kernel each quantized layer of the engine runs (None for FP16)."""
        return references.layer_paths(self.engine.components.unet)


@pytest.fixture(scope="module")
def rendered(build_engine):
    """name -> the variant's renders of CASES (and its UNet probe, on first use), made once."""
    cache: dict[str, Rendered] = {}

    def render(name: str) -> Rendered:
        if name not in cache:
            engine = build_engine(name)
            cache[name] = Rendered(engine, [references.render(engine, prompt, seed) for prompt, seed in CASES])
        return cache[name]

    return render


class Stored:
    """A baseline folder: its manifest, images and tensors, checked against what the suite renders now.

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

    def _or_fail(self, read):
        try:
            return read()
        except UserError as exc:
            pytest.fail(f"{self.directory}: {exc}", pytrace=False)

    def record(self, name: str) -> dict:
        return self._or_fail(lambda: baselines.variant_record(self.manifest, name))

    def tolerance(self, name: str, kind: str, this_run: dict) -> float:
        """The tolerance check_own applies to `kind` of `name` in this run."""
        record = self.record(name)
        return record["tolerances"][kind]["value" if same_device(record, this_run) else "other_device"]

    def gap(self, name: str) -> float:
        value = self.manifest["thresholds"].get("ssim", {}).get(name)
        if value is None:
            pytest.fail(
                f"{self.directory / baselines.MANIFEST} has no SSIM threshold for {name} vs {FP16}; regenerate it "
                f"with {baselines.CREATE_HINT} --variants={FP16},{name}",
                pytrace=False,
            )
        return baselines.limit(value)

    def entry(self, name: str, case: int) -> dict:
        prompt, seed = CASES[case]
        wanted = baselines.entry_for(self._suite_variant(name), prompt, seed)

        def read():
            entry = baselines.find_entry(self.manifest, name, prompt, seed)
            problem = baselines.mismatch(entry, wanted)
            if problem:
                raise UserError(problem)
            return entry

        return self._or_fail(read)

    def image(self, name: str, case: int) -> Image.Image:
        return self._or_fail(lambda: baselines.load_image(self.directory, self.entry(name, case)))

    def tensors(self, name: str, case: int) -> dict:
        entry = self.entry(name, case)
        return self._or_fail(lambda: baselines.load_tensors(self.directory, entry["tensors"], entry["tensors_sha256"]))

    def probe(self, name: str) -> dict:
        probe = self.record(name)["probe"]
        return self._or_fail(lambda: baselines.load_tensors(self.directory, probe["file"], probe["sha256"]))


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
def this_run(suite_device) -> dict:
    """The library versions and device of this run, as a manifest records them."""
    from sdxl_core.hardware import device_info, library_versions

    device = device_info(suite_device)
    if suite_device.type == "cpu":  # which vector kernels ran: AVX-512 and AVX2 round differently
        device["isa"] = torch.backends.cpu.get_cpu_capability()
    return {"libraries": library_versions(suite_device), "device": device}


@pytest.fixture(scope="module")
def stored(pytestconfig, baseline_root, suite_model, hardware, suite_variant, this_run, rendered) -> Stored:
    directory = baselines.baseline_dir(baseline_root, suite_model, hardware)
    if pytestconfig.getoption("--update-baselines"):
        from sdxl_core.suite.plugin import selected_variants

        names = [name for name in VARIANTS if name in selected_variants(pytestconfig)]
        command = " ".join(["pytest", *pytestconfig.invocation_params.args])
        update_baselines(directory, suite_model, hardware, suite_variant, this_run, rendered, names, command)
    return Stored(directory, suite_variant)


def update_baselines(directory, model, hardware, suite_variant, this_run, rendered, names, command) -> None:
    """Store each of `names`: image copies, tensors and the UNet probe, with tolerances measured here (floors
    of an unchanged code path, references.measure_floor); 8-bit vs FP16 measured where both are rendered."""
    device = {**this_run["device"], "slug": baselines.hardware_slug(hardware)}
    records = {}
    for name in names:
        done = rendered(name)
        floor = references.measure_floor(done.engine, CASES, done.results, done.probe)
        dtype = done.engine.engines.dtype
        tolerances = {kind: references.tolerance(floor[kind], references.epsilon(kind, dtype)) for kind in floor}
        renders = [
            (
                baselines.entry_for(suite_variant(name), prompt, seed),
                references.image_copy(result.images[0]),
                references.case_tensors(result),
            )
            for (prompt, seed), result in zip(CASES, done.results, strict=True)
        ]
        records[name] = baselines.write_variant(
            directory,
            name,
            renders,
            done.probe,
            tolerances,
            device=device,
            libraries=this_run["libraries"],
            command=command,
            paths=done.paths,
        )
    gaps = {
        name: [
            metrics.ssim(fp16, image) for fp16, image in zip(rendered(FP16).images, rendered(name).images, strict=True)
        ]
        for name in QUANTIZED
        if name in names and FP16 in names
    }
    baselines.write_manifest(
        directory, model, baselines.hardware_slug(hardware), records, baselines.gap_thresholds(gaps)
    )


# ---------------------------------------------------------------------------------------------------------------
# The comparisons; a failure leaves stored | current | SSIM heat map behind, names it, and says what changed.


def grid(stored_image, current, label: str, out_dir: Path) -> Path:
    from sdxl_core.reports.images import side_by_side

    path = Path(out_dir) / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', label)}.png"
    side_by_side({"stored": stored_image, "current": references.image_copy(current)}, "stored").save(path)
    return path


def same_device(record: dict, this_run: dict) -> bool:
    was, now = record.get("device") or {}, this_run["device"]
    return (was.get("name"), was.get("isa")) == (now.get("name"), now.get("isa"))


def _floor(tolerance: dict, tier: str) -> float:
    """The measured floor behind `tier`: the `scales` source (another device's calibration) only for other_device."""
    return max(v for source, v in tolerance["measured"].items() if tier == "other_device" or source != "scales")


def check_own(
    label: str, differences: dict, record: dict, this_run: dict, picture, out_dir: Path, paths: dict | None = None
) -> None:
    """`differences`: kind -> this render's difference from the stored one; each within its tolerance (the one for
    the device that made the baseline, or for another device of its hardware class), or a failure naming every
    check over, what changed since the baseline, and the grid (`picture` = (stored image, current image)).
    `paths`: the current 8-bit engine's layer paths (references.layer_paths), compared with the stored ones."""
    tier = "value" if same_device(record, this_run) else "other_device"
    over = {
        kind: f"{kind} differ by {value:.3g} > tolerance {tol[tier]:.3g} (measured floor {_floor(tol, tier):.3g}, "
        f"epsilon {tol['epsilon']:.3g}, x{tol['factor']:g}{'' if tier == 'value' else ', for another device'})"
        for kind, value in differences.items()
        if not value <= (tol := record["tolerances"][kind])[tier]
    }
    if not over:
        return
    cause = baselines.failure_cause(record, this_run["libraries"], this_run["device"], over, paths)
    path = grid(*picture, label, out_dir)
    pytest.fail(
        f"{label}: {'; '.join(over.values())}. {cause}. stored | current | SSIM heat map: {path}", pytrace=False
    )


def check_similar(reference, candidate, threshold: float, label: str, out_dir: Path) -> dict:
    values = metrics.compare(reference, candidate)
    if not values["ssim"] >= threshold:
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


# ---------------------------------------------------------------------------------------------------------------
# Each variant against its own stored references.


@pytest.mark.slow
@pytest.mark.parametrize("case", range(len(CASES)), ids=CASE_IDS)
@pytest.mark.parametrize("name", each_variant(VARIANTS))
def test_matches_own_baseline(name, case, stored, rendered, this_run, tmp_path, record_property):
    """Final latents (relative L2) and the image (mean 8-bit levels) against this variant's stored render."""
    result = rendered(name).results[case]
    stored_image = stored.image(name, case)
    differences = {
        "latents": references.relative_difference(result.latents, stored.tensors(name, case)["latents"]),
        "image": references.image_difference(result.images[0], stored_image),
    }
    for kind, value in differences.items():
        record_property(f"{kind}_difference", value)
    label = f"{name} {CASE_IDS[case]} vs stored {name}"
    picture = (stored_image, result.images[0])
    check_own(label, differences, stored.record(name), this_run, picture, tmp_path, rendered(name).paths)


@pytest.mark.slow
@pytest.mark.parametrize("name", each_variant(VARIANTS))
def test_unet_matches_own_baseline(name, stored, rendered, this_run, tmp_path, record_property):
    """The UNet stage's output for fixed inputs at a few timesteps against this variant's stored output; for an
    8-bit variant also its calibrated numbers (scales, weights, SmoothQuant factors, per layer)."""
    current, reference = rendered(name).probe, stored.probe(name)
    differences = {"unet": references.tensors_difference(*map(references.probe_outputs, (current, reference)))}
    if references.probe_state(reference) or references.probe_state(current):
        differences["quant"] = references.tensors_difference(*map(references.probe_state, (current, reference)))
    for kind, value in differences.items():
        record_property(f"{kind}_difference", value)
    picture = (stored.image(name, 0), rendered(name).results[0].images[0])
    label = f"{name} UNet vs stored {name}"
    check_own(label, differences, stored.record(name), this_run, picture, tmp_path, rendered(name).paths)


@pytest.mark.slow
@pytest.mark.parametrize("case", range(len(CASES)), ids=CASE_IDS)
@pytest.mark.parametrize("name", each_variant(QUANTIZED, FP16))
def test_8bit_close_to_fp16(name, case, stored, rendered, tmp_path, record_property):
    """The quantization gap: INT8 and FP8 against FP16's image of the same prompt and seed (FP16 itself is held
    to its stored render above)."""
    threshold = stored.gap(name)
    reference, candidate = rendered(FP16).images[case], rendered(name).images[case]
    values = check_similar(reference, candidate, threshold, f"{name} {CASE_IDS[case]} vs {FP16}", tmp_path)
    record_property("ssim", round(values["ssim"], 5))
    record_property("ssim_threshold", threshold)
    print(f"{name} {CASE_IDS[case]} vs {FP16}: SSIM {values['ssim']:.5f} (>= {threshold}), PSNR {values['psnr']:.2f}")


def _damaged_below(reference: np.ndarray, damage, target: float) -> np.ndarray:
    """`damage(strength)` at the smallest strength in [0, 1] (bisected) whose SSIM against `reference` is below
    `target`, or at full strength where none is."""
    low, high = 0.0, 1.0
    for _ in range(24):
        middle = (low + high) / 2
        low, high = (middle, high) if metrics.ssim(reference, damage(middle)) >= target else (low, middle)
    return damage(high)


@pytest.mark.slow
@pytest.mark.needs_variants(FP16)
def test_negative_prompt_conditions_the_unconditional_half(build_engine, record_property):
    """Classifier-free guidance with the prompt as its own negative prompt: the UNet batch's two halves are the same
    inputs, so noise = uncond + g (cond - uncond) = uncond and the render cannot depend on the guidance scale g. A
    negative prompt that is dropped, or encoded or pooled otherwise than the prompt, breaks that, which the stored
    renders (empty negative prompt, the demo's default) cannot see. No baseline: it holds on any device. The
    render's change with g is compared with the change g makes with the empty negative prompt."""
    import dataclasses

    engine = build_engine(FP16)
    prompt, seed = CASES[0]
    scales = (engine.variant.guidance_scale, engine.variant.guidance_scale + 3.0)

    def latents(scale: float, negative_prompt: str) -> torch.Tensor:
        run = dataclasses.replace(engine, variant=engine.variant.replace(guidance_scale=scale))
        return run.generate(prompt, seed=seed, negative_prompt=negative_prompt).latents.cpu()

    def moved(negative_prompt: str) -> float:
        return references.relative_difference(*(latents(g, negative_prompt) for g in scales))

    same, empty = moved(prompt), moved("")
    record_property("guidance_moves_own_negative", same)
    record_property("guidance_moves_empty_negative", empty)
    print(
        f"guidance {scales[0]} -> {scales[1]} moves the latents by {same:.3g} with the prompt as negative prompt, "
        f"{empty:.3g} with an empty one"
    )
    assert empty > 0.01, f"the guidance scale barely moves the render ({empty:.3g}): this check would see nothing"
    assert same <= NEGATIVE_PROMPT_LIMIT * empty, (
        f"with the prompt as its own negative prompt the render still moves with the guidance scale ({same:.3g}, "
        f"limit {NEGATIVE_PROMPT_LIMIT} x {empty:.3g}): the negative prompt does not condition the UNet as the "
        "prompt does"
    )


@pytest.mark.slow
@pytest.mark.needs_variants(FP16)
def test_a_batch_renders_each_prompt_as_it_renders_alone(build_engine, record_property):
    """Every stored render is batch 1 (the demo's default), where a batch that mixes up its prompts, its CFG halves
    or its noise looks like any other. Two prompts in one batch (an engine built for `--batch-size 2`): the first
    image is its prompt's render alone, since torch draws a batch's noise as the single image's followed by the next
    (checked here first); the second follows its own prompt; and one prompt twice gives two images. No baseline:
    each difference is measured against what another prompt moves the same latents."""
    from sdxl_core import pipeline

    single, double = build_engine(FP16), build_engine(FP16, batch_size=2)
    (a, seed), (b, _) = CASES[0], CASES[1]
    shape = (4, single.variant.height // 8, single.variant.width // 8)
    noise = [torch.randn((n, *shape), generator=torch.Generator("cpu").manual_seed(seed)) for n in (1, 2)]
    assert torch.equal(noise[1][:1], noise[0]), "torch no longer draws a batch's noise as its first image's first"

    def latents(engine, prompts: list[str]) -> torch.Tensor:
        ran = pipeline.txt2img(engine.engines, engine.components, engine.variant, prompts, seed=seed)
        return ran.latents.float().cpu()

    alone_a, alone_b = latents(single, [a]), latents(single, [b])
    a_b, a_a = latents(double, [a, b]), latents(double, [a, a])
    prompt_moves = references.relative_difference(alone_b, alone_a)
    moved = {
        "first_image_vs_alone": references.relative_difference(a_b[:1], alone_a),
        "second_image_other_prompt": references.relative_difference(a_b[1:], a_a[1:]),
        "one_prompt_twice": references.relative_difference(a_a[1:], a_a[:1]),
    }
    for key, value in moved.items():
        record_property(key, value)
    print(f"another prompt moves the latents by {prompt_moves:.3g}; in a batch of two: {moved}")
    assert prompt_moves > 0.01, f"another prompt barely moves the render ({prompt_moves:.3g}): nothing to compare"
    assert moved["first_image_vs_alone"] <= BATCH_LIMIT * prompt_moves, (
        f"the first image of a batch of two is not its prompt's render alone ({moved['first_image_vs_alone']:.3g}, "
        f"limit {BATCH_LIMIT} x {prompt_moves:.3g}): the batch mixes its prompts, CFG halves or conditioning"
    )
    assert moved["second_image_other_prompt"] >= DISTINCT_SHARE * prompt_moves, (
        f"the second image of a batch barely follows its own prompt ({moved['second_image_other_prompt']:.3g}, "
        f"against {prompt_moves:.3g} alone)"
    )
    assert moved["one_prompt_twice"] >= DISTINCT_SHARE * prompt_moves, (
        f"one prompt twice in a batch gives (nearly) the same image twice ({moved['one_prompt_twice']:.3g}): "
        "the images share their noise"
    )


class _Stop(Exception):
    """Ends a reference pipeline run once it has what the test compares."""


@pytest.mark.parametrize("name", each_variant([FP16, "xl-1.0-lcm-lora", "xl-turbo"]))
def test_the_unet_gets_what_diffusers_sdxl_pipeline_gives_it(name, tmp_path):
    """Against the reference, not a stored render: diffusers' StableDiffusionXLPipeline, run on the same `tiny`
    components, scheduler and initial noise, for a batch of two prompts with a negative prompt at a non-square
    size, which no stored case covers. Every UNet call gets the same inputs (latents, timestep, text states,
    pooled embeddings, size conditioning) and the final latents agree. On the CPU whatever the suite's device: it
    checks the pipeline's logic, not a kernel. `force_zeros_for_empty_prompt` is off: the demo encodes an empty
    negative prompt, as this pipeline does."""
    import dataclasses

    from sdxl_core import models, pipeline, run
    from sdxl_core.variants import get_variant, on_model

    variant = on_model(get_variant(name), "tiny").replace(height=64, width=96)
    if variant.lora_path:
        models.make_builtin_lora("tiny", tmp_path)
        variant = variant.replace(lora_path=str(tmp_path / "pytorch_lora_weights.safetensors"))
    ready = run.prepare(variant, run.Options(engine_dir=None, progress=False), device=torch.device("cpu"))
    parts = ready.components
    prompts, negative, seed = ["a red fox in fresh snow", "a lighthouse at dusk"], "blurry, low quality", 7
    ours, reference = [], []

    def recorded(sample, t, hidden, text_embeds, time_ids):
        ours.append((sample, t, hidden, text_embeds, time_ids))
        return ready.engines.unet(sample, t, hidden, text_embeds, time_ids)

    engines = dataclasses.replace(ready.engines, unet=recorded)
    latents = pipeline.txt2img(engines, parts, variant, prompts, negative_prompt=negative, seed=seed).latents

    def hook(_module, args, kwargs):
        added = kwargs["added_cond_kwargs"]
        reference.append((args[0], args[1], kwargs["encoder_hidden_states"], added["text_embeds"], added["time_ids"]))

    scheduler = pipeline.make_scheduler(variant.scheduler, parts.scheduler_config, turbo=variant.version == "xl-turbo")
    reference_pipeline = models.diffusers_pipeline(parts, scheduler, force_zeros_for_empty_prompt=False)
    reference_pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(seed)  # the noise first, then the scheduler's draws, as ours
    noise = torch.randn((len(prompts), 4, variant.height // 8, variant.width // 8), generator=generator)
    handle = parts.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        expected = reference_pipeline(
            prompt=prompts,
            negative_prompt=[negative] * len(prompts) if variant.do_cfg else None,
            height=variant.height,
            width=variant.width,
            num_inference_steps=variant.steps,
            guidance_scale=variant.guidance_scale,
            latents=noise,
            generator=generator,
            output_type="latent",
        ).images
    finally:
        handle.remove()
    assert len(ours) == len(reference) == variant.steps, (len(ours), len(reference))
    names = ("latents in", "timestep", "text states", "pooled text embeddings", "size conditioning")
    moved = {}
    for step, (mine, theirs) in enumerate(zip(ours, reference, strict=True)):
        for what, a, b in zip(names, mine, theirs, strict=True):
            a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float().reshape(torch.as_tensor(a).shape)
            moved[f"UNet call {step}: {what}"] = references.relative_difference(a, b)
    moved["final latents"] = references.relative_difference(latents.float(), expected.float())
    worst = max(moved, key=moved.get)
    print(f"{name}: worst difference from diffusers' pipeline {moved[worst]:.3g} ({worst})")
    over = [what for what, value in moved.items() if value > REFERENCE_LIMIT]
    assert not over, (  # the first input that differs says most: later ones differ because of it
        f"{over[0]} differs from diffusers' StableDiffusionXLPipeline by {moved[over[0]]:.3g} (limit "
        f"{REFERENCE_LIMIT}; {len(over)} of {len(moved)} compared tensors differ, the worst {worst})"
    )


@pytest.mark.needs_variants(FP16)
def test_wrong_renders_fail(stored, this_run, tmp_path, pytestconfig):
    """Every check can fail: a damage sized from each stored tolerance and limit (twice past it) fails it, the
    failure names a grid PNG that exists, and the undamaged stored render passes. The 8-bit checks are damaged
    for the 8-bit variants this run selects (--variants)."""
    from sdxl_core.suite.plugin import selected_variants

    quantized = [name for name in QUANTIZED if name in selected_variants(pytestconfig)]
    record, image = stored.record(FP16), stored.image(FP16, 0)
    latents = stored.tensors(FP16, 0)["latents"]
    picture = (image, image)

    def fails(kind, difference):
        with pytest.raises(pytest.fail.Exception) as failure:
            check_own(f"damaged {kind}", {kind: difference}, record, this_run, picture, tmp_path)
        path = Path(str(failure.value.msg).rsplit(": ", 1)[-1])
        assert path.is_file() and path.parent == tmp_path, failure.value.msg

    check_own(
        "undamaged", {"latents": references.relative_difference(latents, latents)}, record, this_run, picture, tmp_path
    )
    # Latents: seeded noise scaled to twice the tolerance in relative L2; a uniform scale by 1 + 2 x tolerance.
    tol = stored.tolerance(FP16, "latents", this_run)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    noisy = latents.double() + noise * (2 * tol * latents.double().norm() / noise.norm())
    fails("latents", references.relative_difference(noisy, latents))
    fails("latents", references.relative_difference(latents.double() * (1 + 2 * tol), latents))
    # UNet probe: every stored output scaled by 1 + 2 x tolerance.
    probe, tol = stored.probe(FP16), stored.tolerance(FP16, "unet", this_run)
    fails("unet", references.tensors_difference({k: v.double() * (1 + 2 * tol) for k, v in probe.items()}, probe))
    # Calibrated numbers (8-bit variants): one activation scale off by twice the tolerance.
    for name in quantized:
        state = references.probe_state(stored.probe(name))
        damaged = {k: v.clone() for k, v in state.items()}
        damaged["quant.state"][0, 0] *= 1 + 2 * stored.tolerance(name, "quant", this_run)
        with pytest.raises(pytest.fail.Exception):
            check_own(
                "damaged quant",
                {"quant": references.tensors_difference(damaged, state)},
                stored.record(name),
                this_run,
                picture,
                tmp_path,
            )
    # Image: one 8-bit level on enough values for twice the tolerance; and another seed's render.
    pixels = np.asarray(image).astype(np.int16)
    count = min(pixels.size, int(np.ceil(2 * stored.tolerance(FP16, "image", this_run) * pixels.size)) + 1)
    flat = pixels.reshape(-1).copy()
    chosen = np.random.default_rng(0).permutation(flat.size)[:count]
    flat[chosen] += np.where(flat[chosen] < 255, 1, -1)
    damaged = Image.fromarray(flat.reshape(pixels.shape).clip(0, 255).astype(np.uint8))
    fails("image", references.image_difference(damaged, image))
    fails("image", references.image_difference(stored.image(FP16, 1), image))
    # The quantization gap: pixel noise, and a blend towards another seed's image, each as strong as it takes to
    # open twice the gap each limit allows (1 - SSIM = 2 x (1 - limit)).
    reference = np.asarray(image).astype(np.float64)
    other = np.asarray(stored.image(FP16, 1)).astype(np.float64)
    noise = np.random.default_rng(0).normal(0, 255, reference.shape)
    to_image = lambda x: np.clip(x, 0, 255).round().astype(np.uint8)  # noqa: E731
    damages = {
        "pixel noise": lambda strength: to_image(reference + strength * noise),
        "blend with another seed": lambda strength: to_image((1 - strength) * reference + strength * other),
    }
    for name in quantized:
        limit = stored.gap(name)
        for label, damage in damages.items():
            candidate = _damaged_below(to_image(reference), damage, 1 - 2 * (1 - limit))
            with pytest.raises(pytest.fail.Exception) as failure:
                check_similar(to_image(reference), candidate, limit, f"{name} {label}", tmp_path)
            assert Path(str(failure.value.msg).rsplit(": ", 1)[-1]).is_file(), failure.value.msg


@pytest.mark.slow
@pytest.mark.parametrize("name", each_variant(QUANTIZED, FP16))
def test_clip_score_drop(name, stored, rendered, suite_model, suite_device, record_property):
    """Mean CLIP score of the 8-bit images may fall at most `clip_drop` below FP16's."""
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
    reference = statistics.fmean(scorer.score(rendered(FP16).images, prompts))
    candidate = statistics.fmean(scorer.score(rendered(name).images, prompts))
    limit = baselines.sweep_thresholds(suite_model, stored.manifest["thresholds"], name)["clip_drop"]
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
    with pytest.raises(UserError, match=re.escape(baselines.CREATE_COMMAND)) as info:
        baselines.load_manifest(tmp_path / "tiny" / "cpu")
    assert "nox -s baselines" in str(info.value)
    with pytest.raises(pytest.fail.Exception, match="--update-baselines"):  # a failure, not a skip
        open_baseline(tmp_path / "tiny" / "cpu")


def _write(directory, name, value, *, libraries=None, thresholds=None):
    """A one-variant baseline whose image, latents and probe are filled with `value`."""
    from sdxl_core.variants import get_variant

    variant = get_variant(name).replace(model="tiny", height=16, width=16, steps=2)
    renders = [
        (
            baselines.entry_for(variant, prompt, seed),
            Image.fromarray(np.full((16, 16, 3), value + seed, dtype=np.uint8)),
            {"latents": torch.full((1, 4, 2, 2), float(value + seed))},
        )
        for prompt, seed in CASES
    ]
    probe = {"unet.t999": torch.full((2, 4, 2, 2), float(value))}
    tol = references.tolerance({"rerun": 0.0}, 1e-7)
    record = baselines.write_variant(
        directory,
        name,
        renders,
        probe,
        dict.fromkeys(references.KINDS, tol),
        device={"name": "cpu"},
        libraries=libraries or {"torch": "1.0"},
        command="test",
    )
    baselines.write_manifest(directory, "tiny", "cpu", {name: record}, thresholds or {})
    return variant


def test_baseline_round_trip_checksum_and_merge(tmp_path):
    """Files round-trip; a subset write keeps the other variants' entries and their files; a stale file goes."""
    directory = baselines.baseline_dir(tmp_path, "tiny", "cpu")
    directory.mkdir(parents=True)
    (directory / "stale.png").write_bytes(b"old")
    variant = _write(directory, FP16, 10, thresholds=baselines.gap_thresholds({"xl-1.0-int8": [0.999, 0.998]}))
    int8 = _write(directory, "xl-1.0-int8", 100)  # a subset: INT8 only

    manifest = baselines.load_manifest(directory)
    assert sorted(manifest["variants"]) == sorted([FP16, "xl-1.0-int8"])
    ssim = manifest["thresholds"]["ssim"]["xl-1.0-int8"]
    assert ssim == {"value": 0.994, "measured": 0.998, "factor": 3.0, "rule": ssim["rule"]}
    named = {baselines.MANIFEST}
    for record in manifest["variants"].values():
        named |= {record["probe"]["file"]} | {c[k] for c in record["cases"] for k in ("file", "tensors")}
    assert sorted(p.name for p in directory.iterdir()) == sorted(named)

    entry = baselines.find_entry(manifest, FP16, *CASES[1])
    assert np.asarray(baselines.load_image(directory, entry))[0, 0, 0] == 11
    assert baselines.load_tensors(directory, entry["tensors"], entry["tensors_sha256"])["latents"][0, 0, 0, 0] == 11
    assert baselines.mismatch(entry, baselines.entry_for(variant, *CASES[1])) is None
    assert "steps=2 (now 4)" in baselines.mismatch(entry, baselines.entry_for(variant.replace(steps=4), *CASES[1]))
    stored_int8 = baselines.find_entry(manifest, "xl-1.0-int8", *CASES[0])
    assert baselines.mismatch(stored_int8, baselines.entry_for(int8, *CASES[0])) is None
    other_calibration = baselines.entry_for(int8.replace(calibration_size=3), *CASES[0])
    assert "calibration_size=32 (now 3)" in baselines.mismatch(stored_int8, other_calibration)
    with pytest.raises(UserError, match="no xl-turbo; .*--variants=xl-turbo"):
        baselines.variant_record(manifest, "xl-turbo")

    (directory / entry["file"]).write_bytes(baselines._png_bytes(Image.new("RGB", (16, 16))))
    with pytest.raises(UserError, match="sha256"):
        baselines.load_image(directory, entry)


def test_failure_names_the_library_that_changed(tmp_path):
    record = {"libraries": {"torch": "2.14.1", "diffusers": "0.42.1"}, "device": {"name": "cpu"}}
    assert baselines.drift(record, {"torch": "2.14.1", "diffusers": "0.42.1"}, {"name": "cpu"}) == ""
    assert baselines.drift(record, {"torch": "2.15.0", "diffusers": "0.42.1"}, {"name": "cpu"}) == (
        "torch 2.14.1 -> 2.15.0"
    )
    record["tolerances"] = {"latents": references.tolerance({"rerun": 0.0}, 1e-7)}
    image = Image.new("RGB", (16, 16))
    now = {"libraries": {"torch": "2.15.0", "diffusers": "0.42.1"}, "device": {"name": "cpu"}}
    with pytest.raises(
        pytest.fail.Exception, match=r"changed since the baseline: torch 2.14.1 -> 2.15.0; drift \(an upgrade"
    ):
        check_own("x", {"latents": 1e-3}, record, now, (image, image), tmp_path)
    now["libraries"]["torch"] = "2.14.1"
    with pytest.raises(pytest.fail.Exception, match="same library versions and device as the baseline: a regression"):
        check_own("x", {"latents": 1e-3}, record, now, (image, image), tmp_path)


def test_failure_names_layers_on_other_paths(tmp_path):
    """An 8-bit engine running layers on other paths than the baseline's engine (the dispatch chose by timing): the
    failure says so instead of "a regression"; the same paths, or a baseline stored without them, keep the wording
    (tests/unit/test_baseline_paths.py checks the records on the tiny UNet)."""
    from sdxl_core.quant import qmodules

    layers = torch.nn.Sequential(
        *(qmodules.Int8Linear.empty_like(torch.nn.Linear(2, 2), smooth=False, per_channel=False) for _ in range(3))
    )
    stored_paths = references.layer_paths(layers)
    layers[1].set_gemm_path("16bit", torch.float32)
    now = {"libraries": {"torch": "2.14.1"}, "device": {"name": "cpu"}}
    record = {**now, "tolerances": {"latents": references.tolerance({"rerun": 0.0}, 1e-7)}, "paths": stored_paths}
    image = Image.new("RGB", (16, 16))
    with pytest.raises(
        pytest.fail.Exception, match=r"runs 1 layer on another path .* \(8bit -> 16bit: \* x1\)"
    ) as info:
        check_own("x", {"latents": 1e-3}, record, now, (image, image), tmp_path, references.layer_paths(layers))
    assert "a regression" not in str(info.value.msg)
    regression = "same library versions and device as the baseline: a regression"
    with pytest.raises(pytest.fail.Exception, match=regression):
        check_own("x", {"latents": 1e-3}, record, now, (image, image), tmp_path, stored_paths)
    del record["paths"]
    with pytest.raises(pytest.fail.Exception, match=regression):
        check_own("x", {"latents": 1e-3}, record, now, (image, image), tmp_path, references.layer_paths(layers))


def test_gap_limits_come_from_the_stored_thresholds():
    stored = baselines.gap_thresholds({"xl-1.0-fp8": [0.995, 0.996]})
    limits = baselines.sweep_thresholds("sdxl-random", stored, "xl-1.0-fp8")
    assert limits == {"worst_ssim": 0.985, "mean_ssim": 0.991, "clip_drop": baselines.CLIP_DROP}


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
