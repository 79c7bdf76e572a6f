"""Forgetting confidence and the other scorers against brute-force float64 autograd of their
definitions (per-sample gradients one by one, then the sums directly)."""

import copy

import pytest
import torch
import torch.nn.functional as F

from fisherforget import FisherAdamW, backends
from fisherforget.fisher import IGNORE_INDEX, per_sample_gradients, resolve_params
from fisherforget.lwf import (
    SCORE_METHODS,
    ForgettingScores,
    LearningWithForgetting,
    LWFConfig,
    batches_of,
    control_scores,
    forgetting_confidence,
    mean_gradient,
    optimizer_direction,
    optimizer_fisher,
    score_terms,
    select,
    swapped_weights,
)
from lwf_testing import learn_batches, make_samples, tiny_llama

BETA1, FISHER_BETA = 0.8, 0.7


def trained_setup(steps=3):
    """A tiny model after a few FisherAdamW steps, with float64 records of what the optimizer saw:
    the first moment m and the EMA Fisher, recomputed here from the recorded gradients."""
    model = tiny_llama()
    opt = FisherAdamW(model.parameters(), lr=1e-2, betas=(BETA1, 0.99), fisher="ema",
                      fisher_beta=FISHER_BETA)
    m = [torch.zeros_like(p, dtype=torch.float64) for p in model.parameters()]
    fisher = [torch.zeros_like(p, dtype=torch.float64) for p in model.parameters()]
    for batch in learn_batches(steps):
        model(**batch).loss.backward()
        for i, p in enumerate(model.parameters()):
            g = p.grad.double()
            m[i] = BETA1 * m[i] + (1 - BETA1) * g
            fisher[i] = FISHER_BETA * fisher[i] + (1 - FISHER_BETA) * g * g
        opt.step()
        opt.zero_grad()
    gbar = [t / (1 - BETA1**steps) for t in m]
    return model, opt, gbar, fisher


def brute_sample_grad(model64, sample):
    ids = sample["input_ids"].unsqueeze(0)
    labels = sample["labels"]
    logits = model64(input_ids=ids).logits[0, :-1]
    loss = F.cross_entropy(logits, labels[1:], ignore_index=IGNORE_INDEX)  # token mean
    return [g.detach() for g in torch.autograd.grad(loss, list(model64.parameters()))]



def brute_terms(model, samples, names=None):
    """float64 per-sample gradients of the chosen params (all by default), one sample at a time."""
    model64 = copy.deepcopy(model).double()
    all_names = [n for n, _ in model.named_parameters()]
    keep = [i for i, n in enumerate(all_names) if names is None or n in names]
    return [[brute_sample_grad(model64, s)[i] for i in keep] for s in samples], keep


def paper_fc(grads, theta0, theta_star, fisher, alpha, normalize=False):
    """FC(x) = 0.5 sum F (theta_0 - alpha g_x - theta*)^2 - 0.5 sum F (theta_0 - theta*)^2,
    computed from its definition (not from the expanded form the library uses)."""
    out = []
    for g in grads:
        if normalize:
            norm = torch.sqrt(sum((t * t).sum() for t in g))
            g = [t / norm for t in g]
        moved = sum((f * (t0 - alpha * gi - ts) ** 2).sum()
                    for f, t0, gi, ts in zip(fisher, theta0, g, theta_star))
        const = sum((f * (t0 - ts) ** 2).sum() for f, t0, ts in zip(fisher, theta0, theta_star))
        out.append(0.5 * moved - 0.5 * const)
    return torch.stack(out)


def loss_change(grads, gbar, fisher, eta, normalize=False):
    out = []
    for g in grads:
        if normalize:
            norm = torch.sqrt(sum((t * t).sum() for t in g))
            g = [t / norm for t in g]
        first = sum((d * t).sum() for d, t in zip(gbar, g))
        second = sum((f * t * t).sum() for f, t in zip(fisher, g))
        out.append(-(eta * first + 0.5 * eta**2 * second))
    return torch.stack(out)


def tolerance(expected):
    return dict(rtol=2e-4, atol=1e-6 * float(expected.abs().max()))


