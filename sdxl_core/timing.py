"""How sdxl-bench times GPU work: one place, two timers.

- `graph_ms(fn)`: GPU time per call of a short piece of work (one GEMM, one conv), `iters` calls captured
  in one CUDA graph, as the engines run them, so Python and launch overhead do not count; the median of
  several replays. Used by the build-time GEMM/conv dispatch and the per-shape tables.
- `interleaved_ms(fns)`: median ms per call of several whole pieces of work (UNet steps of FP16 and 8-bit
  engines), run round by round in turn so that every candidate sees the same clocks and thermals. Used by
  the speed gate and the engines table. CUDA events on a GPU, perf_counter on the CPU.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def graph_ms(fn: Callable[[], object], iters: int = 30, replays: int = 7, warmup: int = 3) -> float:
    """Median GPU ms per call of `fn` over `replays` replays of a CUDA graph holding `iters` calls.

    The warm-up calls run first, outside the graph, so autotuners and lazy setup settle before capture.
    One replay alone was too noisy: two builds on one card disagreed by up to 40 % on a GEMM shape."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return statistics.median(times)


def interleaved_ms(
    fns: dict[str, Callable[[], object]], *, rounds: int = 10, iters: int = 5, warmup: int = 3, cuda: bool | None = None
) -> dict[str, list[float]]:
    """{name: [ms per call, one sample per round]}: each round runs every `fn` `iters` times in turn."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(_ms_per_call(fn, iters, cuda))
    return samples


def medians(samples: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in samples.items()}


def _ms_per_call(fn, iters: int, cuda: bool) -> float:
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / iters
    started = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - started) * 1000.0 / iters
