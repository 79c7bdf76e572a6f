"""Misuse (issue 12): unlearning phases, checkpoints, hyperparameter types, degenerate settings,
unclear errors. Every refusal leaves params, state, groups and step counts bitwise unchanged."""

from __future__ import annotations

import io
import json

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
