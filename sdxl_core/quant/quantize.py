"""Post-training quantization of the SDXL UNet with ModelOpt, the way TensorRT's `demo/Diffusion` does it.

Levels (as in the demo's `get_int8_config` / `quantize_lvl`):
  1    conv layers                    2    + FFN linears (`ff.net.*`)
  2.5  + attention Q/K/V projections  3    + every other linear layer
  4    (FP8 only) + attention: Q, K, V and softmax-output quantizers on the batched matmuls
Never quantized: `time_embedding`, `add_embedding`, `time_emb_proj`, `conv_in`, `conv_out`, `conv_shortcut`
(the demo's `filter_func`; its newest version also lists `proj_out` etc., added for SD3/Flux, not used here).

INT8: SmoothQuant (alpha from the variant) on the linear layers, per-output-channel weights, per-tensor
activations; conv inputs use `PercentileCalibrator` (per-step amax combined by min-mean); conv weights per
channel. FP8 (E4M3): per-tensor weights and activations, max calibration.

The calibration passes run once per set of calibration knobs, whatever the format: `forward_loop(unet)` runs on
the plain UNet while `activation_record` records what each quantizer would collect, and `mtq.quantize` converts
the UNet in place (modules become ModelOpt fake-quant modules) and calibrates from the replayed record. Every
UNet call counts as one denoising step for the percentile calibrator, so the loop must run whole txt2img runs
of `variant.steps` steps each.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys
import time
import warnings
from collections.abc import Callable
from importlib import resources

import torch
from modelopt.torch.quantization import utils as quant_utils
from modelopt.torch.quantization.calib.max import MaxCalibrator

from sdxl_core import settings
from sdxl_core.errors import UserError
from sdxl_core.files import atomic_path
from sdxl_core.quant import activation_record
from sdxl_core.variants import Variant

EXCLUDED = ("time_emb_proj", "time_embedding", "add_embedding", "conv_in", "conv_out", "conv_shortcut")
CATEGORIES = ("conv", "ffn", "qkv", "other_linear", "attention")
LEVEL_CATEGORIES = {
    1.0: ("conv",),
    2.0: ("conv", "ffn"),
    2.5: ("conv", "ffn", "qkv"),
    3.0: ("conv", "ffn", "qkv", "other_linear"),
    4.0: ("conv", "ffn", "qkv", "other_linear", "attention"),
}
QKV_KEYS = ("to_q", "to_k", "to_v")
ATTENTION_QUANTIZERS = tuple(activation_record.ATTENTION_QUANTIZERS.values())
CALIBRATION_FORMAT = "sdxl-bench-calibration/1"
CALIBRATION_BATCH = 2  # prompts per calibration batch, as the reference demo

_EXCLUDED_RE = re.compile("|".join(EXCLUDED))
_QUANTIZER_KEY = re.compile(r"(^|\.)\w+_quantizer\.")


class CalibrationMismatch(UserError):
    """A calibration file that is missing, unreadable or made for other settings: recalibrate."""


def calibration_prompts(n: int) -> list[str]:
    """The first `n` of the 64 packaged calibration prompts, cycling when `n` > 64."""
    if n < 1:
        raise UserError(f"--calibration-size must be at least 1, got {n}")
    text = resources.files("sdxl_core").joinpath("data/calibration_prompts.txt").read_text(encoding="utf-8")
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    return [prompts[i % len(prompts)] for i in range(n)]


class SyncFreeMaxCalibrator(MaxCalibrator):
    """ModelOpt's max calibrator, computing the same amax without reading anything back to the host per call.

    ModelOpt's `collect` asserts on every call that the call's amax has no NaN, no inf and no negative entry:
    three host syncs per quantizer per UNet call (about 3000 per SDXL step at level 3), each waiting for the GPU
    to run dry, so calibration runs at launch-and-wait speed. Here the running maximum carries the checks: NaN and
    inf survive `torch.max`, so checking the result once (`compute_amax`) finds what any call's check would
    have found (abs() never gives a negative amax; one would only be hidden by a later larger one).

    A weight quantizer is handed the same weight parameter on every call, and the weight does not change while
    calibrating: it is reduced once and skipped while it is the same tensor (same object, storage, shape and
    version counter) until `reset`, which ModelOpt calls before it recalibrates a weight it changed (SmoothQuant).
    The amax is computed by ModelOpt's own functions, so it is the same, bit for bit.
    """

    def __init__(self, num_bits=8, axis=None, unsigned=False):
        super().__init__(num_bits, axis, unsigned)
        self._seen = None

    @torch.no_grad()
    def collect(self, x):
        if isinstance(x, torch.nn.Parameter):
            seen = (id(x), x.data_ptr(), x._version, tuple(x.shape))
            if seen == self._seen:
                return
            self._seen = seen
        reduce_axis = quant_utils.convert_quantization_axis_to_reduce_axis(x, self._axis)
        amax = quant_utils.reduce_amax(x, axis=reduce_axis).detach()
        if self._calib_amax is None or x.device.type == "meta":
            self._calib_amax = amax
        elif amax.shape != self._calib_amax.shape:
            raise RuntimeError("amax shape changed!")
        else:
            self._calib_amax = torch.max(self._calib_amax, amax)

    def reset(self):
        super().reset()
        self._seen = None

    def compute_amax(self):
        amax = self._calib_amax
        if amax is not None and amax.device.type != "meta":
            assert not torch.any(torch.isnan(amax)), "detected nan values in amax"
            assert not torch.any(torch.isinf(amax)), "detected inf values in amax"
            assert torch.all(amax >= 0), "detected negative values after abs, could be torch or cuda bug"
        return amax


class PercentileCalibrator(MaxCalibrator):
    """Per-tensor amax per denoising step, reduced over steps by min-mean, like the demo's calibrator.

    The i-th call is step `i % steps`. Each step keeps the mean of its amaxes; the result is the minimum
    over the first `max(1, int(steps * percentile))` steps that were seen. The demo divides each step's sum
    by the step count rather than by the number of calls at that step, which scales the amax by
    calls-per-step / steps (16 / 30 = 0.53 at its defaults: 32 prompts in batches of 2, 30 steps); this
    class takes the plain mean, so the amax does not depend on how many prompts were used.
    """

    def __init__(self, num_bits=8, axis=None, unsigned=False, *, steps: int, percentile: float = 1.0):
        super().__init__(num_bits, axis, unsigned)
        if axis is not None:
            raise ValueError("PercentileCalibrator is per-tensor only (axis=None)")
        self.steps, self.percentile = steps, percentile
        self.reset()

    @torch.no_grad()
    def collect(self, x):
        step = self._calls % self.steps
        amax = x.detach().abs().amax().float()
        total, count = self._per_step.get(step, (0.0, 0))
        self._per_step[step] = (total + amax, count + 1)
        self._calls += 1

    def reset(self):
        self._per_step, self._calls, self._calib_amax = {}, 0, None

    def compute_amax(self):
        used = range(max(1, int(self.steps * self.percentile)))
        means = [self._per_step[s][0] / self._per_step[s][1] for s in used if s in self._per_step]
        self._calib_amax = torch.stack(means).min() if means else None
        return self._calib_amax

    def __repr__(self):
        return f"PercentileCalibrator(steps={self.steps}, percentile={self.percentile}, amax={self._calib_amax})"


def is_excluded(name: str) -> bool:
    return _EXCLUDED_RE.search(name) is not None


def layer_category(name: str, module: torch.nn.Module) -> str | None:
    """conv / ffn / qkv / other_linear / attention by the demo's name rules (exclusions not applied)."""
    from diffusers.models.attention_processor import Attention

    if isinstance(module, Attention):
        return "attention"
    if isinstance(module, torch.nn.Conv2d):
        return "conv"
    if isinstance(module, torch.nn.Linear):
        if "ff.net" in name:
            return "ffn"
        return "qkv" if any(key in name for key in QKV_KEYS) else "other_linear"
    return None


