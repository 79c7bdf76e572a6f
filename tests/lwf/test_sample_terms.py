"""per_sample_terms against brute force: each row's gradient by its own torch.autograd.grad call,
then the sums over parameters directly (float64)."""

import pytest
import torch

from fisherforget.fisher import IGNORE_INDEX, labels_of, logits_of, resolve_params, sequence_nll
from fisherforget.lwf import collate
from fisherforget.lwf.sample_terms import per_sample_terms
from lwf_testing import WORDS, make_samples, tiny_llama


def llama(tied, seed=0, pad=None):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=32, tie_word_embeddings=tied,
                         attn_implementation="eager", pad_token_id=pad)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(WORDS), n_positions=32, n_embd=16, n_layer=1, n_head=2,
                        attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


def vectors_like(params, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen) for p in params]


def brute(model, batch, params, linear, quadratic):
    """Row by row: the gradient of the row's token-averaged NLL, then the sums in float64."""
    rows = []
    tensors = list(params.values())
    labels = labels_of(batch)  # default: input_ids where attention_mask is 1
    for i in range(batch["input_ids"].shape[0]):
        inputs = {k: v[i:i + 1] for k, v in batch.items() if k != "labels"}
        loss = sequence_nll(logits_of(model(**inputs)), labels[i:i + 1], "mean")[0]
        grads = [g.double() for g in torch.autograd.grad(loss, tensors, allow_unused=True,
                                                         materialize_grads=True)]
        row = [sum((v.double() * g).sum() for v, g in zip(vs, grads)) for vs in linear]
        row += [sum(((1.0 if w is None else w.double()) * g * g).sum()
                    for w, g in zip(ws if ws is not None else [None] * len(grads), grads))
                for ws in quadratic]
        rows.append(torch.stack([torch.as_tensor(r, dtype=torch.float64) for r in row]))
    return torch.stack(rows)


def check(model, batch, spec=None, rtol=1e-5, **kwargs):
    params = resolve_params(model, spec)
    tensors = list(params.values())
    linear = [vectors_like(tensors, 1), vectors_like(tensors, 2)]
    fisher = [v.abs() for v in vectors_like(tensors, 3)]
    quadratic = [fisher, None]
    grads_before = [p.grad for p in model.parameters()]
    got = per_sample_terms(model, batch, params, linear=linear, quadratic=quadratic, **kwargs)
    assert [p.grad for p in model.parameters()] == grads_before  # no .grad touched
    expected = brute(model, batch, params, linear, quadratic)
    assert got.dtype == torch.float64 and got.shape == expected.shape
    scale = expected.abs().amax(dim=0, keepdim=True)
    torch.testing.assert_close(got, expected, rtol=rtol, atol=rtol * float(scale.max()))
    return got


def right_padded(samples):
    return collate(samples)


def left_padded(samples):
    batch = collate(samples)
    for i in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][i].sum())
        for key, pad in (("input_ids", 0), ("labels", IGNORE_INDEX), ("attention_mask", 0)):
            row = batch[key][i].clone()
            batch[key][i] = torch.cat([torch.full((row.numel() - n,), pad), row[:n]])
    return batch


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("padding", [right_padded, left_padded])
def test_every_param_of_a_llama(tied, padding):
    model = llama(tied)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    check(model, padding(make_samples(5, seed=2)))


@pytest.mark.parametrize("spec", [
    ["lm_head.weight"],  # the tied weight by its alias: embedding + head uses summed
    ["model.layers.0.input_layernorm.weight", "model.norm.weight"],  # norms only (vmap path)
    lambda name, p: "layers.1." in name,  # one block
])
def test_param_subsets_of_a_tied_llama(spec):
    check(llama(tied=True), right_padded(make_samples(4, seed=3)), spec)


def test_repeated_ids_and_padding_idx():
    """Repeated token ids within a sample sum before squaring; padding_idx rows get nothing."""
    model = llama(tied=True, pad=0)
    assert model.model.embed_tokens.padding_idx == 0
    samples = make_samples(3, seed=4)
    for s in samples:
        s["input_ids"][1:4] = 7  # the same id three times
        s["input_ids"][0] = 0  # the padding id inside a sample
    check(model, right_padded(samples))


@pytest.mark.parametrize("max_elements", [1, 300, 10**9])
def test_chunks_of_samples_give_the_same_terms(max_elements):
    model = llama(tied=True)
    check(model, right_padded(make_samples(5, seed=6)), max_elements=max_elements)


