"""FisherAdamW on the reference backend: AdamW parity, float64 oracle, state dicts, AMP, API."""

from __future__ import annotations

import io
import math

import pytest
import torch

from fisherforget import FisherAdamW
from oracle import OracleState, oracle_step
from step_cases import ulp

# ----------------------------------------------------------------------------- helpers


def make_params(sizes, dtype=torch.float32, noncontiguous=False):
    params = []
    for n in sizes:
        if noncontiguous:
            # A non-contiguous leaf: the transpose of a (3, n) matrix.
            p = torch.randn(3, n, dtype=dtype).t().detach().requires_grad_()
            assert n == 1 or not p.is_contiguous()
        else:
            p = torch.randn(n, dtype=dtype, requires_grad=True)
        params.append(p)
    return params


def clone_params(params):
    return [p.detach().clone().requires_grad_() for p in params]


def set_grads(param_lists, scale=1.0, noncontiguous=False):
    """Give every list the same fresh random gradients."""
    for ps in zip(*param_lists):
        if noncontiguous and ps[0].dim() == 2:
            g = torch.randn(ps[0].shape[1], ps[0].shape[0], dtype=ps[0].dtype).t() * scale
        else:
            g = torch.randn_like(ps[0]) * scale
        for p in ps:
            p.grad = g.clone() if not noncontiguous else g


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------- AdamW parity

PARITY_CONFIGS = {
    "default": dict(lr=1e-3, weight_decay=1e-2),
    "big_wd": dict(lr=3e-3, weight_decay=0.5, betas=(0.8, 0.95)),
    "maximize": dict(lr=1e-3, weight_decay=0.1, maximize=True),
    "amsgrad": dict(lr=2e-3, weight_decay=0.0, amsgrad=True),
    "eps": dict(lr=1e-3, eps=1e-3, weight_decay=0.01),
    "amsgrad_maximize": dict(lr=1e-3, amsgrad=True, maximize=True, weight_decay=0.05),
}


