"""``LearningWithForgetting``: LWF in any PyTorch training loop, in a few lines.

::

    opt = FisherAdamW(model.parameters(), lr=3e-4, fisher="ema")
    lwf = LearningWithForgetting(model, opt, forget_samples, LWFConfig(every=50, steps=5, lr=1e-4))
    lwf.begin(total_steps)                 # runs the unlearning up front in the "early" control
    for batch in loader:
        model(**batch).loss.backward()
        opt.step(); opt.zero_grad()
        stats = lwf.step()                 # after every optimizer step; a dict when it unlearned

``forget_samples`` is ``D_self`` encoded by :func:`~fisherforget.lwf.encode_pairs` (the model's own
answers to the forgetting task). At each phase the helper (re)scores ``D_self`` when due, selects
the top fraction ``D_U`` and runs ``steps`` unlearning steps inside ``optimizer.unlearning(...)``
(``maximize=True``, Fisher accumulation off, its own ``lr``, the learning task's Fisher protecting
what matters through ``fisher_scale`` and/or ``freeze_above``). Each step maximises

    J = L(B_U) - retain_weight * R(B_R)

over a batch ``B_U`` of ``D_U`` and a batch ``B_R`` of the *retain set*: ascent on what is
forgotten, descent on what is kept. ``L`` is the token-averaged NLL; ``R`` is the NLL as well
(``retain_loss="nll"``, rehearsal) or ``KL(p_start || p_theta)`` per response token against the
model as it was when :meth:`LearningWithForgetting.begin` ran (``retain_loss="kl"``). The retain
set is the unselected part of ``D_self`` (``retain="unselected"``, the default), the lowest-ranked
``|D_U|`` samples (``"lowest"``), samples the caller gives (``"samples"``, ``retain_samples=``),
or nothing (``None``: pure ascent, which erodes unrelated knowledge phase after phase).
``ascent=False`` drops the ``L`` term: the retain-only control (rehearsal on the same schedule).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from fisherforget.distributed import gather_scores, shard_range
from fisherforget.fisher import (
    ESTIMATORS,
    IGNORE_INDEX,
    ParamSpec,
    batch_nll,
    estimate_fisher,
    labels_of,
    logits_of,
    model_inputs,
    resolve_params,
)
from fisherforget.lwf.confidence import (
    SCORE_KINDS,
    ForgettingScores,
    control_scores,
    forgetting_confidence,
    mean_gradient,
    optimizer_direction,
    optimizer_fisher,
)
from fisherforget.lwf.schedule import UnlearningSchedule, select
from fisherforget.lwf.self_knowledge import batches_of, collate, fingerprint

__all__ = ["LWFConfig", "LearningWithForgetting", "RETAIN_SETS"]

RETAIN_SETS = ("unselected", "lowest", "samples", None)


@dataclass
class LWFConfig:
    """Every LWF hyperparameter.

    Schedule (:class:`~fisherforget.lwf.UnlearningSchedule`): ``every``, ``steps``, ``warmup``,
    ``rescore_every``, ``early``.

    Selection: the top ``fraction`` of ``D_self`` by ``scores`` (``"fc"``; the controls
    ``"random"`` and ``"reversed"`` = lowest FC first), only FC > 0 with ``positive_only``.

    Forgetting confidence: ``eta`` (default: ``lr``), ``normalize`` (unit-norm ``g_s``),
    ``direction`` (``"optimizer"``: bias-corrected ``exp_avg``; ``"fresh"``: mean gradient over
    ``learn_batches``), ``fisher_source`` (``"optimizer"``: the optimizer's online Fisher; or an
    :func:`~fisherforget.fisher.estimate_fisher` estimator on ``learn_batches``), ``score_params``
    (parameter subset), ``score_method`` (``"loop"``/``"vmap"``: ``"vmap"`` scores a whole batch of
    ``D_self`` per reduction), ``score_batch_size`` (samples per scoring batch; default
    ``batch_size``), ``score_batches`` (learning batches used for a fresh direction or Fisher).

    Unlearning: ``lr``; ``fisher_scale`` in units of ``1 / mean(F)`` (the group's ``fisher_scale``
    is set to ``fisher_scale / optimizer.fisher_mean()``, so 1.0 halves the step of an element with
    average Fisher); ``freeze_quantile`` freezes elements whose Fisher is above that quantile
    (``freeze_above = optimizer.fisher_quantile(q)``); ``moments`` (``"separate"``: unlearning keeps
    its own Adam moments; ``"shared"``); ``batch_size``; ``seed`` (batch order, random control).

    Retain (see the module doc): ``retain`` (``"unselected"``, ``"lowest"``, ``"samples"`` or
    ``None``), ``retain_weight``, ``retain_loss`` (``"nll"`` or ``"kl"``), ``ascent`` (``False``:
    the retain-only control).

    Logging: ``forget_eval_size`` samples of ``D_self`` give the forgetting-task loss after each
    phase (0 disables it).

    Several processes: ``split_scoring`` (DDP, or any replicated model) makes each rank score only
    its slice of ``D_self`` (:func:`fisherforget.distributed.shard_range`) and gathers the scores
    (:func:`~fisherforget.distributed.gather_scores`), so every rank gets the same scores, bit for
    bit, and selects the same samples. Pass the unwrapped module (``ddp.module``) to
    :class:`LearningWithForgetting`. Not for FSDP, where every rank must run every sample.
    """

    every: int = 50
    steps: int = 5
    warmup: int = 0
    rescore_every: Optional[int] = None
    early: bool = False
    fraction: float = 0.3
    positive_only: bool = False
    scores: str = "fc"
    eta: Optional[float] = None
    normalize: bool = False
    direction: str = "optimizer"
    fisher_source: str = "optimizer"
    score_params: ParamSpec = None
    score_method: str = "loop"
    score_batches: int = 8
    score_batch_size: Optional[int] = None
    lr: float = 1e-4
    fisher_scale: float = 0.0
    freeze_quantile: Optional[float] = None
    moments: str = "separate"
    batch_size: int = 16
    seed: int = 0
    forget_eval_size: int = 256
    backend: str = "auto"
    split_scoring: bool = False
    retain: Optional[str] = "unselected"
    retain_weight: float = 1.0
    retain_loss: str = "nll"
    ascent: bool = True

    def __post_init__(self) -> None:
        self.schedule  # validates the schedule fields
        if not isinstance(self.fraction, (int, float)) or not 0 < self.fraction <= 1:
            raise ValueError(f"Invalid fraction: {self.fraction!r} (must be in (0, 1])")
        if self.scores not in SCORE_KINDS:
            raise ValueError(f"Invalid scores: {self.scores!r} (must be one of {SCORE_KINDS})")
        if self.direction not in ("optimizer", "fresh"):
            raise ValueError(
                f"Invalid direction: {self.direction!r} (must be 'optimizer' or 'fresh')"
            )
        if self.fisher_source not in ("optimizer",) + ESTIMATORS:
            raise ValueError(
                f"Invalid fisher_source: {self.fisher_source!r} (must be 'optimizer' or one of "
                f"{ESTIMATORS})"
            )
        if self.score_method not in ("loop", "vmap"):
            raise ValueError(
                f"Invalid score_method: {self.score_method!r} (must be 'loop' or 'vmap')"
            )
        if self.moments not in ("shared", "separate"):
            raise ValueError(f"Invalid moments: {self.moments!r} (must be 'shared' or 'separate')")
        for name in ("lr", "fisher_scale"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"Invalid {name}: {value!r} (must be a finite number >= 0)")
        if self.eta is not None and not (isinstance(self.eta, (int, float)) and self.eta > 0):
            raise ValueError(f"Invalid eta: {self.eta!r} (must be None or > 0)")
        if self.freeze_quantile is not None and not (
            isinstance(self.freeze_quantile, (int, float)) and 0 <= self.freeze_quantile <= 1
        ):
            raise ValueError(
                f"Invalid freeze_quantile: {self.freeze_quantile!r} (must be in [0, 1])"
            )
        if self.score_batch_size is not None and (
                not isinstance(self.score_batch_size, int) or self.score_batch_size < 1):
            raise ValueError(
                f"Invalid score_batch_size: {self.score_batch_size!r} (must be None or >= 1)")
        for name in ("batch_size", "score_batches"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Invalid {name}: {value!r} (must be an int >= 1)")
        if self.retain not in RETAIN_SETS:
            raise ValueError(f"Invalid retain: {self.retain!r} (must be one of {RETAIN_SETS})")
        if self.retain_loss not in ("nll", "kl"):
            raise ValueError(f"Invalid retain_loss: {self.retain_loss!r} (must be 'nll' or 'kl')")
        if not isinstance(self.retain_weight, (int, float)) or not (
                math.isfinite(self.retain_weight) and self.retain_weight >= 0):
            raise ValueError(
                f"Invalid retain_weight: {self.retain_weight!r} (must be a finite number >= 0)")
        if not isinstance(self.ascent, bool):
            raise TypeError(f"Invalid ascent: {self.ascent!r} (must be a bool)")
        if not self.ascent and (self.retain is None or self.retain_weight == 0):
            raise ValueError("ascent=False (the retain-only control) needs a retain set and "
                             "retain_weight > 0: otherwise the unlearning steps do nothing")
        if not isinstance(self.forget_eval_size, int) or self.forget_eval_size < 0:
            raise ValueError(f"Invalid forget_eval_size: {self.forget_eval_size!r} (must be >= 0)")

    @property
    def schedule(self) -> UnlearningSchedule:
        return UnlearningSchedule(every=self.every, steps=self.steps, warmup=self.warmup,
                                  rescore_every=self.rescore_every, early=self.early)

    @property
    def score_eta(self) -> float:
        return float(self.eta) if self.eta is not None else float(self.lr)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if callable(out["score_params"]):
            out["score_params"] = "<callable>"
        elif out["score_params"] is not None:
            out["score_params"] = [p if isinstance(p, str) else "<tensor>"
                                   for p in out["score_params"]]
        return out


def _unwrap_optimizer(optimizer: Any) -> Any:
    # accelerate's AcceleratedOptimizer (what Trainer hands to callbacks) wraps the real one.
    while hasattr(optimizer, "optimizer") and not hasattr(optimizer, "fisher"):
        optimizer = optimizer.optimizer
    return optimizer


class LearningWithForgetting:
    """Periodic unlearning of high-FC self-knowledge during fine-tuning (see the module doc).

    Args:
        model: the model being fine-tuned (may be bound later with :meth:`bind`).
        optimizer: its :class:`~fisherforget.FisherAdamW` (may be bound later).
        forget_samples: ``D_self`` as encoded samples (dicts of 1-D ``input_ids``/``labels``).
        config: :class:`LWFConfig`.
        learn_batches: learning-task batches for a fresh direction/Fisher or the early variant
            (a sequence, or a zero-argument callable returning an iterable of batches).
        autocast: a zero-argument callable returning the context manager the forward passes run
            in (mixed precision); default none.
        pad_id: the padding id used to collate ``forget_samples``.
        retain_samples: the retain set when ``config.retain == "samples"`` (encoded samples, as
            ``forget_samples``).
    """

    def __init__(
        self,
        model: Optional[nn.Module],
        optimizer: Optional[Any],
        forget_samples: Sequence[Mapping[str, Any]],
        config: Optional[LWFConfig] = None,
        *,
        learn_batches: Optional[Any] = None,
        autocast: Optional[Callable[[], contextlib.AbstractContextManager]] = None,
        pad_id: int = 0,
        retain_samples: Optional[Sequence[Mapping[str, Any]]] = None,
    ):
        if not forget_samples:
            raise ValueError("forget_samples is empty: LWF needs the model's self-knowledge")
        self.config = config if config is not None else LWFConfig()
        if not isinstance(self.config, LWFConfig):
            raise TypeError("config must be an LWFConfig")
        needs_learn = (self.config.direction == "fresh" or self.config.fisher_source != "optimizer"
                       or self.config.early)
        if needs_learn and learn_batches is None:
            raise ValueError(
                "learn_batches is required with direction='fresh', a fisher_source estimator or "
                "early=True"
            )
        if (self.config.retain == "samples") != (retain_samples is not None):
            raise ValueError("retain_samples must be given exactly when config.retain == 'samples'"
                             f" (retain={self.config.retain!r}, retain_samples "
                             f"{'given' if retain_samples is not None else 'missing'})")
        if retain_samples is not None and not retain_samples:
            raise ValueError("retain_samples is empty")
        self.samples = list(forget_samples)
        self.retain_samples = list(retain_samples) if retain_samples is not None else None
        self.start_model: Optional[nn.Module] = None  # the KL retain loss's reference
        self.retain_pool: Optional[Tensor] = None  # indices of D_self rehearsed (retain sets
        # "unselected"/"lowest")
        self.learn_batches = learn_batches
        self.autocast = autocast or contextlib.nullcontext
        self.pad_id = pad_id
        self.model: Optional[nn.Module] = None
        self.optimizer: Any = None
        if model is not None or optimizer is not None:
            self.bind(model, optimizer)
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self.global_step = 0  # learning steps seen
        self.phase = 0
        self.last_scored: Optional[int] = None
        self.fc: Optional[ForgettingScores] = None
        self.ranking: Optional[Tensor] = None  # the scores the selection ranks by
        self.selected: Optional[Tensor] = None
        self._order: Optional[Tensor] = None  # shuffled selected indices, consumed in batches
        self._cursor = 0
        self.began = False
        self.history: list[dict[str, float]] = []

    # -------------------------------------------------------------- binding

    def bind(self, model: nn.Module, optimizer: Any) -> "LearningWithForgetting":
        """Attach the model and its ``FisherAdamW`` (unwrapping accelerate's wrapper)."""
        optimizer = _unwrap_optimizer(optimizer)
        if not hasattr(optimizer, "unlearning") or not hasattr(optimizer, "fisher_quantile"):
            raise TypeError(
                f"LWF needs a fisherforget.FisherAdamW optimizer, got {type(optimizer).__name__}"
            )
        managed = {id(p) for g in optimizer.param_groups for p in g["params"]}
        if not any(id(p) in managed for p in model.parameters()):
            raise ValueError("the optimizer manages none of the model's parameters")
        self.model, self.optimizer = model, optimizer
        return self

    def _require_bound(self) -> None:
        if self.model is None or self.optimizer is None:
            raise RuntimeError("LearningWithForgetting is not bound to a model and optimizer")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _learn_iter(self) -> Iterable[Mapping[str, Tensor]]:
        source = self.learn_batches() if callable(self.learn_batches) else self.learn_batches
        for i, batch in enumerate(source):
            if i >= self.config.score_batches:
                return
            yield {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in batch.items()}

    # -------------------------------------------------------------- scoring

    def score(self) -> ForgettingScores:
        """Forgetting confidence of every sample of ``D_self`` under the current model."""
        self._require_bound()
        cfg = self.config
        model = self.model
        chosen = resolve_params(model, cfg.score_params)
        was_training = model.training
        model.eval()
        try:
            if cfg.direction == "optimizer":
                direction = optimizer_direction(self.optimizer, chosen.values())
            else:
                with self.autocast():
                    direction = mean_gradient(model, self._learn_iter(), list(chosen.values()))
            if cfg.fisher_source == "optimizer":
                fisher = optimizer_fisher(self.optimizer, chosen.values())
            else:
                with self.autocast():
                    fisher = list(estimate_fisher(
                        model, self._learn_iter(), cfg.fisher_source, list(chosen.values()),
                        method=cfg.score_method, backend=cfg.backend,
                        generator=torch.Generator().manual_seed(cfg.seed + self.global_step),
                    ).values())
            samples = self.samples
            if cfg.split_scoring:
                samples = [samples[i] for i in shard_range(len(samples))]
            with self.autocast():
                scores = forgetting_confidence(
                    model,
                    batches_of(samples, cfg.score_batch_size or cfg.batch_size, pad_id=self.pad_id,
                               device=self.device),
                    direction, fisher, eta=cfg.score_eta, params=list(chosen.values()),
                    normalize=cfg.normalize, method=cfg.score_method, backend=cfg.backend,
                )
        finally:
            model.train(was_training)
        if cfg.split_scoring:
            scores = dataclasses.replace(
                scores, fc=gather_scores(scores.fc),
                first_order=gather_scores(scores.first_order),
                second_order=gather_scores(scores.second_order),
                grad_norm=gather_scores(scores.grad_norm),
            )
        return scores

    def rescore(self) -> dict[str, float]:
        """Score (unless the control is random) and select; return the selection's statistics."""
        cfg = self.config
        stats: dict[str, float] = {}
        if cfg.scores == "random":
            self.fc = None
            ranking = control_scores(torch.zeros(len(self.samples), dtype=torch.float64),
                                     "random", generator=self.generator)
        else:
            self.fc = self.score()
            ranking = control_scores(self.fc, cfg.scores)
            stats.update(self.fc.stats())
        # positive_only keeps samples with FC > 0, i.e. a positive ranking for "fc" only.
        selected = select(ranking, cfg.fraction,
                          positive_only=cfg.positive_only and cfg.scores == "fc")
        self.ranking, self.selected = ranking, selected
        self.retain_pool = self._retain_pool(ranking, selected)
        self._order, self._cursor = None, 0
        self.last_scored = self.global_step
        stats["selected"] = float(selected.numel())
        if self.retain_pool is not None:
            stats["retained"] = float(self.retain_pool.numel())
        return stats

    def _retain_pool(self, ranking: Tensor, selected: Tensor) -> Optional[Tensor]:
        """Indices (into ``D_self``, or into ``retain_samples``) of the retain set."""
        cfg = self.config
        if cfg.retain is None:
            return None
        if cfg.retain == "samples":
            return torch.arange(len(self.retain_samples))
        chosen = torch.zeros(len(self.samples), dtype=torch.bool)
        chosen[selected] = True
        if cfg.retain == "unselected":
            pool = torch.nonzero(~chosen).flatten()
        else:  # "lowest": as many samples as selected, from the bottom of the ranking
            ascending = torch.sort(ranking, stable=True).indices
            pool = ascending[~chosen[ascending]][:max(1, selected.numel())]
        if pool.numel() == 0:
            raise ValueError(
                f"retain={cfg.retain!r} leaves no sample to retain (fraction={cfg.fraction} "
                f"selects all {len(self.samples)} of D_self): lower fraction or use retain=None")
        return pool

    # -------------------------------------------------------------- unlearning

    def _next_indices(self) -> list[int]:
        size = min(self.config.batch_size, self.selected.numel())
        out: list[int] = []
        while len(out) < size:
            if self._order is None or self._cursor >= self._order.numel():
                perm = torch.randperm(self.selected.numel(), generator=self.generator)
                self._order, self._cursor = self.selected[perm], 0
            take = min(size - len(out), self._order.numel() - self._cursor)
            out.extend(self._order[self._cursor : self._cursor + take].tolist())
            self._cursor += take
        return out

    def _loss(self, batch: Mapping[str, Tensor]) -> Tensor:
        with self.autocast():
            logits = logits_of(self.model(**model_inputs(batch)))
        return batch_nll(logits, labels_of(batch))

    def unlearn(self, n_steps: int) -> dict[str, float]:
        """Run ``n_steps`` unlearning steps (each maximising ``J = L(B_U) - retain_weight *
        R(B_R)``, see the module doc); return statistics (``unlearn_loss*`` of the ascent term,
        ``retain_loss`` of the retain term).

        The params' existing ``.grad`` are set aside and restored, so the call is safe anywhere
        between two optimizer steps.
        """
        self._require_bound()
        cfg = self.config
        opt = self.optimizer
        if self.selected is None:
            raise RuntimeError("nothing selected yet: call rescore() first")
        stats: dict[str, float] = {}
        if self.selected.numel() == 0 or n_steps == 0:
            stats["unlearn_steps"] = 0.0
            return stats
        overrides: dict[str, Any] = {"lr": cfg.lr}
        if cfg.fisher_scale > 0:
            mean = opt.fisher_mean()
            overrides["fisher_scale"] = cfg.fisher_scale / mean if mean > 0 else 0.0
        if cfg.freeze_quantile is not None:
            threshold = opt.fisher_quantile(cfg.freeze_quantile)
            overrides["freeze_above"] = threshold
            stats["freeze_above"] = threshold
        params = [p for g in opt.param_groups for p in g["params"]]
        saved_grads = [p.grad for p in params]
        for p in params:
            p.grad = None
        retaining = self.retain_pool is not None and cfg.retain_weight > 0
        losses, retain_losses = [], []
        try:
            with opt.unlearning(moments=cfg.moments, **overrides):
                for _ in range(n_steps):
                    # The optimizer maximises J = L(B_U) - retain_weight * R(B_R).
                    objective = None
                    if cfg.ascent:
                        loss = self._loss(self._batch(self.samples, self._next_indices()))
                        objective = loss
                        losses.append(loss.detach())
                    if retaining:
                        retain = self._retain_term()
                        objective = (-cfg.retain_weight * retain if objective is None
                                     else objective - cfg.retain_weight * retain)
                        retain_losses.append(retain.detach())
                    objective.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
        finally:
            for p, g in zip(params, saved_grads):
                p.grad = g
        if losses:
            values = torch.stack(losses).float().cpu()
            stats.update(unlearn_loss=float(values.mean()), unlearn_loss_first=float(values[0]),
                         unlearn_loss_last=float(values[-1]))
        if retain_losses:
            stats["retain_loss"] = float(torch.stack(retain_losses).float().mean())
        stats["unlearn_steps"] = float(n_steps)
        return stats

    def _batch(self, samples: Sequence[Mapping[str, Any]], indices: Sequence[int]) -> dict:
        batch = collate([samples[i] for i in indices], self.pad_id)
        return {k: v.to(self.device) for k, v in batch.items()}

    def _retain_term(self) -> Tensor:
        """``R(B_R)`` on a fresh random batch of the retain set: the token-averaged NLL, or the
        mean over response tokens of ``KL(p_start || p_theta)``."""
        pool = self.retain_pool
        size = min(self.config.batch_size, pool.numel())
        picked = pool[torch.randperm(pool.numel(), generator=self.generator)[:size]].tolist()
        source = self.retain_samples if self.config.retain == "samples" else self.samples
        batch = self._batch(source, picked)
        if self.config.retain_loss == "nll":
            return self._loss(batch)
        if self.start_model is None:
            raise RuntimeError("retain_loss='kl' needs the start model: call begin() first")
        with self.autocast():
            logits = logits_of(self.model(**model_inputs(batch)))[:, :-1]
            with torch.no_grad():
                reference = logits_of(self.start_model(**model_inputs(batch)))[:, :-1]
        keep = labels_of(batch)[:, 1:] != IGNORE_INDEX
        log_p = torch.log_softmax(logits[keep].float(), dim=-1)
        log_q = torch.log_softmax(reference[keep].float(), dim=-1)
        return (log_q.exp() * (log_q - log_p)).sum(dim=-1).mean()

    @torch.no_grad()
    def forget_loss(self) -> float:
        """Token-averaged NLL of the model on (the first ``forget_eval_size`` samples of)
        ``D_self``: the forgetting-task loss on the model's own earlier answers."""
        self._require_bound()
        n = min(self.config.forget_eval_size, len(self.samples))
        was_training = self.model.training
        self.model.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        tokens = 0
        try:
            for batch in batches_of(self.samples[:n], self.config.batch_size, pad_id=self.pad_id,
                                    device=self.device):
                count = int((batch["labels"][:, 1:] != -100).sum())
                total += self._loss(batch).double() * count
                tokens += count
        finally:
            self.model.train(was_training)
        return float(total / max(tokens, 1))

    # -------------------------------------------------------------- schedule

    def _phase(self, n_steps: int) -> dict[str, float]:
        stats: dict[str, float] = {}
        schedule = self.config.schedule
        if self.selected is None or schedule.needs_rescore(self.global_step, self.last_scored):
            stats.update(self.rescore())
        stats.update(self.unlearn(n_steps))
        if self.config.forget_eval_size > 0:
            stats["forget_loss"] = self.forget_loss()
        self.phase += 1
        stats["phase"] = float(self.phase)
        out = {f"lwf/{k}": v for k, v in stats.items()}
        self.history.append({"step": self.global_step, **out})
        return out

    def begin(self, total_steps: Optional[int] = None) -> Optional[dict[str, float]]:
        """Call once before fine-tuning. In the ``early`` control it runs all the unlearning now:
        as many steps as the periodic schedule would run in ``total_steps``."""
        self._require_bound()
        if self.began:
            return None
        self.began = True
        if self.config.retain_loss == "kl" and self.config.retain is not None:
            # A frozen copy: the KL retain loss keeps the retained answers' distributions where
            # they were when fine-tuning started (one more copy of the model in memory).
            self.start_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        if not self.config.early:
            return None
        if total_steps is None:
            raise ValueError("begin(total_steps) needs total_steps in the early variant")
        n = UnlearningSchedule(every=self.config.every, steps=self.config.steps,
                               warmup=self.config.warmup).total_unlearning_steps(total_steps)
        return self._phase(n)

    def step(self) -> Optional[dict[str, float]]:
        """Call after every learning optimizer step. Returns the phase's statistics (keys
        ``lwf/...``) when it unlearned, else ``None``."""
        self._require_bound()
        self.global_step += 1
        if not self.config.schedule.fires(self.global_step):
            return None
        return self._phase(self.config.steps)

    # -------------------------------------------------------------- checkpointing

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly (the samples themselves are the caller's; a
        fingerprint checks that the same ``D_self`` is given back)."""
        return {
            "global_step": self.global_step,
            "phase": self.phase,
            "last_scored": self.last_scored,
            "fc": None if self.fc is None else self.fc.state_dict(),
            "ranking": self.ranking,
            "selected": self.selected,
            "retain_pool": self.retain_pool,
            "order": self._order,
            "cursor": self._cursor,
            "generator": self.generator.get_state(),
            "began": self.began,
            "history": list(self.history),
            "samples": self._fingerprints(),
            "config": self.config.to_dict(),
        }

    def _fingerprints(self) -> dict[str, Any]:
        retain = (None if self.retain_samples is None else
                  {"count": len(self.retain_samples), "fingerprint": fingerprint(self.retain_samples)})
        return {"count": len(self.samples), "fingerprint": fingerprint(self.samples),
                "retain": retain}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; checks that ``D_self`` is the same first."""
        expected = self._fingerprints()
        saved = dict(state.get("samples", {}))
        saved.setdefault("retain", None)  # states saved before the retain set existed
        if saved != expected:
            raise ValueError(
                f"LWF state was saved for a different D_self or retain set "
                f"({state.get('samples')}, this run has {expected}); generate the self-knowledge "
                "with the same model and seed, and pass the same retain_samples"
            )
        self.global_step = int(state["global_step"])
        self.phase = int(state["phase"])
        self.last_scored = state["last_scored"]
        self.fc = None if state["fc"] is None else ForgettingScores.from_state_dict(state["fc"])
        self.ranking = state["ranking"]
        self.selected = state["selected"]
        self.retain_pool = state.get("retain_pool")
        self._order = state["order"]
        self._cursor = int(state["cursor"])
        self.generator.set_state(state["generator"])
        self.began = bool(state["began"])
        self.history = list(state["history"])