def test_lora_adapter_only():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0,
                                                    target_modules=["q_proj", "v_proj",
                                                                    "down_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # B starts at zero: make the A gradients non-zero too
    params = resolve_params(model)
    assert params and all("lora_" in n for n in params)
    check(model, right_padded(make_samples(4, seed=5)))


def test_gpt2_conv1d_and_position_embeddings():
    check(gpt2(), right_padded(make_samples(4, seed=8)))


def test_bf16_autocast():
    model = llama(tied=True)
    batch = right_padded(make_samples(4, seed=9))
    params = resolve_params(model)
    tensors = list(params.values())
    linear = [vectors_like(tensors, 1)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = per_sample_terms(model, batch, params, linear=linear, quadratic=[None])
        expected = brute(model, batch, params, linear, [None])
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2 * float(expected.abs().max()))


def test_hooks_are_removed_after_an_error():
    model = llama(tied=False)

    class Boom(Exception):
        pass

    def fail(module, args, output):
        raise Boom

    handle = model.model.layers[1].register_forward_hook(fail)
    params = resolve_params(model)
    with pytest.raises(Boom):
        per_sample_terms(model, right_padded(make_samples(2)), params, quadratic=[None])
    handle.remove()
    for module in model.modules():
        assert not module._forward_hooks, type(module).__name__
    check(model, right_padded(make_samples(3)))


def test_a_use_outside_the_modules_is_refused():
    """A parent computing F.linear(h, embedding.weight) itself: the hooks would miss that share
    of the gradient, so the call refuses instead of scoring wrong."""
    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(len(WORDS), 8)
            self.mix = torch.nn.Linear(8, 8)

        def forward(self, input_ids, attention_mask=None):
            h = torch.tanh(self.mix(self.embed(input_ids)))
            return torch.nn.functional.linear(h, self.embed.weight)

    model = Head()
    batch = right_padded(make_samples(3))
    with pytest.raises(ValueError, match=r"'embed.weight' is used 2 time\(s\).*called 1"):
        per_sample_terms(model, batch, resolve_params(model), quadratic=[None])
    # The other parameters alone are fine.
    check(model, batch, ["mix.weight", "mix.bias"])


def test_argument_errors():
    model = llama(tied=False)
    batch = right_padded(make_samples(2))
    params = resolve_params(model)
    tensors = list(params.values())
    with pytest.raises(ValueError, match="no linear or quadratic"):
        per_sample_terms(model, batch, params)
    with pytest.raises(ValueError, match=r"linear\[0\] has 1 tensors"):
        per_sample_terms(model, batch, params, linear=[tensors[:1]])
    with pytest.raises(ValueError, match=r"quadratic\[0\]\[0\] must be a tensor shaped"):
        per_sample_terms(model, batch, params,
                         quadratic=[[torch.zeros(1)] + [torch.zeros_like(t) for t in tensors[1:]]])
    with pytest.raises(ValueError, match="max_elements"):
        per_sample_terms(model, batch, params, quadratic=[None], max_elements=0)
    with pytest.raises(ValueError, match="input_ids"):
        per_sample_terms(model, {"input_ids": torch.zeros(3, dtype=torch.long)}, params,
                         quadratic=[None])


def test_default_labels_unused_params_and_kept_grads():
    """No labels (input_ids where the mask is 1), train mode, a chosen param the forward never
    uses (gradient 0), and .grad values already there left as they were."""
    model = llama(tied=True).train()
    model.unused = torch.nn.Linear(4, 3)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    before = [p.grad.clone() for p in model.parameters()]
    batch = left_padded(make_samples(4, seed=11))
    del batch["labels"]
    got = check(model, batch, lambda name, p: "unused" in name or "norm" in name
                or "embed" in name)
    assert all(torch.equal(b, p.grad) for b, p in zip(before, model.parameters()))
    alone = per_sample_terms(model, batch, resolve_params(model, ["unused.weight", "unused.bias"]),
                             quadratic=[None])
    assert got.abs().max() > 0 and torch.equal(alone, torch.zeros(4, 1, dtype=torch.float64))


class TwoCalls(torch.nn.Module):
    """One embedding looked up twice and one Linear applied twice per forward (no tie), and a
    parameter owned by the parent and used in its own forward."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(len(WORDS), 8)
        self.mix = torch.nn.Linear(8, 8)
        self.scale = torch.nn.Parameter(torch.randn(8))
        self.head = torch.nn.Linear(8, len(WORDS))

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids) + self.embed(torch.flip(input_ids, [1]))
        h = self.mix(torch.tanh(self.mix(h))) * self.scale
        return self.head(h.cumsum(dim=1))


@pytest.mark.parametrize("max_elements", [7, 10**9])
def test_modules_called_twice_and_a_parent_param(max_elements):
    """Both calls' shares summed before squaring; the linear terms counted once (two embedding
    calls and no dense use used to add them twice)."""
    model = TwoCalls()
    check(model, right_padded(make_samples(3, seed=12)), max_elements=max_elements)
    check(model, right_padded(make_samples(3, seed=12)), ["embed.weight"],
          max_elements=max_elements)


def test_gradient_checkpointing():
    """Non-reentrant checkpointing works; reentrant (layers run under no_grad, recomputed in
    backward) is refused by name, and so is a call under torch.no_grad."""
    model = llama(tied=True).train()
    batch = right_padded(make_samples(3, seed=13))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    check(model, batch)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    params = resolve_params(model)
    hooks = [dict(m._forward_hooks) for m in model.modules()]  # transformers adds its own
    with pytest.raises(ValueError, match="reentrant gradient checkpointing"):
        per_sample_terms(model, batch, params, quadratic=[None])
    assert [dict(m._forward_hooks) for m in model.modules()] == hooks
    model.gradient_checkpointing_disable()
    with torch.no_grad(), pytest.raises(ValueError, match="without autograd"):
        per_sample_terms(model, batch, params, quadratic=[None])
