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

Trust: the engine directory is a trust boundary. `verify` opens `<key>` once, as a directory handle that
follows no symlink (the entry itself must be a real directory), and every later read goes through that handle:
swapping the directory or its files after the check changes nothing that is read. The sidecar's size is
bounded and its HMAC checked on the raw bytes before they are parsed; every JSON file is parsed from the bytes
that were hashed, with its size and nesting bounded. Safetensors and JSON carry no code and are loaded from
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
from dataclasses import dataclass, field
from pathlib import Path

from sdxl_core import settings
from sdxl_core.errors import UserError
from sdxl_core.files import build_lock, parse_json, sweep, temp_name, write_failure

SIDECAR = "sidecar.json"
SIGNATURE = "sidecar.sig"
SIDECAR_SCHEMA = 1
KEY_ENV = "SDXL_BENCH_ENGINE_KEY"
TRUST_ENV = "SDXL_BENCH_TRUST_ENGINE_DIR"
MIN_KEY_CHARS = 16
DATA_SUFFIXES = (".safetensors", ".json")  # formats that carry no code; every other file counts as executable
CHUNK_BYTES = 64 << 20  # files larger than this are also hashed piece by piece (see the module doc)
_READ_BYTES = 4 << 20
# Bounds checked before a byte is read: a sidecar lists a few dozen files (with chunk digests, a few KB), a
# signature is one line, and the JSON an engine holds (UNet config, layer plan) is well under a megabyte.
SIDECAR_MAX_BYTES = 4 << 20
SIGNATURE_MAX_BYTES = 256
JSON_MAX_BYTES = 16 << 20
_OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # O_NONBLOCK: a planted FIFO never blocks
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SIGNATURE_PREFIX = "hmac-sha256:"


class EngineRefused(UserError):
    """An artifact exists but must not be loaded (truncated, corrupt, foreign, or built elsewhere)."""


class EngineUntrusted(UserError):
    """An executable artifact whose origin cannot be established: refused, never rebuilt over."""


def sha256_file(path: Path | int) -> str:
    """The sha256 of a file, by path or of an open descriptor (read from its start, left open)."""
    digest = hashlib.sha256()
    if isinstance(path, int):
        offset = 0
        while data := os.pread(path, _READ_BYTES, offset):
            digest.update(data)
            offset += len(data)
        return digest.hexdigest()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _hash_workers() -> int:
    try:
        return max(1, min(32, len(os.sched_getaffinity(0))))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def chunk_digests(path: Path | int, size: int, chunk: int = CHUNK_BYTES) -> list[str]:
    """The sha256 of each `chunk`-byte piece of the file (a path, or an open descriptor left open), hashed in
    parallel (hashlib releases the GIL)."""
    fd = path if isinstance(path, int) else os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)

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
        if not isinstance(path, int):
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


def file_matches(path: Path | int, meta: dict) -> bool:
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
    """SDXL_BENCH_ENGINE_KEY as bytes (exactly the environment's bytes, whatever the locale), or None when unset."""
    return settings.engine_key()


def signature(sidecar_bytes: bytes, key: bytes) -> str:
    """The content of sidecar.sig for these sidecar bytes."""
    return _SIGNATURE_PREFIX + hmac.new(key, sidecar_bytes, hashlib.sha256).hexdigest() + "\n"


def trust_override() -> bool:
    return settings.trust_engine_dir()


def _owner_problem(what: str, info: os.stat_result) -> str | None:
    """Why a file or directory is not this user's alone, or None."""
    if info.st_uid != os.geteuid():
        return f"{what} belongs to uid {info.st_uid}"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{what} is writable by group or others"
    return None


def _open_at(dir_fd: int, name: str) -> tuple[int, os.stat_result]:
    """A regular file in the directory `dir_fd` opened for reading, never through a symlink, and its stat."""
    fd = os.open(name, _OPEN_FILE, dir_fd=dir_fd)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd, info


def _read_open(fd: int, size: int) -> bytes:
    """Up to `size` + 1 bytes from the start of a just-opened `fd` (one more than expected shows a file that grew)."""
    with open(fd, "rb", closefd=False) as handle:
        return handle.read(size + 1)


class _TooLarge(ValueError):
    pass


def _read_bounded(dir_fd: int, name: str, max_bytes: int) -> tuple[bytes, os.stat_result]:
    """A regular file's bytes, refused (_TooLarge) before any is read when it holds more than `max_bytes`."""
    fd, info = _open_at(dir_fd, name)
    try:
        if info.st_size > max_bytes:
            raise _TooLarge(f"{name} is {info.st_size} bytes, more than the {max_bytes} it may hold")
        data = _read_open(fd, max_bytes)
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise _TooLarge(f"{name} grew past the {max_bytes} bytes it may hold while it was read")
    return data, info