@pytest.mark.parametrize("method", SCORE_METHODS)
@pytest.mark.parametrize("normalize", [False, True])
def test_paper_fc_matches_its_definition(method, normalize):
    """The paper's FC with g_x at theta_0 (the weights before training), theta*_L the trained
    weights and F_L the optimizer's Fisher, against the Gaussian's quadratic form itself."""
    model = tiny_llama()
    theta0 = [p.detach().double().clone() for p in model.parameters()]
    start = copy.deepcopy(model)
    opt = FisherAdamW(model.parameters(), lr=1e-2, betas=(BETA1, 0.99), fisher="ema",
                      fisher_beta=FISHER_BETA)
    for batch in learn_batches(3):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    params = list(model.parameters())
    fisher = optimizer_fisher(opt, params)
    delta = [p.detach() - t.float() for p, t in zip(params, theta0)]
    samples = make_samples(7, seed=9)
    alpha = 0.3
    with swapped_weights(params, [t.float() for t in theta0]):
        scores = forgetting_confidence(model, batches_of(samples, 3), fisher, delta=delta,
                                       alpha=alpha, normalize=normalize, method=method)
    grads, _ = brute_terms(start, samples)  # g_x at theta_0
    expected = paper_fc(grads, theta0, [p.detach().double() for p in params],
                        [f.double() for f in fisher], alpha, normalize)
    torch.testing.assert_close(scores.fc, expected, **tolerance(expected))
    assert scores.kind == "fc" and torch.equal(scores.fc, scores.score("fc"))
    # the weights came back
    for p, q in zip(params, opt.param_groups[0]["params"]):
        assert p is q
    assert not torch.equal(params[0].detach(), theta0[0].float())


def test_lwf_scores_the_paper_fc_from_the_weights_at_begin():
    """LearningWithForgetting: theta_0 = the weights when it began, theta*_L = the weights at the
    rescoring, F_L = the optimizer's Fisher, alpha = the learning lr by default; fc_at='current'
    takes g_x at the trained weights instead."""
    model = tiny_llama()
    start = copy.deepcopy(model)
    opt = FisherAdamW(model.parameters(), lr=1e-2, fisher="ema", fisher_beta=0.9)
    samples = make_samples(6, seed=4)
    lwf = LearningWithForgetting(model, opt, samples, LWFConfig(every=3, steps=1, batch_size=4))
    lwf.begin(10)
    for batch in learn_batches(3):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        lwf.global_step += 1  # count learning steps without running the phase
    before = [p.detach().clone() for p in model.parameters()]
    lwf.rescore()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)
    params = list(model.parameters())
    fisher = [f.double() for f in optimizer_fisher(opt, params)]
    theta0 = [p.detach().double() for p in start.parameters()]
    star = [p.detach().double() for p in params]
    grads, _ = brute_terms(start, samples)
    expected = paper_fc(grads, theta0, star, fisher, 1e-2)
    torch.testing.assert_close(lwf.fc.fc, expected, **tolerance(expected))
    lwf.config.fc_at = "current"
    lwf.config.alpha = 0.5
    current = lwf.score()
    grads, _ = brute_terms(model, samples)
    expected = paper_fc(grads, theta0, star, fisher, 0.5)
    torch.testing.assert_close(current.fc, expected, **tolerance(expected))


def test_pilot_fine_tune_scores_before_any_learning_step():
    """With pilot_steps, scoring before any learning step takes theta*_L and F_L from a pilot
    fine-tune (a fresh FisherAdamW, fisher='mean'), then puts every weight back."""
    model = tiny_llama()
    start = copy.deepcopy(model)
    opt = FisherAdamW(model.parameters(), lr=1e-2, fisher="ema")
    samples = make_samples(5, seed=2)
    batches = learn_batches(2)
    lwf = LearningWithForgetting(model, opt, samples,
                                 LWFConfig(pilot_steps=3, pilot_lr=5e-3, alpha=0.2, batch_size=4),
                                 learn_batches=batches)
    lwf.begin()
    scores = lwf.score()
    for p, q in zip(model.parameters(), start.parameters()):
        assert torch.equal(p.detach(), q.detach())
        assert p.grad is None
    assert opt.state == {} or all(not s for s in opt.state.values())
    # the pilot, replayed by hand
    pilot_model = copy.deepcopy(start)
    pilot = FisherAdamW(pilot_model.parameters(), lr=5e-3, weight_decay=0.0, fisher="mean")
    for step in range(3):
        pilot_model(**batches[step % 2]).loss.backward()
        pilot.step()
        pilot.zero_grad()
    star = [p.detach().double() for p in pilot_model.parameters()]
    fisher = [pilot.fisher(p).double() for p in pilot_model.parameters()]
    grads, _ = brute_terms(start, samples)
    expected = paper_fc(grads, [p.detach().double() for p in start.parameters()], star, fisher,
                        0.2)
    torch.testing.assert_close(scores.fc, expected, **tolerance(expected))
    assert expected.abs().max() > 0


