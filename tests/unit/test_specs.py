"""One component spec: both backends build exactly the components it names, with its shapes."""

import dataclasses

import torch

from sdxl_core import models, specs
from sdxl_core.engines import Engines, torch_backend
from sdxl_core.engines import tensorrt as trt_backend
from sdxl_core.variants import VARIANTS

TINY = VARIANTS["xl-1.0-fp16"].replace(model="tiny", height=64, width=64, steps=1)


def test_the_engines_bundle_has_one_stage_per_spec_component():
    stages = [f.name for f in dataclasses.fields(Engines) if f.name not in ("device", "dtype", "info")]
    assert stages == list(specs.COMPONENTS) == ["clip", "clip2", "unet", "vae"]


def test_the_torch_backend_runs_every_spec_component_at_the_spec_shapes():
    components = models.load("tiny")
    engines = torch_backend.prepare(TINY, components, torch.device("cpu"), progress=False)
    with torch.inference_mode():
        for name, spec in specs.SPECS.items():
            module = spec.module(components)
            outputs = getattr(engines, name)(*spec.sample_inputs(TINY, module))
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            shapes = spec.shapes(TINY, module.config)
            assert [tuple(o.shape) for o in outputs] == [shapes[o] for o in spec.outputs], name


def test_the_tensorrt_backend_bundles_one_engine_per_spec_component():
    """Each stage of the TensorRT bundle calls its own component's engine and hands back its graph outputs."""

    class FakeEngine:  # what TRTEngine returns: its output tensors in the spec's order
        def __init__(self, name):
            self.spec = specs.get(name)

        def __call__(self, *inputs):
            assert len(inputs) == len(self.spec.inputs)
            return tuple(f"{self.spec.name}:{output}" for output in self.spec.outputs)

    bundle = trt_backend._engines_bundle(
        {name: FakeEngine(name) for name in specs.COMPONENTS}, "cpu", torch.float16, {}
    )
    assert bundle.clip("ids") == "clip:hidden_states"
    assert bundle.clip2("ids") == ("clip2:hidden_states", "clip2:text_embeds")
    assert bundle.unet(*range(5)) == "unet:latent"
    assert bundle.vae("latents") == "vae:images"
