"""Engine artifacts on disk: one directory per engine key, a JSON sidecar, checksums, atomic publish, trust.

    <engine-dir>/<key>/sidecar.json   what built it (versions, device, shapes) + sha256 and size of every file
    <engine-dir>/<key>/sidecar.sig    HMAC-SHA256 of sidecar.json's bytes, when SDXL_BENCH_ENGINE_KEY is set
    <engine-dir>/<key>/...            the backend's files
    <engine-dir>/<key>.lock           taken by builders only (never by readers)

Publishing: a builder takes the key's lock, writes into a temp directory beside the final one (named with
its host and pid, see `files.temp_name`) and renames it into place, so a reader sees no engine or a whole
one and never needs a lock; a published engine is never modified. Leftovers of builders that died are
swept at the next publish.

Checksums: every file's sha256, and for a file larger than CHUNK_BYTES also the sha256 of each CHUNK_BYTES piece,
which readers hash in parallel (a 4.9 GB FP16 UNet took 2.5-5 s to hash whole, on one core, on every load).
Engines published before chunks were listed are checked whole.

Trust: the engine directory is a trust boundary. Safetensors and JSON carry no code and are loaded from
anywhere once their checksums match. Every other file (PyTorch compile caches, TensorRT plans and timing
caches) is executable and is read only through `Engine.read`, which hashes the very bytes it returns, and
only when the sidecar is signed with SDXL_BENCH_ENGINE_KEY, or (without a key) when the directory, sidecar
and file belong to this user and nobody else can write them, or when SDXL_BENCH_TRUST_ENGINE_DIR=1 says to
trust the directory anyway. With a key set, an engine whose sidecar is unsigned or signed otherwise is
refused. Files the sidecar does not list are never read.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import json
import os
import re
import shutil
import stat
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from sdxl_core.errors import UserError
from sdxl_core.files import build_lock, sweep, temp_name, write_failure

SIDECAR = "sidecar.json"
SIGNATURE = "sidecar.sig"
SIDECAR_SCHEMA = 1
KEY_ENV = "SDXL_BENCH_ENGINE_KEY"
TRUST_ENV = "SDXL_BENCH_TRUST_ENGINE_DIR"
MIN_KEY_CHARS = 16
DATA_SUFFIXES = (".safetensors", ".json")  # formats that carry no code; every other file counts as executable
CHUNK_BYTES = 64 << 20  # files larger than this are also hashed piece by piece (see the module doc)
_READ_BYTES = 4 << 20
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SIGNATURE_PREFIX = "hmac-sha256:"


class EngineRefused(UserError):
    """An artifact exists but must not be loaded (truncated, corrupt, foreign, or built elsewhere)."""


class EngineUntrusted(UserError):
    """An executable artifact whose origin cannot be established: refused, never rebuilt over."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _hash_workers() -> int:
    try:
        return max(1, min(32, len(os.sched_getaffinity(0))))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def chunk_digests(path: Path, size: int, chunk: int = CHUNK_BYTES) -> list[str]:
    """The sha256 of each `chunk`-byte piece of the file, hashed in parallel (hashlib releases the GIL)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)

    def one(start: int) -> str:
        digest, end = hashlib.sha256(), min(start + chunk, size)
        while start < end:
            data = os.pread(fd, min(_READ_BYTES, end - start), start)
            if not data:
                break
            digest.update(data)
            start += len(data)
        return digest.hexdigest()

    try:
        with ThreadPoolExecutor(_hash_workers()) as pool:
            return list(pool.map(one, range(0, size, chunk)))
    finally:
        os.close(fd)


def _bytes_chunk_digests(data: bytes, chunk: int) -> list[str]:
    view = memoryview(data)
    with ThreadPoolExecutor(_hash_workers()) as pool:
        return list(pool.map(lambda i: hashlib.sha256(view[i : i + chunk]).hexdigest(), range(0, len(data), chunk)))


def file_record(path: Path) -> dict:
    """A file's sidecar entry: size and sha256, plus the sha256 of each CHUNK_BYTES piece of a larger file
    (hashed while the whole file is, so publishing takes no longer)."""
    size = path.stat().st_size
    if size <= CHUNK_BYTES:
        return {"sha256": sha256_file(path), "bytes": size}
    with ThreadPoolExecutor(1) as whole:
        digest = whole.submit(sha256_file, path)
        chunks = {"bytes": CHUNK_BYTES, "sha256": chunk_digests(path, size, CHUNK_BYTES)}
        return {"sha256": digest.result(), "bytes": size, "chunks": chunks}


def _chunks(meta: dict) -> dict | None:
    """The entry's chunk list, None when it has none; a malformed one raises ValueError."""
    chunks = meta.get("chunks")
    if chunks is None:
        return None
    size = chunks.get("bytes") if isinstance(chunks, dict) else None
    digests = chunks.get("sha256") if isinstance(chunks, dict) else None
    if (
        not isinstance(size, int)
        or size < 1
        or not isinstance(digests, list)
        or len(digests) != -(-meta["bytes"] // size)
        or not all(isinstance(d, str) for d in digests)
    ):
        raise ValueError("malformed chunk list")
    return chunks


def file_matches(path: Path, meta: dict) -> bool:
    """Whether the file's content is what its (checked) sidecar entry says: by chunks in parallel, else whole."""
    chunks = _chunks(meta)
    if chunks is None:
        return sha256_file(path) == meta["sha256"]
    return chunk_digests(path, meta["bytes"], chunks["bytes"]) == chunks["sha256"]


def bytes_match(data: bytes, meta: dict) -> bool:
    chunks = _chunks(meta)
    if chunks is None:
        return hashlib.sha256(data).hexdigest() == meta["sha256"]
    return _bytes_chunk_digests(data, chunks["bytes"]) == chunks["sha256"]


def is_data(name: str) -> bool:
    """Safetensors and JSON: loaded without trust. Anything else may run code when loaded."""
    return name.endswith(DATA_SUFFIXES)


def engine_path(engine_dir: str | Path, key: str) -> Path:
    return Path(engine_dir) / key


def signing_key() -> bytes | None:
    """SDXL_BENCH_ENGINE_KEY as bytes, or None when unset."""
    value = os.environ.get(KEY_ENV, "")
    if not value:
        return None
    if len(value) < MIN_KEY_CHARS:
        raise UserError(
            f"{KEY_ENV} is {len(value)} characters: use at least {MIN_KEY_CHARS} random ones "
            "(python -c 'import secrets; print(secrets.token_hex(32))')"
        )
    return value.encode()


def signature(sidecar_bytes: bytes, key: bytes) -> str:
    """The content of sidecar.sig for these sidecar bytes."""
    return _SIGNATURE_PREFIX + hmac.new(key, sidecar_bytes, hashlib.sha256).hexdigest() + "\n"


def trust_override() -> bool:
    value = os.environ.get(TRUST_ENV, "")
    if value not in ("", "0", "1"):
        raise UserError(f"{TRUST_ENV} must be 1 (trust unsigned engine dirs of other users) or 0, got {value!r}")
    return value == "1"


def _owner_problem(what: str, info: os.stat_result) -> str | None:
    """Why a file or directory is not this user's alone, or None."""
    if info.st_uid != os.geteuid():
        return f"{what} belongs to uid {info.st_uid}"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{what} is writable by group or others"
    return None


def _open_regular(path: Path):
    """A regular file opened for reading (never through a symlink) and the stat of that descriptor."""
    handle = os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb")
    info = os.fstat(handle.fileno())
    if not stat.S_ISREG(info.st_mode):
        handle.close()
        raise OSError(f"{path.name} is not a regular file")
    return handle, info


def _read_fd(path: Path) -> tuple[bytes, os.stat_result]:
    handle, info = _open_regular(path)
    with handle:
        return handle.read(), info


@dataclass(frozen=True)
class Engine:
    """A published engine whose sidecar was read once and checked (what `verify` returns)."""

    path: Path
    record: dict  # the sidecar, parsed from the bytes that were checked (and signed)
    signed: bool  # sidecar.sig matched SDXL_BENCH_ENGINE_KEY
    owner_problem: str | None  # None when the directory and its sidecar are this user's alone

    @property
    def key(self) -> str:
        return self.record["key"]

    @property
    def files(self) -> dict:
        return self.record["files"]

    def read(self, name: str) -> bytes:
        """The bytes of a listed file, hashed as read: no other bytes can be substituted after the check.

        An executable file (not `is_data`) is returned only from a trusted engine (see the module doc)."""
        if name not in self.files:
            raise EngineRefused(
                f"engine {self.key}: {name} is not listed in its sidecar; delete {self.path} to rebuild it"
            )
        try:
            handle, info = _open_regular(self.path / name)
        except OSError as exc:
            raise EngineRefused(
                f"engine {self.key}: cannot read {name} ({exc.strerror or exc}); delete {self.path} to rebuild it"
            ) from None
        with handle:
            if not is_data(name):
                self._check_trust(name, info)  # before reading: an untrusted plan may be gigabytes
            data = handle.read()
        meta = self.files[name]
        if len(data) != meta["bytes"] or not bytes_match(data, meta):
            raise EngineRefused(f"engine {self.key}: {name} fails its checksum; delete {self.path} to rebuild it")
        return data

    def _check_trust(self, name: str, info: os.stat_result) -> None:
        if self.signed:
            return
        problem = self.owner_problem or _owner_problem(name, info)
        if problem is None or trust_override():
            return
        raise EngineUntrusted(
            f"engine {self.key}: refusing to load {name} (executable) from {self.path}: "
            f"it is not signed and {problem}; set {KEY_ENV} to the key it was built with, or "
            f"{TRUST_ENV}=1 to trust this directory"
        )


@contextlib.contextmanager
def lock(engine_dir: str | Path, key: str, timeout: float | None = None):
    """The build lock of `key`, beside the engine in the directory the builder must write anyway.

    Only builders take it. A directory the builder cannot write is one line before any work is spent.
    `timeout`: seconds to wait for another builder (None: as long as it takes)."""
    engine_dir = Path(engine_dir)
    path = engine_path(engine_dir, key)
    held = build_lock(path) if timeout is None else build_lock(path, timeout=timeout)
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
    engine_dir = Path(engine_dir)
    message = f"no engine {key} in {engine_dir}, and building was not allowed"
    wanted = json.loads(json.dumps(knobs or {}))  # as a sidecar stores them (tuples become lists)
    present = []
    for path in sorted(engine_dir.glob("*/" + SIDECAR)) if engine_dir.is_dir() else []:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(record, dict) or record.get("component") == "timing-cache":
            continue
        if not isinstance(record.get("knobs"), dict) or not wanted:
            present.append((99, path.parent.name, ""))
            continue
        stored = record["knobs"]
        differ = [
            f"{name}={stored.get(name, 'unset')!r} (this run: {wanted.get(name, 'unset')!r})"
            for name in sorted(set(stored) | set(wanted))
            if stored.get(name, "unset") != wanted.get(name, "unset")
        ]
        present.append((len(differ), path.parent.name, f": differs in {', '.join(differ)}" if differ else ""))
    if not present:
        return f"{message}; that directory has no engines"
    present.sort()
    listed = "; ".join(f"{name}{differ}" for _, name, differ in present[:5])
    more = f"; and {len(present) - 5} more" if len(present) > 5 else ""
    return f"{message}; it has {len(present)} other engine(s): {listed}{more}"


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


def read_sidecar(path: Path) -> dict:
    """The sidecar of the engine at `path`, parsed (no checks: for reports and tests)."""
    try:
        record = json.loads((path / SIDECAR).read_text())
    except (OSError, ValueError) as exc:
        raise EngineRefused(f"engine {path.name}: unreadable sidecar ({type(exc).__name__})") from None
    files = record.get("files") if isinstance(record, dict) else None
    if (
        not isinstance(files, dict)
        or not files
        or not all(
            isinstance(m, dict) and isinstance(m.get("bytes"), int) and isinstance(m.get("sha256"), str)
            for m in files.values()
        )
    ):
        raise EngineRefused(f"engine {path.name}: its sidecar is malformed (no file list with sizes and checksums)")
    return record


def verify(
    engine_dir: str | Path, key: str, expect: dict, *, required: tuple[str, ...] = (), checksums: bool = True
) -> Engine | None:
    """None when no engine exists; the Engine when it is whole and built for `expect`; else raise EngineRefused.

    `expect` holds sidecar fields that must match exactly (backend version, device, shapes, ...);
    `required` the files the backend will read, which the sidecar must list. Every listed file must exist
    with its size and (with `checksums`) its sha256; executables are hashed again when read (`Engine.read`).
    Takes no lock and writes nothing: a published engine is immutable.
    """
    path = engine_path(engine_dir, key)
    if not path.exists():
        return None
    refuse = f"delete {path} to rebuild it"
    try:
        data, sidecar_stat = _read_fd(path / SIDECAR)
        record = json.loads(data)
    except (OSError, ValueError) as exc:
        raise EngineRefused(f"engine {path.name}: unreadable sidecar ({type(exc).__name__})") from None
    signed = _check_signature(path, key, data)
    if not isinstance(record, dict):
        raise EngineRefused(f"engine {key}: its sidecar is malformed (not a JSON object); {refuse}")
    if record.get("key") != key:
        raise EngineRefused(f"engine {key}: its sidecar names another engine ({record.get('key')})")
    for field, wanted in expect.items():
        if record.get(field) != wanted:
            raise EngineRefused(
                f"engine {key} was built for {field}={record.get(field)!r}, this run needs "
                f"{wanted!r}; delete {path} or use another --engine-dir"
            )
    files = record.get("files")
    if not isinstance(files, dict) or not files:
        raise EngineRefused(f"engine {key}: its sidecar is malformed (it lists no files); {refuse}")
    for name in required:
        if name not in files:
            raise EngineRefused(f"engine {key}: its sidecar does not list {name}; {refuse}")
    for name, meta in files.items():
        if (
            not _FILE_NAME.fullmatch(name)
            or name in (SIDECAR, SIGNATURE)
            or not isinstance(meta, dict)
            or not isinstance(meta.get("bytes"), int)
            or not isinstance(meta.get("sha256"), str)
        ):
            raise EngineRefused(f"engine {key}: its sidecar has a malformed entry {name[:60]!r}; {refuse}")
        try:
            _chunks(meta)
        except ValueError:
            raise EngineRefused(
                f"engine {key}: its sidecar has a malformed entry {name[:60]!r} (its chunk list); {refuse}"
            ) from None
        file = path / name
        if file.is_symlink() or not file.is_file():
            raise EngineRefused(f"engine {key}: {name} is missing; {refuse}")
        if file.stat().st_size != meta["bytes"]:
            raise EngineRefused(
                f"engine {key}: {name} is truncated ({file.stat().st_size} of {meta['bytes']} bytes); {refuse}"
            )
        if checksums and not file_matches(file, meta):
            raise EngineRefused(f"engine {key}: {name} fails its checksum; {refuse}")
    owner = _owner_problem(f"directory {path}", path.stat()) or _owner_problem(SIDECAR, sidecar_stat)
    return Engine(path=path, record=record, signed=signed, owner_problem=owner)


def _check_signature(path: Path, key: str, sidecar_bytes: bytes) -> bool:
    """With SDXL_BENCH_ENGINE_KEY set, the sidecar must carry its HMAC; without it, signatures are not read."""
    key_bytes = signing_key()
    if key_bytes is None:
        return False
    try:
        found, _ = _read_fd(path / SIGNATURE)
    except OSError:
        raise EngineRefused(
            f"engine {key} is not signed with {KEY_ENV} (no {SIGNATURE}): rebuild it with the "
            "key set, or unset the key to load it unsigned"
        ) from None
    if not hmac.compare_digest(found, signature(sidecar_bytes, key_bytes).encode()):
        raise EngineRefused(
            f"engine {key}: its {SIGNATURE} does not match {KEY_ENV} (tampered, or signed with "
            f"another key); delete {path} to rebuild it"
        )
    return True


def engine_bytes(record: dict, names: tuple[str, ...] | None = None) -> int:
    return sum(m["bytes"] for n, m in record.get("files", {}).items() if names is None or n in names)
