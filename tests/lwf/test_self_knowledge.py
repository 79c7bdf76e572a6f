"""Self-knowledge generation and encoding."""

import pytest
import torch

from fisherforget.fisher import IGNORE_INDEX
from fisherforget.lwf import collate, encode_pairs, fingerprint, generate_self_knowledge
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
