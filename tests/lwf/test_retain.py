"""The retain term of an unlearning step, against a plain-torch reference of its definition:
one step maximises J = L(B_U) - w * R(B_R) with AdamW's update rule (fresh moments)."""

import copy

import pytest
import torch

from fisherforget import FisherAdamW
from fisherforget.fisher import batch_nll
from fisherforget.lwf import LearningWithForgetting, LWFConfig, collate
from lwf_testing import learn_batches, make_samples, tiny_llama

LR = 2e-3


def trained(config, retain_samples=None, n_samples=8):
    model = tiny_llama(0)
    opt = FisherAdamW(model.parameters(), lr=3e-3, weight_decay=0.0, fisher="ema",
                      fisher_beta=0.9, backend="reference")
    for batch in learn_batches(3, seed=11):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    lwf = LearningWithForgetting(model, opt, make_samples(n_samples, seed=7), config,
                                 retain_samples=retain_samples)
    lwf.begin()
    lwf.rescore()
    return model, opt, lwf


def reference_step(model, forget, retain, weight, retain_kind="nll", start=None):
    """A copy of ``model`` after one torch.optim.AdamW(maximize=True) step on J."""
    ref = copy.deepcopy(model)
    objective = 0.0
    if forget is not None:
        objective = batch_nll(ref(**forget).logits, forget["labels"])
    if retain is not None:
        if retain_kind == "nll":
            r = batch_nll(ref(**retain).logits, retain["labels"])
        else:
            keep = retain["labels"][:, 1:] != -100
            log_p = torch.log_softmax(ref(**retain).logits[:, :-1][keep], -1)
            with torch.no_grad():
                log_q = torch.log_softmax(start(**retain).logits[:, :-1][keep], -1)
            r = (log_q.exp() * (log_q - log_p)).sum(-1).mean()
        objective = objective - weight * r
    objective.backward()
    opt = torch.optim.AdamW(ref.parameters(), lr=LR, weight_decay=0.0, maximize=True)
    opt.step()
    return ref


def assert_same_params(model, ref):
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("retain,weight,ascent", [
    ("unselected", 1.0, True), ("lowest", 0.5, True), (None, 1.0, True),
    ("unselected", 2.0, False)])
def test_one_step_is_adamw_on_the_retain_objective(retain, weight, ascent):
    # 8 samples, fraction 0.25: B_U is both selected samples and B_R the whole retain pool (batch
    # size 8), so the batches are known whatever their order.
    config = LWFConfig(every=100, steps=1, fraction=0.25, lr=LR, batch_size=8, retain=retain,
                       retain_weight=weight, ascent=ascent, moments="separate",
                       backend="reference")
    model, opt, lwf = trained(config)
    selected = sorted(lwf.selected.tolist())
    ranking = lwf.ranking
    if retain == "unselected":
        assert sorted(lwf.retain_pool.tolist()) == [i for i in range(8) if i not in selected]
    if retain == "lowest":  # the two lowest-ranked samples
        assert sorted(lwf.retain_pool.tolist()) == sorted(torch.argsort(ranking)[:2].tolist())
    forget = collate([lwf.samples[i] for i in selected]) if ascent else None
    retained = (collate([lwf.samples[i] for i in lwf.retain_pool.tolist()])
                if retain is not None else None)
    expected = reference_step(model, forget, retained, weight)
    stats = lwf.unlearn(1)
    assert_same_params(model, expected)
    assert ("retain_loss" in stats) == (retain is not None)
    assert ("unlearn_loss" in stats) == ascent


def test_user_given_retain_samples_and_kl_retain():
    given = make_samples(4, seed=21)
    config = LWFConfig(every=100, steps=1, fraction=0.25, lr=LR, batch_size=8, retain="samples",
                       retain_loss="kl", moments="separate", backend="reference")
    model, opt, lwf = trained(config, retain_samples=given)
    assert lwf.retain_pool.tolist() == [0, 1, 2, 3]
    start = copy.deepcopy(model)
    # Move the model away from the start so that the KL term has a gradient.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    with torch.no_grad():
        kl = float(lwf._retain_term())
    assert kl > 0
    forget = collate([lwf.samples[i] for i in sorted(lwf.selected.tolist())])
    expected = reference_step(model, forget, collate(given), 1.0, retain_kind="kl", start=start)
    stats = lwf.unlearn(1)
    assert_same_params(model, expected)
    assert stats["retain_loss"] == pytest.approx(kl, rel=1e-5)


def test_retain_bounds_the_damage_to_the_retained_samples():
    """With retain, the unselected samples' loss rises less than with pure ascent."""
    losses = {}
    for retain in (None, "unselected"):
        config = LWFConfig(every=100, steps=8, fraction=0.25, lr=5e-3, batch_size=4,
                           retain=retain, backend="reference")
        model, opt, lwf = trained(config, n_samples=16)
        rest = collate([lwf.samples[i] for i in range(16) if i not in lwf.selected.tolist()])
        with torch.no_grad():
            before = float(batch_nll(model(**rest).logits, rest["labels"]))
        lwf.unlearn(8)
        with torch.no_grad():
            losses[retain] = float(batch_nll(model(**rest).logits, rest["labels"])) - before
    assert losses["unselected"] < losses[None]


def test_retain_logged_and_errors():
    config = LWFConfig(every=2, steps=1, fraction=0.5, lr=1e-3, batch_size=4)
    model, opt, lwf = trained(config)
    for batch in learn_batches(2, seed=3):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        stats = lwf.step()
    assert stats["lwf/retain_loss"] > 0 and "lwf/unlearn_loss" in stats
    with pytest.raises(ValueError, match="retain"):
        LWFConfig(retain="all")
    with pytest.raises(ValueError, match="retain_loss"):
        LWFConfig(retain_loss="mse")
    with pytest.raises(ValueError, match="retain_weight"):
        LWFConfig(retain_weight=-1.0)
    with pytest.raises(ValueError, match="ascent=False"):
        LWFConfig(ascent=False, retain=None)
    with pytest.raises(ValueError, match="retain_samples"):
        LearningWithForgetting(model, opt, make_samples(4), LWFConfig(retain="samples"))
    with pytest.raises(ValueError, match="retain_samples"):
        LearningWithForgetting(model, opt, make_samples(4), LWFConfig(),
                               retain_samples=make_samples(2))
    full = LearningWithForgetting(model, opt, make_samples(4), LWFConfig(fraction=1.0))
    with pytest.raises(ValueError, match="no sample to retain"):
        full.rescore()


def test_resume_checks_the_retain_samples():
    given = make_samples(4, seed=21)
    config = LWFConfig(every=100, steps=1, fraction=0.25, lr=LR, retain="samples")
    model, opt, lwf = trained(config, retain_samples=given)
    state = lwf.state_dict()
    same = LearningWithForgetting(model, opt, make_samples(8, seed=7), config,
                                  retain_samples=given)
    same.load_state_dict(state)
    assert torch.equal(same.retain_pool, lwf.retain_pool)
    other = LearningWithForgetting(model, opt, make_samples(8, seed=7), config,
                                   retain_samples=make_samples(4, seed=22))
    with pytest.raises(ValueError, match="retain set"):
        other.load_state_dict(state)
