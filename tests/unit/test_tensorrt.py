"""The TensorRT backend. CPU: its pure helpers (names, profiles, I/O specs, builder settings, sidecar checks,
the load/refuse/rebuild decisions) and its error without TensorRT. GPU + TensorRT: build, load, run, refuse."""

from __future__ import annotations

import importlib
import json
import sys
import types

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from sdxl_core import models, specs
from sdxl_core.engines import get_backend, store
from sdxl_core.engines import tensorrt as trt_backend
from sdxl_core.errors import UserError
from sdxl_core.variants import VARIANTS
from tests.support import onnx_utils


def _tensorrt_usable() -> bool:
    try:
        import tensorrt

        return hasattr(tensorrt, "Builder") and torch.cuda.is_available()
    except Exception:
        return False


NEEDS_TRT = "needs TensorRT (pip install 'sdxl-bench[trt]') and a CUDA GPU"
trt_gpu = [pytest.mark.skipif(not _tensorrt_usable(), reason=NEEDS_TRT), pytest.mark.tensorrt, pytest.mark.gpu]

XL = VARIANTS["xl-1.0-fp16"]
SDXL_VAE = dict(models.SDXL_VAE_CONFIG)  # force_upcast=True: the SDXL VAE stays fp32


# --------------------------------------------------------------------------- without TensorRT


@pytest.mark.parametrize("stand_in", [None, types.ModuleType("tensorrt")], ids=["missing", "registry-stub"])
def test_prepare_without_tensorrt_names_the_fix(monkeypatch, stand_in):
    monkeypatch.setitem(sys.modules, "tensorrt", stand_in)  # None: `import tensorrt` raises ImportError
    backend = importlib.reload(get_backend("tensorrt"))
    assert backend.NAME == "tensorrt"
    with pytest.raises(UserError) as info:
        backend.prepare(XL, components=None, device=torch.device("cpu"))
    assert str(info.value) == "--backend tensorrt needs TensorRT: pip install 'sdxl-bench[trt]' (see README)"
    if stand_in is None:
        assert backend.version() == "not-installed"


# --------------------------------------------------------------------------- pure helpers


def test_plan_and_timing_cache_names():
    assert trt_backend.plan_filename("unet", "10.8.0.43") == "unetxl.trt10.8.0.43.plan"
    assert trt_backend.plan_filename("clip2", "10.8.0.43") == "clip2.trt10.8.0.43.plan"
    assert trt_backend.timing_cache_key("10.8.0.43", "sm90") == "timing_cache.trt10.8.0.43.sm90"
    int8 = VARIANTS["xl-1.0-int8"].replace(backend="tensorrt", quant_level=2.5)
    key = specs.SPECS["unet"].key(int8, "10.8.0.43", "sm90")
    assert key.startswith(
        "unetxl-int8.l2.5.bs2.s30.c32.p1.0.a0.8.h1024w1024.stable-diffusion-xl-base-1-0.tensorrt10-8-0-43.sm90."
    )
    assert specs.SPECS["clip"].key(int8, "10.8.0.43", "sm90").startswith("clip.bs2.stable-diffusion-xl-base-1-0.")
    # the text encoders' engine is shared by FP16 and INT8 variants; the UNet's is not
    fp16 = XL.replace(backend="tensorrt")
    assert specs.SPECS["clip"].key(int8, "10.8", "sm90") == specs.SPECS["clip"].key(fp16, "10.8", "sm90")
    assert specs.SPECS["unet"].key(int8, "10.8", "sm90") != specs.SPECS["unet"].key(fp16, "10.8", "sm90")
    assert specs.SPECS["vae"].key(fp16, "10.8", "sm90") != specs.SPECS["vae"].key(fp16, "10.8", "sm89")


