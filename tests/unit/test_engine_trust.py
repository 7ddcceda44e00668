"""The engine directory is a trust boundary: the attacks on a shared engine dir run no code.

A UNet engine holds two executable artifacts, and each attack is tried on both. Its compile cache is fed to
`torch.compiler.load_cache_artifacts`, which runs what it is given: that payload is an autotune artifact whose
key is an absolute path, so loading it writes a marker file (a harmless stand-in for any file an attacker would
write). Its precompiled regions are unpickled by `torch.compiler.load_compiled_function`: that payload is a
pickle that writes the marker. Loads compile as a GPU run does, with the regions left eager (no C++ compiler
needed on the CPU), so both are loaded exactly as `txt2img --no-build` loads them on a GPU.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils._appending_byte_serializer import BytesWriter

from sdxl_core import models
from sdxl_core.engines import compiled, precompiled, store, torch_backend
from sdxl_core.engines.torch_backend import COMPILE_CACHE
from sdxl_core.errors import UserError
from sdxl_core.variants import VARIANTS

CPU = torch.device("cpu")
FP16 = VARIANTS["xl-1.0-fp16"].replace(model="tiny", height=64, width=64, steps=2)
KEY = "a CI secret of at least sixteen characters"


def marker_payload(marker: Path) -> bytes:
    """A compile cache whose loading writes `marker` (PyTorch's portable cache format, one autotune entry)."""
    writer = BytesWriter()
    writer.write_uint64(1)  # format version
    writer.write_str("autotune")
    writer.write_uint64(1)
    writer.write_str(str(marker))  # joined onto Inductor's cache dir: an absolute path wins
    writer.write_bytes(b"payload ran\n")
    return writer.to_bytes()


class _WritesMarker:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # unpickling calls Path.write_text(marker, ...)
        return Path.write_text, (self.marker, "payload ran\n")


def regions_payload(marker: Path) -> bytes:
    """Precompiled regions whose loading writes `marker`: a well-formed file for the tiny UNet's regions whose
    one function is a pickle that runs code."""
    names = [name for name, _ in compiled.regions(models.build_builtin("tiny").unet)]
    return precompiled.pack_blobs(dict.fromkeys(names, 0), [pickle.dumps(_WritesMarker(marker))])


PAYLOADS = {COMPILE_CACHE: marker_payload, precompiled.FILE: regions_payload}


def plant(path: Path, data: bytes, *, listed: bool, sign_with: str | None = None, name: str = COMPILE_CACHE):
    """Put an executable artifact (`name`) into a published engine; `listed` also re-hashes it in the sidecar (an
    attacker can), `sign_with` re-signs the sidecar (only whoever holds the key can)."""
    (path / name).write_bytes(data)
    (path / name).chmod(0o644)
    if not listed:
        return
    sidecar = path / store.SIDECAR
    record = json.loads(sidecar.read_text())
    record["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    sidecar.write_bytes(json.dumps(record).encode())
    if sign_with is not None:
        (path / store.SIGNATURE).write_text(store.signature(sidecar.read_bytes(), sign_with.encode()))


@pytest.fixture(autouse=True)
def clean_trust_settings(monkeypatch):
    monkeypatch.delenv(store.KEY_ENV, raising=False)
    monkeypatch.delenv(store.TRUST_ENV, raising=False)


@pytest.fixture
def eager_regions(monkeypatch):
    monkeypatch.setattr(compiled, "compile_regions", lambda unet, backend="inductor": unet)


def prepare(engine_dir, *, allow_build=False, compile=True):
    components = models.load("tiny", unet_weights=allow_build)
    return torch_backend.prepare(
        FP16, components, CPU, engine_dir=engine_dir, progress=False, allow_build=allow_build, compile=compile
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One engine built without a key and one signed with KEY (as CPU builds are: no compile cache), copied
    per test."""
    root = tmp_path_factory.mktemp("trust")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(store.KEY_ENV, raising=False)
        unsigned = prepare(root / "unsigned", allow_build=True, compile=False)
        patch.setenv(store.KEY_ENV, KEY)
        signed = prepare(root / "signed", allow_build=True, compile=False)
    assert (unsigned.info.mode, signed.info.mode) == ("built", "built")
    assert COMPILE_CACHE not in store.read_sidecar(Path(signed.info.engine_path))["files"]
    return root, unsigned.info.engine_key


@pytest.fixture
def engine(built, tmp_path):
    """(engine dir, engine path) of a private copy: unsigned or signed."""

    def copy(kind: str) -> tuple[Path, Path]:
        root, key = built
        shutil.copytree(root / kind, tmp_path / kind)
        return tmp_path / kind, tmp_path / kind / key

    return copy


def test_the_marker_payloads_run_when_torch_loads_them(tmp_path):
    """The controls: what the attacks plant really runs code when it reaches torch."""
    torch.compiler.load_cache_artifacts(marker_payload(tmp_path / "cache-marker"))
    assert (tmp_path / "cache-marker").read_text() == "payload ran\n"
    with pytest.raises(TypeError):  # the payload runs, then is no compiled function
        precompiled.bind(
            regions_payload(tmp_path / "regions-marker"), compiled.regions(models.build_builtin("tiny").unet)
        )
    assert (tmp_path / "regions-marker").read_text() == "payload ran\n"


# What a reuse says it did with each artifact when it loaded it: the regions' payload runs, then fails to bind.
LOADED = {COMPILE_CACHE: ("compile_cache", "loaded"), precompiled.FILE: ("compiled_regions", "not used: ")}
artifacts = pytest.mark.parametrize("artifact", PAYLOADS)


def loaded(engines, artifact) -> bool:
    field, said = LOADED[artifact]
    return getattr(engines.info, field).startswith(said)


@artifacts
def test_an_executable_artifact_in_ones_own_engine_is_loaded(artifact, engine, eager_regions, tmp_path):
    engine_dir, path = engine("unsigned")
    plant(path, PAYLOADS[artifact](tmp_path / "marker"), listed=True, name=artifact)  # as the owner's build would
    engines = prepare(engine_dir)
    assert loaded(engines, artifact) and (tmp_path / "marker").exists()


ATTACKS = {
    # name: (engine, key in the victim's environment, what the attacker does, the refusal)
    "rewritten and re-hashed, key set": (
        "signed",
        KEY,
        lambda path, data, name: plant(path, data, listed=True, name=name),
        f"its {store.SIGNATURE} does not match {store.KEY_ENV}",
    ),
    "rewritten and re-hashed, group-writable dir": (
        "unsigned",
        None,
        lambda path, data, name: (plant(path, data, listed=True, name=name), path.chmod(0o775)),
        "is writable by group or others; set SDXL_BENCH_ENGINE_KEY to the key it was built with, or "
        "SDXL_BENCH_TRUST_ENGINE_DIR=1 to trust this directory",
    ),
    "rewritten and re-hashed, group-writable file": (
        "unsigned",
        None,
        lambda path, data, name: (plant(path, data, listed=True, name=name), (path / name).chmod(0o664)),
        "refusing to load {name} \\(executable\\)",
    ),
    "sidecar listing nothing": (
        "unsigned",
        None,
        lambda path, data, name: (
            plant(path, data, listed=False, name=name),
            (path / store.SIDECAR).write_text(json.dumps({**store.read_sidecar(path), "files": {}})),
        ),
        "its sidecar is malformed \\(it lists no files\\)",
    ),
    "unsigned engine, key set": (
        "unsigned",
        KEY,
        lambda path, data, name: plant(path, data, listed=True, name=name),
        f"is not signed with {store.KEY_ENV}",
    ),
}


@artifacts
@pytest.mark.parametrize("attack", ATTACKS)
def test_attacks_on_an_executable_artifact_run_no_code(attack, artifact, engine, eager_regions, tmp_path, monkeypatch):
    kind, key, tamper, refusal = ATTACKS[attack]
    engine_dir, path = engine(kind)
    tamper(path, PAYLOADS[artifact](tmp_path / "marker"), artifact)
    if key:
        monkeypatch.setenv(store.KEY_ENV, key)
    with pytest.raises(UserError, match=refusal.replace("{name}", artifact)) as info:
        prepare(engine_dir)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "marker").exists()


@artifacts
def test_another_users_engine_is_refused_even_where_building_is_allowed(
    artifact, engine, eager_regions, tmp_path, monkeypatch
):
    """Untrusted is not damaged: the engine is not rebuilt over (it is someone else's), the run stops."""
    engine_dir, path = engine("unsigned")
    plant(path, PAYLOADS[artifact](tmp_path / "marker"), listed=True, name=artifact)
    monkeypatch.setattr(store.os, "geteuid", lambda: 4242)
    with pytest.raises(store.EngineUntrusted, match="belongs to uid"):
        prepare(engine_dir, allow_build=True)
    assert not (tmp_path / "marker").exists()
    assert store.read_sidecar(path)["files"][artifact]  # untouched


@artifacts
def test_a_tampered_signed_engine_is_rebuilt_where_building_is_allowed(
    artifact, engine, eager_regions, tmp_path, monkeypatch, capfd
):
    engine_dir, path = engine("signed")
    plant(path, PAYLOADS[artifact](tmp_path / "marker"), listed=True, name=artifact)
    monkeypatch.setenv(store.KEY_ENV, KEY)
    engines = prepare(engine_dir, allow_build=True)
    assert engines.info.mode == "built" and not (tmp_path / "marker").exists()
    warning = capfd.readouterr().err
    assert "does not match SDXL_BENCH_ENGINE_KEY" in warning and warning.endswith("; rebuilding it\n")
    assert store.verify(engine_dir, engines.info.engine_key, {}).signed


@artifacts
def test_a_dropped_in_executable_artifact_is_ignored(artifact, engine, eager_regions, tmp_path):
    engine_dir, path = engine("unsigned")
    plant(path, PAYLOADS[artifact](tmp_path / "marker"), listed=False, name=artifact)  # the sidecar lacks it
    engines = prepare(engine_dir)
    field, _ = LOADED[artifact]
    assert engines.info.mode == "loaded" and getattr(engines.info, field) == "none in the engine"
    assert not (tmp_path / "marker").exists()


@artifacts
def test_a_signed_artifact_loads_from_another_users_dir(artifact, engine, eager_regions, tmp_path, monkeypatch):
    """What a CI with the key in its secrets gets: engines built by any runner load on any other."""
    engine_dir, path = engine("signed")
    plant(path, PAYLOADS[artifact](tmp_path / "marker"), listed=True, sign_with=KEY, name=artifact)  # the builder
    monkeypatch.setattr(store.os, "geteuid", lambda: 4242)
    monkeypatch.setenv(store.KEY_ENV, KEY)
    engines = prepare(engine_dir)
    assert loaded(engines, artifact) and (tmp_path / "marker").exists()


@artifacts
def test_trusting_a_directory_is_an_explicit_choice(artifact, engine, eager_regions, tmp_path, monkeypatch):
    engine_dir, path = engine("unsigned")
    plant(path, PAYLOADS[artifact](tmp_path / "marker"), listed=True, name=artifact)
    monkeypatch.setattr(store.os, "geteuid", lambda: 4242)
    monkeypatch.setenv(store.TRUST_ENV, "1")
    engines = prepare(engine_dir)
    assert loaded(engines, artifact) and (tmp_path / "marker").exists()


def test_a_signature_covers_the_sidecar_bytes(tmp_path):
    data = b'{"key": "e"}\n'
    expected = hmac.new(KEY.encode(), data, hashlib.sha256).hexdigest()
    assert store.signature(data, KEY.encode()) == f"hmac-sha256:{expected}\n"
