"""Checksums of engine files: a file's sha256, and for a file larger than CHUNK_BYTES also the sha256 of each
CHUNK_BYTES piece, which readers hash in parallel (a 4.9 GB FP16 UNet took 2.5-5 s to hash whole, on one core,
on every load). Engines published before chunks were listed are checked whole. `is_data` tells the files that
carry no code from the executable ones (see `trust`)."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DATA_SUFFIXES = (".safetensors", ".json")  # formats that carry no code; every other file counts as executable
CHUNK_BYTES = 64 << 20  # files larger than this are also hashed piece by piece (see the module doc)
_READ_BYTES = 4 << 20


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


def chunk_list(meta: dict) -> dict | None:
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
    chunks = chunk_list(meta)
    if chunks is None:
        return sha256_file(path) == meta["sha256"]
    return chunk_digests(path, meta["bytes"], chunks["bytes"]) == chunks["sha256"]


def bytes_match(data: bytes, meta: dict) -> bool:
    chunks = chunk_list(meta)
    if chunks is None:
        return hashlib.sha256(data).hexdigest() == meta["sha256"]
    return _bytes_chunk_digests(data, chunks["bytes"]) == chunks["sha256"]


def is_data(name: str) -> bool:
    """Safetensors and JSON: loaded without trust. Anything else may run code when loaded."""
    return name.endswith(DATA_SUFFIXES)
