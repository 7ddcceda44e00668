"""The engine store: one directory per engine key, published whole and never modified.

    <engine-dir>/<key>/sidecar.json   what built it (versions, device, shapes) + sha256 and size of every file
    <engine-dir>/<key>/sidecar.sig    HMAC-SHA256 of sidecar.json's bytes, when SDXL_BENCH_ENGINE_KEY is set
    <engine-dir>/<key>/...            the backend's files
    <engine-dir>/<key>.lock           taken by builders only (never by readers)

Publishing: a builder takes the key's lock, writes into a temp directory beside the final one (named with
its host and pid, see `files.temp_name`) and renames it into place, so a reader sees no engine or a whole
one and never needs a lock; a published engine is never modified. Leftovers of builders that died are
swept at the next publish.

Checksums are `digests`; reading an engine directory, which is untrusted (`verify`, `Engine`, the sidecar, its
signature, the trust rules), is `trust`. Their public names are re-exported here: callers use `store.X`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from sdxl_core.engines.digests import (
    CHUNK_BYTES,
    DATA_SUFFIXES,
    bytes_match,
    chunk_digests,
    file_matches,
    file_record,
    is_data,
    sha256_file,
)
from sdxl_core.engines.trust import (
    JSON_MAX_BYTES,
    KEY_ENV,
    MIN_KEY_CHARS,
    SIDECAR,
    SIDECAR_MAX_BYTES,
    SIGNATURE,
    SIGNATURE_MAX_BYTES,
    TRUST_ENV,
    Engine,
    EngineRefused,
    EngineUntrusted,
    engine_path,
    read_sidecar,
    signature,
    signing_key,
    trust_override,
    verify,
)
from sdxl_core.errors import UserError
from sdxl_core.files import build_lock, sweep, temp_name, write_failure

__all__ = [
    "CHUNK_BYTES",
    "DATA_SUFFIXES",
    "JSON_MAX_BYTES",
    "KEY_ENV",
    "MIN_KEY_CHARS",
    "SIDECAR",
    "SIDECAR_MAX_BYTES",
    "SIDECAR_SCHEMA",
    "SIGNATURE",
    "SIGNATURE_MAX_BYTES",
    "TRUST_ENV",
    "Engine",
    "EngineRefused",
    "EngineUntrusted",
    "bytes_match",
    "chunk_digests",
    "engine_bytes",
    "engine_path",
    "engines_instead",
    "file_matches",
    "file_record",
    "get_or_build",
    "is_data",
    "lock",
    "missing_engine",
    "publish",
    "read_sidecar",
    "sha256_file",
    "signature",
    "signing_key",
    "trust_override",
    "verify",
]

SIDECAR_SCHEMA = 1


@contextlib.contextmanager
def lock(engine_dir: str | Path, key: str, timeout: float | None = None):
    """The build lock of `key`, beside the engine in the directory the builder must write anyway.

    Only builders take it. A directory the builder cannot write is one line before any work is spent.
    `timeout`: seconds to wait for another builder (None: `files.LOCK_TIMEOUT_S`), then one line."""
    engine_dir = Path(engine_dir)
    held = build_lock(engine_path(engine_dir, key), timeout)
    try:
        held.__enter__()
        if not os.access(engine_dir, os.W_OK):
            code = errno.EROFS if os.statvfs(engine_dir).f_flag & os.ST_RDONLY else errno.EACCES
            raise OSError(code, os.strerror(code))
    except OSError as exc:
        held.__exit__(None, None, None)
        raise UserError(
            f"cannot build engine {key}: {engine_dir} is not writable ({exc.strerror}); build it "
            "into a directory you can write, or load a prebuilt one with --no-build"
        ) from None
    try:
        yield held
    finally:
        held.__exit__(None, None, None)


def get_or_build(
    engine_dir: str | Path,
    key: str,
    *,
    load: Callable[[bool], object | None],
    build: Callable[[], tuple[object, Callable[[Path], dict], dict]],
    allow_build: bool,
    knobs: dict | None = None,
    lock_timeout: float | None = None,
    phase=None,
) -> tuple[object, str]:
    """The engine under `key`, loaded when one is whole, else built and published: (what it is, mode).

    `load(after_wait)` returns the loaded engine, or None when there is none or it was refused and may be
    rebuilt (it says so itself; `after_wait` is True for the second look, made holding the lock, when another
    builder may have published it meanwhile). `build()` returns (the engine, write_files, sidecar) for
    `publish`: all expensive work (calibration, compilation) happens there, outside publish's callback, which
    only writes files. Loading takes no lock; building takes the key's lock first, so a second builder waits
    and then loads the first one's engine. `knobs` (what makes the key) names, when building is not allowed,
    how the engines present differ from the one asked for. `phase(name)`: a context manager timing each step.
    """
    phase = phase or (lambda name: contextlib.nullcontext())
    found = load(False)
    if found is not None:
        return found, "loaded"
    if not allow_build:
        raise UserError(missing_engine(engine_dir, key, knobs))
    with contextlib.ExitStack() as held:
        with phase("build_lock"):
            held.enter_context(lock(engine_dir, key, lock_timeout))
        found = load(True)
        if found is not None:
            return found, "loaded"
        built, write_files, sidecar = build()
        with phase("engine_publish"):
            publish(engine_dir, key, write_files, {**sidecar, **({"knobs": knobs} if knobs else {})})
    return built, "built"


def missing_engine(engine_dir: str | Path, key: str, knobs: dict | None = None) -> str:
    """ "No engine": which engines the directory has instead, closest first, and how each differs."""
    return f"no engine {key} in {engine_dir}, and building was not allowed; {engines_instead(engine_dir, knobs)}"


def engines_instead(engine_dir: str | Path, knobs: dict | None = None) -> str:
    """What `engine_dir` holds, closest to `knobs` (what makes the key wanted) first: "it holds KEY (differs in
    fused_qkv=True, this run: unset); KEY2". Reads sidecars only: no torch, so the CLI can say it before
    importing any. An entry without a readable sidecar is named as it is."""
    engine_dir = Path(engine_dir)
    wanted = json.loads(json.dumps(knobs or {}))  # as a sidecar stores them (tuples become lists)
    unset = object()

    def shown(value) -> str:
        return "unset" if value is unset else repr(value)

    present = []
    entries = (
        sorted(p for p in engine_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        if engine_dir.is_dir()
        else []
    )
    for path in entries:
        try:
            record = read_sidecar(path)  # bounded: another engine's sidecar may be hostile too
        except EngineRefused:
            present.append((99, path.name, ""))
            continue
        if record.get("component") == "timing-cache":
            continue
        if not isinstance(record.get("knobs"), dict) or not wanted:
            present.append((99, path.name, ""))
            continue
        stored = record["knobs"]
        differ = [
            f"{name}={shown(stored.get(name, unset))}, this run: {shown(wanted.get(name, unset))}"
            for name in sorted(set(stored) | set(wanted))
            if stored.get(name, unset) != wanted.get(name, unset)
        ]
        present.append((len(differ), path.name, f" (differs in {'; '.join(differ)})" if differ else ""))
    if not present:
        return "it holds no engine"
    present.sort()
    listed = "; ".join(f"{name}{differ}" for _, name, differ in present[:5])
    more = f"; and {len(present) - 5} more" if len(present) > 5 else ""
    return f"it holds {listed}{more}"


def publish(engine_dir: str | Path, key: str, write_files: Callable[[Path], dict], sidecar: dict) -> Path:
    """Run `write_files(tmp_dir)` (returns extra sidecar fields), checksum, sign, then rename into place.

    Call it while holding `lock(engine_dir, key)`. An existing engine under the key is replaced. On any
    failure the temp directory is removed; a full disk is one line (UserError).
    """
    final = engine_path(engine_dir, key)
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep(final.parent)  # temp and stale dirs of builders that died (any key)
    key_bytes = signing_key()
    tmp = final.with_name(temp_name(key))
    try:
        tmp.mkdir()
        tmp.chmod(0o755)  # a published engine is readable like any build output, and written by nobody
        extra = write_files(tmp) or {}
        files = {}
        for p in sorted(tmp.iterdir()):
            if p.is_symlink() or not p.is_file():
                raise UserError(f"engine {key}: the backend wrote {p.name}, which is not a plain file")
            p.chmod(0o644)
            _fsync(p)
            files[p.name] = file_record(p)
        record = {
            "schema": SIDECAR_SCHEMA,
            "key": key,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **sidecar,
            **extra,
            "files": files,
        }
        data = (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()
        _write(tmp / SIDECAR, data)
        if key_bytes is not None:
            _write(tmp / SIGNATURE, signature(data, key_bytes).encode())
        _fsync(tmp)
        if final.exists():
            stale = final.with_name(temp_name(key, kind="stale"))
            final.rename(stale)
            shutil.rmtree(stale, ignore_errors=True)
        tmp.rename(final)
        _fsync(final.parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        failure = write_failure(final, exc)
        if failure is not None:
            raise UserError(f"engine {key} not written: {failure}") from None
        raise
    return final


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    path.chmod(0o644)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def engine_bytes(record: dict, names: tuple[str, ...] | None = None) -> int:
    return sum(m["bytes"] for n, m in record.get("files", {}).items() if names is None or n in names)
