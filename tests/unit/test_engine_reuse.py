"""Engines are built once, then run from the engine dir alone; bad artifacts are refused, never half-used."""

import json
import multiprocessing
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdxl_core import models, pipeline, run
from sdxl_core.engines import store, torch_backend
from sdxl_core.errors import UserError
from sdxl_core.quant import qmodules, quantize
from sdxl_core.variants import VARIANTS

CPU = torch.device("cpu")
INT8 = VARIANTS["xl-1.0-int8"].replace(model="tiny", height=64, width=64, steps=3, calibration_size=2)
FP16 = VARIANTS["xl-1.0-fp16"].replace(model="tiny", height=64, width=64, steps=3)


def prepare(variant, engine_dir, onnx_dir=None, unet_weights=True, **kw):
    components = models.load("tiny", unet_weights=unet_weights)
    loop = run.calibration_loop(components, variant, CPU, torch.float32, False)
    return components, torch_backend.prepare(
        variant, components, CPU, engine_dir=engine_dir, onnx_dir=onnx_dir, progress=False, forward_loop=loop, **kw
    )


def image_bytes(variant, components, engines):
    return pipeline.txt2img(engines, components, variant, ["a castle on a hill"], seed=7).images[0].tobytes()


@pytest.fixture
def no_calibration(monkeypatch):
    """Make calibration impossible: any attempt fails the test."""

    def forbidden(*args, **kwargs):
        raise AssertionError("calibration ran, but the engine should have been loaded")

    monkeypatch.setattr(quantize, "quantize_unet", forbidden)
    monkeypatch.setattr(quantize, "load_calibration", forbidden)


@pytest.fixture(scope="module")
def built_int8(tmp_path_factory):
    root = tmp_path_factory.mktemp("reuse")
    engine_dir, onnx_dir = root / "engines", root / "onnx"
    components, engines = prepare(INT8, engine_dir, onnx_dir)
    assert engines.info.mode == "built" and engines.info.calibration == "calibrated"
    return engine_dir, onnx_dir, image_bytes(INT8, components, engines)


def test_prebuilt_engine_runs_from_the_engine_dir_alone(built_int8, no_calibration, tmp_path):
    engine_dir, onnx_dir, before = built_int8
    copy = tmp_path / "only-engines"
    shutil.copytree(engine_dir, copy)  # nothing but the engine dir travels
    # Load-only, as `txt2img --no-build` runs it: not even the random UNet is built, the engine brings it.
    components, engines = prepare(INT8, copy, onnx_dir=None, allow_build=False, unet_weights=False)
    assert engines.info.mode == "loaded"
    # The components hold the loaded engine UNet (on a GPU its CUDA graph also keeps it alive).
    assert qmodules.module_counts(components.unet)["Int8Linear"] > 0
    assert image_bytes(INT8, components, engines) == before


def test_a_second_session_builds_nothing(built_int8, no_calibration):
    engine_dir, onnx_dir, before = built_int8
    components, engines = prepare(INT8, engine_dir, onnx_dir)  # building allowed, but nothing to build
    assert engines.info.mode == "loaded"
    assert image_bytes(INT8, components, engines) == before


def test_calibration_state_is_reused_when_only_the_engine_is_gone(built_int8, tmp_path, monkeypatch):
    from modelopt.torch.quantization import extensions

    _, onnx_dir, before = built_int8
    monkeypatch.setattr(quantize, "quantize_unet", lambda *a, **k: pytest.fail("recalibrated"))
    for loader in (extensions.get_cuda_ext, extensions.get_cuda_ext_fp8):  # as in a fresh process
        monkeypatch.delattr(loader, "extension", raising=False)
    components, engines = prepare(INT8, tmp_path / "fresh-engines", onnx_dir)
    assert engines.info.calibration == "reused" and engines.info.mode == "built"
    assert image_bytes(INT8, components, engines) == before
    # Converting the restored calibration fake-quantizes the weights: with ModelOpt's torch kernels, not its CUDA
    # extension, which a GPU would JIT-compile with nvcc first
    assert extensions.get_cuda_ext.extension is None and extensions.get_cuda_ext_fp8.extension is None


