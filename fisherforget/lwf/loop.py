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
import logging
import math
import numbers
import warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from fisherforget.backends import BACKEND_CHOICES
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
    SCORE_METHODS,
    ForgettingScores,
    control_scores,
    forgetting_confidence,
    mean_gradient,
    optimizer_direction,
    optimizer_fisher,
    swapped_weights,
)
from fisherforget.lwf.sample_terms import Lazy
from fisherforget.lwf.schedule import UnlearningSchedule, select
from fisherforget.lwf.self_knowledge import _sample_row, batches_of, collate, fingerprint

__all__ = ["LWFConfig", "LearningWithForgetting", "RETAIN_SETS"]

RETAIN_SETS = ("unselected", "lowest", "samples", None)

logger = logging.getLogger(__name__)


@dataclass
class LWFConfig:
    """Every LWF hyperparameter, validated when set (also after construction: an invalid
    assignment raises and leaves the field as it was).

    Schedule (:class:`~fisherforget.lwf.UnlearningSchedule`): ``every``, ``steps``, ``warmup``,
    ``rescore_every``, ``early``. ``interleave=k`` replaces the periodic phases by the
    *interleaved* schedule: after warm-up, every learning step's loss gets the unlearning
    objective of ``n / k`` forget samples (``n`` learning samples in the step) with weight
    ``-interleave_weight`` (:meth:`LearningWithForgetting.interleaved_loss`).

    Selection: the top ``fraction`` of ``D_self`` by ``scores`` (``"fc"``, the paper's forgetting
    confidence; ``"loss_change"``, ``"fisher_alignment"``, ``"fisher_overlap"``; the controls
    ``"random"`` and ``"reversed"`` = lowest FC first), only scores > 0 with ``positive_only``.

    Forgetting confidence (``fisherforget.lwf.confidence``): ``alpha`` (the step of the learning
    update ``theta_0 - alpha * g_x``; default: the learning optimizer's lr), ``fc_at``
    (``"start"``: ``g_x`` at ``theta_0``, the weights when LWF began, as the paper; ``"current"``:
    at the current weights, which skips swapping ``theta_0`` in), ``pilot_steps`` / ``pilot_lr``
    (when scoring before any learning step, ``theta*_L`` and ``F_L`` come from a pilot fine-tune
    of that many steps on ``learn_batches``, undone afterwards), ``eta`` (step of
    ``loss_change``; default ``lr``), ``normalize`` (unit-norm ``g_x``), ``direction``
    (``gbar_L`` of ``loss_change``/``fisher_alignment``: ``"optimizer"``, the bias-corrected
    ``exp_avg``, or ``"fresh"``, the mean gradient over ``learn_batches``), ``fisher_source``
    (``"optimizer"``: the optimizer's online Fisher; or an
    :func:`~fisherforget.fisher.estimate_fisher` estimator on ``learn_batches``),
    ``score_params`` (parameter subset), ``score_method`` (``"layers"``, ``"loop"`` or
    ``"vmap"``), ``score_batch_size`` (default ``batch_size``), ``score_batches`` (learning
    batches read for a fresh direction, an estimated Fisher or the pilot).

    Unlearning: ``lr``; ``fisher_scale`` in units of ``1 / mean(F)`` (the group's ``fisher_scale``
    is set to ``fisher_scale / optimizer.fisher_mean()``, so 1.0 halves the step of an element with
    average Fisher); ``freeze_quantile`` freezes elements whose Fisher is above that quantile
    (``freeze_above = optimizer.fisher_quantile(q)``); ``moments`` (``"separate"``: unlearning keeps
    its own Adam moments; ``"shared"``); ``batch_size``; ``seed`` (batch order, random control);
    ``on_nonfinite`` (``"raise"``: a non-finite objective or gradient in an unlearning step stops
    the run before that step changes anything; ``"skip"``: the step is skipped, counted in
    ``lwf/nonfinite_skipped`` and logged).

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
    interleave: Optional[int] = None
    interleave_weight: float = 1.0
    fraction: float = 0.3
    positive_only: bool = False
    scores: str = "fc"
    alpha: Optional[float] = None
    fc_at: str = "start"
    pilot_steps: int = 0
    pilot_lr: Optional[float] = None
    eta: Optional[float] = None
    normalize: bool = False
    direction: str = "optimizer"
    fisher_source: str = "optimizer"
    score_params: ParamSpec = None
    score_method: str = "layers"
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
    on_nonfinite: str = "raise"

    def __post_init__(self) -> None:
        self.validate()
        object.__setattr__(self, "_validated", True)

    def __setattr__(self, name: str, value: Any) -> None:
        if not getattr(self, "_validated", False):
            object.__setattr__(self, name, value)
            return
        if name not in {f.name for f in dataclasses.fields(self)}:
            raise AttributeError(f"LWFConfig has no field {name!r}")
        old = getattr(self, name)
        object.__setattr__(self, name, value)
        try:
            self.validate()
        except Exception:
            object.__setattr__(self, name, old)
            raise

    def validate(self) -> None:
        """Check every field (:class:`ValueError` / :class:`TypeError` naming the field)."""
        _check_int(self, "every", 1)
        _check_int(self, "steps", 1)
        _check_int(self, "warmup", 0)
        _check_int(self, "rescore_every", 1, optional=True)
        self.schedule  # validates the schedule fields together
        _check_int(self, "pilot_steps", 0)
        _check_int(self, "score_batches", 1)
        _check_int(self, "batch_size", 1)
        _check_int(self, "forget_eval_size", 0)
        _check_int(self, "seed", None)
        _check_int(self, "interleave", 1, optional=True)
        _check_int(self, "score_batch_size", 1, optional=True)
        _check_number(self, "fraction", low=0.0, high=1.0, open_low=True)
        _check_number(self, "lr", low=0.0)
        _check_number(self, "fisher_scale", low=0.0)
        _check_number(self, "retain_weight", low=0.0)
        _check_number(self, "interleave_weight", low=0.0, open_low=True)
        for name in ("alpha", "eta", "pilot_lr"):
            _check_number(self, name, low=0.0, open_low=True, optional=True)
        _check_number(self, "freeze_quantile", low=0.0, high=1.0, optional=True)
        for name in ("early", "positive_only", "normalize", "split_scoring", "ascent"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"Invalid {name}: {getattr(self, name)!r} (must be a bool)")
        _check_choice(self, "scores", SCORE_KINDS)
        _check_choice(self, "fc_at", ("start", "current"))
        _check_choice(self, "direction", ("optimizer", "fresh"))
        _check_choice(self, "fisher_source", ("optimizer",) + ESTIMATORS)
        _check_choice(self, "score_method", SCORE_METHODS)
        _check_choice(self, "moments", ("shared", "separate"))
        _check_choice(self, "retain", RETAIN_SETS)
        _check_choice(self, "retain_loss", ("nll", "kl"))
        _check_choice(self, "on_nonfinite", ("raise", "skip"))
        _check_choice(self, "backend", BACKEND_CHOICES)
        spec = self.score_params
        if spec is not None and not callable(spec):
            if isinstance(spec, (str, Tensor)) or not isinstance(spec, Iterable):
                raise TypeError(f"Invalid score_params: {spec!r:.60} (must be None, a predicate "
                                "(name, param) -> bool, or a list of names or parameters)")
            if not isinstance(spec, list):  # a one-shot iterable would be consumed by a read
                spec = list(spec)
                object.__setattr__(self, "score_params", spec)
            bad = [item for item in spec if not isinstance(item, (str, Tensor))]
            if bad or not spec:
                raise TypeError(f"Invalid score_params: {'empty' if not spec else bad[:3]} "
                                "(names or parameter tensors expected)")
        if not self.ascent and (self.retain is None or self.retain_weight == 0):
            raise ValueError("ascent=False (the retain-only control) needs a retain set and "
                             "retain_weight > 0: otherwise the unlearning steps do nothing")
        if self.interleave is not None and self.early:
            raise ValueError("interleave and early are two different schedules: set one")

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


def _check_int(config: LWFConfig, name: str, low: Optional[int], optional: bool = False) -> None:
    value = getattr(config, name)
    if optional and value is None:
        return
    if (not isinstance(value, numbers.Integral) or isinstance(value, bool)
            or (low is not None and value < low)):
        bound = "" if low is None else f" >= {low}"
        raise ValueError(f"Invalid {name}: {value!r} (must be {'None or ' if optional else ''}"
                         f"an int{bound})")
    if type(value) is not int:  # e.g. np.int64: stored as a plain int (checkpoints stay plain)
        object.__setattr__(config, name, int(value))


def _check_number(config: LWFConfig, name: str, *, low: float, high: Optional[float] = None,
                  open_low: bool = False, optional: bool = False) -> None:
    value = getattr(config, name)
    if optional and value is None:
        return
    ok = (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and math.isfinite(value) and (value > low if open_low else value >= low)
          and (high is None or value <= high))
    if not ok:
        interval = f"{'(' if open_low else '['}{low:g}, {'inf)' if high is None else f'{high:g}]'}"
        raise ValueError(f"Invalid {name}: {value!r} (must be {'None or ' if optional else ''}a "
                         f"finite number in {interval})")
    if type(value) not in (int, float):  # e.g. np.float64: stored as a plain float
        object.__setattr__(config, name, float(value))


def _check_choice(config: LWFConfig, name: str, choices: Sequence[Any]) -> None:
    value = getattr(config, name)
    if not any(value is c or (isinstance(value, str) and value == c) for c in choices):
        raise ValueError(f"Invalid {name}: {value!r} (must be one of {tuple(choices)})")


def _unwrap_optimizer(optimizer: Any) -> Any:
    # accelerate's AcceleratedOptimizer (what Trainer hands to callbacks) wraps the real one.
    while hasattr(optimizer, "optimizer") and not hasattr(optimizer, "fisher"):
        optimizer = optimizer.optimizer
    return optimizer


class LearningWithForgetting:
    """Unlearning of high-FC self-knowledge during fine-tuning (see the module doc).

    Args:
        model: the model being fine-tuned (may be bound later with :meth:`bind`).
        optimizer: its :class:`~fisherforget.FisherAdamW` (may be bound later).
        forget_samples: ``D_self`` as encoded samples (dicts of ``input_ids``/``labels``).
        config: :class:`LWFConfig`.
        learn_batches: learning-task batches for a fresh direction, an estimated Fisher, the
            pilot fine-tune or the early variant: a re-iterable (a list, a ``DataLoader``) or a
            zero-argument callable returning an iterable of batches. A one-shot iterator (a
            generator) is refused: the first reader would exhaust it.
        autocast: a zero-argument callable returning the context manager the forward passes run
            in (mixed precision); default none.
        pad_id: the padding id used to collate ``forget_samples`` (``None``: 0; padded positions
            are masked and carry no labels, so any valid id works).
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
        pad_id: Optional[int] = 0,
        retain_samples: Optional[Sequence[Mapping[str, Any]]] = None,
    ):
        self.config = config if config is not None else LWFConfig()
        if not isinstance(self.config, LWFConfig):
            raise TypeError(f"config must be an LWFConfig, got {type(self.config).__name__}")
        if isinstance(forget_samples, (str, bytes, Mapping)) or not isinstance(
                forget_samples, Iterable):
            raise TypeError("forget_samples must be a sequence of encoded samples (dicts with "
                            f"input_ids and labels), got {type(forget_samples).__name__}")
        samples = list(forget_samples)
        if not samples:
            raise ValueError("forget_samples is empty: LWF needs the model's self-knowledge")
        if learn_batches is not None and not callable(learn_batches):
            if not isinstance(learn_batches, Iterable):
                raise TypeError("learn_batches must be an iterable of batches or a zero-argument "
                                f"callable returning one, got {type(learn_batches).__name__}")
            if iter(learn_batches) is learn_batches:
                raise TypeError(
                    "learn_batches is a one-shot iterator (e.g. a generator): the first reader "
                    "would exhaust it; pass a list of batches, a DataLoader, or a zero-argument "
                    "callable returning a fresh iterable")
        if (self.config.retain == "samples") != (retain_samples is not None):
            raise ValueError("retain_samples must be given exactly when config.retain == 'samples'"
                             f" (retain={self.config.retain!r}, retain_samples "
                             f"{'given' if retain_samples is not None else 'missing'})")
        if retain_samples is not None and not list(retain_samples):
            raise ValueError("retain_samples is empty")
        if pad_id is not None and (not isinstance(pad_id, int) or isinstance(pad_id, bool)
                                   or pad_id < 0):
            raise ValueError(f"Invalid pad_id: {pad_id!r} (must be None or an int >= 0)")
        self.samples = [_as_sample(s, i, "forget_samples") for i, s in enumerate(samples)]
        self.retain_samples = (None if retain_samples is None else
                               [_as_sample(s, i, "retain_samples")
                                for i, s in enumerate(retain_samples)])
        self.learn_batches = learn_batches
        self._check_learn_batches()
        self.start_model: Optional[nn.Module] = None  # the KL retain loss's reference
        self.start_weights: Optional[list[Tensor]] = None  # theta_0 of the scored params
        self.retain_pool: Optional[Tensor] = None  # indices of D_self rehearsed (retain sets
        # "unselected"/"lowest")
        self.autocast = autocast or contextlib.nullcontext
        self.pad_id = 0 if pad_id is None else pad_id
        self.model: Optional[nn.Module] = None
        self.optimizer: Any = None
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self.global_step = 0  # learning steps seen
        self.phase = 0
        self.last_scored: Optional[int] = None
        self.fc: Optional[ForgettingScores] = None
        self.ranking: Optional[Tensor] = None  # the scores the selection ranks by
        self.selected: Optional[Tensor] = None
        self._order: Optional[Tensor] = None  # shuffled selected indices, consumed in batches
        self._cursor = 0
        self._interleave_carry = 0.0  # fractional forget samples owed by the interleaved loss
        self.began = False
        self.history: list[dict[str, float]] = []
        if model is not None or optimizer is not None:
            self.bind(model, optimizer)

    def _check_learn_batches(self) -> None:
        cfg = self.config
        needs = [what for what, needed in (
            ("direction='fresh'", cfg.direction == "fresh" and cfg.scores in _DIRECTION_SCORES),
            (f"fisher_source={cfg.fisher_source!r}", cfg.fisher_source != "optimizer"),
            (f"pilot_steps={cfg.pilot_steps}", cfg.pilot_steps > 0),
            ("early=True", cfg.early)) if needed]
        if needs and self.learn_batches is None:
            raise ValueError(f"learn_batches is required with {', '.join(needs)}")

    # -------------------------------------------------------------- binding

    def bind(self, model: nn.Module, optimizer: Any) -> "LearningWithForgetting":
        """Attach the model and its ``FisherAdamW`` (unwrapping accelerate's wrapper). Checks
        that every sample fits the model (token ids within its vocabulary, lengths within its
        positions) and, before fine-tuning starts, records ``theta_0``."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        optimizer = _unwrap_optimizer(optimizer)
        if not hasattr(optimizer, "unlearning") or not hasattr(optimizer, "fisher_quantile"):
            raise TypeError(
                f"LWF needs a fisherforget.FisherAdamW optimizer, got {type(optimizer).__name__}"
            )
        managed = {id(p) for g in optimizer.param_groups for p in g["params"]}
        if not any(id(p) in managed for p in model.parameters()):
            raise ValueError("the optimizer manages none of the model's parameters")
        if self.config.score_params is not None:
            chosen = resolve_params(model, self.config.score_params)
            unmanaged = [n for n, p in chosen.items() if id(p) not in managed]
            if unmanaged and self.config.scores != "random":
                raise ValueError("score_params: these parameters are not managed by the "
                                 f"optimizer: {unmanaged[:5]}")
        _check_fits(model, self.samples, "forget_samples")
        if self.retain_samples is not None:
            _check_fits(model, self.retain_samples, "retain_samples")
        self.model, self.optimizer = model, optimizer
        if self.global_step == 0 and not self.began and self.start_weights is None:
            self._record_start()
        return self

    def _record_start(self) -> None:
        """``theta_0``: a copy of the scored params (only when a scorer needs it)."""
        if self.config.scores in ("fc", "reversed"):
            self.start_weights = [p.detach().clone() for p in self._scored().values()]

    def _scored(self) -> "OrderedDict[str, Tensor]":
        """The scored params: ``score_params``, by default every trainable param the optimizer
        manages (another optimizer's params have no Fisher here)."""
        spec = self.config.score_params
        if spec is None:
            managed = {id(p) for p in self._managed}
            spec = lambda name, p: id(p) in managed  # noqa: E731
        return resolve_params(self.model, spec)

    def _require_bound(self) -> None:
        if self.model is None or self.optimizer is None:
            raise RuntimeError("LearningWithForgetting is not bound to a model and optimizer")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _learn_iter(self) -> Iterable[Mapping[str, Tensor]]:
        self._check_learn_batches()
        source = self.learn_batches() if callable(self.learn_batches) else self.learn_batches
        count = 0
        for i, batch in enumerate(source):
            if i >= self.config.score_batches:
                break
            if not isinstance(batch, Mapping):
                raise TypeError(f"learn_batches[{i}] must be a dict of tensors, got "
                                f"{type(batch).__name__}")
            count += 1
            yield {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        if count == 0:
            raise ValueError("learn_batches yielded no batch")

    @property
    def _managed(self) -> list[Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"] if p.requires_grad]

    # -------------------------------------------------------------- scoring

    def score(self) -> ForgettingScores:
        """The scores of every sample of ``D_self`` under the current model (the configured
        scorer, :class:`LWFConfig`)."""
        self._require_bound()
        cfg = self.config
        model = self.model
        params = list(self._scored().values())
        paper = cfg.scores in ("fc", "reversed")
        samples = self.samples
        if cfg.split_scoring:
            samples = [samples[i] for i in shard_range(len(samples))]

        def batches():
            return batches_of(samples, cfg.score_batch_size or cfg.batch_size,
                              pad_id=self.pad_id, device=self.device)

        was_training = model.training
        model.eval()
        try:
            if paper:
                if self.start_weights is None or len(self.start_weights) != len(params):
                    raise RuntimeError("the paper's FC needs theta_0: bind the model before "
                                       "fine-tuning, or call begin() first")
                target, fisher = self._learning_optimum(params)
                start = self.start_weights
                # Delta = theta*_L - theta_0, one param at a time when it is reduced.
                delta = Lazy(lambda j: target[j].to(torch.float32) - start[j].to(torch.float32),
                             len(params))
                alpha = cfg.alpha if cfg.alpha is not None else self._learning_lr()
                at_start = (swapped_weights(params, self.start_weights) if cfg.fc_at == "start"
                            else contextlib.nullcontext())
                with at_start, self.autocast():
                    scores = forgetting_confidence(
                        model, batches(), fisher, delta=delta, alpha=alpha, kind="fc",
                        params=params, normalize=cfg.normalize, method=cfg.score_method,
                        backend=cfg.backend)
            else:
                if cfg.direction == "optimizer":
                    direction = optimizer_direction(self.optimizer, params)
                else:
                    with self.autocast():
                        direction = mean_gradient(model, self._learn_iter(), params)
                fisher = self._fisher(params)
                with self.autocast():
                    scores = forgetting_confidence(
                        model, batches(), fisher, direction=direction, eta=cfg.score_eta,
                        kind=cfg.scores, params=params, normalize=cfg.normalize,
                        method=cfg.score_method, backend=cfg.backend)
        finally:
            model.train(was_training)
        if cfg.split_scoring:
            scores.terms = {k: gather_scores(v) for k, v in scores.terms.items()}
        return scores

    def _learning_lr(self) -> float:
        """The learning rate of the learning task's step, the default ``alpha``/``pilot_lr``:
        the first group's peak lr (``initial_lr``, which schedulers record, else ``lr``), not
        the scheduled value of the moment (a linear decay ends at 0)."""
        group = self.optimizer.param_groups[0]
        lr = group.get("initial_lr", group["lr"])
        lr = float(lr.item() if isinstance(lr, Tensor) else lr)
        if not lr > 0:
            raise ValueError(f"the learning optimizer's lr is {lr}: set LWFConfig(alpha=...) "
                             "(and pilot_lr) for the step the forgetting confidence assumes")
        return lr

    def _fisher(self, params: Sequence[Tensor]) -> list[Tensor]:
        cfg = self.config
        if cfg.fisher_source == "optimizer":
            return optimizer_fisher(self.optimizer, params)
        with self.autocast():
            return list(estimate_fisher(
                self.model, self._learn_iter(), cfg.fisher_source, list(params),
                method="vmap" if cfg.score_method == "vmap" else "loop", backend=cfg.backend,
                generator=torch.Generator().manual_seed(cfg.seed + self.global_step),
            ).values())

    def _learning_optimum(self, params: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """``(theta*_L, F_L)`` of the scored params: the current weights and Fisher, or, before
        any learning step with ``pilot_steps > 0``, those of a pilot fine-tune."""
        cfg = self.config
        if cfg.pilot_steps == 0 or self.global_step > 0:
            return [p.detach() for p in params], self._fisher(params)
        return self._pilot(params)

    def _pilot(self, params: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """``pilot_steps`` steps of a fresh ``FisherAdamW`` (``fisher="mean"``, lr ``pilot_lr``
        or the learning lr, no weight decay) on ``learn_batches`` from the current weights; its
        weights and Fisher (or the configured estimator at its weights) are returned and every
        param, gradient and optimizer state is as before."""
        from fisherforget.optim import FisherAdamW

        cfg = self.config
        managed = self._managed
        saved = [p.detach().clone() for p in managed]
        saved_grads = [p.grad for p in managed]
        pilot = FisherAdamW(managed, lr=cfg.pilot_lr or self._learning_lr(), weight_decay=0.0,
                            fisher="mean", backend=cfg.backend)
        batches = list(self._learn_iter())
        try:
            for p in managed:
                p.grad = None
            for step in range(cfg.pilot_steps):
                loss = self._loss(batches[step % len(batches)])
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"the pilot fine-tune's loss is {float(loss)} at "
                                             f"step {step}: lower pilot_lr")
                torch.autograd.backward(loss, inputs=managed)
                pilot.step()
                pilot.zero_grad(set_to_none=True)
            target = [p.detach().clone() for p in params]
            if cfg.fisher_source == "optimizer":
                fisher = [pilot.fisher(p) for p in params]
            else:
                fisher = self._fisher(params)
        finally:
            with torch.no_grad():
                for p, value, grad in zip(managed, saved, saved_grads):
                    p.copy_(value)
                    p.grad = grad
        return target, fisher

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
        if not torch.isfinite(ranking).any():
            raise FloatingPointError(
                f"every {cfg.scores!r} score of D_self is {float(ranking[0])}: the learning "
                "task's Fisher or displacement is not finite (diverged fine-tuning?)")
        if cfg.scores != "random" and bool((ranking == 0).all()):
            warnings.warn(
                f"every {cfg.scores!r} score of D_self is 0 (before any learning step the Fisher "
                "and the displacement are zero): the selection is arbitrary; score after "
                "warmup steps or set pilot_steps", UserWarning, stacklevel=2)
        # positive_only keeps samples scored > 0 by fc / loss_change, whose sign means something.
        selected = select(ranking, cfg.fraction,
                          positive_only=cfg.positive_only and cfg.scores in ("fc", "loss_change"))
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

    def _objective(self, size: Optional[int] = None) -> tuple[Tensor, Optional[Tensor],
                                                              Optional[Tensor]]:
        """``(J, L(B_U), R(B_R))`` on the next batch of ``D_U`` and a random retain batch, with
        ``J = L(B_U) - retain_weight * R(B_R)`` (terms the config leaves out are ``None``)."""
        cfg = self.config
        objective = loss = retain = None
        if cfg.ascent:
            loss = self._loss(self._batch(self.samples, self._next_indices(size)))
            objective = loss
        if self.retain_pool is not None and cfg.retain_weight > 0:
            retain = self._retain_term(size)
            objective = (-cfg.retain_weight * retain if objective is None
                         else objective - cfg.retain_weight * retain)
        return objective, loss, retain

    def unlearn(self, n_steps: int) -> dict[str, float]:
        """Run ``n_steps`` unlearning steps (each maximising ``J = L(B_U) - retain_weight *
        R(B_R)``, see the module doc); return statistics (``unlearn_loss*`` of the ascent term,
        ``retain_loss`` of the retain term, ``nonfinite_skipped``).

        Only the optimizer's params receive the objective's gradient, and their existing
        ``.grad`` are set aside and restored, so the call is safe anywhere between two optimizer
        steps. A step whose objective or gradient is not finite changes nothing: it raises
        :class:`FloatingPointError` (``on_nonfinite="raise"``) or is skipped and counted.
        """
        self._require_bound()
        cfg = self.config
        opt = self.optimizer
        if self.selected is None:
            raise RuntimeError("nothing selected yet: call rescore() first")
        if not isinstance(n_steps, int) or isinstance(n_steps, bool) or n_steps < 0:
            raise ValueError(f"Invalid n_steps: {n_steps!r} (must be an int >= 0)")
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
        params = self._managed
        saved_grads = [p.grad for p in params]
        for p in params:
            p.grad = None
        losses, retain_losses, skipped = [], [], 0
        try:
            with opt.unlearning(moments=cfg.moments, **overrides):
                for index in range(n_steps):
                    # The optimizer maximises J = L(B_U) - retain_weight * R(B_R).
                    objective, loss, retain = self._objective()
                    finite = bool(torch.isfinite(objective.detach()))
                    if finite:
                        # inputs=: parameters other optimizers own get no gradient from J.
                        torch.autograd.backward(objective, inputs=params)
                        grads = [p.grad for p in params if p.grad is not None]
                        finite = not grads or bool(torch.isfinite(torch.stack(
                            torch._foreach_norm(grads, float("inf")))).all())
                    if not finite:
                        opt.zero_grad(set_to_none=True)
                        what = (f"unlearning step {index + 1} of {n_steps} (learning step "
                                f"{self.global_step}): objective {float(objective.detach()):g}, "
                                "the objective or its gradient is not finite")
                        if cfg.on_nonfinite == "raise":
                            raise FloatingPointError(
                                f"{what}; this step changed nothing. Lower LWFConfig.lr, prefer "
                                "bf16 to fp16 autocast, or set on_nonfinite='skip'")
                        logger.warning("%s; skipped", what)
                        skipped += 1
                        continue
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    if loss is not None:
                        losses.append(loss.detach())
                    if retain is not None:
                        retain_losses.append(retain.detach())
        finally:
            for p, g in zip(params, saved_grads):
                p.grad = g
        if losses:
            values = torch.stack(losses).float().cpu()
            stats.update(unlearn_loss=float(values.mean()), unlearn_loss_first=float(values[0]),
                         unlearn_loss_last=float(values[-1]))
        if retain_losses:
            stats["retain_loss"] = float(torch.stack(retain_losses).float().mean())
        stats["unlearn_steps"] = float(n_steps - skipped)
        if skipped:
            stats["nonfinite_skipped"] = float(skipped)
        return stats

    def interleaved_loss(self, loss: Tensor, num_samples: int) -> Tensor:
        """The learning loss of one step with the interleaved unlearning term
        (``config.interleave = k``): ``loss - interleave_weight * (m / n) * J`` where ``n =
        num_samples`` learning samples make ``loss`` (token-averaged) and ``m`` forget samples,
        one per ``k`` learning samples (fractions carried to the next step), make
        ``J = L(B_U) - retain_weight * R(B_R)``: each forget sample enters with weight
        ``-interleave_weight`` relative to a learning sample. Before ``warmup`` learning steps,
        or while no forget sample is due, ``loss`` comes back unchanged. ``D_U`` is (re)scored on
        the schedule's ``rescore_every``. Call it before ``backward``, then step the optimizer
        and call :meth:`step` as usual."""
        self._require_bound()
        cfg = self.config
        if cfg.interleave is None:
            raise RuntimeError("interleaved_loss needs LWFConfig(interleave=k)")
        if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
            raise ValueError(f"Invalid num_samples: {num_samples!r} (must be an int >= 1)")
        if self.global_step < cfg.warmup:
            return loss
        self._interleave_carry += num_samples / cfg.interleave
        count = int(self._interleave_carry)
        if count == 0:
            return loss
        self._interleave_carry -= count
        if self.selected is None or cfg.schedule.needs_rescore(self.global_step, self.last_scored):
            stats = self.rescore()
            self.history.append({"step": self.global_step,
                                 **{f"lwf/{k}": v for k, v in stats.items()}})
        if self.selected.numel() == 0:
            return loss
        objective, _, _ = self._objective(count)
        return loss - cfg.interleave_weight * (count / num_samples) * objective

    def _next_indices(self, size: Optional[int] = None) -> list[int]:
        size = min(size or self.config.batch_size, self.selected.numel())
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

    def _batch(self, samples: Sequence[Mapping[str, Any]], indices: Sequence[int]) -> dict:
        batch = collate([samples[i] for i in indices], self.pad_id)
        return {k: v.to(self.device) for k, v in batch.items()}

    def _retain_term(self, size: Optional[int] = None) -> Tensor:
        """``R(B_R)`` on a fresh random batch of the retain set: the token-averaged NLL, or the
        mean over response tokens of ``KL(p_start || p_theta)``."""
        pool = self.retain_pool
        size = min(size or self.config.batch_size, pool.numel())
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
        """Call once before fine-tuning: records ``theta_0`` (the paper's FC measures the
        displacement from it) and, with ``total_steps``, warns when the schedule would never
        unlearn in that many steps. In the ``early`` control it runs all the unlearning now: as
        many steps as the periodic schedule would run in ``total_steps``."""
        self._require_bound()
        if self.began:
            return None
        if total_steps is not None and (not isinstance(total_steps, int)
                                        or isinstance(total_steps, bool) or total_steps < 0):
            raise ValueError(f"Invalid total_steps: {total_steps!r} (must be an int >= 0)")
        cfg = self.config
        if cfg.early and total_steps is None:
            raise ValueError("begin(total_steps) needs total_steps in the early variant")
        periodic = UnlearningSchedule(every=cfg.every, steps=cfg.steps, warmup=cfg.warmup)
        first = max(cfg.warmup, 1) if cfg.interleave else max(cfg.warmup, cfg.every)
        if total_steps is not None and periodic.phases(total_steps) == 0 and (
                cfg.interleave is None or total_steps <= cfg.warmup):
            warnings.warn(
                f"LWF will never unlearn: the run has {total_steps} learning steps and the first "
                f"unlearning comes after step {first}"
                f" (warmup={cfg.warmup}, every={cfg.every}); lower warmup/every or train longer",
                UserWarning, stacklevel=2)
        self.began = True
        if self.global_step == 0:
            self._record_start()
        if cfg.retain_loss == "kl" and cfg.retain is not None:
            # A frozen copy: the KL retain loss keeps the retained answers' distributions where
            # they were when fine-tuning started (one more copy of the model in memory).
            self.start_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        if not cfg.early:
            return None
        return self._phase(periodic.total_unlearning_steps(total_steps))

    def step(self) -> Optional[dict[str, float]]:
        """Call after every learning optimizer step. Returns the phase's statistics (keys
        ``lwf/...``) when it unlearned, else ``None`` (always ``None`` with ``interleave``,
        whose unlearning is in :meth:`interleaved_loss`)."""
        self._require_bound()
        self.global_step += 1
        if self.config.interleave is not None or not self.config.schedule.fires(self.global_step):
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
            "start_weights": self.start_weights,
            # The KL retain loss's reference model (a model's worth of tensors, only with it).
            "start_model": None if self.start_model is None else {
                k: v.detach().clone() for k, v in self.start_model.state_dict().items()},
            "interleave_carry": self._interleave_carry,
            "history": list(self.history),
            "samples": self._fingerprints(),
            "config": self.config.to_dict(),
        }

    def _fingerprints(self) -> dict[str, Any]:
        retain = (None if self.retain_samples is None else
                  {"count": len(self.retain_samples),
                   "fingerprint": fingerprint(self.retain_samples)})
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
        start = state.get("start_weights")
        if start is not None:
            self.start_weights = [t.to(self.device) if self.model is not None else t
                                  for t in start]
        self._interleave_carry = float(state.get("interleave_carry", 0.0))
        start_model = state.get("start_model")
        if start_model is not None:
            if self.model is None:
                raise RuntimeError("this LWF state holds the KL retain loss's start model: bind "
                                   "the model before load_state_dict()")
            reference = copy.deepcopy(self.model).eval().requires_grad_(False)
            reference.load_state_dict(start_model)
            self.start_model = reference
        self.history = list(state["history"])


_DIRECTION_SCORES = ("loss_change", "fisher_alignment", "fisher_overlap")


def _as_sample(sample: Any, index: int, where: str) -> dict[str, Tensor]:
    """A sample as 1-D long tensors (:func:`~fisherforget.lwf.collate`'s rules: a leading
    dimension of 1 is dropped, ``labels`` default to ``input_ids``) that has a label to learn
    or unlearn."""
    input_ids, labels = _sample_row(sample, f"{where}[{index}]")
    if not bool((labels[1:] != IGNORE_INDEX).any()):
        raise ValueError(f"{where}[{index}] has no label token after the first position: "
                         "nothing to learn or unlearn")
    return {"input_ids": input_ids, "labels": labels}


def _check_fits(model: nn.Module, samples: Sequence[Mapping[str, Tensor]], where: str) -> None:
    """Token ids within the model's vocabulary and lengths within its positions: a clear error
    now instead of an ``IndexError`` deep in a forward pass later."""
    config = getattr(model, "config", None)
    positions = getattr(config, "max_position_embeddings", None) or getattr(
        config, "n_positions", None)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None)
    for index, sample in enumerate(samples):
        ids = sample["input_ids"]
        if isinstance(positions, int) and ids.numel() > positions:
            raise ValueError(f"{where}[{index}] has {ids.numel()} tokens, more than the model's "
                             f"{positions} positions (max_position_embeddings): truncate it "
                             "(encode_pairs(max_length=...)) or drop it")
        if isinstance(vocab, int) and (int(ids.max()) >= vocab or int(ids.min()) < 0):
            bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
            raise ValueError(f"{where}[{index}] holds token id {bad} outside the model's "
                             f"vocabulary of {vocab}: encoded with another tokenizer?")
