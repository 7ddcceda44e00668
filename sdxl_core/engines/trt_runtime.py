"""The TensorRT runtime side: importing TensorRT, its version and logger, one deserialized engine (`TRTEngine`)
with I/O torch tensors allocated once, run on torch's stream, and `load_plan` for one plan file of a store entry.

Importing this module needs no TensorRT; `_import_tensorrt` without it raises a UserError naming the fix.
TensorRT API differences are handled by capability (`hasattr` on the object), never by version strings;
tests/unit/test_trt_api.py checks this module together with the rest of the backend (see `tensorrt.py`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdxl_core.engines import store
from sdxl_core.errors import UserError

NAME = "tensorrt"
MISSING = "--backend tensorrt needs TensorRT: pip install 'sdxl-bench[trt]' (see README)"
MEMORY_ALIGNMENT = 256  # TensorRT's required alignment for context device memory

# TensorRT DataType member names -> torch dtypes (by name, so this table needs no TensorRT import).
TORCH_DTYPES = {
    "FLOAT": torch.float32,
    "HALF": torch.float16,
    "BF16": torch.bfloat16,
    "INT8": torch.int8,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "BOOL": torch.bool,
    "UINT8": torch.uint8,
    "FP8": torch.float8_e4m3fn,
}


# --------------------------------------------------------------------------- TensorRT import and version


def _import_tensorrt():
    try:
        import tensorrt
    except Exception:  # not installed, a registry stub, or its CUDA libraries missing
        raise UserError(MISSING) from None
    if not hasattr(tensorrt, "Builder"):
        raise UserError(MISSING)
    if not hasattr(tensorrt, "ExecutionContextAllocationStrategy"):  # added in 10.0
        raise UserError(
            f"TensorRT {tensorrt.__version__} is too old for --backend tensorrt: it needs TensorRT "
            ">= 10.0 (user-managed context memory)"
        )
    return tensorrt


def version() -> str:
    try:
        import tensorrt

        return str(tensorrt.__version__)
    except Exception:
        return "not-installed"


def shared_memory_bytes(sizes) -> int:
    """One pool for every context: the largest requirement, rounded up to TensorRT's alignment."""
    size = max([0, *sizes])
    return -(-size // MEMORY_ALIGNMENT) * MEMORY_ALIGNMENT


def _logger(trt):
    global _LOGGER
    if _LOGGER is None:
        _LOGGER = trt.Logger(trt.Logger.WARNING)
    return _LOGGER


_LOGGER = None


# --------------------------------------------------------------------------- runtime (needs TensorRT + CUDA)


class TRTEngine:
    """One deserialized engine with I/O torch tensors allocated once and a context without own memory."""

    def __init__(self, plan: bytes, device: torch.device, label: str):
        trt = _import_tensorrt()
        self.label, self.device = label, device
        self.runtime = trt.Runtime(_logger(trt))
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise store.EngineRefused(
                f"engine {label}: TensorRT {version()} cannot deserialize it; delete it to rebuild"
            )
        self.context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if hasattr(self.engine, "device_memory_size_v2"):  # TensorRT >= 10.1; 11 has only this one
            self.device_memory_size = int(self.engine.device_memory_size_v2)
        else:
            self.device_memory_size = int(self.engine.device_memory_size)
        self.inputs, self.outputs, self.tensors, self.io = [], [], {}, {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            shape = tuple(self.engine.get_tensor_shape(name))
            dtype = TORCH_DTYPES[self.engine.get_tensor_dtype(name).name]
            is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            if is_input:
                self.context.set_input_shape(name, shape)
            (self.inputs if is_input else self.outputs).append(name)
            self.tensors[name] = torch.zeros(shape, dtype=dtype, device=device)
            self.context.set_tensor_address(name, self.tensors[name].data_ptr())
            self.io[name] = {"shape": list(shape), "dtype": str(dtype).removeprefix("torch.")}
        self.memory: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.side_stream = torch.cuda.Stream(device)  # for callers on the legacy default stream

    def use_memory(self, pool: torch.Tensor) -> None:
        """Point the context at a shared pool (kept alive here) that is at least `device_memory_size`."""
        self.memory = pool
        if hasattr(self.context, "set_device_memory"):  # TensorRT >= 10.1: (pointer, size)
            self.context.set_device_memory(pool.data_ptr(), pool.numel())
        else:  # TensorRT 10.0: the pointer alone
            self.context.device_memory = pool.data_ptr()

    def _enqueue(self, stream: torch.cuda.Stream) -> None:
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT engine {self.label} failed to enqueue")

    def capture_graph(self) -> None:
        """Run once (TensorRT finishes lazy setup on the first enqueue), then capture one enqueue."""
        self.run()
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # captures on a side stream that torch makes current
            self._enqueue(torch.cuda.current_stream(self.device))
        self.graph = graph

    def run(self) -> None:
        """Enqueue on the caller's current stream. TensorRT adds synchronizations when handed the legacy
        default stream, so then it runs on a side stream ordered after and before the caller's work."""
        current = torch.cuda.current_stream(self.device)
        if self.graph is not None:
            self.graph.replay()
        elif current.cuda_stream != 0:
            self._enqueue(current)
        else:
            self.side_stream.wait_stream(current)
            self._enqueue(self.side_stream)
            current.wait_stream(self.side_stream)

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Copy inputs into the bound buffers (converting dtype), run. Outputs are the bound buffers:
        valid until the next call (the pipeline consumes them at once)."""
        for name, value in zip(self.inputs, inputs, strict=True):
            buffer = self.tensors[name]
            buffer.copy_(value.reshape(buffer.shape), non_blocking=True)
        self.run()
        return tuple(self.tensors[n] for n in self.outputs)


def load_plan(path: str | Path, device: torch.device) -> TRTEngine:
    """Deserialize one plan file of a store entry (no expectations): listed, trusted, hashed as read."""
    path = Path(path)
    found = store.verify(path.parent.parent, path.parent.name, {}, required=(path.name,), checksums=False)
    if found is None:
        raise UserError(f"no engine at {path.parent}")
    return TRTEngine(found.read(path.name), torch.device(device), path.parent.name)
