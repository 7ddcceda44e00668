"""Where a run's start-up time goes: wall time per phase, from program start to the first image.

The CLI makes one `Startup` per run: from the program's start (the first import of sdxl_core) when it is the
process's command (the `sdxl-bench` entry point, `python -m sdxl_core.commands.cli`), else from the call.
Everything that does start-up work records it as a phase (`with startup.phase("compile", device): ...`): the
model loader per component, the backend per engine step, the CLI for imports, checks, warm-up and the first
image. A phase that launches GPU
work synchronizes the device at both ends, so queued kernels are charged to the phase that queued them.

Phases may nest; each is charged only its own time (a nested phase's time is taken out of the enclosing one),
so the phases never overlap and, with "other" (time no phase claimed), add up to the total. The backends keep
what they measured in their `info` too (`compile_s`, `load_s`, ...): the same measurement, read from here.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

# What each phase is, for the table; a phase not listed here prints under its own name.
LABELS = {
    "python": "sdxl_core imported, command parsed",
    "imports": "imports (torch, diffusers, transformers, backend)",
    "checks": "argument, device and directory checks",
    "tokenizers": "tokenizers",
    "text_encoder": "text encoder (CLIP)",
    "text_encoder_2": "text encoder 2 (OpenCLIP)",
    "vae": "VAE",
    "unet_shape": "UNet shape only (meta device)",
    "unet": "UNet weights",
    "lora": "LoRA fused",
    "model_cache_write": "written to the model cache",
    "to_device": "components to the device",
    "engine_verify": "engine verify (sidecar, sizes, sha256)",
    "build_lock": "waiting for the build lock",
    "kernel_build": "CUDA kernel libraries (nvcc, or the kernel cache)",
    "modelopt_import": "ModelOpt import",
    "calibration": "calibration",
    "convert": "8-bit conversion",
    "gemm_dispatch": "GEMM dispatch (kernel timing)",
    "engine_save": "engine files written",
    "engine_publish": "engine published (checksums, fsync)",
    "compile_cache_read": "compile cache and precompiled regions read (sha256)",
    "engine_load": "engine load",
    "compiled_regions_load": "precompiled regions loaded (nothing traced)",
    "precompile": "regions compiled ahead of time (for the engine)",
    "compile_cache_load": "compile cache loaded into torch",
    "compile": "compile + first step",
    "compile_cache_save": "compile cache saved",
    "cuda_graph": "CUDA graph capture",
    "warmup": "warm-up run(s)",
    "first_image": "first image (first timed batch)",
}
OTHER = "other"  # time between phases that no phase claimed
TOTAL = "total"


@dataclass
class Startup:
    """Start-up phases of one run, in the order they first ran, each with its own (exclusive) seconds.

    `origin` is the `time.perf_counter()` value the run counts from; `total` is set by `finish()`.
    """

    origin: float = field(default_factory=time.perf_counter)
    seconds: dict[str, float] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)  # phase -> where its work came from ("from the cache")
    total: float | None = None
    _open: list[list[float]] = field(default_factory=list, repr=False)  # [start, nested seconds] per open phase

    @classmethod
    def from_process_start(cls) -> Startup:
        """Counting from this program's start, the first import of sdxl_core (`sdxl_core.IMPORTED_AT`): the time
        until this call is the phase "python".

        Not from the process's start in /proc: that is when the process was forked, which can be long before
        this program ran in it (`bash -c 'sleep 6 && sdxl-bench ...'` runs sdxl-bench in the shell's own
        process, which /proc dates 6 s earlier). No clock records the exec, so the interpreter's own start
        before sdxl_core is imported (tens of ms) is left out rather than guessed.
        """
        import sdxl_core

        startup = cls(origin=sdxl_core.IMPORTED_AT)
        startup.seconds["python"] = time.perf_counter() - sdxl_core.IMPORTED_AT
        return startup

    @contextlib.contextmanager
    def phase(self, name: str, device=None, note: str | None = None):
        """Time the block as phase `name` (added to it when it ran before). `device`: a CUDA device is
        synchronized before and after, so the phase owns exactly the GPU work it launched."""
        _synchronize(device)
        entry = [time.perf_counter(), 0.0]
        self._open.append(entry)
        timed = Timed()
        try:
            yield timed
        finally:
            _synchronize(device)
            self._open.pop()
            elapsed = time.perf_counter() - entry[0]
            if self._open:
                self._open[-1][1] += elapsed
            timed.seconds = elapsed - entry[1]
            self.seconds[name] = self.seconds.get(name, 0.0) + timed.seconds
            if note:
                self.notes[name] = note

    def note(self, name: str, text: str) -> None:
        self.notes[name] = text

    def finish(self) -> float:
        """Mark the end of start-up (the first image, or the engine ready); returns the total in seconds."""
        self.total = time.perf_counter() - self.origin
        return self.total

    def record(self) -> dict[str, float]:
        """Phase -> seconds (rounded to ms), then "other" and "total": what the run report stores."""
        total = self.total if self.total is not None else time.perf_counter() - self.origin
        phases = {name: round(s, 3) for name, s in self.seconds.items()}
        return {**phases, OTHER: round(max(0.0, total - sum(self.seconds.values())), 3), TOTAL: round(total, 3)}


@dataclass
class Timed:
    """What `Startup.phase` yields: its own seconds, set when the block ends."""

    seconds: float = 0.0


def table(seconds: dict[str, float], notes: dict[str, str] | None = None, total_label: str = "total") -> str:
    """The start-up table: one row per phase (a note in brackets), "other", then the total."""
    notes = notes or {}
    rows = [
        (LABELS.get(name, name) + (f" ({notes[name]})" if name in notes else ""), s)
        for name, s in seconds.items()
        if name not in (OTHER, TOTAL)
    ]
    rows.append(("other (between phases)", seconds.get(OTHER, 0.0)))
    width = max(36, *(len(label) for label, _ in rows), len(total_label))
    line = f"|{'-' * (width + 2)}|{'-' * 12}|"
    out = [line, f"| {'Start-up':<{width}} | {'Time':>10} |", line]
    out += [f"| {label:<{width}} | {s:>8.2f} s |" for label, s in rows]
    out += [line, f"| {total_label:<{width}} | {seconds.get(TOTAL, 0.0):>8.2f} s |", line]
    return "\n".join(out)


def _synchronize(device) -> None:
    if device is not None and getattr(device, "type", None) == "cuda":
        import torch

        torch.cuda.synchronize(device)
