"""One set of calibration forward passes for every 8-bit format: record what ModelOpt's calibrators would see,
then replay it into each format's calibration.

ModelOpt calibrates by running the UNet with its quantizers in collect mode, quantizing nothing: every 8-bit
format's calibration runs the same FP16 passes and differs only in what its calibrators keep. So one pass on the
plain UNet records, per layer, exactly what any of them needs, and `replay` hands it to ModelOpt's calibrators
in place of the forward passes (`mtq.quantize(unet, config, replay(record))`; ModelOpt still computes the
weights' amax, SmoothQuant's scales and the smoothed weights itself):

  linear inputs   per input channel, the max |x| over all calls (SmoothQuant's per-channel collection; the
                  per-tensor max that FP8 keeps is the max of those)
  conv inputs     per call, max |x| (the percentile calibrator averages them per denoising step, in call order;
                  the max calibrator keeps their max)
  attention       max |Q|, |K|, |V| and of the softmax output over all calls, as the bmm attention path that
                  ModelOpt's level-4 quantizers wrap computes them from this call's Q and K

A max of maxes is the max, and the percentile calibrator gets the same numbers in the same order, so every
scale equals what ModelOpt's own calibration gives on the same activations, bit for bit. Which activations:
the UNet runs its own attention (scaled_dot_product_attention), as INT8's calibration and both 8-bit runtimes
do. ModelOpt's FP8 level 4 calibrates through the bmm attention path, which rounds differently, so FP8's
activations after the first attention differ from its direct calibration's by that rounding (measured in
tests/unit/test_activation_record.py).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdxl_core.errors import UserError
from sdxl_core.files import atomic_path

RECORD_FORMAT = "sdxl-bench-activation-record/1"
# ModelOpt's attention quantizers (level 4), by the statistic each collects
ATTENTION_QUANTIZERS = {
    "q": "q_bmm_quantizer",
    "k": "k_bmm_quantizer",
    "v": "v_bmm_quantizer",
    "softmax": "softmax_quantizer",
}
ATTENTION_STATS = tuple(ATTENTION_QUANTIZERS)


class RecordMismatch(UserError):
    """A stored record that is missing, unreadable or made for other settings: record again."""


@dataclass
class ActivationRecord:
    """What the calibration passes showed each layer (tensors keep the activations' dtype and device)."""

    calls: int = 0  # UNet calls recorded
    linear: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> per-channel max |x|, keepdim shape
    conv: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (calls,) max |x| per call
    attention: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # name -> q/k/v/softmax max

    def tensors(self) -> dict[str, torch.Tensor]:
        flat = {f"linear/{n}": t for n, t in self.linear.items()} | {f"conv/{n}": t for n, t in self.conv.items()}
        for name, stats in self.attention.items():
            flat |= {f"attention/{name}/{s}": t for s, t in stats.items()}
        return flat

    @classmethod
    def from_tensors(cls, calls: int, flat: dict[str, torch.Tensor]) -> ActivationRecord:
        record = cls(calls=calls)
        for key, tensor in flat.items():
            kind, _, rest = key.partition("/")
            if kind == "linear":
                record.linear[rest] = tensor
            elif kind == "conv":
                record.conv[rest] = tensor
            elif kind == "attention":
                name, _, stat = rest.rpartition("/")
                if stat not in ATTENTION_STATS:
                    raise ValueError(f"unknown attention statistic {key!r}")
                record.attention.setdefault(name, {})[stat] = tensor
            else:
                raise ValueError(f"unknown record entry {key!r}")
        return record


def recorded_layers(unet: torch.nn.Module) -> tuple[list[str], list[str], list[str]]:
    """Every linear, conv and attention module: which of them a format quantizes is its config's business."""
    from diffusers.models.attention_processor import Attention

    linear, conv, attention = [], [], []
    for name, module in unet.named_modules():
        if isinstance(module, Attention):
            attention.append(name)
        elif isinstance(module, torch.nn.Linear):
            linear.append(name)
        elif isinstance(module, torch.nn.Conv2d):
            conv.append(name)
    return linear, conv, attention


def _abs_max(x: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """max |x| (per last-dim channel, kept in x's rank, when `per_channel`), from min and max: no |x| copy."""
    if not per_channel:
        low, high = torch.aminmax(x)
        return torch.maximum(-low, high)
    low, high = torch.aminmax(x.reshape(-1, x.shape[-1]), dim=0)
    return torch.maximum(-low, high).reshape((1,) * (x.dim() - 1) + (x.shape[-1],))


@torch.no_grad()
def record(
    unet: torch.nn.Module,
    forward_loop: Callable[[torch.nn.Module], None],
    *,
    attention: bool,
    progress: bool = False,
) -> ActivationRecord:
    """Run `forward_loop(unet)` once with light hooks on the plain UNet and return what they saw. `attention`:
    also the attention statistics (FP8 level 4 only; the softmax output costs a bmm attention per call)."""
    linear, conv, attention_layers = recorded_layers(unet)
    maxima: dict[str, torch.Tensor] = {}
    per_call: dict[str, list[torch.Tensor]] = {name: [] for name in conv}
    stats: dict[str, dict[str, torch.Tensor]] = {}
    calls = [0]
    current: list[torch.nn.Module] = []  # the attention module running now (its SDPA call is recorded)
    names = {id(unet.get_submodule(n)): n for n in attention_layers}

    def keep_max(store: dict, key: str, amax: torch.Tensor) -> None:
        store[key] = amax if key not in store else torch.maximum(store[key], amax)

    def on_linear(name):
        return lambda module, args: keep_max(maxima, name, _abs_max(args[0], per_channel=True))

    def on_conv(name):
        return lambda module, args: per_call[name].append(_abs_max(args[0], per_channel=False))

    def enter(module, args):
        current.append(module)

    def leave(module, args, output):
        current.pop()

    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(query, key, value, attn_mask=None, *args, **kwargs):
        if current:
            if attn_mask is not None:
                raise NotImplementedError("recording attention statistics with an attention mask")
            attn = current[-1]
            entry = stats.setdefault(names[id(attn)], {})
            for stat, amax in _attention_maxima(attn, query, key, value).items():
                keep_max(entry, stat, amax)
        return sdpa(query, key, value, attn_mask, *args, **kwargs)

    def count(module, args):
        calls[0] += 1

    handles = [unet.register_forward_pre_hook(count)]
    handles += [unet.get_submodule(n).register_forward_pre_hook(on_linear(n)) for n in linear]
    handles += [unet.get_submodule(n).register_forward_pre_hook(on_conv(n)) for n in conv]
    for name in attention_layers if attention else ():
        handles += [
            unet.get_submodule(name).register_forward_pre_hook(enter),
            unet.get_submodule(name).register_forward_hook(leave),
        ]
    start = time.perf_counter()
    try:
        if attention:  # the processors call F.scaled_dot_product_attention by name, as ModelOpt's patch relies on
            torch.nn.functional.scaled_dot_product_attention = recording_sdpa
        forward_loop(unet)
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
        for handle in handles:
            handle.remove()
    result = ActivationRecord(
        calls=calls[0],
        linear={n: t.clone() for n, t in maxima.items()},  # clones: plain tensors, not inference-mode ones
        conv={n: torch.stack(v).clone() for n, v in per_call.items() if v},
        attention={n: {s: t.clone() for s, t in e.items()} for n, e in stats.items()},
    )
    if progress:
        print(
            f"[quantize] recorded {result.calls} UNet calls in {time.perf_counter() - start:.1f} s "
            f"({len(result.linear)} linear, {len(result.conv)} conv, {len(result.attention)} attention layers)",
            file=sys.stderr,
        )
    return result


def _attention_maxima(attn, query, key, value) -> dict[str, torch.Tensor]:
    """max |.| of what ModelOpt's bmm-path quantizers see for this call: Q and K as `get_attention_scores` hands
    them to baddbmm, V as bmm gets it, and the softmax output that `get_attention_scores` returns. The SDPA
    layout (batch, heads, tokens, head_dim) reshaped to (batch * heads, tokens, head_dim) is exactly
    `head_to_batch_dim`'s."""
    b, h, n, d = query.shape
    q, k, v = (t.reshape(b * h, t.shape[2], d) for t in (query, key, value))
    probs = attn.get_attention_scores(q, k, None)
    if attn.upcast_attention:
        q, k = q.float(), k.float()
    return {stat: _abs_max(t, per_channel=False) for stat, t in zip(ATTENTION_STATS, (q, k, v, probs), strict=True)}


def check_fits(activations: ActivationRecord, unet: torch.nn.Module, attention: bool) -> None:
    """RecordMismatch unless the record holds every linear and conv layer of this plain UNet (and every attention
    module's statistics where `attention`): checked before ModelOpt touches the UNet."""
    linear, conv, attention_layers = recorded_layers(unet)
    missing = [n for n in linear if n not in activations.linear] + [n for n in conv if n not in activations.conv]
    if attention:
        missing += [n for n in attention_layers if set(activations.attention.get(n, {})) != set(ATTENTION_STATS)]
    if missing:
        raise RecordMismatch(
            f"the activation record has nothing for {len(missing)} layers of this UNet ({missing[0]}, ...)"
        )


def replay(activations: ActivationRecord) -> Callable[[torch.nn.Module], None]:
    """ModelOpt's forward_loop for a record (`check_fits` first): each enabled, collecting quantizer gets what its
    layer saw, in the order the UNet calls gave it (the percentile calibrator counts calls as denoising steps)."""

    def forward_loop(unet: torch.nn.Module) -> None:
        for name, module in unet.named_modules():
            quantizer = getattr(module, "input_quantizer", None)
            if name in activations.linear and _collecting(quantizer):
                quantizer(activations.linear[name])
            elif name in activations.conv and _collecting(quantizer):
                for amax in activations.conv[name]:
                    quantizer(amax)
            for stat, amax in activations.attention.get(name, {}).items():
                quantizer = getattr(module, ATTENTION_QUANTIZERS[stat], None)
                if _collecting(quantizer):
                    quantizer(amax)

    return forward_loop


def _collecting(quantizer) -> bool:
    return quantizer is not None and quantizer.is_enabled and getattr(quantizer, "_if_calib", False)


def path_in(root, meta: dict) -> Path:
    """Where under `root` (the ONNX dir, beside the calibrations) the record made for `meta` lives: one file per
    set of calibration passes, with or without the attention statistics."""
    passes = {k: v for k, v in meta.items() if k != "attention"}
    text = json.dumps(passes, sort_keys=True, default=str).encode()
    return Path(root) / "activation-records" / f"{hashlib.sha256(text).hexdigest()[:16]}.pt"


def save(activations: ActivationRecord, path, meta: dict) -> None:
    payload = {
        "format": RECORD_FORMAT,
        "meta": json.dumps(meta, sort_keys=True, default=str),
        "calls": activations.calls,
        "tensors": {k: t.detach().cpu() for k, t in activations.tensors().items()},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load(path, meta: dict, device) -> ActivationRecord:
    """The record saved at `path` for exactly `meta`, on `device`; RecordMismatch otherwise (nothing is changed)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RecordMismatch(f"no activation record at {path}") from None
    except Exception as exc:  # torch.load raises many types for a torn or foreign file
        reason = type(exc).__name__
        raise RecordMismatch(f"activation record {path} is unreadable ({reason}): recording again") from None
    if not isinstance(payload, dict) or payload.get("format") != RECORD_FORMAT:
        raise RecordMismatch(f"{path} is not a {RECORD_FORMAT} file: recording again")
    saved, wanted = json.loads(payload["meta"]), json.loads(json.dumps(meta, sort_keys=True, default=str))
    if wanted.get("attention") is False and saved.get("attention") is True:
        saved["attention"] = False  # a record with the attention statistics serves a format without them too
    if saved != wanted:
        changed = sorted(k for k in saved.keys() | wanted.keys() if saved.get(k) != wanted.get(k))
        raise RecordMismatch(f"{path} was recorded with different {', '.join(changed)}: recording again")
    try:
        tensors = {k: t.to(device) for k, t in payload["tensors"].items()}
        return ActivationRecord.from_tensors(int(payload["calls"]), tensors)
    except Exception as exc:
        raise RecordMismatch(f"activation record {path} is malformed ({exc}): recording again") from None