@dataclass(frozen=True, eq=False)
class Engine:
    """A published engine whose sidecar was read once and checked (what `verify` returns).

    `dir_fd` is the engine directory as `verify` opened it: every read goes through it, so what is read is
    what was verified, whatever happens to the path meanwhile. It is closed with the Engine."""

    path: Path
    record: dict  # the sidecar, parsed from the bytes that were checked (and signed)
    signed: bool  # sidecar.sig matched SDXL_BENCH_ENGINE_KEY
    owner_problem: str | None  # None when the directory and its sidecar are this user's alone
    dir_fd: int = field(default=-1, repr=False)

    @property
    def key(self) -> str:
        return self.record["key"]

    @property
    def files(self) -> dict:
        return self.record["files"]

    def _refuse(self, what: str) -> EngineRefused:
        return EngineRefused(f"engine {self.key}: {what}; delete {self.path} to rebuild it")

    def read(self, name: str) -> bytes:
        """The bytes of a listed file, hashed as read: no other bytes can be substituted after the check.

        An executable file (not `is_data`) is returned only from a trusted engine (see the module doc)."""
        if name not in self.files:
            raise self._refuse(f"{name} is not listed in its sidecar")
        meta = self.files[name]
        try:
            fd, info = _open_at(self.dir_fd, name)
        except OSError as exc:
            raise self._refuse(f"cannot read {name} ({exc.strerror or exc})") from None
        try:
            if not is_data(name):
                self._check_trust(name, info)  # before reading: an untrusted plan may be gigabytes
            if info.st_size != meta["bytes"]:
                raise self._refuse(f"{name} is {info.st_size} bytes, its sidecar says {meta['bytes']}")
            data = _read_open(fd, meta["bytes"])
        except OSError as exc:
            raise self._refuse(f"cannot read {name} ({exc.strerror or exc})") from None
        finally:
            os.close(fd)
        if len(data) != meta["bytes"] or not bytes_match(data, meta):
            raise self._refuse(f"{name} fails its checksum")
        return data

    def read_json(self, name: str, max_bytes: int = JSON_MAX_BYTES):
        """A listed JSON file, parsed from the bytes `read` hashed, its size and nesting bounded first."""
        if name in self.files and self.files[name]["bytes"] > max_bytes:
            raise self._refuse(f"{name} is {self.files[name]['bytes']} bytes, more than the {max_bytes} it may hold")
        data = self.read(name)
        try:
            return parse_json(data)
        except ValueError as exc:
            raise self._refuse(f"{name} is not valid JSON ({exc})") from None

    def close(self) -> None:
        if self.dir_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.dir_fd)
            object.__setattr__(self, "dir_fd", -1)

    def __del__(self):
        self.close()

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


def _parse_sidecar(data: bytes) -> dict:
    """The sidecar's record, checked against its schema (ValueError says what is wrong)."""
    record = parse_json(data)
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    files = record.get("files")
    if not isinstance(files, dict) or not files:
        raise ValueError("it lists no files")
    for file, meta in files.items():
        if (
            not _FILE_NAME.fullmatch(file)
            or file in (SIDECAR, SIGNATURE)
            or not isinstance(meta, dict)
            or not isinstance(meta.get("bytes"), int)
            or isinstance(meta["bytes"], bool)
            or meta["bytes"] < 0
            or not isinstance(meta.get("sha256"), str)
        ):
            raise ValueError(f"a malformed entry {file[:60]!r}")
        try:
            _chunks(meta)
        except ValueError:
            raise ValueError(f"a malformed entry {file[:60]!r} (its chunk list)") from None
    return record


def read_sidecar(path: Path) -> dict:
    """The sidecar of the engine at `path`, parsed (bounded, schema-checked; no signature or file checks: for
    reports and tests)."""
    try:
        fd = os.open(path, _OPEN_DIR | os.O_NOFOLLOW)
    except OSError as exc:
        raise EngineRefused(f"engine {path.name}: unreadable sidecar ({exc.strerror or exc})") from None
    try:
        data, _ = _read_bounded(fd, SIDECAR, SIDECAR_MAX_BYTES)
        return _parse_sidecar(data)
    except _TooLarge as exc:
        raise EngineRefused(f"engine {path.name}: {exc}") from None
    except (OSError, ValueError) as exc:
        raise EngineRefused(f"engine {path.name}: its sidecar is malformed ({exc})") from None
    finally:
        os.close(fd)