def test_profile_shapes_come_from_the_variant():
    unet = trt_backend.profile_shapes(XL, "unet")
    assert unet["sample"] == ((2, 4, 128, 128),) * 3  # CFG doubles batch 1; 1024 px / 8
    assert unet["encoder_hidden_states"] == ((2, 77, 2048),) * 3
    assert unet["timestep"] == ((1,),) * 3 and "latent" not in unet
    assert trt_backend.profile_shapes(XL.replace(batch_size=4), "clip")["input_ids"] == ((8, 77),) * 3
    assert trt_backend.profile_shapes(XL.replace(batch_size=4), "vae")["latent"] == ((4, 4, 128, 128),) * 3
    turbo = trt_backend.profile_shapes(VARIANTS["xl-turbo"], "unet")
    assert turbo["sample"] == ((1, 4, 64, 64),) * 3 and turbo["time_ids"] == ((1, 6),) * 3
    tiny = models.build_builtin("tiny", device="meta")
    small = XL.replace(model="tiny", height=128, width=128)
    assert trt_backend.profile_shapes(small, "unet", tiny.unet.config)["encoder_hidden_states"] == ((2, 77, 96),) * 3
    assert trt_backend.profile_shapes(small, "clip2", tiny.text_encoder_2.config)["input_ids"] == ((2, 77),) * 3


def test_io_spec_dtypes_and_shapes():
    spec = trt_backend.io_spec(XL, "unet", half=torch.float16)
    assert spec["sample"] == {"shape": [2, 4, 128, 128], "dtype": "float16"}
    assert spec["timestep"] == {"shape": [1], "dtype": "float32"}
    assert spec["latent"]["dtype"] == "float16"
    vae = trt_backend.io_spec(XL, "vae", SDXL_VAE, torch.float16)
    assert vae == {
        "latent": {"shape": [1, 4, 128, 128], "dtype": "float32"},
        "images": {"shape": [1, 3, 1024, 1024], "dtype": "float32"},
    }
    assert (
        trt_backend.io_spec(XL, "vae", {**SDXL_VAE, "force_upcast": False}, torch.bfloat16)["images"]["dtype"]
        == "bfloat16"
    )
    tiny = models.build_builtin("tiny", device="meta")
    clip2 = trt_backend.io_spec(XL.replace(model="tiny"), "clip2", tiny.text_encoder_2.config, torch.float16)
    assert clip2 == {
        "input_ids": {"shape": [2, 77], "dtype": "int32"},
        "hidden_states": {"shape": [2, 77, 64], "dtype": "float16"},
        "text_embeds": {"shape": [2, 32], "dtype": "float16"},
    }


def test_builder_settings_pick_strong_typing_for_qdq_graphs():
    assert trt_backend.builder_settings(True, torch.float16) == {
        "strongly_typed": True,
        "fp16": False,
        "bf16": False,
        "optimization_level": 3,
    }
    assert trt_backend.builder_settings(False, torch.float16, 5) == {
        "strongly_typed": False,
        "fp16": True,
        "bf16": False,
        "optimization_level": 5,
    }
    assert trt_backend.builder_settings(False, torch.bfloat16)["bf16"] is True
    fp32 = trt_backend.builder_settings(False, torch.float32)  # the SDXL VAE: TF32, no reduced precision
    assert not (fp32["fp16"] or fp32["bf16"] or fp32["strongly_typed"])


def test_builder_settings_without_weak_typing_build_every_graph_strongly_typed():
    """TensorRT 11 has no FP16/BF16 builder flags: the FP16 export's own types make the FP16 engine."""
    for has_qdq in (False, True):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            settings = trt_backend.builder_settings(has_qdq, dtype, weak_typing=False)
            assert settings == {"strongly_typed": True, "fp16": False, "bf16": False, "optimization_level": 3}


