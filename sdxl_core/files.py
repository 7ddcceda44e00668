"""Atomic writes, build locks, the leftovers of writers that died, and JSON read with bounded nesting.

A reader never sees a half-written file: writers write a temp file (or directory) beside the target and
rename it into place. Every temp name carries its writer's tag, `<host>~<pid namespace>~<pid>`, so a later
writer on the same host can tell a dead writer's leftovers from a live one's and remove them (`sweep`):
a build killed with SIGKILL leaves its temp behind, and the next write beside it cleans up. Temp files are
opened like any file (0666 less the umask), so what lands in a shared directory stays readable to its users.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import json
import os
import re
import secrets
import shutil
import socket
import stat
import sys
import tempfile
import time
from pathlib import Path

from sdxl_core.errors import UserError

# A leftover whose writer cannot be checked (another host or pid namespace, or a name without a tag) is
# removed once it is this old: no build takes a day.
FOREIGN_GRACE_S = 24 * 3600
_TAGGED = re.compile(r"\.(?P<host>[A-Za-z0-9-]+)~(?P<ns>\d+)~(?P<pid>\d+)\.[A-Za-z0-9]+\.(?:tmp|stale)(?:\.\w+)?$")
_UNTAGGED = re.compile(r"\.(?:tmp(?:\.\w+)?|stale-\d+)$")  # what writers before the tags left
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXTS = ("no space left on device", "disk quota exceeded", "os error 28")
_NEARLY_FULL_BYTES = 16 << 20


def _pid_namespace() -> str:
    """Pids mean something only within one pid namespace (containers on one host have their own)."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "0"


def writer_tag() -> str:
    """`<host>~<pid namespace>~<pid>`: who writes a temp file, for `sweep`."""
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"
    return f"{host}~{_pid_namespace()}~{os.getpid()}"


def temp_name(name: str, kind: str = "tmp", suffix: str = "") -> str:
    """`.<name>.<writer tag>.<random>.<kind><suffix>`: hidden, unique, and sweepable once its writer is dead."""
    return f".{name}.{writer_tag()}.{secrets.token_hex(4)}.{kind}{suffix}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _newest_mtime(path: Path) -> float:
    times = [path.lstat().st_mtime]
    if path.is_dir() and not path.is_symlink():
        times += [p.lstat().st_mtime for p in path.iterdir()]
    return max(times)


def is_dead_leftover(path: Path, now: float | None = None) -> bool:
    """Whether `path` is a temp file or dir (see `temp_name`) that nobody will finish: its writer ran on this
    host and pid namespace and is gone, or it is older than FOREIGN_GRACE_S and its writer cannot be checked."""
    name = path.name
    if not name.startswith("."):
        return False
    tagged = _TAGGED.search(name)
    if tagged is None and _UNTAGGED.search(name) is None:
        return False
    if tagged is not None:
        host, ns, pid = tagged.group("host", "ns", "pid")
        here, my_ns, _ = writer_tag().split("~")
        if (host, ns) == (here, my_ns):
            return not _alive(int(pid))
    try:
        age = (time.time() if now is None else now) - _newest_mtime(path)
    except OSError:  # removed meanwhile
        return False
    return age > FOREIGN_GRACE_S


def sweep(directory: str | os.PathLike, prefix: str = ".") -> list[str]:
    """Remove dead writers' temp files and dirs directly under `directory` whose names start with `prefix`.

    Safe without a lock: a leftover is removed only when its writer is provably gone (or it is a day old).
    Returns the names removed; what cannot be removed (another user's) is left.
    """
    removed = []
    try:
        entries = [p for p in Path(directory).iterdir() if p.name.startswith(prefix)]
    except OSError:
        return removed
    for path in entries:
        if not is_dead_leftover(path):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
        if not path.exists():
            removed.append(path.name)
    return removed


def disk_full(exc: BaseException, directory: str | os.PathLike) -> bool:
    """Whether a failed write failed for want of space. Not every writer says so: torch.save reports a full
    disk as a RuntimeError about stream positions, so a filesystem left nearly full counts too."""
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS:
        return True
    if any(text in str(exc).lower() for text in _DISK_FULL_TEXTS):
        return True
    try:
        stats = os.statvfs(directory)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < _NEARLY_FULL_BYTES


