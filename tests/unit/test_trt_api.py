"""The TensorRT backend's names, enum members and calls, checked against real TensorRT Python APIs on the CPU.

TensorRT's Python bindings are small wheels on the package index (tensorrt-cu12-bindings, about 1.3 MB). Their
extension module needs only nine functions from libnvinfer, libnvinfer_plugin and libnvonnxparser, so three
stand-in libraries built with `cc` (every function returns null) let the real module import. Nothing can be
built or run that way, but every class, method, property, enum member and docstring signature of that release
can be inspected. tests/support/trt_api.py walks the backend's source and checks each TensorRT name and call it
reaches on one release (its docstring says how); here it runs once per release in VERSIONS, in a subprocess,
on the backend and on deliberately broken copies of it, which must fail.

The wheels and stand-ins are kept in pytest's cache dir (a temp dir under -p no:cacheprovider). A download
that cannot happen skips with one line. SDXL_BENCH_TRT_VERSIONS=10.0.1,10.8.0.43,... checks other releases.
"""

from __future__ import annotations

import ast
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import pytest

from sdxl_core.engines import tensorrt as trt_backend
from tests.support.trt_api import Checker, Param, parse_params, signatures

ROOT = Path(__file__).resolve().parents[2]
# The backend's modules that use TensorRT, checked as one source (lowest first) so calls across them are followed.
BACKEND = tuple(ROOT / "sdxl_core" / "engines" / f"{name}.py" for name in ("trt_runtime", "trt_build", "tensorrt"))
CHECKER = ROOT / "tests" / "support" / "trt_api.py"
PACKAGE = "tensorrt-cu12-bindings"
# TensorRT 10.0.1 (the oldest 10.x on the index), the newest 10.x, the newest 11.x.
VERSIONS = tuple(os.environ.get("SDXL_BENCH_TRT_VERSIONS", "10.0.1,10.16.1.11,11.4.0.106").split(","))
LIBRARIES = ("nvinfer", "nvinfer_plugin", "nvonnxparser")
# `nm -D --undefined-only tensorrt.so`, less the C and Python runtime: all the bindings take from TensorRT.
STAND_IN_C = """\
/* Stand-ins for the TensorRT functions the Python bindings link against: enough to import, nothing runs. */
void *createInferBuilder_INTERNAL(void) { return 0; }
void *createInferRuntime_INTERNAL(void) { return 0; }
void *createInferRefitter_INTERNAL(void) { return 0; }
void *createNvOnnxParser_INTERNAL(void) { return 0; }
void *createNvOnnxParserRefitter_INTERNAL(void) { return 0; }
int getNvOnnxParserVersion(void) { return 0; }
void *getPluginRegistry(void) { return 0; }
void *getBuilderPluginRegistry(void) { return 0; }
int initLibNvInferPlugins(void) { return 0; }
"""
OBJECTS = (
    "Builder",
    "INetworkDefinition",
    "IBuilderConfig",
    "OnnxParser",
    "Runtime",
    "ICudaEngine",
    "IExecutionContext",
)

# Broken copies of the backend: {label: (text in the backend, its replacement, the problem every release reports)}.
BREAKAGES = {
    "misspelled method": (
        ".create_builder_config()",
        ".create_builder_conifg()",
        "Builder.create_builder_conifg does not exist",
    ),
    "misspelled method on a returned object": (
        "get_timing_cache().serialize()",
        "get_timing_cache().serialise()",
        "ITimingCache.serialise does not exist",
    ),
    "misspelled enum member": ("trt.TensorIOMode.INPUT", "trt.TensorIOMode.INPTU", "TensorIOMode.INPTU does not exist"),
    "missing argument": (
        "set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)",
        "set_memory_pool_limit(workspace_bytes)",
        "IBuilderConfig.set_memory_pool_limit(_) fits none of its signatures: (pool, pool_size)",
    ),
    "argument of the wrong enum": (
        "create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)",
        "create_execution_context(trt.TensorIOMode.INPUT)",
        "ICudaEngine.create_execution_context(TensorIOMode) fits none of its signatures",
    ),
    "read-only property written": (
        "config.builder_optimization_level = ",
        "network.num_inputs = ",
        "INetworkDefinition.num_inputs is read-only",
    ),
    "override with the wrong arguments": (
        "def phase_finish(self, phase_name):",
        "def phase_finish(self, phase_name, extra):",
        "phase_finish takes 2 argument(s)",
    ),
}
MISSPELLED_GUARD = ('hasattr(self.context, "set_device_memory")', 'hasattr(self.context, "set_device_memry")')

