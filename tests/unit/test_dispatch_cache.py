"""Per-shape kernel timings are reused across engine builds on the same GPU and software, never across others;
every candidate's result is still checked on every build; a damaged cache file costs one warning and a re-time."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from sdxl_core.quant import dispatch_cache, gemm_dispatch, qmodules

ENVIRONMENT = {"gpu": "NVIDIA H200 sm90", "torch": "2.11.0", "cuda": "13.0", "triton": "3.6.0", "cutlass": "4.2"}


def tiny_model() -> torch.nn.Module:
    """Two INT8 linears of different shapes (two dispatch shapes)."""
    torch.manual_seed(0)
    layers = []
    for k, n in ((32, 16), (16, 48)):
        linear = torch.nn.Linear(k, n)
        amax = linear.weight.abs().amax(dim=1)
        layers.append(qmodules.Int8Linear.from_float(linear, w_amax=amax, a_amax=torch.tensor(4.0)))
    return torch.nn.Sequential(*layers).eval()


class FakeTimer:
    """Stands in for the GPU timer: counts its calls; the 8-bit candidate is faster."""

    def __init__(self):
        self.calls = []

    def __call__(self, fn, candidate, shape):
        self.calls.append((candidate, shape))
        return 0.5 if candidate == "k8" else 1.0


@pytest.fixture
def dispatch(tmp_path, monkeypatch):
    """`choose` on the tiny model with its default (cached) timer replaced by a fake one, a fake 8-bit candidate
    `k8` that computes right (or wrong, once `wrong` holds True), and the environment `env` (edit it to move to
    another GPU or software); returns (run, timer, env, wrong, the cache file)."""
    monkeypatch.setenv("SDXL_BENCH_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SDXL_BENCH_DISPATCH_CACHE", raising=False)
    env = dict(ENVIRONMENT)
    monkeypatch.setattr(dispatch_cache, "environment", lambda device: dict(env))
    timer, wrong, right = FakeTimer(), [False], gemm_dispatch.candidates
    monkeypatch.setattr(gemm_dispatch, "time_candidate", timer)

    def with_k8(layer, op, shape, dtype, *, channels_last=False):
        calls, x = right(layer, op, shape, dtype, channels_last=channels_last)
        m, k, n = shape

        def k8():
            if wrong[0]:
                return torch.zeros(m, n, dtype=torch.float64)
            xq = qmodules.fake_quantize(x.float(), layer.a_scale, layer.FMT).double()
            return F.linear(xq, layer.float_weight(torch.float64).reshape(n, k), layer.bias.double())

        return {name: fn for name, fn in calls.items() if name == gemm_dispatch.SIXTEEN_BIT} | {"k8": k8}, x

    monkeypatch.setattr(gemm_dispatch, "candidates", with_k8)

    def run():  # a new engine build each time: a model whose layers run their default kernel
        model = tiny_model()
        return gemm_dispatch.choose(model, lambda: model(torch.randn(4, 32)))

    return run, timer, env, wrong, tmp_path / "cache" / dispatch_cache.FILE_NAME


def test_a_second_build_on_the_same_shapes_times_nothing(dispatch):
    run, timer, _, _, path = dispatch
    first = run()
    assert len(timer.calls) == 4 and all(t.cached == () for t in first)  # 2 shapes x (16bit, k8)
    second = run()
    assert len(timer.calls) == 4, "timed again what the cache holds"
    assert [t.choice for t in second] == [t.choice for t in first] == ["k8", "k8"]
    assert [t.row()["cached"] for t in second] == [["16bit", "k8"]] * 2
    assert [t.ms for t in second] == [t.ms for t in first]
    assert path.is_file() and json.loads(path.read_text())["format"] == dispatch_cache.FORMAT


def test_a_cached_candidate_is_still_checked_every_build(dispatch):
    run, timer, _, wrong, _ = dispatch
    run()
    wrong[0] = True
    second = run()
    assert all("k8" in t.rejected and "k8" not in t.ms for t in second)
    assert [t.choice for t in second] == ["16bit", "16bit"]


# ids not named like the suite's hardware markers ("gpu" would skip the test on a CPU machine)
@pytest.mark.parametrize("change", ["gpu", "torch", "cuda", "triton", "cutlass", "kernels"], ids="another {}".format)
def test_another_gpu_or_software_times_again(change, dispatch):
    run, timer, env, _, _ = dispatch
    run()
    env[change] = "another"
    again = run()
    assert len(timer.calls) == 8 and all(t.cached == () for t in again)
    run()
    assert len(timer.calls) == 8  # both environments are kept


def test_a_corrupted_cache_is_one_warning_a_retime_and_a_rewrite(dispatch, capsys):
    run, timer, _, _, path = dispatch
    run()
    for damaged in ('{"format": 1, "environments": {"x": {"environment": {}, "ms": {"a": "fast"}}}}', "{not json"):
        path.write_text(damaged)
        calls = len(timer.calls)
        capsys.readouterr()
        assert all(t.cached == () for t in run())
        assert len(timer.calls) == calls + 4
        warnings = [line for line in capsys.readouterr().err.splitlines() if "timing cache" in line]
        assert len(warnings) == 1 and str(path) in warnings[0]
        assert json.loads(path.read_text())["format"] == dispatch_cache.FORMAT  # rewritten
        run()
        assert len(timer.calls) == calls + 4


def test_the_setting_turns_it_off(dispatch, monkeypatch):
    run, timer, _, _, path = dispatch
    monkeypatch.setenv("SDXL_BENCH_DISPATCH_CACHE", "0")
    run()
    run()
    assert len(timer.calls) == 8 and not path.exists()


def test_a_timer_of_the_callers_own_is_not_cached(dispatch):
    run, timer, _, _, path = dispatch
    model = tiny_model()
    own = FakeTimer()
    gemm_dispatch.choose(model, lambda: model(torch.randn(4, 32)), timer=own)
    assert len(own.calls) == 4 and not path.exists()


def test_a_cache_file_of_another_user_or_a_link_is_not_read(dispatch, tmp_path, capsys):
    run, timer, _, _, path = dispatch
    run()
    elsewhere = tmp_path / "planted.json"
    os.replace(path, elsewhere)
    path.symlink_to(elsewhere)
    capsys.readouterr()
    run()
    assert len(timer.calls) == 8 and "timing cache" in capsys.readouterr().err
    assert not path.is_symlink()  # replaced by a file of our own


def test_the_environment_names_the_gpu_and_the_software():
    env = dispatch_cache.environment(torch.device("cpu"))
    assert {"gpu", "torch", "cuda", "triton", "cutlass", "autotune", "kernels"} == set(env)
    assert env["torch"] == torch.__version__ and all(isinstance(v, str) for v in env.values())
