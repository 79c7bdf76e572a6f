"""A bf16 Fisher accumulates without stalling: stored with stochastic rounding on every backend,
with the same random bits (a hash of the Fisher count and the element's index), so that
increments under half an ulp are kept in expectation (docs/design.md, "Low-precision Fisher")."""

import warnings

import pytest
import torch

from fisherforget import FisherAdamW, ops
from step_cases import emulated_cuda, unavailable

# "cpu-scalar": the cpu backend's scalar inner loops (the default ones are AVX2 where the CPU has it).
BACKENDS = ("reference", "cpu", "cpu-scalar", "triton", "cuda")


def _lists(n, fisher, count, device="cpu"):
    return ops.StepTensors(
        params=[torch.zeros(n, device=device)], grads=[torch.zeros(n, device=device)],
        exp_avgs=[torch.zeros(n, device=device)], exp_avg_sqs=[torch.zeros(n, device=device)],
        max_exp_avg_sqs=[], fishers=[torch.full((n,), fisher, dtype=torch.bfloat16,
                                                device=device)],
        masks=[None], steps=[torch.zeros((), device=device)],
        fisher_counts=[torch.full((), float(count), device=device)])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode,start,grad,expected", [
    # sum at 256 (ulp 2): +0.25 per step is an eighth of an ulp; rounded to nearest it stays 256.
    ("sum", 256.0, 0.5, 256.0 + 0.25 * 24),
    # EMA from 1 toward 4 with beta=0.999: +0.003 per step, under half an ulp (0.0039) of 1.
    ("ema", 1.0, 2.0, 4.0 - 3.0 * 0.999 ** 24),
])
def test_increments_under_half_an_ulp_are_kept_in_expectation(backend, mode, start, grad,
                                                                expected):
    """24 steps through ``ops.fused_step``: the mean over 8,192 elements follows the exact
    accumulation (to nearest it would not move at all), the spread is that of 24 roundings, and
    the stored bits are the reference's on every backend."""
    isa = None
    if backend == "cpu-scalar":
        backend, isa = "cpu", "scalar"
    why = unavailable(backend)
    if why:
        pytest.skip(why)
    if isa is not None:
        previous = torch.ops.fisherforget_C.cpu_isa()
        torch.ops.fisherforget_C.cpu_isa(isa)
    try:
        _accumulate_and_check(backend, mode, start, grad, expected)
    finally:
        if isa is not None:
            torch.ops.fisherforget_C.cpu_isa(previous)


def _accumulate_and_check(backend, mode, start, grad, expected):
    n = 8195  # a tail under 8 elements after the vector loop
    hyper = ops.StepHyper(lr=0.0, fisher_mode=mode, fisher_beta=0.999)
    got, want = _lists(n, start, 5), _lists(n, start, 5)
    for _ in range(24):
        for lists in (got, want):
            lists.grads[0].fill_(grad)
        with emulated_cuda(backend, got.params):
            ops.fused_step(got, hyper, backend=backend)
        ops.fused_step(want, hyper, backend="reference")
        assert torch.equal(got.fishers[0], want.fishers[0])
    fisher = got.fishers[0].double()
    assert abs(fisher.mean().item() - expected) < 0.01 * (expected - start)
    # Each rounding adds noise of variance <= ulp^2 / 4: a random walk of 24 such steps.
    ulp = 2.0 ** (torch.floor(torch.log2(torch.tensor(expected))).item() - 7)
    assert fisher.std().item() <= 1.2 * 0.5 * ulp * 24 ** 0.5
    assert got.fisher_counts[0].item() == 5 + 24


def test_exact_values_stay_exact_and_nan_is_kept():
    """A value a bf16 holds is stored as is (no noise where there is nothing to round)."""
    from fisherforget.backends.reference import round_fisher_bf16

    values = torch.tensor([0.0, 1.0, 256.0, 3.5, float("inf"), 2.0 ** -100, float("nan")])
    for count in (1.0, 2.0, 1000.0):
        rounded = round_fisher_bf16(values, torch.tensor(count))
        assert torch.equal(rounded[:-1], values[:-1].bfloat16())
        assert rounded[-1].isnan()
    # Something in between: only the two neighbours, each with its probability.
    between = torch.full((20000,), 1.0 + 2.0 ** -9)  # a quarter of the way from 1 to 1 + 2^-7
    rounded = round_fisher_bf16(between, torch.tensor(7.0)).double()
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + 2.0 ** -7}
    assert abs((rounded > 1).double().mean().item() - 0.25) < 0.02


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("settings,exact", [
    (dict(fisher="sum"), 1000.0),
    (dict(fisher="ema", fisher_beta=0.999), 1.0 - 0.999 ** 1000),
    (dict(fisher="mean"), 1.0),
])
def test_a_thousand_steps_of_g_1_reach_the_exact_fisher(backend, settings, exact):
    """The brief's numbers: rounded to nearest, a bf16 "sum" stalls at 256 and a beta=0.999 EMA
    at 0.25. Stochastically rounded, the mean over the elements is the exact value to 0.5%,
    and no warning is given (there is nothing to warn about). Two runs give the same bits."""
    why = unavailable(backend)
    if why:
        pytest.skip(why)
    results = []
    for _ in range(2):
        p = torch.nn.Parameter(torch.zeros(2048))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            opt = FisherAdamW([p], lr=0.0, weight_decay=0.0, fisher_dtype=torch.bfloat16,
                              backend=backend, **settings)
            for _ in range(1000):
                p.grad = torch.ones(2048)
                opt.step()
        results.append(opt.fisher(p).clone())
    fisher = results[0].double()
    assert abs(fisher.mean().item() - exact) < 0.005 * exact
    assert (fisher - exact).abs().max() < 0.25 * exact
    assert torch.equal(results[0], results[1])


def test_the_bf16_fisher_follows_the_fp32_one_when_the_gradient_changes():
    """g^2 moving from 1 to 4 halfway (rounded to nearest a beta=0.99 EMA ended 19% low)."""
    p, q = torch.nn.Parameter(torch.zeros(4096)), torch.nn.Parameter(torch.zeros(4096))
    low = FisherAdamW([p], lr=0.0, weight_decay=0.0, fisher_dtype=torch.bfloat16)
    exact = FisherAdamW([q], lr=0.0, weight_decay=0.0)
    for t in range(1000):
        g = torch.full((4096,), 1.0 if t < 500 else 2.0)
        p.grad, q.grad = g.clone(), g.clone()
        low.step()
        exact.step()
    target = exact.fisher(q)[0].item()
    assert abs(low.fisher(p).double().mean().item() - target) < 0.005 * target