def quant_config(variant: Variant) -> dict:
    """The `mtq.quantize` config for an int8 or fp8 variant (ModelOpt's list format)."""
    if not variant.is_quantized:
        raise UserError(f"variant {variant.name!r} is {variant.precision}: only int8 and fp8 variants are quantized")
    categories = LEVEL_CATEGORIES[variant.quant_level]

    def max_calibrated(num_bits, axis) -> dict:  # what ModelOpt's "max" calibrator computes, without host syncs
        return {
            "num_bits": num_bits,
            "axis": axis,
            "calibrator": (SyncFreeMaxCalibrator, (), {"num_bits": num_bits, "axis": axis}),
        }

    if variant.precision == "int8":
        weight = max_calibrated(8, 0)
        # SmoothQuant collects linear inputs per channel, then switches them to per-tensor itself.
        linear_input = max_calibrated(8, None)
        calibrator = (PercentileCalibrator, (), {"steps": variant.steps, "percentile": variant.quant_percentile})
        conv_input = {"num_bits": 8, "axis": None, "calibrator": calibrator}
        algorithm = {"method": "smoothquant", "alpha": variant.quant_alpha}
    else:
        # trt_high_precision_dtype only matters for ONNX export; the demo builds SDXL FP8 engines in fp16.
        weight = linear_input = conv_input = {**max_calibrated((4, 3), None), "trt_high_precision_dtype": "Half"}
        algorithm = {"method": "max"}

    entries = [
        {"quantizer_name": "*", "enable": False},
        {"quantizer_name": "*weight_quantizer", "parent_class": "nn.Conv2d", "cfg": weight},
        {"quantizer_name": "*input_quantizer", "parent_class": "nn.Conv2d", "cfg": conv_input},
    ]
    name_keys = {"ffn": ("ff.net",), "qkv": QKV_KEYS}
    patterns = ["*"] if "other_linear" in categories else [f"*{k}*" for c in categories for k in name_keys.get(c, ())]
    for pattern in patterns:
        entries += [
            {"quantizer_name": f"{pattern}weight_quantizer", "parent_class": "nn.Linear", "cfg": weight},
            {"quantizer_name": f"{pattern}input_quantizer", "parent_class": "nn.Linear", "cfg": linear_input},
        ]
    if "attention" in categories:  # level 4, FP8 only: per-tensor E4M3 like the rest; no bmm2 output quantizer
        entries += [{"quantizer_name": f"*{q}", "cfg": linear_input} for q in ATTENTION_QUANTIZERS]
    entries += [{"quantizer_name": f"*{name}*", "enable": False} for name in EXCLUDED]
    return {"quant_cfg": entries, "algorithm": algorithm}


