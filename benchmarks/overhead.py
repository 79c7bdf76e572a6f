"""The CPU step and host-overhead benchmark (``python -m benchmarks overhead``; part of ``--quick``).

Two tables, each measured side by side in one process with interleaved repeats (variant A, B, C,
A, B, C, ...) and reported as medians, so a noisy shared machine shifts every variant alike:

``cpu``
    ``FisherAdamW(backend="auto")`` with the Fisher off and with ``fisher="ema"`` against
    ``torch.optim.AdamW(fused=True)`` on CPU tensors, for one 2^22 fp32 tensor, 200 x (32, 32)
    and 2,000 x (1,) (all overhead), with 1 and 2 torch threads. The ratio is ours / torch.
``host``
    ``FisherAdamW.step()`` over 2,000 params of one element with each backend's device work
    skipped (``fisherforget.backends.host_only``), hot (one optimizer stepped repeatedly) and
    round robin (all of them in turn, each step starting with its metadata out of cache): the
    host cost of the optimizer (validation, plans, gathering) plus the backend's glue (buckets,
    staging, Triton's address tables). It runs on CPU tensors whatever the backend's device
    (nothing is launched), so it measures the host path a GPU step pays. The CUDA row includes
    the C++ binding's checks, dtype groups and launch tables (``dry_run_fused_step``, in builds
    for the tests). A whole ``torch.optim.AdamW(fused=True)`` step on the same params runs in
    the same rounds as a yardstick (its CPU kernel on one-element tensors is next to nothing
    beside its host work).
"""

from __future__ import annotations

import gc
import statistics
import time
from typing import Callable

import torch

from fisherforget import backends
from benchmarks import baselines
from fisherforget.optim import FisherAdamW

CPU_WORKLOADS = {
    "one 2^22 fp32 tensor": [(2**22,)],
    "200 x (32, 32)": [(32, 32)] * 200,
    "2,000 x (1,)": [(1,)] * 2000,
}
HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)


def _params(shapes, seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=gen))
        p.grad = torch.randn(shape, generator=gen) * 1e-3
        out.append(p)
    return out


