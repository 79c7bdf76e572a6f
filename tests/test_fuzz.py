"""Property-based tests (hypothesis) of the ops over random shapes, dtypes and settings.

* the reference backend against the float64 oracle of docs/design.md (``tests/oracle.py``),
  starting from random optimizer state (moments, Fisher, step counts), 1-3 chained steps;
* ``fisher_accumulate`` and ``fisher_score`` against float64 formulas;
* the Triton backend (interpreted on CPU, ``TRITON_INTERPRET=1``) against the reference, with few,
  small examples to stay fast in the interpreter; skipped with the reason when Triton is not
  available.

The examples are derandomized (the same every run, so CI cannot flake); set
``FISHERFORGET_FUZZ_EXAMPLES=<n>`` to draw ``n`` fresh random examples per test locally.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fisherforget import backends, ops
import step_cases as table
from oracle import oracle_step
from step_cases import ulp

_FRESH = int(os.environ.get("FISHERFORGET_FUZZ_EXAMPLES", "0"))


def _settings(examples: int):
    return settings(
        max_examples=_FRESH or examples, derandomize=not _FRESH, database=None, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ------------------------------------------------------------------------------ cases

shapes = st.lists(st.integers(0, 9), min_size=0, max_size=3).filter(
    lambda s: math.prod(s) <= 200
)


@dataclass
class StepCase:
    dtype: torch.dtype
    state_dtype: torch.dtype
    shapes: list
    noncontiguous: list
    hyper: dict
    use_mask: bool
    grad_scale: Optional[float]
    found_inf: list  # per chained step
    step0: int
    count0: int
    seed: int

    @property
    def uses_fisher(self) -> bool:
        h = self.hyper
        return (h["fisher_mode"] is not None or h["fisher_scale"] != 0
                or h["freeze_above"] is not None or h["freeze_below"] is not None)


@st.composite
def step_cases(draw, max_numel_shapes=shapes, dtypes=PARAM_DTYPES):
    n = draw(st.integers(1, 3))
    floats = lambda lo, hi: st.floats(lo, hi, allow_nan=False, allow_infinity=False)  # noqa: E731
    hyper = dict(
        lr=draw(st.one_of(st.just(0.0), floats(1e-5, 0.1))),
        # Typical values often (bias corrections matter at small t with betas near 1).
        beta1=draw(st.one_of(st.sampled_from([0.0, 0.5, 0.9]), floats(0.0, 0.99))),
        beta2=draw(st.one_of(st.sampled_from([0.0, 0.9, 0.99, 0.999]), floats(0.0, 0.9999))),
        eps=draw(st.sampled_from([0.0, 1e-8, 1e-6, 1e-3])),
        weight_decay=draw(st.one_of(st.just(0.0), floats(0.0, 0.5))),
        amsgrad=draw(st.booleans()),
        maximize=draw(st.booleans()),
        fisher_mode=draw(st.sampled_from(["ema", "mean", "sum", None])),
        fisher_beta=draw(floats(0.0, 0.999)),
        fisher_scale=draw(st.one_of(st.just(0.0), floats(0.0, 10.0))),
        freeze_above=draw(st.one_of(st.none(), floats(0.2, 3.0))),
        freeze_below=draw(st.one_of(st.none(), floats(0.0, 0.5))),
    )
    steps = draw(st.integers(1, 3))
    return StepCase(
        dtype=draw(st.sampled_from(dtypes)),
        state_dtype=draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16])),
        shapes=[tuple(draw(max_numel_shapes)) for _ in range(n)],
        noncontiguous=[draw(st.booleans()) for _ in range(n)],
        hyper=hyper,
        use_mask=draw(st.booleans()),
        grad_scale=draw(st.sampled_from([None, 1.0, 2.0**10, 3.5])),
        found_inf=[draw(st.sampled_from([False, False, False, True])) for _ in range(steps)],
        step0=draw(st.one_of(st.integers(0, 3), st.integers(0, 1000))),
        count0=draw(st.integers(0, 50)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _valid(case) -> bool:
    """StepHyper refuses freeze_above < freeze_below (every element frozen), which step_cases()
    can draw."""
    above, below = case.hyper["freeze_above"], case.hyper["freeze_below"]
    return above is None or below is None or above >= below


def _tensor(shape, dtype, gen, noncontiguous=False, scale=1.0, positive=False):
    values = torch.rand(shape, generator=gen) if positive else torch.randn(shape, generator=gen)
    values = (values * scale).to(dtype)
    if noncontiguous and len(shape) >= 1:
        # The same values, stored transposed/strided so the tensor is not contiguous.
        wide = torch.empty(shape + (2,), dtype=dtype)
        wide[..., 0] = values
        values = wide[..., 0]
    return values


def _inputs(case: StepCase):
    """Fresh random params, state and masks for ``case`` (never zeros)."""
    gen = torch.Generator().manual_seed(case.seed)
    sd = case.state_dtype
    n = len(case.shapes)
    data = dict(
        params=[_tensor(s, case.dtype, gen, nc) for s, nc in zip(case.shapes, case.noncontiguous)],
        exp_avgs=[_tensor(s, sd, gen, scale=0.1) for s in case.shapes],
        exp_avg_sqs=[_tensor(s, sd, gen, scale=0.1, positive=True) + 1e-4 for s in case.shapes],
        max_exp_avg_sqs=[_tensor(s, sd, gen, scale=0.2, positive=True) + 1e-4
                         for s in case.shapes] if case.hyper["amsgrad"] else [],
        fishers=[_tensor(s, sd, gen, scale=2.0, positive=True) for s in case.shapes]
        if case.uses_fisher else [],
        masks=[torch.rand(s, generator=gen) > 0.3 if case.use_mask and i % 2 == 0 else None
               for i, s in enumerate(case.shapes)],
        steps=[torch.tensor(float(case.step0)) for _ in range(n)],
        fisher_counts=[torch.tensor(float(case.count0)) for _ in range(n)]
        if case.uses_fisher else [],
    )
    return data, gen


def _grads(case: StepCase, gen):
    scale = case.grad_scale or 1.0
    return [_tensor(s, case.dtype, gen, nc, scale=scale)
            for s, nc in zip(case.shapes, case.noncontiguous)]


def _clone(data):
    return {k: [None if t is None else t.clone() for t in v] for k, v in data.items()}


def _run(data, grads, case, found_inf, backend):
    with table.emulated_cuda(backend, data["params"]):
        _fused_step(data, grads, case, found_inf, backend)


def _fused_step(data, grads, case, found_inf, backend):
    ops.fused_step(
        ops.StepTensors(data["params"], grads, data["exp_avgs"], data["exp_avg_sqs"],
                        data["max_exp_avg_sqs"], data["fishers"], data["masks"], data["steps"],
                        data["fisher_counts"]),
        ops.StepHyper(**case.hyper),
        grad_scale=None if case.grad_scale is None else torch.tensor(case.grad_scale),
        found_inf=torch.tensor(float(found_inf)), backend=backend,
    )


def _near_threshold(fisher: Optional[torch.Tensor], hyper: dict) -> Optional[torch.Tensor]:
    return table.near_threshold(fisher, hyper)


# ------------------------------------------------------------ reference vs float64 oracle


_oracle_state = table.oracle_state


@_settings(examples=150)
@given(case=step_cases().filter(_valid))
def test_reference_matches_float64_oracle(case):
    h = case.hyper
    oracle_hyper = dict(
        lr=h["lr"], betas=(h["beta1"], h["beta2"]), eps=h["eps"], weight_decay=h["weight_decay"],
        amsgrad=h["amsgrad"], maximize=h["maximize"], fisher=h["fisher_mode"],
        fisher_beta=h["fisher_beta"], fisher_scale=h["fisher_scale"],
        freeze_above=h["freeze_above"], freeze_below=h["freeze_below"],
    )
    data, gen = _inputs(case)
    for found_inf in case.found_inf:
        grads = _grads(case, gen)
        before = _clone(data)
        expected = [
            oracle_step(_oracle_state(data, i), grads[i], mask=data["masks"][i],
                        grad_scale=case.grad_scale or 1.0, found_inf=found_inf, **oracle_hyper)
            for i in range(len(case.shapes))
        ]
        _run(data, grads, case, found_inf, "reference")
        if found_inf:  # nothing at all changes
            for key, values in data.items():
                for new, old in zip(values, before[key]):
                    assert new is None or torch.equal(new, old), key
            continue
        for i, (new, frozen) in enumerate(expected):
            _check_against_oracle(case, data, before, grads, i, new, frozen)


def _check_against_oracle(case, data, before, grads, i, new, frozen):
    table.assert_matches_oracle(case.hyper, case.dtype, case.grad_scale, data, before, grads, i,
                                new, frozen)


# The same oracle test on the kernel backends (the CUDA kernels through their host emulation on
# CPU tensors); Triton interpreted, with few, small examples.
# (Not the id "cuda": tests/conftest.py skips tests with that keyword when there is no GPU.)
_KERNEL_ORACLE = [pytest.param(b, marks=table.skip_unless_available(b), id=name)
                  for b, name in (("cpu", "cpu"), ("cuda", "cuda_emulated"))]


@contextlib.contextmanager
def _on_backend(backend):
    """test_reference_matches_float64_oracle's steps run on ``backend`` instead."""
    run = _run
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys.modules[__name__], "_run", lambda data, grads, case, found_inf, _:
                      run(data, grads, case, found_inf, backend))
        yield


