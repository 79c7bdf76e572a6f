"""Self-knowledge generation and encoding."""

import pytest
import torch

from fisherforget.fisher import IGNORE_INDEX
from fisherforget.lwf import collate, encode_pairs, fingerprint, generate_self_knowledge
from fisherforget.lwf.self_knowledge import normalized_match, pad_id_of
from lwf_testing import tiny_llama, word_tokenizer

PROMPTS = ["A 1 2 3 =", "B 4 =", "A 9 =", "B 1 1 1 1 =", "A 0 ="]


def test_generation_returns_the_models_own_answers():
    tok = word_tokenizer()
    model = tiny_llama()
    state = torch.random.get_rng_state()
    pairs = generate_self_knowledge(model, tok, PROMPTS, max_new_tokens=4, batch_size=2, seed=3,
                                    progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    assert [p["prompt"] for p in pairs] == PROMPTS
    again = generate_self_knowledge(model, tok, PROMPTS, max_new_tokens=4, batch_size=5, seed=3,
                                    progress=False)
    other = generate_self_knowledge(model, tok, PROMPTS, max_new_tokens=4, batch_size=2, seed=4,
                                    progress=False)
    # Same seed: same samples; left padding and batching do not change a row's continuation
    # distribution but do change the random stream, so compare within the same batching only.
    assert pairs == generate_self_knowledge(model, tok, PROMPTS, max_new_tokens=4, batch_size=2,
                                            seed=3, progress=False)
    assert any(a["response_ids"] != b["response_ids"] for a, b in zip(pairs, other))
    assert len(again) == len(PROMPTS)
    for pair in pairs:
        assert pair["prompt_ids"] == tok(pair["prompt"])["input_ids"]
        assert 1 <= len(pair["response_ids"]) <= 4
        if tok.eos_token_id in pair["response_ids"]:  # cut after the first EOS, kept
            assert pair["response_ids"].index(tok.eos_token_id) == len(pair["response_ids"]) - 1
        assert pair["response"] == tok.decode(pair["response_ids"], skip_special_tokens=True)


def test_greedy_generation_matches_argmax_decoding():
    tok = word_tokenizer()
    model = tiny_llama().eval()
    pairs = generate_self_knowledge(model, tok, PROMPTS[:3], max_new_tokens=3, do_sample=False,
                                    batch_size=3, progress=False)
    for pair in pairs:
        ids = list(pair["prompt_ids"])
        expected = []
        with torch.no_grad():
            for _ in range(3):
                nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
                expected.append(nxt)
                ids.append(nxt)
                if nxt == tok.eos_token_id:
                    break
        assert pair["response_ids"] == expected


def test_num_return_sequences():
    tok = word_tokenizer()
    pairs = generate_self_knowledge(tiny_llama(), tok, PROMPTS[:2], max_new_tokens=3,
                                    num_return_sequences=3, progress=False)
    assert [p["prompt"] for p in pairs] == [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3


def test_encode_pairs_masks_the_prompt():
    tok = word_tokenizer()
    samples = encode_pairs(tok, [{"prompt": "A 1 2 =", "response": "3 4"},
                                 {"prompt_ids": [1, 4, 7], "response_ids": [8, 2]}])
    first = samples[0]
    prompt_ids = tok("A 1 2 =")["input_ids"]
    assert first["input_ids"].tolist() == prompt_ids + tok("3 4", add_special_tokens=False)[
        "input_ids"] + [tok.eos_token_id]
    assert first["labels"][: len(prompt_ids)].eq(IGNORE_INDEX).all()
    response = slice(len(prompt_ids), None)
    assert first["labels"][response].tolist() == first["input_ids"][response].tolist()
    assert samples[1]["input_ids"].tolist() == [1, 4, 7, 8, 2]
    assert samples[1]["labels"].tolist() == [IGNORE_INDEX] * 3 + [8, 2]
    short = encode_pairs(tok, [{"prompt": "A 1 2 =", "response": "3 4 5 6"}], max_length=7)
    assert len(short[0]["input_ids"]) == 7
    with pytest.raises(ValueError, match="prompt"):
        encode_pairs(tok, [{"prompt": "A 1 2 3 4 5 =", "response": "1"}], max_length=4)
    with pytest.raises(ValueError, match="string 'prompt' and 'response'"):
        encode_pairs(tok, [{"prompt": "A"}])


def test_collate_pads_and_fingerprint():
    samples = [{"input_ids": torch.tensor([1, 5, 6]), "labels": torch.tensor([-100, 5, 6])},
               {"input_ids": torch.tensor([1, 7]), "labels": torch.tensor([-100, 7])}]
    batch = collate(samples, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6], [1, 7, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 5, 6], [-100, 7, -100]]
    assert fingerprint(samples) == fingerprint([dict(s) for s in samples])
    assert fingerprint(samples) != fingerprint(samples[::-1])


def test_generation_errors():
    tok = word_tokenizer()
    model = tiny_llama()
    with pytest.raises(TypeError, match="sequence of strings"):
        generate_self_knowledge(model, tok, "A 1 =")
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_self_knowledge(model, tok, PROMPTS, max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        generate_self_knowledge(model, tok, PROMPTS, temperature=0.0)


def padless_tokenizer():
    """The word-level tokenizer without a pad token, as GPT-2's and Llama 3's ship."""
    tok = word_tokenizer()
    tok.pad_token = None
    assert tok.pad_token_id is None and tok.eos_token_id is not None
    return tok


def test_a_tokenizer_without_a_pad_token_generates_the_same_pairs():
    """Padding is done here (with EOS), so the pairs equal those of the same tokenizer with a pad
    token, and the tokenizer is left as it was."""
    model = tiny_llama()
    with_pad = generate_self_knowledge(model, word_tokenizer(), PROMPTS, max_new_tokens=4,
                                       do_sample=False, batch_size=3, progress=False)
    tok = padless_tokenizer()
    side = tok.padding_side
    without = generate_self_knowledge(model, tok, PROMPTS, max_new_tokens=4, do_sample=False,
                                      batch_size=3, progress=False)
    assert [(p["prompt_ids"], p["response_ids"]) for p in without] == \
        [(p["prompt_ids"], p["response_ids"]) for p in with_pad]
    assert tok.pad_token is None and tok.padding_side == side
    assert pad_id_of(tok) == tok.eos_token_id and pad_id_of(word_tokenizer()) == 0


def test_pad_id_of_a_tokenizer_without_pad_or_eos():
    class Bare:
        pad_token_id = None
        eos_token_id = None

    with pytest.raises(ValueError, match="neither a pad nor an EOS"):
        pad_id_of(Bare())


def test_collate_accepts_pad_id_none_and_batched_samples():
    flat = [{"input_ids": torch.tensor([1, 4, 5]), "labels": torch.tensor([-100, 4, 5])},
            {"input_ids": torch.tensor([1, 6]), "labels": torch.tensor([-100, 6])}]
    batched = [{k: v[None] for k, v in s.items()} for s in flat]  # return_tensors="pt"
    lists = [{k: v.tolist() for k, v in s.items()} for s in flat]
    expected = collate(flat, 0)
    for samples in (batched, lists):
        got = collate(samples, pad_id=None)
        for key in expected:
            assert torch.equal(got[key], expected[key]), key
    no_labels = collate([{"input_ids": [1, 4, 5]}])
    assert no_labels["labels"].tolist() == [[1, 4, 5]]


@pytest.mark.parametrize("samples, error, message", [
    ([{"input_ids": torch.zeros(2, 3, dtype=torch.long)}], ValueError,
     r"sample 0\['input_ids'\] must be 1-D"),
    ([{"input_ids": [1, 2]}, {"input_ids": torch.ones(3)}], ValueError,
     r"sample 1\['input_ids'\] must hold integer token ids"),
    ([{"input_ids": [1, 2, 3], "labels": [1, 2]}], ValueError, "labels has 2 entries"),
    ([("A 1 =", "2")], TypeError, "sample 0 must be a dict"),
    ([{"labels": [1]}], TypeError, "sample 0 must be a dict with 'input_ids'"),
])
def test_collate_errors_name_the_sample(samples, error, message):
    with pytest.raises(error, match=message):
        collate(samples)


@pytest.mark.parametrize("pad_id", [-1, 1.0, "0", True])
def test_collate_refuses_bad_pad_ids(pad_id):
    with pytest.raises(ValueError, match="pad_id"):
        collate([{"input_ids": [1, 2]}], pad_id=pad_id)


def test_encode_pairs_takes_tuples_and_names_bad_pairs():
    tok = word_tokenizer()
    as_dicts = encode_pairs(tok, [{"prompt": "A 1 =", "response": "2"}])
    for pairs in ([("A 1 =", "2")], [["A 1 =", "2"]]):
        got = encode_pairs(tok, pairs)
        assert torch.equal(got[0]["input_ids"], as_dicts[0]["input_ids"])
        assert torch.equal(got[0]["labels"], as_dicts[0]["labels"])
    with pytest.raises(ValueError, match=r"pair 1 must be \(prompt, response\), got 3 items"):
        encode_pairs(tok, [("A 1 =", "2"), ("A", "1", "2")])
    with pytest.raises(TypeError, match="pair 0 must be a dict or a"):
        encode_pairs(tok, ["A 1 = 2"])
    with pytest.raises(TypeError, match="pairs must be an iterable"):
        encode_pairs(tok, "A 1 = 2")


def test_references_keep_only_the_wrong_answers():
    model = tiny_llama()
    tok = word_tokenizer()
    every = generate_self_knowledge(model, tok, PROMPTS, max_new_tokens=3, do_sample=False,
                                    progress=False)
    # A reference equal to the model's own answer for prompts 0 and 2: those answers are right.
    references = [p["response"] if i in (0, 2) else "9 9 9 9 9" for i, p in enumerate(every)]
    assert all(p["response"] != "9 9 9 9 9" for p in every)
    wrong = generate_self_knowledge(model, tok, PROMPTS, max_new_tokens=3, do_sample=False,
                                    progress=False, references=references)
    assert [p["prompt"] for p in wrong] == [PROMPTS[i] for i in (1, 3, 4)]
    assert all(p["correct"] is False and p["reference"] == "9 9 9 9 9" for p in wrong)
    both = generate_self_knowledge(model, tok, PROMPTS, max_new_tokens=3, do_sample=False,
                                   progress=False, references=references, keep="all")
    assert [p["correct"] for p in both] == [True, False, True, False, False]
    # A custom judge decides instead.
    none_right = generate_self_knowledge(model, tok, PROMPTS, max_new_tokens=3, do_sample=False,
                                         progress=False, references=references,
                                         judge=lambda response, reference: False)
    assert len(none_right) == len(PROMPTS)
    with pytest.raises(ValueError, match="references has 2 entries for 5 prompts"):
        generate_self_knowledge(model, tok, PROMPTS, references=["1", "2"], progress=False)
    with pytest.raises(ValueError, match="keep"):
        generate_self_knowledge(model, tok, PROMPTS, references=references, keep="right",
                                progress=False)


def test_normalized_match():
    assert normalized_match("The capital is  PARIS.", "paris")
    assert normalized_match("Dental caries on pit and fissure surface", "dental caries ON pit")
    assert not normalized_match("Lyon", "Paris")
    assert not normalized_match("anything", " . ")


def test_collate_names_unusable_samples():
    good = {"input_ids": [1, 4, 5]}
    with pytest.raises(TypeError, match="got one mapping: wrap a single sample in a list"):
        collate(good)
    cases = [
        ({"input_ids": "A 1 ="}, TypeError, r"sample 1\['input_ids'\] must be a sequence of "
                                            "integer token ids, got str"),
        ({"input_ids": [[1, 2], [3]]}, TypeError, r"sample 1\['input_ids'\]"),
        ({"input_ids": []}, ValueError, r"sample 1\['input_ids'\] is empty"),
        ({"input_ids": [1, -100, 4]}, ValueError,
         r"sample 1\['input_ids'\] holds -100 at position 1 \(must be >= 0\)"),
        ({"input_ids": [1, 4, 5], "labels": [-100, 4, -1]}, ValueError,
         r"sample 1\['labels'\] holds -1 at position 2 \(must be >= 0 or -100\)"),
        ({"input_ids": torch.ones(3, 1, dtype=torch.long)}, ValueError,
         r"sample 1\['input_ids'\] must be 1-D \(or shaped \(1, T\)\), got shape \(3, 1\)"),
    ]
    for bad, error, message in cases:
        with pytest.raises(error, match=message):
            collate([good, bad])


def test_collate_takes_numpy_and_any_iterable_of_samples():
    np = pytest.importorskip("numpy")
    samples = [{"input_ids": np.array([1, 4, 5]), "labels": np.array([-100, 4, 5])},
               {"input_ids": np.array([[1, 6]], dtype=np.int32)}]
    batch = collate(iter(samples), pad_id=None)
    assert batch["input_ids"].tolist() == [[1, 4, 5], [1, 6, 0]]
    assert batch["labels"].tolist() == [[-100, 4, 5], [1, 6, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_batches_of_checks_its_arguments_at_the_call():
    from fisherforget.lwf import batches_of

    samples = [{"input_ids": [1, 4, 5]}, {"input_ids": [1, 6]}, {"input_ids": [1]}]
    for kwargs, error, message in [
        (dict(batch_size=0), ValueError, "Invalid batch_size: 0"),
        (dict(batch_size=2, pad_id=-1), ValueError, "Invalid pad_id: -1"),
        (dict(batch_size=2, indices=[0, 3]), IndexError, r"indices: \[3\] outside the 3"),
    ]:
        with pytest.raises(error, match=message):
            batches_of(samples, **kwargs)  # raised before any batch is drawn
    batches = list(batches_of(samples, 2, indices=[2, 0], pad_id=None))
    assert [b["input_ids"].tolist() for b in batches] == [[[1, 0, 0], [1, 4, 5]]]


def test_encode_pairs_checks_max_length():
    tok = word_tokenizer()
    for bad in (0, 1, -3, 2.5, True):
        with pytest.raises(ValueError, match="Invalid max_length"):
            encode_pairs(tok, [("A 1 =", "2")], max_length=bad)


def test_generation_takes_any_iterable_of_prompts_and_names_bad_ones():
    class Column:  # e.g. a datasets column: iterable, not a list
        def __init__(self, items):
            self.items = items

        def __iter__(self):
            return iter(self.items)

    tok, model = word_tokenizer(), tiny_llama()
    expected = generate_self_knowledge(model, tok, PROMPTS[:3], max_new_tokens=2,
                                       do_sample=False, progress=False)
    for prompts in (tuple(PROMPTS[:3]), Column(PROMPTS[:3])):
        assert generate_self_knowledge(model, tok, prompts, max_new_tokens=2, do_sample=False,
                                       progress=False) == expected
    with pytest.raises(ValueError, match="prompts is empty"):
        generate_self_knowledge(model, tok, [], progress=False)
    with pytest.raises(TypeError, match=r"prompts\[1\] is a int"):
        generate_self_knowledge(model, tok, ["A 1 =", 3], progress=False)
    with pytest.raises(TypeError, match="prompts must be a sequence of strings, got dict"):
        generate_self_knowledge(model, tok, {"A 1 =": "2"}, progress=False)


def test_references_as_any_iterable_and_judge_misuse():
    tok, model = word_tokenizer(), tiny_llama()
    every = generate_self_knowledge(model, tok, PROMPTS[:2], max_new_tokens=2, do_sample=False,
                                    progress=False)
    references = (every[0]["response"], "9 9 9 9 9")  # a tuple: right, then wrong
    kept = generate_self_knowledge(model, tok, PROMPTS[:2], max_new_tokens=2, do_sample=False,
                                   progress=False, references=iter(references), keep="all")
    assert [(p["reference"], p["correct"]) for p in kept] == [(references[0], True),
                                                              (references[1], False)]
    with pytest.raises(ValueError, match="judge is given without references"):
        generate_self_knowledge(model, tok, PROMPTS[:2], judge=normalized_match, progress=False)
    with pytest.raises(TypeError, match="judge must be a callable"):
        generate_self_knowledge(model, tok, PROMPTS[:2], references=references, judge="exact",
                                progress=False)
    with pytest.raises(TypeError, match=r"references\[1\] is a NoneType"):
        generate_self_knowledge(model, tok, PROMPTS[:2], references=["1", None], progress=False)
    with pytest.warns(UserWarning, match="all 2 answers were judged correct"):
        left = generate_self_knowledge(model, tok, PROMPTS[:2], max_new_tokens=2,
                                       do_sample=False, progress=False, references=references,
                                       judge=lambda response, reference: True)
    assert left == []


def test_answers_stop_at_the_models_own_eos_ids_too():
    """Llama 3 Instruct ends a turn with <|eot_id|>, listed in its generation_config but not
    always the tokenizer's EOS: an answer stops at the first of either, as greedy decoding by
    hand with both stop ids does."""
    tok = padless_tokenizer()
    model = tiny_llama().eval()
    free = generate_self_knowledge(model, tok, PROMPTS, max_new_tokens=4, do_sample=False,
                                   progress=False)
    # A stop id the model emits after its first answer token somewhere (not the EOS).
    extra = next(p["response_ids"][1] for p in free
                 if len(p["response_ids"]) > 2 and p["response_ids"][1] != tok.eos_token_id
                 and p["response_ids"][1] != p["response_ids"][0])
    model.generation_config.eos_token_id = [extra]
    pairs = generate_self_knowledge(model, tok, PROMPTS, max_new_tokens=4, do_sample=False,
                                    batch_size=2, progress=False)
    stops = {extra, tok.eos_token_id}
    for pair in pairs:
        ids, expected = list(pair["prompt_ids"]), []
        with torch.no_grad():
            for _ in range(4):
                nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
                expected.append(nxt)
                ids.append(nxt)
                if nxt in stops:
                    break
        assert pair["response_ids"] == expected
    assert any(p["response_ids"][-1] == extra for p in pairs)
    assert tok.pad_token is None


def test_normalized_match_strips_unicode_punctuation():
    assert normalized_match("«Paris»", "“paris”")
    assert normalized_match("答案是巴黎。", "巴黎")
    assert not normalized_match("Lyon!", "“Paris”")
    assert normalized_match("It is 14.", "4")  # a substring test, as documented


def test_encode_pairs_takes_token_ids_in_any_form_and_names_bad_ones():
    expected = [1, 4, 7, 8, 2]
    for prompt_ids, response_ids in (([1, 4, 7], [8, 2]), (torch.tensor([[1, 4, 7]]),
                                                            torch.tensor([8, 2]))):
        got = encode_pairs(word_tokenizer(), [{"prompt_ids": prompt_ids,
                                               "response_ids": response_ids}])
        assert got[0]["input_ids"].tolist() == expected
        assert got[0]["labels"].tolist() == [IGNORE_INDEX] * 3 + [8, 2]
    with pytest.raises(ValueError, match=r"pair 0\['response_ids'\] must hold integer token ids"):
        encode_pairs(word_tokenizer(), [{"prompt_ids": [1], "response_ids": [0.5]}])
    with pytest.raises(ValueError, match=r"pair 0\['prompt_ids'\] holds a negative"):
        encode_pairs(word_tokenizer(), [{"prompt_ids": [-100, 1], "response_ids": [4]}])
