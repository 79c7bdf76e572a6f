"""Forgetting confidence (FC): how much unlearning one self-generated sample helps learning.

For a sample ``s`` of ``D_self`` with token-averaged NLL ``l_s`` and gradient ``g_s`` (optionally
``g_s / ||g_s||``), the unlearning update is the ascent step ``u_s = +eta * g_s``. With ``gbar_L``
the learning-task gradient and ``F_L`` the learning-task diagonal Fisher, the second-order
prediction of the learning-loss change is (``docs/design.md``)::

    dL(s) = eta * <gbar_L, g_s> + 0.5 * eta^2 * sum_i F_L[i] * g_s[i]^2
    FC(s) = -dL(s)          high FC: unlearning s helps, or barely hurts, the learning task

**What FC is in practice.** At any ``eta`` that is a sensible unlearning step the quadratic term
is negligible (measured on the built-in benchmark: at most ~1e-5 of the first-order term), so FC
ranks samples like the first-order alignment ``-<gbar_L, g_s>`` (a cosine ranking when ``g_s`` is
unit-normed). It stays the default scorer; two other named scorers use the Fisher differently
(all of them oriented so that *high* means "unlearn this first")::

    fisher_alignment(s) = -<F_L * gbar_L, g_s>         the alignment in the Fisher metric
    fisher_overlap(s)   = sum_i F_L[i] g_s[i]^2 / ||g_s||^2
                          how much of the sample's gradient lies on parameters the learning task
                          relies on (scale-free; its sign does not depend on gbar_L)

Every term comes from one pass over the per-sample gradients. ``method="vmap"`` takes the
gradients of a whole batch at once (``torch.func.vmap(grad(...))``) and reduces all of them in one
multi-sample contraction per parameter (fp32 products summed in float64), not one call per
sample; ``method="loop"``
takes them one sample at a time and reduces each through the :func:`fisherforget.ops.fisher_score`
op (the path that also handles DTensor gradients under FSDP2).

Sources of ``gbar_L``: :func:`optimizer_direction` (the bias-corrected first moment of a
``FisherAdamW``, ``exp_avg / (1 - beta1^step)``) or :func:`mean_gradient` (a fresh mean of
mini-batch gradients over learning batches). Sources of ``F_L``: :func:`optimizer_fisher` (the
optimizer's online *mini-batch* Fisher) or :func:`fisherforget.fisher.estimate_fisher` (empirical,
true or batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from fisherforget.distributed import fisher_score_global
from fisherforget.fisher import ParamSpec, batch_gradient, per_sample_gradients, resolve_params

__all__ = [
    "ForgettingScores",
    "SCORE_KINDS",
    "optimizer_direction",
    "optimizer_fisher",
    "mean_gradient",
    "score_terms",
    "forgetting_confidence",
    "control_scores",
    "batched_terms",
]

SCORE_KINDS = ("fc", "fisher_alignment", "fisher_overlap", "random", "reversed")

Tensors = Union[Sequence[Tensor], Mapping[str, Tensor]]


@dataclass
class ForgettingScores:
    """FC of every sample (float64, CPU), with the terms it and the other scorers are made of.

    ``fc = -(eta * first_order + 0.5 * eta**2 * second_order)`` where ``first_order`` is
    ``<gbar_L, g_s>``, ``second_order`` is ``sum_i F_L[i] g_s[i]^2`` and ``alignment`` is
    ``<F_L * gbar_L, g_s>`` (all three of the normalised ``g_s`` when ``normalized``);
    ``overlap`` is ``sum_i F_L[i] g_s[i]^2 / ||g_s||^2`` (always scale-free); ``grad_norm`` is
    ``||g_s||`` before normalisation.
    """

    fc: Tensor
    first_order: Tensor
    second_order: Tensor
    grad_norm: Tensor
    eta: float
    normalized: bool
    alignment: Optional[Tensor] = None
    overlap: Optional[Tensor] = None

    def __len__(self) -> int:
        return self.fc.numel()

    def stats(self) -> dict[str, float]:
        fc = self.fc
        return {
            "fc_mean": float(fc.mean()),
            "fc_std": float(fc.std()) if fc.numel() > 1 else 0.0,
            "fc_min": float(fc.min()),
            "fc_max": float(fc.max()),
            "fc_positive": float((fc > 0).double().mean()),
        }

    def ranking(self, kind: str) -> Tensor:
        """The scores of scorer ``kind`` (``"fc"``, ``"fisher_alignment"`` or
        ``"fisher_overlap"``; see the module doc), high = unlearn first."""
        if kind == "fc":
            return self.fc.clone()
        if kind in ("fisher_alignment", "fisher_overlap"):
            value = self.alignment if kind == "fisher_alignment" else self.overlap
            if value is None:
                raise ValueError(f"these scores were computed without the {kind} term")
            return -value if kind == "fisher_alignment" else value.clone()
        raise ValueError(
            f"Invalid scorer: {kind!r} (must be 'fc', 'fisher_alignment' or 'fisher_overlap')")

    def state_dict(self) -> dict:
        return {"fc": self.fc, "first_order": self.first_order, "second_order": self.second_order,
                "grad_norm": self.grad_norm, "eta": self.eta, "normalized": self.normalized,
                "alignment": self.alignment, "overlap": self.overlap}

    @classmethod
    def from_state_dict(cls, state: Mapping) -> "ForgettingScores":
        return cls(**dict(state))


def _params_list(optimizer: torch.optim.Optimizer, params: Iterable[Tensor]) -> list[Tensor]:
    params = list(params)
    managed = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for i, p in enumerate(params):
        if id(p) not in managed:
            raise ValueError(
                f"params[{i}] (shape {tuple(p.shape)}) is not managed by the optimizer"
            )
    return params


def _beta1_of(optimizer: torch.optim.Optimizer, p: Tensor) -> float:
    for group in optimizer.param_groups:
        if any(p is q for q in group["params"]):
            return group["betas"][0]
    raise ValueError("param not managed by the optimizer")


@torch.no_grad()
def optimizer_direction(optimizer: torch.optim.Optimizer, params: Iterable[Tensor]) -> list[Tensor]:
    """``gbar_L``: the optimizer's bias-corrected first moment ``exp_avg / (1 - beta1^step)`` of
    each param, as new fp32 tensors (fp64 for fp64 state). The first moment of an Adam-type
    optimizer is an exponential average of recent mini-batch gradients of the learning loss.

    Call it outside :meth:`FisherAdamW.unlearning` so that with ``moments="separate"`` it reads
    the learning task's moments. With ``moments="shared"`` the moments also hold the unlearning
    steps' (negated) gradients.
    """
    out = []
    for i, p in enumerate(_params_list(optimizer, params)):
        state = optimizer.state.get(p, {})
        if "exp_avg" not in state or "step" not in state:
            raise ValueError(
                f"optimizer_direction: params[{i}] (shape {tuple(p.shape)}) has no first moment "
                "yet (the optimizer has not stepped on it); use mean_gradient() instead"
            )
        m = state["exp_avg"]
        dtype = torch.float64 if m.dtype == torch.float64 else torch.float32
        step = state["step"].to(device=m.device, dtype=torch.float64)
        correction = 1 - _beta1_of(optimizer, p) ** step
        out.append((m.to(torch.float64) / correction).to(dtype).contiguous())
    return out


def optimizer_fisher(optimizer, params: Iterable[Tensor]) -> list[Tensor]:
    """``F_L`` from a ``FisherAdamW``: its online Fisher estimate of each param (``opt.fisher(p)``,
    the accumulated squared *mini-batch* gradients; zeros where nothing was accumulated)."""
    if not hasattr(optimizer, "fisher"):
        raise TypeError("optimizer_fisher needs a FisherAdamW (an optimizer with .fisher(p))")
    return [optimizer.fisher(p) for p in _params_list(optimizer, params)]


def mean_gradient(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    params: ParamSpec = None,
    *,
    max_batches: Optional[int] = None,
) -> list[Tensor]:
    """``gbar_L`` afresh: the mean over ``batches`` of the gradient of each batch's token-averaged
    NLL, aligned with ``resolve_params(model, params)``; fp32 (fp64 for fp64 params). The params'
    ``.grad`` are not touched."""
    chosen = list(resolve_params(model, params).values())
    total = [torch.zeros(p.shape, device=p.device,
                         dtype=torch.float64 if p.dtype == torch.float64 else torch.float32)
             for p in chosen]
    count = 0
    for batch in batches:
        for acc, g in zip(total, batch_gradient(model, batch, chosen)):
            acc.add_(g.to(acc.dtype))
        count += 1
        if max_batches is not None and count >= max_batches:
            break
    if count == 0:
        raise ValueError("mean_gradient: batches is empty")
    return [t.div_(count) for t in total]


def _aligned(values: Tensors, names: Sequence[str], what: str) -> list[Tensor]:
    if isinstance(values, Mapping):
        missing = [n for n in names if n not in values]
        if missing:
            raise ValueError(f"{what} lacks entries for params {missing[:5]}")
        values = [values[n] for n in names]
    values = list(values)
    if len(values) != len(names):
        raise ValueError(f"{what} has {len(values)} tensors for {len(names)} params")
    return values


def score_terms(
    directions: Sequence[Tensor],
    grads: Sequence[Tensor],
    fishers: Sequence[Tensor],
    *,
    backend: str = "auto",
) -> Tensor:
    """``[sum <d, g>, sum F g^2]`` (float64, shape ``(2,)``) over every tensor, through the
    ``fisher_score`` op: one call per (device, grad dtype) bucket, summed. DTensor gradients
    (FSDP2) are scored shard by shard and reduced across ranks
    (:func:`fisherforget.distributed.fisher_score_global`, which this is)."""
    if not grads:
        raise ValueError("score_terms: no tensors")
    return fisher_score_global(directions, grads, fishers, backend=backend).to(
        device=directions[0].device
    )


def forgetting_confidence(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    direction: Tensors,
    fisher: Tensors,
    *,
    eta: float,
    params: ParamSpec = None,
    normalize: bool = False,
    method: str = "loop",
    backend: str = "auto",
    progress: bool = False,
) -> ForgettingScores:
    """FC of every row of every batch of ``D_self`` (in order).

    Args:
        model: the causal LM being fine-tuned.
        batches: collated batches of self-knowledge samples (labels on the response only).
        direction: ``gbar_L`` per param (list aligned with ``resolve_params(model, params)`` or a
            ``{name: tensor}`` dict).
        fisher: ``F_L`` per param, aligned the same way.
        eta: the unlearning step size of the prediction ``u_s = eta * g_s``.
        params: the parameter subset (see :func:`fisherforget.fisher.resolve_params`); the
            per-sample gradients are taken with respect to these only, which bounds the cost on
            large models.
        normalize: use ``g_s / ||g_s||`` (unit-norm update): FC then ranks samples by direction
            alone, not by how large their loss gradient is.
        method: ``"vmap"`` (a batch's per-sample gradients at once and one multi-sample
            reduction, :func:`batched_terms`) or ``"loop"`` (one sample at a time through the
            ``fisher_score`` op; any model, sharded gradients).
        backend: backend of the ``fisher_score`` op.
    """
    if not isinstance(eta, (int, float)) or not eta > 0:
        raise ValueError(f"Invalid eta: {eta!r} (must be > 0)")
    if method not in ("loop", "vmap"):
        raise ValueError(f"Invalid method: {method!r} (must be 'loop' or 'vmap')")
    chosen = resolve_params(model, params)
    names = list(chosen)
    directions = _aligned(direction, names, "direction")
    fishers = _aligned(fisher, names, "fisher")
    for n, p, d, f in zip(names, chosen.values(), directions, fishers):
        if d.shape != p.shape or f.shape != p.shape:
            raise ValueError(
                f"direction/fisher of {n!r} are not shaped like the param {tuple(p.shape)}"
            )
    iterator = batches
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(batches, desc="forgetting confidence", leave=False)
    if method == "vmap":
        weighted = [f.to(torch.float64) * d.to(torch.float64)
                    for d, f in zip(directions, fishers)]
        rows = [batched_terms(directions, weighted, fishers, stacked)
                for stacked in (_stacked_gradients(model, batch, chosen) for batch in iterator)]
    else:
        rows = [_loop_terms(model, batch, chosen, directions, fishers, backend)
                for batch in iterator]
    if not rows:
        raise ValueError("forgetting_confidence: batches is empty")
    # One host transfer for all samples; columns: <d,g>, sum F g^2, <F d, g>, ||g||^2.
    terms = torch.cat(rows).cpu()
    first, second, alignment, norm2 = (terms[:, i].clone() for i in range(4))
    grad_norm = norm2.sqrt()
    safe = torch.where(norm2 > 0, norm2, torch.ones_like(norm2))
    overlap = second / safe
    if normalize:
        first = first / safe.sqrt()
        alignment = alignment / safe.sqrt()
        second = second / safe
    fc = -(eta * first + 0.5 * eta**2 * second)
    return ForgettingScores(fc=fc, first_order=first, second_order=second, grad_norm=grad_norm,
                            eta=float(eta), normalized=normalize, alignment=alignment,
                            overlap=overlap)


def _stacked_gradients(model: nn.Module, batch: Mapping[str, Tensor],
                       chosen: Mapping[str, Tensor]) -> list[Tensor]:
    """Per-sample gradients of the whole batch, one ``(B, *param.shape)`` tensor per param."""
    from torch.func import functional_call, grad, vmap

    from fisherforget.fisher import _check_batch, labels_of, logits_of, model_inputs, sequence_nll

    _check_batch(batch)
    labels = labels_of(batch)
    inputs = dict(model_inputs(batch))
    mask = inputs.get("attention_mask")
    if mask is not None:
        width = mask.shape[1]
        lengths = mask.sum(dim=1, keepdim=True)
        right_padded = torch.equal(mask.bool(), torch.arange(width, device=mask.device) < lengths)
        if not right_padded:
            raise ValueError("method='vmap' needs right-padded batches (as collate makes); use "
                             "method='loop' for left padding")
        # Under causal attention a right-padded row's real tokens never see its padding, and
        # the padding carries no labels, so the mask changes no loss; dropping it keeps
        # transformers' mask code (which reads the mask's values) out of vmap.
        del inputs["attention_mask"]
    keys = list(inputs)

    def loss_of(theta: dict[str, Tensor], row_labels: Tensor, *row_inputs: Tensor) -> Tensor:
        kwargs = {k: v.unsqueeze(0) for k, v in zip(keys, row_inputs)}
        logits = logits_of(functional_call(model, theta, (), kwargs))
        return sequence_nll(logits, row_labels.unsqueeze(0), "mean")[0]

    theta = {n: p.detach() for n, p in chosen.items()}
    grads = vmap(grad(loss_of), in_dims=(None, 0) + (0,) * len(keys))(
        theta, labels, *[inputs[k] for k in keys])
    return [grads[n] for n in chosen]


def batched_terms(directions: Sequence[Tensor], weighted: Sequence[Tensor],
                  fishers: Sequence[Tensor], grads: Sequence[Tensor]) -> Tensor:
    """For a batch of per-sample gradients (``grads[j]`` shaped ``(B, *param_j.shape)``), the
    ``(B, 4)`` float64 matrix of ``[<d, g_s>, sum F g_s^2, <w, g_s>, ||g_s||^2]`` summed over
    params (``w`` is ``F * d``, passed in so that callers compute it once): two matrix products
    per param for all ``B`` samples, in the gradients' precision (fp32, or fp64 for fp64
    gradients), summed over params in float64."""
    if not grads:
        raise ValueError("batched_terms: no tensors")
    total = None
    for d, w, f, g in zip(directions, weighted, fishers, grads, strict=True):
        # Contract in the gradient's precision (fp32 matmuls are several times faster than fp64
        # ones on (B, n) matrices); sum the per-param results in float64.
        dtype = torch.float64 if g.dtype == torch.float64 else torch.float32
        g = g.reshape(g.shape[0], -1).to(dtype)
        square = g * g
        vectors = torch.stack([d.reshape(-1), w.reshape(-1)]).to(device=g.device, dtype=dtype)
        cols = torch.cat([
            g @ vectors.T,
            square @ torch.stack([f.reshape(-1).to(device=g.device, dtype=dtype),
                                  torch.ones_like(vectors[0])]).T,
        ], dim=1)[:, [0, 2, 1, 3]].to(torch.float64)
        total = cols if total is None else total + cols.to(total.device)
    return total


def _loop_terms(model: nn.Module, batch: Mapping[str, Tensor], chosen: Mapping[str, Tensor],
                directions: Sequence[Tensor], fishers: Sequence[Tensor], backend: str) -> Tensor:
    """The rows of :func:`batched_terms` one sample at a time, through the ``fisher_score`` op
    (two calls a sample: ``(d, F)`` and ``(F*d, 0)``), for models ``torch.func`` cannot batch
    and for sharded (DTensor) gradients."""
    weighted = [f.to(d.dtype) * d for d, f in zip(directions, fishers)]
    rows = []
    for grads in per_sample_gradients(model, batch, chosen, reduction="mean", method="loop"):
        terms = score_terms(directions, grads, fishers, backend=backend)
        square = score_terms(grads, grads, [torch.zeros_like(f) for f in fishers],
                             backend=backend)[0].to(terms.device)
        align = score_terms(weighted, grads, fishers, backend=backend)[0].to(terms.device)
        rows.append(torch.stack([terms[0], terms[1], align, square]))
    return torch.stack(rows)


def control_scores(
    scores: Union[ForgettingScores, Tensor],
    kind: str,
    *,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Scores to rank ``D_self`` by: ``"fc"`` (the FC itself), ``"fisher_alignment"`` /
    ``"fisher_overlap"`` (:meth:`ForgettingScores.ranking`), ``"reversed"`` (``-FC``: top-ranked
    are the lowest-FC samples, a control) or ``"random"`` (i.i.d. uniform, a control)."""
    fc = scores.fc if isinstance(scores, ForgettingScores) else scores
    if kind in ("fisher_alignment", "fisher_overlap"):
        if not isinstance(scores, ForgettingScores):
            raise TypeError(f"scores={kind!r} needs ForgettingScores, not a tensor of FC")
        return scores.ranking(kind)
    if kind == "fc":
        return fc.clone()
    if kind == "reversed":
        return -fc
    if kind == "random":
        return torch.rand(fc.shape, generator=generator, dtype=torch.float64)
    raise ValueError(f"Invalid score kind: {kind!r} (must be one of {SCORE_KINDS})")
