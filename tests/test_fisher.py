"""``fisherforget.fisher``: each estimator against a brute-force float64 computation."""

import copy

import pytest
import torch
import torch.nn.functional as F

from fisherforget import FisherAdamW
from fisherforget.fisher import (
    IGNORE_INDEX,
    estimate_fisher,
    per_sample_gradients,
    resolve_params,
    sample_model_labels,
)

VOCAB = 7


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one intra-op thread; restore the setting afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama(seed=0, vocab=VOCAB, layers=1):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=32, tie_word_embeddings=False,
                         attn_implementation="eager")
    model = LlamaForCausalLM(config)
    # Random (not default-initialised) weights so that every gradient is clearly non-zero.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model.eval()


def random_batches(n_batches=3, batch=4, seq=6, seed=1, vocab=VOCAB, pad_last=True):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(0, vocab, (batch, seq), generator=gen)
        mask = torch.ones_like(ids)
        labels = ids.clone()
        labels[:, :2] = IGNORE_INDEX  # a "prompt" without loss
        if pad_last:  # right padding on one row
            mask[-1, -2:] = 0
            labels[-1, -2:] = IGNORE_INDEX
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def brute_sample_loss(model64, row, labels, reduction="mean"):
    """Per-sample NLL with F.cross_entropy (an implementation independent of fisherforget's)."""
    logits = model64(input_ids=row["input_ids"], attention_mask=row["attention_mask"]).logits
    flat_logits = logits[0, :-1]
    flat_labels = labels[0, 1:]
    return F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction=reduction)


def brute_grads(model64, loss):
    params = [p for p in model64.parameters()]
    return [g.detach() for g in torch.autograd.grad(loss, params)]


def assert_close_tree(actual, expected, rtol=2e-4):
    for (name, a), e in zip(actual.items(), expected):
        scale = e.abs().max().item()
        assert scale > 0, name
        err = (a.double() - e).abs().max().item()
        assert err <= rtol * scale + 1e-12, f"{name}: max err {err:.3e} vs scale {scale:.3e}"


def brute_empirical(model, batches, reduction="mean", labels_per_batch=None):
    model64 = copy.deepcopy(model).double()
    params = list(model64.parameters())
    total = [torch.zeros_like(p) for p in params]
    n = 0
    for b, batch in enumerate(batches):
        labels = batch["labels"] if labels_per_batch is None else labels_per_batch[b]
        for i in range(batch["input_ids"].shape[0]):
            row = {k: v[i : i + 1] for k, v in batch.items()}
            loss = brute_sample_loss(model64, row, labels[i : i + 1], "sum")
            if reduction == "mean":
                loss = loss / (labels[i, 1:] != IGNORE_INDEX).sum()
            for t, g in zip(total, brute_grads(model64, loss)):
                t += g * g
            n += 1
    return [t / n for t in total]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_empirical_matches_float64_brute_force(reduction):
    model = tiny_llama()
    batches = random_batches()
    est = estimate_fisher(model, batches, "empirical", reduction=reduction)
    assert list(est) == [n for n, _ in model.named_parameters()]
    assert all(t.dtype == torch.float32 for t in est.values())
    assert_close_tree(est, brute_empirical(model, batches, reduction))


def test_empirical_vmap_equals_loop():
    model = tiny_llama()
    batches = random_batches()
    loop = estimate_fisher(model, batches, "empirical", method="loop")
    vmap = estimate_fisher(model, batches, "empirical", method="vmap")
    for name in loop:
        torch.testing.assert_close(vmap[name], loop[name], rtol=1e-4, atol=1e-9)


def test_batch_matches_float64_brute_force():
    model = tiny_llama()
    batches = random_batches()
    est = estimate_fisher(model, batches, "batch")
    model64 = copy.deepcopy(model).double()
    total = [torch.zeros_like(p) for p in model64.parameters()]
    for batch in batches:
        logits = model64(input_ids=batch["input_ids"],
                         attention_mask=batch["attention_mask"]).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB),
                               batch["labels"][:, 1:].reshape(-1),
                               ignore_index=IGNORE_INDEX)  # the token-averaged batch loss
        for t, g in zip(total, brute_grads(model64, loss)):
            t += g * g
    assert_close_tree(est, [t / len(batches) for t in total])


def test_batch_estimator_is_what_the_optimizer_accumulates():
    """FisherAdamW(fisher="mean") squares the same mini-batch gradient inside its step; with lr=0
    the params stay put, so its Fisher must equal the "batch" estimate."""
    model = tiny_llama()
    batches = random_batches()
    est = estimate_fisher(model, batches, "batch")
    opt = FisherAdamW(model.parameters(), lr=0.0, weight_decay=0.0, fisher="mean")
    for batch in batches:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    for (name, f), p in zip(est.items(), model.parameters()):
        torch.testing.assert_close(opt.fisher(p), f, rtol=1e-5, atol=1e-10, msg=name)


