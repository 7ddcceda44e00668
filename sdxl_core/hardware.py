"""Facts about the machine a run is on, in one place: the device's tag and generation, the CPU, the libraries.

Importing this module imports no torch; the functions that need it import it when called.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

HOPPER = (9, 0)  # compute capability of the Hopper GPUs (H100, H200, H800, H20, GH200): sm_90
LIBRARIES = (
    "torch",
    "diffusers",
    "transformers",
    "nvidia-modelopt",
    "triton",
    "tensorrt",
    "onnx",
    "onnxruntime",
    "peft",
    "open-clip-torch",
)


def capability(device=None) -> tuple[int, int] | None:
    """The CUDA device's compute capability, None on the CPU or where PyTorch sees no GPU."""
    import torch

    if device is not None and torch.device(device).type != "cuda":
        return None
    if device is None and not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability(device))


def is_hopper(capability_or_device=None) -> bool:
    """Whether a compute capability (a pair), or the CUDA device (default: the current one), is a Hopper GPU."""
    if isinstance(capability_or_device, tuple | list):
        return tuple(capability_or_device) == HOPPER
    return capability(capability_or_device) == HOPPER


def device_tag(device: torch.device) -> str:
    """Part of every engine key: an engine built for one GPU generation never loads on another."""
    found = capability(device)
    return f"sm{found[0]}{found[1]}" if found is not None else device.type


def library_versions(device: torch.device | None = None) -> dict[str, str | None]:
    """Installed versions; `cuda` (the CUDA runtime PyTorch was built with) only where CUDA runs: on `device`
    when one is given, else wherever PyTorch sees a GPU."""
    import torch

    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    versions["python"] = platform.python_version()
    if device.type == "cuda" if device is not None else torch.cuda.is_available():
        versions["cuda"] = torch.version.cuda
    return versions


def cpu_model() -> str:
    """The CPU's model name ("AMD EPYC 9654"), from /proc/cpuinfo where there is one, else what Python knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask), not all the host has."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def device_info(device: torch.device) -> dict:
    import torch

    if device.type != "cuda":
        return {"type": device.type, "name": cpu_model(), "cpus": usable_cpus(), "threads": torch.get_num_threads()}
    props = torch.cuda.get_device_properties(device)
    return {
        "type": "cuda",
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "memory_gib": round(props.total_memory / 2**30, 1),
        "multiprocessors": props.multi_processor_count,
    }


_VENDOR_WORDS = {"nvidia", "tesla", "geforce", "quadro", "amd", "radeon", "instinct"}
ARCHITECTURES = {
    (8, 0): "ampere",
    (8, 6): "ampere",
    (8, 7): "ampere",
    (8, 9): "ada",
    HOPPER: "hopper",
    (10, 0): "blackwell",
    (12, 0): "blackwell",
}
# Cards known by name alone (a device name string carries no compute capability).
_ARCHITECTURE_BY_FAMILY = {
    "h100": "hopper",
    "h200": "hopper",
    "h800": "hopper",
    "h20": "hopper",
    "gh200": "hopper",
    "a100": "ampere",
    "a800": "ampere",
    "a10": "ampere",
    "a30": "ampere",
    "a40": "ampere",
    "l4": "ada",
    "l40": "ada",
    "l40s": "ada",
    "rtx4090": "ada",
    "b200": "blackwell",
}


def hardware_slug(device) -> str:
    """`cpu`, or a GPU architecture (or family) slug from a device name or the suite's `hardware` dict: the
    folder the quality baselines of this kind of machine live in (see suite/baselines.py)."""
    if isinstance(device, dict):
        if not device.get("cuda"):
            return "cpu"
        name, capability = device.get("name") or "", device.get("capability")
    else:
        name, capability = str(device), None
    if name.strip().lower() in ("", "cpu") and capability is None:
        return "cpu"
    if capability is not None and tuple(capability) in ARCHITECTURES:
        return ARCHITECTURES[tuple(capability)]
    words = [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w and w not in _VENDOR_WORDS]
    for i, word in enumerate(words):
        if re.search(r"\d", word) and not re.fullmatch(r"\d+gb", word):
            prefix = words[i - 1] if i and words[i - 1] in ("rtx", "gtx") else ""
            return _ARCHITECTURE_BY_FAMILY.get(prefix + word, prefix + word)
    if capability:
        return f"sm{capability[0]}{capability[1]}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"
