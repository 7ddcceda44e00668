"""The suite on several GPUs: which GPU each pytest-xdist worker gets, and the benchmark results workers send home.

One worker per GPU: the controller lists the GPUs it may use (`visible_gpus`, without initialising CUDA), maps
worker `gwI` to the I-th of them (`worker_devices`) and sends the map to every worker, which sets
`CUDA_VISIBLE_DEVICES` to its own GPU before anything starts CUDA. Workers beyond the number of GPUs share
GPUs round robin: images and engines are still right there, but timing is not, so timing tests refuse
(`contention`). The map compares GPUs by the names the controller gave them (an index or a UUID), so one GPU
named both ways is not seen as shared.

pytest-benchmark turns itself off under xdist. A worker with a GPU of its own turns it back on, saves nothing
itself, and sends each benchmark's result home in its test report (`benchmark_record`); the controller adds
them to its own benchmark session (`benchmark_from_record`), which then saves, compares and prints one run,
as on one GPU. This module imports nothing heavy: the pytest plugin loads it in every pytest process.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from types import SimpleNamespace

from sdxl_core.errors import UserError

# CUDA's own rule: the list ends at the first entry that names no device ("-1" hides every GPU).
_DEVICE = re.compile(r"\d+|GPU-[0-9A-Fa-f-]+|MIG-[0-9A-Za-z/-]+")
_NVIDIA_SMI_GPU = re.compile(r"^GPU (\d+):", re.MULTILINE)
# xdist's --dist loadgroup appends "@<group>" to the node id of a test in an xdist_group.
_GROUP_SUFFIX = re.compile(r"@[^\[\]:/@]+$")


def parse_visible_devices(text: str) -> list[str]:
    """The GPUs a `CUDA_VISIBLE_DEVICES` value names (indices, GPU-/MIG- UUIDs), as CUDA reads it."""
    devices = []
    for token in text.split(","):
        token = token.strip()
        if not _DEVICE.fullmatch(token):
            break
        devices.append(token)
    return devices


def parse_nvidia_smi(text: str) -> list[str]:
    """The GPU indices in `nvidia-smi -L` output ("GPU 0: NVIDIA H200 (UUID: GPU-...)"); MIG lines are skipped."""
    return _NVIDIA_SMI_GPU.findall(text)


def visible_gpus(env=None, nvidia_smi: str | None = None) -> list[str]:
    """The GPUs this process may use: `CUDA_VISIBLE_DEVICES` where it is set, else what `nvidia-smi -L` lists.

    Neither initialises CUDA, so the controller of the workers never holds a GPU context. `nvidia_smi` is the
    command's output where a caller has it already (tests); without the command there are no GPUs.
    """
    env = os.environ if env is None else env
    if "CUDA_VISIBLE_DEVICES" in env:
        return parse_visible_devices(env["CUDA_VISIBLE_DEVICES"])
    if nvidia_smi is None:
        command = shutil.which("nvidia-smi")
        if not command:
            return []
        try:
            done = subprocess.run([command, "-L"], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return []
        nvidia_smi = done.stdout if done.returncode == 0 else ""
    return parse_nvidia_smi(nvidia_smi)


def describe(visible: list[str], env=None) -> str:
    """Where the GPU list came from, for messages: `CUDA_VISIBLE_DEVICES=...` or `nvidia-smi -L`."""
    env = os.environ if env is None else env
    if "CUDA_VISIBLE_DEVICES" in env:
        return f"CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']!r}"
    return "nvidia-smi -L" if visible else "nvidia-smi -L (no GPU listed, or no nvidia-smi)"


def limit_gpus(visible: list[str], gpus: int | None, source: str = "") -> list[str]:
    """The first `gpus` of `visible` (`--gpus N`); all of them when `gpus` is None."""
    if gpus is None:
        return list(visible)
    if gpus < 1:
        raise UserError(f"--gpus must be at least 1, got {gpus}")
    if gpus > len(visible):
        seen = f"{len(visible)} GPU{'s' if len(visible) != 1 else ''}"
        raise UserError(f"--gpus {gpus}: this machine shows {seen}{f' ({source})' if source else ''}")
    return list(visible[:gpus])


def worker_devices(visible: list[str], n_workers: int) -> dict[str, str]:
    """xdist worker id -> its GPU: `gwI` gets GPU I, round robin when there are more workers than GPUs
    (those workers share; `contention` says so). Empty without GPUs: workers then run unpinned."""
    if not visible:
        return {}
    return {f"gw{i}": visible[i % len(visible)] for i in range(n_workers)}


def contention(devices: dict[str, str], worker: str | None) -> str | None:
    """One line refusing to time on `worker`'s GPU when another worker has it too; None when it is its own."""
    if not worker or worker not in devices:
        return None
    device = devices[worker]
    sharing = sorted((w for w, d in devices.items() if d == device), key=lambda w: int(w[2:]))
    if len(sharing) < 2:
        return None
    n_gpus = len(set(devices.values()))
    return (
        f"pytest workers {', '.join(sharing)} share GPU {device}: timing would measure contention; "
        f"run one worker per GPU (-n {n_gpus}) or --gpus 1"
    )


def plain_nodeid(nodeid: str) -> str:
    """A test's node id without the `@group` that xdist's loadgroup appends: as a one-process run names it."""
    return _GROUP_SUFFIX.sub("", nodeid)


def _plain(value):
    """JSON's types as they are, anything else as its str (what pytest-benchmark's JSON writer makes of it)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def benchmark_record(metadata, nodeid: str) -> dict:
    """A finished benchmark (pytest-benchmark's `Metadata`) as plain data for the test report, named by the
    one-process `nodeid`."""
    record = _plain(metadata.as_dict(include_data=True))
    record["fullname"] = nodeid
    record["has_error"] = bool(metadata.has_error)
    return record


def benchmark_from_record(record: dict):
    """A `benchmark_record` back as a pytest-benchmark `Metadata`, for the controller's benchmark session."""
    from pytest_benchmark.stats import Metadata

    fixture = SimpleNamespace(
        name=record["name"],
        fullname=record["fullname"],
        group=record["group"],
        param=record["param"],
        params=record["params"],
        extra_info=record["extra_info"],
        cprofile_stats=None,
        has_error=record["has_error"],
    )
    stats = record["stats"]
    metadata = Metadata(fixture, stats["iterations"], record["options"])
    metadata.stats.data = list(stats["data"])
    return metadata
