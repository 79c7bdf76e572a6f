"""The unlearning schedule and the plain-loop helper: when it fires, what an unlearning phase does,
and exact resumption from its state."""

import copy

import numpy as np
import pytest
import torch

from fisherforget import FisherAdamW
from fisherforget.fisher import batch_nll
from fisherforget.lwf import LearningWithForgetting, LWFConfig, UnlearningSchedule, collate, select
from lwf_testing import learn_batches, make_samples, tiny_llama


def brute_fires(schedule, total):
    """The schedule's definition, written as a loop over steps."""
    out = []
    for t in range(1, total + 1):
        if schedule.early or t < schedule.warmup or t < 1:
            continue
        if (t - schedule.warmup) % schedule.every == 0:
            out.append(t)
    return out


@pytest.mark.parametrize("every,warmup", [(5, 0), (5, 12), (3, 3), (1, 4), (7, 1)])
def test_schedule_fires_after_warmup_every_n(every, warmup):
    schedule = UnlearningSchedule(every=every, steps=2, warmup=warmup)
    fired = [t for t in range(1, 41) if schedule.fires(t)]
    assert fired == brute_fires(schedule, 40)
    assert all(t >= warmup for t in fired)
    assert fired and fired[0] == max(warmup, every if warmup == 0 else warmup)
    for total in range(0, 41):
        assert schedule.phases(total) == len([t for t in fired if t <= total])
        assert schedule.total_unlearning_steps(total) == 2 * schedule.phases(total)
    assert not any(UnlearningSchedule(every=every, warmup=warmup, early=True).fires(t)
                   for t in range(1, 41))


def test_schedule_rescoring_and_errors():
    schedule = UnlearningSchedule(every=5, rescore_every=10)
    assert schedule.needs_rescore(5, None)
    assert not schedule.needs_rescore(10, 5)
    assert schedule.needs_rescore(15, 5)
    assert not UnlearningSchedule(every=5).needs_rescore(100, 5)
    for kwargs, name in [({"every": 0}, "every"), ({"steps": 0}, "steps"),
                         ({"warmup": -1}, "warmup"), ({"rescore_every": 0}, "rescore_every")]:
        with pytest.raises(ValueError, match=name):
            UnlearningSchedule(**kwargs)
    with pytest.raises(ValueError, match="fraction"):
        LWFConfig(fraction=1.5)
    with pytest.raises(ValueError, match="scores"):
        LWFConfig(scores="lowest")
    with pytest.raises(ValueError, match="freeze_quantile"):
        LWFConfig(freeze_quantile=2.0)
    with pytest.raises(ValueError, match="moments"):
        LWFConfig(moments="both")


def setup_run(config, seed=0):
    model = tiny_llama(seed)
    opt = FisherAdamW(model.parameters(), lr=3e-3, fisher="ema", fisher_beta=0.9)
    lwf = LearningWithForgetting(model, opt, make_samples(24, seed=7), config,
                                 learn_batches=learn_batches(2))
    return model, opt, lwf


def train(model, opt, lwf, steps, start=0):
    batches = learn_batches(6, seed=11)
    phases = []
    for t in range(start, start + steps):
        model(**batches[t % len(batches)]).loss.backward()
        opt.step()
        opt.zero_grad()
        stats = lwf.step()
        if stats is not None:
            phases.append((lwf.global_step, stats))
    return phases


def test_loop_helper_fires_on_schedule_and_logs():
    config = LWFConfig(every=4, steps=2, warmup=6, fraction=0.5, lr=1e-3, batch_size=4)
    model, opt, lwf = setup_run(config)
    phases = train(model, opt, lwf, 20)
    assert [t for t, _ in phases] == [6, 10, 14, 18]
    first = phases[0][1]
    for key in ("lwf/fc_mean", "lwf/fc_std", "lwf/fc_positive", "lwf/selected", "lwf/unlearn_loss",
                "lwf/forget_loss", "lwf/phase"):
        assert key in first, key
    assert first["lwf/selected"] == 12
    # scored once (no rescoring): later phases carry no FC statistics
    assert all("lwf/fc_mean" not in stats for _, stats in phases[1:])
    assert lwf.last_scored == 6 and lwf.phase == 4


