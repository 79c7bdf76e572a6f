"""LearningWithForgetting and LWFConfig at first contact: what a real model, tokenizer and user do
(tied weights, long samples, odd shapes, one-shot iterators, diverging ascent, a second optimizer,
config mistakes), and the interleaved schedule against its formula."""

import math
import warnings

import pytest
import torch

from fisherforget import FisherAdamW
from fisherforget.fisher import IGNORE_INDEX, resolve_params
from fisherforget.lwf import LearningWithForgetting, LWFConfig, collate
from lwf_testing import WORDS, learn_batches, make_samples, tiny_llama


def tied_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=32, tie_word_embeddings=True,
                         attn_implementation="eager")
    model = LlamaForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_unchanged(model, before):
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)


def test_tied_weight_aliases_select_the_tied_param():
    model = tied_llama()
    by_alias = resolve_params(model, ["lm_head.weight"])
    assert list(by_alias) == ["model.embed_tokens.weight"]
    assert by_alias["model.embed_tokens.weight"] is model.lm_head.weight
    by_predicate = resolve_params(model, lambda name, p: name.startswith("lm_head"))
    assert list(by_predicate) == ["model.embed_tokens.weight"]
    with pytest.raises(ValueError, match="no parameter named 'lm_head.bias'"):
        resolve_params(model, ["lm_head.bias"])
    with pytest.raises(TypeError, match="single str"):
        resolve_params(model, "lm_head.weight")
    opt = FisherAdamW(model.parameters(), lr=1e-3)
    lwf = LearningWithForgetting(model, opt, make_samples(4),
                                 LWFConfig(score_params=["lm_head.weight"], batch_size=2,
                                           fraction=0.5))
    lwf.begin()
    assert len(lwf.rescore()) > 0 and lwf.fc.fc.shape == (4,)


def test_samples_are_checked_against_the_model():
    model = tiny_llama()  # 32 positions, vocabulary of len(WORDS)
    opt = FisherAdamW(model.parameters())
    long = make_samples(3, prompt_len=30, response_len=5)
    with pytest.raises(ValueError, match=r"forget_samples\[0\] has 35 tokens.*32 positions"):
        LearningWithForgetting(model, opt, long)
    foreign = make_samples(2, vocab=len(WORDS) + 50, seed=3)
    with pytest.raises(ValueError, match=r"outside the model's vocabulary"):
        LearningWithForgetting(model, opt, foreign)
    with pytest.raises(ValueError, match=r"retain_samples\[0\] has 35 tokens"):
        LearningWithForgetting(model, opt, make_samples(2), LWFConfig(retain="samples"),
                               retain_samples=long)
    # Bound later (Trainer): the check runs at bind, and nothing is bound after a failure.
    lwf = LearningWithForgetting(None, None, long)
    with pytest.raises(ValueError, match="positions"):
        lwf.bind(model, opt)
    assert lwf.model is None


def test_sample_shapes_and_types():
    model = tiny_llama()
    opt = FisherAdamW(model.parameters())
    flat = make_samples(3)
    batched = [{k: v[None] for k, v in s.items()} for s in flat]  # return_tensors="pt" shapes
    lists = [{k: v.tolist() for k, v in s.items()} for s in flat]
    for samples in (batched, lists):
        lwf = LearningWithForgetting(model, opt, samples)
        for got, want in zip(lwf.samples, flat):
            assert torch.equal(got["input_ids"], want["input_ids"])
            assert torch.equal(got["labels"], want["labels"])
    bad = [
        ({"input_ids": torch.zeros(2, 5, dtype=torch.long)}, "shaped"),
        ({"input_ids": torch.ones(5)}, "integer token ids"),
        ({"input_ids": torch.ones(5, dtype=torch.long),
          "labels": torch.ones(4, dtype=torch.long)}, "labels has 4 entries"),
        ({"input_ids": torch.ones(4, dtype=torch.long),
          "labels": torch.full((4,), IGNORE_INDEX)}, "no label token"),
        (("prompt", "response"), "must be a dict"),
    ]
    for sample, message in bad:
        with pytest.raises((ValueError, TypeError), match=message):
            LearningWithForgetting(model, opt, flat[:1] + [sample])
    with pytest.raises(TypeError, match="forget_samples must be a sequence"):
        LearningWithForgetting(model, opt, flat[0])