@pytest.mark.parametrize("method", SCORE_METHODS)
@pytest.mark.parametrize("normalize", [False, True])
def test_loss_change_matches_brute_force(method, normalize):
    """The project's first formalisation, kept as scorer 'loss_change'."""
    model, opt, gbar, fisher = trained_setup()
    samples = make_samples(7, seed=9)
    params = list(model.parameters())
    eta = 0.3
    scores = forgetting_confidence(model, batches_of(samples, 3), optimizer_fisher(opt, params),
                                   direction=optimizer_direction(opt, params), eta=eta,
                                   normalize=normalize, method=method)
    grads, _ = brute_terms(model, samples)
    expected = loss_change(grads, gbar, fisher, eta, normalize)
    torch.testing.assert_close(scores.fc, expected, **tolerance(expected))
    assert scores.kind == "loss_change"
    torch.testing.assert_close(scores.score("loss_change"), expected, **tolerance(expected))
    with pytest.raises(ValueError, match="alpha"):
        scores.score("fc")


@pytest.mark.parametrize("method", SCORE_METHODS)
def test_param_subset_and_dict_inputs(method):
    model, opt, gbar, fisher = trained_setup()
    names = ["model.layers.0.mlp.down_proj.weight", "lm_head.weight"]
    chosen = resolve_params(model, names)
    direction = dict(zip(chosen, optimizer_direction(opt, chosen.values())))
    fisher_map = dict(zip(chosen, optimizer_fisher(opt, chosen.values())))
    samples = make_samples(5, seed=3)
    scores = forgetting_confidence(model, batches_of(samples, 2), fisher_map,
                                   direction=direction, eta=0.5, params=names, method=method)
    grads, keep = brute_terms(model, samples, names)
    expected = loss_change(grads, [gbar[i] for i in keep], [fisher[i] for i in keep], 0.5)
    torch.testing.assert_close(scores.fc, expected, **tolerance(expected))


def test_first_order_term_is_the_directional_derivative():
    """<d, g_s> is the derivative of the sample's loss along d (finite differences in float64)."""
    model, opt, _, _ = trained_setup()
    params = list(model.parameters())
    d = optimizer_direction(opt, params)
    sample = make_samples(1, seed=4)
    scores = forgetting_confidence(model, batches_of(sample, 1), optimizer_fisher(opt, params),
                                   direction=d, eta=1.0)
    model64 = copy.deepcopy(model).double()

    def loss_at(h):
        with torch.no_grad():
            for p, p0, v in zip(model64.parameters(), params, d):
                p.copy_(p0.double() + h * v.double())
            ids = sample[0]["input_ids"].unsqueeze(0)
            logits = model64(input_ids=ids).logits[0, :-1]
            return F.cross_entropy(logits, sample[0]["labels"][1:], ignore_index=IGNORE_INDEX)

    # h = 1e-4: the rotary embedding computes in fp32 even in a float64 model, so a smaller step
    # drowns in its rounding; the central difference's own error is O(h^2).
    h = 1e-4
    derivative = (loss_at(h) - loss_at(-h)) / (2 * h)
    torch.testing.assert_close(scores.terms["direction"][0], derivative, rtol=1e-3, atol=1e-9)


def score_backends():
    names = ["reference", "auto"]
    for name in ("triton", "cuda"):
        if backends.is_available(name) and backends.runs_on(name, torch.device("cpu")):
            names.append(name)
    return names