def test_a_corrupt_calibration_file_is_recalibrated_with_a_message(tmp_path, capfd):
    onnx_dir = tmp_path / "onnx"
    prepare(INT8, tmp_path / "e1", onnx_dir)
    (state,) = onnx_dir.glob("*/calibration.pt")
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    _, engines = prepare(INT8, tmp_path / "e2", onnx_dir)
    # recalibrated from the activations the first build recorded (tests/unit/test_activation_record.py)
    assert engines.info.calibration == "shared"
    assert "recalibrating" in capfd.readouterr().err


@pytest.fixture
def fp16_engine(tmp_path):
    _, engines = prepare(FP16, tmp_path / "engines")
    return tmp_path / "engines", Path(engines.info.engine_path)


def _flip_byte(path: Path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path):
    path.write_bytes(path.read_bytes()[:-100])


def _foreign(path: Path):
    sidecar = path / store.SIDECAR
    record = json.loads(sidecar.read_text())
    record["key"] = "unetxl-fp16.someone-else"
    sidecar.write_text(json.dumps(record))


def _other_version(path: Path):
    sidecar = path / store.SIDECAR
    record = json.loads(sidecar.read_text())
    record["backend_version"] = "1.0.0"
    sidecar.write_text(json.dumps(record))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: _flip_byte(p / "unet.safetensors"), "unet.safetensors fails its checksum"),
        (lambda p: _truncate(p / "unet.safetensors"), "unet.safetensors is truncated"),
        (lambda p: (p / "layer_plan.json").unlink(), "layer_plan.json is missing"),
        (_foreign, "its sidecar names another engine"),
        (_other_version, "was built for backend_version='1.0.0'"),
        (lambda p: (p / store.SIDECAR).write_text("{not json"), "its sidecar is malformed \\(not JSON"),
    ],
)
def test_damaged_or_foreign_engines_are_refused_in_one_line(fp16_engine, damage, message):
    engine_dir, path = fp16_engine
    damage(path)
    with pytest.raises(UserError, match=message) as info:
        prepare(FP16, engine_dir, allow_build=False)
    assert "\n" not in str(info.value)


def test_a_refused_engine_is_rebuilt_when_building_is_allowed(fp16_engine, capfd):
    engine_dir, path = fp16_engine
    _truncate(path / "unet.safetensors")
    components, engines = prepare(FP16, engine_dir)
    assert engines.info.mode == "built" and "rebuilding" in capfd.readouterr().err
    assert store.verify(engine_dir, engines.info.engine_key, {}) is not None


def test_no_engine_and_no_building_is_one_clear_line(tmp_path):
    with pytest.raises(UserError, match="building was not allowed"):
        prepare(FP16, tmp_path / "empty", allow_build=False)


def _build_in_another_process(engine_dir: str, queue):
    components = models.load("tiny")
    engines = torch_backend.prepare(FP16, components, CPU, engine_dir=engine_dir, progress=False)
    queue.put(engines.info.mode)