def test_pad_id_none_pads_with_zero_and_bad_pad_ids_are_refused():
    model = tiny_llama()
    opt = FisherAdamW(model.parameters())
    lwf = LearningWithForgetting(model, opt, make_samples(4), pad_id=None)
    assert lwf.pad_id == 0
    for bad in (-1, 1.5, "0", True):
        with pytest.raises(ValueError, match="pad_id"):
            LearningWithForgetting(model, opt, make_samples(4), pad_id=bad)


def test_one_shot_learn_batches_are_refused_reiterables_are_read_each_time():
    model = tiny_llama()
    opt = FisherAdamW(model.parameters())
    config = LWFConfig(scores="loss_change", direction="fresh", batch_size=4, score_batches=2)
    with pytest.raises(TypeError, match="one-shot iterator"):
        LearningWithForgetting(model, opt, make_samples(4), config,
                               learn_batches=(b for b in learn_batches(2)))
    with pytest.raises(ValueError, match="learn_batches is required with direction='fresh'"):
        LearningWithForgetting(model, opt, make_samples(4), config)
    calls = []

    def fresh():
        calls.append(1)
        return learn_batches(3)

    lwf = LearningWithForgetting(model, opt, make_samples(4), config, learn_batches=fresh)
    first = lwf.score().fc
    second = lwf.score().fc
    assert len(calls) == 2 and torch.equal(first, second)


@pytest.mark.parametrize("field, value, message", [
    ("every", 0, "every"), ("every", True, "every"), ("steps", 2.0, "steps"),
    ("warmup", -1, "warmup"), ("rescore_every", True, "rescore_every"),
    ("fraction", float("nan"), "fraction"), ("fraction", True, "fraction"),
    ("fraction", 1.5, "fraction"), ("lr", float("inf"), "lr"), ("lr", -1e-3, "lr"),
    ("eta", float("inf"), "eta"), ("eta", 0.0, "eta"), ("alpha", -1.0, "alpha"),
    ("alpha", float("nan"), "alpha"), ("freeze_quantile", True, "freeze_quantile"),
    ("retain_weight", float("nan"), "retain_weight"), ("batch_size", True, "batch_size"),
    ("seed", 1.5, "seed"), ("pilot_steps", -1, "pilot_steps"), ("interleave", 0, "interleave"),
    ("interleave_weight", 0.0, "interleave_weight"), ("scores", "FC", "scores"),
    ("fc_at", "begin", "fc_at"), ("score_method", "jvp", "score_method"),
    ("backend", "gpu", "backend"), ("on_nonfinite", "ignore", "on_nonfinite"),
    ("normalize", 1, "normalize"), ("score_params", "lm_head.weight", "score_params"),
    ("score_params", [], "score_params"), ("score_params", [3], "score_params"),
    ("retain", "all", "retain"), ("forget_eval_size", -1, "forget_eval_size"),
])
def test_config_refuses_bad_values_at_construction_and_assignment(field, value, message):
    with pytest.raises((ValueError, TypeError), match=message):
        LWFConfig(**{field: value})
    config = LWFConfig()
    before = getattr(config, field)
    with pytest.raises((ValueError, TypeError), match=message):
        setattr(config, field, value)
    assert getattr(config, field) == before  # nothing changed


def test_config_cross_field_rules():
    with pytest.raises(ValueError, match="interleave and early"):
        LWFConfig(interleave=4, early=True)
    with pytest.raises(ValueError, match="retain-only"):
        LWFConfig(ascent=False, retain=None)
    config = LWFConfig(retain=None)
    with pytest.raises(ValueError, match="retain-only"):
        config.ascent = False
    assert config.ascent is True
    with pytest.raises(AttributeError, match="no field 'lerning_rate'"):
        config.lerning_rate = 1e-3
    generator_spec = LWFConfig(score_params=(n for n in ["lm_head.weight"]))
    assert generator_spec.score_params == ["lm_head.weight"]  # read once, kept as a list


