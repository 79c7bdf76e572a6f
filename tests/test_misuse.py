"""Misuse (issue 12): unlearning phases, checkpoints, hyperparameter types, degenerate settings,
unclear errors. Every refusal leaves params, state, groups and step counts bitwise unchanged."""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
import pytest
import torch

from fisherforget import FisherAdamW

# ----------------------------------------------------------------------------- helpers


def _copy(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copy(v) for v in value)
    return value


def _same(a, b):
    """Bitwise equality through dicts, lists and tensors (dtype and NaN patterns included)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.dtype == b.dtype and a.shape == b.shape and a.device == b.device
                and torch.equal(a.detach().view(-1).view(torch.uint8) if a.numel() else a,
                                b.detach().view(-1).view(torch.uint8) if b.numel() else b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return type(a) is type(b) and a == b


def snapshot(opt):
    params = [p for g in opt.param_groups for p in g["params"]]
    return (
        [p.detach().clone() for p in params],
        [_copy(opt.state[p]) if p in opt.state else None for p in params],
        [_copy({k: v for k, v in g.items() if k != "params"}) for g in opt.param_groups],
        [len(g["params"]) for g in opt.param_groups],
    )


def assert_unchanged(opt, before):
    assert _same(snapshot(opt), before)


def stepped(n_steps=2, **kwargs):
    """An optimizer with real state (moments, Fisher, a mask) on two params."""
    torch.manual_seed(0)
    a, b = torch.randn(5, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    opt = FisherAdamW([a, b], lr=1e-2, **kwargs)
    for _ in range(n_steps):
        a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
        opt.step()
    opt.set_mask(b, torch.rand(4, 3) > 0.3)
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    return opt, a, b


# ----------------------------------------------------------------------------- 1. unlearning()


@pytest.mark.parametrize("outer, inner", [("separate", "separate"), ("shared", "separate"),
                                          ("separate", "shared"), ("shared", "shared")])
def test_nested_unlearning_is_refused_and_changes_nothing(outer, inner):
    opt, a, b = stepped()
    with opt.unlearning(moments=outer, lr=0.05):
        opt.step()
        before = snapshot(opt)
        with pytest.raises(RuntimeError, match=r"unlearning\(\) inside opt.unlearning\(\): "
                           "nested phases are not supported"):
            with opt.unlearning(moments=inner):
                pass
        assert_unchanged(opt, before)
    # The outer phase still restores everything: learning moments back in place.
    assert not opt.param_groups[0]["maximize"] and opt.param_groups[0]["lr"] == 1e-2
    if outer == "separate":
        assert opt.state[a]["unlearn_step"].item() == 1 and opt.state[a]["step"].item() == 2


def test_add_param_group_inside_a_phase_is_refused():
    opt, a, b = stepped()
    with opt.unlearning(moments="separate"):
        before = snapshot(opt)
        with pytest.raises(RuntimeError, match=r"add_param_group\(\) inside opt.unlearning\(\)"):
            opt.add_param_group({"params": [torch.randn(2, requires_grad=True)]})
        assert_unchanged(opt, before)
    opt.add_param_group({"params": [torch.randn(2, requires_grad=True)]})  # fine outside
    assert len(opt.param_groups) == 2


def test_load_state_dict_inside_a_phase_is_refused():
    opt, a, b = stepped()
    saved = opt.state_dict()
    with opt.unlearning():
        before = snapshot(opt)
        with pytest.raises(RuntimeError, match=r"load_state_dict\(\) inside opt.unlearning\(\)"):
            opt.load_state_dict(saved)
        assert_unchanged(opt, before)


@pytest.mark.parametrize("moments", ["shared", "separate"])
def test_state_dict_inside_a_phase_saves_the_learning_view(moments):
    """Saved inside a phase == saved right after leaving it (settings and moments), so a resumed
    run continues learning, not unlearning."""
    opt, a, b = stepped()
    with opt.unlearning(moments=moments, lr=0.05, fisher_scale=1.0):
        opt.step()
        inside = opt.state_dict()
        inside = torch.load(_saved(inside), weights_only=True)
        # the live optimizer is still in the phase
        assert opt.param_groups[0]["maximize"] and opt.param_groups[0]["lr"] == 0.05
    after = opt.state_dict()
    assert _same(inside, after)
    assert inside["param_groups"][0]["maximize"] is False
    assert inside["param_groups"][0]["fisher"] == "ema"


def test_unlearning_maximize_and_fisher_override_the_defaults():
    opt, a, b = stepped()
    with opt.unlearning(maximize=False, fisher="sum", lr=0.5):
        group = opt.param_groups[0]
        assert group["maximize"] is False and group["fisher"] == "sum" and group["lr"] == 0.5
    assert opt.param_groups[0]["fisher"] == "ema"
    before = snapshot(opt)
    with pytest.raises(TypeError, match=r"Invalid maximize: 0"):
        with opt.unlearning(maximize=0):
            pass
    assert_unchanged(opt, before)


# ----------------------------------------------------------------------------- 2. checkpoints


def _saved(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


def _plain(group, skip=()):
    """The group's non-tensor values are plain Python (JSON-representable) values."""
    values = {k: v for k, v in group.items() if k != "params" and k not in skip}
    json.dumps(values)  # raises on numpy scalars
    for v in list(values.values()) + list(values["betas"]):
        assert v is None or type(v) in (bool, int, float, str, tuple), (v, type(v))


