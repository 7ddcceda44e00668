"""Stored references that the quality tests compare against: compact tensors, images for people, a manifest.

Layout, one folder per model and hardware:

    baselines/<model>/<hardware>/
        manifest.json                         per variant: what made it, versions, device, tolerances, files;
                                              8-bit: which path and kernel its layers ran (references.py)
        xl-1.0-fp16-s0-1a2b3c4d.png           <variant>-s<seed>-<sha256 of the prompt, 8 hex digits>.png
        xl-1.0-fp16-s0-1a2b3c4d.safetensors   that render's final latents
        xl-1.0-fp16-unet.safetensors          the variant's UNet output for fixed inputs (references.py)
        ...

Every variant (FP16, INT8, FP8, LCM-LoRA, Turbo) is held to its own stored render; each 8-bit variant is also
held to FP16 (the quantization gap, `thresholds`). What is stored and how it is compared: references.py.
Images are at most 256 px a side (a copy for people; the comparison makes the same copy of the current image).

`<model>` is the model's last path component made file-name safe (`tiny`, `sdxl-random`,
`stable-diffusion-xl-base-1.0`). `<hardware>` is `cpu` for every CPU (another CPU's BLAS kernels are within the
tolerances: they are measured with another reduction order) and, on a GPU, its architecture: `hopper` for compute
capability 9.0 (H100, H200: the same tensor cores and kernels), `ampere`, `ada`, `blackwell`; for other cards the
family read from the name ("Tesla T4" -> `t4`), and `sm<major><minor>` when the name gives nothing.

Writing a subset of the variants (`--update-baselines --variants=...`) keeps the stored entries of the others:
the new files are written first, then the merged manifest (atomically: it is the commit point), then files that
no entry names any more are removed.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
from collections import Counter
from pathlib import Path

from PIL import Image

from sdxl_core.errors import UserError
from sdxl_core.files import atomic_write_bytes, atomic_write_text
from sdxl_core.hardware import hardware_slug
from sdxl_core.variants import slug

MANIFEST = "manifest.json"
SCHEMA = 2
CREATE_COMMAND = "pytest -m quality --update-baselines"
CREATE_HINT = f"`{CREATE_COMMAND}` (or `nox -s baselines`)"
ENTRY_KEYS = ("variant", "prompt", "seed", "steps", "size", "scheduler", "guidance")
CASE_FILES = ("file", "sha256", "tensors", "tensors_sha256")
VARIANT_KEYS = ("created", "command", "device", "libraries", "tolerances", "probe", "cases")
PATHS_KEYS = ("layers_by_path", "layers_by_kernel", "paths_digest", "kernels_digest", "16bit_groups")  # 8-bit only

# Prompts the quality tests render, one seed each. On `tiny` (random weights) the prompt barely moves the
# image (SSIM 0.9988 between these two prompts at one seed), so the second case uses another seed: that is
# what makes it a second, different image.
CASES = (
    ("a photo of an astronaut riding a horse on mars", 0),
    ("a red cube on a wooden table, studio lighting", 1),
)

# The quantization gap: 8-bit vs FP16 SSIM on CASES, measured when the baseline is written, and the limit set
# from it: 1 - (1 - measured) x factor, i.e. the gap to a perfect 1.0 may grow `factor` times. Per image the worst
# case is used (factor 3), for the sweep's mean the mean (factor 2). On tiny, over the 64 packaged prompts
# (`--prompts 64`), the worst prompt's gap was 1.6x (INT8: SSIM 0.9856) and 1.4x (FP8: 0.9497) the worse of
# CASES', the 64-prompt mean gap 1.2x (INT8: 0.9910) and 1.1x (FP8: 0.9621) CASES' mean.
GAP_FACTORS = {"ssim": 3.0, "mean_ssim": 2.0}
QUANTIZED = ("xl-1.0-int8", "xl-1.0-fp8")
VARIANTS = ("xl-1.0-fp16", *QUANTIZED, "xl-1.0-lcm-lora", "xl-turbo")  # each held to its own stored render

# Where no stored baseline holds a limit (a quality sweep on a model and card without one): on tiny the limits of
# baselines/tiny/cpu; elsewhere provisional until a baseline is written there.
# clip_drop: mean CLIP score (100 * cosine, open_clip ViT-B-32 'openai') of the FP16 images minus that of the
# 8-bit images. MLPerf's SDXL accuracy window is CLIP score 31.686..31.813 over 5000 prompts; on a few prompts
# the sampling noise is far larger, hence a full point. Only real weights have a CLIP score worth a limit.
CLIP_DROP = 1.0
THRESHOLDS = {
    "tiny": {
        "ssim": {"xl-1.0-int8": 0.97251, "xl-1.0-fp8": 0.89476},
        "mean_ssim": {"xl-1.0-int8": 0.98442, "xl-1.0-fp8": 0.93088},
        "clip_drop": CLIP_DROP,
    },
    "default": {
        "ssim": {"xl-1.0-int8": 0.85, "xl-1.0-fp8": 0.80},
        "mean_ssim": {"xl-1.0-int8": 0.90, "xl-1.0-fp8": 0.85},
        "clip_drop": CLIP_DROP,
    },
}


def gap_thresholds(measured: dict[str, list[float]]) -> dict:
    """variant -> its SSIM values vs FP16 on CASES  ->  {"ssim": {variant: limit record}, "mean_ssim": {...}}."""
    out: dict = {key: {} for key in GAP_FACTORS}
    for name, values in measured.items():
        for key, factor in GAP_FACTORS.items():
            value = min(values) if key == "ssim" else sum(values) / len(values)
            out[key][name] = {
                "value": round(1 - (1 - value) * factor, 5),
                "measured": round(value, 5),
                "factor": factor,
                "rule": f"1 - (1 - {'worst' if key == 'ssim' else 'mean'} measured) x factor",
            }
    return out


def limit(value) -> float:
    """A threshold as a number, whether stored bare or as {"value": ..., "measured": ..., "factor": ...}."""
    return value["value"] if isinstance(value, dict) else value


def default_thresholds(model: str) -> dict:
    return json.loads(json.dumps(THRESHOLDS.get(model_slug(model), THRESHOLDS["default"])))


def sweep_thresholds(model: str, stored: dict | None, variant: str) -> dict:
    """The quality sweep's limits for an 8-bit `variant`: every prompt's SSIM >= `worst_ssim` (the same limit as
    the stored-baseline test), the mean over prompts >= `mean_ssim`, the mean CLIP score at most `clip_drop` below
    FP16's. Each comes from the stored baseline's thresholds (`stored`) where they hold it, else from THRESHOLDS."""
    defaults = default_thresholds(model)

    def pick(key):
        value = (stored or {}).get(key, defaults[key])
        if isinstance(value, dict) and "value" not in value:
            value = value.get(variant, defaults[key][variant])
        return limit(value)

    return {"worst_ssim": pick("ssim"), "mean_ssim": pick("mean_ssim"), "clip_drop": pick("clip_drop")}


def model_slug(model: str) -> str:
    return slug(model, keep_dots=True, max_chars=None, empty="model")


def baseline_dir(root, model: str, device) -> Path:
    """`root/<model>/<hardware>`; `device` is a device name ("cpu", "NVIDIA H100 80GB HBM3"), a slug or
    the conftest `hardware` dict."""
    return Path(root) / model_slug(model) / hardware_slug(device)


def _regenerate(variants=None) -> str:
    only = f" --variants={','.join(variants)}" if variants else ""
    return f"regenerate it with `{CREATE_COMMAND}{only}` (or `nox -s baselines`)"


def load_manifest(directory) -> dict:
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise UserError(
            f"no stored baseline in {directory} (missing {MANIFEST}); create it with "
            f"{CREATE_HINT} on this model and hardware, then commit {directory}"
        )
    try:
        manifest = json.loads(path.read_text())
        schema = manifest.get("schema")
    except (ValueError, AttributeError) as exc:
        raise UserError(f"{path} is not a baseline manifest ({exc}); {_regenerate()}") from None
    if schema != SCHEMA:
        raise UserError(f"{path} has schema {schema!r}, this suite reads {SCHEMA}; {_regenerate()}")
    try:
        for name, record in manifest["variants"].items():
            missing = [k for k in VARIANT_KEYS if k not in record]
            missing += [k for case in record["cases"] for k in (*ENTRY_KEYS, *CASE_FILES) if k not in case]
            missing += [f"paths.{k}" for k in PATHS_KEYS if k not in record.get("paths", dict.fromkeys(PATHS_KEYS))]
            if missing:
                raise KeyError(f"{name}: {', '.join(sorted(set(missing)))}")
        manifest["thresholds"]
    except (KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"{path} is not a baseline manifest (lacks {exc}); {_regenerate()}") from None
    return manifest


def variant_record(manifest: dict, variant: str) -> dict:
    try:
        return manifest["variants"][variant]
    except KeyError:
        raise UserError(f"the stored baseline has no {variant}; {_regenerate([variant])}") from None


def find_entry(manifest: dict, variant: str, prompt: str, seed: int) -> dict:
    for entry in variant_record(manifest, variant)["cases"]:
        if (entry["prompt"], entry["seed"]) == (prompt, seed):
            return entry
    raise UserError(
        f"the stored baseline has no {variant} render for seed {seed} and prompt {prompt!r}; {_regenerate([variant])}"
    )


def entry_for(variant, prompt: str, seed: int) -> dict:
    """The manifest entry (without files and checksums) describing one render of `variant`; an 8-bit variant's
    also names its calibration size (another one calibrates other scales: a new baseline, not a regression)."""
    entry = {
        "variant": variant.name,
        "prompt": prompt,
        "seed": seed,
        "steps": variant.steps,
        "size": [variant.height, variant.width],
        "scheduler": variant.scheduler,
        "guidance": variant.guidance_scale,
    }
    if variant.is_quantized:
        entry["calibration_size"] = variant.calibration_size
    return entry


def mismatch(entry: dict, wanted: dict) -> str | None:
    """A one-line description of how a stored entry differs from what the suite now renders, or None."""
    diffs = [f"{k}={entry.get(k)!r} (now {wanted[k]!r})" for k in wanted if entry.get(k) != wanted[k]]
    if not diffs:
        return None
    name = wanted["variant"]
    return f"the stored {name} baseline was made with {', '.join(diffs)}; {_regenerate([name])}"


def drift(record: dict, libraries: dict, device: dict) -> str:
    """What differs between the run that stored `record` and this one: library versions, then the device."""
    changed = [
        f"{name} {record['libraries'].get(name)} -> {version}"
        for name, version in libraries.items()
        if name in record["libraries"] and record["libraries"][name] != version
    ]
    was, now = (record.get("device") or {}).get("name"), device.get("name")
    if was != now:
        changed.append(f"device {was} -> {now}")
    return ", ".join(changed)


def _short(group: str) -> str:
    """`...attn2.to_kv` for `down_blocks.*.attentions.*.transformer_blocks.*.attn2.to_kv`: what follows the last
    block index (the manifest keeps the whole group)."""
    return "..." + group.rpartition("*.")[2] if "*." in group else group


def _listed(counts: Counter) -> str:
    return ", ".join(f"{name} x{count}" for name, count in sorted(counts.items()))


# The dispatch picks an 8-bit layer's path and kernel by timing when the engine is built, so a rebuild of the same
# code may run a shape whose candidates are close on the other path.
_BY_TIMING = "; the difference may come from that choice, made by timing when the engine was built"


def layout_change(stored: dict | None, current: dict | None) -> str | None:
    """How many quantized layers the current engine has where it has another number than the baseline's engine (other
    fused projections or quantization level: another engine, whose calibrated numbers differ too), or None."""
    if not stored or not current:
        return None
    layers = [sum(record["layers_by_path"].values()) for record in (stored, current)]
    if layers[0] == layers[1]:
        return None
    return (
        f"the engine has {layers[1]} quantized layers, the baseline's engine had {layers[0]} (layers per path: "
        f"{stored['layers_by_path']} -> {current['layers_by_path']}); the difference may come from that other "
        f"layout (fused attention projections, another quantization level)"
    )


def path_change(stored: dict | None, current: dict | None) -> str | None:
    """How the current engine's layer paths (or, where those match, its 8-bit kernels) differ from those of the
    engine that made the baseline, and that the difference may come from it, in words: "the engine runs 60 layers on
    another path than the baseline's engine (16bit -> 8bit: ...attn2.to_kv x60); the difference may come from ...".
    Both are references.layer_paths records; None where they match, where either is missing (a baseline stored
    before the records were kept, an FP16 engine) or where the layers themselves differ (`layout_change`)."""
    if not stored or not current or layout_change(stored, current):
        return None
    if stored["paths_digest"] != current["paths_digest"]:
        to_8bit, to_16bit = Counter(), Counter()
        was, now = stored["16bit_groups"], current["16bit_groups"]
        for group in {*was, *now}:
            more = now.get(group, 0) - was.get(group, 0)
            (to_16bit if more > 0 else to_8bit)[_short(group)] += abs(more)
        to_8bit, to_16bit = +to_8bit, +to_16bit  # without the groups whose count is the same
        if not to_8bit and not to_16bit:
            same = "the engine runs other layers on the 16-bit path than the baseline's engine (as many per group)"
            return same + _BY_TIMING
        moves = [(f"16bit -> 8bit: {_listed(to_8bit)}", to_8bit), (f"8bit -> 16bit: {_listed(to_16bit)}", to_16bit)]
        total = sum(to_8bit.values()) + sum(to_16bit.values())
        said = "; ".join(text for text, counts in moves if counts)
        layers = "layer" if total == 1 else "layers"
        return f"the engine runs {total} {layers} on another path than the baseline's engine ({said}){_BY_TIMING}"
    if stored["kernels_digest"] != current["kernels_digest"]:
        counts = _changed_counts(stored["layers_by_kernel"], current["layers_by_kernel"])
        which = f"layers per kernel: {counts}" if counts else "as many per kernel"
        return f"the engine runs layers on other 8-bit kernels than the baseline's engine ({which}){_BY_TIMING}"
    # A baseline stored before attentions (LayerNorms, GEGLUs) could run our kernels ran none on them.
    for key, what in (
        ("attention_kernels", "attentions on our attention"),
        ("norm_kernels", "LayerNorms on our LayerNorm"),
        ("activation_kernels", "GEGLUs on our GEGLU"),
    ):
        was, now = stored.get(key, {}), current.get(key, {})
        if was != now:
            counts = _changed_counts(was, now)
            return f"the engine runs {what} kernel where the baseline's did not ({counts}){_BY_TIMING}"
    return None


def _changed_counts(was: dict, now: dict) -> str:
    """ "name before -> after" for each count that differs."""
    return ", ".join(
        f"{k} {was.get(k, 0)} -> {now.get(k, 0)}" for k in sorted({*was, *now}) if was.get(k) != now.get(k)
    )


PATH_KINDS = ("latents", "image", "unet")  # what a layer's path moves; the calibrated numbers are taken before it


def failure_cause(record: dict, libraries: dict, device: dict, over, paths: dict | None = None) -> str:
    """Why the checks `over` ("latents", "quant", ...) of a render are past their tolerances, for the failure
    message: what changed since `record` was stored (drift), whether the 8-bit engine runs layers on other paths or
    kernels than the baseline's engine (`paths`: the current engine's references.layer_paths), else a regression."""
    changed = drift(record, libraries, device)
    # The calibrated numbers are taken before the paths are chosen: another path cannot move them.
    layout = layout_change(record.get("paths"), paths)
    moved = layout or (path_change(record.get("paths"), paths) if set(over) & set(PATH_KINDS) else None)
    if changed:
        also = f"; and {moved}" if moved else ""
        drifted = f"changed since the baseline: {changed}; drift (an upgrade or another device){also}"
        return f"{drifted}: review the images, then regenerate it"
    if not moved:
        return "same library versions and device as the baseline: a regression"
    cause = f"same library versions and device as the baseline, but {moved}: rebuild the engine, or review the "
    cause += "images and update the baseline"
    if "quant" in over and not layout:
        cause += "; the calibrated numbers, which no path moves, differ too: a regression"
    return cause


def file_name(entry: dict, suffix: str = ".png") -> str:
    """`<variant>-s<seed>-<8 hex digits of the prompt's sha256><suffix>`: stable, one per (variant, prompt, seed)."""
    digest = hashlib.sha256(entry["prompt"].encode()).hexdigest()[:8]
    return f"{model_slug(entry['variant'])}-s{entry['seed']}-{digest}{suffix}"


def probe_name(variant: str) -> str:
    return f"{model_slug(variant)}-unet.safetensors"


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _write(directory: Path, name: str, data: bytes) -> str:
    atomic_write_bytes(directory / name, data)
    _readable(directory / name)
    return hashlib.sha256(data).hexdigest()


def write_variant(
    directory, name: str, renders: list, probe: dict, tolerances: dict, *, device, libraries, command, paths=None
):
    """Write one variant's files: `renders` are (entry, image copy, tensors) per case; return its manifest record.
    `paths`: for an 8-bit engine, which path and kernel its layers ran (references.layer_paths), kept as `paths`."""
    from safetensors.torch import save

    directory = Path(directory)
    cases = []
    for entry, image, tensors in renders:
        missing = [k for k in ENTRY_KEYS if k not in entry]
        if missing:
            raise UserError(f"baseline entry for {name} lacks {', '.join(missing)}")
        if entry["variant"] != name or any((c["prompt"], c["seed"]) == (entry["prompt"], entry["seed"]) for c in cases):
            raise UserError(
                f"a {name} baseline got a wrong or repeated case: seed {entry['seed']}, {entry['prompt']!r}"
            )
        png, tensor_file = file_name(entry), file_name(entry, ".safetensors")
        case = dict(entry)
        case["file"], case["sha256"] = png, _write(directory, png, _png_bytes(image))
        case["tensors"], case["tensors_sha256"] = tensor_file, _write(directory, tensor_file, save(tensors))
        cases.append(case)
    probe_file = probe_name(name)
    record = {
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command,
        "device": device,
        "libraries": libraries,
        "tolerances": tolerances,
        "probe": {"file": probe_file, "sha256": _write(directory, probe_file, save(probe))},
        "cases": cases,
    }
    if paths:
        record["paths"] = paths
    return record


def write_manifest(directory, model: str, hardware: str, variants: dict, thresholds: dict) -> Path:
    """Merge `variants` (name -> record from write_variant) and `thresholds` into the stored manifest (other
    variants' records stay), write it atomically, then remove files no record names."""
    directory = Path(directory)
    try:
        manifest = load_manifest(directory)
    except UserError:  # none yet, or an older schema: this write starts a new one
        manifest = {"variants": {}, "thresholds": {}}
    merged_thresholds = manifest["thresholds"]
    for key, per_variant in thresholds.items():
        merged_thresholds.setdefault(key, {}).update(per_variant)
    manifest = {
        "schema": SCHEMA,
        "model": model,
        "hardware": hardware,
        "command": _remake_command(model, hardware, {**manifest["variants"], **variants}),
        "thresholds": merged_thresholds,
        "variants": dict(sorted({**manifest["variants"], **variants}.items())),
    }
    atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    _readable(directory / MANIFEST)
    keep = {MANIFEST} | {r["probe"]["file"] for r in manifest["variants"].values()}
    keep |= {c[k] for r in manifest["variants"].values() for c in r["cases"] for k in ("file", "tensors")}
    for stale in [*directory.glob("*.png"), *directory.glob("*.safetensors")]:
        if stale.name not in keep:
            os.unlink(stale)
    return directory / MANIFEST


def _remake_command(model: str, hardware: str, records: dict) -> str:
    """The command that remakes the whole folder, with the calibration size its 8-bit renders were made at."""
    sizes = {case["calibration_size"] for r in records.values() for case in r["cases"] if "calibration_size" in case}
    calibration = f" --calibration-size={sizes.pop()}" if len(sizes) == 1 else ""
    names = ",".join(sorted(records, key=_variant_order))
    return (
        f"{CREATE_COMMAND} -n 0 -p no:cacheprovider tests/suite/test_quality.py --model {model} --variants={names}"
        f"{calibration}  (on a {hardware} machine)"
    )


def _variant_order(name: str):
    return (VARIANTS.index(name) if name in VARIANTS else len(VARIANTS), name)


def _readable(path: Path) -> None:
    """The atomic writers' temp files are 0600; committed baselines are for everyone to read."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _checked_bytes(path: Path, sha256: str) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"baseline file {path} is missing; {_regenerate()}") from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise UserError(
            f"baseline file {path} does not match the sha256 in its manifest (edited or torn); "
            f"restore it from git or {_regenerate()}"
        )
    return data


def load_image(directory, entry: dict) -> Image.Image:
    """The stored PNG of `entry`, refused when it is missing or its sha256 differs from the manifest's."""
    image = Image.open(io.BytesIO(_checked_bytes(Path(directory) / entry["file"], entry["sha256"])))
    image.load()
    return image.convert("RGB")


def load_tensors(directory, file: str, sha256: str) -> dict:
    """A stored safetensors file (case tensors or UNet probe), checked against its sha256."""
    from safetensors.torch import load

    return load(_checked_bytes(Path(directory) / file, sha256))
