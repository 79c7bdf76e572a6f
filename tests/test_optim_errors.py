"""Bad input: each case raises a clear error naming the parameter and the problem, and nothing
(params, state, param groups) changes."""

from __future__ import annotations

import copy

import pytest
import torch

from fisherforget import FisherAdamW, ops

# (constructor kwargs, exception type, message regex)
BAD_HYPERPARAMETERS = [
    (dict(lr=-1e-3), ValueError, r"Invalid lr: -0.001"),
    (dict(lr=float("nan")), ValueError, r"Invalid lr"),
    (dict(lr=torch.tensor(-1.0)), ValueError, r"Invalid lr"),
    (dict(lr=torch.tensor([1e-3, 1e-3])), ValueError, r"Invalid lr: a tensor lr must be 0-dim"),
    (dict(betas=(1.0, 0.999)), ValueError, r"Invalid betas\[0\]: 1.0 \(must be in \[0, 1\)\)"),
    (dict(betas=(0.9, -0.1)), ValueError, r"Invalid betas\[1\]"),
    (dict(betas=(0.9,)), ValueError, r"Invalid betas: \(0.9,\)"),
    (dict(betas=(torch.tensor(0.9), 0.99)), TypeError, r"Invalid betas\[0\]: tensor betas"),
    (dict(eps=-1e-8), ValueError, r"Invalid eps"),
    (dict(weight_decay=-0.1), ValueError, r"Invalid weight_decay"),
    (dict(amsgrad=1), TypeError, r"Invalid amsgrad"),
    (dict(fisher="diag"), ValueError, r"Invalid fisher: 'diag'"),
    (dict(fisher_beta=1.0), ValueError, r"Invalid fisher_beta: 1.0"),
    (dict(fisher_beta=-0.5), ValueError, r"Invalid fisher_beta"),
    (dict(fisher_scale=-2.0), ValueError, r"Invalid fisher_scale"),
    (dict(freeze_above="high"), ValueError, r"Invalid freeze_above: 'high'"),
    (dict(freeze_below=float("nan")), ValueError, r"Invalid freeze_below"),
    (dict(state_dtype=torch.float16), ValueError, r"Invalid state_dtype: torch.float16"),
    (dict(fisher_dtype=torch.int32), ValueError, r"Invalid fisher_dtype"),
    (dict(backend="tpu"), ValueError, r"Invalid backend: 'tpu'"),
]


@pytest.mark.parametrize("kwargs, exc, message", BAD_HYPERPARAMETERS,
                         ids=[str(k) for k, _, _ in BAD_HYPERPARAMETERS])
def test_bad_hyperparameters(kwargs, exc, message):
    with pytest.raises(exc, match=message):
        FisherAdamW([torch.zeros(3, requires_grad=True)], **kwargs)


@pytest.mark.parametrize("kwargs, exc, message", BAD_HYPERPARAMETERS[:6],
                         ids=[str(k) for k, _, _ in BAD_HYPERPARAMETERS[:6]])
def test_bad_add_param_group_adds_nothing(kwargs, exc, message):
    opt = FisherAdamW([torch.randn(3, requires_grad=True)])
    with pytest.raises(exc, match=message):
        opt.add_param_group({"params": [torch.randn(2, requires_grad=True)], **kwargs})
    assert len(opt.param_groups) == 1


def test_unsupported_param_dtype():
    with pytest.raises(TypeError, match="supports params of dtypes"):
        FisherAdamW([torch.zeros(3, dtype=torch.complex64, requires_grad=True)])


def _snapshot(opt, params):
    return (
        [p.detach().clone() for p in params],
        copy.deepcopy({id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}),
        copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]),
    )


def _assert_unchanged(opt, params, snapshot):
    params_before, state_before, groups_before = snapshot
    for p, before in zip(params, params_before):
        assert torch.equal(p.detach(), before)
    for p, s in opt.state.items():
        for k, v in s.items():
            assert torch.equal(v, state_before[id(p)][k])
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == \
        groups_before


def _stepped_optimizer():
    """An optimizer with real state, whose first param is fine and second is about to go bad."""
    good = torch.randn(5, requires_grad=True)
    bad = torch.randn(4, 3, requires_grad=True)
    opt = FisherAdamW([good, bad], lr=1e-2)
    good.grad, bad.grad = torch.randn_like(good), torch.randn_like(bad)
    opt.step()
    good.grad = torch.randn_like(good)
    return opt, good, bad


def _allow_any_grad_dtype(p):
    if hasattr(p, "grad_dtype"):  # newer torch refuses a mismatched .grad unless told not to
        p.grad_dtype = None


BAD_GRADS = {
    "sparse": (lambda p: torch.randn_like(p).to_sparse(), RuntimeError, "sparse gradients"),
    "dtype": (lambda p: _allow_any_grad_dtype(p) or torch.randn_like(p, dtype=torch.float64),
              RuntimeError,
              r"gradient dtype torch.float64 does not match param 1 of group 0"),
    "complex": (lambda p: _allow_any_grad_dtype(p) or torch.randn_like(p, dtype=torch.complex64),
                RuntimeError,
                r"does not support complex tensors: param 1 of group 0 \(shape \(4, 3\)\)"),
}


