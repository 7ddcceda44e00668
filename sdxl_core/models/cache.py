"""The model cache: a built-in model's generated weights kept on disk, so they are generated once per machine."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from sdxl_core import settings
from sdxl_core.models.configs import REACTIVE_GAINS, builtin_configs
from sdxl_core.startup import Startup

# Built-ins whose generated weights are kept in the model cache: generating them costs more than reading them.
CACHED_BUILTINS = ("sdxl-random",)
MODEL_CACHE_ENV = "SDXL_BENCH_MODEL_CACHE"  # the cache's directory, or "off"
MODEL_CACHE_FORMAT = 2  # 2: the UNet's weights scaled by builtin.REACTIVE_GAINS


BEFORE_UNET = ("text_encoder", "text_encoder_2", "vae")  # generated in this order, then the UNet


@dataclass(frozen=True)
class ModelCache:
    """A built-in model's generated weights, one safetensors file per component, in the user's cache dir
    (`$SDXL_BENCH_MODEL_CACHE`, else `$XDG_CACHE_HOME/sdxl-bench/models`, else `~/.cache/sdxl-bench/models`;
    `SDXL_BENCH_MODEL_CACHE=off` turns it off).

    Why a cache and not seeding on the GPU: seeding on the GPU is fast but makes another model (CUDA's random
    streams are not the CPU's), one that would differ between the CPU and GPUs and could differ between GPUs
    (how a kernel spreads its random numbers over threads depends on its launch grid). Every engine, baseline
    and comparison made so far was made with the CPU-seeded weights; the cache keeps exactly those, on every
    machine, and costs one generation per machine plus the disk: about 3.6 GB for `sdxl-random`'s text encoders
    and VAE, 10.3 GB more for its UNet once an engine is built (fp32, as generated).

    An entry is keyed by model, seed, configs and the torch, diffusers and transformers versions (whose init
    code draws the numbers), so it always holds what this code would generate; writing a new one removes the
    entries of the same model and seed made with other versions. Safetensors carry no code, so loading one is
    safe from any directory; a file that does not load is generated again. Files are written atomically.
    """

    path: Path

    @staticmethod
    def root() -> Path | None:
        return settings.model_cache()

    @classmethod
    def entry(cls, name: str, seed: int) -> ModelCache | None:
        root = cls.root()
        if root is None:
            return None
        import diffusers
        import transformers

        facts = {
            "format": MODEL_CACHE_FORMAT,
            "model": name,
            "seed": seed,
            "configs": builtin_configs(name),
            "gains": REACTIVE_GAINS,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
        }
        digest = hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:12]
        return cls(root / f"{name}-s{seed}-{digest}")

    def file(self, component: str) -> Path:
        return self.path / f"{component}.safetensors"

    def load(self, component: str, make: Callable[[], torch.nn.Module], startup: Startup) -> torch.nn.Module | None:
        """The cached component, built on the meta device and given the stored tensors; None when absent or
        unreadable (then it is generated again)."""
        from safetensors.torch import load_file

        file = self.file(component)
        if not file.is_file():
            return None
        with startup.phase(component, note="from the model cache"):
            try:
                tensors = load_file(str(file))
                with torch.device("meta"):
                    module = make()
                _assign(module, tensors)
            except Exception as exc:  # torn, truncated or foreign file: any reason means "generate it again"
                print(
                    f"warning: model cache file {file} does not load ({_first_line(exc)}); generating it again",
                    file=sys.stderr,
                )
                return None
        return module

    def load_front(self, makers, startup: Startup):
        """(text encoders and VAE, the random state the UNet is generated from), or None unless all are cached."""
        from safetensors.torch import load_file

        rng = self.path / "unet_rng.safetensors"
        if not rng.is_file() or not all(self.file(c).is_file() for c in BEFORE_UNET):
            return None
        front = {c: self.load(c, makers[c], startup) for c in BEFORE_UNET}
        try:
            state = load_file(str(rng))["state"]
        except Exception:  # as in `load`: generate it again
            state = None
        if state is None or any(m is None for m in front.values()):
            return None
        return front, state

    def save_front(self, front: dict, unet_rng: torch.Tensor, startup: Startup) -> None:
        """Keep the text encoders, the VAE and the UNet's random state; drop this model's stale entries."""
        if self.save(front, startup):
            self._write(self.path / "unet_rng.safetensors", {"state": unet_rng})
            name, seed, _ = self.path.name.rsplit("-", 2)
            for stale in self.path.parent.glob(f"{name}-{seed}-*"):
                if stale != self.path and stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)

    def save(self, modules: dict[str, torch.nn.Module], startup: Startup) -> bool:
        """Write each module's tensors; a failure (a full disk, no permission) only warns: it is a cache."""
        with startup.phase("model_cache_write"):
            try:
                for component, module in modules.items():
                    self._write(self.file(component), _tensors(module))
            except Exception as exc:  # a cache that cannot be kept costs time, not the run
                print(
                    f"warning: could not keep {self.path.name} in the model cache ({_first_line(exc)}); it will "
                    "be generated again next time",
                    file=sys.stderr,
                )
                return False
        return True

    @staticmethod
    def _write(path: Path, tensors: dict) -> None:
        from safetensors.torch import save_file

        from sdxl_core.files import atomic_path

        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp))


def _tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (non-persistent ones too: a module rebuilt on the meta device needs them)."""
    return {n: t.detach().contiguous() for n, t in [*module.named_parameters(), *module.named_buffers()]}


def _assign(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Give a meta-device module the stored tensors (no copies); they must match it name for name and shape."""
    wanted = {n: t for n, t in [*module.named_parameters(), *module.named_buffers()]}
    if wanted.keys() != tensors.keys():
        raise ValueError(f"{len(wanted.keys() ^ tensors.keys())} tensor names differ from the module's")
    for name, tensor in tensors.items():
        if tensor.shape != wanted[name].shape or tensor.dtype != wanted[name].dtype:
            raise ValueError(
                f"{name} is {tuple(tensor.shape)} {tensor.dtype}, the module has "
                f"{tuple(wanted[name].shape)} {wanted[name].dtype}"
            )
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        if leaf in owner._parameters:
            owner._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=wanted[name].requires_grad)
        else:
            owner._buffers[leaf] = tensor


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:160] if text else type(exc).__name__
