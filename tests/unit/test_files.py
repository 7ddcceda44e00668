"""Atomic writes, build locks and the leftovers of dead writers (sdxl_core/files.py)."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdxl_core import files
from sdxl_core.errors import UserError


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        Exception("Error while serializing: I/O error: No space left on device (os error 28)"),  # safetensors
        OSError(errno.EDQUOT, "Disk quota exceeded"),
    ],
)
def test_disk_full_is_recognised_as_writers_report_it(tmp_path, error):
    assert files.disk_full(error, tmp_path)


def test_other_failures_are_not_mistaken_for_a_full_disk(tmp_path):
    assert not files.disk_full(RuntimeError("shapes do not match"), tmp_path)  # tmp_path has room


def test_atomic_write_on_a_full_disk_is_one_line(tmp_path, monkeypatch):
    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(UserError, match="cannot write .*report.json: No space left on device"):
        files.atomic_write_text(tmp_path / "report.json", "{}")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- leftovers of dead writers


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _named(directory: Path, name: str, tag: str, kind: str = "tmp", is_dir: bool = True) -> Path:
    path = directory / f".{name}.{tag}.0a1b2c3d.{kind}"
    if is_dir:
        path.mkdir()
        (path / "unet.safetensors").write_bytes(b"half")
    else:
        path.write_bytes(b"half")
    return path


def test_sweep_removes_dead_writers_leftovers_only(tmp_path):
    host, ns, _ = files.writer_tag().split("~")
    dead = f"{host}~{ns}~{_dead_pid()}"
    alive = files.writer_tag()
    elsewhere = f"other-host~{ns}~{os.getpid()}"
    gone = [
        _named(tmp_path, "key1", dead),
        _named(tmp_path, "key1", dead, "stale"),
        _named(tmp_path, "calibration.pt", dead, "tmp.pt", is_dir=False),
    ]
    kept = [
        _named(tmp_path, "key2", alive),
        _named(tmp_path, "key3", elsewhere),
        tmp_path / "key1",
        tmp_path / "key1.lock",
        tmp_path / ".hidden-but-not-temp",
    ]
    kept[2].mkdir()
    for path in kept[3:]:
        path.write_text("")
    old = _named(tmp_path, "key4", elsewhere)
    legacy = tmp_path / ".key5.ab12cd34.tmp"  # a temp dir from before the writer tags
    legacy.mkdir()
    day_ago = time.time() - files.FOREIGN_GRACE_S - 60
    for path in (old, old / "unet.safetensors", legacy):
        os.utime(path, (day_ago, day_ago))

    removed = files.sweep(tmp_path)
    assert sorted(removed) == sorted(p.name for p in [*gone, old, legacy])
    assert all(p.exists() for p in kept)


def test_atomic_writes_sweep_their_own_targets_dead_temps(tmp_path):
    host, ns, _ = files.writer_tag().split("~")
    dead = _named(tmp_path, "calibration.pt", f"{host}~{ns}~{_dead_pid()}", "tmp.pt", is_dir=False)
    other = _named(tmp_path, "report.json", f"{host}~{ns}~{_dead_pid()}", is_dir=False)
    files.atomic_write_bytes(tmp_path / "calibration.pt", b"state")
    assert not dead.exists() and other.exists()  # only the target's own temps are looked at
    assert (tmp_path / "calibration.pt").read_bytes() == b"state"


# --------------------------------------------------------------------------- the build lock

LOCKER = """
import sys, time
from sdxl_core.files import build_lock
with build_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_the_build_lock_is_released_when_its_holder_is_killed(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCKER, str(tmp_path / "e")],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        fd = os.open(tmp_path / "e.lock", os.O_RDONLY)
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(fd)
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        started = time.perf_counter()
        with files.build_lock(tmp_path / "e"):
            assert time.perf_counter() - started < 5
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / "e.lock").read_bytes() == b""  # created, never written


def test_the_build_lock_opens_a_lock_file_it_cannot_write_read_only(tmp_path, monkeypatch):
    """Another user's lock file (0644) locks as well as one's own: opened read-only, with no holder recorded."""
    lock_file = tmp_path / "e.lock"
    lock_file.write_bytes(b"")
    lock_file.chmod(0o444)
    real_open = os.open

    def as_another_user(path, flags, *args, **kwargs):  # root writes through file modes; a user does not
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(files.os, "open", as_another_user)
    with files.build_lock(tmp_path / "e") as held:
        assert os.fstat(held.fd).st_ino == lock_file.stat().st_ino
        assert fcntl.fcntl(held.fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY  # so it needs no write access
        assert not held.writable and lock_file.read_bytes() == b""


@pytest.mark.parametrize("size", [200_000, 4 << 20])
def test_an_unterminated_json_string_is_refused_without_a_quadratic_scan(size):
    """A planted sidecar of `"\\"\\"...` (a string that never closes) hung a --no-build run: the nesting pre-scan
    retried a string pattern from every quote. Now it is one pass, and the text is refused as not JSON. The alarm
    only turns a hang into a failure (what took minutes at 100 KB now takes well under a second at 4 MB)."""
    data = b'"' + b'\\"' * (size // 2)
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("the JSON pre-scan hung", pytrace=False))
    signal.alarm(60)
    try:
        with pytest.raises(ValueError, match="not JSON: Unterminated string"):
            files.parse_json(data)
    finally:
        signal.alarm(0)
    assert files.json_depth(b'{"a": "[[[", "b": [1, {"c": "x\\"]"}]}') == 3  # brackets inside strings do not count
