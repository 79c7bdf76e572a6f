"""The reference backend's standalone ops against float64 computations written here."""

import pytest
import torch

from fisherforget import ops
from step_cases import cases_for, check_against_oracle, check_error, errors_for


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fisher_accumulate_matches_float64(dtype):
    sizes = [1, 7, 4097]
    fishers = [torch.rand(n) for n in sizes]
    grads = [torch.randn(n, dtype=dtype) * 50 for n in sizes]
    expected = [0.75 * f.double() + 0.25 * (g.double() / 8.0) ** 2 for f, g in zip(fishers, grads)]
    ops.fisher_accumulate(fishers, grads, alpha=0.75, beta=0.25, grad_scale=torch.tensor(8.0))
    for f, e in zip(fishers, expected):
        assert torch.allclose(f.double(), e, rtol=1e-6)


def test_fisher_score_matches_float64():
    sizes = [1, 7, 4097, 300]
    d = [torch.randn(n) for n in sizes]
    g = [torch.randn(n, dtype=torch.bfloat16) for n in sizes]
    f = [torch.rand(n) for n in sizes]
    out = ops.fisher_score(d, g, f)
    assert out.dtype == torch.float64 and out.shape == (2,)
    dot = sum((a.double() * b.double()).sum() for a, b in zip(d, g))
    weighted = sum((c.double() * b.double() ** 2).sum() for c, b in zip(f, g))
    assert torch.allclose(out, torch.stack([dot, weighted]), rtol=1e-12)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        ops.fisher_score([], [], [], backend="nope")


def test_fused_step_list_contract_is_checked_for_every_backend():
    p = [torch.randn(3)]
    g = [torch.randn(3)]
    m, v = [torch.zeros(3)], [torch.zeros(3)]
    steps = [torch.zeros(())]
    with pytest.raises(ValueError, match="fishers is empty, but fisher_mode"):
        ops.fused_step(ops.StepTensors(p, g, m, v, [], [], [None], steps, []),
                       ops.StepHyper(lr=1e-3, fisher_mode="ema"))
    with pytest.raises(ValueError, match="masks has 0 entries, params 1"):
        ops.fused_step(ops.StepTensors(p, g, m, v, [], [], [], steps, []), ops.StepHyper(lr=1e-3))
    assert steps[0].item() == 0


# ------------------------------------------------------------------- the shared table


@pytest.mark.parametrize("case", cases_for("reference"))
def test_step_cases_match_float64_oracle(case):
    """Every case of the table (tests/step_cases.py) against the float64 oracle."""
    check_against_oracle(case, "reference")


@pytest.mark.parametrize("error, n, index", errors_for("reference"))
def test_bad_step_input_is_refused_and_changes_nothing(error, n, index):
    check_error(error, "reference", n, index)
