"""Engine artifacts on disk: one directory per engine key, a JSON sidecar, checksums, atomic publish.

    <engine-dir>/<key>/sidecar.json   what built it (versions, device, shapes) + sha256 of every file
    <engine-dir>/<key>/...            the backend's files
    <engine-dir>/<key>.lock           held while checking for and building the engine

A build writes into a temp directory beside the final one and renames it into place, so a reader
sees either no engine or a whole one; the lock makes a second builder wait and then reuse it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import UserError
from ..files import build_lock

SIDECAR = "sidecar.json"
SIDECAR_SCHEMA = 1


class EngineRefused(UserError):
    """An artifact exists but must not be loaded (truncated, corrupt, foreign, or built elsewhere)."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def engine_path(engine_dir: str | Path, key: str) -> Path:
    return Path(engine_dir) / key


def lock(engine_dir: str | Path, key: str):
    return build_lock(engine_path(engine_dir, key))


def publish(engine_dir: str | Path, key: str, write_files: Callable[[Path], dict], sidecar: dict) -> Path:
    """Run `write_files(tmp_dir)` (returns extra sidecar fields), checksum, then rename into place.

    Call it while holding `lock(engine_dir, key)`. An existing engine under the key is replaced.
    """
    final = engine_path(engine_dir, key)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{key}.", suffix=".tmp"))
    tmp.chmod(0o755)  # mkdtemp makes it private; a published engine is readable like any build output
    try:
        extra = write_files(tmp) or {}
        for p in tmp.iterdir():
            p.chmod(0o644)
        files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                 for p in sorted(tmp.iterdir()) if p.is_file()}
        record = {"schema": SIDECAR_SCHEMA, "key": key, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  **sidecar, **extra, "files": files}
        (tmp / SIDECAR).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        if final.exists():
            stale = final.with_name(f".{key}.stale-{time.time_ns()}")
            final.rename(stale)
            shutil.rmtree(stale, ignore_errors=True)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def read_sidecar(path: Path) -> dict:
    try:
        record = json.loads((path / SIDECAR).read_text())
    except (OSError, ValueError) as exc:
        raise EngineRefused(f"engine {path.name}: unreadable sidecar ({type(exc).__name__})") from None
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, dict) or not files or not all(
            isinstance(m, dict) and isinstance(m.get("bytes"), int) and isinstance(m.get("sha256"), str)
            for m in files.values()):
        raise EngineRefused(f"engine {path.name}: its sidecar is malformed (no file list with sizes and checksums)")
    return record


def verify(engine_dir: str | Path, key: str, expect: dict, *, checksums: bool = True) -> dict | None:
    """None when no engine exists; the sidecar when it is whole and built for `expect`; else raise.

    `expect` holds sidecar fields that must match exactly (backend version, device, shapes, ...).
    """
    path = engine_path(engine_dir, key)
    if not path.exists():
        return None
    record = read_sidecar(path)
    if record.get("key") != key:
        raise EngineRefused(f"engine {key}: its sidecar names another engine ({record.get('key')})")
    for field, wanted in expect.items():
        if record.get(field) != wanted:
            raise EngineRefused(f"engine {key} was built for {field}={record.get(field)!r}, this run needs "
                                f"{wanted!r}; delete {path} or use another --engine-dir")
    for name, meta in record.get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise EngineRefused(f"engine {key}: {name} is missing; delete {path} to rebuild it")
        if file.stat().st_size != meta["bytes"]:
            raise EngineRefused(f"engine {key}: {name} is truncated ({file.stat().st_size} of {meta['bytes']} "
                                f"bytes); delete {path} to rebuild it")
        if checksums and sha256_file(file) != meta["sha256"]:
            raise EngineRefused(f"engine {key}: {name} fails its checksum; delete {path} to rebuild it")
    return record


def engine_bytes(record: dict, names: tuple[str, ...] | None = None) -> int:
    return sum(m["bytes"] for n, m in record.get("files", {}).items() if names is None or n in names)