@pytest.mark.parametrize("name", sorted(PARITY_CONFIGS))
@pytest.mark.parametrize("noncontiguous", [False, True])
def test_parity_with_torch_adamw(name, noncontiguous):
    cfg = PARITY_CONFIGS[name]
    ours = make_params([1, 7, 4097, 33], noncontiguous=noncontiguous)
    theirs = clone_params(ours)
    opt = FisherAdamW(ours, fisher=None, backend="reference", **cfg)
    ref = torch.optim.AdamW(theirs, foreach=False, **cfg)
    for _ in range(120):
        set_grads([ours, theirs], noncontiguous=noncontiguous)
        opt.step()
        ref.step()
    for p, q in zip(ours, theirs):
        assert rel_err(p, q) < 1e-6
        assert rel_err(opt.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"]) < 1e-6


def test_parity_groups_scheduler_tensor_lr_and_fisher_that_does_not_act():
    """Several groups with different settings, a scheduler, a tensor lr, and Fisher accumulation
    on but unused (scale 0, no thresholds): still AdamW."""
    a1, a2 = make_params([257, 5]), make_params([1000])
    b1, b2 = clone_params(a1), clone_params(a2)
    opt = FisherAdamW(
        [{"params": a1}, {"params": a2, "lr": 5e-3, "weight_decay": 0.0, "amsgrad": True}],
        lr=torch.tensor(1e-3), fisher="ema",
    )
    ref = torch.optim.AdamW(
        [{"params": b1}, {"params": b2, "lr": 5e-3, "weight_decay": 0.0, "amsgrad": True}],
        lr=torch.tensor(1e-3), foreach=False,
    )
    s1 = torch.optim.lr_scheduler.StepLR(opt, step_size=30, gamma=0.5)
    s2 = torch.optim.lr_scheduler.StepLR(ref, step_size=30, gamma=0.5)
    for _ in range(110):
        set_grads([a1 + a2, b1 + b2])
        opt.step()
        ref.step()
        s1.step()
        s2.step()
    for p, q in zip(a1 + a2, b1 + b2):
        assert rel_err(p, q) < 1e-6
    assert opt.param_groups[1]["lr"] == ref.param_groups[1]["lr"]


def test_fused_torch_adamw_cpu_agrees_too():
    ours = make_params([4097])
    theirs = clone_params(ours)
    opt = FisherAdamW(ours, lr=1e-3, fisher=None)
    ref = torch.optim.AdamW(theirs, lr=1e-3, fused=True)
    for _ in range(100):
        set_grads([ours, theirs])
        opt.step()
        ref.step()
    assert rel_err(ours[0], theirs[0]) < 1e-6


# ----------------------------------------------------------------------------- float64 oracle

ORACLE_CONFIGS = {
    "ema": dict(fisher="ema", fisher_beta=0.9),
    "mean": dict(fisher="mean"),
    "sum": dict(fisher="sum"),
    "scale": dict(fisher="ema", fisher_beta=0.8, fisher_scale=3.0),
    "freeze_above": dict(fisher="mean", freeze_above=0.8),
    "freeze_below": dict(fisher="sum", freeze_below=1.5),
    "mask": dict(fisher="ema", mask=True),
    "all": dict(fisher="ema", fisher_beta=0.7, fisher_scale=0.5, freeze_above=2.0,
                freeze_below=0.05, mask=True, amsgrad=True, maximize=True),
    "scale_no_accumulation": dict(fisher=None, fisher_scale=2.0, freeze_above=1.0),
}


def _oracle_state_of(opt, p):
    st = opt.state[p]
    return OracleState(
        param=p.detach().double().clone(),
        exp_avg=st["exp_avg"].double().clone(),
        exp_avg_sq=st["exp_avg_sq"].double().clone(),
        max_exp_avg_sq=st["max_exp_avg_sq"].double().clone() if "max_exp_avg_sq" in st else None,
        fisher=st["fisher"].double().clone() if "fisher" in st else None,
        step=int(st["step"].item()),
        fisher_count=int(st["fisher_count"].item()) if "fisher_count" in st else 0,
    )


@pytest.mark.parametrize("name", sorted(ORACLE_CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_against_float64_oracle(name, dtype):
    cfg = dict(ORACLE_CONFIGS[name])
    use_mask = cfg.pop("mask", False)
    hyper = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    params = make_params([1, 7, 4097], dtype=dtype)
    opt = FisherAdamW(params, backend="reference", **hyper, **cfg)
    masks = {}
    if use_mask:
        for p in params:
            masks[p] = torch.rand(p.shape) > 0.3
            opt.set_mask(p, masks[p])
    # Warm the state (Fisher, moments) for a few steps before checking step by step, so that
    # thresholds and the scale act on non-trivial values.
    for step in range(12):
        grads = [torch.randn_like(p) for p in params]
        expected = []
        for p, g in zip(params, grads):
            p.grad = g
            if "fisher" not in opt.state.get(p, {}) and step == 0:
                expected.append(None)
                continue
            expected.append(oracle_step(_oracle_state_of(opt, p), g, mask=masks.get(p),
                                        **hyper, **cfg))
        before = [p.detach().clone() for p in params]
        opt.step()
        for p, prev, exp in zip(params, before, expected):
            if exp is None:
                continue
            new, frozen = exp
            st = opt.state[p]
            # Elements within rounding of a threshold may legitimately flip; leave them out.
            near = torch.zeros_like(frozen)
            for thr in (cfg.get("freeze_above"), cfg.get("freeze_below")):
                if thr is not None:
                    near |= (new.fisher - thr).abs() <= 1e-5 * thr
            check = ~near
            assert torch.equal(p.detach()[frozen & check], prev[frozen & check])
            # Param: within 1 ulp of its dtype of the float64 oracle, plus fp32 math noise on the
            # old value and on the update (at most ~lr in size).
            tol = ulp(new.param, dtype) + 1e-6 * (prev.double().abs() + hyper["lr"])
            err = (p.detach().double() - new.param).abs()
            assert bool((err[check] <= tol[check]).all()), f"max err {err[check].max()}"
            for key, value in (("exp_avg", new.exp_avg), ("exp_avg_sq", new.exp_avg_sq),
                               ("fisher", new.fisher), ("max_exp_avg_sq", new.max_exp_avg_sq)):
                if value is None:
                    continue
                got = st[key]
                assert got.dtype == torch.float32  # fp32 state also for bf16/fp16 params
                # fp32 rounding of terms that cancel: absolute tolerance relative to the scale.
                atol = 1e-6 * value.abs().max().item() + 1e-12
                assert torch.allclose(got.double()[check], value[check], rtol=2e-6, atol=atol)
            assert st["step"].item() == new.step
    if use_mask:
        for p in params:
            assert torch.equal(opt.state[p]["mask"], masks[p])


def test_grad_scale_and_found_inf_kwargs_match_the_oracle():
    params = make_params([513])
    opt = FisherAdamW(params, lr=1e-2, fisher="mean", fisher_scale=1.0)
    hyper = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    for step in range(5):
        g = torch.randn_like(params[0]) * 1024.0
        params[0].grad = g
        state = _oracle_state_of(opt, params[0]) if step else None
        found = step == 3
        opt.step(grad_scale=torch.tensor(1024.0), found_inf=torch.tensor(float(found)))
        if state is not None:
            new, _ = oracle_step(state, g, fisher="mean", fisher_scale=1.0, grad_scale=1024.0,
                                 found_inf=found, **hyper)
            assert torch.allclose(params[0].detach().double(), new.param, rtol=1e-6)
            assert torch.allclose(opt.state[params[0]]["fisher"].double(), new.fisher, rtol=1e-6)
            assert opt.state[params[0]]["step"].item() == new.step
            assert opt.state[params[0]]["fisher_count"].item() == new.fisher_count


def test_float64_params_keep_float64_state():
    p = torch.randn(100, dtype=torch.float64, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    opt = FisherAdamW([p], lr=1e-2, fisher=None)
    ref = torch.optim.AdamW([q], lr=1e-2, foreach=False)
    for _ in range(50):
        g = torch.randn_like(p)
        p.grad, q.grad = g, g.clone()
        opt.step()
        ref.step()
    assert opt.state[p]["exp_avg"].dtype == torch.float64
    assert rel_err(p, q) < 1e-13


# ----------------------------------------------------------------------------- state dict


def _train(model, opt, batches, scaler=None):
    for x, y in batches:
        loss = torch.nn.functional.mse_loss(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _model(dtype):
    torch.manual_seed(7)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(),
                               torch.nn.Linear(32, 4)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("settings", [
    dict(fisher="mean", amsgrad=True),
    dict(fisher="ema", fisher_scale=2.0, freeze_above=0.5),
])
def test_resume_is_bitwise_identical(dtype, settings):
    batches = [(torch.randn(8, 16, dtype=dtype), torch.randn(8, 4)) for _ in range(20)]
    full = _model(dtype)
    opt_full = FisherAdamW(full.parameters(), lr=1e-2, **settings)
    mask = torch.rand(32, 16) > 0.5
    opt_full.set_mask(full[0].weight, mask)
    _train(full, opt_full, batches)

    first = _model(dtype)
    opt_first = FisherAdamW(first.parameters(), lr=1e-2, **settings)
    opt_first.set_mask(first[0].weight, mask)
    _train(first, opt_first, batches[:9])
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt_first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed = _model(dtype)
    resumed.load_state_dict(saved["model"])
    opt_resumed = FisherAdamW(resumed.parameters(), lr=1e-2, **settings)
    opt_resumed.load_state_dict(saved["opt"])
    for p in resumed.parameters():
        st = opt_resumed.state[p]
        assert st["exp_avg"].dtype == torch.float32 and st["fisher"].dtype == torch.float32
    assert opt_resumed.state[resumed[0].weight]["mask"].dtype == torch.bool
    _train(resumed, opt_resumed, batches[9:])

    for p, q in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(full.parameters(), resumed.parameters()):
        for key, value in opt_full.state[p].items():
            assert torch.equal(value, opt_resumed.state[q][key]), key


# ----------------------------------------------------------------------------- AMP


def test_grad_scaler_on_cpu_skips_inf_steps_and_unscales_finite_ones():
    torch.manual_seed(3)
    model = torch.nn.Linear(8, 8)
    plain = torch.nn.Linear(8, 8)
    plain.load_state_dict(model.state_dict())
    opt = FisherAdamW(model.parameters(), lr=1e-2, fisher="ema")
    opt_plain = FisherAdamW(plain.parameters(), lr=1e-2, fisher="ema")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    for step in range(6):
        x = torch.randn(4, 8)
        scaler.scale(model(x).square().mean()).backward()
        plain(x).square().mean().backward()
        if step == 2:
            model.weight.grad[0, 0] = float("inf")
            before = {k: v.clone() for k, v in model.state_dict().items()}
            fisher_before = opt.fisher(model.weight).clone()
            step_before = opt.state[model.weight]["step"].clone()
            scaler.step(opt)
            scaler.update()
            for k, v in model.state_dict().items():
                assert torch.equal(v, before[k])
            assert torch.equal(opt.fisher(model.weight), fisher_before)
            assert torch.equal(opt.state[model.weight]["step"], step_before)
            assert scaler.get_scale() == 2.0**9
            opt.zero_grad()
            opt_plain.zero_grad()
            continue
        scaler.step(opt)
        scaler.update()
        opt_plain.step()
        opt.zero_grad()
        opt_plain.zero_grad()
    for p, q in zip(model.parameters(), plain.parameters()):
        assert torch.allclose(p, q, rtol=1e-6, atol=1e-7)
    assert torch.allclose(opt.fisher(model.weight), opt_plain.fisher(plain.weight), rtol=1e-5)


# ----------------------------------------------------------------------------- API


def test_params_without_grads_are_skipped():
    a, b = make_params([10, 10])
    opt = FisherAdamW([a, b], lr=1e-2)
    b_before = b.detach().clone()
    a.grad = torch.randn_like(a)
    opt.step()
    assert b not in opt.state or "step" not in opt.state[b]
    assert torch.equal(b, b_before)
    assert opt.state[a]["step"].item() == 1


def test_closure_is_called_and_its_loss_returned():
    p = make_params([5])[0]
    opt = FisherAdamW([p], lr=1e-2)
    calls = []

    def closure():
        opt.zero_grad()
        loss = p.square().sum()
        loss.backward()
        calls.append(1)
        return loss

    loss = opt.step(closure)
    assert calls == [1]
    assert torch.is_tensor(loss) and loss.item() > 0


def test_mask_freezes_exactly_the_false_elements():
    p = make_params([1000])[0]
    opt = FisherAdamW([p], lr=1e-2)
    mask = torch.rand(1000) > 0.5
    opt.set_mask(p, mask)
    before = p.detach().clone()
    for _ in range(3):
        p.grad = torch.randn_like(p)
        opt.step()
    assert torch.equal(p.detach()[~mask], before[~mask])
    assert bool((p.detach()[mask] != before[mask]).all())
    assert bool((opt.state[p]["exp_avg"][~mask] == 0).all())
    assert bool((opt.fisher(p)[~mask] > 0).all())  # the Fisher accumulates everywhere
    opt.set_mask(p, None)
    p.grad = torch.randn_like(p)
    opt.step()
    assert bool((p.detach()[~mask] != before[~mask]).all())


def test_fisher_mean_and_quantile_match_torch():
    params = make_params([1, 7, 4097, 300])
    opt = FisherAdamW(params, lr=1e-3, fisher="sum")
    for _ in range(3):
        set_grads([params])
        opt.step()
    flat = torch.cat([opt.fisher(p).reshape(-1) for p in params])
    assert math.isclose(opt.fisher_mean(), flat.double().mean().item(), rel_tol=1e-12)
    for q in (0.0, 0.1, 0.5, 0.77, 0.999, 1.0):
        assert math.isclose(opt.fisher_quantile(q), torch.quantile(flat.double(), q).item(),
                            rel_tol=1e-6), q


def test_fisher_of_unstepped_param_is_zero():
    p = make_params([4])[0]
    opt = FisherAdamW([p])
    assert torch.equal(opt.fisher(p), torch.zeros(4))
    assert opt.fisher_mean() == 0.0


def test_unlearning_context_ascends_freezes_fisher_and_restores_settings():
    p = make_params([200])[0]
    opt = FisherAdamW([p], lr=1e-2, fisher="ema", fisher_scale=0.0)
    for _ in range(3):
        p.grad = torch.randn_like(p)
        opt.step()
    fisher_before = opt.fisher(p).clone()
    saved = dict(opt.param_groups[0])
    with opt.unlearning(lr=0.05, fisher_scale=1.0, freeze_above=opt.fisher_quantile(0.9)):
        group = opt.param_groups[0]
        assert group["maximize"] and group["fisher"] is None and group["lr"] == 0.05
        target = torch.randn_like(p)
        loss_before = (p - target).square().sum().item()
        for _ in range(5):
            p.grad = 2 * (p.detach() - target)
            opt.step()
        assert (p - target).square().sum().item() > loss_before  # ascended
        assert torch.equal(opt.fisher(p), fisher_before)
    assert {k: v for k, v in opt.param_groups[0].items() if k != "params"} == \
        {k: v for k, v in saved.items() if k != "params"}

    with pytest.raises(KeyError):
        with opt.unlearning(lr=0.5):
            raise KeyError("boom")
    assert opt.param_groups[0]["lr"] == 1e-2 and not opt.param_groups[0]["maximize"]


def test_unlearning_with_separate_moments_keeps_learning_moments():
    p = make_params([50])[0]
    opt = FisherAdamW([p], lr=1e-2)
    p.grad = torch.randn_like(p)
    opt.step()
    learn = {k: opt.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq", "step")}
    with opt.unlearning(moments="separate"):
        for _ in range(2):
            p.grad = torch.randn_like(p)
            opt.step()
        assert opt.state[p]["step"].item() == 2
    for k, v in learn.items():
        assert torch.equal(opt.state[p][k], v)
    assert opt.state[p]["unlearn_step"].item() == 2
    with opt.unlearning(moments="separate"):
        assert opt.state[p]["step"].item() == 2  # its own moments persist across phases


def test_add_param_group_and_per_group_fisher_settings():
    a, b = make_params([30, 30])
    opt = FisherAdamW([a], lr=1e-2, fisher="ema")
    opt.add_param_group({"params": [b], "fisher": None, "lr": 1e-3})
    set_grads([[a, b]])
    opt.step()
    assert "fisher" in opt.state[a] and "fisher" not in opt.state[b]
    assert opt.param_groups[1]["betas"] == (0.9, 0.999)