@pytest.mark.parametrize("backend", score_backends())
def test_score_op_path_equals_plain_torch(backend):
    model, opt, _, _ = trained_setup()
    samples = make_samples(6, seed=4)
    chosen = resolve_params(model)
    direction = optimizer_direction(opt, chosen.values())
    fisher = optimizer_fisher(opt, chosen.values())
    scores = forgetting_confidence(model, batches_of(samples, 3), fisher, direction=direction,
                                   eta=0.3, method="loop", backend=backend)
    plain = []
    for batch in batches_of(samples, 3):
        for grads in per_sample_gradients(model, batch, chosen):
            first = sum((d.double() * g.double()).sum() for d, g in zip(direction, grads))
            second = sum((f.double() * g.double() ** 2).sum() for f, g in zip(fisher, grads))
            plain.append(torch.stack([first, second]))
    plain = torch.stack(plain)
    torch.testing.assert_close(scores.terms["direction"], plain[:, 0], rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(scores.terms["fisher_sq"], plain[:, 1], rtol=1e-6, atol=1e-15)
    # score_terms on its own is the op call.
    grads = next(per_sample_gradients(model, next(batches_of(samples, 3)), chosen))
    torch.testing.assert_close(score_terms(direction, grads, fisher, backend=backend), plain[0],
                               rtol=1e-6, atol=1e-15)


def test_mean_gradient_is_the_mean_batch_gradient():
    model = tiny_llama()
    batches = learn_batches(3)
    params = list(model.parameters())
    got = mean_gradient(model, batches)
    expected = [torch.zeros_like(p) for p in params]
    for batch in batches:
        for e, g in zip(expected, torch.autograd.grad(model(**batch).loss, params)):
            e.add_(g / 3)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in params)


def test_direction_errors_before_any_step():
    model = tiny_llama()
    opt = FisherAdamW(model.parameters())
    with pytest.raises(ValueError, match="has not stepped"):
        optimizer_direction(opt, list(model.parameters()))
    other = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="not managed"):
        optimizer_fisher(opt, [other])
    with pytest.raises(TypeError, match="FisherAdamW"):
        optimizer_fisher(torch.optim.AdamW(model.parameters()), list(model.parameters()))



def test_fc_input_errors():
    model, opt, _, _ = trained_setup(1)
    params = list(model.parameters())
    d, f = optimizer_direction(opt, params), optimizer_fisher(opt, params)
    batches = list(batches_of(make_samples(2), 2))
    with pytest.raises(ValueError, match="eta"):
        forgetting_confidence(model, batches, f, direction=d, eta=0.0)
    with pytest.raises(ValueError, match="eta"):
        forgetting_confidence(model, batches, f, direction=d, eta=float("inf"))
    with pytest.raises(ValueError, match="alpha"):
        forgetting_confidence(model, batches, f, delta=d)
    with pytest.raises(ValueError, match="needs delta"):
        forgetting_confidence(model, batches, f)
    with pytest.raises(ValueError, match="direction has"):
        forgetting_confidence(model, batches, f, direction=d[:-1], eta=1.0)
    with pytest.raises(ValueError, match="fisher lacks"):
        forgetting_confidence(model, batches, {"lm_head.weight": f[-1]}, direction=d, eta=1.0)
    with pytest.raises(ValueError, match="not a tensor shaped"):
        forgetting_confidence(model, batches, f, delta=[t.reshape(-1) for t in f], alpha=1.0)
    with pytest.raises(ValueError, match="method"):
        forgetting_confidence(model, batches, f, direction=d, eta=1.0, method="jvp")
    with pytest.raises(ValueError, match="empty"):
        forgetting_confidence(model, [], f, direction=d, eta=1.0)


def test_swapped_weights_restores_on_error():
    model = tiny_llama()
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match="boom"):
        with swapped_weights(params, [torch.zeros_like(p) for p in params]):
            assert all((p == 0).all() for p in params)
            raise RuntimeError("boom")
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)
    with pytest.raises(ValueError, match="shaped"):
        with swapped_weights(params[:1], [torch.zeros(1)]):
            pass


def scores_of(values):
    values = torch.as_tensor(values, dtype=torch.float64)
    n = values.numel()
    # fc = alpha * displacement + 0.5 alpha^2 fisher_sq with alpha = 1, fisher_sq = 0
    return ForgettingScores(terms={"displacement": values, "fisher_sq": torch.zeros(n),
                                   "sq_norm": torch.ones(n)}, kind="fc", alpha=1.0)