def _matmul_graph(path, qdq: bool):
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    nodes, inputs, extra = [], "x", []
    if qdq:
        extra = [
            numpy_helper.from_array(np.array(0.05, np.float32), "s"),
            numpy_helper.from_array(np.array(0, np.int8), "z"),
        ]
        nodes += [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"]),
        ]
        inputs = "dq"
    nodes.append(helper.make_node("MatMul", [inputs, "w"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        initializer=[w, *extra],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), str(path))
    return path


def test_graph_has_qdq(tmp_path):
    assert trt_backend.graph_has_qdq(_matmul_graph(tmp_path / "q.onnx", qdq=True))
    assert not trt_backend.graph_has_qdq(_matmul_graph(tmp_path / "p.onnx", qdq=False))


def test_io_mismatches_and_shared_memory():
    want = trt_backend.io_spec(XL, "clip")
    assert trt_backend.io_mismatches(json.loads(json.dumps(want)), want) == []
    other = trt_backend.io_spec(XL.replace(batch_size=2), "clip")
    assert trt_backend.io_mismatches(other, want) == [
        "hidden_states shape [4, 77, 768] != [2, 77, 768]",
        "input_ids shape [4, 77] != [2, 77]",
    ]
    assert trt_backend.io_mismatches({}, want) == ["missing tensor input_ids", "missing tensor hidden_states"]
    assert trt_backend.shared_memory_bytes([1000, 70_000_001, 5]) == 70_000_128
    assert trt_backend.shared_memory_bytes([]) == 0


# --------------------------------------------------------------------------- sidecar checks on disk


def _expect(variant=XL, trt_version="10.8.0.43", gpu="NVIDIA H100 80GB HBM3", device="sm90", component="unet"):
    variant = variant.replace(backend="tensorrt")
    return trt_backend.expected_sidecar(
        variant, component, trt_version=trt_version, device=device, gpu=gpu, io=trt_backend.io_spec(variant, component)
    )


def _publish(engine_dir, key, expect, data=b"\x7fserialized engine bytes" * 64, component="unet"):
    name = trt_backend.plan_filename(component, expect["backend_version"])

    def write(tmp):
        (tmp / name).write_bytes(data)

    store.publish(engine_dir, key, write, expect)
    return store.engine_path(engine_dir, key) / name


def test_sidecar_refuses_other_versions_gpus_shapes_and_torn_plans(tmp_path):
    expect = _expect()
    plan = _publish(tmp_path, "k", expect)
    record = store.verify(tmp_path, "k", expect).record
    assert record["io"]["sample"]["shape"] == [2, 4, 128, 128] and plan.name in record["files"]

    refusals = {
        "TensorRT version": (_expect(trt_version="10.9.0.34"), "backend_version"),
        "GPU model": (_expect(gpu="NVIDIA H100 PCIe"), "gpu"),
        "compute capability": (_expect(device="sm89"), "device"),
        "shape": (_expect(variant=XL.replace(height=768)), "io"),
        "precision": (_expect(variant=VARIANTS["xl-1.0-int8"]), "precision"),
    }
    for what, (other, field) in refusals.items():
        with pytest.raises(store.EngineRefused, match=f"built for {field}=") as info:
            store.verify(tmp_path, "k", other)
        assert "\n" not in str(info.value), what

    data = plan.read_bytes()
    plan.write_bytes(data[:-100])
    with pytest.raises(store.EngineRefused, match="truncated") as info:
        store.verify(tmp_path, "k", expect)
    assert "\n" not in str(info.value)
    plan.write_bytes(data[:10] + bytes([data[10] ^ 0xFF]) + data[11:])  # same size, one byte flipped
    with pytest.raises(store.EngineRefused, match="checksum"):
        store.verify(tmp_path, "k", expect)


class _StandInBuilder:
    """Where TensorRT would build: returns a new byte string per build so a rebuild is visible."""

    def __init__(self):
        self.builds = 0

    def build(self, component, key):
        self.builds += 1
        return f"engine #{self.builds}".encode() * 32, {"build_s": 0.0, "export": "reused", "qdq": False}


def test_load_refuse_and_rebuild_decisions(tmp_path, capsys):
    expect, builder, extra = _expect(), _StandInBuilder(), {"capability": "9.0"}
    with pytest.raises(UserError, match="building was not allowed"):
        trt_backend._plan_for(builder, "unet", "k", expect, tmp_path, False, extra)

    plan, record = trt_backend._plan_for(builder, "unet", "k", expect, tmp_path, True, extra)
    assert record["mode"] == "built" and builder.builds == 1
    sidecar = store.read_sidecar(store.engine_path(tmp_path, "k"))
    assert sidecar["capability"] == "9.0" and sidecar["backend_version"] == "10.8.0.43"
    assert sidecar["libraries"]["onnx"] == onnx.__version__

    again, record = trt_backend._plan_for(builder, "unet", "k", expect, tmp_path, False, extra)
    assert again == plan and record["mode"] == "loaded" and builder.builds == 1

    path = store.engine_path(tmp_path, "k") / trt_backend.plan_filename("unet", "10.8.0.43")
    path.write_bytes(plan[: len(plan) // 2])  # a torn copy
    with pytest.raises(store.EngineRefused, match="truncated"):
        trt_backend._plan_for(builder, "unet", "k", expect, tmp_path, False, extra)
    rebuilt, record = trt_backend._plan_for(builder, "unet", "k", expect, tmp_path, True, extra)
    assert record["mode"] == "built" and rebuilt != plan and builder.builds == 2
    assert "truncated" in capsys.readouterr().err and store.verify(tmp_path, "k", expect)

    newer = _expect(trt_version="10.9.0.34")
    with pytest.raises(store.EngineRefused, match="backend_version"):
        trt_backend._plan_for(builder, "unet", "k", newer, tmp_path, False, extra)

    _, record = trt_backend._plan_for(builder, "unet", "k", expect, None, True, extra)  # no --engine-dir
    assert record["mode"] == "in-memory" and builder.builds == 3


def _builder(engine_dir):
    """A _Builder as prepare makes it, with nothing to export or build: for its timing-cache store logic."""
    return trt_backend._Builder(XL, None, None, torch.float16, None, False, 3, None, engine_dir, "10.8.0.43", "sm90")


def test_a_plan_is_handed_to_tensorrt_only_listed_hashed_and_trusted(tmp_path, monkeypatch):
    monkeypatch.delenv(store.KEY_ENV, raising=False)
    monkeypatch.delenv(store.TRUST_ENV, raising=False)
    expect, builder, extra = _expect(), _StandInBuilder(), {"capability": "9.0"}
    plan, _ = trt_backend._plan_for(builder, "unet", "k", expect, tmp_path, True, extra)
    path = store.engine_path(tmp_path, "k") / trt_backend.plan_filename("unet", "10.8.0.43")
    path.chmod(0o664)  # a plan another member of the group could have rewritten
    for allow_build in (False, True):  # untrusted is refused, never rebuilt over
        with pytest.raises(store.EngineUntrusted, match="refusing to load unetxl.trt10.8.0.43.plan") as info:
            trt_backend._plan_for(builder, "unet", "k", expect, tmp_path, allow_build, extra)
        assert "\n" not in str(info.value) and builder.builds == 1
    monkeypatch.setenv(store.TRUST_ENV, "1")
    assert trt_backend._plan_for(builder, "unet", "k", expect, tmp_path, False, extra)[0] == plan

    sidecar = json.loads((path.parent / store.SIDECAR).read_text())
    sidecar["files"] = {}  # an empty listing passes nothing
    (path.parent / store.SIDECAR).write_text(json.dumps(sidecar))
    with pytest.raises(store.EngineRefused, match="lists no files"):
        trt_backend._plan_for(builder, "unet", "k", expect, tmp_path, False, extra)


def test_the_timing_cache_is_a_store_entry_read_like_a_plan(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(store.KEY_ENV, raising=False)
    monkeypatch.delenv(store.TRUST_ENV, raising=False)
    builder = _builder(tmp_path)
    assert builder.timing_cache() == b""  # none yet
    builder.save_timing_cache(b"timings #1")
    builder.save_timing_cache(b"timings #2")  # each build publishes its update in place of the last
    assert builder.timing_cache() == b"timings #2"
    entry = store.engine_path(tmp_path, trt_backend.timing_cache_key("10.8.0.43", "sm90"))
    assert sorted(p.name for p in entry.iterdir()) == [store.SIDECAR, trt_backend.TIMING_CACHE]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    (entry / trt_backend.TIMING_CACHE).write_bytes(b"timings #3")  # torn or edited: built without it
    assert builder.timing_cache() == b"" and "fails its checksum; " in capsys.readouterr().err
    builder.save_timing_cache(b"timings #4")
    monkeypatch.setattr(store.os, "geteuid", lambda: 4242)  # another user's cache: refused like their plans
    with pytest.raises(store.EngineUntrusted, match="refusing to load timing_cache.bin"):
        builder.timing_cache()


# --------------------------------------------------------------------------- GPU + TensorRT

TINY_GPU = XL.replace(name="tiny-fp16", model="tiny", height=128, width=128, steps=4)


def _trt_gpu(test):
    test = pytest.mark.skipif(not _tensorrt_usable(), reason=NEEDS_TRT)(test)
    return pytest.mark.gpu(pytest.mark.tensorrt(test))


@_trt_gpu
@pytest.mark.parametrize("use_cuda_graph", [False, True], ids=["stream", "cuda-graph"])
def test_tiny_fp16_engines_build_load_and_match_torch(tmp_path, use_cuda_graph):
    from sdxl_core import pipeline
    from sdxl_core.engines import torch_backend

    cuda = torch.device("cuda")
    components = models.load("tiny")
    engines = trt_backend.prepare(
        TINY_GPU,
        components,
        cuda,
        engine_dir=tmp_path / "e",
        onnx_dir=tmp_path / "o",
        use_cuda_graph=use_cuda_graph,
        progress=False,
    )
    assert {r["mode"] for r in engines.info.engines.values()} == {"built"}
    sidecar = store.read_sidecar(store.engine_path(tmp_path / "e", engines.info.engine_key))
    assert sidecar["gpu"] == torch.cuda.get_device_name(cuda) and sidecar["builder"]["fp16"] is True

    ref_components = models.load("tiny")
    ref = torch_backend.prepare(TINY_GPU, ref_components, cuda, compile=False)
    args = specs.SPECS["unet"].sample_inputs(TINY_GPU, ref_components.unet, device=cuda)
    with torch.inference_mode():
        expected = ref.unet(*args).float()
        actual = engines.unet(*args).float().clone()
    assert (actual - expected).abs().max() <= 2e-2 * expected.abs().max()  # fp16 against fp16, other kernels

    image = pipeline.txt2img(engines, components, TINY_GPU, ["a red fox"], seed=0).images[0]
    reference = pipeline.txt2img(ref, ref_components, TINY_GPU, ["a red fox"], seed=0).images[0]
    diff = np.abs(np.asarray(image, np.float32) - np.asarray(reference, np.float32))
    assert diff.mean() < 2.0  # of 255

    reloaded = trt_backend.prepare(
        TINY_GPU,
        models.load("tiny"),
        cuda,
        engine_dir=tmp_path / "e",
        allow_build=False,
        use_cuda_graph=use_cuda_graph,
        progress=False,
    )
    assert {r["mode"] for r in reloaded.info.engines.values()} == {"loaded"}
    with torch.inference_mode():
        assert torch.equal(reloaded.unet(*args).clone(), engines.unet(*args).clone())


@_trt_gpu
def test_corrupt_plan_is_refused_on_the_gpu(tmp_path):
    cuda = torch.device("cuda")
    engines = trt_backend.prepare(TINY_GPU, models.load("tiny"), cuda, engine_dir=tmp_path, progress=False)
    plan = next(store.engine_path(tmp_path, engines.info.engine_key).glob("*.plan"))
    data = plan.read_bytes()
    plan.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    with pytest.raises(store.EngineRefused, match="checksum"):
        trt_backend.prepare(TINY_GPU, models.load("tiny"), cuda, engine_dir=tmp_path, allow_build=False)


@_trt_gpu
@pytest.mark.parametrize("precision,level", [("int8", 2.5), ("fp8", 3.0)])
def test_tiny_8bit_engines_build_strongly_typed_and_run(tmp_path, precision, level):
    from sdxl_core import pipeline

    variant = TINY_GPU.replace(
        name=f"tiny-{precision}", precision=precision, quant_level=level, steps=2, calibration_size=2
    )
    components = models.load("tiny")
    engines = trt_backend.prepare(
        variant, components, torch.device("cuda"), engine_dir=tmp_path / "e", onnx_dir=tmp_path / "o", progress=False
    )
    unet = engines.info.engines["unet"]
    assert unet["qdq"] is True and unet["builder"]["strongly_typed"] is True
    assert onnx_utils.count_qdq(unet["onnx"])["quantized"]
    result = pipeline.txt2img(engines, components, variant, ["a red fox"], seed=0)
    assert torch.isfinite(result.latents).all()