def quantize_unet(
    unet: torch.nn.Module,
    variant: Variant,
    forward_loop: Callable[[torch.nn.Module], None] | None = None,
    progress: bool = True,
    *,
    record: activation_record.ActivationRecord | None = None,
) -> torch.nn.Module:
    """Insert ModelOpt quantizers into `unet` (in place) and calibrate them on the activations of
    `forward_loop(unet)`, recorded now, or on `record`, recorded earlier on this UNet by any variant with the
    same calibration knobs (`Variant.calibration_knobs`). Returns the UNet."""
    import modelopt.torch.quantization as mtq

    config = quant_config(variant)
    _skip_modelopt_cuda_extension()
    if record is None:
        record = _record(unet, variant, forward_loop, progress)
    else:
        activation_record.check_fits(record, unet, needs_attention(variant))  # before ModelOpt changes the UNet
    if needs_attention(variant):
        _use_bmm_attention(unet)
    start = time.perf_counter()
    with _modelopt_quiet(verbose=progress):
        unet = mtq.quantize(unet, config, activation_record.replay(record))
    if progress:
        counts = {c: len(names) for c, names in quantized_layers(unet).items() if names}
        print(
            f"[quantize] {variant.precision} level {variant.quant_level:g}: quantized {counts} "
            f"in {time.perf_counter() - start:.1f} s",
            file=sys.stderr,
        )
    return unet


