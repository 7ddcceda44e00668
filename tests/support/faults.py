"""`sdxl-bench` with faults injected, for tests/e2e/test_engine_faults.py.

    python -m tests.support.faults FAULT[,FAULT...] -- <sdxl-bench arguments>

Each fault makes the real CLI meet what a real failure looks like from outside:
  kill:locked              SIGKILL once the build lock is held, before any work
  kill:calibrating         SIGKILL after the calibration forward passes, before ModelOpt's state is saved
  kill:saving-record       SIGKILL halfway through writing the activation record (its temp file is half-written)
  kill:saving-calibration  SIGKILL halfway through writing calibration.pt (its temp file is half-written)
  kill:writing-engine      SIGKILL halfway through writing unet.safetensors into the engine's temp dir
  kill:publishing          SIGKILL right after a refused engine was moved aside, before the new one is renamed in
  enospc                   the disk fills while unet.safetensors is written: half the file, then ENOSPC
  compile                  compile the UNet as a GPU run does (regions left eager: no C++ compiler needed), so
                           the engine's compile cache is loaded the way `txt2img --no-build` loads it on a GPU
SIGKILL cannot be caught: the process dies as under `kill -9` or the OOM killer, with no cleanup.
"""

from __future__ import annotations

import errno
import io
import os
import signal
import sys
from pathlib import Path


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _half_then(write, then):
    """A writer `(obj, path)` that writes half of what the real one would, then calls `then`."""

    def writer(obj, path, *args, **kwargs):
        buffer = io.BytesIO()
        write(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        Path(path).write_bytes(data[: len(data) // 2])
        then()

    return writer


def _when_writing(part: str, save):
    """torch.save that writes half of a file whose path holds `part` and dies there; other files are written whole."""
    half = _half_then(save, die)
    return lambda obj, path, *args, **kwargs: (half if part in str(path) else save)(obj, path, *args, **kwargs)


def _disk_full():
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _safetensors_bytes(tensors, buffer, metadata=None):
    import safetensors.torch

    buffer.write(safetensors.torch.save(tensors, metadata=metadata))


def install(fault: str) -> None:
    import pathlib

    import safetensors.torch
    import torch

    from sdxl_core.engines import compiled, torch_backend

    if fault == "kill:locked":
        torch_backend.build_unet = lambda *args, **kwargs: die()
    elif fault == "kill:calibrating":
        from sdxl_core import run

        make_loop = run.calibration_loop

        def calibration_loop(*args, **kwargs):
            loop = make_loop(*args, **kwargs)
            return lambda unet: (loop(unet), die())

        run.calibration_loop = calibration_loop
    elif fault in ("kill:saving-record", "kill:saving-calibration"):
        torch.save = _when_writing(
            ".calibration.pt." if fault.endswith("calibration") else "activation-records", torch.save
        )
    elif fault == "kill:writing-engine":
        safetensors.torch.save_file = _half_then(_safetensors_bytes, die)
    elif fault == "kill:publishing":
        rename = pathlib.Path.rename

        def moved_aside_then_die(self, target):
            done = rename(self, target)
            if ".stale" in Path(target).name:
                die()
            return done

        pathlib.Path.rename = moved_aside_then_die
    elif fault == "enospc":
        safetensors.torch.save_file = _half_then(_safetensors_bytes, _disk_full)
    elif fault == "compile":
        prepare = torch_backend.prepare
        torch_backend.prepare = lambda *args, **kwargs: prepare(*args, **{**kwargs, "compile": True})
        compiled.compile_regions = lambda unet, backend="inductor": unet
    else:
        raise SystemExit(f"unknown fault {fault!r}")


def main(argv: list[str]) -> int:
    faults, separator, args = argv[0], argv[1], argv[2:]
    if separator != "--":
        raise SystemExit("usage: python -m tests.support.faults FAULT[,FAULT...] -- <sdxl-bench arguments>")
    for fault in filter(None, faults.split(",")):
        install(fault)
    from sdxl_core.commands import cli

    return cli.main(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
