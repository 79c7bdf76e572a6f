"""Diagonal Fisher information estimates for causal language models.

Three estimators, which are *different statistics* (never interchangeable):

``"empirical"``
    The empirical Fisher: the mean over samples ``s`` of the squared per-sample gradient of the
    sample's negative log-likelihood *on its observed labels*,
    ``F = (1/N) sum_s (grad l_s(y_s | x_s))^2``. Needs one gradient per sample (micro-batches of
    one, or ``torch.func`` per-sample gradients).
``"true"``
    The (Monte-Carlo) true Fisher: as ``"empirical"`` but the labels are *sampled from the
    model's own predictive distribution*, ``y_t ~ p_theta(. | x, y_<t)`` at every label position,
    teacher-forced on the observed context (one forward pass draws every position's label). Its
    expectation is the Fisher information of the model's conditional distributions; it does not
    depend on the data's labels, only on the prompts/contexts.
``"batch"``
    The mean over mini-batches ``B`` of the squared *mini-batch* gradient,
    ``F = (1/|batches|) sum_B (grad L_B)^2`` with ``L_B`` the batch's token-averaged NLL (exactly
    the ``loss`` a ``transformers`` causal LM returns). This is the statistic ``FisherAdamW``
    accumulates online inside its step (there as an EMA/mean/sum over optimizer steps). It is
    cheap but it is *not* the empirical Fisher: for i.i.d. samples, roughly
    ``E[(grad L_B)^2] = (E grad l)^2 + Var(grad l) / |B|`` per element, while the empirical Fisher
    is ``(E grad l)^2 + Var(grad l)``.

Every estimate is accumulated into fp32 buffers (fp64 for fp64 params) through the
:func:`fisherforget.ops.fisher_accumulate` op with running-mean weights
``F = (n-1)/n * F + 1/n * g^2``, on the backend :func:`fisherforget.backends.resolve` picks.

Batches are dicts in the ``transformers`` causal-LM convention: ``input_ids`` ``[B, T]``, optional
``attention_mask`` and ``labels`` (``-100`` = ignored; default: ``input_ids`` where the attention
mask is 1). Position ``t``'s logits predict ``labels[:, t + 1]`` (the shift a causal LM applies).
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from fisherforget import backends, ops

__all__ = [
    "ESTIMATORS",
    "IGNORE_INDEX",
    "estimate_fisher",
    "resolve_params",
    "sequence_nll",
    "batch_nll",
    "per_sample_gradients",
    "stacked_sample_gradients",
    "batch_gradient",
    "sample_model_labels",
    "accumulate_mean",
]

ESTIMATORS = ("empirical", "true", "batch")
IGNORE_INDEX = -100

ParamSpec = Union[None, Iterable[Union[str, Tensor]], Callable[[str, Tensor], bool]]


# ----------------------------------------------------------------------------- batches and losses


def _check_batch(batch: Mapping[str, Tensor], where: str = "batch") -> None:
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise TypeError(
            f"{where} must be a dict with at least 'input_ids' (and optionally 'attention_mask', "
            f"'labels'), got {type(batch).__name__}"
        )
    ids = batch["input_ids"]
    if not isinstance(ids, Tensor) or ids.dim() != 2:
        raise ValueError(f"{where}['input_ids'] must be a 2-D tensor [batch, seq], got {ids!r:.80}")
    for key in ("attention_mask", "labels"):
        value = batch.get(key)
        if value is not None and (not isinstance(value, Tensor) or value.shape != ids.shape):
            raise ValueError(
                f"{where}[{key!r}] must be a tensor shaped like input_ids {tuple(ids.shape)}"
            )


def labels_of(batch: Mapping[str, Tensor]) -> Tensor:
    """The batch's labels: ``batch["labels"]``, else ``input_ids`` with padding set to -100."""
    labels = batch.get("labels")
    if labels is not None:
        return labels
    labels = batch["input_ids"].clone()
    mask = batch.get("attention_mask")
    if mask is not None:
        labels[mask == 0] = IGNORE_INDEX
    return labels


