"""Atomic writes and build locks: a reader never sees a half-written file, two builders never race.

Files get the mode a plain `open()` would give them (0666 less the umask): `tempfile.mkstemp` makes them
0600, which would hide images, reports and engines from the other users of a shared directory.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from filelock import FileLock

from .errors import UserError


def _umask() -> int:
    """The process umask, read without changing it where Linux says it (/proc), else by setting it back."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _new_file_mode(fd: int) -> None:
    os.fchmod(fd, 0o666 & ~_umask())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        _new_file_mode(fd)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temp path beside `path`; on success it is renamed over `path`, on failure removed.

    For writers that insist on a file name (torch.save, safetensors, PIL) rather than bytes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
    try:
        _new_file_mode(fd)
    finally:
        os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def build_lock(path: str | os.PathLike, timeout: float = -1) -> FileLock:
    """An inter-process lock beside `path`; hold it while checking for and building an artifact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path) + ".lock", timeout=timeout)


def check_writable_dir(path: str | os.PathLike, flag: str) -> None:
    """Refuse, before any work, a directory that is a file or cannot be created or written to.

    Missing directories are created to try them and removed again, so a refused run leaves nothing behind.
    """
    path = Path(path)
    created = []
    try:
        missing = path
        while not missing.exists() and missing != missing.parent:
            created.append(missing)
            missing = missing.parent
        if not missing.is_dir():
            raise UserError(f"{flag} {path}: {missing} is not a directory")
        for directory in reversed(created):
            directory.mkdir()
        fd, probe = tempfile.mkstemp(dir=path, prefix=".sdxl-bench-probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"{flag} {path} cannot be written to ({exc.strerror or exc}): "
                        f"pick another {flag}") from None
    finally:
        for directory in created:
            with contextlib.suppress(OSError):
                directory.rmdir()
