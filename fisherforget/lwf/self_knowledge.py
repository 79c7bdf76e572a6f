"""Self-knowledge: the model's own answers to the forgetting task's prompts, and their encoding.

LWF never unlearns reference answers; it unlearns what the model itself would say (``D_self``).
:func:`generate_self_knowledge` samples those answers with ``model.generate``;
:func:`encode_pairs` turns prompt/response pairs into causal-LM samples whose loss covers only the
response; :func:`collate` pads samples into a batch.
"""

from __future__ import annotations

import hashlib
import unicodedata
import warnings
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

import torch
from torch import Tensor

from fisherforget.fisher import IGNORE_INDEX

__all__ = ["generate_self_knowledge", "encode_pairs", "collate", "batches_of", "fingerprint",
           "pad_id_of", "normalized_match"]


def _format_prompt(tokenizer: Any, prompt: str, chat_template: bool) -> str:
    if not chat_template:
        return prompt
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def pad_id_of(tokenizer: Any) -> int:
    """The id to pad with: the tokenizer's pad token, else its EOS token (GPT-2's and Llama 3's
    tokenizers ship without a pad token); an error when it has neither."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, (list, tuple)):  # several EOS ids: any of them pads
            value = value[0] if value else None
        if value is not None:
            return int(value)
    raise ValueError("the tokenizer has neither a pad nor an EOS token: pass a pad id")


def _normalized(text: str) -> str:
    """Casefolded, whitespace runs collapsed to one space, punctuation (any Unicode punctuation:
    quotes, guillemets, full stops of other scripts) stripped from both ends."""
    text = " ".join(text.casefold().split())
    start, end = 0, len(text)
    while start < end and (text[start] == " " or unicodedata.category(text[start])[0] == "P"):
        start += 1
    while end > start and (text[end - 1] == " " or unicodedata.category(text[end - 1])[0] == "P"):
        end -= 1
    return text[start:end]


def normalized_match(response: str, reference: str) -> bool:
    """The default judge of :func:`generate_self_knowledge`'s ``references``: the reference,
    casefolded with whitespace collapsed and surrounding punctuation stripped, occurs in the
    response normalised the same way (a substring test: ``"4"`` also matches ``"14"``; pass
    your own ``judge`` for stricter answers). An empty reference matches nothing."""
    wanted = _normalized(reference)
    return bool(wanted) and wanted in _normalized(response)


def _as_list(value: Any, name: str) -> list:
    """``value`` (a list, a tuple, a dataset column, any iterable but a string or a mapping) as
    a list, or a TypeError naming ``name``."""
    if isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__iter__"):
        raise TypeError(f"{name} must be a sequence of strings, got {type(value).__name__}")
    return list(value)


def _stop_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    """The token ids that end an answer: the tokenizer's EOS plus the model's generation EOS
    ids (Llama 3 Instruct ends a turn with ``<|eot_id|>``, which is not always the tokenizer's
    EOS)."""
    ids: list[int] = []
    sources = (getattr(tokenizer, "eos_token_id", None),
               getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    for value in sources:
        for item in (value if isinstance(value, (list, tuple)) else [value]):
            if item is not None and int(item) not in ids:
                ids.append(int(item))
    return ids


def _left_padded(tokenizer: Any, texts: Sequence[str], pad_id: int, add_special_tokens: bool,
                 device: torch.device) -> dict[str, Tensor]:
    """Token ids of ``texts`` left-padded with ``pad_id`` and their attention mask, without
    asking the tokenizer to pad (a tokenizer without a pad token refuses)."""
    rows = [tokenizer(t, add_special_tokens=add_special_tokens)["input_ids"] for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


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
    references: Optional[Sequence[str]] = None,
    judge: Optional[Callable[[str, str], bool]] = None,
    keep: str = "wrong",
) -> list[dict[str, Any]]:
    """Answer every prompt with the model itself; return the prompt/response pairs (``D_self``).

    Prompts are left-padded and generated in batches of ``batch_size`` with ``model.generate``
    (sampling with ``temperature``/``top_p``/``top_k`` when ``do_sample``, else greedy). Sampling is
    seeded with ``seed`` inside ``torch.random.fork_rng``, so the caller's RNG state is unchanged
    and the same call gives the same pairs. ``chat_template=True`` wraps each prompt in the
    tokenizer's chat template as a user turn.

    A tokenizer without a pad token (GPT-2's, Llama 3's) works: prompts are padded with its EOS
    id here (:func:`pad_id_of`), and the tokenizer is not changed. An answer ends at the first
    of the tokenizer's EOS and the model's ``generation_config.eos_token_id`` ids (or the
    ``eos_token_id`` of ``generation_kwargs``), kept in ``response_ids``.

    ``references`` (one reference answer per prompt, when the forgetting task has them) restricts
    ``D_self`` to the model's *wrong* answers, as in the authors' earlier experiments: each
    response is judged by ``judge(response, reference) -> bool`` (default
    :func:`normalized_match`: the normalised reference occurs in the normalised response) and,
    with ``keep="wrong"`` (the default), only the wrong ones are returned; ``keep="all"`` returns
    every pair. With references every pair carries ``reference`` and ``correct`` (a bool); with
    ``num_return_sequences > 1`` each sample is judged on its own. A warning says when every
    answer was judged correct (nothing left to unlearn). ``references`` must have one entry per
    prompt; ``judge`` without ``references`` is an error.

    Returns one dict per (prompt, sample), in prompt order: ``prompt`` (the text as given),
    ``response`` (decoded, special tokens skipped), ``prompt_ids`` and ``response_ids`` (the
    exact token ids, the response ending with its stop id when the model produced one), for
    :func:`encode_pairs`.
    """
    prompts = _as_list(prompts, "prompts")
    if not prompts:
        raise ValueError("prompts is empty: give the forgetting task's prompts")
    bad = next((i for i, p in enumerate(prompts) if not isinstance(p, str)), None)
    if bad is not None:
        raise TypeError(f"prompts must all be strings: prompts[{bad}] is a "
                        f"{type(prompts[bad]).__name__}")
    for name, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size),
                        ("num_return_sequences", num_return_sequences)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"Invalid {name}: {value!r} (must be an int >= 1)")
    if do_sample and not temperature > 0:
        raise ValueError(f"Invalid temperature: {temperature!r} (must be > 0 when sampling)")
    if references is not None:
        references = _as_list(references, "references")
        if len(references) != len(prompts):
            raise ValueError(f"references has {len(references)} entries for {len(prompts)} "
                             "prompts: give one reference answer per prompt")
        bad = next((i for i, r in enumerate(references) if not isinstance(r, str)), None)
        if bad is not None:
            raise TypeError(f"references must all be strings: references[{bad}] is a "
                            f"{type(references[bad]).__name__}")
    if keep not in ("wrong", "all"):
        raise ValueError(f"Invalid keep: {keep!r} (must be 'wrong' or 'all')")
    if judge is not None and not callable(judge):
        raise TypeError(f"judge must be a callable (response, reference) -> bool, got "
                        f"{type(judge).__name__}")
    if judge is not None and references is None:
        raise ValueError("judge is given without references: there is nothing to judge against")
    judge = judge or normalized_match
    pad_id = pad_id_of(tokenizer)
    device = _model_device(model)
    texts = [_format_prompt(tokenizer, p, chat_template) for p in prompts]
    kwargs: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=pad_id,
        num_return_sequences=num_return_sequences,
    )
    stop_ids = _stop_ids(model, tokenizer)
    if stop_ids:
        kwargs["eos_token_id"] = stop_ids
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k)
    kwargs.update(generation_kwargs or {})
    if kwargs.get("eos_token_id") is not None:  # the caller's stop ids, when given, decide
        value = kwargs["eos_token_id"]
        stop_ids = [int(i) for i in (value if isinstance(value, (list, tuple)) else [value])]

    starts = range(0, len(texts), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="self-knowledge", total=len(starts), leave=False)
    devices = [device] if device.type == "cuda" else []
    was_training = model.training
    pairs: list[dict[str, Any]] = []
    model.eval()
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            for start in starts:
                chunk = texts[start : start + batch_size]
                enc = _left_padded(tokenizer, chunk, pad_id, not chat_template, device)
                out = model.generate(**enc, **kwargs)
                width = enc["input_ids"].shape[1]
                for row in range(out.shape[0]):
                    source = row // num_return_sequences
                    prompt_mask = enc["attention_mask"][source].bool()
                    prompt_ids = enc["input_ids"][source][prompt_mask].tolist()
                    response_ids = _trim(out[row, width:].tolist(), stop_ids, pad_id)
                    pair = {
                        "prompt": prompts[start + source],
                        "response": tokenizer.decode(response_ids, skip_special_tokens=True),
                        "prompt_ids": prompt_ids,
                        "response_ids": response_ids,
                    }
                    if references is not None:
                        pair["reference"] = references[start + source]
                        pair["correct"] = bool(judge(pair["response"], pair["reference"]))
                    pairs.append(pair)
    finally:
        model.train(was_training)
    if references is not None and keep == "wrong":
        if pairs and all(p["correct"] for p in pairs):
            warnings.warn(f"generate_self_knowledge: all {len(pairs)} answers were judged "
                          "correct against references, so no pair is kept (keep='wrong'): "
                          "nothing to unlearn", UserWarning, stacklevel=2)
        pairs = [p for p in pairs if not p["correct"]]
    return pairs


def _trim(ids: list[int], stop_ids: Sequence[int], pad_id: int) -> list[int]:
    """Cut a generated continuation after its first stop id (kept) and drop trailing padding
    (``generate`` pads rows that stopped early)."""
    for index, token in enumerate(ids):
        if token in stop_ids:
            return ids[: index + 1]
    if pad_id not in stop_ids:
        while ids and ids[-1] == pad_id:
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
    """Encode prompt/response pairs (dicts, or ``(prompt, response)`` tuples) as causal-LM
    samples: ``input_ids = prompt + response`` and
    ``labels`` equal to ``input_ids`` on the response and -100 on the prompt (the loss, and every
    gradient LWF takes, covers the response only).

    Pairs from :func:`generate_self_knowledge` carry their exact token ids and are used as
    generated; other pairs (``{"prompt": ..., "response": ...}``, e.g. a JSONL file) are tokenized:
    the prompt with the tokenizer's special tokens (or the chat template), the response without,
    plus EOS when ``add_eos`` and the response does not already end with it. ``max_length``
    truncates the response (never the prompt; a prompt that alone is too long is an error).
    A pair that is neither a mapping nor a 2-sequence, or lacks string fields, is an error naming
    its index.
    """
    eos_id = tokenizer.eos_token_id
    if max_length is not None and (not isinstance(max_length, int) or isinstance(max_length, bool)
                                   or max_length < 2):
        raise ValueError(f"Invalid max_length: {max_length!r} (must be None or an int >= 2: a "
                         "prompt token and a response token)")
    if isinstance(pairs, (str, Mapping)):
        raise TypeError("pairs must be an iterable of pairs (dicts or (prompt, response) tuples)")
    samples = []
    for index, pair in enumerate(pairs):
        if isinstance(pair, (tuple, list)):
            if len(pair) != 2:
                raise ValueError(f"pair {index} must be (prompt, response), got {len(pair)} items")
            pair = {"prompt": pair[0], "response": pair[1]}
        elif not isinstance(pair, Mapping):
            raise TypeError(f"pair {index} must be a dict or a (prompt, response) tuple, got "
                            f"{type(pair).__name__}")
        if "prompt_ids" in pair and "response_ids" in pair:
            prompt_ids = _token_ids(pair["prompt_ids"], f"pair {index}['prompt_ids']")
            response_ids = _token_ids(pair["response_ids"], f"pair {index}['response_ids']")
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


def _check_pad_id(pad_id: Optional[int]) -> int:
    if pad_id is None:
        return 0
    if not isinstance(pad_id, int) or isinstance(pad_id, bool) or pad_id < 0:
        raise ValueError(f"Invalid pad_id: {pad_id!r} (must be None or an int >= 0)")
    return pad_id


def _id_vector(value: Any, where: str) -> Tensor:
    """Token ids (a list, an array, a tensor; 1-D or shaped ``(1, T)`` as
    ``return_tensors="pt"`` gives them) as a 1-D long tensor, or an error naming ``where``."""
    try:
        tensor = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"{where} must be a sequence of integer token ids, got "
                        f"{type(value).__name__}: {error}") from None
    if tensor.dim() == 2 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.dim() != 1:
        raise ValueError(f"{where} must be 1-D (or shaped (1, T)), got shape "
                         f"{tuple(tensor.shape)}")
    if tensor.numel() and (tensor.dtype.is_floating_point or tensor.dtype.is_complex
                           or tensor.dtype == torch.bool):
        raise ValueError(f"{where} must hold integer token ids, got {tensor.dtype}")
    return tensor.long()


def _token_ids(value: Any, where: str) -> list[int]:
    """:func:`_id_vector` as a list of ints >= 0."""
    ids = _id_vector(value, where).tolist()
    if any(i < 0 for i in ids):
        raise ValueError(f"{where} holds a negative token id")
    return ids


def collate(samples: Sequence[Mapping[str, Any]], pad_id: Optional[int] = 0) -> dict[str, Tensor]:
    """Right-pad samples into a batch of ``input_ids``, ``attention_mask`` and ``labels``.

    A sample is a mapping with ``input_ids`` and optionally ``labels`` (default: ``input_ids``),
    each a list, array or tensor of token ids, 1-D or shaped ``(1, T)`` as ``return_tensors="pt"``
    gives them; other keys are ignored. Padded positions get ``pad_id``, attention mask 0 and
    label -100. ``pad_id=None`` pads with 0: padded positions are masked and carry no label, so
    any valid id works and a tokenizer without a pad token (``tokenizer.pad_token_id is None``)
    needs no stand-in.

    Errors name the sample's index and key: a sample that is not a mapping or lacks
    ``input_ids``; another shape, an empty sample, non-integer ids, negative ``input_ids``,
    ``labels`` below 0 other than -100, or ``labels`` of another length than ``input_ids``.
    """
    if isinstance(samples, Mapping):
        raise TypeError("collate takes a sequence of samples, got one mapping: wrap a single "
                        "sample in a list")
    samples = list(samples)
    if not samples:
        raise ValueError("collate: no samples")
    pad_id = _check_pad_id(pad_id)
    rows = [_sample_row(sample, f"sample {index}") for index, sample in enumerate(samples)]
    width = max(len(x) for x, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (x, y) in enumerate(rows):
        ids[row, : len(x)] = x
        labels[row, : len(y)] = y
        mask[row, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _sample_row(sample: Any, name: str) -> tuple[Tensor, Tensor]:
    """A sample's ``(input_ids, labels)`` as 1-D long tensors, or an error naming it (``name``:
    e.g. ``"sample 3"``)."""
    if not isinstance(sample, Mapping) or "input_ids" not in sample:
        raise TypeError(f"{name} must be a dict with 'input_ids', got {type(sample).__name__}")
    out = []
    for key in ("input_ids", "labels"):
        value = sample.get(key)
        if value is None:
            out.append(out[0])
            continue
        where = f"{name}[{key!r}]"
        tensor = _id_vector(value, where)
        if tensor.numel() == 0:
            raise ValueError(f"{where} is empty")
        invalid = (tensor < 0) if key == "input_ids" else (tensor < 0) & (tensor != IGNORE_INDEX)
        if bool(invalid.any()):
            allowed = ">= 0" if key == "input_ids" else f">= 0 or {IGNORE_INDEX}"
            raise ValueError(f"{where} holds {int(tensor[invalid][0])} at position "
                             f"{int(invalid.nonzero()[0])} (must be {allowed})")
        out.append(tensor)
    if out[1].shape != out[0].shape:
        raise ValueError(f"{name}: labels has {out[1].numel()} entries, input_ids "
                         f"{out[0].numel()}")
    return out[0], out[1]


def batches_of(
    samples: Sequence[Mapping[str, Any]],
    batch_size: int,
    *,
    indices: Optional[Sequence[int]] = None,
    pad_id: Optional[int] = 0,
    device: Optional[torch.device] = None,
) -> Iterator[dict[str, Tensor]]:
    """Yield collated batches of ``samples`` (or of ``samples[indices]``) in order, padded as
    :func:`collate` pads (``pad_id=None``: 0)."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"Invalid batch_size: {batch_size!r} (must be an int >= 1)")
    # Checked here, at the call, rather than when the first batch is drawn.
    pad_id = _check_pad_id(pad_id)
    order = list(range(len(samples))) if indices is None else [int(i) for i in indices]
    outside = [i for i in order if not -len(samples) <= i < len(samples)]
    if outside:
        raise IndexError(f"indices: {outside[:5]} outside the {len(samples)} samples")
    return _batches(samples, order, batch_size, pad_id, device)


def _batches(samples, order: list[int], batch_size: int, pad_id: int, device):
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