def test_true_fisher_matches_brute_force_with_the_same_draws():
    model = tiny_llama()
    batches = random_batches()
    gen = torch.Generator().manual_seed(5)
    drawn = [sample_model_labels(model, b, generator=gen) for b in batches]
    for b, labels in zip(batches, drawn):
        # Sampled where the data had labels, -100 elsewhere.
        assert torch.equal(labels == IGNORE_INDEX, b["labels"] == IGNORE_INDEX)
    est = estimate_fisher(model, batches, "true", generator=torch.Generator().manual_seed(5))
    assert_close_tree(est, brute_empirical(model, batches, labels_per_batch=drawn))


def test_true_fisher_converges_to_the_exact_expectation():
    """With teacher forcing the draws at different positions are independent and each position's
    score has zero mean, so E[(grad l)^2] = (1/n^2) sum_t sum_v p_t(v) (grad log p_t(v))^2
    (reduction "mean", n label positions). Enumerate it exactly in float64 and compare with the
    Monte-Carlo estimate over many draws of one sample."""
    model = tiny_llama(vocab=4)
    ids = torch.tensor([[1, 3, 0, 2, 1]])
    labels = ids.clone()
    labels[0, :2] = IGNORE_INDEX  # label positions 2, 3, 4: n = 3
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    model64 = copy.deepcopy(model).double()
    logits = model64(input_ids=ids).logits[0]
    params = list(model64.parameters())
    exact = [torch.zeros_like(p) for p in params]
    positions = [2, 3, 4]
    for t in positions:
        logp = torch.log_softmax(logits[t - 1], -1)
        for v in range(4):
            grads = torch.autograd.grad(logp[v], params, retain_graph=True)
            for e, g in zip(exact, grads):
                e += logp[v].exp().detach() * g * g / len(positions) ** 2
    repeated = {k: v.repeat(500, 1) for k, v in batch.items()}
    est = estimate_fisher(model, [repeated] * 4, "true", method="vmap",
                          generator=torch.Generator().manual_seed(0))
    total_est = sum(f.double().sum() for f in est.values())
    total_exact = sum(e.sum() for e in exact)
    assert abs(total_est / total_exact - 1) < 0.05
    # The empirical Fisher on the fixed labels is a different statistic.
    emp = estimate_fisher(model, [batch], "empirical")
    assert abs(sum(f.double().sum() for f in emp.values()) / total_exact - 1) > 0.05


def test_param_subset_and_max_samples():
    model = tiny_llama()
    batches = random_batches()
    names = ["model.layers.0.mlp.up_proj.weight", "lm_head.weight"]
    est = estimate_fisher(model, batches, "empirical", params=names, max_samples=5)
    assert list(est) == names
    full = brute_empirical(model, [{k: v[:4] for k, v in batches[0].items()},
                                   {k: v[:1] for k, v in batches[1].items()}])
    by_name = dict(zip([n for n, _ in model.named_parameters()], full))
    assert_close_tree(est, [by_name[n] for n in names])
    # parameters as tensors, and a predicate
    tensors = [model.lm_head.weight]
    assert list(estimate_fisher(model, batches, "batch", params=tensors)) == ["lm_head.weight"]
    pred = estimate_fisher(model, batches, "batch", params=lambda n, p: n.endswith("norm.weight"))
    assert list(pred) and all(n.endswith("norm.weight") for n in pred)


def test_grads_and_mode_untouched():
    model = tiny_llama().train()
    sentinel = [torch.randn_like(p) for p in model.parameters()]
    for p, s in zip(model.parameters(), sentinel):
        p.grad = s.clone()
    estimate_fisher(model, random_batches(), "empirical")
    assert model.training
    for p, s in zip(model.parameters(), sentinel):
        assert torch.equal(p.grad, s)


def test_errors():
    model = tiny_llama()
    batches = random_batches()
    with pytest.raises(ValueError, match="estimator"):
        estimate_fisher(model, batches, "fisher")
    with pytest.raises(ValueError, match="empty"):
        estimate_fisher(model, [], "empirical")
    with pytest.raises(ValueError, match="no parameter named"):
        estimate_fisher(model, batches, params=["nope"])
    with pytest.raises(ValueError, match="max_samples"):
        estimate_fisher(model, batches, max_samples=0)
    with pytest.raises(TypeError, match="input_ids"):
        estimate_fisher(model, [{"ids": torch.zeros(2, 3)}])
    with pytest.raises(ValueError, match="shaped like input_ids"):
        estimate_fisher(model, [{"input_ids": torch.zeros(2, 3, dtype=torch.long),
                                 "labels": torch.zeros(2, 4, dtype=torch.long)}])
    with pytest.raises(ValueError, match="method"):
        list(per_sample_gradients(model, batches[0], resolve_params(model), method="jit"))
    frozen = tiny_llama()
    frozen.lm_head.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="do not require grad"):
        estimate_fisher(frozen, batches, params=["lm_head.weight"])


def accumulate_backends():
    from fisherforget import backends

    return ["reference"] + [name for name in ("triton", "cuda")
                            if backends.is_available(name)
                            and backends.runs_on(name, torch.device("cpu"))]


@pytest.mark.parametrize("backend", accumulate_backends())
def test_every_backend_of_the_accumulate_op_gives_the_same_estimate(backend):
    model = tiny_llama()
    batches = random_batches(n_batches=1)
    expected = estimate_fisher(model, batches, "empirical", backend="reference")
    got = estimate_fisher(model, batches, "empirical", backend=backend)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-12)
