"""Forgetting confidence against brute-force float64 autograd of the same formula."""

import copy

import pytest
import torch
import torch.nn.functional as F

from fisherforget import FisherAdamW, backends
from fisherforget.fisher import IGNORE_INDEX, per_sample_gradients, resolve_params
from fisherforget.lwf import (
    ForgettingScores,
    batches_of,
    control_scores,
    forgetting_confidence,
    mean_gradient,
    optimizer_direction,
    optimizer_fisher,
    score_terms,
    select,
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


def brute_fc(model, samples, gbar, fisher, eta, normalize=False, names=None):
    model64 = copy.deepcopy(model).double()
    all_names = [n for n, _ in model.named_parameters()]
    keep = [i for i, n in enumerate(all_names) if names is None or n in names]
    out = []
    for sample in samples:
        grads = brute_sample_grad(model64, sample)
        grads = [grads[i] for i in keep]
        if normalize:
            norm = torch.sqrt(sum((g * g).sum() for g in grads))
            grads = [g / norm for g in grads]
        first = sum((gbar[i] * g).sum() for i, g in zip(keep, grads))
        second = sum((fisher[i] * g * g).sum() for i, g in zip(keep, grads))
        out.append(-(eta * first + 0.5 * eta**2 * second))
    return torch.stack(out)


@pytest.mark.parametrize("normalize", [False, True])
def test_fc_matches_brute_force(normalize):
    model, opt, gbar, fisher = trained_setup()
    samples = make_samples(10)
    params = list(model.parameters())
    direction = optimizer_direction(opt, params)
    for d, ref in zip(direction, gbar):
        torch.testing.assert_close(d.double(), ref, rtol=1e-5, atol=1e-9)
    for f, ref in zip(optimizer_fisher(opt, params), fisher):
        torch.testing.assert_close(f.double(), ref, rtol=1e-5, atol=1e-12)
    eta = 0.5
    scores = forgetting_confidence(model, batches_of(samples, 4), direction,
                                   optimizer_fisher(opt, params), eta=eta, normalize=normalize)
    expected = brute_fc(model, samples, gbar, fisher, eta, normalize)
    assert scores.fc.dtype == torch.float64 and scores.fc.shape == (10,)
    torch.testing.assert_close(scores.fc, expected, rtol=2e-4, atol=1e-7 * expected.abs().max())
    # The two terms recombine into the FC, and the second one is non-negative.
    torch.testing.assert_close(
        scores.fc, -(eta * scores.first_order + 0.5 * eta**2 * scores.second_order))
    assert (scores.second_order >= 0).all()
    # Both signs occur (a test that cannot tell the sign apart would be weak).
    assert (expected > 0).any() and (expected < 0).any()


def test_first_order_term_is_the_directional_derivative():
    """<gbar, g_s> is the derivative of the sample's loss along gbar: check it by a forward-mode
    JVP of the float64 model, an autograd path independent of per-sample gradients."""
    model, opt, gbar, _ = trained_setup()
    sample = make_samples(1, seed=3)[0]
    model64 = copy.deepcopy(model).double()
    names = [n for n, _ in model64.named_parameters()]
    theta = {n: p.detach() for n, p in model64.named_parameters()}

    def loss(params):
        logits = torch.func.functional_call(model64, params, (sample["input_ids"][None],)).logits
        return F.cross_entropy(logits[0, :-1], sample["labels"][1:], ignore_index=IGNORE_INDEX)

    _, derivative = torch.func.jvp(loss, (theta,), ({n: g for n, g in zip(names, gbar)},))
    params = list(model.parameters())
    scores = forgetting_confidence(model, batches_of([sample], 1), optimizer_direction(opt, params),
                                   optimizer_fisher(opt, params), eta=1.0)
    torch.testing.assert_close(scores.first_order[0], derivative, rtol=2e-4, atol=1e-9)


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
    scores = forgetting_confidence(model, batches_of(samples, 3), direction, fisher, eta=0.3,
                                   backend=backend)
    plain = []
    for batch in batches_of(samples, 3):
        for grads in per_sample_gradients(model, batch, chosen):
            first = sum((d.double() * g.double()).sum() for d, g in zip(direction, grads))
            second = sum((f.double() * g.double() ** 2).sum() for f, g in zip(fisher, grads))
            plain.append(torch.stack([first, second]))
    plain = torch.stack(plain)
    torch.testing.assert_close(scores.first_order, plain[:, 0], rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(scores.second_order, plain[:, 1], rtol=1e-6, atol=1e-15)
    # score_terms on its own is the op call.
    grads = next(per_sample_gradients(model, next(batches_of(samples, 3)), chosen))
    torch.testing.assert_close(score_terms(direction, grads, fisher, backend=backend), plain[0],
                               rtol=1e-6, atol=1e-15)


def test_param_subset_and_dict_inputs_and_vmap():
    model, opt, gbar, fisher = trained_setup()
    samples = make_samples(5, seed=6)
    names = ["model.layers.0.mlp.down_proj.weight", "lm_head.weight"]
    chosen = resolve_params(model, names)
    direction = dict(zip(names, optimizer_direction(opt, chosen.values())))
    fisher_dict = dict(zip(names, optimizer_fisher(opt, chosen.values())))
    loop = forgetting_confidence(model, batches_of(samples, 2), direction, fisher_dict, eta=0.2,
                                 params=names)
    expected = brute_fc(model, samples, gbar, fisher, 0.2, names=names)
    torch.testing.assert_close(loop.fc, expected, rtol=2e-4, atol=1e-7 * expected.abs().max())
    vmap = forgetting_confidence(model, batches_of(samples, 2), direction, fisher_dict, eta=0.2,
                                 params=names, method="vmap")
    torch.testing.assert_close(vmap.fc, loop.fc, rtol=1e-4, atol=1e-9)


def test_mean_gradient_is_the_mean_batch_gradient():
    model = tiny_llama()
    batches = learn_batches(3)
    got = mean_gradient(model, batches)
    model64 = copy.deepcopy(model).double()
    total = [torch.zeros_like(p) for p in model64.parameters()]
    for batch in batches:
        logits = model64(input_ids=batch["input_ids"],
                         attention_mask=batch["attention_mask"]).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                               batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
        for t, g in zip(total, torch.autograd.grad(loss, list(model64.parameters()))):
            t += g / len(batches)
    for a, e in zip(got, total):
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-8)


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
        forgetting_confidence(model, batches, d, f, eta=0.0)
    with pytest.raises(ValueError, match="direction has"):
        forgetting_confidence(model, batches, d[:-1], f, eta=1.0)
    with pytest.raises(ValueError, match="fisher lacks"):
        forgetting_confidence(model, batches, d, {"lm_head.weight": f[-1]}, eta=1.0)
    with pytest.raises(ValueError, match="empty"):
        forgetting_confidence(model, [], d, f, eta=1.0)


def test_controls_and_selection():
    fc = torch.tensor([0.5, -1.0, 2.0, 0.0, 2.0, -0.1], dtype=torch.float64)
    scores = ForgettingScores(fc=fc, first_order=-fc, second_order=torch.zeros(6),
                              grad_norm=torch.ones(6), eta=1.0, normalized=False)
    assert torch.equal(control_scores(scores, "fc"), fc)
    assert torch.equal(control_scores(scores, "reversed"), -fc)
    r1 = control_scores(scores, "random", generator=torch.Generator().manual_seed(3))
    r2 = control_scores(fc, "random", generator=torch.Generator().manual_seed(3))
    assert torch.equal(r1, r2) and ((r1 >= 0) & (r1 < 1)).all() and r1.unique().numel() == 6
    with pytest.raises(ValueError, match="score kind"):
        control_scores(fc, "top")
    # top half, ties in index order
    assert select(fc, 0.5).tolist() == [2, 4, 0]
    assert select(fc, 1.0, positive_only=True).tolist() == [2, 4, 0]
    assert select(-fc, 0.5).tolist() == [1, 5, 3]  # the lowest-FC control
    assert select(-fc, 0.34, positive_only=True).tolist() == [1, 5]
    assert select(fc, 0.01).tolist() == [2]  # at least one
    assert select(-fc.abs() - 1, 0.5, positive_only=True).numel() == 0
    with pytest.raises(ValueError, match="fraction"):
        select(fc, 0.0)
    stats = scores.stats()
    assert stats["fc_max"] == 2.0 and stats["fc_min"] == -1.0
    assert stats["fc_positive"] == pytest.approx(3 / 6)


@pytest.mark.parametrize("method", ["loop", "vmap"])
@pytest.mark.parametrize("normalize", [False, True])
def test_named_scorers_match_brute_force(method, normalize):
    """fisher_alignment = -<F*gbar, g_s> and fisher_overlap = sum F g_s^2 / ||g_s||^2, from float64
    per-sample gradients taken one by one."""
    model, opt, gbar, fisher = trained_setup()
    samples = make_samples(7, seed=9)
    params = list(model.parameters())
    scores = forgetting_confidence(model, batches_of(samples, 3), optimizer_direction(opt, params),
                                   optimizer_fisher(opt, params), eta=0.5, normalize=normalize,
                                   method=method)
    model64 = copy.deepcopy(model).double()
    align, overlap, norms = [], [], []
    for sample in samples:
        grads = brute_sample_grad(model64, sample)
        norm2 = sum((g * g).sum() for g in grads)
        scale = norm2.sqrt() if normalize else 1.0
        align.append(sum((f * d * g).sum() for f, d, g in zip(fisher, gbar, grads)) / scale)
        overlap.append(sum((f * g * g).sum() for f, g in zip(fisher, grads)) / norm2)
        norms.append(norm2.sqrt())
    align, overlap = torch.stack(align), torch.stack(overlap)
    torch.testing.assert_close(scores.ranking("fisher_alignment"), -align, rtol=2e-4,
                               atol=1e-7 * align.abs().max())
    torch.testing.assert_close(scores.ranking("fisher_overlap"), overlap, rtol=2e-4, atol=0.0)
    torch.testing.assert_close(scores.grad_norm, torch.stack(norms), rtol=2e-4, atol=0.0)
    for kind in ("fisher_alignment", "fisher_overlap"):
        torch.testing.assert_close(control_scores(scores, kind), scores.ranking(kind))
    # The scorers are different rankings, not relabelled copies of FC.
    assert not torch.equal(torch.argsort(scores.fc), torch.argsort(scores.ranking("fisher_overlap")))
    with pytest.raises(TypeError, match="ForgettingScores"):
        control_scores(scores.fc, "fisher_overlap")
    with pytest.raises(ValueError, match="scorer"):
        scores.ranking("cosine")


def test_batched_reduction_is_one_call_per_batch(monkeypatch):
    """method='vmap' reduces a whole batch at once: batched_terms runs once per batch and the
    fisher_score op not at all."""
    from fisherforget.lwf import confidence

    model, opt, _, _ = trained_setup()
    params = list(model.parameters())
    calls = {"batched": 0, "op": 0}
    real = confidence.batched_terms

    def counting(*args):
        calls["batched"] += 1
        return real(*args)

    def op(*args, **kwargs):
        calls["op"] += 1
        raise AssertionError("the vmap path must not call the per-sample op")

    monkeypatch.setattr(confidence, "batched_terms", counting)
    monkeypatch.setattr(confidence, "score_terms", op)
    scores = forgetting_confidence(model, batches_of(make_samples(12), 5),
                                   optimizer_direction(opt, params), optimizer_fisher(opt, params),
                                   eta=0.1, method="vmap")
    assert len(scores) == 12 and calls == {"batched": 3, "op": 0}


def test_vmap_scoring_of_padded_batches_under_sdpa_attention():
    """transformers' SDPA mask code reads the mask's values, which vmap cannot; the batched path
    drops a right-padding mask (it changes no loss under causal attention) and gives the
    one-sample-at-a-time result."""
    model, opt, _, _ = trained_setup()
    model.set_attn_implementation("sdpa")
    samples = make_samples(6, seed=5)  # ragged lengths: padded batches
    params = list(model.parameters())
    args = (optimizer_direction(opt, params), optimizer_fisher(opt, params))
    loop = forgetting_confidence(model, batches_of(samples, 3), *args, eta=0.2, method="loop")
    vmap = forgetting_confidence(model, batches_of(samples, 3), *args, eta=0.2, method="vmap")
    torch.testing.assert_close(vmap.fc, loop.fc, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(vmap.overlap, loop.overlap, rtol=1e-4, atol=0.0)
    left = next(batches_of(samples, 3))
    left["attention_mask"] = left["attention_mask"].flip(1)
    with pytest.raises(ValueError, match="right-padded"):
        forgetting_confidence(model, [left], *args, eta=0.2, method="vmap")
