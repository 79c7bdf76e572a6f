"""Tests of the backend registry (fisherforget/backends/__init__.py) beyond what each backend's
own tests cover: ``host_only``, the seam the host-overhead benchmark measures through.

Under ``host_only(name)`` a step on backend ``name`` runs on CPU tensors whatever the backend's
device, does its host work (the CUDA binding's checks among it) and writes nothing; outside the
block every backend behaves as before.
"""

from __future__ import annotations

import pytest
import torch

from fisherforget import FisherAdamW, _native, backends
from fisherforget.backends.cuda import ops as cuda_glue
from step_cases import CUDA_EMULATION


def _host_only_error(name: str):
    try:
        with backends.host_only(name):
            return None
    except RuntimeError as exc:
        return str(exc)


def _params(n=5):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, generator=gen)) for _ in range(n)]
    for p in params:
        p.grad = torch.randn(3, generator=gen)
    return params


@pytest.mark.parametrize("name", backends.BACKENDS)
@pytest.mark.parametrize("fisher", [None, "ema"])
def test_host_only_steps_write_nothing(name, fisher):
    error = _host_only_error(name)
    if error is not None:
        pytest.skip(error)
    params = _params()
    before = [p.detach().clone() for p in params]
    with backends.host_only(name):
        opt = FisherAdamW(params, lr=0.1, fisher=fisher, backend=name)
        for _ in range(3):
            opt.step()
    for p, b in zip(params, before):
        assert torch.equal(p, b)
    for p in params:
        state = opt.state[p]
        assert float(state["step"]) == 0.0  # the counters are written by the device work
        assert torch.count_nonzero(state["exp_avg"]) == 0
    # Outside the block the same optimizer steps for real on the backends that run here.
    if backends.is_available(name) and backends.runs_on(name, torch.device("cpu")):
        opt.step()
        assert not torch.equal(params[0], before[0])


def test_host_only_is_scoped_and_grants_the_device():
    cpu = torch.device("cpu")
    if _host_only_error("cuda") is not None:
        pytest.skip(_host_only_error("cuda"))
    with backends.host_only("cuda"):
        assert backends.is_host_only("cuda") and not backends.is_host_only("triton")
        assert backends.resolve("cuda", cpu, torch.float32) == "cuda"
        assert cuda_glue.supports_device(cpu)
    assert not backends.is_host_only("cuda")
    assert not cuda_glue.supports_device(cpu)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="backend='cuda' was requested but is not available"):
            backends.resolve("cuda", cpu, torch.float32)


@pytest.mark.skipif(not CUDA_EMULATION, reason="needs the CUDA binding built for the tests")
def test_host_only_cuda_runs_the_binding_checks():
    # Under host_only the CUDA glue hands the step to the binding's dry run, whose checks still
    # refuse bad input by name (here a grads list one short, which the glue passes unchecked).
    from fisherforget import ops
    params = [p.detach() for p in _params(2)]
    tensors = ops.StepTensors(
        params, [params[0].clone()], [torch.zeros(3), torch.zeros(3)],
        [torch.zeros(3), torch.zeros(3)], [], [], [None, None],
        [torch.zeros(()), torch.zeros(())], [])
    with backends.host_only("cuda"):
        with pytest.raises(RuntimeError,
                           match=r"fisherforget_C::\w*fused_step: grads has 1 tensors, expected 2"):
            cuda_glue.fused_step(tensors, ops.StepHyper(lr=0.1))
        tensors = tensors._replace(grads=[params[0].clone(), params[1].clone()])
        cuda_glue.fused_step(tensors, ops.StepHyper(lr=0.1))  # the same, valid: nothing written
    assert float(tensors.steps[0]) == 0.0 and torch.count_nonzero(tensors.exp_avgs[0]) == 0


def test_host_only_says_why_it_cannot_run(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        with backends.host_only("tpu"):
            pass
    # A user's build of fisherforget._C has no dry run of the CUDA binding.
    native = _native.helpers()
    if native is None:
        pytest.skip("fisherforget._C is not built")
    user_build = type("UserBuild", (), {"address_rows": native.address_rows})
    monkeypatch.setattr(_native, "helpers", lambda: user_build)
    monkeypatch.setattr(cuda_glue, "load_prebuilt", lambda: None)
    monkeypatch.setattr(cuda_glue, "_kernels_error", lambda: None)
    with pytest.raises(RuntimeError, match=r"host_only\('cuda'\).*FISHERFORGET_TEST_OPS=1"):
        with backends.host_only("cuda"):
            pass
    assert not backends.is_host_only("cuda")
