"""The one way every row of ``rptq bench`` is timed: our op and its baseline get the same warm-up, the same
repetitions and the same rotation through copies of their inputs.

A candidate is ``(fn, inputs)``; ``fn(*inputs)`` runs it once. ``inputs`` are the tensors the op streams
(weights, the KV cache): :func:`time_pair` makes enough copies of them that one pass over the copies overflows
the last-level cache (CPU) or L2 (GPU), and calls ``fn`` on the next copy each time, so every call reads from
DRAM/HBM as a model's decode step does (a lone 8 MB weight would sit in the cache). Compute-bound ops pass
``rotate=False``, which holds for both candidates alike. Ours and the baseline alternate, so background load and
clock drift hit both alike; each gets its median.

- CPU: each call is timed with ``perf_counter``.
- GPU: each candidate is captured in a CUDA graph as a run of calls over its copies (at least
  :data:`CALLS_PER_GRAPH`), and each replay is timed between CUDA events; a call's time is the replay's over
  the number of calls. The graph's capture runs every call once beforehand (kernel attributes, cuBLAS handles).
"""
from __future__ import annotations

import glob
import statistics
import time
from typing import Callable

import torch

Candidate = tuple[Callable[..., object], tuple[torch.Tensor, ...]]

#: calls (CPU) or graph replays (GPU) of each candidate before the timed repetitions
WARMUP = 2
#: calls captured in one CUDA graph: a replay of one call alone would be dominated by the launch
CALLS_PER_GRAPH = 20


def last_level_cache_bytes() -> int:
    """The largest CPU cache of cpu0, from sysfs (64 MiB when it cannot be read)."""
    try:
        sizes = []
        for index in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
            text = open(index).read().strip().upper()
            multiplier = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1], 1)
            sizes.append(int(text.rstrip("KMG")) * multiplier)
        return max(sizes) if sizes else 64 * 2**20
    except (OSError, ValueError):
        return 64 * 2**20


def l2_cache_bytes() -> int:
    """The L2 cache of the current GPU (50 MiB when the driver does not say)."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)


def rotation_bytes(device: str) -> int:
    """Bytes one pass over a candidate's copies must exceed: 2 last-level caches (256 MiB..1 GiB) on the CPU,
    3 L2 caches on a GPU."""
    if torch.device(device).type == "cuda":
        return 3 * l2_cache_bytes()
    return int(min(max(2 * last_level_cache_bytes(), 256 * 2**20), 1024 * 2**20))


def input_copies(inputs: tuple[torch.Tensor, ...], rotate: bool, device: str = "cpu") -> list[tuple]:
    """``inputs`` and enough clones of them to exceed :func:`rotation_bytes` (just ``inputs`` when not rotating)."""
    nbytes = sum(t.numel() * t.element_size() for t in inputs)
    n = max(1, -(-rotation_bytes(device) // nbytes)) if rotate and nbytes else 1
    return [inputs] + [tuple(t.clone() for t in inputs) for _ in range(n - 1)]


def time_pair(ours: Candidate, baseline: Candidate | None, repeats: int, *, rotate: bool = True,
              device: str = "cpu") -> tuple[float, float | None]:
    """Median ms per call of ``ours`` and ``baseline`` (None: ours alone), timed the same way (module doc)."""
    candidates = [ours] + ([baseline] if baseline is not None else [])
    calls = [[lambda fn=fn, args=args: fn(*args) for args in input_copies(inputs, rotate, device)]
             for fn, inputs in candidates]
    timer = _cuda_timer if torch.device(device).type == "cuda" else _cpu_timer
    medians = timer(calls, repeats)
    return medians[0], (medians[1] if baseline is not None else None)


def _cpu_timer(calls: list[list[Callable]], repeats: int) -> list[float]:
    for i in range(WARMUP):
        for candidate in calls:
            candidate[i % len(candidate)]()
    times: list[list[float]] = [[] for _ in calls]
    for i in range(WARMUP, WARMUP + repeats):
        for candidate, acc in zip(calls, times):
            start = time.perf_counter()
            candidate[i % len(candidate)]()
            acc.append(time.perf_counter() - start)
    return [statistics.median(acc) * 1e3 for acc in times]


def _cuda_graph(calls: list[Callable]) -> tuple[torch.cuda.CUDAGraph, int]:
    """A graph replaying ``calls`` in turn, max(CALLS_PER_GRAPH, len(calls)) calls long, and that length."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:  # outside the capture: kernel attributes, cuBLAS handles, allocations
            call()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    length = max(CALLS_PER_GRAPH, len(calls))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(length):
            calls[i % len(calls)]()
    torch.cuda.synchronize()
    return graph, length


def _cuda_timer(calls: list[list[Callable]], repeats: int) -> list[float]:
    graphs = [_cuda_graph(candidate) for candidate in calls]
    for _ in range(WARMUP):
        for graph, _length in graphs:
            graph.replay()
    times: list[list[float]] = [[] for _ in graphs]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(repeats):
        for (graph, length), acc in zip(graphs, times):
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            acc.append(start.elapsed_time(end) / length)
    return [statistics.median(acc) for acc in times]