def test_concurrent_builders_leave_one_valid_engine(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    workers = [ctx.Process(target=_build_in_another_process, args=(str(tmp_path), queue)) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=300)
    assert [w.exitcode for w in workers] == [0, 0]
    modes = sorted(queue.get(timeout=5) for _ in workers)
    assert modes == ["built", "loaded"]  # the lock made the second one wait, then reuse
    engines = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(engines) == 1 and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert store.verify(tmp_path, engines[0].name, {}) is not None


def test_a_build_from_a_shape_only_unet_gets_the_weights_then(tmp_path):
    """A run given an engine dir loads the UNet shape-only; when the engine is not there it is built from the
    same weights an eager load has. Components without a way to get the weights say so in one line."""
    eager_components, eager = prepare(FP16, tmp_path / "eager")
    lazy_components, lazy = prepare(FP16, tmp_path / "lazy", unet_weights=False)
    assert lazy.info.mode == "built"
    assert image_bytes(FP16, lazy_components, lazy) == image_bytes(FP16, eager_components, eager)
    components = models.load("tiny", unet_weights=False)
    components.unet_loader = None
    with pytest.raises(UserError, match="UNet weights were not loaded"):
        torch_backend.prepare(FP16, components, CPU, engine_dir=tmp_path / "none", progress=False)


def _unet_output(components, engines, variant):
    inputs = torch_backend.unet_inputs(variant, components.unet, CPU, torch.float32)
    with torch.inference_mode():
        return engines.unet(*inputs)


def _rel_err(out, ref):
    return ((out - ref).norm() / ref.norm()).item()


def test_channels_last_changes_how_it_runs_not_what_is_stored(tmp_path):
    plain_components, plain = prepare(FP16, tmp_path / "plain")
    tuned_components, tuned = prepare(FP16, tmp_path / "tuned", channels_last=True)
    assert tuned.info.channels_last is True
    assert tuned_components.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    ref, out = _unet_output(plain_components, plain, FP16), _unet_output(tuned_components, tuned, FP16)
    assert _rel_err(out, ref) < 1e-5
    stored = [Path(e.info.engine_path) / "unet.safetensors" for e in (plain, tuned)]
    assert stored[0].read_bytes() == stored[1].read_bytes()


def test_fused_qkv_engines_store_one_projection_per_attention_and_reload_fused(tmp_path):
    plain_components, plain = prepare(FP16, tmp_path / "engines")
    fused_variant = FP16.replace(fused_qkv=True)
    fused_components, fused = prepare(fused_variant, tmp_path / "engines")
    assert fused.info.engine_key != plain.info.engine_key and ".qkv." in fused.info.engine_key
    names = set(load_file(Path(fused.info.engine_path) / "unet.safetensors"))
    assert any(".to_qkv." in n for n in names) and any(".to_kv." in n for n in names)
    assert not any(n.endswith((".to_k.weight", ".to_v.weight")) for n in names)  # unfused ones are not stored
    processors = {type(m.processor).__name__ for m in fused_components.unet.modules() if hasattr(m, "processor")}
    assert processors == {"FusedAttnProcessor2_0"}
    # The same weights, one GEMM instead of three: FP16 numbers agree to float rounding.
    assert _rel_err(_unet_output(fused_components, fused, FP16), _unet_output(plain_components, plain, FP16)) < 1e-5
    reloaded_components, reloaded = prepare(fused_variant, tmp_path / "engines", allow_build=False, unet_weights=False)
    assert reloaded.info.mode == "loaded" and qmodules.has_fused_qkv(reloaded_components.unet)
    assert torch.equal(_unet_output(reloaded_components, reloaded, FP16), _unet_output(fused_components, fused, FP16))


def test_an_int8_engine_calibrates_its_fused_projections(built_int8, tmp_path):
    fused_variant = INT8.replace(fused_qkv=True)
    components, engines = prepare(fused_variant, tmp_path / "engines", tmp_path / "onnx")
    fused_8bit = {
        name
        for name, m in components.unet.named_modules()
        if isinstance(m, qmodules.Int8Linear) and name.endswith(("to_qkv", "to_kv"))
    }
    attentions = [m for m in components.unet.modules() if hasattr(m, "to_qkv") or hasattr(m, "to_kv")]
    assert len(fused_8bit) == len(attentions) > 0  # every fused projection is an 8-bit layer with its own scales
    reloaded_components, reloaded = prepare(fused_variant, tmp_path / "engines", allow_build=False, unet_weights=False)
    assert torch.equal(_unet_output(reloaded_components, reloaded, INT8), _unet_output(components, engines, INT8))
    fp16_components, fp16 = prepare(FP16, tmp_path / "fp16")
    unfused_components, unfused = prepare(INT8, *built_int8[:2], allow_build=False)
    # As close to FP16 as the unfused INT8 engine is: the same quantization noise (tiny's reactive weights
    # make it large, ~0.23), not a projection calibrated on the wrong inputs (see tests/unit/test_quantize.py).
    reference = _unet_output(fp16_components, fp16, INT8)
    noise = _rel_err(_unet_output(unfused_components, unfused, INT8), reference)
    assert _rel_err(_unet_output(components, engines, INT8), reference) < 1.2 * noise


def test_an_8bit_engine_runs_channels_last(built_int8, no_calibration, tmp_path):
    engine_dir, onnx_dir, _ = built_int8
    plain_components, plain = prepare(INT8, engine_dir, onnx_dir)
    tuned_components, tuned = prepare(INT8, engine_dir, onnx_dir, channels_last=True)
    assert tuned.info.mode == "loaded"
    # Layer by layer the 8-bit convs (all 3x3 in `tiny`) give the plain layout's numbers...
    pairs = [
        (a, b)
        for a, b in zip(plain_components.unet.modules(), tuned_components.unet.modules(), strict=True)
        if isinstance(a, qmodules.Int8Conv2d)
    ]
    assert len(pairs) == 38
    for plain_conv, tuned_conv in pairs:
        assert tuned_conv.weight.dtype == torch.int8
        assert tuned_conv.weight.is_contiguous(memory_format=torch.channels_last)
        x = torch.randn(2, plain_conv.in_channels, 8, 8, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            ref, out = plain_conv(x), tuned_conv(x.contiguous(memory_format=torch.channels_last))
        assert _rel_err(out, ref) < 1e-5
    # ...while end to end the reordered float sums flip a few activations to the next 8-bit step, which grows
    # to about the quantization noise (see tests/unit/test_quantize.py): bounded here by the real-vs-fake tolerance.
    assert _rel_err(_unet_output(tuned_components, tuned, INT8), _unet_output(plain_components, plain, INT8)) < 0.06


def test_an_8bit_reload_runs_the_kernels_its_build_measured(tmp_path, monkeypatch):
    from sdxl_core.quant import attention, geglu, geglu_act, gemm_dispatch, layernorm

    # On the CPU nothing is timed, so script what a GPU build's dispatch would measure: the pointer kernel
    # wins at GEMM shapes with N >= 64, the 16-bit path everywhere else, the attention kernel that quantizes
    # its output for `to_out` at self-attention shapes, the LayerNorm kernel after residual adds, and the GEGLU
    # kernel everywhere (not the GEGLU in the projection's GEMM).
    def scripted(fn, candidate, shape):
        fn()  # each candidate must run at the recorded shape
        if candidate == "16bit":
            return 1.5
        if candidate == attention.KERNEL:
            return 1.0 if shape[-1] == 0 else 3.0
        if candidate == layernorm.KERNEL:
            return 1.0 if shape[-1] == 1 else 3.0
        if candidate in (geglu_act.KERNEL, geglu_act.KERNEL_16BIT):
            return 1.0
        if candidate in geglu.FUSED_KERNELS:
            return 9.0  # the GEGLU in the projection's GEMM: slower, so the GEGLU modules run (and are timed)
        return 1.0 if candidate == "pointer" and len(shape) == 3 and shape[2] >= 64 else 2.0

    monkeypatch.setattr(torch_backend, "dispatches", lambda device: True)
    monkeypatch.setattr(gemm_dispatch, "time_candidate", scripted)
    # Scripted timings must neither come from nor land in the user's timing cache (they did: a changed script then
    # read the last run's numbers).
    monkeypatch.setenv("SDXL_BENCH_DISPATCH_CACHE", "0")
    built_components, built = prepare(INT8, tmp_path / "engines", tmp_path / "onnx")
    path = Path(built.info.engine_path)
    rows = json.loads((path / "gemm_dispatch.json").read_text())
    assert "gemm_dispatch.json" in store.read_sidecar(path)["files"]  # checksummed like the weights
    assert {"16bit", "pointer"} <= {row["choice"] for row in rows}
    assert sum(built.info.layers_by_kernel.values()) == sum(qmodules.module_counts(built_components.unet).values())
    full_plan = json.loads((path / "layer_plan.json").read_text())
    plan = full_plan["layers"]
    fused = full_plan["attention"]
    assert fused and all(name.endswith(".attn1") for name in fused)  # the self-attentions only, as scripted
    assert {row["choice"] for row in rows if row["op"] == "attention"} == {attention.KERNEL, attention.UNFUSED}
    norms = full_plan["norms"]
    assert norms and all(name.endswith((".norm2", ".norm3")) for name in norms)  # after residual adds, as scripted
    activations = full_plan["activations"]
    assert sum(r["layers"] for r in rows if r["op"] == "geglu_act") == len(activations) > 0  # all, as scripted

    components, loaded = prepare(INT8, tmp_path / "engines", allow_build=False, unet_weights=False)
    ran = {
        name: (m.gemm_path, m.kernel)
        for name, m in components.unet.named_modules()
        if isinstance(m, qmodules.QuantizedModule)
    }
    assert ran == {name: (spec["gemm"], spec["kernel"]) for name, spec in plan.items()}
    assert attention.fused_attentions(components.unet) == fused
    assert layernorm.fused_norms(components.unet) == norms
    assert geglu_act.fused_activations(components.unet) == activations
    assert {path for path, _ in ran.values()} == {"8bit", "16bit"}
    assert image_bytes(INT8, components, loaded) == image_bytes(INT8, built_components, built)


def test_an_fp16_engine_runs_our_kernels_where_its_build_measured_them_faster(tmp_path, monkeypatch):
    """An FP16 build times its attentions and LayerNorms as the 8-bit builds do, so a kernel that beats cuDNN's
    attention or Inductor's norm speeds up FP16 too and the speed gates stay like for like."""
    from sdxl_core.quant import attention, gemm_dispatch, layernorm

    def scripted(fn, candidate, shape):
        fn()
        if candidate == layernorm.KERNEL_16BIT:
            return 1.0 if shape[-1] == 0 else 3.0  # the norms without a residual add before them win
        return 1.0 if candidate == attention.KERNEL_16BIT and shape[-1] == 1 else 2.0  # cross-attention wins

    monkeypatch.setattr(torch_backend, "dispatches", lambda device: True)
    monkeypatch.setattr(gemm_dispatch, "time_candidate", scripted)
    monkeypatch.setenv("SDXL_BENCH_DISPATCH_CACHE", "0")
    built_components, built = prepare(FP16, tmp_path / "engines")
    path = Path(built.info.engine_path)
    rows = json.loads((path / "gemm_dispatch.json").read_text())
    assert {row["op"] for row in rows} == {"attention", "geglu_act", "layernorm"}
    assert {row["fmt"] for row in rows} == {"16bit"}
    assert {row["choice"] for row in rows if row["op"] == "geglu_act"} == {"unfused"}  # as scripted
    plan = json.loads((path / "layer_plan.json").read_text())
    fused, norms = plan["attention"], plan["norms"]
    assert fused and all(name.endswith(".attn2") for name in fused)
    assert norms and all(name.endswith(".norm1") for name in norms)
    components, loaded = prepare(FP16, tmp_path / "engines", allow_build=False, unet_weights=False)
    assert attention.fused_attentions(components.unet) == fused
    assert layernorm.fused_norms(components.unet) == norms
    assert image_bytes(FP16, components, loaded) == image_bytes(FP16, built_components, built)


def test_no_engine_lists_the_engines_present_and_how_they_differ(tmp_path):
    engine_dir = tmp_path / "engines"
    with pytest.raises(UserError, match="it holds no engine"):
        prepare(FP16, engine_dir, allow_build=False)
    _, fused = prepare(FP16.replace(fused_qkv=True), engine_dir)
    with pytest.raises(UserError) as refused:
        prepare(FP16, engine_dir, allow_build=False)  # the suite built it fused; txt2img asks without --fused-qkv
    message = str(refused.value)
    assert "building was not allowed" in message and "\n" not in message
    assert f"it holds {fused.info.engine_key} (differs in fused_qkv=True, this run: unset)" in message
