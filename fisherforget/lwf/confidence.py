"""Forgetting confidence (FC): which self-generated samples to unlearn first.

**The paper's FC** (``scores="fc"``, the default). The learning task's posterior is approximated
by a Gaussian around the learning-task optimum ``theta*_L`` with the diagonal Fisher ``F_L``
(a Laplace approximation); learning a self-generated sample ``x`` from the starting weights
``theta_0`` is approximated by one gradient step, ``theta(x) = theta_0 - alpha * g_x`` (``g_x``:
the gradient of the sample's token-averaged NLL at ``theta_0``). FC is the negative log posterior
density of that point, up to a constant that is the same for every sample::

    FC(x) = 0.5 * sum_i F_L[i] * (theta_0[i] - alpha * g_x[i] - theta*_L[i])^2  -  const
          = alpha * <F_L * Delta, g_x> + 0.5 * alpha^2 * sum_i F_L[i] * g_x[i]^2,
            Delta = theta*_L - theta_0,   const = 0.5 * sum_i F_L[i] * Delta[i]^2

High FC: learning ``x`` would pull the model away from where the learning task wants it, so ``x``
is unlearned first. What is our choice, not the paper's (``docs/lwf.md``): ``theta_0`` is the
weights when LWF begins (:meth:`LearningWithForgetting.begin`; for a LoRA adapter, its initial
values), ``theta*_L`` the fine-tuned weights at each rescoring (or those of a short pilot
fine-tune), ``F_L`` the optimizer's online Fisher or an :func:`~fisherforget.fisher.estimate_fisher`
estimate, ``alpha`` the learning rate unless set. :func:`forgetting_confidence` takes ``g_x`` at
the model's weights as they are when it is called: the caller puts ``theta_0`` in
(:func:`swapped_weights`) for the paper's definition.

**Other scorers** (all oriented so that *high* means "unlearn first"), from the momentum
``gbar_L`` of the learning task and the gradient at the current weights::

    loss_change(x)      = -(eta * <gbar_L, g_x> + 0.5 * eta^2 * sum_i F_L[i] g_x[i]^2)
                          the second-order prediction of the learning-loss change of the ascent
                          step +eta * g_x (the project's first formalisation)
    fisher_alignment(x) = -<F_L * gbar_L, g_x>
    fisher_overlap(x)   = sum_i F_L[i] g_x[i]^2 / ||g_x||^2   (scale-free)

**How the terms are computed.** Every scorer is made of per-sample sums over parameters: linear
terms ``<v, g_x>`` and quadratic terms ``sum_i w[i] g_x[i]^2``. ``method="layers"`` (default)
takes all of them for a batch from one forward and one backward pass, layer by layer
(:func:`fisherforget.lwf.sample_terms.per_sample_terms`: at most one layer's per-sample gradient
alive); ``method="loop"`` takes one sample's full gradient at a time and reduces it through the
:func:`fisherforget.ops.fisher_score` op (the path for DTensor gradients under FSDP2);
``method="vmap"`` takes a batch's per-sample gradients of every parameter at once
(``torch.func``; memory ``B x |theta|``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from fisherforget.distributed import fisher_score_global
from fisherforget.fisher import (
    ParamSpec,
    batch_gradient,
    per_sample_gradients,
    resolve_params,
    stacked_sample_gradients,
)
from fisherforget.lwf.sample_terms import Lazy, per_sample_terms

__all__ = [
    "ForgettingScores",
    "SCORE_KINDS",
    "SCORE_METHODS",
    "optimizer_direction",
    "optimizer_fisher",
    "mean_gradient",
    "score_terms",
    "forgetting_confidence",
    "control_scores",
    "swapped_weights",
]

SCORE_KINDS = ("fc", "loss_change", "fisher_alignment", "fisher_overlap", "random", "reversed")
SCORE_METHODS = ("layers", "loop", "vmap")

# The per-sample terms (raw, i.e. of the unnormalised g_x) every scorer is made of.
_LINEAR_OF = {"displacement": "F_L * Delta", "direction": "gbar_L", "alignment": "F_L * gbar_L"}

Tensors = Union[Sequence[Tensor], Mapping[str, Tensor]]


@dataclass
class ForgettingScores:
    """The per-sample terms of ``D_self`` (float64, CPU) and the scores made of them.

    ``terms`` holds, each of the *raw* ``g_x``: ``"displacement"`` ``<F_L * Delta, g_x>``,
    ``"direction"`` ``<gbar_L, g_x>``, ``"alignment"`` ``<F_L * gbar_L, g_x>`` (those that were
    computed), ``"fisher_sq"`` ``sum_i F_L[i] g_x[i]^2`` and ``"sq_norm"`` ``||g_x||^2``. With
    ``normalized`` every score uses the unit-norm ``g_x / ||g_x||`` (linear terms divided by
    ``||g_x||``, quadratic ones by ``||g_x||^2``). ``kind`` is the scorer the caller asked for
    (:attr:`fc` returns its values); :meth:`score` gives any scorer the terms allow.
    """

    terms: dict[str, Tensor]
    kind: str = "fc"
    alpha: Optional[float] = None
    eta: Optional[float] = None
    normalized: bool = False
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.terms["sq_norm"].numel()

    @property
    def grad_norm(self) -> Tensor:
        return self.terms["sq_norm"].sqrt()

    def term(self, name: str, kind: Optional[str] = None) -> Tensor:
        """Term ``name`` as the scorers use it (of the unit-norm ``g_x`` when
        :attr:`normalized`)."""
        value = self.terms.get(name)
        if value is None:
            what = f"scorer {kind!r} needs" if kind else "these scores lack"
            raise ValueError(f"{what} the {name} term <{_LINEAR_OF.get(name, '?')}, g_x>, "
                             "which these scores were computed without")
        if not self.normalized:
            return value
        norm2 = self.terms["sq_norm"]
        safe = torch.where(norm2 > 0, norm2, torch.ones_like(norm2))
        return value / (safe.sqrt() if name in _LINEAR_OF else safe)

    def score(self, kind: str) -> Tensor:
        """The values of scorer ``kind`` (see the module doc); high = unlearn first."""
        if kind == "fc":
            if self.alpha is None:
                raise ValueError("scorer 'fc' needs alpha, which these scores were computed "
                                 "without")
            return (self.alpha * self.term("displacement", kind)
                    + 0.5 * self.alpha**2 * self.term("fisher_sq", kind))
        if kind == "loss_change":
            if self.eta is None:
                raise ValueError("scorer 'loss_change' needs eta, which these scores were "
                                 "computed without")
            return -(self.eta * self.term("direction", kind)
                     + 0.5 * self.eta**2 * self.term("fisher_sq", kind))
        if kind == "fisher_alignment":
            return -self.term("alignment", kind)
        if kind == "fisher_overlap":
            norm2 = self.terms["sq_norm"]
            return self.terms["fisher_sq"] / torch.where(norm2 > 0, norm2, torch.ones_like(norm2))
        raise ValueError(f"Invalid scorer: {kind!r} (must be one of {SCORE_KINDS[:4]})")

    # The demo and older callers read a scorer's values with ranking().
    ranking = score

    @property
    def fc(self) -> Tensor:
        """The values of the scorer the scores were computed for (:attr:`kind`)."""
        return self.score(self.kind)

    def stats(self) -> dict[str, float]:
        """Summary of :attr:`fc` (``fc_*`` keys, whatever the scorer) over the finite values, and
        how many were not finite."""
        values = self.fc
        finite = values[torch.isfinite(values)]
        out = {"fc_nonfinite": float(values.numel() - finite.numel())}
        if finite.numel():
            out.update(fc_mean=float(finite.mean()),
                       fc_std=float(finite.std()) if finite.numel() > 1 else 0.0,
                       fc_min=float(finite.min()), fc_max=float(finite.max()),
                       fc_positive=float((finite > 0).double().mean()))
        return out

    def state_dict(self) -> dict:
        return {"terms": dict(self.terms), "kind": self.kind, "alpha": self.alpha,
                "eta": self.eta, "normalized": self.normalized, "meta": dict(self.meta)}

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


@contextlib.contextmanager
def swapped_weights(params: Sequence[Tensor], values: Sequence[Tensor]) -> Iterator[None]:
    """Inside the block ``params[i]`` hold ``values[i]``; their own values come back on exit,
    also on error. Used to take ``g_x`` at ``theta_0``. A value of the param's dtype and device
    is swapped in without a copy (the param's storage is exchanged, so nothing may write to the
    params inside the block); other values, and sharded (DTensor) params, are copied in and out
    (one copy of the params)."""
    from fisherforget.distributed import is_dtensor

    params, values = list(params), list(values)
    if len(params) != len(values):
        raise ValueError(f"swapped_weights: {len(values)} values for {len(params)} params")
    for i, (p, v) in enumerate(zip(params, values)):
        if not isinstance(v, Tensor) or v.shape != p.shape:
            raise ValueError(f"swapped_weights: values[{i}] is shaped "
                             f"{tuple(getattr(v, 'shape', ()))}, the param {tuple(p.shape)}")
    exchange = [not is_dtensor(p) and v.dtype == p.dtype and v.device == p.device
                and not is_dtensor(v) for p, v in zip(params, values)]
    with torch.no_grad():
        saved = [p.data if swap else p.detach().clone() for p, swap in zip(params, exchange)]

    @torch.no_grad()
    def put(contents: Sequence[Tensor]) -> None:
        for p, value, swap in zip(params, contents, exchange):
            if swap:
                p.data = value
            else:
                p.copy_(value)

    try:
        put(values)
        yield
    finally:
        put(saved)


def _aligned(values: Tensors, names: Sequence[str], params: Sequence[Tensor],
             what: str) -> Sequence[Tensor]:
    if isinstance(values, Lazy):  # checked when each item is made
        if len(values) != len(names):
            raise ValueError(f"{what} has {len(values)} tensors for {len(names)} params")
        return values
    if isinstance(values, Mapping):
        missing = [n for n in names if n not in values]
        if missing:
            raise ValueError(f"{what} lacks entries for params {missing[:5]}")
        values = [values[n] for n in names]
    values = list(values)
    if len(values) != len(names):
        raise ValueError(f"{what} has {len(values)} tensors for {len(names)} params")
    for n, p, v in zip(names, params, values):
        if not isinstance(v, Tensor) or v.shape != p.shape:
            raise ValueError(f"{what} of {n!r} is not a tensor shaped like the param "
                             f"{tuple(p.shape)}")
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
    fisher: Tensors,
    *,
    delta: Optional[Tensors] = None,
    alpha: Optional[float] = None,
    direction: Optional[Tensors] = None,
    eta: Optional[float] = None,
    kind: Optional[str] = None,
    params: ParamSpec = None,
    normalize: bool = False,
    method: str = "layers",
    backend: str = "auto",
    progress: bool = False,
) -> ForgettingScores:
    """The per-sample terms of every row of every batch of ``D_self`` (in order), at the model's
    current weights, and the scores made of them (module doc).

    Args:
        model: the causal LM. ``g_x`` is taken at its weights as they are: for the paper's FC put
            ``theta_0`` in first (:func:`swapped_weights`).
        batches: collated batches of self-knowledge samples (labels on the response only).
        fisher: ``F_L`` per param (a list aligned with ``resolve_params(model, params)`` or a
            ``{name: tensor}`` dict).
        delta: ``Delta = theta*_L - theta_0`` per param, aligned the same way: gives the
            paper's FC (with ``alpha > 0``, the step of the learning update ``-alpha * g_x``).
        direction: ``gbar_L`` per param: gives ``loss_change`` (with ``eta > 0``) and
            ``fisher_alignment``.
        kind: the scorer :attr:`ForgettingScores.fc` returns (default ``"fc"`` when ``delta``
            is given, else ``"loss_change"``).
        params: the parameter subset (:func:`fisherforget.fisher.resolve_params`).
        normalize: score the unit-norm ``g_x / ||g_x||`` (rank by direction alone).
        method: ``"layers"``, ``"loop"`` or ``"vmap"`` (module doc); the terms agree to
            floating-point rounding.
        backend: backend of the ``fisher_score`` op (``method="loop"``).
    """
    if method not in SCORE_METHODS:
        raise ValueError(f"Invalid method: {method!r} (must be one of {SCORE_METHODS})")
    if delta is None and direction is None:
        raise ValueError("forgetting_confidence needs delta (the paper's FC) and/or direction "
                         "(loss_change, fisher_alignment)")
    for name, value, given in (("alpha", alpha, delta), ("eta", eta, direction)):
        if value is not None and not (isinstance(value, (int, float))
                                      and not isinstance(value, bool) and 0 < value < float("inf")):
            raise ValueError(f"Invalid {name}: {value!r} (must be a finite number > 0)")
    if delta is not None and alpha is None:
        raise ValueError("delta is given without alpha (the step of the learning update)")
    kind = kind or ("fc" if delta is not None else "loss_change")
    chosen = resolve_params(model, params)
    names, tensors = list(chosen), list(chosen.values())
    fishers = _aligned(fisher, names, tensors, "fisher")
    linear: dict[str, list[Tensor]] = {}
    if delta is not None:
        deltas = _aligned(delta, names, tensors, "delta")

        def weighted(j: int) -> Tensor:  # F_L * Delta of one param, made when the param is reduced
            f = fishers[j]
            dtype = torch.float64 if f.dtype == torch.float64 else torch.float32
            product = deltas[j].to(dtype)
            if product is deltas[j] and not isinstance(deltas, Lazy):
                product = product.clone()  # the caller's Delta stays as it was
            return product.mul_(f)

        displacement = Lazy(weighted, len(names))
        linear["displacement"] = displacement if method == "layers" else list(displacement)
    if direction is not None:
        directions = _aligned(direction, names, tensors, "direction")
        linear["direction"] = directions
        linear["alignment"] = [f.to(d.dtype) * d for d, f in zip(directions, fishers)]
    quadratic = {"fisher_sq": fishers, "sq_norm": None}
    iterator = batches
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(batches, desc="forgetting confidence", leave=False)
    rows = [_batch_terms(model, batch, chosen, linear, quadratic, method, backend)
            for batch in iterator]
    if not rows:
        raise ValueError("forgetting_confidence: batches is empty")
    # One host transfer for all samples.
    table = torch.cat(rows).cpu()
    columns = list(linear) + list(quadratic)
    terms = {name: table[:, i].clone() for i, name in enumerate(columns)}
    scores = ForgettingScores(terms=terms, kind=kind,
                              alpha=None if alpha is None else float(alpha),
                              eta=None if eta is None else float(eta), normalized=normalize)
    if kind not in ("random", "reversed"):
        scores.score(kind)  # the requested scorer can be made of these terms
    return scores


def _batch_terms(model: nn.Module, batch: Mapping[str, Tensor], chosen: Mapping[str, Tensor],
                 linear: Mapping[str, Sequence[Tensor]],
                 quadratic: Mapping[str, Optional[Sequence[Tensor]]], method: str,
                 backend: str) -> Tensor:
    """``(B, len(linear) + len(quadratic))`` float64: ``<v, g_x>`` for every vector list of
    ``linear``, then ``sum_i w[i] g_x[i]^2`` for every weight list of ``quadratic`` (``None``:
    ones), of each row ``x`` of ``batch``."""
    if method == "layers":
        return per_sample_terms(model, batch, chosen, linear=list(linear.values()),
                                quadratic=list(quadratic.values()))
    if method == "vmap":
        return _stacked_terms(stacked_sample_gradients(model, batch, chosen),
                              list(linear.values()), list(quadratic.values()))
    rows = []
    zeros = None
    for grads in per_sample_gradients(model, batch, chosen, reduction="mean", method="loop"):
        row = []
        for vectors in linear.values():
            row.append(score_terms(vectors, grads, vectors, backend=backend)[0])
        for weights in quadratic.values():
            if weights is None:
                # ||g||^2 = <g, g> (the op's linear term with the gradient as direction).
                zeros = zeros or [torch.zeros_like(g) for g in grads]
                row.append(score_terms(grads, grads, zeros, backend=backend)[0])
            else:
                row.append(score_terms(grads, grads, weights, backend=backend)[1])
        rows.append(torch.stack([r.to(row[0].device) for r in row]))
    return torch.stack(rows)


def _stacked_terms(grads: Sequence[Tensor], linear: Sequence[Sequence[Tensor]],
                   quadratic: Sequence[Optional[Sequence[Tensor]]]) -> Tensor:
    """The rows of :func:`_batch_terms` from per-sample gradients stacked per param
    (``grads[j]`` shaped ``(B, *param_j.shape)``): one matrix product per param for every
    column, in the gradients' precision (fp32 matmuls are several times faster than fp64 ones),
    summed over params in float64."""
    total = None
    for j, g in enumerate(grads):
        dtype = torch.float64 if g.dtype == torch.float64 else torch.float32
        g = g.reshape(g.shape[0], -1).to(dtype)
        square = g * g
        lin = [vectors[j].reshape(-1).to(device=g.device, dtype=dtype) for vectors in linear]
        quad = [torch.ones_like(g[0]) if weights is None
                else weights[j].reshape(-1).to(device=g.device, dtype=dtype)
                for weights in quadratic]
        parts = []
        if lin:
            parts.append(g @ torch.stack(lin).T)
        if quad:
            parts.append(square @ torch.stack(quad).T)
        cols = torch.cat(parts, dim=1).to(torch.float64)
        total = cols if total is None else total + cols.to(total.device)
    return total


def control_scores(
    scores: Union[ForgettingScores, Tensor],
    kind: str,
    *,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Scores to rank ``D_self`` by: a scorer of :meth:`ForgettingScores.score` (``"fc"``,
    ``"loss_change"``, ``"fisher_alignment"``, ``"fisher_overlap"``), ``"reversed"`` (minus the
    scores' own scorer: the lowest first, a control) or ``"random"`` (i.i.d. uniform, a control).
    A tensor stands for the values of one scorer (``"reversed"`` negates it)."""
    if kind not in SCORE_KINDS:
        raise ValueError(f"Invalid score kind: {kind!r} (must be one of {SCORE_KINDS})")
    values = scores.fc if isinstance(scores, ForgettingScores) else scores
    if kind == "random":
        return torch.rand(values.shape, generator=generator, dtype=torch.float64)
    if kind == "reversed":
        return -values
    if isinstance(scores, ForgettingScores):
        return scores.score(kind)
    if kind in ("fc", "loss_change"):
        return values.clone()
    raise TypeError(f"scores={kind!r} needs ForgettingScores, not a tensor of values")
