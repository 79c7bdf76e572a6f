"""Ordinary state handling: resetting state the PyTorch way, copies (deepcopy, pickle), every state
the optimizer produces loading back, a checkpoint from another machine's backend, and what the
public step op refuses or records (shared memory, autograd versions)."""

import copy
import io
import pickle

import pytest
import torch

from fisherforget import FisherAdamW, ops


def model_and_grads(seed=0, n=3):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(5, 4, generator=gen)) for _ in range(n)]
    grads = [[torch.randn(5, 4, generator=gen) for _ in params] for _ in range(4)]
    return params, grads


def step_with(opt, params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()


def assert_same(a_params, b_params):
    for a, b in zip(a_params, b_params):
        assert torch.equal(a.detach(), b.detach())


@pytest.mark.parametrize("reset", ["del", "pop", "clear", "assign"])
def test_state_reset_the_pytorch_way_gives_a_true_first_step(reset):
    params, grads = model_and_grads()
    opt = FisherAdamW(params, lr=1e-2, fisher="ema")
    for g in grads[:2]:
        step_with(opt, params, g)
    target = params[1]
    if reset == "del":
        del opt.state[target]
    elif reset == "pop":
        opt.state.pop(target)
    elif reset == "clear":
        opt.state.clear()
    else:
        opt.state[target] = {}
    # The reference: a fresh optimizer's first step on that param, from the same weights.
    fresh_param = torch.nn.Parameter(target.detach().clone())
    fresh = FisherAdamW([fresh_param], lr=1e-2, fisher="ema")
    step_with(fresh, [fresh_param], [grads[2][1]])
    step_with(opt, params, grads[2])
    assert torch.equal(target.detach(), fresh_param.detach())
    assert opt.state[target]["step"].item() == 1
    for key in ("exp_avg", "exp_avg_sq", "fisher"):
        assert torch.equal(opt.state[target][key], fresh.state[fresh_param][key]), key
    saved = opt.state_dict()["state"]
    assert 1 in saved and saved[1]["step"].item() == 1


def test_deepcopy_and_pickle_step_like_the_original():
    params, grads = model_and_grads()
    model = torch.nn.ParameterList(params)
    opt = FisherAdamW(model.parameters(), lr=1e-2, fisher="ema", fisher_scale=0.5)
    for g in grads[:2]:
        step_with(opt, list(model.parameters()), g)
    model2, opt2 = copy.deepcopy((model, opt))
    buffer = io.BytesIO()
    pickle.dump((model, opt), buffer)
    model3, opt3 = pickle.loads(buffer.getvalue())
    for m, o in ((model, opt), (model2, opt2), (model3, opt3)):
        for g in grads[2:]:
            step_with(o, list(m.parameters()), g)
    assert_same(model.parameters(), model2.parameters())
    assert_same(model.parameters(), model3.parameters())
    assert all(p is not q for p, q in zip(model.parameters(), model2.parameters()))
    assert opt2.state[next(model2.parameters())]["step"].item() == 4
    # The copy's state belongs to the copy's params.
    assert set(map(id, opt2.state)) == set(map(id, model2.parameters()))


def test_a_copy_made_inside_an_unlearning_phase_restores_the_learning_settings():
    params, grads = model_and_grads()
    opt = FisherAdamW(params, lr=1e-2, fisher="ema")
    step_with(opt, params, grads[0])
    with opt.unlearning(lr=1e-3, moments="separate"):
        copied = copy.deepcopy(opt)
    assert copied._phase is not None and copied.param_groups[0]["maximize"] is True


@pytest.mark.parametrize("moments", ["separate", "shared"])
@pytest.mark.parametrize("when", ["early", "after_learning", "inside_phase"])
def test_every_state_the_optimizer_produces_loads_back(moments, when):
    """Early unlearning (only unlearn_* moments), after learning, inside a phase: the state dict
    loads into a fresh optimizer, which then steps exactly like the original."""
    params, grads = model_and_grads()
    opt = FisherAdamW(params, lr=1e-2, fisher="ema", amsgrad=True)
    opt.set_mask(params[0], torch.rand(5, 4, generator=torch.Generator().manual_seed(3)) > 0.3)
    if when != "early":
        step_with(opt, params, grads[0])
    if when == "inside_phase":
        with opt.unlearning(lr=1e-3, moments=moments):
            step_with(opt, params, grads[1])
            state = opt.state_dict()
    else:
        with opt.unlearning(lr=1e-3, moments=moments):
            step_with(opt, params, grads[1])
        state = opt.state_dict()
    clones = [torch.nn.Parameter(p.detach().clone()) for p in params]
    other = FisherAdamW(clones, lr=1e-2, fisher="ema", amsgrad=True)
    other.load_state_dict(copy.deepcopy(state))
    if when == "inside_phase":
        # the original leaves its phase as the checkpoint says it did
        pass
    for o, ps in ((opt, params), (other, clones)):
        step_with(o, ps, grads[2])
        with o.unlearning(lr=1e-3, moments=moments):
            step_with(o, ps, grads[3])
    assert_same(params, clones)


def test_a_checkpoint_saved_with_another_backend_loads_with_this_ones():
    params, grads = model_and_grads()
    opt = FisherAdamW(params, lr=1e-2, fisher="ema")
    step_with(opt, params, grads[0])
    state = opt.state_dict()
    for group in state["param_groups"]:
        group["backend"] = "cuda"  # as a GPU machine saves it
    clones = [torch.nn.Parameter(p.detach().clone()) for p in params]
    other = FisherAdamW(clones, lr=1e-2, fisher="ema")
    other.load_state_dict(state)
    assert other.param_groups[0]["backend"] == "auto"
    step_with(opt, params, grads[1])
    step_with(other, clones, grads[1])
    assert_same(params, clones)


def test_a_self_overlapping_param_is_refused_before_anything_changes():
    good = torch.nn.Parameter(torch.randn(4))
    base = torch.zeros(1)
    overlapping = torch.nn.Parameter(base.expand(4))
    opt = FisherAdamW([good, overlapping], lr=1e-2)
    good.grad, overlapping.grad = torch.ones(4), torch.ones(4)
    before = good.detach().clone()
    with pytest.raises(ValueError, match=r"param 1 of group 0 \(shape \(4,\)\): params\[1\] .* "
                                         r"overlaps itself"):
        opt.step()
    assert torch.equal(good.detach(), before)
    assert all(not s or s["step"].item() == 0 for s in opt.state.values())


def step_lists(n=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(6, generator=gen) for _ in range(n)]
    return ops.StepTensors(
        params=params, grads=[torch.randn(6, generator=gen) for _ in range(n)],
        exp_avgs=[torch.zeros(6) for _ in range(n)],
        exp_avg_sqs=[torch.zeros(6) for _ in range(n)], max_exp_avg_sqs=[], fishers=[],
        masks=[None] * n, steps=[torch.zeros(()) for _ in range(n)], fisher_counts=[])


HYPER = ops.StepHyper(lr=1e-2)


@pytest.mark.parametrize("shared", ["params", "steps"])
def test_the_public_op_refuses_entries_sharing_memory(shared):
    tensors = step_lists()
    getattr(tensors, shared)[1] = getattr(tensors, shared)[0]
    before = [t.clone() for t in tensors.params]
    with pytest.raises(ValueError, match=rf"{shared}\[1\] shares its memory with {shared}\[0\]"):
        ops.fused_step(tensors, HYPER)
    assert all(torch.equal(a, b) for a, b in zip(tensors.params, before))


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_a_step_between_forward_and_backward_is_caught_by_autograd(backend):
    from step_cases import unavailable

    if unavailable(backend):
        pytest.skip(unavailable(backend))
    w = torch.nn.Parameter(torch.randn(4, 4))
    opt = FisherAdamW([w], lr=1e-2, backend=backend)
    w.grad = torch.randn(4, 4)
    x = torch.randn(3, 4, requires_grad=True)
    loss = (x @ w).pow(2).sum()  # saves w for backward
    version = w._version
    opt.step()
    assert w._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def _saved_and_loaded(opt, params, **settings):
    """The optimizer's own state dict through torch.save / torch.load(weights_only=True), loaded
    into a fresh optimizer on clones of ``params``."""
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    clones = [torch.nn.Parameter(p.detach().clone()) for p in params]
    other = FisherAdamW(clones, **settings)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    return other, clones


def _step_both_identically(pairs, grads):
    for g in grads:
        for o, ps in pairs:
            step_with(o, ps, g)
            with o.unlearning(lr=1e-3, moments="separate"):
                step_with(o, ps, g)


@pytest.mark.parametrize("settings", [
    dict(fisher="ema"), dict(fisher="mean", amsgrad=True),
    dict(fisher="sum", fisher_dtype=torch.bfloat16, state_dtype=torch.bfloat16),
    dict(fisher=None),
])
@pytest.mark.parametrize("phase", [
    "early_separate_freezing", "early_separate_scaling", "early_shared_amsgrad",
    "amsgrad_set_after_a_step", "fisher_set_after_a_step",
])
def test_states_made_by_early_phases_and_changed_settings_load_back(settings, phase):
    """An early unlearning phase that freezes or scales by the Fisher makes a Fisher beside
    unlearn_* moments and no 'step'; amsgrad (or a Fisher) switched on after a step leaves a
    state without max_exp_avg_sq (or Fisher) until the next step. Each loads and steps on
    exactly like the original."""
    import warnings

    params, grads = model_and_grads()
    settings = dict(lr=1e-2, **settings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a bf16 Fisher may warn
        opt = FisherAdamW(params, **settings)
        if phase.startswith("early"):
            moments = "shared" if "shared" in phase else "separate"
            override = dict(freezing=dict(freeze_above=1.0), scaling=dict(fisher_scale=0.5),
                            amsgrad=dict(amsgrad=True))[phase.rsplit("_", 1)[1]]
            with opt.unlearning(lr=1e-3, moments=moments, **override):
                step_with(opt, params, grads[0])
        else:
            step_with(opt, params, grads[0])
            key = "amsgrad" if phase.startswith("amsgrad") else "fisher"
            opt.param_groups[0][key] = True if key == "amsgrad" else "ema"
            settings[key] = opt.param_groups[0][key]
        other, clones = _saved_and_loaded(opt, params, **settings)
        _step_both_identically([(opt, params), (other, clones)], grads[1:])
    assert_same(params, clones)
    for p, q in zip(params, clones):
        assert opt.state[p].keys() == other.state[q].keys(), (phase, settings)
        for key, value in opt.state[p].items():
            assert torch.equal(value, other.state[q][key]), key


def test_a_copy_adds_no_setting_of_the_base_class():
    params, grads = model_and_grads()
    opt = FisherAdamW(params, lr=1e-2)
    step_with(opt, params, grads[0])
    copied = copy.deepcopy(opt)
    assert copied.defaults.keys() == opt.defaults.keys()
    copied.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})
    assert "differentiable" not in copied.state_dict()["param_groups"][1]


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_fisher_accumulate_refuses_a_fisher_given_twice_and_bumps_versions(backend):
    """Two entries on one tensor would lose an accumulation; a self-overlapping Fisher could not
    be written element by element: both refused before anything is written. Written Fishers
    get new autograd versions, as the params of a step do."""
    from step_cases import unavailable

    if unavailable(backend):
        pytest.skip(unavailable(backend))
    fisher, other = torch.ones(6), torch.ones(6)
    grads = [torch.full((6,), 2.0), torch.full((6,), 3.0)]
    with pytest.raises(ValueError, match=r"fishers\[1\] shares its memory with fishers\[0\]"):
        ops.fisher_accumulate([fisher, fisher], grads, alpha=1.0, beta=1.0, backend=backend)
    assert torch.equal(fisher, torch.ones(6))
    expanded = torch.zeros(1).expand(6)
    with pytest.raises(ValueError, match=r"fishers\[1\] \(shape \(6,\), stride \(0,\)\) "
                                         r"overlaps itself"):
        ops.fisher_accumulate([other, expanded], grads, alpha=1.0, beta=1.0, backend=backend)
    assert torch.equal(other, torch.ones(6))
    version = fisher._version
    ops.fisher_accumulate([fisher, other], grads, alpha=1.0, beta=1.0, backend=backend)
    assert fisher._version > version
    assert torch.equal(fisher, torch.full((6,), 5.0)) and torch.equal(other, torch.full((6,), 10.0))


def test_a_preflight_error_names_the_param_of_the_group_not_the_launch():
    """With two buckets (an fp32 and a bf16 param) the overlapping param is entry 0 of its
    launch but param 2 of its group: the message names both."""
    good = torch.nn.Parameter(torch.randn(4))
    low = torch.nn.Parameter(torch.randn(4, dtype=torch.bfloat16))
    overlapping = torch.nn.Parameter(torch.zeros(1).expand(4))
    opt = FisherAdamW([good, low, overlapping], lr=1e-2)
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.ones(4, dtype=p.dtype)
    before = [p.detach().clone() for p in (good, low)]
    with pytest.raises(ValueError, match=r"param 2 of group 0 \(shape \(4,\)\): params\[1\] "):
        opt.step()
    assert torch.equal(good.detach(), before[0]) and torch.equal(low.detach(), before[1])
