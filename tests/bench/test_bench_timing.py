"""Timing helpers and the derived figures (GB/s, copy fraction, speed-ups)."""

import math

import pytest
import torch

from benchmarks import core, timing

CPU = torch.device("cpu")


def test_time_calls_warms_every_replica_then_times_within_bounds():
    calls_made = []
    calls = [lambda i=i: calls_made.append(i) for i in range(3)]
    options = timing.TimingOptions(warmup=2, min_reps=4, max_reps=6, target_seconds=10.0)
    result = timing.time_calls(calls, CPU, options)
    assert 4 <= result["repeats"] <= 6
    # Warm-up (at least one call per replica) and the estimate round precede the timed calls.
    timed = calls_made[-result["repeats"]:]
    assert timed == [i % 3 for i in range(result["repeats"])]
    assert set(calls_made[: len(calls_made) - result["repeats"]]) == {0, 1, 2}
    assert result["min_s"] <= result["median_s"] <= result["max_s"]
    assert result["replicas"] == 3 and result["timer"] == "perf_counter"


def test_time_calls_counts_probe_calls_as_warmup_and_respects_the_deadline():
    calls_made = []
    calls = [lambda i=i: calls_made.append(i) for i in range(2)]
    options = timing.TimingOptions(warmup=2, min_reps=3, max_reps=1000, target_seconds=100.0)
    deadline = timing.Deadline(0.0)  # spent: the minimum number of repeats still runs
    result = timing.time_calls(calls, CPU, options, deadline, calls_done=2, estimate_s=0.01)
    assert result["repeats"] == 3
    # Replica 1 had not run yet: it is warmed once; replica 0 ran twice already.
    assert calls_made[0] == 1 and len(calls_made) == 1 + 3
    assert result["warmup"] == 3


def test_time_calls_needs_a_call():
    with pytest.raises(ValueError, match="at least one callable"):
        timing.time_calls([], CPU, timing.TimingOptions())


def test_replicas_cover_the_cache_within_limits(monkeypatch):
    monkeypatch.setattr(timing, "cache_bytes", lambda device: 1000)
    assert timing.replicas_for(10_000, CPU) == 1
    assert timing.replicas_for(1000, CPU) == 3
    assert timing.replicas_for(1, CPU, max_replicas=5) == 5
    assert timing.replicas_for(100, CPU, free_bytes=250) == 2  # 1 + 0.75 * 250 // 100


def test_deadline():
    assert not timing.Deadline(None).expired()
    assert math.isinf(timing.Deadline(None).remaining())
    assert timing.Deadline(0.0).expired()
    assert timing.Deadline(100.0).remaining() > 99


def test_copy_bandwidth_reports_bytes_and_rate():
    result = timing.measure_copy_bandwidth(CPU, 4096, timing.TimingOptions(1, 2, 3, 0.001))
    assert result["bytes_per_call"] == 2 * 4096 * 4
    assert result["gbps"] == pytest.approx(result["bytes_per_call"] / result["median_s"] / 1e9)


def _row(variant, kind, setting, median, workload="w", dtype="fp32", status="ok"):
    return dict(variant=variant, kind=kind, setting=setting, median_s=median,
                workload=workload, dtype=dtype, status=status, min_bytes_per_call=1000)


def test_derive_figures_speedups_pair_same_setting_and_plain_adamw():
    rows = [
        _row("torch-adamw-fused", "baseline", "off", 2.0),
        _row("composition", "baseline", "fisher", 4.0),
        _row("composition", "baseline", "fisher+mask", 8.0),
        _row("fisherforget-x", "ours", "fisher", 1.0),
        _row("fisherforget-x", "ours", "fisher", 1.0, dtype="bf16"),  # no bf16 baselines
        _row("fisherforget-y", "ours", "fisher", None, status="skipped"),
    ]
    core.derive_figures(rows, copy_gbps=0.002, multi_setting=True)
    ours = rows[3]
    assert ours["speedup"] == {"torch-adamw-fused [off]": 2.0, "composition [fisher]": 4.0}
    assert ours["gbps"] == pytest.approx(1000 / 1.0 / 1e9)
    assert ours["copy_fraction"] == pytest.approx(ours["gbps"] / 0.002)
    assert rows[4]["speedup"] == {}
    assert "gbps" not in rows[5] and "speedup" not in rows[5]
    assert rows[1]["speedup"] == {"torch-adamw-fused [off]": 0.5}


def test_unique_nbytes_counts_shared_storage_once():
    base = torch.zeros(100)
    assert core.unique_nbytes([base, base[:10], base.view(10, 10)]) == 400
    assert core.unique_nbytes([base, torch.zeros(10, dtype=torch.bfloat16)]) == 420


class _FakeEvent:
    """Stands in for torch.cuda.Event so the CUDA timing branch runs without a GPU."""

    clock = 0.0

    def __init__(self, enable_timing=False):
        assert enable_timing
        self.at = None

    def record(self):
        _FakeEvent.clock += 1.0
        self.at = _FakeEvent.clock

    def elapsed_time(self, end):  # milliseconds, as CUDA events report
        return (end.at - self.at) * 1e3


def test_cuda_branch_times_with_events(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    calls = [lambda: None, lambda: None]
    options = timing.TimingOptions(warmup=1, min_reps=5, max_reps=5, target_seconds=1.0)
    result = timing.time_calls(calls, torch.device("cuda", 0), options, estimate_s=0.01,
                               calls_done=2)
    # Each call sits between two consecutive records: exactly one fake second.
    assert result["median_s"] == 1.0 and result["repeats"] == 5
    assert result["timer"] == "cuda events" and result["host_median_s"] >= 0


def test_memory_probe_reports_the_peak_above_the_start(monkeypatch):
    stats = {"allocated": 1000, "peak": 5000}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: stats["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: stats["peak"])
    with timing.MemoryProbe(torch.device("cuda", 0)) as probe:
        pass
    assert (probe.base, probe.peak, probe.extra) == (1000, 5000, 4000)
    with timing.MemoryProbe(CPU) as probe:
        pass
    assert probe.extra is None