def test_rescoring_and_positive_only():
    config = LWFConfig(every=3, steps=1, rescore_every=6, fraction=1.0, positive_only=True,
                       lr=1e-3, batch_size=4)
    model, opt, lwf = setup_run(config)
    phases = train(model, opt, lwf, 12)
    assert [t for t, s in phases if "lwf/fc_mean" in s] == [3, 9]
    assert (lwf.fc.fc[lwf.selected] > 0).all()
    assert lwf.selected.numel() == int((lwf.fc.fc > 0).sum())


@pytest.mark.parametrize("freeze", [None, 0.5])
def test_unlearning_ascends_the_forgetting_loss_and_leaves_the_fisher(freeze):
    config = LWFConfig(every=100, steps=6, fraction=0.25, lr=3e-3, batch_size=6,
                       freeze_quantile=freeze, fisher_scale=1.0, moments="separate")
    model, opt, lwf = setup_run(config)
    train(model, opt, lwf, 5)
    lwf.rescore()
    selected = collate([lwf.samples[i] for i in lwf.selected.tolist()])
    params = list(model.parameters())

    def selected_loss():
        with torch.no_grad():
            return float(batch_nll(model(**selected).logits, selected["labels"]))

    before_loss = selected_loss()
    fisher_before = [opt.fisher(p).clone() for p in params]
    counts_before = [opt.state[p]["fisher_count"].clone() for p in params]
    moments_before = [opt.state[p]["exp_avg"].clone() for p in params]
    params_before = [p.detach().clone() for p in params]
    groups_before = copy.deepcopy([{k: v for k, v in g.items() if k != "params"}
                                   for g in opt.param_groups])
    stats = lwf.unlearn(6)
    assert selected_loss() > before_loss  # gradient ascent on the selected self-knowledge
    assert stats["unlearn_loss_last"] > stats["unlearn_loss_first"]
    for p, f, c in zip(params, fisher_before, counts_before):
        assert torch.equal(opt.fisher(p), f)  # Fisher accumulation is off while unlearning
        assert torch.equal(opt.state[p]["fisher_count"], c)
    for p, m in zip(params, moments_before):
        assert torch.equal(opt.state[p]["exp_avg"], m)  # separate moments: learning's untouched
    groups_after = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    assert groups_after == groups_before  # every group setting restored
    changed = sum(int((p.detach() != b).sum()) for p, b in zip(params, params_before))
    assert changed > 0
    if freeze is not None:
        threshold = stats["freeze_above"]
        for p, b, f in zip(params, params_before, fisher_before):
            protected = f > threshold
            assert torch.equal(p.detach()[protected], b[protected])


def test_unlearning_restores_pending_grads():
    model, opt, lwf = setup_run(LWFConfig(every=100, steps=2, lr=1e-3, batch_size=4))
    train(model, opt, lwf, 2)
    lwf.rescore()
    pending = [torch.randn_like(p) for p in model.parameters()]
    for p, g in zip(model.parameters(), pending):
        p.grad = g.clone()
    lwf.unlearn(2)
    for p, g in zip(model.parameters(), pending):
        assert torch.equal(p.grad, g)


def test_early_variant_unlearns_everything_up_front():
    config = LWFConfig(every=5, steps=3, warmup=5, early=True, direction="fresh",
                       fisher_source="empirical", fraction=0.5, lr=1e-3, batch_size=4)
    model, opt, lwf = setup_run(config)
    stats = lwf.begin(total_steps=20)
    # the periodic schedule would fire at 5, 10, 15, 20: 4 phases x 3 steps
    assert stats["lwf/unlearn_steps"] == 12
    assert lwf.begin(20) is None
    assert train(model, opt, lwf, 20) == []
    with pytest.raises(ValueError, match="learn_batches"):
        LearningWithForgetting(model, opt, make_samples(4), LWFConfig(early=True))