def test_controls_and_selection():
    fc = torch.tensor([0.5, -1.0, 2.0, 0.0, 2.0, -0.1], dtype=torch.float64)
    scores = scores_of(fc)
    assert torch.equal(control_scores(scores, "fc"), fc)
    assert torch.equal(control_scores(scores, "reversed"), -fc)
    r1 = control_scores(scores, "random", generator=torch.Generator().manual_seed(3))
    r2 = control_scores(fc, "random", generator=torch.Generator().manual_seed(3))
    assert torch.equal(r1, r2) and ((r1 >= 0) & (r1 < 1)).all() and r1.unique().numel() == 6
    with pytest.raises(ValueError, match="score kind"):
        control_scores(fc, "top")
    with pytest.raises(ValueError, match="alignment term"):
        control_scores(scores, "fisher_alignment")
    assert select(fc, 0.5).tolist() == [2, 4, 0]
    assert select(fc, 1.0, positive_only=True).tolist() == [2, 4, 0]
    assert select(-fc, 0.5).tolist() == [1, 5, 3]  # the lowest-FC control
    stats = scores.stats()
    assert stats["fc_max"] == 2.0 and stats["fc_min"] == -1.0
    assert stats["fc_positive"] == pytest.approx(3 / 6)
    restored = ForgettingScores.from_state_dict(scores.state_dict())
    assert torch.equal(restored.fc, scores.fc)


@pytest.mark.parametrize("method", SCORE_METHODS)
@pytest.mark.parametrize("normalize", [False, True])
def test_named_scorers_match_brute_force(method, normalize):
    """fisher_alignment = -<F*gbar, g_s> and fisher_overlap = sum F g_s^2 / ||g_s||^2."""
    model, opt, gbar, fisher = trained_setup()
    samples = make_samples(7, seed=9)
    params = list(model.parameters())
    scores = forgetting_confidence(model, batches_of(samples, 3), optimizer_fisher(opt, params),
                                   direction=optimizer_direction(opt, params), eta=0.5,
                                   normalize=normalize, method=method)
    grads, _ = brute_terms(model, samples)
    align, overlap, norms = [], [], []
    for g in grads:
        norm2 = sum((t * t).sum() for t in g)
        scale = norm2.sqrt() if normalize else 1.0
        align.append(sum((f * d * t).sum() for f, d, t in zip(fisher, gbar, g)) / scale)
        overlap.append(sum((f * t * t).sum() for f, t in zip(fisher, g)) / norm2)
        norms.append(norm2.sqrt())
    align, overlap = torch.stack(align), torch.stack(overlap)
    torch.testing.assert_close(scores.score("fisher_alignment"), -align, **tolerance(align))
    torch.testing.assert_close(scores.score("fisher_overlap"), overlap, rtol=2e-4, atol=0.0)
    torch.testing.assert_close(scores.grad_norm, torch.stack(norms), rtol=2e-4, atol=0.0)
    for kind in ("fisher_alignment", "fisher_overlap"):
        torch.testing.assert_close(control_scores(scores, kind), scores.score(kind))
    assert not torch.equal(torch.argsort(scores.fc),
                           torch.argsort(scores.score("fisher_overlap")))
    with pytest.raises(TypeError, match="ForgettingScores"):
        control_scores(scores.fc, "fisher_overlap")
    with pytest.raises(ValueError, match="scorer"):
        scores.score("cosine")


def test_vmap_scoring_of_padded_batches_under_sdpa_attention():
    """transformers' SDPA mask code reads the mask's values, which vmap cannot; the batched path
    drops a right-padding mask (it changes no loss under causal attention) and gives the
    one-sample-at-a-time result; the layer-by-layer path takes left padding too."""
    model, opt, _, _ = trained_setup()
    model.set_attn_implementation("sdpa")
    samples = make_samples(6, seed=5)  # ragged lengths: padded batches
    params = list(model.parameters())
    kwargs = dict(direction=optimizer_direction(opt, params), eta=0.2)
    fisher = optimizer_fisher(opt, params)
    loop = forgetting_confidence(model, batches_of(samples, 3), fisher, method="loop", **kwargs)
    for method in ("vmap", "layers"):
        other = forgetting_confidence(model, batches_of(samples, 3), fisher, method=method,
                                      **kwargs)
        torch.testing.assert_close(other.fc, loop.fc, rtol=1e-4, atol=1e-9)
    left = [dict(b) for b in batches_of(samples, 3)]
    for batch in left:  # the same rows, left-padded
        for i in range(batch["input_ids"].shape[0]):
            n = int(batch["attention_mask"][i].sum())
            for key, pad in (("input_ids", 0), ("labels", IGNORE_INDEX), ("attention_mask", 0)):
                row = batch[key][i].clone()
                batch[key][i] = torch.cat([torch.full((row.numel() - n,), pad), row[:n]])
    layers = forgetting_confidence(model, left, fisher, method="layers", **kwargs)
    torch.testing.assert_close(layers.fc, loop.fc, rtol=1e-4, atol=1e-9)