def model_inputs(batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The keyword arguments to call the model with (everything but ``labels``)."""
    return {k: v for k, v in batch.items() if k != "labels"}


def logits_of(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if logits is None:
        raise TypeError("the model must return logits (a tensor or an output with .logits)")
    return logits


def _shifted(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Token NLLs [B, T-1] (0 where ignored), the valid mask and its per-row count."""
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    valid = targets != IGNORE_INDEX
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    logp = torch.log_softmax(logits, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    nll = torch.where(valid, -logp, torch.zeros_like(logp))
    return nll, valid, valid.sum(dim=1)


def sequence_nll(logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
    """Per-sample NLL ``[B]`` of a causal LM: ``"mean"`` averages over the sample's label tokens
    (a sample without any label token gets 0), ``"sum"`` sums them (= -log p(y | x))."""
    nll, _, count = _shifted(logits, labels)
    total = nll.sum(dim=1)
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / count.clamp(min=1)
    raise ValueError(f"Invalid reduction: {reduction!r} (must be 'mean' or 'sum')")


def batch_nll(logits: Tensor, labels: Tensor) -> Tensor:
    """The batch's token-averaged NLL: sum over every label token / number of label tokens (the
    ``loss`` of a ``transformers`` causal LM)."""
    nll, _, count = _shifted(logits, labels)
    return nll.sum() / count.sum().clamp(min=1)


# ----------------------------------------------------------------------------- parameters


def resolve_params(model: nn.Module, params: ParamSpec = None) -> "OrderedDict[str, Tensor]":
    """``{name: param}`` for the parameters to estimate or score, in the model's order.

    ``params``: ``None`` (every parameter with ``requires_grad``), an iterable of names and/or
    parameter tensors, or a predicate ``(name, param) -> bool``. A tied parameter (one tensor
    under several names, e.g. ``lm_head.weight`` and ``model.embed_tokens.weight``) appears once,
    under its first name, and any of its names selects it (a predicate sees every name).
    """
    named = OrderedDict((n, p) for n, p in model.named_parameters())
    canonical = {id(p): n for n, p in named.items()}
    # Every name of every parameter, aliases of tied ones included, mapped to the first name.
    aliases = {n: canonical[id(p)] for n, p in model.named_parameters(remove_duplicate=False)}
    if params is None:
        chosen = OrderedDict((n, p) for n, p in named.items() if p.requires_grad)
    elif callable(params):
        picked = {aliases[n] for n, p in model.named_parameters(remove_duplicate=False)
                  if params(n, p)}
        chosen = OrderedDict((n, p) for n, p in named.items() if n in picked)
    else:
        if isinstance(params, (str, Tensor)):
            raise TypeError("params must be an iterable of names or tensors (or a predicate), "
                            f"not a single {type(params).__name__}")
        wanted_names, wanted_ids = set(), set()
        for item in params:
            if isinstance(item, str):
                if item not in aliases:
                    raise ValueError(f"params: the model has no parameter named {item!r}")
                wanted_names.add(aliases[item])
            elif isinstance(item, Tensor):
                wanted_ids.add(id(item))
            else:
                raise TypeError(f"params: expected names or parameter tensors, got {type(item)}")
        chosen = OrderedDict(
            (n, p) for n, p in named.items() if n in wanted_names or id(p) in wanted_ids
        )
        found = {id(p) for p in chosen.values()}
        if wanted_ids - found:
            raise ValueError("params: some tensors are not parameters of the model")
    if not chosen:
        raise ValueError("params: no parameters selected")
    frozen = [n for n, p in chosen.items() if not p.requires_grad]
    if frozen:
        raise ValueError(f"params: these parameters do not require grad: {frozen[:5]}")
    return chosen


# ----------------------------------------------------------------------------- gradients


def _forward_logits(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    return logits_of(model(**model_inputs(batch)))


def batch_gradient(
    model: nn.Module, batch: Mapping[str, Tensor], params: Sequence[Tensor]
) -> list[Tensor]:
    """Gradient of the batch's token-averaged NLL (:func:`batch_nll`) with respect to ``params``
    (``torch.autograd.grad``: the params' ``.grad`` are left alone)."""
    _check_batch(batch)
    loss = batch_nll(_forward_logits(model, batch), labels_of(batch))
    return list(torch.autograd.grad(loss, list(params), allow_unused=True, materialize_grads=True))


def _row(batch: Mapping[str, Tensor], i: int, labels: Tensor) -> dict[str, Tensor]:
    row = {k: v[i : i + 1] for k, v in batch.items() if k != "labels"}
    row["labels"] = labels[i : i + 1]
    return row


def per_sample_gradients(
    model: nn.Module,
    batch: Mapping[str, Tensor],
    params: "OrderedDict[str, Tensor]",
    *,
    reduction: str = "mean",
    labels: Optional[Tensor] = None,
    method: str = "loop",
) -> Iterator[list[Tensor]]:
    """Yield, for every row ``s`` of ``batch``, the gradient of ``sequence_nll`` (``reduction``)
    of that row alone with respect to ``params`` (a list aligned with ``params.values()``).

    ``method="loop"`` runs micro-batches of one with ``torch.autograd.grad`` (any model, any
    precision, the params' ``.grad`` untouched). ``method="vmap"`` computes the whole batch's
    per-sample gradients at once with ``torch.func.vmap(grad(...))`` over ``functional_call``
    (faster for small models; needs a model whose forward ``torch.func`` can batch, and memory for
    ``B`` copies of the gradient). ``labels`` overrides the batch's labels (the true Fisher).
    """
    _check_batch(batch)
    if labels is None:
        labels = labels_of(batch)
    tensors = list(params.values())
    if method == "loop":
        for i in range(batch["input_ids"].shape[0]):
            row = _row(batch, i, labels)
            loss = sequence_nll(_forward_logits(model, row), row["labels"], reduction)[0]
            yield list(
                torch.autograd.grad(loss, tensors, allow_unused=True, materialize_grads=True)
            )
        return
    if method != "vmap":
        raise ValueError(f"Invalid method: {method!r} (must be 'loop' or 'vmap')")
    grads = stacked_sample_gradients(model, batch, params, reduction=reduction, labels=labels)
    for i in range(batch["input_ids"].shape[0]):
        yield [g[i] for g in grads]


def stacked_sample_gradients(
    model: nn.Module,
    batch: Mapping[str, Tensor],
    params: "OrderedDict[str, Tensor]",
    *,
    reduction: str = "mean",
    labels: Optional[Tensor] = None,
) -> list[Tensor]:
    """Per-sample gradients of the whole batch at once (``torch.func.vmap(grad(...))`` over
    ``functional_call``): one ``(B, *param.shape)`` tensor per param of ``params``, row ``s``
    the gradient of ``sequence_nll`` (``reduction``) of row ``s`` alone. Memory: ``B`` copies of
    the chosen params' gradient."""
    from torch.func import functional_call, grad, vmap

    _check_batch(batch)
    if labels is None:
        labels = labels_of(batch)
    inputs = dict(model_inputs(batch))
    mask = inputs.get("attention_mask")
    if mask is not None:
        width = mask.shape[1]
        lengths = mask.sum(dim=1, keepdim=True)
        if torch.equal(mask.bool(), torch.arange(width, device=mask.device) < lengths):
            # Right padding: under causal attention a row's real tokens never see its padding,
            # and the padding carries no labels, so the mask changes no loss; dropping it keeps
            # transformers' mask code (which reads the mask's values) out of vmap.
            del inputs["attention_mask"]
    keys = list(inputs)

    def loss_of(theta: dict[str, Tensor], row_labels: Tensor, *row_inputs: Tensor) -> Tensor:
        kwargs = {k: v.unsqueeze(0) for k, v in zip(keys, row_inputs)}
        logits = logits_of(functional_call(model, theta, (), kwargs))
        return sequence_nll(logits, row_labels.unsqueeze(0), reduction)[0]

    theta = {n: p.detach() for n, p in params.items()}
    grads = vmap(grad(loss_of), in_dims=(None, 0) + (0,) * len(keys))(
        theta, labels, *[inputs[k] for k in keys]
    )
    return [grads[n] for n in params]


@torch.no_grad()
def sample_model_labels(
    model: nn.Module,
    batch: Mapping[str, Tensor],
    *,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Labels drawn from the model's own distribution: at every position where the batch has a
    label, ``y_t ~ softmax(logits_{t-1})`` computed teacher-forced on the observed ``input_ids``
    (one forward pass). Ignored positions stay -100."""
    _check_batch(batch)
    logits = _forward_logits(model, batch)[:, :-1].float()
    probs = torch.softmax(logits, dim=-1)
    b, t, v = probs.shape
    flat = probs.reshape(b * t, v)
    if generator is not None:
        flat = flat.to(generator.device)  # torch draws with a generator on its own device
    draws = torch.multinomial(flat, 1, generator=generator).reshape(b, t).to(logits.device)
    labels = labels_of(batch)
    sampled = labels.clone()
    valid = labels[:, 1:] != IGNORE_INDEX
    sampled[:, 1:] = torch.where(valid, draws.to(labels.dtype), labels[:, 1:])
    return sampled


# ----------------------------------------------------------------------------- accumulation


def accumulate_mean(
    fishers: Sequence[Tensor],
    grads: Sequence[Tensor],
    count: int,
    *,
    backend: str = "auto",
) -> None:
    """``F = (count-1)/count * F + 1/count * g^2`` for every pair, in place, through
    :func:`fisherforget.ops.fisher_accumulate` (one call per (device, dtype) bucket)."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    buckets: dict[tuple, tuple[list, list]] = defaultdict(lambda: ([], []))
    for fisher, grad in zip(fishers, grads):
        bucket = buckets[(grad.device, grad.dtype, fisher.dtype)]
        bucket[0].append(fisher)
        bucket[1].append(grad)
    for (device, dtype, _), (fs, gs) in buckets.items():
        ops.fisher_accumulate(
            fs, gs, alpha=(count - 1) / count, beta=1.0 / count,
            backend=backends.resolve(backend, device, dtype),
        )


def _progress(iterable: Iterable, enabled: bool, desc: str, total: Optional[int] = None):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False)


def estimate_fisher(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    estimator: str = "empirical",
    params: ParamSpec = None,
    *,
    reduction: str = "mean",
    max_samples: Optional[int] = None,
    method: str = "loop",
    generator: Optional[torch.Generator] = None,
    backend: str = "auto",
    progress: bool = False,
) -> "OrderedDict[str, Tensor]":
    r"""Estimate the diagonal Fisher of ``model`` on ``batches``; return ``{name: F}``.

    Args:
        model: a causal LM called as ``model(input_ids=..., attention_mask=...)`` returning logits
            (a tensor or an output with ``.logits``).
        batches: dicts with ``input_ids`` (and optional ``attention_mask``, ``labels``; see the
            module docstring).
        estimator:
            ``"empirical"``: ``F = mean_s (grad l_s)^2`` over every sample (row) ``s``, with
            ``l_s`` the sample's NLL on its *observed* labels.
            ``"true"``: the same with the labels *sampled from the model*
            (:func:`sample_model_labels`; ``generator`` seeds the draws).
            ``"batch"``: ``F = mean_B (grad L_B)^2`` over batches, ``L_B`` the batch's
            token-averaged NLL: the mini-batch statistic ``FisherAdamW`` accumulates online.
        params: which parameters (see :func:`resolve_params`); default every trainable one.
        reduction: the per-sample loss of ``"empirical"``/``"true"``: ``"mean"`` (token-averaged
            NLL, the scale of the training loss; default) or ``"sum"`` (the sequence's
            ``-log p(y|x)``, the textbook Fisher of the sequence distribution).
        max_samples: stop after this many samples (rows for the per-sample estimators, batches
            for ``"batch"``).
        method: per-sample gradients by ``"loop"`` (micro-batches of one) or ``"vmap"``
            (``torch.func``); see :func:`per_sample_gradients`.
        backend: backend of the accumulation op (``"auto"`` resolves per device and dtype).

    Returns:
        ``OrderedDict`` name -> Fisher tensor shaped like the param, fp32 (fp64 for fp64 params),
        on the param's device. The model's ``.grad`` fields are not touched; the model's
        train/eval mode is left as it is (call ``model.eval()`` first to estimate without dropout).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"Invalid estimator: {estimator!r} (must be one of {ESTIMATORS})")
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"Invalid max_samples: {max_samples!r} (must be >= 1 or None)")
    chosen = resolve_params(model, params)
    fishers = [
        torch.zeros(p.shape, device=p.device,
                    dtype=torch.float64 if p.dtype == torch.float64 else torch.float32)
        for p in chosen.values()
    ]
    count = 0
    for batch in _progress(batches, progress, f"Fisher ({estimator})"):
        _check_batch(batch)
        if estimator == "batch":
            count += 1
            accumulate_mean(fishers, batch_gradient(model, batch, list(chosen.values())), count,
                            backend=backend)
            if max_samples is not None and count >= max_samples:
                break
            continue
        labels = None
        if estimator == "true":
            labels = sample_model_labels(model, batch, generator=generator)
        stop = False
        for grads in per_sample_gradients(model, batch, chosen, reduction=reduction,
                                          labels=labels, method=method):
            count += 1
            accumulate_mean(fishers, grads, count, backend=backend)
            if max_samples is not None and count >= max_samples:
                stop = True
                break
        if stop:
            break
    if count == 0:
        raise ValueError("estimate_fisher: batches is empty")
    return OrderedDict(zip(chosen, fishers))