def calibrate_or_reuse(
    unet: torch.nn.Module,
    variant: Variant,
    forward_loop: Callable[[torch.nn.Module], None],
    calibration_file,
    meta: dict,
    progress: bool,
    record_file=None,
    record_meta: dict | None = None,
) -> str:
    """Quantize `unet` in place, the cheapest way its files allow:

    "reused"      the calibration saved in `calibration_file` for `meta` is restored;
    "shared"      the activations another variant recorded in `record_file` for `record_meta` are replayed
                  (no forward pass);
    "calibrated"  `forward_loop(unet)` runs once, its record is saved in `record_file` for the next variant and
                  the calibration in `calibration_file`.
    """
    _skip_modelopt_cuda_extension()  # on every path: converting a restored calibration fake-quantizes weights too
    if calibration_file is not None and calibration_file.exists():
        try:
            load_calibration(unet, calibration_file, meta)
            return "reused"
        except CalibrationMismatch as mismatch:
            print(f"warning: {mismatch}; recalibrating", file=sys.stderr)
    how, record = "calibrated", None
    if record_file is not None and record_file.exists():
        try:
            record = activation_record.load(record_file, record_meta, _device_of(unet))
            activation_record.check_fits(record, unet, needs_attention(variant))
            how = "shared"
        except activation_record.RecordMismatch as mismatch:
            print(f"warning: {mismatch}", file=sys.stderr)
            record = None
    if record is None:
        record = _record(unet, variant, forward_loop, progress)
        if record_file is not None:
            activation_record.save(record, record_file, record_meta)
    quantize_unet(unet, variant, progress=progress, record=record)
    if calibration_file is not None:
        save_calibration(unet, calibration_file, meta)
    return how


def _record(unet, variant: Variant, forward_loop, progress: bool) -> activation_record.ActivationRecord:
    """Run the calibration passes once, recording what any 8-bit format's calibrators need."""
    if forward_loop is None:
        raise ValueError(f"{variant.name}: calibrating needs a forward loop (sdxl_core.run.calibration_loop)")
    if progress:
        print(f"[quantize] recording calibration activations ({variant.precision})", file=sys.stderr)
    return activation_record.record(unet, forward_loop, attention=needs_attention(variant), progress=progress)


def needs_attention(variant: Variant) -> bool:
    """Whether the variant quantizes attention (FP8 level 4), so its calibration needs attention statistics."""
    return "attention" in LEVEL_CATEGORIES[variant.quant_level]


def _device_of(unet: torch.nn.Module) -> torch.device:
    return next(unet.parameters()).device


def _skip_modelopt_cuda_extension() -> None:
    """Calibrate, and convert to 8-bit modules, with ModelOpt's pure-torch fake quantization instead of its CUDA
    extension.

    The extension is JIT-compiled with nvcc on first use: 67 s on the H100 runner, on every fresh machine
    (docs/perf). Calibration only collects amax statistics, and ModelOpt falls back to the torch kernels
    (same rounding) when the extension is absent. Converting a restored calibration fake-quantizes each weight
    once, so it needs the skip as much: while only fresh calibration skipped the extension, a Hopper build that
    restored its calibration spent 53 s in `convert` (1-2 s otherwise). SDXL_BENCH_MODELOPT_CUDA_EXT=1 keeps it.
    """
    if settings.modelopt_cuda_ext():
        return
    from modelopt.torch.quantization import extensions

    for loader in (extensions.get_cuda_ext, extensions.get_cuda_ext_fp8):
        if getattr(loader, "extension", None) is None:
            loader.extension = None


def quantized_layers(unet: torch.nn.Module) -> dict[str, list[str]]:
    """Names of the modules that run quantized, by category: linear/conv with weight and input quantizers
    enabled, attention with its Q, K and V quantizers enabled."""
    found = {c: [] for c in CATEGORIES}
    for name, module in unet.named_modules():
        if is_quantized(module):
            found[layer_category(name, module)].append(name)
    return found