def test_numpy_scalars_are_stored_as_python_numbers_and_checkpoints_load_weights_only():
    p, q = torch.randn(3, requires_grad=True), torch.randn(2, requires_grad=True)
    opt = FisherAdamW([p], lr=np.float64(1e-3), betas=(np.float32(0.5), np.float64(0.9)),
                      eps=np.float32(1e-6), weight_decay=np.float64(0.1),
                      fisher_beta=np.float64(0.9), fisher_scale=np.float32(0.5),
                      freeze_above=np.float64(10.0), fisher=np.str_("ema"))
    opt.add_param_group({"params": [q], "lr": np.float32(2e-3), "freeze_below": np.int64(0)})
    p.grad, q.grad = torch.randn_like(p), torch.randn_like(q)
    opt.step()
    opt.param_groups[1]["fisher_beta"] = np.float64(0.8)  # changed later, e.g. by a schedule
    opt.step()
    for group in opt.param_groups[:1]:
        _plain(group, skip=("state_dtype", "fisher_dtype"))  # torch.dtype live, names saved
        assert group["betas"] == (0.5, 0.9) and group["lr"] == 1e-3
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        _plain(group)
    loaded = torch.load(_saved(saved), weights_only=True)
    assert loaded["param_groups"][1]["fisher_beta"] == 0.8
    # torch's own AdamW state dict (float lr) is JSON-representable the same way.
    json.dumps(torch.optim.AdamW([p]).state_dict()["param_groups"])
    # load_state_dict of a dict holding numpy scalars (not via weights_only) stores plain numbers.
    saved["param_groups"][0]["lr"] = np.float64(5e-3)
    other = FisherAdamW([p.detach().clone().requires_grad_()])
    other.add_param_group({"params": [q.detach().clone().requires_grad_()]})
    other.load_state_dict(saved)
    assert type(other.param_groups[0]["lr"]) is float and other.param_groups[0]["lr"] == 5e-3
    torch.load(_saved(other.state_dict()), weights_only=True)


def test_unlearning_overrides_with_numpy_scalars_are_plain_too():
    opt, a, b = stepped()
    with opt.unlearning(lr=np.float64(0.05)):
        assert type(opt.param_groups[0]["lr"]) is float


# ----------------------------------------------------------------------------- 3. load_state_dict


def _tamper(pstate, key, value):
    if value is _DROP:
        del pstate[key]
    else:
        pstate[key] = value(pstate[key]) if callable(value) else value