@pytest.mark.parametrize("case", sorted(BAD_GRADS))
def test_bad_gradient_changes_nothing(case):
    make_grad, exc, message = BAD_GRADS[case]
    opt, good, bad = _stepped_optimizer()
    bad.grad = make_grad(bad)
    snapshot = _snapshot(opt, [good, bad])
    with pytest.raises(exc, match=message):
        opt.step()
    _assert_unchanged(opt, [good, bad], snapshot)


def test_bad_step_time_hyperparameter_changes_nothing():
    opt, good, bad = _stepped_optimizer()
    bad.grad = torch.randn_like(bad)
    opt.param_groups[0]["betas"] = (0.9, 1.5)  # e.g. a buggy scheduler
    snapshot = _snapshot(opt, [good, bad])
    with pytest.raises(ValueError, match=r"Invalid betas\[1\]"):
        opt.step()
    _assert_unchanged(opt, [good, bad], snapshot)


@pytest.mark.parametrize("mask, exc, message", [
    (torch.ones(4, dtype=torch.bool), ValueError, r"mask shape \(4,\) does not match .*\(4, 3\)"),
    (torch.ones(4, 3), TypeError, r"mask must have dtype torch.bool, got torch.float32"),
    ([[True] * 3] * 4, TypeError, r"mask must be a torch.Tensor"),
])
def test_bad_mask(mask, exc, message):
    opt, good, bad = _stepped_optimizer()
    snapshot = _snapshot(opt, [good, bad])
    with pytest.raises(exc, match=message):
        opt.set_mask(bad, mask)
    _assert_unchanged(opt, [good, bad], snapshot)


def test_mask_for_foreign_param():
    opt, _, _ = _stepped_optimizer()
    stranger = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match="not a parameter of this optimizer"):
        opt.set_mask(stranger, torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="not a parameter of this optimizer"):
        opt.fisher(stranger)


def test_bad_quantile():
    opt, _, _ = _stepped_optimizer()
    with pytest.raises(ValueError, match=r"Invalid q: 1.5"):
        opt.fisher_quantile(1.5)


def test_bad_unlearning_settings_change_nothing():
    opt, good, bad = _stepped_optimizer()
    snapshot = _snapshot(opt, [good, bad])
    with pytest.raises(ValueError, match=r"Invalid lr"):
        with opt.unlearning(lr=-1.0):
            pass
    with pytest.raises(ValueError, match=r"unknown group settings: \['learning_rate'\]"):
        with opt.unlearning(learning_rate=1.0):
            pass
    with pytest.raises(ValueError, match=r"Invalid moments"):
        with opt.unlearning(moments="fresh"):
            pass
    _assert_unchanged(opt, [good, bad], snapshot)


def test_state_dict_from_another_optimizer_is_refused():
    opt, good, bad = _stepped_optimizer()
    adamw = torch.optim.AdamW([good, bad])
    good.grad, bad.grad = torch.randn_like(good), torch.randn_like(bad)
    adamw.step()
    snapshot = _snapshot(opt, [good, bad])
    with pytest.raises(ValueError, match=r"not produced by FisherAdamW: param group 0 lacks"):
        opt.load_state_dict(adamw.state_dict())
    _assert_unchanged(opt, [good, bad], snapshot)


def test_state_dict_from_another_layout_is_refused():
    opt, good, bad = _stepped_optimizer()
    saved = opt.state_dict()
    # Same number of params, different shapes.
    a, b = torch.randn(5, requires_grad=True), torch.randn(12, requires_grad=True)
    other = FisherAdamW([a, b])
    with pytest.raises(ValueError, match=r"has shape \(4, 3\), the param \(12,\)"):
        other.load_state_dict(saved)
    assert len(other.state) == 0
    # Different number of params.
    lone = FisherAdamW([torch.randn(5, requires_grad=True)])
    with pytest.raises(ValueError, match="a different parameter layout"):
        lone.load_state_dict(saved)
    with pytest.raises(ValueError, match="has 1 param groups"):
        FisherAdamW([{"params": [a]}, {"params": [b]}]).load_state_dict(
            FisherAdamW([a, b]).state_dict())


def test_unavailable_backend_says_why():
    from fisherforget import backends

    for name in ("cuda", "triton"):
        if not backends.is_available(name):
            with pytest.raises(RuntimeError, match=f"backend='{name}' was requested but is not"):
                FisherAdamW([torch.zeros(2, requires_grad=True)], backend=name)


def test_mask_that_no_longer_fits_its_param_changes_nothing():
    """A param whose data was swapped for another shape after ``set_mask``: the step refuses
    before touching anything (also the other, healthy param)."""
    opt, good, bad = _stepped_optimizer()
    opt.set_mask(bad, torch.rand(4, 3) > 0.5)
    bad.data = torch.randn(12)
    bad.grad = torch.randn(12)
    snapshot = _snapshot(opt, [good, bad])
    with pytest.raises(RuntimeError, match=r"the mask of param 1 of group 0 \(shape \(12,\)\) "
                       r"no longer matches it; set_mask again"):
        opt.step()
    _assert_unchanged(opt, [good, bad], snapshot)