def _open_engine_dir(engine_dir: str | Path, key: str) -> int | None:
    """`<engine-dir>/<key>` opened as a directory handle, or None when there is none. The engine dir may be a
    symlink (the user named it); `<key>` must be a real directory inside it."""
    path = engine_path(engine_dir, key)
    if not _FILE_NAME.fullmatch(key):
        raise EngineRefused(f"engine key {key[:80]!r} is not a file name")
    try:
        parent = os.open(engine_dir, _OPEN_DIR)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise EngineRefused(f"cannot read the engine dir {engine_dir} ({exc.strerror or exc})") from None
    try:
        return os.open(key, _OPEN_DIR | os.O_NOFOLLOW, dir_fd=parent)
    except FileNotFoundError:
        return None
    except OSError as exc:
        kind = "a symlink" if os.path.islink(path) else "not a directory"
        raise EngineRefused(
            f"engine {key}: {path} is {kind} ({exc.strerror}), not an engine; delete it to rebuild the engine"
        ) from None
    finally:
        os.close(parent)


def verify(
    engine_dir: str | Path, key: str, expect: dict, *, required: tuple[str, ...] = (), checksums: bool = True
) -> Engine | None:
    """None when no engine exists; the Engine when it is whole and built for `expect`; else raise EngineRefused.

    `expect` holds sidecar fields that must match exactly (backend version, device, shapes, ...);
    `required` the files the backend will read, which the sidecar must list. Every listed file must exist
    with its size and (with `checksums`) its sha256; every file is hashed again as it is read (`Engine.read`).
    Takes no lock and writes nothing: a published engine is immutable.
    """
    dir_fd = _open_engine_dir(engine_dir, key)
    if dir_fd is None:
        return None
    try:
        engine = _verify_open(dir_fd, engine_path(engine_dir, key), key, expect, required, checksums)
    except BaseException:
        os.close(dir_fd)
        raise
    return engine


def _verify_open(dir_fd: int, path: Path, key: str, expect: dict, required, checksums: bool) -> Engine:
    refuse = f"delete {path} to rebuild it"
    try:
        data, sidecar_stat = _read_bounded(dir_fd, SIDECAR, SIDECAR_MAX_BYTES)
    except _TooLarge as exc:
        raise EngineRefused(f"engine {key}: {exc}; {refuse}") from None
    except OSError as exc:
        raise EngineRefused(f"engine {key}: unreadable sidecar ({exc.strerror or exc}); {refuse}") from None
    signed = _check_signature(dir_fd, path, key, data)  # on the raw bytes, before any parse
    try:
        record = _parse_sidecar(data)
    except ValueError as exc:
        raise EngineRefused(f"engine {key}: its sidecar is malformed ({exc}); {refuse}") from None
    if record.get("key") != key:
        raise EngineRefused(f"engine {key}: its sidecar names another engine ({str(record.get('key'))[:80]})")
    for field_name, wanted in expect.items():
        if record.get(field_name) != wanted:
            raise EngineRefused(
                f"engine {key} was built for {field_name}={str(record.get(field_name))[:200]!r}, this run needs "
                f"{wanted!r}; delete {path} or use another --engine-dir"
            )
    files = record["files"]
    for name in required:
        if name not in files:
            raise EngineRefused(f"engine {key}: its sidecar does not list {name}; {refuse}")
    for name, meta in files.items():
        try:
            fd, info = _open_at(dir_fd, name)
        except OSError:
            raise EngineRefused(f"engine {key}: {name} is missing; {refuse}") from None
        try:
            if info.st_size != meta["bytes"]:
                raise EngineRefused(
                    f"engine {key}: {name} is truncated ({info.st_size} of {meta['bytes']} bytes); {refuse}"
                )
            if checksums and not file_matches(fd, meta):
                raise EngineRefused(f"engine {key}: {name} fails its checksum; {refuse}")
        except OSError as exc:
            raise EngineRefused(f"engine {key}: cannot read {name} ({exc.strerror or exc}); {refuse}") from None
        finally:
            os.close(fd)
    owner = _owner_problem(f"directory {path}", os.fstat(dir_fd)) or _owner_problem(SIDECAR, sidecar_stat)
    return Engine(path=path, record=record, signed=signed, owner_problem=owner, dir_fd=dir_fd)


def _check_signature(dir_fd: int, path: Path, key: str, sidecar_bytes: bytes) -> bool:
    """With SDXL_BENCH_ENGINE_KEY set, the sidecar must carry its HMAC; without it, signatures are not read."""
    key_bytes = signing_key()
    if key_bytes is None:
        return False
    try:
        found, _ = _read_bounded(dir_fd, SIGNATURE, SIGNATURE_MAX_BYTES)
    except _TooLarge as exc:
        raise EngineRefused(f"engine {key}: {exc}; delete {path} to rebuild it") from None
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