_DROP = object()
# (param id, key, new value or function of the old one or _DROP, message regex)
BAD_PARAM_STATE = [
    (0, "step", _DROP, r"'step' of param 0 of group 0 \(state id 0\) is missing"),
    (1, "exp_avg_sq", _DROP, r"'exp_avg_sq' of param 1 of group 0 \(state id 1\) is missing"),
    (0, "exp_avg", _DROP, r"'exp_avg' of param 0 .* is missing"),
    (0, "fisher_count", _DROP, r"'fisher_count' of param 0 .* is missing \(the state has "
     r"'fisher'\)"),
    (0, "fisher", _DROP, r"'fisher' of param 0 .* is missing \(the state has 'fisher_count'\)"),
    (0, "exp_avg", lambda v: v.to(torch.int64), r"'exp_avg' of param 0 .* has dtype torch.int64"),
    (0, "fisher", lambda v: v.double(), r"'fisher' of param 0 .* has dtype torch.float64"),
    (1, "mask", lambda v: v.float(), r"'mask' of param 1 .* must have dtype torch.bool"),
    (0, "step", torch.tensor(-1.0), r"'step' of param 0 .* is -1.0: must be a whole number"),
    (0, "step", torch.tensor(float("nan")), r"'step' of param 0 .* is nan"),
    (0, "step", torch.tensor(1.5), r"'step' of param 0 .* is 1.5"),
    (0, "step", torch.ones(3), r"'step' of param 0 .* must be a number or a 0-dim tensor, "
     r"got \(3,\)"),
    (0, "fisher_count", torch.tensor(float("inf")), r"'fisher_count' of param 0 .* is inf"),
    (1, "exp_avg_sq", lambda v: -v, r"'exp_avg_sq' of param 1 .* has negative or NaN entries"),
    (1, "exp_avg_sq", lambda v: v.index_fill(0, torch.tensor([0]), float("nan")),
     r"'exp_avg_sq' of param 1 .* negative or NaN"),
    (1, "exp_avg", lambda v: v.reshape(-1), r"'exp_avg' of param 1 .* has shape \(12,\), the "
     r"param \(4, 3\)"),
    (0, "momentum_buffer", torch.zeros(5), r"param 0 .* unknown entries \['momentum_buffer'\]"),
    (0, "exp_avg", [0.0] * 5, r"'exp_avg' of param 0 .* must be a tensor, got list"),
]


@pytest.mark.parametrize("pid, key, value, message", BAD_PARAM_STATE,
                         ids=[f"{k}-{i}" for i, (_, k, _, _) in enumerate(BAD_PARAM_STATE)])
def test_bad_per_param_state_is_refused_and_changes_nothing(pid, key, value, message):
    source, _, _ = stepped()
    saved = source.state_dict()
    saved["state"] = _copy(saved["state"])
    _tamper(saved["state"][pid], key, value)
    target, _, _ = stepped(n_steps=3)
    before = snapshot(target)
    with pytest.raises(ValueError, match=message):
        target.load_state_dict(saved)
    assert_unchanged(target, before)


def test_amsgrad_state_needs_max_exp_avg_sq_and_unlearning_moments_come_together():
    source, _, _ = stepped(amsgrad=True)
    with source.unlearning(moments="separate"):
        source.step()
    saved = source.state_dict()
    for key, message in (("max_exp_avg_sq", r"'max_exp_avg_sq' of param 1 .* is missing"),
                         ("unlearn_exp_avg_sq", r"'unlearn_exp_avg_sq' of param 1 .* missing")):
        broken = dict(saved, state=_copy(saved["state"]))
        del broken["state"][1][key]
        target, _, _ = stepped(amsgrad=True)
        before = snapshot(target)
        with pytest.raises(ValueError, match=message):
            target.load_state_dict(broken)
        assert_unchanged(target, before)


def test_integer_step_of_older_checkpoints_becomes_a_float_tensor():
    source, a, b = stepped()
    saved = source.state_dict()
    saved["state"] = _copy(saved["state"])
    saved["state"][0]["step"] = 2  # torch < 1.12 saved Python ints
    saved["state"][1]["step"] = torch.tensor(2, dtype=torch.int64)
    target, ta, tb = stepped(n_steps=1)
    target.load_state_dict(saved)
    for p in (ta, tb):
        step = target.state[p]["step"]
        assert step.dtype == torch.float32 and step.dim() == 0 and step.item() == 2
    ta.grad, tb.grad = a.grad.clone(), b.grad.clone()
    with torch.no_grad():
        ta.copy_(a), tb.copy_(b)
    source.step()
    target.step()  # continues exactly like the source
    assert torch.equal(ta, a) and torch.equal(tb, b)