@pytest.mark.parametrize("scores", ["fc", "random", "reversed"])
def test_resume_from_state_dict_is_exact(scores):
    config = LWFConfig(every=3, steps=2, rescore_every=6, fraction=0.5, scores=scores, lr=2e-3,
                       batch_size=5)
    model, opt, lwf = setup_run(config)
    full = train(model, opt, lwf, 14)

    model2, opt2, lwf2 = setup_run(config)
    train(model2, opt2, lwf2, 7)
    saved = (copy.deepcopy(model2.state_dict()), copy.deepcopy(opt2.state_dict()),
             copy.deepcopy(lwf2.state_dict()))
    model3, opt3, lwf3 = setup_run(config, seed=5)  # different init: everything comes from state
    model3.load_state_dict(saved[0])
    opt3.load_state_dict(saved[1])
    lwf3.load_state_dict(saved[2])
    rest = train(model3, opt3, lwf3, 7, start=7)
    assert [t for t, _ in rest] == [t for t, _ in full if t > 7]
    for a, b in zip(model.parameters(), model3.parameters()):
        assert torch.equal(a, b)
    assert lwf3.history == lwf.history

    other = LearningWithForgetting(model3, opt3, make_samples(24, seed=8), config)
    with pytest.raises(ValueError, match="different D_self"):
        other.load_state_dict(saved[2])


def test_helper_errors():
    model = tiny_llama()
    with pytest.raises(TypeError, match="FisherAdamW"):
        LearningWithForgetting(model, torch.optim.AdamW(model.parameters()), make_samples(2))
    with pytest.raises(ValueError, match="empty"):
        LearningWithForgetting(model, FisherAdamW(model.parameters()), [])
    lwf = LearningWithForgetting(None, None, make_samples(2))
    with pytest.raises(RuntimeError, match="not bound"):
        lwf.step()
    lwf.bind(model, FisherAdamW(model.parameters()))
    with pytest.raises(RuntimeError, match="rescore"):
        lwf.unlearn(1)


def test_select_ranks_nan_last_and_refuses_all_nan():
    nan, inf = float("nan"), float("inf")
    scores = torch.tensor([0.5, nan, 2.0, -inf, inf, 2.0, nan], dtype=torch.float64)
    assert select(scores, 1.0).tolist() == [4, 2, 5, 0, 3, 1, 6]
    assert select(scores, 0.5).tolist() == [4, 2, 5, 0]
    assert select(scores, 1.0, positive_only=True).tolist() == [4, 2, 5, 0]
    only = torch.tensor([nan, -1.0, nan], dtype=torch.float64)
    assert select(only, 0.34).tolist() == [1]  # a NaN never comes before a number
    with pytest.raises(ValueError, match="all 2 scores are NaN"):
        select(torch.tensor([nan, nan]), 0.5)
    with pytest.raises(ValueError, match="fraction"):
        select(scores, True)
    assert select(scores, np.float32(0.25)).tolist() == [4, 2]  # any real fraction


def test_select_matches_a_reference_ranking_on_random_scores():
    """Against an independent ranking: numbers by (-score, index), then NaNs by index."""
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        n = int(torch.randint(1, 12, (1,), generator=gen))
        values = torch.randint(-3, 4, (n,), generator=gen).double()  # many ties
        special = torch.rand(n, generator=gen)
        values[special < 0.15] = float("nan")
        values[(special >= 0.15) & (special < 0.25)] = float("inf")
        values[(special >= 0.25) & (special < 0.3)] = -float("inf")
        if bool(torch.isnan(values).all()):
            values[0] = 0.0
        items = values.tolist()
        ranked = sorted((i for i in range(n) if items[i] == items[i]),
                        key=lambda i: (-items[i], i))
        nans = [i for i in range(n) if items[i] != items[i]]
        for fraction in (0.1, 0.5, 1.0):
            count = max(1, int(round(fraction * n)))
            expected = (ranked + nans)[:count]
            assert select(values, fraction).tolist() == expected, (items, fraction)
            assert select(values, fraction, positive_only=True).tolist() == \
                [i for i in expected if items[i] > 0]
