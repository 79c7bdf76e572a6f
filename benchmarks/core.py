"""The benchmark loop shared by the step, score and estimation benchmarks.

A benchmark (``step.py``, ``score.py``, ``estimate.py``) lists its variants and builds one
replica of inputs plus the call to time; this module runs every (workload, dtype, setting,
variant), measures time, memory and bytes, and records a row for each, also for the variants
that cannot run here (with the reason) and the ones that fail (with the error). Nothing a variant
does can stop the others.
"""

from __future__ import annotations

import math
import time
import traceback
import zlib
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol, Sequence

import torch
from torch import Tensor

from fisherforget import backends
from benchmarks import timing
from benchmarks.workloads import DtypeConfig, Workload

__all__ = [
    "Variant",
    "Built",
    "Benchmark",
    "backend_variant_status",
    "run_benchmark",
    "derive_figures",
    "unique_nbytes",
    "replica_generator",
]


@dataclass(frozen=True)
class Variant:
    """One implementation being timed: a baseline or one of ours on one backend."""

    name: str
    kind: str  # "baseline" | "ours"
    settings: tuple[str, ...]
    description: str
    backend: Optional[str] = None
    unavailable: Optional[str] = None  # why it cannot run here (None: it can)
    informative_only: bool = False  # timed last, after everything else (slow ground truth)


@dataclass
class Built:
    """One replica of a variant's inputs and the call to time."""

    call: Callable[[], object]
    inputs: list[Tensor]  # what the call reads and writes besides the persistent state
    state: Optional[Callable[[], dict[str, list[Tensor]]]] = None  # persistent buffers by role
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)  # actual dtypes, for min bytes

    def state_tensors(self) -> dict[str, list[Tensor]]:
        return self.state() if self.state is not None else {}

    def working_set(self) -> list[Tensor]:
        """Everything one call touches (after the first call created any lazy state)."""
        return list(self.inputs) + [t for ts in self.state_tensors().values() for t in ts]


class Benchmark(Protocol):
    name: str
    title: str
    settings: tuple[str, ...]
    baseline_note: str

    def variants(self, device: torch.device, allow_interpreter: bool,
                 op_variants: bool) -> list[Variant]: ...

    def build(self, variant: Variant, workload: Workload, dtypes: DtypeConfig, setting: str,
              device: torch.device, replica: int) -> Built: ...

    def min_bytes_per_element(self, built: Built, setting: str) -> float: ...

    def bytes_note(self) -> str: ...


def backend_variant_status(name: str, device: torch.device, allow_interpreter: bool
                           ) -> Optional[str]:
    """``None`` when backend ``name`` can be timed on ``device``, else why not."""
    if not backends.is_available(name):
        return f"backend {name!r} unavailable: {backends.unavailable_reason(name)}"
    if not backends.runs_on(name, device):
        return f"backend {name!r} cannot run on {device.type} tensors"
    if device.type == "cpu" and name == "triton" and not allow_interpreter:
        return (f"backend {name!r} runs on CPU tensors only in the Triton interpreter, a "
                "correctness tool; not timed (pass --allow-interpreter to time it anyway)")
    return None


def op_backend_variants(op: str, settings: Sequence[str], device: torch.device,
                        allow_interpreter: bool) -> list["Variant"]:
    """One ``fisherforget-<backend>`` variant of ``fisherforget.ops.<op>`` per backend, each
    marked with why it cannot be timed here (if so)."""
    return [
        Variant(
            f"fisherforget-{name}", "ours", settings,
            f"fisherforget.ops.{op}(backend={name!r})", backend=name,
            unavailable=backend_variant_status(name, device, allow_interpreter),
            informative_only=name == "reference" and device.type != "cpu",
        )
        for name in backends.BACKENDS
    ]


