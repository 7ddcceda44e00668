"""One result file per GPU measurement: written as it goes, rendered to markdown by `sdxl-bench report`."""

from __future__ import annotations

import datetime
import json
import shlex
import sys
from pathlib import Path

import torch

from sdxl_core.errors import UserError
from sdxl_core.files import atomic_write_text

KINDS = ("engines", "kernels", "profile")


class ResultFile:
    """`<out>/<kind>.json`: {"kind", "created", "command", "device", "libraries", ...meta, "rows": [...]}."""

    def __init__(self, out_dir: str | Path, kind: str, device: torch.device, **meta):
        from sdxl_core.reports.run_report import device_info, library_versions

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


def render(data: dict) -> str:
    """Markdown for any result file (see KINDS)."""
    import importlib

    if data.get("kind") not in KINDS:
        raise UserError(f"not a result file of kind {', '.join(KINDS)}")
    renderer = importlib.import_module(f"sdxl_core.commands.{data['kind']}").render
    device = data.get("device", {})
    libs = data.get("libraries", {})
    head = (
        f"**{data['kind']}** · {data.get('created', '')} · {device.get('name', '?')} · torch "
        f"{libs.get('torch', '?')}, triton {libs.get('triton', '?')}, CUDA {libs.get('cuda', '-')}\n\n"
        f"    {data.get('command', '')}\n"
    )
    return head + "\n" + renderer(data)


def table(columns: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join("-" if c is None else str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value, spec: str = "{:.2f}"):
    return None if value is None else spec.format(value)