def write_failure(path: str | os.PathLike, exc: BaseException) -> UserError | None:
    """One line for a write that failed for want of space or permission, or None for other failures (and
    for interrupts and errors that are already one line)."""
    if not isinstance(exc, Exception) or isinstance(exc, UserError):
        return None
    directory = Path(path).parent
    if isinstance(exc, OSError) and exc.errno == errno.EFBIG or "file too large" in str(exc).lower():
        return UserError(
            f"cannot write {path}: File too large (the filesystem's limit or this process's, "
            "`ulimit -f`); write elsewhere or raise the limit"
        )
    if disk_full(exc, directory):
        return UserError(
            f"cannot write {path}: No space left on device ({directory}); free space there or write elsewhere"
        )
    if isinstance(exc, OSError) and exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return UserError(f"cannot write {path}: {exc.strerror}; write elsewhere")
    return None


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temp path beside `path`; on success it is renamed over `path`, on failure removed.

    For writers that insist on a file name (torch.save, safetensors, PIL) rather than bytes. Dead writers'
    temps of the same target are swept first; a full disk is one line (UserError), not a traceback.
    """
    path = Path(path)
    tmp = path.parent / temp_name(path.name, suffix=path.suffix)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep(path.parent, prefix=f".{path.name}.")
        yield tmp
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):  # never made, or a read-only filesystem
            os.unlink(tmp)
        failure = write_failure(path, exc)
        if failure is not None:
            raise failure from None
        raise


LOCK_TIMEOUT_S = 1800.0  # how long a builder waits for another one's build by default: longer than any build
_LOCK_POLL_S = (0.05, 0.5)  # first and longest pause between tries while waiting
_HOLDER_BYTES = 256


class BuildLock:
    """An exclusive inter-process lock on `<path>.lock`: hold it while checking for and building an artifact.

    flock(2), so the kernel releases the lock when its holder dies, even by SIGKILL. The lock file is created if
    missing and never removed; a holder that can write it records who it is (pid, host, since when) and clears
    that on release, so a waiter can say whom it waits for. Another user's lock file (0644) is opened read-only
    and locks as well as one's own. A lock file that is not a regular file (a FIFO, a directory, a symlink) is
    refused in one line, and a waiter gives up after `timeout` seconds in one line (UserError).
    """

    def __init__(self, path: str | os.PathLike, timeout: float | None = None):
        self.file = Path(str(path) + ".lock")
        self.timeout = LOCK_TIMEOUT_S if timeout is None else float(timeout)
        self.fd: int | None = None
        self.writable = False

    def __enter__(self) -> BuildLock:
        self.file.parent.mkdir(parents=True, exist_ok=True)
        fd = self._open()
        try:
            self._acquire(fd)
            if self.writable:
                os.ftruncate(fd, 0)
                since = time.strftime("%Y-%m-%dT%H:%M:%S%z")
                os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {since}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        return self

    def _open(self) -> int:
        flags = os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # a FIFO must not block the open
        try:
            fd, self.writable = os.open(self.file, os.O_RDWR | flags, 0o644), True
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UserError(f"build lock {self.file} is a symlink, not a lock file: remove it") from None
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.EISDIR):
                raise
            fd, self.writable = os.open(self.file, os.O_RDONLY | flags, 0o644), False
        info = os.fstat(fd)
        mode = info.st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            kind = "a FIFO" if stat.S_ISFIFO(mode) else "a directory" if stat.S_ISDIR(mode) else "not a regular file"
            raise UserError(f"build lock {self.file} is {kind}, not a lock file: remove it")
        # The holder line is written only into a lock file of one's own with no other name: a hard link planted
        # as the lock must not let a build truncate another of this user's files.
        self.writable = self.writable and info.st_uid == os.geteuid() and info.st_nlink == 1
        return fd

    def _acquire(self, fd: int) -> None:
        if self._try(fd):
            return
        print(
            f"sdxl-bench: waiting for the build lock {self.file}, held by {self.holder(fd)} "
            f"(at most {self.timeout:g} s, see --lock-timeout)",
            file=sys.stderr,
            flush=True,
        )
        deadline = time.monotonic() + self.timeout
        pause = _LOCK_POLL_S[0]
        while not self._try(fd):
            left = deadline - time.monotonic()
            if left <= 0:
                raise UserError(
                    f"gave up after {self.timeout:g} s waiting for the build lock {self.file}, held by "
                    f"{self.holder(fd)}: let that build finish, or raise --lock-timeout"
                )
            time.sleep(min(pause, left))
            pause = min(pause * 2, _LOCK_POLL_S[1])

    @staticmethod
    def _try(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def holder(self, fd: int | None = None) -> str:
        """Who holds the lock, as its holder recorded it."""
        try:
            if fd is None:
                with open(self.file, "rb") as handle:
                    data = handle.read(_HOLDER_BYTES)
            else:
                data = os.pread(fd, _HOLDER_BYTES, 0)
        except OSError:
            data = b""
        text = data.decode("ascii", "replace").strip().splitlines()
        return text[0][:120] if text else "a process that records no holder (another user's, or an older build)"

    def __exit__(self, *exc_info) -> None:
        if self.fd is not None:
            if self.writable:
                with contextlib.suppress(OSError):
                    os.ftruncate(self.fd, 0)  # still held: nobody reads a holder that has gone
            os.close(self.fd)  # releases the lock
            self.fd = None


def build_lock(path: str | os.PathLike, timeout: float | None = None) -> BuildLock:
    """The build lock beside `path` (see BuildLock); `timeout` seconds of waiting, None: LOCK_TIMEOUT_S."""
    return BuildLock(path, timeout)


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
        raise UserError(f"{flag} {path} cannot be written to ({exc.strerror or exc}): pick another {flag}") from None
    finally:
        for directory in created:
            with contextlib.suppress(OSError):
                directory.rmdir()


JSON_MAX_DEPTH = 64  # deeper than any file this tool writes or reads; the parser recurses once per level
# A string runs to its closing quote or, unterminated, to the end of the text. The atomic group never gives back
# what it took, so every match attempt succeeds and the scan stays linear: a pattern that must find a closing quote
# retries from every quote of an unterminated `"\\"\\"...` and takes quadratic time (minutes for 100 KB).
_JSON_STRING = re.compile(rb'"(?>(?:[^"\\]+|\\.)*)(?:"|\\?\Z)', re.DOTALL)
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))


def json_depth(data: bytes | str) -> int:
    """How deeply JSON text nests arrays and objects, counted without recursing (strings are skipped)."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    brackets = _JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    return max(itertools.accumulate(1 if c in b"[{" else -1 for c in brackets), default=0)


def parse_json(data: bytes | str, max_depth: int = JSON_MAX_DEPTH):
    """json.loads, refusing text nested deeper than `max_depth` before the parser recurses into it: ValueError
    with a one-line reason for anything that is not such JSON."""
    depth = json_depth(data)
    if depth > max_depth:
        raise ValueError(f"JSON nested {depth} levels deep, more than {max_depth}")
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError(f"JSON nested too deeply to parse (more than {max_depth} levels)") from None
    except ValueError as exc:
        raise ValueError(f"not JSON: {str(exc).splitlines()[0][:120]}") from None