pytestmark = pytest.mark.xdist_group("trt-api")  # one worker fetches each wheel once


# --------------------------------------------------------------------------- broken copies of the backend


def _replaced(source: str, old: str, new: str) -> str:
    assert old in source, f"the backend no longer contains {old!r}: update this test's breakage"
    return source.replace(old, new)


def _guard_names(source: str) -> list[str]:
    """Names the backend guards: hasattr(x, "name") in an if-test, getattr(x, "name", default)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.If, ast.IfExp, ast.While)):
            names |= {c.args[1].value for c in ast.walk(node.test) if _is_probe(c, "hasattr", 2)}
        elif _is_probe(node, "getattr", 3):
            names.add(node.args[1].value)
    return sorted(names)


def _is_probe(node: ast.AST, function: str, count: int) -> bool:
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == function
        and len(node.args) == count
        and isinstance(node.args[1], ast.Constant)
    )


class _Unguard(ast.NodeTransformer):
    """The backend as if nobody had guarded `name`: hasattr(x, "name") in if-tests becomes True and
    getattr(x, "name", default) becomes x.name, so the guarded code (and no fallback) runs on every release."""

    def __init__(self, name: str):
        self.name = name

    def _matches(self, node: ast.AST, function: str, count: int) -> bool:
        return _is_probe(node, function, count) and node.args[1].value == self.name

    def _guarded(self, node):
        node.test = _AssumeTrue(self).visit(node.test)
        return self.generic_visit(node)

    visit_If = visit_IfExp = visit_While = _guarded

    def visit_Call(self, node):
        if self._matches(node, "getattr", 3):
            return ast.Attribute(value=self.visit(node.args[0]), attr=self.name, ctx=ast.Load())
        return self.generic_visit(node)


class _AssumeTrue(ast.NodeTransformer):
    def __init__(self, unguard: _Unguard):
        self.unguard = unguard

    def visit_Call(self, node):
        return ast.Constant(True) if self.unguard._matches(node, "hasattr", 2) else self.generic_visit(node)


def _unguarded(source: str, name: str) -> str:
    return ast.unparse(ast.fix_missing_locations(_Unguard(name).visit(ast.parse(source))))


def _backend_source() -> str:
    return "\n".join(path.read_text() for path in BACKEND)


def _sources() -> dict[str, str]:
    backend = _backend_source()
    sources = {"backend": backend, "misspelled guard": _replaced(backend, *MISSPELLED_GUARD)}
    sources |= {label: _replaced(backend, old, new) for label, (old, new, _) in BREAKAGES.items()}
    sources |= {f"unguarded {name}": _unguarded(backend, name) for name in _guard_names(backend)}
    return sources


# --------------------------------------------------------------------------- one release's real module


def _bindings(version: str, root: Path) -> Path | str:
    """The release's bindings installed under `root` (the running Python's wheel), or why they cannot be."""
    target = root / f"{PACKAGE}-{version}-cp{sys.version_info.major}{sys.version_info.minor}"
    if (target / "tensorrt_bindings").is_dir():
        return target
    download = Path(tempfile.mkdtemp(prefix=".download-", dir=root))
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-deps",
        "--only-binary",
        ":all:",
        "--no-compile",
        "--disable-pip-version-check",
        "--timeout",
        "30",
        "--retries",
        "1",
        "--target",
        str(download),
        f"{PACKAGE}=={version}",
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        lines = [line for line in done.stderr.splitlines() if line.strip()] or [f"pip exit {done.returncode}"]
        why = None if done.returncode == 0 else next((x for x in lines if x.startswith("ERROR")), lines[-1])
    except subprocess.TimeoutExpired:
        why = "no answer within 300 s"
    if why is None and (download / "tensorrt_bindings").is_dir():
        try:
            download.rename(target)
        except OSError:  # another run put it there first
            shutil.rmtree(download, ignore_errors=True)
        return target
    shutil.rmtree(download, ignore_errors=True)
    return f"needs the {PACKAGE}=={version} wheel from the package index (download failed: {why or 'no module'})"


def _stand_ins(major: str, root: Path, cc: str) -> Path:
    """libnvinfer.so.<major> and friends, each exporting the functions the bindings import, all returning null."""
    libs = root / f"stand-ins-{major}"
    if all((libs / f"lib{name}.so.{major}").is_file() for name in LIBRARIES):
        return libs
    build = Path(tempfile.mkdtemp(prefix=".stand-ins-", dir=root))
    (build / "stand_in.c").write_text(STAND_IN_C)
    for name in LIBRARIES:
        subprocess.run(
            [cc, "-shared", "-fPIC", "-o", str(build / f"lib{name}.so.{major}"), str(build / "stand_in.c")],
            check=True,
            capture_output=True,
        )
    try:
        build.rename(libs)
    except OSError:
        shutil.rmtree(build, ignore_errors=True)
    return libs


def _check_release(version: str, root: Path) -> dict | str:
    """The checker's answer on every source for this release, or a skip reason."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return f"the {PACKAGE} wheels checked here are for Linux x86_64, not {sys.platform} {platform.machine()}"
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return "needs a C compiler (cc) to build the stand-in TensorRT libraries"
    site = _bindings(version, root)
    if isinstance(site, str):
        return site
    libs = _stand_ins(version.split(".")[0], root, cc)
    env = {**os.environ, "PYTHONPATH": str(site), "LD_LIBRARY_PATH": str(libs)}
    # -S: no site-packages, so a TensorRT installed on this machine (tensorrt_libs) cannot step in
    done = subprocess.run(
        [sys.executable, "-S", str(CHECKER)],
        input=json.dumps({"sources": _sources()}),
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, f"the check did not run on TensorRT {version}: {done.stderr.strip()[-2000:]}"
    result = json.loads(done.stdout)
    assert version.startswith(result["version"]), f"{PACKAGE}=={version} imported as TensorRT {result['version']}"
    return result


@pytest.fixture(scope="session")
def trt_api(request, tmp_path_factory):
    """version -> the checker's answer for that release, computed once per session (skips when it can't be)."""
    cache = getattr(request.config, "cache", None)
    root = Path(cache.mkdir("tensorrt-bindings") if cache is not None else tmp_path_factory.mktemp("tensorrt-bindings"))
    answers: dict[str, dict | str] = {}

    def answer(version: str) -> dict:
        if version not in answers:
            answers[version] = _check_release(version, root)
        if isinstance(answers[version], str):
            pytest.skip(answers[version])
        return answers[version]

    return answer


# --------------------------------------------------------------------------- the backend on each release


@pytest.mark.parametrize("version", VERSIONS)
def test_backend_uses_only_what_this_tensorrt_has(trt_api, version):
    report = trt_api(version)["reports"]["backend"]
    assert report["problems"] == []
    # the walk followed the backend's objects from trt.Builder/trt.Runtime to the engine and its context
    assert set(OBJECTS) <= {name.split(".")[0] for name in report["checked"]}
    assert {
        "Builder.build_serialized_network",
        "OnnxParser.parse_from_file",
        "IExecutionContext.execute_async_v3",
        "ICudaEngine.create_execution_context",
        "IOptimizationProfile.set_shape",
    } <= set(report["checked"])


@pytest.mark.parametrize("version", VERSIONS)
def test_backend_data_type_names_exist(trt_api, version):
    """The engine I/O dtype table is keyed by DataType member names."""
    assert set(trt_backend.TORCH_DTYPES) <= set(trt_api(version)["data_types"])


@pytest.mark.parametrize("label", sorted(BREAKAGES))
def test_check_fails_a_broken_backend(trt_api, label):
    expected = BREAKAGES[label][2]
    for version in VERSIONS:
        problems = trt_api(version)["reports"][label]["problems"]
        assert any(expected in problem for problem in problems), (version, problems)


def test_removing_a_guard_fails_exactly_where_the_name_is_missing(trt_api):
    answers = {version: trt_api(version)["reports"] for version in VERSIONS}
    failing = {}
    for name in _guard_names(_backend_source()):
        failing[name] = {v for v in VERSIONS if answers[v][f"unguarded {name}"]["problems"]}
        probes = {v: answers[v]["backend"]["probes"] for v in VERSIONS}
        lacking = {v for v in VERSIONS if any(key.endswith(f".{name}") and not ok for key, ok in probes[v].items())}
        assert failing[name] == lacking, name
    if "10.0.1" in VERSIONS:
        assert failing["set_device_memory"] == {"10.0.1"} and failing["device_memory_size_v2"] == {"10.0.1"}
    newest = [v for v in VERSIONS if v.startswith("11.")]
    if newest:
        assert set(newest) <= failing["FP16"]  # the FP16 builder flag is gone in 11.x
        problems = answers[newest[-1]]["unguarded FP16"]["problems"]
        assert any("BuilderFlag.FP16 does not exist" in problem for problem in problems), problems


def test_every_probe_answers_yes_on_some_release(trt_api):
    """A hasattr/getattr probe that no checked release answers yes to is a misspelling or dead code."""

    def never_yes(label):
        yes: dict[str, bool] = {}
        for version in VERSIONS:
            for key, ok in trt_api(version)["reports"][label]["probes"].items():
                yes[key] = yes.get(key, False) or ok
        return sorted(key for key, ok in yes.items() if not ok)

    assert never_yes("backend") == []
    assert never_yes("misspelled guard") == ["IExecutionContext.set_device_memry"]


# --------------------------------------------------------------------------- the checker's parsing (no download)


def test_docstring_signatures_and_call_fitting():
    """pybind11's docstring forms: one signature, numbered overloads, enum defaults with ':' and ',' inside."""
    one = (
        "set_device_memory(self: tensorrt_bindings.tensorrt.IExecutionContext, memory: typing.SupportsInt, "
        "size: typing.SupportsInt) -> None\n\n\n    The device memory for use by this IExecutionContext.\n"
    )
    [(params, returns)] = signatures("set_device_memory", one)
    assert [p.name for p in params] == ["self", "memory", "size"] and returns == "None"
    overloads = (
        "deserialize_cuda_engine(*args, **kwargs)\nOverloaded function.\n\n"
        "1. deserialize_cuda_engine(self: tensorrt_bindings.tensorrt.Runtime, serialized_engine: "
        "typing_extensions.Buffer) -> tensorrt_bindings.tensorrt.ICudaEngine\n\n"
        "2. deserialize_cuda_engine(self: tensorrt_bindings.tensorrt.Runtime, stream_reader: "
        "tensorrt_bindings.tensorrt.IStreamReader) -> tensorrt_bindings.tensorrt.ICudaEngine\n"
    )
    names = [[p.name for p in params] for params, _ in signatures("deserialize_cuda_engine", overloads)]
    assert names == [["self", "serialized_engine"], ["self", "stream_reader"]]
    assert parse_params(
        "self: X, strategy: tensorrt.ExecutionContextAllocationStrategy = "
        "<ExecutionContextAllocationStrategy.STATIC: 0>, shape: Dict[str, int] = {}, *, name: str"
    ) == [
        Param("self", "pos", False, "X"),
        Param("strategy", "pos", True, "tensorrt.ExecutionContextAllocationStrategy"),
        Param("shape", "pos", True, "Dict[str, int]"),
        Param("name", "kwonly", False, "str"),
    ]

    fits = Checker(types.ModuleType("tensorrt_bindings")).fits
    memory, size = params[1:]
    assert fits([memory, size], [None, None], {})
    assert fits([memory, size], [None], {"size": None})
    assert not fits([memory, size], [None], {})  # size missing
    assert not fits([memory, size], [None, None, None], {})  # one too many
    assert not fits([memory, size], [None, None], {"memory": None})  # memory twice
    assert not fits([memory, size], [None], {"bytes": None})  # no such keyword