def unique_nbytes(tensors: Sequence[Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (shared buffers count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None:
            continue
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(seen.values())


def replica_generator(device: torch.device, workload: Workload, dtypes: DtypeConfig,
                      replica: int) -> torch.Generator:
    """The same random inputs for every variant of a (workload, dtype, replica)."""
    key = f"{workload.name}/{dtypes.name}".encode()
    seed = (zlib.crc32(key) & 0xFFFFF) * 1000 + replica
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _base_row(bench: Benchmark, workload: Workload, dtypes: DtypeConfig, setting: str,
              variant: Variant) -> dict:
    return {
        "benchmark": bench.name,
        "workload": workload.name,
        "dtype": dtypes.name,
        "setting": setting,
        "variant": variant.name,
        "kind": variant.kind,
        "backend": variant.backend,
        "description": variant.description,
        "num_elements": workload.num_elements,
        "num_tensors": workload.num_tensors,
        "status": None,
        "reason": None,
    }


def _measure_row(bench: Benchmark, variant: Variant, workload: Workload, dtypes: DtypeConfig,
                 setting: str, device: torch.device, options: timing.TimingOptions,
                 deadline: timing.Deadline, max_replicas: int) -> dict:
    out: dict = {}
    built = [bench.build(variant, workload, dtypes, setting, device, replica=0)]
    with timing.MemoryProbe(device) as first:  # first call: lazy state is created here
        built[0].call()
    with timing.MemoryProbe(device) as steady:
        started = time.perf_counter()
        built[0].call()
        timing.synchronize(device)
        estimate = time.perf_counter() - started
    numel = workload.num_elements
    state = built[0].state_tensors()
    if state:
        per_role = {role: unique_nbytes(ts) / numel for role, ts in state.items() if ts}
        out["state_bytes_per_param"] = sum(per_role.values())
        out["state_breakdown_bytes_per_param"] = per_role
    out["peak_allocated_bytes"] = first.peak
    out["step_workspace_bytes"] = steady.extra
    if first.peak is None:
        out["memory_note"] = "peak memory is measured on CUDA only (allocator statistics)"
    out["dtypes"] = {k: _dtype_name(v) for k, v in built[0].dtypes.items()}
    per_element = bench.min_bytes_per_element(built[0], setting)
    out["min_bytes_per_element"] = per_element
    out["min_bytes_per_call"] = int(round(per_element * numel))

    working_set = unique_nbytes(built[0].working_set())
    out["working_set_bytes"] = working_set
    replicas = timing.replicas_for(
        working_set, device, max_replicas=max_replicas,
        free_bytes=timing.free_device_bytes(device),
    )
    for r in range(1, replicas):
        built.append(bench.build(variant, workload, dtypes, setting, device, replica=r))
    out.update(timing.time_calls([b.call for b in built], device, options, deadline,
                                 calls_done=2, estimate_s=estimate))
    return out


def run_benchmark(
    bench: Benchmark,
    workloads: Sequence[Workload],
    dtype_configs: Sequence[DtypeConfig],
    settings: Sequence[str],
    device: torch.device,
    options: timing.TimingOptions,
    deadline: timing.Deadline,
    *,
    variant_filter: Optional[Callable[[Variant], bool]] = None,
    allow_interpreter: bool = False,
    op_variants: bool = False,
    max_replicas: int = 16,
    on_row: Optional[Callable[[dict], None]] = None,
) -> list[dict]:
    """Run every combination and return the rows (also passed to ``on_row`` as they finish).

    Ground-truth variants marked ``informative_only`` (the reference backend) run in a second
    pass, so that a time budget spent early costs them and not the kernels.
    """
    variants = bench.variants(device, allow_interpreter, op_variants)
    if variant_filter is not None:
        variants = [v for v in variants if variant_filter(v)]
    plan = []
    for informative_pass in (False, True):
        for workload in workloads:
            for dtypes in dtype_configs:
                for setting in settings:
                    for variant in variants:
                        if variant.informative_only != informative_pass:
                            continue
                        if setting in variant.settings:
                            plan.append((workload, dtypes, setting, variant))
    rows = []
    for workload, dtypes, setting, variant in plan:
        row = _base_row(bench, workload, dtypes, setting, variant)
        if variant.unavailable is not None:
            row.update(status="skipped", reason=variant.unavailable)
        elif deadline.remaining() < 1.0:
            row.update(status="skipped", reason="the run's time budget was spent before this")
        else:
            before = timing.allocated_bytes(device)
            try:
                row.update(_measure_row(bench, variant, workload, dtypes, setting, device,
                                        options, deadline, max_replicas))
                row["status"] = "ok"
            except Exception as exc:  # a failing variant is a result, not a crash
                row.update(status="failed", reason=f"{type(exc).__name__}: {exc}",
                           traceback=traceback.format_exc(limit=6))
            finally:
                timing.free_memory(device, before)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def derive_figures(rows: list[dict], copy_gbps: Optional[float],
                   multi_setting: bool) -> None:
    """Fill each measured row's GB/s, fraction of the copy bandwidth and speed-ups, in place.

    A row's speed-up over a baseline is ``baseline median / row median`` for every baseline of
    the same workload and dtype whose setting is the row's or ``"off"`` (plain AdamW), e.g.
    ours with the Fisher on against ``torch-adamw-fused [off]``: the price of the Fisher.
    """
    for row in rows:
        if row.get("status") != "ok":
            continue
        row["gbps"] = row["min_bytes_per_call"] / row["median_s"] / 1e9
        row["copy_fraction"] = row["gbps"] / copy_gbps if copy_gbps else None
    for row in rows:
        if row.get("status") != "ok":
            continue
        speedups = {}
        for base in rows:
            if base.get("status") != "ok" or base["kind"] != "baseline" or base is row:
                continue
            if (base["workload"], base["dtype"]) != (row["workload"], row["dtype"]):
                continue
            if base["setting"] not in (row["setting"], "off"):
                continue
            key = f"{base['variant']} [{base['setting']}]" if multi_setting else base["variant"]
            speedups[key] = base["median_s"] / row["median_s"]
        row["speedup"] = speedups
        for key, value in list(row.items()):
            if isinstance(value, float) and not math.isfinite(value):
                row[key] = None