@pytest.mark.parametrize("torch_cls, kwargs", [
    (torch.optim.AdamW, dict(lr=3e-3, weight_decay=0.1, betas=(0.8, 0.95))),
    (torch.optim.AdamW, dict(lr=1e-3, amsgrad=True, maximize=True)),
    (torch.optim.Adam, dict(lr=2e-3)),
])
def test_torch_adamw_state_dict_migrates_and_training_continues_alike(torch_cls, kwargs):
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    twin = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    data = [(torch.randn(16, 6), torch.randn(16, 2)) for _ in range(12)]

    def train(m, opt, batches):
        for x, y in batches:
            opt.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            opt.step()

    reference = torch_cls(model.parameters(), foreach=False, **kwargs)
    train(model, reference, data[:5])
    saved = torch.load(_saved(reference.state_dict()), weights_only=True)
    twin.load_state_dict(model.state_dict())
    # Without migration the refusal says what to do.
    ours = FisherAdamW(twin.parameters(), fisher=None)
    with pytest.raises(ValueError, match=r"FisherAdamW.from_torch_state_dict"):
        ours.load_state_dict(saved)
    ours.load_state_dict(FisherAdamW.from_torch_state_dict(saved, fisher=None))
    group = ours.param_groups[0]
    assert group["lr"] == kwargs["lr"] and group["fisher"] is None
    assert "foreach" not in group and "decoupled_weight_decay" not in group
    train(model, reference, data[5:])
    train(twin, ours, data[5:])
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-7)
        assert ours.state[q]["step"].item() == 12


def test_torch_adam_with_l2_weight_decay_is_refused():
    p = torch.randn(3, requires_grad=True)
    adam = torch.optim.Adam([p], weight_decay=0.1)
    p.grad = torch.randn_like(p)
    adam.step()
    with pytest.raises(ValueError, match=r"torch.optim.Adam with weight_decay=0.1 \(L2"):
        FisherAdamW.from_torch_state_dict(adam.state_dict())


# ----------------------------------------------------------------------------- 4. silently wrong

CONTRADICTORY = [
    (dict(freeze_above=1.0, freeze_below=2.0), r"Invalid freeze_above: 1.0 < freeze_below 2.0"),
    (dict(freeze_above=-float("inf")), r"Invalid freeze_above: -inf \(it would freeze every"),
    (dict(freeze_below=float("inf")), r"Invalid freeze_below: inf \(it would freeze every"),
    (dict(freeze_above=-0.5), r"Invalid freeze_above: -0.5 \(the Fisher is >= 0"),
    (dict(freeze_below=0.1, fisher=None), r"Invalid freeze_below: 0.1 with fisher=None: the "
     "Fisher is never accumulated"),
    (dict(lr=torch.tensor(float("inf"))), r"Invalid lr: inf"),
    (dict(lr=torch.tensor(float("nan"))), r"Invalid lr: nan"),
]


@pytest.mark.parametrize("kwargs, message", CONTRADICTORY, ids=[str(k) for k, _ in CONTRADICTORY])
def test_contradictory_settings_are_refused_everywhere(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FisherAdamW([torch.zeros(3, requires_grad=True)], **kwargs)
    opt, a, b = stepped()
    before = snapshot(opt)
    with pytest.raises(ValueError, match=message):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], **kwargs})
    assert_unchanged(opt, before)
    if "fisher" not in kwargs:  # set later, e.g. by a schedule: refused at the step
        opt.param_groups[0].update(kwargs)
        before = snapshot(opt)
        with pytest.raises(ValueError, match=message):
            opt.step()
        assert_unchanged(opt, before)


def test_freeze_below_with_fisher_off_is_fine_inside_unlearning():
    opt, a, b = stepped()
    with opt.unlearning(freeze_below=opt.fisher_quantile(0.2)):  # the learning Fisher exists
        opt.step()


def test_cpu_tensor_lr_changed_in_place_is_revalidated():
    lr = torch.tensor(1e-2)
    a = torch.randn(4, requires_grad=True)
    opt = FisherAdamW([a], lr=lr)
    a.grad = torch.randn_like(a)
    opt.step()
    for value in (float("inf"), float("nan"), -1.0):
        lr.fill_(value)  # bumps lr._version: the cached StepHyper is rebuilt and refuses
        before = snapshot(opt)
        with pytest.raises(ValueError, match=r"Invalid lr"):
            opt.step()
        assert_unchanged(opt, before)
    lr.fill_(2e-2)
    opt.step()
    assert opt.state[a]["step"].item() == 2


