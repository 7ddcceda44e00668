"""Reading an engine directory, which is untrusted input: `verify` checks a published engine once and returns an
`Engine`, through which every later read goes.

    <engine-dir>/<key>/sidecar.json   what built it (versions, device, shapes) + sha256 and size of every file
    <engine-dir>/<key>/sidecar.sig    HMAC-SHA256 of sidecar.json's bytes, when SDXL_BENCH_ENGINE_KEY is set

The engine directory is a trust boundary. `verify` opens `<key>` once, as a directory handle that
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
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from sdxl_core import settings
from sdxl_core.engines.digests import bytes_match, chunk_list, file_matches, is_data
from sdxl_core.errors import UserError
from sdxl_core.files import parse_json

SIDECAR = "sidecar.json"
SIGNATURE = "sidecar.sig"
KEY_ENV = "SDXL_BENCH_ENGINE_KEY"
TRUST_ENV = "SDXL_BENCH_TRUST_ENGINE_DIR"
MIN_KEY_CHARS = 16
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
            chunk_list(meta)
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
