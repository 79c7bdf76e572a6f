"""Each benchmark baseline computes what it claims: checked against the reference backend."""

import pytest
import torch

from fisherforget import FisherAdamW, ops
from benchmarks import baselines

HYPER = dict(lr=3e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
SHAPES = [(7, 5), (4097,), (1,), (16, 33)]


def _twin_params(dtype=torch.float32):
    first = [torch.randn(s, dtype=dtype).requires_grad_() for s in SHAPES]
    second = [p.detach().clone().requires_grad_() for p in first]
    return first, second


@pytest.mark.parametrize("masked", [False, True], ids=["fisher", "fisher+mask"])
def test_composition_matches_fisher_adamw_reference(masked):
    ours_params, comp_params = _twin_params()
    initial = [p.detach().clone() for p in ours_params]
    masks = [torch.rand(s) < 0.7 for s in SHAPES] if masked else None
    ours = FisherAdamW(ours_params, **HYPER, fisher="ema", fisher_beta=0.9, backend="reference")
    if masked:
        for p, m in zip(ours_params, masks):
            ours.set_mask(p, m)
    comp = baselines.FisherAdamWComposition(comp_params, **HYPER, fisher_beta=0.9, masks=masks)
    for _ in range(6):
        for a, b in zip(ours_params, comp_params):
            g = torch.randn_like(a)
            a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        comp.step()
    for i, (a, b) in enumerate(zip(ours_params, comp_params)):
        state = ours.state[a]
        torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(comp.exp_avgs[i], state["exp_avg"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(comp.exp_avg_sqs[i], state["exp_avg_sq"], rtol=1e-5,
                                   atol=1e-7)
        torch.testing.assert_close(comp.fishers[i], state["fisher"], rtol=1e-5, atol=1e-7)
        if not masked:
            assert not torch.equal(b.detach(), initial[i])
        else:
            frozen = ~masks[i]
            # Frozen elements keep param and moments exactly, in both implementations.
            assert torch.equal(b.detach()[frozen], initial[i][frozen])
            assert torch.equal(comp.exp_avgs[i][frozen], torch.zeros_like(b)[frozen])
            assert torch.equal(comp.exp_avg_sqs[i][frozen], torch.zeros_like(b)[frozen])
            updated = masks[i]
            if updated.any():
                assert not torch.equal(b.detach()[updated], initial[i][updated])


def test_composition_state_roles_count_every_persistent_buffer():
    params = [torch.randn(s).requires_grad_() for s in SHAPES]
    masks = [torch.rand(s) < 0.5 for s in SHAPES]
    comp = baselines.FisherAdamWComposition(params, **HYPER, fisher_beta=0.9, masks=masks)
    roles = comp.state_tensors()
    assert set(roles) == {"step", "exp_avg", "exp_avg_sq", "fisher", "frozen_weight",
                          "frozen_state_weight", "snapshot_param", "snapshot_exp_avg",
                          "snapshot_exp_avg_sq"}
    assert roles["frozen_state_weight"] == []  # fp32 params: the moments share the weights


def test_composition_bf16_fisher_is_fp32_and_matches_reference_accumulation():
    params = [torch.randn(s, dtype=torch.bfloat16).requires_grad_() for s in SHAPES]
    comp = baselines.FisherAdamWComposition(params, **HYPER, fisher_beta=0.8)
    expected = [torch.zeros(s) for s in SHAPES]
    for _ in range(3):
        grads = [torch.randn(s, dtype=torch.bfloat16) for s in SHAPES]
        for p, g in zip(params, grads):
            p.grad = g
        comp.step()
        ops.fisher_accumulate(expected, grads, alpha=0.8, beta=0.2, backend="reference")
    for got, want in zip(comp.fishers, expected):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_plain_fisher_score_matches_reference(grad_dtype):
    directions = [torch.randn(s) for s in SHAPES]
    grads = [torch.randn(s, dtype=grad_dtype) for s in SHAPES]
    fishers = [torch.rand(s) for s in SHAPES]
    # a non-contiguous member as well
    directions.append(torch.randn(9, 6).t())
    grads.append(torch.randn(9, 6, dtype=grad_dtype).t())
    fishers.append(torch.rand(9, 6).t())
    got = baselines.plain_fisher_score(directions, grads, fishers)
    want = ops.fisher_score(directions, grads, fishers, backend="reference")
    assert got.dtype == torch.float64 and got.shape == (2,)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_plain_fisher_accumulate_matches_reference(grad_dtype):
    fishers = [torch.rand(s) for s in SHAPES]
    expected = [f.clone() for f in fishers]
    grads = [torch.randn(s, dtype=grad_dtype) for s in SHAPES]
    baselines.plain_fisher_accumulate(fishers, grads, alpha=0.97, beta=0.03)
    ops.fisher_accumulate(expected, grads, alpha=0.97, beta=0.03, backend="reference")
    for got, want in zip(fishers, expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_torch_adamw_baseline_is_the_requested_implementation(impl):
    opt = baselines.torch_adamw([torch.randn(3, requires_grad=True)], impl=impl, **HYPER)
    assert opt.defaults["fused"] is (impl == "fused")
    assert opt.defaults["foreach"] is (impl == "foreach")


def test_torch_adamw_baseline_rejects_unknown_impl():
    with pytest.raises(ValueError, match="impl must be 'foreach' or 'fused'"):
        baselines.torch_adamw([torch.randn(3, requires_grad=True)], impl="capturable", **HYPER)