@pytest.mark.parametrize("scale", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_grad_scale_is_refused(scale):
    opt, a, b = stepped()
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"Invalid grad_scale: .* \(must be a finite number > 0"):
        opt.step(grad_scale=torch.tensor(scale))
    assert_unchanged(opt, before)


def test_quantile_of_an_all_zero_fisher_warns_once():
    a = torch.randn(4, 3, requires_grad=True)
    opt = FisherAdamW([a])
    with pytest.warns(UserWarning, match=r"fisher_quantile\(0.9\): the Fisher is zero everywhere"):
        assert opt.fisher_quantile(0.9) == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.fisher_quantile(0.5)  # once
        a.grad = torch.randn_like(a)
        opt.step()
        opt.fisher_quantile(0.5)


def test_a_step_that_freezes_everything_warns_once_naming_the_setting():
    opt, a, b = stepped()
    opt.set_mask(a, torch.zeros(5, dtype=torch.bool))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # b's mask leaves elements free: no warning
    opt.set_mask(b, torch.zeros(4, 3, dtype=torch.bool))
    before = [a.detach().clone(), b.detach().clone()]
    with pytest.warns(UserWarning, match=r"froze every element of the optimizer \(by set_mask\)"):
        opt.step()
    assert torch.equal(a, before[0]) and torch.equal(b, before[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # once per optimizer

    opt, a, b = stepped()
    opt.param_groups[0]["freeze_above"] = 1e-30  # every accumulated Fisher is above it
    with pytest.warns(UserWarning, match=r"\(by freeze_above, set_mask\)"):
        opt.step()


# ----------------------------------------------------------------------------- 5. unclear errors


@pytest.mark.parametrize("kwargs, message", [
    (dict(found_inf=True), r"found_inf must be a 0-dim tensor or None, got bool"),
    (dict(grad_scale=2.0), r"grad_scale must be a 0-dim tensor or None, got float"),
])
def test_python_scalars_for_grad_scaler_arguments_are_refused_by_name(kwargs, message):
    opt, a, b = stepped()
    before = snapshot(opt)
    with pytest.raises(TypeError, match=message):
        opt.step(**kwargs)
    assert_unchanged(opt, before)


def test_explicit_backend_that_cannot_run_the_params_fails_at_construction(monkeypatch):
    from fisherforget import backends

    wide = torch.randn(3, dtype=torch.float64, requires_grad=True)
    for name in ("triton", "cuda"):
        # Not available here (cuda without a GPU) or unable to run fp64 params (triton).
        with pytest.raises(RuntimeError, match=rf"backend='{name}' (was requested but is not "
                           r"available|.*\(param 0 of group 0\))"):
            FisherAdamW([wide], backend=name)
        opt, a, b = stepped()
        before = snapshot(opt)
        with pytest.raises(RuntimeError, match=rf"backend='{name}' .*\(param 0 of group 1\)"):
            opt.add_param_group({"params": [torch.randn(2, requires_grad=True)],
                                 "backend": name} if name == "cuda" else
                                {"params": [wide], "backend": name})
        assert_unchanged(opt, before)
    if backends.is_available("triton"):  # without the interpreter Triton cannot run CPU tensors
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match=r"backend='triton' cannot run on cpu tensors"):
            FisherAdamW([torch.randn(3, requires_grad=True)], backend="triton")


def test_mask_on_the_meta_device_is_refused_clearly():
    opt, a, b = stepped()
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"mask is on the meta device"):
        opt.set_mask(a, torch.ones(5, dtype=torch.bool, device="meta"))
    assert_unchanged(opt, before)


# ----------------------------------------------------------------------------- 6. docs vs code


