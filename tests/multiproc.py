"""Run a test body in several processes joined by a ``torch.distributed`` process group.

The ranks meet through a file store in the test's tmp dir (no ports to race for), use gloo on CPU
(NCCL on GPUs) and a collective timeout, and the parent gives up after ``timeout`` seconds, so a
hang fails the test instead of blocking CI. An exception in any rank fails the test with that
rank's traceback.

The worker function is passed to the ranks by file and name, not by pickled module path, so it
may live in a test module whatever pytest's import mode calls that module.
"""

from __future__ import annotations

import datetime
import gc
import importlib.util
import inspect
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT_S = 60


def _load(path: str, name: str) -> Callable:
    spec = importlib.util.spec_from_file_location(f"_worker_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


def _entry(rank: int, path: str, name: str, world_size: int, store: str, backend: str,
           args: tuple):
    fn = _load(path, name)
    torch.set_num_threads(1)  # two ranks on a small machine: no oversubscription
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        backend, init_method=f"file://{store}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    try:
        fn(rank, world_size, *args)
        dist.barrier()
    finally:
        # What the worker built (a DDP reducer, FSDP state) can sit in reference cycles that
        # outlive fn; freed after the process group, its gloo threads abort the process at
        # exit ("terminate called without an active exception", seen once on torch 2.11).
        gc.collect()
        dist.destroy_process_group()


def run_workers(
    fn: Callable[..., Any], world_size: int, tmp_path: Path, *args: Any,
    backend: str = "gloo", timeout: float = 240.0,
) -> None:
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes; ``fn`` must be
    a module-level function of a file (e.g. the calling test module)."""
    store = Path(tmp_path) / f"store-{time.monotonic_ns()}"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    context = mp.start_processes(
        _entry, args=(inspect.getfile(fn), fn.__name__, world_size, str(store), backend, args),
        nprocs=world_size,
        join=False, start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=1.0):  # raises if a rank failed
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{fn.__name__} did not finish within {timeout:.0f} s on {world_size} ranks"
                )
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
        for process in context.processes:
            process.join(timeout=10)
