"""The engine store under attack, at the store's level (engines of a few bytes, no model): what is read is what
was verified, sizes and nesting are bounded before anything is read or parsed, the signature is checked on raw
bytes before any parse, and build locks neither hang nor wait in silence.

tests/unit/test_engine_trust.py runs the attacks that need a model (a swapped directory, a hostile config or
layer plan) through the torch backend, tests/e2e/test_engine_attacks.py through the CLI.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdxl_core import files
from sdxl_core.engines import store, trust
from sdxl_core.errors import UserError

KEY = "k" * 32
WEIGHTS = b"verified weights"
SPARSE_BYTES = 12 << 30  # a sparse file: 12 GB long, no disk used


@pytest.fixture(autouse=True)
def no_trust_settings(monkeypatch):
    monkeypatch.delenv(store.KEY_ENV, raising=False)
    monkeypatch.delenv(store.TRUST_ENV, raising=False)


def publish(engine_dir: Path, key: str = "e", data: bytes = WEIGHTS) -> Path:
    def write(tmp: Path) -> dict:
        (tmp / "unet.safetensors").write_bytes(data)
        (tmp / "plan.json").write_text("{}")
        return {}

    return store.publish(engine_dir, key, write, {"backend": "test"})


def rehashed_sidecar(path: Path, change) -> None:
    record = json.loads((path / store.SIDECAR).read_text())
    change(record)
    (path / store.SIDECAR).write_text(json.dumps(record))


def test_a_directory_swapped_after_verification_is_never_read(tmp_path):
    """Between verify and read an attacker who can write the engine dir replaces `<key>` with a look-alike whose
    files (and sidecar) say other bytes: the reads still return what was verified."""
    path = publish(tmp_path)
    engine = store.verify(tmp_path, "e", {}, required=("unet.safetensors",))
    path.rename(tmp_path / "moved-away")
    lookalike = publish(tmp_path / "attacker", data=b"attacker weights").rename(path)
    assert (lookalike / "unet.safetensors").read_bytes() == b"attacker weights"
    assert engine.read("unet.safetensors") == WEIGHTS
    assert engine.read_json("plan.json") == {}


def test_a_key_entry_that_is_a_symlink_to_a_directory_outside_is_refused(tmp_path):
    outside = publish(tmp_path / "elsewhere")
    (tmp_path / "engines").mkdir()
    (tmp_path / "engines" / "e").symlink_to(outside, target_is_directory=True)
    with pytest.raises(store.EngineRefused, match="is a symlink") as info:
        store.verify(tmp_path / "engines", "e", {})
    assert "\n" not in str(info.value)
    # The engine dir itself may be a link: the user named it.
    (tmp_path / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    assert store.verify(tmp_path / "linked", "e", {}).read("unet.safetensors") == WEIGHTS


@pytest.mark.parametrize("name", [store.SIDECAR, store.SIGNATURE])
def test_a_huge_sidecar_or_signature_is_refused_before_it_is_read(name, tmp_path, monkeypatch):
    monkeypatch.setenv(store.KEY_ENV, KEY)
    path = publish(tmp_path)
    os.truncate(path / name, SPARSE_BYTES)
    started = time.perf_counter()
    with pytest.raises(store.EngineRefused, match=f"{name} is {SPARSE_BYTES} bytes, more than") as info:
        store.verify(tmp_path, "e", {})
    assert "\n" not in str(info.value) and time.perf_counter() - started < 1


def test_the_signature_is_checked_on_the_raw_bytes_before_any_parse(tmp_path, monkeypatch):
    monkeypatch.setenv(store.KEY_ENV, KEY)
    path = publish(tmp_path)
    (path / store.SIDECAR).write_text("[" * 100_000 + "]" * 100_000)
    parsed = []
    monkeypatch.setattr(trust, "parse_json", lambda data: parsed.append(data))  # where the sidecar is parsed
    with pytest.raises(store.EngineRefused, match=f"does not match {store.KEY_ENV}"):
        store.verify(tmp_path, "e", {})
    assert parsed == []


@pytest.mark.parametrize("name", [store.SIDECAR, "plan.json"])
def test_deeply_nested_json_is_one_line_naming_the_file(name, tmp_path):
    path = publish(tmp_path)
    deep = ("[" * 100_000 + "]" * 100_000).encode()
    (path / name).write_bytes(deep)
    if name != store.SIDECAR:  # listed and re-hashed, as the owner of the directory could
        meta = {"sha256": hashlib.sha256(deep).hexdigest(), "bytes": len(deep)}
        rehashed_sidecar(path, lambda r: r["files"].update({name: meta}))
    with pytest.raises(store.EngineRefused) as info:
        store.verify(tmp_path, "e", {}).read_json(name)
    message = str(info.value)
    assert "nested 100000 levels deep" in message and "\n" not in message
    assert name in message or "sidecar" in message


def test_json_depth_skips_strings_and_bounds_parsing():
    assert files.json_depth(b'{"a": [1, {"b": "[[[[{{{{"}]}') == 3
    assert files.parse_json('{"a": "\\"[["}') == {"a": '"[['}
    with pytest.raises(ValueError, match="nested 65 levels deep, more than 64"):
        files.parse_json("[" * 65 + "]" * 65)


def test_a_key_of_any_bytes_signs_and_verifies(tmp_path, monkeypatch):
    """Not ASCII, not even UTF-8: the environment's bytes are the key."""
    monkeypatch.setenv(store.KEY_ENV, os.fsdecode(b"\xff\xfe cl\xc3\xa9 secr\xe8te 0123456789"))
    publish(tmp_path)
    assert store.verify(tmp_path, "e", {}).signed