def interleaved_medians(calls: dict[str, Callable[[], object]], repeats: int,
                        warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each entry, timed round-robin with Python's cyclic garbage
    collector paused (as ``timeit`` does: a collection that the allocations of earlier rows
    trigger would land in whichever call happens to run)."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    collecting = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
    finally:
        if collecting:
            gc.enable()
    return {name: statistics.median(ts) for name, ts in times.items()}


def cpu_rows(threads_list=(1, 2), repeats: int = 15) -> list[dict]:
    rows = []
    previous = torch.get_num_threads()
    try:
        for threads in threads_list:
            torch.set_num_threads(threads)
            for workload, shapes in CPU_WORKLOADS.items():
                reps = max(5, repeats // 3) if len(shapes) == 1 else repeats
                calls = {
                    "torch-adamw-fused": baselines.torch_adamw(
                        _params(shapes), impl="fused", **HYPER).step,
                    "fisherforget fisher=None": FisherAdamW(
                        _params(shapes), **HYPER, fisher=None).step,
                    "fisherforget fisher=ema": FisherAdamW(
                        _params(shapes), **HYPER, fisher="ema").step,
                }
                medians = interleaved_medians(calls, reps)
                torch_s = medians["torch-adamw-fused"]
                for variant, seconds in medians.items():
                    rows.append(dict(table="cpu", workload=workload, threads=threads,
                                     variant=variant, median_ms=seconds * 1e3,
                                     ratio=seconds / torch_s, repeats=reps,
                                     backend=_auto_backend()))
    finally:
        torch.set_num_threads(previous)
    return rows


def _auto_backend() -> str:
    return backends.resolve("auto", torch.device("cpu"), torch.float32)


def host_rows(n_params: int = 2000, repeats: int = 30) -> list[dict]:
    """Every backend's host cost per step, its optimizers stepped round-robin in one process,
    under ``fisherforget.backends.host_only`` (the launches skipped, CPU tensors accepted)."""
    rows, names = [], []
    for name in ("reference", "cpu", "triton", "cuda"):
        try:
            with backends.host_only(name):  # raises saying why a backend cannot do it here
                pass
        except Exception as exc:
            rows.append(dict(table="host", backend=name, status="skipped", reason=str(exc)))
            continue
        names.append(name)
    calls = {}
    with backends.host_only(*names):
        for name in names:
            for fisher in (None, "ema"):
                opt = FisherAdamW(_params([(1,)] * n_params), **HYPER, fisher=fisher,
                                  backend=name)
                for _ in range(2):  # the first step creates the state, the second the plan
                    opt.step()
                calls[(name, fisher)] = opt.step
        # A side-by-side yardstick in the same rounds: torch's own fused AdamW, a whole step (its
        # CPU kernel on one-element tensors costs next to nothing beside its host work).
        calls[("torch-adamw-fused", None)] = baselines.torch_adamw(
            _params([(1,)] * n_params), impl="fused", **HYPER).step
        # Hot: one optimizer stepped again and again, its tensors' metadata in cache. Round
        # robin: all of them in turn, so each step finds its metadata evicted by the others, as a
        # training step does after the forward and backward passes.
        hot = {key: interleaved_medians({key: call}, repeats)[key] for key, call in calls.items()}
        cold = interleaved_medians(calls, repeats)
    for (name, fisher), seconds in hot.items():
        rows.append(dict(table="host", backend=name, fisher=fisher, status="ok",
                         n_params=n_params, median_ms=seconds * 1e3,
                         round_robin_ms=cold[(name, fisher)] * 1e3, repeats=repeats))
    return rows


def markdown(rows: list[dict]) -> list[str]:
    lines = ["### CPU step vs torch.optim.AdamW(fused=True) (interleaved medians)", "",
             "| workload | threads | torch fused | ours fisher=None | ours fisher=ema |",
             "|---|---|---|---|---|"]
    cpu = [r for r in rows if r["table"] == "cpu"]
    for key in dict.fromkeys((r["workload"], r["threads"]) for r in cpu):
        members = {r["variant"]: r for r in cpu if (r["workload"], r["threads"]) == key}
        torch_row = members["torch-adamw-fused"]
        lines.append(
            f"| {key[0]} | {key[1]} | {torch_row['median_ms']:.3f} ms | "
            f"{members['fisherforget fisher=None']['ratio']:.2f}x | "
            f"{members['fisherforget fisher=ema']['ratio']:.2f}x |")
    if cpu:
        lines += ["", f"`auto` picks backend `{cpu[0]['backend']}` for CPU fp32 tensors."]
    lines += ["", "### Host overhead per step, device work skipped (backends.host_only; 2,000 "
              "params)", "",
              "Medians; *hot*: one optimizer stepped repeatedly; *round robin*: every optimizer "
              "below stepped in turn, so each step starts with its tensors' metadata out of "
              "cache (as after a forward and backward pass).", "",
              "| backend | fisher=None hot | round robin | fisher=ema hot | round robin |",
              "|---|---|---|---|---|"]
    host = [r for r in rows if r["table"] == "host"]
    for name in dict.fromkeys(r["backend"] for r in host):
        members = [r for r in host if r["backend"] == name]
        if members[0]["status"] != "ok":
            lines.append(f"| {name} | skipped: {members[0]['reason'][:60]} | | | |")
            continue
        by = {r["fisher"]: r for r in members}
        if "ema" not in by:  # the yardstick: torch's fused AdamW has no Fisher
            lines.append(f"| {name} (whole step) | {by[None]['median_ms']:.2f} ms | "
                         f"{by[None]['round_robin_ms']:.2f} ms | - | - |")
            continue
        lines.append(f"| {name} | {by[None]['median_ms']:.2f} ms | "
                     f"{by[None]['round_robin_ms']:.2f} ms | {by['ema']['median_ms']:.2f} ms | "
                     f"{by['ema']['round_robin_ms']:.2f} ms |")
    return lines


def run(quick: bool = True) -> dict:
    rows = cpu_rows(repeats=9 if quick else 25) + host_rows(repeats=60 if quick else 200)
    return dict(benchmark="overhead", rows=rows, markdown=markdown(rows))
