"""One result file per GPU measurement: written as it goes, rendered to markdown by `sdxl-bench report`
(`measurements.render`)."""

from __future__ import annotations

import datetime
import json
import shlex
import sys
from pathlib import Path

import torch

from sdxl_core.errors import UserError
from sdxl_core.files import atomic_write_text
from sdxl_core.hardware import device_info, library_versions

KINDS = ("engines", "kernels", "profile")


class ResultFile:
    """`<out>/<kind>.json`: {"kind", "created", "command", "device", "libraries", ...meta, "rows": [...]}."""

    def __init__(self, out_dir: str | Path, kind: str, device: torch.device, **meta):
        if kind not in KINDS:
            raise ValueError(f"unknown result kind {kind!r}")
        out = Path(out_dir)
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} is a file: give a directory")
        self.path = out / f"{kind}.json"
        self.data = {
            "kind": kind,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": shlex.join(sys.argv),
            "device": device_info(device),
            "libraries": library_versions(),
            **meta,
            "rows": [],
        }
        self.save()

    def add(self, row: dict) -> dict:
        self.data["rows"].append(row)
        self.save()
        return row

    def update(self, **meta) -> None:
        self.data.update(meta)
        self.save()

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.data, indent=1, default=str) + "\n")