def test_plain_trainer_callback_prints_lwf_statistics_like_the_trainer(capsys):
    pytest.importorskip("transformers")
    from transformers import TrainerState

    from fisherforget.lwf import LearningWithForgetting, LWFConfig, LWFCallback
    from lwf_testing import make_samples

    callback = LWFCallback(LearningWithForgetting(None, None, make_samples(4), LWFConfig()))
    state = TrainerState()
    state.global_step = 7
    callback._log(state, {"lwf/fc_mean": 0.25, "lwf/selected": 3})
    assert state.log_history == [{"lwf/fc_mean": 0.25, "lwf/selected": 3, "step": 7}]
    assert "{'lwf/fc_mean': 0.25, 'lwf/selected': 3}" in capsys.readouterr().out


@pytest.mark.parametrize("cfg", [dict(lr=1e-3, weight_decay=1e-2),
                                 dict(lr=3e-3, weight_decay=0.5, betas=(0.8, 0.95)),
                                 dict(lr=2e-3, amsgrad=True, maximize=True, weight_decay=0.0)])
def test_adamw_parity_is_to_rounding_with_the_documented_bound(cfg):
    """What the docs promise: per element within 1e-6 * (|p| + lr*t) of the for-loop AdamW over
    200 steps (measured <= 2e-7: a few ulps of the step), not bitwise."""
    ours = [torch.randn(n, requires_grad=True) for n in (1, 7, 513, 33)]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    opt = FisherAdamW(ours, fisher=None, **cfg)
    ref = torch.optim.AdamW(theirs, foreach=False, **cfg)
    for t in range(1, 201):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
        for p, q in zip(ours, theirs):
            bound = 1e-6 * (q.detach().abs() + cfg["lr"] * t)
            assert bool(((p - q).abs() <= bound).all()), t


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fisher_quantile_is_what_its_docstring_says(dtype):
    params = [torch.randn(n, dtype=dtype, requires_grad=True) for n in (7, 300, 1001)]
    opt = FisherAdamW(params, fisher="sum")
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p) * 3
        opt.step()
    flat = torch.cat([opt.fisher(p).reshape(-1) for p in params])
    assert flat.dtype == dtype
    as_fp32 = flat.float().double()  # the documented computation: fp32 order statistics
    n = flat.numel()
    for q in (0.0, 0.1, 0.5, 0.77, 0.999, 1.0, 3 / (n - 1)):
        ours = opt.fisher_quantile(q)
        assert ours == pytest.approx(torch.quantile(as_fp32, q).item(), rel=1e-15, abs=0), q
        exact = torch.quantile(flat.double(), q).item()
        assert abs(ours - exact) <= 2.0 ** -24 * abs(exact), q
    # An order statistic itself is exact: bitwise the sorted fp32 value.
    assert opt.fisher_quantile(3 / (n - 1)) == flat.float().sort().values[3].item()


def test_fisher_mean_raises_where_fisher_quantile_does():
    opt, a, b = stepped()
    opt.state[a]["fisher"][1] = float("nan")
    for call in (opt.fisher_mean, lambda: opt.fisher_quantile(0.5)):
        with pytest.raises(ValueError, match=r"the Fisher has negative or NaN entries"):
            call()
    opt.state[a]["fisher"][1] = -1.0
    with pytest.raises(ValueError, match=r"fisher_mean: the Fisher has negative or NaN"):
        opt.fisher_mean()


def _readme_blocks():
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text[text.index("## Swap it in"):text.index("### What one step computes")]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_swap_in_snippet_runs_as_written():
    blocks = _readme_blocks()
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. a quantile of a zero Fisher would be a bug
        exec(compile(blocks[0], "README.md", "exec"), namespace)
    opt, model = namespace["opt"], namespace["model"]
    assert opt.state[model.weight]["step"].item() == 10
    assert "mask" in opt.state[model.weight]


def test_readme_trainer_snippet_builds_a_fisher_adamw(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from transformers import TrainingArguments

    from lwf_testing import make_samples, tiny_llama

    from fisherforget.lwf import collate

    snippet = _readme_blocks()[1]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2,
                             report_to=[], save_strategy="no", use_cpu=True)
    namespace = dict(model=tiny_llama(), args=args, train_dataset=make_samples(4),
                     FisherAdamW=FisherAdamW)
    exec(compile(snippet, "README.md", "exec"), namespace)
    trainer = namespace["trainer"]
    trainer.data_collator = collate
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer")
                      else trainer.optimizer, FisherAdamW)
