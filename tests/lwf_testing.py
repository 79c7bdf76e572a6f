"""Shared helpers of the LWF tests (tests/lwf/): a tiny random causal LM, a word-level tokenizer
and a self-knowledge set of prompt/response samples."""

import torch

from fisherforget.fisher import IGNORE_INDEX

WORDS = ["<pad>", "<bos>", "<eos>", "=", "A", "B"] + [str(i) for i in range(10)]


def word_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A",
                                                       special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>")


def tiny_llama(seed=0, vocab=len(WORDS)):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=32, tie_word_embeddings=False,
                         attn_implementation="eager", bos_token_id=1, eos_token_id=2,
                         pad_token_id=0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def make_samples(n, seed=0, prompt_len=4, response_len=3, vocab=len(WORDS)):
    """Random prompt/response samples with the loss on the response only."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        extra = i % 2  # ragged lengths, so that batches get padding
        ids = torch.randint(3, vocab, (prompt_len + response_len + extra,), generator=gen)
        labels = ids.clone()
        labels[:prompt_len] = IGNORE_INDEX
        out.append({"input_ids": ids, "labels": labels})
    return out


def learn_batches(n_batches=4, batch=8, seed=1):
    from fisherforget.lwf import collate

    samples = make_samples(n_batches * batch, seed=seed)
    return [collate(samples[i * batch:(i + 1) * batch]) for i in range(n_batches)]

