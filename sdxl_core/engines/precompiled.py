"""Compiled UNet regions kept in the engine, so that a reuse loads them instead of Dynamo tracing each one again.

Regional compile (`compiled.compile_regions`) of a reused engine still runs Dynamo on every region: the engine's
compile cache spares Inductor's work, not the bytecode tracing, guard building and cache lookups (about 5 of the
7.6 s a Hopper GPU took from a fresh process to the FP16 UNet's first step). Dynamo's ahead-of-time compile
(`torch.compile(fn, fullgraph=True).aot_compile(...)`) makes a function that carries its guards and Inductor's
generated code, and that can be saved and loaded. At build, `build` records each region's inputs in one eager
step and compiles one function per group of regions that share a class and pass its guards (the FP16 UNet's 91
regions make 19 functions); `pack` puts them in one file. At reuse, `bind` points every region's forward at its
function: nothing is traced.

The file holds pickled code (Dynamo's bytecode, guards, Inductor's output): it may only be loaded from bytes that
the engine store has authenticated (`store.Engine.read`). A function whose guards fail (a processor swapped, an
input of another shape) raises instead of recompiling, and torch refuses a function saved by another torch, CUDA
or GPU: the caller (`compiled.compile_unet`) then compiles the regions as before.
"""

from __future__ import annotations

import functools
import io
import json
import struct
from collections.abc import Callable

import torch

FILE = "compiled_regions.bin"
_MAGIC = b"SDXLRGN1"
_HEADER = struct.Struct("<Q")  # the JSON header's length, after the magic


def supported() -> bool:
    """This torch can save and load ahead-of-time compiled functions (torch 2.11 has them behind a flag)."""
    return hasattr(torch._dynamo.config, "enable_aot_compile") and hasattr(torch.compiler, "load_compiled_function")


def _portable_guards(entries) -> list[bool]:
    """Keep the guards that can be saved. aot_compile's own filter drops global guards and unserializable guard
    types; this one also drops guards *derived* from an unserializable type (diffusers' attention processor's
    `__call__.__code__`, an ID match), which would otherwise fail the save. The processor's type is still
    guarded, so another processor class is refused."""
    from torch._dynamo.guards import CheckFunctionManager

    unsupported = set(CheckFunctionManager.UNSUPPORTED_SERIALIZATION_GUARD_TYPES)
    return [
        not (entry.is_global or entry.guard_type in unsupported or unsupported & set(entry.derived_guard_types))
        for entry in entries
    ]


def record_inputs(regions: list[tuple[str, torch.nn.Module]], step: Callable[[], object]) -> dict[str, tuple]:
    """Each region's (args, kwargs) of its first call during one `step()`, under inference mode (as it runs)."""
    calls: dict[str, tuple] = {}

    def keep(name, module, args, kwargs):
        calls.setdefault(name, (args, kwargs))

    hooks = [
        module.register_forward_pre_hook(functools.partial(keep, name), with_kwargs=True) for name, module in regions
    ]
    try:
        with torch.inference_mode():
            step()
    finally:
        for hook in hooks:
            hook.remove()
    missed = [name for name, _ in regions if name not in calls]
    if missed:
        raise RuntimeError(f"{len(missed)} regions did not run in the step, e.g. {missed[0]}")
    return calls


def build(
    regions: list[tuple[str, torch.nn.Module]], step: Callable[[], object], backend: str = "inductor"
) -> tuple[dict[str, int], list]:
    """({region name: function index}, functions): one function per class and guard-compatible group."""
    calls = record_inputs(regions, step)
    torch._dynamo.config.enable_aot_compile = True  # torch 2.11 keeps aot_compile behind this flag
    functions: list[tuple[type, object]] = []
    index: dict[str, int] = {}
    with torch.inference_mode():  # guards record the dispatch mode: build and reuse both run inference mode
        for name, module in regions:
            args, kwargs = calls[name]
            found = next(
                (
                    i
                    for i, (cls, fn) in enumerate(functions)
                    if cls is type(module) and fn.guard_check(module, *args, **kwargs)
                ),
                None,
            )
            if found is None:
                compiler = torch.compile(
                    type(module).forward,
                    fullgraph=True,
                    dynamic=False,
                    backend=backend,
                    options={"guard_filter_fn": _portable_guards},
                )
                functions.append((type(module), compiler.aot_compile(((module, *args), kwargs))))
                found = len(functions) - 1
            index[name] = found
    return index, [fn for _, fn in functions]


def pack(index: dict[str, int], functions: list) -> bytes:
    """The engine's file of `build`'s functions (`pack_blobs`)."""
    from torch._dynamo.aot_compile import AOTCompiledFunction

    return pack_blobs(index, [AOTCompiledFunction.serialize(fn).serialized_data for fn in functions])


def pack_blobs(index: dict[str, int], blobs: list[bytes]) -> bytes:
    """One file: magic, header length, JSON header (region -> function, function sizes), the functions' bytes."""
    header = json.dumps({"regions": index, "sizes": [len(b) for b in blobs]}, sort_keys=True).encode()
    return b"".join([_MAGIC, _HEADER.pack(len(header)), header, *blobs])


def unpack(data: bytes) -> tuple[dict[str, int], list[bytes]]:
    """The header and the functions' bytes, with every size checked (raises ValueError on a malformed file)."""
    if not data.startswith(_MAGIC) or len(data) < len(_MAGIC) + _HEADER.size:
        raise ValueError(f"not a {FILE} file")
    (length,) = _HEADER.unpack_from(data, len(_MAGIC))
    start = len(_MAGIC) + _HEADER.size
    header = json.loads(data[start : start + length])
    index, sizes = header["regions"], header["sizes"]
    if not all(isinstance(s, int) and s > 0 for s in sizes) or start + length + sum(sizes) != len(data):
        raise ValueError(f"{FILE}: its sizes do not add up to the file")
    if any(not isinstance(i, int) or not 0 <= i < len(sizes) for i in index.values()):
        raise ValueError(f"{FILE}: a region names a function that is not there")
    blobs, offset = [], start + length
    for size in sizes:
        blobs.append(data[offset : offset + size])
        offset += size
    return index, blobs


def bind(data: bytes, regions: list[tuple[str, torch.nn.Module]]) -> Callable[[], None]:
    """Load the functions in `data` (authenticated bytes only: loading runs code) and point every region's
    forward at its function. Returns the undo. Raises if the file does not name exactly these regions, or if
    torch refuses a function (saved by another torch, CUDA or GPU)."""
    index, blobs = unpack(data)
    names = [name for name, _ in regions]
    if sorted(index) != sorted(names):
        raise ValueError(f"{FILE} holds {len(index)} regions, this UNet has {len(names)} others")
    # Under inference mode: torch 2.11 rebuilds the tensor guards from the mode the load runs in.
    with torch.inference_mode():
        functions = [torch.compiler.load_compiled_function(io.BytesIO(blob)) for blob in blobs]
    for name, module in regions:
        module.forward = functools.partial(functions[index[name]], module)

    def undo():
        for _, module in regions:
            module.__dict__.pop("forward", None)

    return undo
