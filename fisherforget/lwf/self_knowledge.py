"""Self-knowledge: the model's own answers to the forgetting task's prompts, and their encoding.

LWF never unlearns reference answers; it unlearns what the model itself would say (``D_self``).
:func:`generate_self_knowledge` samples those answers with ``model.generate``;
:func:`encode_pairs` turns prompt/response pairs into causal-LM samples whose loss covers only the
response; :func:`collate` pads samples into a batch.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from fisherforget.fisher import IGNORE_INDEX

__all__ = ["generate_self_knowledge", "encode_pairs", "collate", "batches_of", "fingerprint"]


def _format_prompt(tokenizer: Any, prompt: str, chat_template: bool) -> str:
    if not chat_template:
        return prompt
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def generate_self_knowledge(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    num_return_sequences: int = 1,
    seed: int = 0,
    chat_template: bool = False,
    progress: bool = True,
    generation_kwargs: Optional[Mapping[str, Any]] = None,
) -> list[dict[str, Any]]:
    """Answer every prompt with the model itself; return the prompt/response pairs (``D_self``).

    Prompts are left-padded and generated in batches of ``batch_size`` with ``model.generate``
    (sampling with ``temperature``/``top_p``/``top_k`` when ``do_sample``, else greedy). Sampling is
    seeded with ``seed`` inside ``torch.random.fork_rng``, so the caller's RNG state is unchanged
    and the same call gives the same pairs. ``chat_template=True`` wraps each prompt in the
    tokenizer's chat template as a user turn.

    Returns one dict per (prompt, sample): ``prompt`` (the text as given), ``response`` (decoded,
    special tokens skipped), ``prompt_ids`` and ``response_ids`` (the exact token ids, the
    response ending with EOS when the model produced one), for :func:`encode_pairs`.
    """
    if not isinstance(prompts, Sequence) or isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of strings")
    if any(not isinstance(p, str) for p in prompts):
        raise TypeError("prompts must all be strings")
    for name, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size),
                        ("num_return_sequences", num_return_sequences)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"Invalid {name}: {value!r} (must be an int >= 1)")
    if do_sample and not temperature > 0:
        raise ValueError(f"Invalid temperature: {temperature!r} (must be > 0 when sampling)")
    pad_id = tokenizer.pad_token_id
    eos_id = tokenizer.eos_token_id
    if pad_id is None:
        pad_id = eos_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token")
    device = _model_device(model)
    texts = [_format_prompt(tokenizer, p, chat_template) for p in prompts]
    kwargs: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=pad_id,
        num_return_sequences=num_return_sequences,
    )
    if eos_id is not None:
        kwargs["eos_token_id"] = eos_id
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k)
    kwargs.update(generation_kwargs or {})

    starts = range(0, len(texts), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="self-knowledge", total=len(starts), leave=False)
    devices = [device] if device.type == "cuda" else []
    was_training = model.training
    old_side = getattr(tokenizer, "padding_side", "right")
    pairs: list[dict[str, Any]] = []
    model.eval()
    try:
        tokenizer.padding_side = "left"
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            for start in starts:
                chunk = texts[start : start + batch_size]
                enc = tokenizer(chunk, return_tensors="pt", padding=True,
                                add_special_tokens=not chat_template)
                enc = {k: v.to(device) for k, v in enc.items()}
                out = model.generate(**enc, **kwargs)
                width = enc["input_ids"].shape[1]
                for row in range(out.shape[0]):
                    source = row // num_return_sequences
                    prompt_mask = enc["attention_mask"][source].bool()
                    prompt_ids = enc["input_ids"][source][prompt_mask].tolist()
                    response_ids = _trim(out[row, width:].tolist(), eos_id, pad_id)
                    pairs.append({
                        "prompt": prompts[start + source],
                        "response": tokenizer.decode(response_ids, skip_special_tokens=True),
                        "prompt_ids": prompt_ids,
                        "response_ids": response_ids,
                    })
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return pairs


def _trim(ids: list[int], eos_id: Optional[int], pad_id: int) -> list[int]:
    """Cut a generated continuation after its first EOS (kept) and drop trailing padding."""
    if eos_id is not None and eos_id in ids:
        return ids[: ids.index(eos_id) + 1]
    while ids and ids[-1] == pad_id and pad_id != eos_id:
        ids = ids[:-1]
    return ids


def encode_pairs(
    tokenizer: Any,
    pairs: Iterable[Mapping[str, Any]],
    *,
    max_length: Optional[int] = None,
    chat_template: bool = False,
    add_eos: bool = True,
) -> list[dict[str, Tensor]]:
    """Encode prompt/response pairs as causal-LM samples: ``input_ids = prompt + response`` and
    ``labels`` equal to ``input_ids`` on the response and -100 on the prompt (the loss, and every
    gradient LWF takes, covers the response only).

    Pairs from :func:`generate_self_knowledge` carry their exact token ids and are used as
    generated; other pairs (``{"prompt": ..., "response": ...}``, e.g. a JSONL file) are tokenized:
    the prompt with the tokenizer's special tokens (or the chat template), the response without,
    plus EOS when ``add_eos`` and the response does not already end with it. ``max_length``
    truncates the response (never the prompt; a prompt that alone is too long is an error).
    """
    eos_id = tokenizer.eos_token_id
    samples = []
    for index, pair in enumerate(pairs):
        if "prompt_ids" in pair and "response_ids" in pair:
            prompt_ids = list(pair["prompt_ids"])
            response_ids = list(pair["response_ids"])
        else:
            if not isinstance(pair.get("prompt"), str) or not isinstance(pair.get("response"), str):
                raise ValueError(f"pair {index} needs string 'prompt' and 'response' fields")
            text = _format_prompt(tokenizer, pair["prompt"], chat_template)
            prompt_ids = tokenizer(text, add_special_tokens=not chat_template)["input_ids"]
            response_ids = tokenizer(pair["response"], add_special_tokens=False)["input_ids"]
            if add_eos and eos_id is not None and (not response_ids or response_ids[-1] != eos_id):
                response_ids = response_ids + [eos_id]
        if max_length is not None:
            if len(prompt_ids) >= max_length:
                raise ValueError(
                    f"pair {index}: the prompt has {len(prompt_ids)} tokens, max_length is "
                    f"{max_length}"
                )
            response_ids = response_ids[: max_length - len(prompt_ids)]
        if not response_ids:
            raise ValueError(f"pair {index} has an empty response: nothing to learn or unlearn")
        ids = torch.tensor(prompt_ids + response_ids, dtype=torch.long)
        labels = ids.clone()
        labels[: len(prompt_ids)] = IGNORE_INDEX
        samples.append({"input_ids": ids, "labels": labels})
    return samples


def collate(samples: Sequence[Mapping[str, Any]], pad_id: int = 0) -> dict[str, Tensor]:
    """Right-pad 1-D samples (``input_ids``, optional ``labels``) into a batch with an
    ``attention_mask``; padded labels are -100."""
    if not samples:
        raise ValueError("collate: no samples")
    width = max(len(s["input_ids"]) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, sample in enumerate(samples):
        x = torch.as_tensor(sample["input_ids"], dtype=torch.long)
        y = torch.as_tensor(sample.get("labels", x), dtype=torch.long)
        ids[row, : len(x)] = x
        labels[row, : len(y)] = y
        mask[row, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batches_of(
    samples: Sequence[Mapping[str, Any]],
    batch_size: int,
    *,
    indices: Optional[Sequence[int]] = None,
    pad_id: int = 0,
    device: Optional[torch.device] = None,
):
    """Yield collated batches of ``samples`` (or of ``samples[indices]``) in order."""
    order = list(range(len(samples))) if indices is None else [int(i) for i in indices]
    for start in range(0, len(order), batch_size):
        batch = collate([samples[i] for i in order[start : start + batch_size]], pad_id)
        yield batch if device is None else {k: v.to(device) for k, v in batch.items()}


def fingerprint(samples: Sequence[Mapping[str, Any]]) -> str:
    """A short hash of the samples' token ids and labels (to check that a resumed run unlearns
    the same ``D_self``)."""
    digest = hashlib.sha1()
    for sample in samples:
        for key in ("input_ids", "labels"):
            value = sample.get(key)
            if value is not None:
                digest.update(torch.as_tensor(value, dtype=torch.long).numpy().tobytes())
                digest.update(b"|")
    return digest.hexdigest()[:16]