def test_warmup_longer_than_the_run_warns():
    model = tiny_llama()
    lwf = LearningWithForgetting(model, FisherAdamW(model.parameters()), make_samples(4),
                                 LWFConfig(every=10, warmup=50))
    with pytest.warns(UserWarning, match=r"never unlearn.*20 learning steps.*warmup=50"):
        lwf.begin(20)
    other = LearningWithForgetting(model, FisherAdamW(model.parameters()), make_samples(4),
                                   LWFConfig(every=10, warmup=5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        other.begin(20)


class Poison:
    """A forward hook that makes the logits infinite while armed (a diverging ascent)."""

    def __init__(self, model):
        self.armed = False
        model.register_forward_hook(self)

    def __call__(self, module, args, output):
        if self.armed:
            output.logits = output.logits * float("inf")
        return output


def primed(config, managed=None):
    model = tiny_llama()
    opt = FisherAdamW(managed(model) if managed else model.parameters(), lr=1e-2,
                      fisher="ema")
    lwf = LearningWithForgetting(model, opt, make_samples(8, seed=3), config)
    lwf.begin()
    for batch in learn_batches(2):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    lwf.global_step = 2
    lwf.rescore()
    return model, opt, lwf


def test_a_diverging_unlearning_step_changes_nothing_and_raises_or_is_skipped():
    model, opt, lwf = primed(LWFConfig(fraction=0.5, batch_size=4, lr=1e-2))
    poison = Poison(model)
    state_before = {k: v.clone() for k, v in opt.state[next(model.parameters())].items()
                    if torch.is_tensor(v)}
    before = params_of(model)
    poison.armed = True
    with pytest.raises(FloatingPointError, match=r"unlearning step 1 of 3.*changed nothing"):
        lwf.unlearn(3)
    assert_unchanged(model, before)
    for key, value in opt.state[next(model.parameters())].items():
        if key in state_before:
            assert torch.equal(value, state_before[key]), key
    assert all(p.grad is None for p in model.parameters())
    lwf.config.on_nonfinite = "skip"
    stats = lwf.unlearn(3)
    assert stats["nonfinite_skipped"] == 3 and stats["unlearn_steps"] == 0
    assert_unchanged(model, before)
    poison.armed = False
    stats = lwf.unlearn(2)
    assert stats["unlearn_steps"] == 2 and "nonfinite_skipped" not in stats
    assert all(math.isfinite(v) for v in stats.values())


def test_unlearning_leaves_params_of_other_optimizers_alone():
    """The objective's gradient reaches only the params this optimizer manages: a second
    optimizer's pending .grad (or None) is exactly as it was."""
    def managed(model):
        return [p for n, p in model.named_parameters() if "layers" in n]

    model, opt, lwf = primed(LWFConfig(fraction=0.5, batch_size=4, lr=1e-2), managed)
    others = [p for n, p in model.named_parameters() if "layers" not in n]
    for p in others[1:]:
        p.grad = None
    pending = torch.randn_like(others[0])
    others[0].grad = pending.clone()
    before = params_of(model)
    lwf.unlearn(2)
    assert torch.equal(others[0].grad, pending)
    assert all(p.grad is None for p in others[1:])
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_interleaved_loss_adds_the_weighted_objective():
    """loss - w * (m/n) * J with m = n/k forget samples (fractions carried), after warm-up."""
    config = LWFConfig(interleave=3, interleave_weight=0.5, warmup=1, fraction=0.5, batch_size=4,
                       retain=None, scores="random")
    model, opt, lwf = primed(config)
    lwf.global_step = 0
    loss = torch.tensor(2.0)
    assert lwf.interleaved_loss(loss, 4) is loss  # warm-up
    lwf.global_step = 1
    lwf.selected = None
    generator_state = lwf.generator.get_state()
    out = lwf.interleaved_loss(loss, 4)  # carry 4/3: one forget sample
    assert lwf.selected is not None and lwf._interleave_carry == pytest.approx(1 / 3)
    # Replay: the same sample through the model's loss.
    lwf.generator.set_state(generator_state)
    lwf.rescore()
    lwf._order, lwf._cursor = None, 0
    index = lwf._next_indices(1)
    batch = collate([lwf.samples[i] for i in index])
    forget = model(**batch).loss
    torch.testing.assert_close(out, loss - 0.5 * (1 / 4) * forget)
    out2 = lwf.interleaved_loss(loss, 5)  # carry 1/3 + 5/3 = 2: two samples
    assert lwf._interleave_carry == pytest.approx(0.0, abs=1e-12)
    assert out2.requires_grad and not torch.equal(out2, loss)
    assert lwf.step() is None  # no periodic phase in the interleaved schedule
    with pytest.raises(ValueError, match="num_samples"):
        lwf.interleaved_loss(loss, 0)
    plain = primed(LWFConfig(scores="random", batch_size=4))[2]
    with pytest.raises(RuntimeError, match="interleave=k"):
        plain.interleaved_loss(loss, 4)


def test_theta_0_survives_a_checkpoint():
    model, opt, lwf = primed(LWFConfig(fraction=0.5, batch_size=4))
    state = lwf.state_dict()
    fresh_model = tiny_llama(seed=5)  # other weights: theta_0 must come from the checkpoint
    fresh_model.load_state_dict(model.state_dict())
    fresh_opt = FisherAdamW(fresh_model.parameters(), lr=1e-2, fisher="ema")
    fresh_opt.load_state_dict(opt.state_dict())
    resumed = LearningWithForgetting(fresh_model, fresh_opt, make_samples(8, seed=3),
                                     LWFConfig(fraction=0.5, batch_size=4))
    resumed.load_state_dict(state)
    for a, b in zip(resumed.start_weights, lwf.start_weights):
        assert torch.equal(a, b)
    torch.testing.assert_close(resumed.score().fc, lwf.score().fc)


def test_the_kl_reference_model_survives_a_checkpoint():
    """retain_loss='kl' compares with the model as it was at begin(): a resumed run gets that
    model back from the LWF state, not the resumed weights."""
    config = LWFConfig(fraction=0.5, batch_size=4, retain_loss="kl", scores="random")
    model, opt, lwf = primed(config)
    state = lwf.state_dict()
    assert state["start_model"] is not None
    resumed_model = tiny_llama(seed=9)
    resumed_model.load_state_dict(model.state_dict())
    resumed = LearningWithForgetting(resumed_model, FisherAdamW(resumed_model.parameters()),
                                     make_samples(8, seed=3), config)
    resumed.load_state_dict(state)
    for a, b in zip(resumed.start_model.parameters(), lwf.start_model.parameters()):
        assert torch.equal(a, b)
    assert not any(p.requires_grad for p in resumed.start_model.parameters())
    torch.testing.assert_close(resumed._retain_term(), lwf._retain_term())


def test_alpha_defaults_to_the_peak_learning_rate_not_the_scheduled_one():
    model, opt, lwf = primed(LWFConfig(fraction=0.5, batch_size=4))
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0)  # decayed to 0
    scheduler.step()
    assert opt.param_groups[0]["lr"] == 0.0
    assert lwf.score().alpha == pytest.approx(1e-2)  # initial_lr
    for group in opt.param_groups:
        group.pop("initial_lr")
    with pytest.raises(ValueError, match=r"lr is 0.0: set LWFConfig\(alpha=...\)"):
        lwf.score()
    lwf.config.alpha = 1e-3
    assert lwf.score().alpha == 1e-3


def test_numpy_numbers_in_the_config_are_stored_as_plain_ones():
    import numpy as np

    config = LWFConfig(lr=np.float64(2e-4), every=np.int64(7), fraction=np.float32(0.25))
    assert type(config.lr) is float and type(config.every) is int
    assert type(config.fraction) is float and config.every == 7
    config.batch_size = np.int32(4)
    assert type(config.batch_size) is int
    model = tiny_llama()
    lwf = LearningWithForgetting(model, FisherAdamW(model.parameters()), make_samples(4), config)
    import io

    buffer = io.BytesIO()
    torch.save(lwf.state_dict(), buffer)
    buffer.seek(0)
    torch.load(buffer, weights_only=True)  # plain values only


def test_a_negative_token_id_is_named():
    model = tiny_llama()
    samples = make_samples(2)
    samples[1]["input_ids"][2] = -5
    with pytest.raises(ValueError, match=r"forget_samples\[1\]\['input_ids'\] holds -5 at"):
        LearningWithForgetting(model, FisherAdamW(model.parameters()), samples)
