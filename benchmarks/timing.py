"""Timing: per-call times over rotating inputs, the copy bandwidth, memory, a run deadline.

On CUDA every call is bracketed by CUDA events recorded back to back on the stream (no host
synchronisation between calls), so a call's time is its device time plus any gap while the host
was still issuing it: launch- and Python-bound steps are charged for that, as a user would be.
The host time to issue a call is recorded beside it. On the CPU, ``time.perf_counter`` around each
call (CPU ops run synchronously).

Rotating inputs: when one set of inputs (params, grads, state) fits a few times in the last-level
cache, the caller builds several independent replicas and the calls cycle through them, so no call
finds its inputs in a cache that a previous call warmed.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from benchmarks.environment import cache_bytes

__all__ = [
    "Deadline",
    "TimingOptions",
    "time_calls",
    "replicas_for",
    "measure_copy_bandwidth",
    "synchronize",
    "free_memory",
    "MemoryProbe",
]


class Deadline:
    """Wall-clock budget for a whole benchmark run (``None`` = unlimited)."""

    def __init__(self, seconds: Optional[float]):
        self.start = time.monotonic()
        self.seconds = seconds

    def remaining(self) -> float:
        if self.seconds is None:
            return math.inf
        return self.seconds - (time.monotonic() - self.start)

    def expired(self) -> bool:
        return self.remaining() <= 0

    def elapsed(self) -> float:
        return time.monotonic() - self.start


@dataclass
class TimingOptions:
    warmup: int = 3  # calls before timing (at least one per replica: lazy state init is untimed)
    min_reps: int = 5
    max_reps: int = 200
    target_seconds: float = 1.0  # timed calls per variant aim at about this much time

    def to_json(self) -> dict:
        return dict(
            warmup=self.warmup, min_reps=self.min_reps, max_reps=self.max_reps,
            target_seconds=self.target_seconds,
        )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def allocated_bytes(device: torch.device) -> Optional[int]:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return None


def free_memory(device: torch.device, expected_bytes: Optional[int] = None) -> None:
    """Return the device memory of dropped inputs before the next variant builds its own.

    Reference counting frees almost everything; a full ``gc.collect()`` (slow with large
    libraries loaded) runs only when more than ``expected_bytes`` is still allocated.
    """
    if device.type != "cuda":
        return
    torch.cuda.synchronize(device)
    if expected_bytes is None or torch.cuda.memory_allocated(device) > expected_bytes + 2**20:
        gc.collect()
    torch.cuda.empty_cache()


def _summary(times: Sequence[float]) -> dict:
    ordered = sorted(times)
    n = len(ordered)

    def quantile(q: float) -> float:
        return ordered[min(n - 1, max(0, round(q * (n - 1))))]

    return {
        "median_s": statistics.median(ordered),
        "mean_s": statistics.fmean(ordered),
        "min_s": ordered[0],
        "max_s": ordered[-1],
        "p20_s": quantile(0.2),
        "p80_s": quantile(0.8),
        "repeats": n,
    }


def time_calls(
    calls: Sequence[Callable[[], object]],
    device: torch.device,
    options: TimingOptions,
    deadline: Optional[Deadline] = None,
    *,
    calls_done: int = 0,
    estimate_s: Optional[float] = None,
) -> dict:
    """Time ``calls[i % len(calls)]()`` for ``i = 0, 1, ...`` after a warm-up.

    ``calls_done`` calls of ``calls[0]`` already ran (they count towards the warm-up) and
    ``estimate_s`` is one call's time if already known. Every replica runs at least once before
    timing (lazy state is created untimed). The number of timed calls aims at
    ``options.target_seconds`` in total, within ``[min_reps, max_reps]``, and is cut (to
    ``min_reps`` at the least) to fit ``deadline``. Returns median/mean/min/max/p20/p80 seconds
    per call, the repeat count, and on CUDA the median host time to issue one call.
    """
    if not calls:
        raise ValueError("time_calls needs at least one callable")
    replicas = len(calls)
    warmup = max(options.warmup - calls_done, replicas - (1 if calls_done else 0), 0)
    start_index = 1 if calls_done else 0
    for i in range(warmup):
        calls[(start_index + i) % replicas]()
    if estimate_s is None:
        # One more round over the replicas, synchronised, estimates a call's time.
        synchronize(device)
        start = time.perf_counter()
        for call in calls:
            call()
        synchronize(device)
        estimate_s = (time.perf_counter() - start) / replicas
        warmup += replicas
    estimate = max(estimate_s, 1e-7)
    reps = int(options.target_seconds / estimate)
    if deadline is not None and math.isfinite(deadline.remaining()):
        reps = min(reps, int(0.8 * max(deadline.remaining(), 0.0) / estimate))
    reps = max(options.min_reps, min(options.max_reps, reps))

    host_times: list[float] = []
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            call = calls[i % replicas]
            t0 = time.perf_counter()
            starts[i].record()
            call()
            ends[i].record()
            host_times.append(time.perf_counter() - t0)
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]
    else:
        times = []
        for i in range(reps):
            call = calls[i % replicas]
            synchronize(device)
            t0 = time.perf_counter()
            call()
            synchronize(device)
            times.append(time.perf_counter() - t0)
    result = _summary(times)
    result["warmup"] = warmup + calls_done
    result["replicas"] = replicas
    result["timer"] = "cuda events" if device.type == "cuda" else "perf_counter"
    if host_times:
        result["host_median_s"] = statistics.median(host_times)
    return result


def replicas_for(
    working_set_bytes: int, device: torch.device, max_replicas: int = 16,
    free_bytes: Optional[int] = None,
) -> int:
    """How many independent input sets make consecutive calls miss the last-level cache:
    enough to cover three times the cache, at most ``max_replicas`` and what memory allows."""
    if working_set_bytes <= 0:
        return 1
    wanted = math.ceil(3 * cache_bytes(device) / working_set_bytes)
    wanted = max(1, min(max_replicas, wanted))
    if free_bytes is not None:
        # Leave a quarter of the free memory to the step's own temporaries.
        fits = 1 + int(0.75 * free_bytes // working_set_bytes)
        wanted = max(1, min(wanted, fits))
    return wanted


def free_device_bytes(device: torch.device) -> Optional[int]:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return None


def measure_copy_bandwidth(
    device: torch.device, numel: int, options: TimingOptions,
    deadline: Optional[Deadline] = None,
) -> dict:
    """Device-to-device copy ``dst.copy_(src)`` of ``numel`` fp32 elements: 8 bytes moved per
    element (one read, one write). The ceiling a memory-bound kernel is measured against."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    replicas = replicas_for(2 * src.nbytes, device, max_replicas=8)
    pairs = [(src, dst)] + [
        (torch.randn(numel, device=device), torch.empty_like(src)) for _ in range(replicas - 1)
    ]
    calls = [lambda s=s, d=d: d.copy_(s) for s, d in pairs]
    stats = time_calls(calls, device, options, deadline)
    moved = 2 * numel * src.element_size()
    del pairs, calls, src, dst
    free_memory(device)
    return {
        "numel": numel,
        "dtype": "float32",
        "bytes_per_call": moved,
        **stats,
        "gbps": moved / stats["median_s"] / 1e9,
    }


class MemoryProbe:
    """Peak allocator memory of a code block on CUDA (``None`` elsewhere: no allocator stats)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.enabled = device.type == "cuda"
        self.base: Optional[int] = None
        self.peak: Optional[int] = None

    def __enter__(self) -> "MemoryProbe":
        if self.enabled:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)

    @property
    def extra(self) -> Optional[int]:
        """Bytes allocated above what was live when the block started, at the block's peak."""
        if self.peak is None or self.base is None:
            return None
        return self.peak - self.base