# --------------------------------------------------------------------------- build locks


def test_a_lock_that_is_not_a_regular_file_is_refused_at_once(tmp_path):
    os.mkfifo(tmp_path / "e.lock")
    started = time.perf_counter()
    with pytest.raises(UserError, match="e.lock is a FIFO, not a lock file: remove it") as info:
        with store.lock(tmp_path, "e"):
            pass
    assert "\n" not in str(info.value) and time.perf_counter() - started < 5
    (tmp_path / "e.lock").unlink()
    (tmp_path / "e.lock").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UserError, match="is a symlink, not a lock file"):
        with store.lock(tmp_path, "e"):
            pass
    assert not (tmp_path / "elsewhere").exists()


HOLD = """
import sys, time
from sdxl_core.engines import store
with store.lock(sys.argv[1], "e"):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_waiting_builder_says_who_holds_the_lock_and_gives_up_after_its_timeout(tmp_path, capfd):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        started = time.perf_counter()
        with pytest.raises(UserError) as info:
            with store.lock(tmp_path, "e", timeout=1):
                pass
        waited = time.perf_counter() - started
    finally:
        holder.kill()
        holder.wait()
    message = str(info.value)
    assert f"gave up after 1 s waiting for the build lock {tmp_path / 'e.lock'}, held by pid {holder.pid}" in message
    assert "raise --lock-timeout" in message and "\n" not in message
    assert 1 <= waited < 5
    assert f"held by pid {holder.pid} on " in capfd.readouterr().err  # said while waiting, not only at the end
    with store.lock(tmp_path, "e", timeout=1):  # the holder died: the kernel released its lock
        assert (tmp_path / "e.lock").read_text().startswith(f"pid {os.getpid()} on ")
    assert (tmp_path / "e.lock").read_text() == ""  # released: no stale holder


def test_no_engine_lists_the_others_without_parsing_hostile_sidecars(tmp_path):
    """--no-build without the engine lists the engines present: another engine's sidecar, huge or nested
    100,000 deep, is named as it is, not read whole or parsed."""
    publish(tmp_path, "deep")
    (tmp_path / "deep" / store.SIDECAR).write_text("[" * 100_000 + "]" * 100_000)
    publish(tmp_path, "huge")
    os.truncate(tmp_path / "huge" / store.SIDECAR, SPARSE_BYTES)
    publish(tmp_path, "fine")
    started = time.perf_counter()
    message = store.missing_engine(tmp_path, "wanted")
    assert message.endswith("it holds deep; fine; huge") and time.perf_counter() - started < 5


def test_a_hard_link_planted_as_the_lock_is_never_written(tmp_path):
    """The lock records its holder, but only in a file of its own: a planted hard link to another of this user's
    files keeps its content."""
    precious = tmp_path / "precious"
    precious.write_text("this user's data\n")
    os.link(precious, tmp_path / "e.lock")
    with store.lock(tmp_path, "e", timeout=1):
        assert precious.read_text() == "this user's data\n"
    assert precious.read_text() == "this user's data\n"
