"""Suite-wide options, hardware probing and session fixtures.

Hardware is probed once: tests marked `gpu` skip where PyTorch sees no CUDA device, `h100` where
the card is not compute capability 9.0, `tensorrt` where the TensorRT builder is not importable.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing downloads at test time


def pytest_addoption(parser):
    group = parser.getgroup("sdxl-bench")
    group.addoption("--model", default=None, help="model for engine fixtures (default: tiny on CPU, "
                    "sdxl-random on GPU)")
    group.addoption("--backend", default="torch", help="torch or tensorrt")
    group.addoption("--engine-dir", default=None, help="engine dir shared by the session (default: a temp dir)")
    group.addoption("--onnx-dir", default=None, help="ONNX/calibration dir (default: a temp dir)")
    group.addoption("--variants", default=None, help="comma-separated variant names for engine fixtures")
    group.addoption("--update-baselines", action="store_true", help="regenerate stored FP16 baselines")
    group.addoption("--baseline-dir", default="baselines", help="root of the stored baselines")
    group.addoption("--min-int8-speedup", type=float, default=1.15, help="INT8 gate: median FP16 / median INT8")
    group.addoption("--min-fp8-speedup", type=float, default=1.15, help="FP8 gate: median FP16 / median FP8")


def _hardware() -> dict:
    import torch

    cuda = torch.cuda.is_available()
    capability = torch.cuda.get_device_capability() if cuda else None
    return {
        "cuda": cuda,
        "name": torch.cuda.get_device_name() if cuda else "cpu",
        "capability": capability,
        "tensorrt": importlib.util.find_spec("tensorrt") is not None,
    }


def pytest_collection_modifyitems(config, items):
    hw = _hardware()
    config.stash[HARDWARE] = hw
    reasons = {
        "gpu": None if hw["cuda"] else "needs a CUDA GPU (PyTorch sees none)",
        "h100": None if hw["capability"] == (9, 0) else f"needs an H100 (sm_90); this is {hw['name']}",
        "tensorrt": None if hw["tensorrt"] else "needs TensorRT (pip install 'sdxl-bench[trt]')",
    }
    for item in items:
        for marker, reason in reasons.items():
            if reason and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))
                break


HARDWARE = pytest.StashKey[dict]()


@pytest.fixture(scope="session")
def hardware(pytestconfig) -> dict:
    return pytestconfig.stash.get(HARDWARE, None) or _hardware()


@pytest.fixture(scope="session")
def tiny_components_factory():
    """Fresh tiny components (fp32, CPU). A factory: engines mutate what they are given."""
    from sdxl_core import models

    return lambda **kw: models.load("tiny", **kw)