@pytest.mark.parametrize("backend", _KERNEL_ORACLE)
@_settings(examples=150)
@given(case=step_cases().filter(_valid))
def test_kernel_backend_matches_float64_oracle(backend, case):
    with _on_backend(backend):
        test_reference_matches_float64_oracle.hypothesis.inner_test(case)


# --------------------------------------------------- fisher_accumulate / fisher_score


@_settings(examples=40)
@given(
    shape_list=st.lists(shapes, min_size=1, max_size=3),
    dtype=st.sampled_from(PARAM_DTYPES),
    alpha=st.floats(0.0, 1.0),
    beta=st.floats(0.0, 2.0),
    grad_scale=st.sampled_from([None, 1.0, 1024.0, 0.3]),
    seed=st.integers(0, 2**31 - 1),
)
def test_fisher_accumulate_and_score_match_float64(shape_list, dtype, alpha, beta, grad_scale,
                                                   seed):
    gen = torch.Generator().manual_seed(seed)
    fishers = [torch.rand(s, generator=gen) * 2 for s in shape_list]
    grads = [torch.randn(s, generator=gen).to(dtype) for s in shape_list]
    directions = [torch.randn(s, generator=gen) for s in shape_list]
    scale = grad_scale or 1.0
    expected = [alpha * f.double() + beta * (g.double() / scale) ** 2
                for f, g in zip(fishers, grads)]
    ops.fisher_accumulate(fishers, grads, alpha=alpha, beta=beta,
                          grad_scale=None if grad_scale is None else torch.tensor(grad_scale),
                          backend="reference")
    for f, e in zip(fishers, expected):
        torch.testing.assert_close(f.double(), e, rtol=4e-7, atol=1e-37)

    score = ops.fisher_score(directions, grads, fishers, backend="reference")
    assert score.dtype == torch.float64 and score.shape == (2,)
    dot = sum((d.double() * g.double()).sum() for d, g in zip(directions, grads))
    weighted = sum((f.double() * g.double() ** 2).sum() for f, g in zip(fishers, grads))
    torch.testing.assert_close(score, torch.stack([torch.as_tensor(dot, dtype=torch.float64),
                                                   torch.as_tensor(weighted,
                                                                   dtype=torch.float64)]),
                               rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------ Triton (interpreted) vs reference

needs_triton = pytest.mark.skipif(
    not backends.is_available("triton"),
    reason=f"Triton backend unavailable: {backends.unavailable_reason('triton')}",
)
_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
small_shapes = st.lists(st.integers(1, 9), min_size=0, max_size=2).filter(
    lambda s: math.prod(s) <= 64
)


def _to(data, device):
    return {k: [None if t is None else t.to(device) for t in v] for k, v in data.items()}


@needs_triton
@_settings(examples=16)
@given(case=step_cases(max_numel_shapes=small_shapes).filter(_valid))
def test_triton_matches_reference(case):
    """Same inputs through both backends, step by step from the same state; fp32 to ~1e-6
    relative, bf16/fp16 params and bf16 state to 1 ulp (the interpreter rounds fp32 -> bf16 by
    truncation), skipped steps bit for bit."""
    data, gen = _inputs(case)
    reference_data = _to(data, _DEVICE)
    for found_inf in case.found_inf:
        grads = [g.to(_DEVICE) for g in _grads(case, gen)]
        # Each step starts both backends from the same state (rounding differences of the
        # previous step would otherwise compound).
        triton_data = _clone(reference_data)
        before, triton_before = _clone(reference_data), _clone(triton_data)
        _run(reference_data, grads, case, found_inf, "reference")
        _run(triton_data, grads, case, found_inf, "triton")
        for i in range(len(case.shapes)):
            fisher = reference_data["fishers"][i].double() if reference_data["fishers"] else None
            near = _near_threshold(fisher, case.hyper)
            check = None if near is None else ~near
            for key in reference_data:
                if not reference_data[key] or reference_data[key][i] is None:
                    continue
                if key == "masks":
                    assert torch.equal(triton_data[key][i], reference_data[key][i])
                    continue
                ref, got = reference_data[key][i].double(), triton_data[key][i].double()
                if check is not None and ref.shape == check.shape:
                    ref, got, old = ref[check], got[check], before[key][i].double()[check]
                else:
                    old = before[key][i].double()
                dtype = reference_data[key][i].dtype
                tol = ulp(ref, dtype) + 4e-6 * (ref.abs() + (ref - old).abs()) + 1e-30
                assert bool(((got - ref).abs() <= tol).all()), (key, (got - ref).abs().max())
            if found_inf:  # a skipped step changes nothing, bit for bit
                for key in triton_data:
                    for new, old in zip(triton_data[key], triton_before[key]):
                        assert new is None or torch.equal(new, old), key


@needs_triton
@pytest.mark.skipif(_DEVICE != "cpu", reason="the oracle test's tensors are on CPU")
@_settings(examples=16)
@given(case=step_cases(max_numel_shapes=small_shapes).filter(_valid))
def test_triton_matches_float64_oracle(case):
    with _on_backend("triton"):
        test_reference_matches_float64_oracle.hypothesis.inner_test(case)


@needs_triton
@_settings(examples=8)
@given(shape_list=st.lists(small_shapes, min_size=1, max_size=3),
       dtype=st.sampled_from(PARAM_DTYPES), seed=st.integers(0, 2**31 - 1))
def test_triton_fisher_accumulate_and_score_match_reference(shape_list, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    fishers = [(torch.rand(s, generator=gen) * 2).to(_DEVICE) for s in shape_list]
    grads = [torch.randn(s, generator=gen).to(dtype).to(_DEVICE) for s in shape_list]
    directions = [torch.randn(s, generator=gen).to(_DEVICE) for s in shape_list]
    ref_fishers = [f.clone() for f in fishers]
    scale = torch.tensor(2.0**8, device=_DEVICE)
    ops.fisher_accumulate(ref_fishers, grads, alpha=0.9, beta=0.1, grad_scale=scale,
                          backend="reference")
    ops.fisher_accumulate(fishers, grads, alpha=0.9, beta=0.1, grad_scale=scale,
                          backend="triton")
    for f, r in zip(fishers, ref_fishers):
        torch.testing.assert_close(f, r, rtol=1e-6, atol=1e-30)
    ref = ops.fisher_score(directions, grads, fishers, backend="reference")
    got = ops.fisher_score(directions, grads, fishers, backend="triton")
    magnitude = torch.stack([
        sum((d.double() * g.double()).abs().sum() for d, g in zip(directions, grads)),
        sum((f.double() * g.double() ** 2).sum() for f, g in zip(fishers, grads)),
    ]).cpu()
    assert bool(((got.cpu() - ref.cpu()).abs() <= 1e-6 * magnitude + 1e-30).all())
