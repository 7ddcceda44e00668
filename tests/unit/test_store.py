"""The engine store: what is read and how (listed, hashed as read), signatures, trust, failed publishes.

No model here: engines are a few bytes published through `store.publish`, so every rule is checked in
milliseconds. tests/unit/test_engine_trust.py runs the same rules through the torch backend, and
tests/e2e/test_engine_faults.py through the CLI with killed, full-disk and read-only runs.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import pytest

from sdxl_core.engines import digests, store
from sdxl_core.errors import UserError

KEY = "k" * 32
CODE = b"\x80 an executable artifact: a compile cache or a plan"


@pytest.fixture(autouse=True)
def no_trust_settings(monkeypatch):
    """Each test starts as a user with neither a signing key nor a trust override."""
    monkeypatch.delenv(store.KEY_ENV, raising=False)
    monkeypatch.delenv(store.TRUST_ENV, raising=False)


def publish(engine_dir: Path, key: str = "e", names=("weights.safetensors", "cache.bin"), **sidecar) -> Path:
    def write(tmp: Path) -> dict:
        for name in names:
            (tmp / name).write_bytes(CODE if not store.is_data(name) else b"{}")
        return {}

    return store.publish(engine_dir, key, write, {"backend": "test", **sidecar})


def edit_sidecar(path: Path, change) -> None:
    """Rewrite the sidecar as an attacker would: any JSON, but no signature."""
    record = json.loads((path / store.SIDECAR).read_text())
    change(record)
    (path / store.SIDECAR).write_text(json.dumps(record))


def rehash(path: Path, name: str) -> None:
    data = (path / name).read_bytes()
    edit_sidecar(
        path, lambda r: r["files"].update({name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}})
    )


# --------------------------------------------------------------------------- what is read, and how


def test_a_published_engine_reads_back_its_listed_files(tmp_path):
    path = publish(tmp_path)
    engine = store.verify(tmp_path, "e", {"backend": "test"}, required=("cache.bin",))
    assert engine.path == path and not engine.signed and engine.owner_problem is None
    assert engine.read("cache.bin") == CODE
    assert sorted(p.name for p in path.iterdir()) == ["cache.bin", store.SIDECAR, "weights.safetensors"]
    assert not list(tmp_path.glob(".*"))  # the temp dir was renamed into place


def test_only_safetensors_and_json_count_as_data():
    assert store.is_data("unet.safetensors") and store.is_data("layer_plan.json")
    assert not any(
        store.is_data(n)
        for n in (
            "compile_cache.bin",
            "unetxl.trt10.8.plan",
            "calibration.pt",
            "timing_cache.bin",
            "weights.safetensors.pkl",
        )
    )


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: edit_sidecar(p, lambda r: r.update(files={})), "its sidecar is malformed \\(it lists no files\\)"),
        (lambda p: edit_sidecar(p, lambda r: r["files"].pop("cache.bin")), "its sidecar does not list cache.bin"),
        (
            lambda p: edit_sidecar(p, lambda r: r["files"].update({"../../x.bin": r["files"]["cache.bin"]})),
            "malformed entry '../../x.bin'",
        ),
        (lambda p: edit_sidecar(p, lambda r: r["files"].update({"x.bin": "deadbeef"})), "malformed entry 'x.bin'"),
        (lambda p: edit_sidecar(p, lambda r: r.update(files=[])), "its sidecar is malformed \\(it lists no files\\)"),
        (lambda p: (p / store.SIDECAR).write_text("[1, 2]"), "its sidecar is malformed"),
    ],
)
def test_a_sidecar_must_list_every_file_the_backend_reads(tmp_path, damage, message):
    path = publish(tmp_path)
    damage(path)
    with pytest.raises(store.EngineRefused, match=message) as info:
        store.verify(tmp_path, "e", {}, required=("cache.bin",))
    assert "\n" not in str(info.value)


def test_an_unlisted_file_is_never_read(tmp_path):
    path = publish(tmp_path, names=("weights.safetensors",))
    (path / "cache.bin").write_bytes(CODE)  # dropped in beside a valid engine
    engine = store.verify(tmp_path, "e", {})
    assert "cache.bin" not in engine.files
    with pytest.raises(store.EngineRefused, match="cache.bin is not listed in its sidecar"):
        engine.read("cache.bin")


def test_the_bytes_returned_are_the_bytes_hashed(tmp_path):
    """No check-then-reopen: a file swapped after `verify` is caught by the read that returns it."""
    path = publish(tmp_path)
    engine = store.verify(tmp_path, "e", {})
    swapped = path / "cache.bin.new"
    swapped.write_bytes(CODE.replace(b"artifact", b"payloads"))  # same size
    swapped.chmod(0o644)
    os.replace(swapped, path / "cache.bin")
    with pytest.raises(store.EngineRefused, match="cache.bin fails its checksum"):
        engine.read("cache.bin")


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_large_files_are_listed_and_checked_piece_by_piece(tmp_path, monkeypatch):
    """Above CHUNK_BYTES a file's entry also lists each piece's sha256, which readers hash in parallel: a
    changed byte in any piece is caught by `verify` (data) or by the read (executables). An entry without
    pieces (an engine published before they were listed) is checked whole; a malformed list is refused."""
    monkeypatch.setattr(digests, "CHUNK_BYTES", 1000)  # read where file_record is
    weights, code = os.urandom(4500), CODE * 40

    def write(tmp: Path) -> dict:
        (tmp / "weights.safetensors").write_bytes(weights)
        (tmp / "cache.bin").write_bytes(code)
        return {}

    path = store.publish(tmp_path, "e", write, {"backend": "test"})
    files = store.read_sidecar(path)["files"]
    assert files["weights.safetensors"]["chunks"] == {
        "bytes": 1000,
        "sha256": [hashlib.sha256(weights[i : i + 1000]).hexdigest() for i in range(0, 4500, 1000)],
    }
    assert files["weights.safetensors"]["sha256"] == hashlib.sha256(weights).hexdigest()
    assert store.verify(tmp_path, "e", {}).read("cache.bin") == code

    _flip(path / "cache.bin", 1500)
    engine = store.verify(tmp_path, "e", {}, checksums=False)
    with pytest.raises(store.EngineRefused, match="cache.bin fails its checksum"):
        engine.read("cache.bin")
    _flip(path / "cache.bin", 1500)
    _flip(path / "weights.safetensors", 3210)
    with pytest.raises(store.EngineRefused, match="weights.safetensors fails its checksum"):
        store.verify(tmp_path, "e", {})
    _flip(path / "weights.safetensors", 3210)

    edit_sidecar(path, lambda r: r["files"]["weights.safetensors"].pop("chunks"))
    assert store.verify(tmp_path, "e", {}) is not None
    edit_sidecar(path, lambda r: r["files"]["cache.bin"]["chunks"]["sha256"].pop())
    with pytest.raises(store.EngineRefused, match="malformed entry 'cache.bin' \\(its chunk list\\)"):
        store.verify(tmp_path, "e", {})


def test_a_symlinked_file_is_not_followed(tmp_path):
    path = publish(tmp_path)
    outside = tmp_path / "outside.bin"
    outside.write_bytes(CODE)
    (path / "cache.bin").unlink()
    (path / "cache.bin").symlink_to(outside)
    with pytest.raises(store.EngineRefused, match="cache.bin is missing"):
        store.verify(tmp_path, "e", {})


# --------------------------------------------------------------------------- trust


def test_executables_of_an_engine_that_is_not_ours_alone_are_refused_in_one_line(tmp_path, monkeypatch):
    path = publish(tmp_path)
    (path / "cache.bin").chmod(0o664)
    engine = store.verify(tmp_path, "e", {})
    assert engine.read("weights.safetensors") == b"{}"  # data loads from anywhere
    with pytest.raises(store.EngineUntrusted) as info:
        engine.read("cache.bin")
    message = str(info.value)
    assert "cache.bin is writable by group or others" in message and "\n" not in message
    assert f"set {store.KEY_ENV} to the key it was built with, or {store.TRUST_ENV}=1" in message

    (path / "cache.bin").chmod(0o644)
    monkeypatch.setattr(store.os, "geteuid", lambda: 4242)  # now the whole directory is someone else's
    engine = store.verify(tmp_path, "e", {})
    assert engine.owner_problem.startswith(f"directory {path} belongs to uid")
    with pytest.raises(store.EngineUntrusted, match="belongs to uid"):
        engine.read("cache.bin")
    monkeypatch.setenv(store.TRUST_ENV, "1")  # the documented way to allow it
    assert engine.read("cache.bin") == CODE
    monkeypatch.setenv(store.TRUST_ENV, "yes")
    with pytest.raises(UserError, match=f"{store.TRUST_ENV} must be 1"):
        engine.read("cache.bin")


def test_a_signed_engine_is_trusted_wherever_it_lives(tmp_path, monkeypatch):
    monkeypatch.setenv(store.KEY_ENV, KEY)
    path = publish(tmp_path)
    assert (path / store.SIGNATURE).read_text().startswith("hmac-sha256:")
    monkeypatch.setattr(store.os, "geteuid", lambda: 4242)
    engine = store.verify(tmp_path, "e", {})
    assert engine.signed and engine.owner_problem is not None
    assert engine.read("cache.bin") == CODE


def test_with_a_key_set_tampered_unsigned_or_foreign_signed_engines_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv(store.KEY_ENV, KEY)
    path = publish(tmp_path)
    (path / "cache.bin").write_bytes(b"payload")
    rehash(path, "cache.bin")  # what an attacker can do: change a file and its hash, but not sign
    with pytest.raises(store.EngineRefused, match=f"does not match {store.KEY_ENV}") as info:
        store.verify(tmp_path, "e", {})
    assert "\n" not in str(info.value)

    monkeypatch.setenv(store.KEY_ENV, "another key, also long enough")
    publish(tmp_path, "other")
    monkeypatch.setenv(store.KEY_ENV, KEY)
    with pytest.raises(store.EngineRefused, match="signed with another key"):
        store.verify(tmp_path, "other", {})

    monkeypatch.delenv(store.KEY_ENV)
    publish(tmp_path, "unsigned")
    monkeypatch.setenv(store.KEY_ENV, KEY)
    with pytest.raises(store.EngineRefused, match=f"is not signed with {store.KEY_ENV}"):
        store.verify(tmp_path, "unsigned", {})


def test_a_short_key_is_refused(monkeypatch):
    monkeypatch.setenv(store.KEY_ENV, "secret")
    with pytest.raises(UserError, match="is 6 characters: use at least 16"):
        store.signing_key()


# --------------------------------------------------------------------------- publishing and its failures


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    def write(tmp: Path) -> dict:
        (tmp / "weights.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(UserError, match="engine e not written: cannot write .* No space left") as info:
        store.publish(tmp_path, "e", write, {})
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_build_removes_its_temp_dir_and_keeps_the_old_engine(tmp_path):
    path = publish(tmp_path)
    before = (path / store.SIDECAR).read_bytes()

    def write(tmp: Path) -> dict:
        (tmp / "weights.safetensors").write_bytes(b"new")
        raise RuntimeError("the build failed")

    with pytest.raises(RuntimeError, match="the build failed"):
        store.publish(tmp_path, "e", write, {})
    assert (path / store.SIDECAR).read_bytes() == before
    assert not list(tmp_path.glob(".*"))