@pytest.mark.parametrize("key, value, message", [
    ("lr", -1.0, r"Invalid lr: -1.0"),
    ("betas", (0.9, 1.0), r"Invalid betas\[1\]: 1.0"),
    ("fisher", "fim", r"Invalid fisher: 'fim'"),
    ("state_dtype", "float16", r"Invalid state_dtype: torch.float16"),
    ("fisher_dtype", "float17", r"Invalid fisher_dtype: 'float17'"),
    ("backend", "tpu", r"Invalid backend: 'tpu'"),
])
def test_tampered_state_dict_is_refused(key, value, message):
    """A FisherAdamW state dict whose saved group settings are invalid is refused like bad
    constructor arguments, and the loading optimizer keeps its own state."""
    opt, good, bad = _stepped_optimizer()
    saved = opt.state_dict()
    saved["param_groups"][0][key] = value
    target, target_good, target_bad = _stepped_optimizer()
    snapshot = _snapshot(target, [target_good, target_bad])
    with pytest.raises(ValueError, match=message):
        target.load_state_dict(saved)
    _assert_unchanged(target, [target_good, target_bad], snapshot)


def test_state_dict_stores_dtypes_by_name_and_loads_both_forms():
    """Group dtypes are saved as names (``torch.distributed.checkpoint`` gathers only tensors,
    numbers and strings); names and ``torch.dtype`` values both load back to dtypes."""
    opt, good, bad = _stepped_optimizer()
    saved = opt.state_dict()
    assert saved["param_groups"][0]["state_dtype"] == "float32"
    assert saved["param_groups"][0]["fisher_dtype"] == "float32"
    for form in ("bfloat16", torch.bfloat16):
        saved["param_groups"][0]["state_dtype"] = form
        opt.load_state_dict(saved)
        assert opt.param_groups[0]["state_dtype"] is torch.bfloat16


def test_mixed_dtypes_and_devices_in_one_group_are_supported():
    """Not bad input: one group may mix param dtypes and devices (the optimizer launches once
    per (device, dtype) bucket, docs/design.md). Each param gets exactly the step it gets alone.
    (A gradient whose dtype differs from its param's is refused, see ``BAD_GRADS``; torch itself
    refuses a gradient on another device.)"""
    params = [
        torch.randn(5, dtype=dtype, requires_grad=True)
        for dtype in (torch.float32, torch.bfloat16, torch.float64, torch.float16)
    ]
    meta = torch.empty(3, device="meta", requires_grad=True)
    grads = [torch.randn_like(p) for p in params]
    alone = [p.detach().clone().requires_grad_() for p in params]
    opt = FisherAdamW(params + [meta], lr=1e-2, fisher_scale=1.0)
    for p, g in zip(params, grads):
        p.grad = g.clone()
    meta.grad = torch.empty(3, device="meta")
    opt.step()
    assert opt.state[meta]["fisher"].device.type == "meta"
    for p, q, g in zip(params, alone, grads):
        single = FisherAdamW([q], lr=1e-2, fisher_scale=1.0)
        q.grad = g.clone()
        single.step()
        assert torch.equal(p, q), p.dtype
        assert torch.equal(opt.fisher(p), single.fisher(q))


def test_a_backend_refusing_its_second_bucket_changes_nothing(monkeypatch):
    """Every backend check of a step runs before the first launch: a refusal of the second
    bucket (here: the bf16 one) leaves the first bucket's params and state untouched."""
    from fisherforget import backends
    from fisherforget.backends import reference

    name = "refuses_second_bucket"
    ops.register("fused_step", name)(reference.fused_step)

    def refuse_bf16(tensors, hyper):
        if tensors.params[0].dtype == torch.bfloat16:
            raise RuntimeError("refuses_second_bucket: bf16 bucket refused")

    ops.register_check("fused_step", name)(refuse_bf16)
    monkeypatch.setattr(backends, "resolve", lambda requested, device, dtype: name)
    try:
        first = torch.nn.Parameter(torch.randn(5))
        second = torch.nn.Parameter(torch.randn(5, dtype=torch.bfloat16))
        opt = FisherAdamW([first, second], lr=1e-2)
        first.grad, second.grad = torch.randn(5), torch.randn(5, dtype=torch.bfloat16)
        before = (first.detach().clone(), second.detach().clone())
        with pytest.raises(RuntimeError, match="bf16 bucket refused"):
            opt.step()
        assert torch.equal(first, before[0]) and torch.equal(second, before[1])
        assert all(float(s["step"]) == 0 for s in opt.state.values())
        assert all(float(s["exp_avg"].abs().sum()) == 0 for s in opt.state.values())
    finally:
        ops._IMPLS["fused_step"].pop(name)
        ops._CHECKS["fused_step"].pop(name)