def is_quantized(module: torch.nn.Module) -> bool:
    if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
        names = ("weight_quantizer", "input_quantizer")
    else:
        names = ATTENTION_QUANTIZERS[:3]
    quantizers = [getattr(module, n, None) for n in names]
    return all(q is not None and q.is_enabled for q in quantizers)


def save_calibration(unet: torch.nn.Module, path, meta: dict) -> None:
    """Write the calibrated state of a `quantize_unet` result: ModelOpt's state (which quantizers, how), the
    quantizer buffers (amax, SmoothQuant scales) and the weights SmoothQuant rescaled. `meta` must be JSON."""
    import modelopt.torch.opt as mto

    state = unet.state_dict()
    tensors = {k: v.detach() for k, v in state.items() if _QUANTIZER_KEY.search(k)}
    for name, module in unet.named_modules():
        if getattr(getattr(module, "input_quantizer", None), "pre_quant_scale", None) is not None:
            tensors[f"{name}.weight"] = module.weight.detach()
    payload = {
        "format": CALIBRATION_FORMAT,
        "meta": _meta_json(meta),
        "modelopt_state": mto.modelopt_state(unet),
        "tensors": tensors,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_calibration(unet_fresh: torch.nn.Module, path, expected_meta: dict) -> torch.nn.Module:
    """Restore `save_calibration`'s state onto an unquantized UNet with the original weights (in place).

    Raises CalibrationMismatch when the file is missing, unreadable or was saved with other meta; the
    file is checked before `unet_fresh` is touched.
    """
    import modelopt.torch.opt as mto

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CalibrationMismatch(f"no calibration file at {path}: calibrate first") from None
    except Exception as exc:  # torch.load raises many types for a torn or foreign file
        raise CalibrationMismatch(
            f"calibration file {path} is unreadable ({_reason(exc)}): delete it to recalibrate"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != CALIBRATION_FORMAT:
        raise CalibrationMismatch(f"{path} is not a {CALIBRATION_FORMAT} file: delete it to recalibrate")
    saved, wanted = json.loads(payload["meta"]), json.loads(_meta_json(expected_meta))
    if saved != wanted:
        changed = sorted(k for k in saved.keys() | wanted.keys() if saved.get(k) != wanted.get(k))
        raise CalibrationMismatch(
            f"{path} was calibrated with different {', '.join(changed)}: delete it to recalibrate"
        )
    try:
        with _modelopt_quiet(verbose=False):
            unet = mto.restore_from_modelopt_state(unet_fresh, payload["modelopt_state"])
        missing, unexpected = unet.load_state_dict(payload["tensors"], strict=False)
    except Exception as exc:
        raise CalibrationMismatch(
            f"calibration file {path} does not fit this UNet ({_reason(exc)}): recalibrate"
        ) from None
    missing = [k for k in missing if _QUANTIZER_KEY.search(k)]
    if missing or unexpected:
        raise CalibrationMismatch(
            f"calibration file {path} does not fit this UNet "
            f"({len(missing)} missing, {len(unexpected)} unexpected tensors): recalibrate"
        )
    if quantized_layers(unet)["attention"]:
        _use_bmm_attention(unet)
    return unet


def _use_bmm_attention(unet: torch.nn.Module) -> None:
    """The demo's `set_fmha`: the bmm attention processor, whose softmax output ModelOpt can quantize
    (its scaled_dot_product_attention path quantizes only Q, K and V)."""
    from diffusers.models.attention_processor import AttnProcessor

    unet.set_attn_processor(AttnProcessor())


def _meta_json(meta: dict) -> str:
    import modelopt

    return json.dumps({**meta, "modelopt_version": modelopt.__version__}, sort_keys=True, default=str)


def _reason(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:160] if text else type(exc).__name__


@contextlib.contextmanager
def _modelopt_quiet(verbose: bool):
    """ModelOpt prints counts to stdout, where a run prints its table, and warns once per linear layer it does
    not smooth (all unquantized ones): the counts go to stderr (verbose) or nowhere, the warnings nowhere."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*is not calibrated, skip smoothing")
        with contextlib.redirect_stdout(sys.stderr if verbose else io.StringIO()):
            yield
