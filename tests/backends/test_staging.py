"""Tests of fisherforget/backends/staging.py: the one rule every backend follows for the step's
scalar tensors (a tensor ``lr``, ``grad_scale``, ``found_inf``), and contiguous stand-ins.

* a scalar already where the kernels read it is used as is (no copy); elsewhere it is copied once
  per call, its dtype kept unless the kernels read a fixed one;
* under CUDA-graph capture a scalar on another device (the CPU, another GPU) is refused by name
  before any copy is attempted (the capture is simulated: no GPU is needed);
* every backend gives the same bits for ``grad_scale``/``found_inf`` passed as 0-dim float32
  tensors or as one-element float64 tensors of shape ``(1,)``.
"""

from __future__ import annotations

import pytest
import torch

from fisherforget.backends.staging import ScalarOnDevice, scalar_on
from step_cases import (ALL_BACKENDS, CASES_BY_NAME, clone, emulated_cuda, make_grads,
                        make_hyper, make_inputs, replace_case, skip_unless_available, tensors)
from fisherforget import ops

CPU = torch.device("cpu")


def test_a_scalar_already_there_is_used_as_is():
    value = torch.tensor(0.5)
    assert scalar_on(value, CPU, "lr") is value
    assert scalar_on(None, CPU, "lr") is None
    one = torch.tensor([2.0])
    out = scalar_on(one, CPU, "grad_scale")
    assert out.shape == () and out.data_ptr() == one.data_ptr()


def test_a_scalar_of_another_dtype_is_converted_only_when_asked():
    value = torch.tensor([0.25], dtype=torch.float64)
    kept = scalar_on(value, CPU, "lr")
    assert kept.dtype == torch.float64 and kept.shape == ()
    converted = scalar_on(value, CPU, "grad_scale", torch.float32)
    assert converted.dtype == torch.float32 and float(converted) == 0.25
    # The value is read once per call: a per-call cache serves every bucket on a device.
    on_device = ScalarOnDevice(value, "grad_scale")
    assert on_device.on(CPU, torch.float32) is on_device.on(CPU, torch.float32)


@pytest.mark.parametrize("name", ["lr", "grad_scale", "found_inf"])
@pytest.mark.parametrize("where", ["cpu", "cuda:1"])
def test_under_capture_a_scalar_on_another_device_is_refused_by_name(monkeypatch, name, where):
    """A graph cannot capture a copy from pageable CPU memory, nor one that waits on another
    GPU's stream, and would replay the value seen at capture: say what to pass instead."""
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    value = torch.empty((), device="meta") if where != "cpu" else torch.tensor(0.1)
    if where != "cpu":  # a device tensor without a GPU: only its .device is read
        value = _on_fake_device(value, where)
    with pytest.raises(RuntimeError, match=rf"^{name} is a tensor on {where}, but a CUDA graph "
                                           rf"is being captured on cuda:0: pass it as a "
                                           rf"one-element tensor on cuda:0"):
        scalar_on(value, torch.device("cuda:0"), name)
    # Not capturing: no complaint (the copy itself needs a GPU, so only the CPU is tried).
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert float(scalar_on(torch.tensor(0.1), CPU, name)) == pytest.approx(0.1)


def _on_fake_device(value: torch.Tensor, device: str):
    class OnDevice(torch.Tensor):
        @property
        def device(self):
            return torch.device(device)

    return value.as_subclass(OnDevice)


@pytest.mark.parametrize("backend", [pytest.param(b, marks=skip_unless_available(b))
                                     for b in ALL_BACKENDS])
def test_every_backend_reads_one_element_float64_scalars_as_0dim_float32(backend):
    case = replace_case(CASES_BY_NAME["found_inf_zero-small"], grad_scale=8.0,
                        lr_dtype=torch.float32)
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    data, gen = make_inputs(case, device)
    grads = make_grads(case, gen, device)
    results = []
    for dtype, shape in ((torch.float32, ()), (torch.float64, (1,))):
        run = clone(data)
        scale = torch.full(shape, 8.0, dtype=dtype, device=device)
        found_inf = torch.zeros(shape, dtype=dtype, device=device)
        with emulated_cuda(backend, run["params"]):
            ops.fused_step(tensors(run, grads), make_hyper(case, device), grad_scale=scale,
                           found_inf=found_inf, backend=backend)
        results.append(run)
    first, second = results
    for name, values in first.items():
        for i, (a, b) in enumerate(zip(values, second[name])):
            if a is not None:
                assert torch.equal(a, b), f"{backend}: {name}[{i}] differs"
