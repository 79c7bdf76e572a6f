"""``FisherAdamW``: AdamW with a diagonal Fisher estimate, masks and Fisher-scaled steps.

The optimizer validates input at the edges, keeps state, plans launches by (device, dtype) and calls
the ops of :mod:`fisherforget.ops`; it never touches kernels. The math is stated in
:mod:`fisherforget.ops` and ``docs/design.md``.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import math
import operator
import warnings
from collections import defaultdict
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from fisherforget import _native, backends, ops
from fisherforget import distributed as _dist

__all__ = ["FisherAdamW"]

_GRAD = operator.attrgetter("grad")
_STATE_DTYPES = (torch.float32, torch.bfloat16)
_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# Every key a FisherAdamW param group carries; a state_dict whose groups lack them was not ours.
_GROUP_KEYS = (
    "lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "fisher", "fisher_beta",
    "fisher_scale", "freeze_above", "freeze_below", "state_dtype", "fisher_dtype", "backend",
)
_UNLEARN_MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step")
# Group keys holding a torch.dtype; a state dict stores them by name.
_DTYPE_KEYS = ("state_dtype", "fisher_dtype")


def _dtypes_from_names(saved_group: Any) -> Any:
    """A copy of a saved param group with dtype names (``"float32"``) turned back into dtypes;
    anything else is left for validation to judge."""
    if not isinstance(saved_group, dict):
        return saved_group
    group = dict(saved_group)
    for key in _DTYPE_KEYS:
        value = group.get(key)
        if isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype):
            group[key] = getattr(torch, value)
    return group


def _swapped_moments(state: dict[str, Any]) -> dict[str, Any]:
    """A copy of one param's state with the learning and the ``unlearn_*`` moments exchanged."""
    out = dict(state)
    for key in _UNLEARN_MOMENT_KEYS:
        own, other = out.pop(key, None), out.pop("unlearn_" + key, None)
        if other is not None:
            out[key] = other
        if own is not None:
            out["unlearn_" + key] = own
    return out


def _group_hyper(group: dict[str, Any]) -> ops.StepHyper:
    """Validate a param group's hyperparameters and return them as the op's :class:`StepHyper`.

    Raises a ``ValueError``/``TypeError`` naming the bad group key; changes nothing."""
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r} (must be a pair (beta1, beta2))")
    hyper = ops.StepHyper(
        lr=group["lr"], beta1=betas[0], beta2=betas[1], eps=group["eps"],
        weight_decay=group["weight_decay"], amsgrad=group["amsgrad"],
        maximize=group["maximize"], fisher_mode=group["fisher"],
        fisher_beta=group["fisher_beta"], fisher_scale=group["fisher_scale"],
        freeze_above=group["freeze_above"], freeze_below=group["freeze_below"],
    )
    if hyper.freeze_above is not None and hyper.freeze_above < 0:
        raise ValueError(f"Invalid freeze_above: {hyper.freeze_above!r} (the Fisher is >= 0: "
                         "every element would be frozen)")
    for name in ("state_dtype", "fisher_dtype"):
        if group[name] not in _STATE_DTYPES:
            raise ValueError(
                f"Invalid {name}: {group[name]!r} (must be torch.float32 or torch.bfloat16)"
            )
    if group["backend"] not in backends.BACKEND_CHOICES:
        raise ValueError(
            f"Invalid backend: {group['backend']!r} (must be one of {backends.BACKEND_CHOICES})"
        )
    return hyper


def _normalize_group(group: dict[str, Any]) -> ops.StepHyper:
    """Validate ``group`` and write back its values as plain Python numbers and strings (the
    StepHyper's conversions: numpy scalars become floats), so that a state dict holding them
    loads with ``torch.load(weights_only=True)``. Changes nothing when it raises."""
    hyper = _group_hyper(group)
    if not isinstance(group["lr"], Tensor):
        group["lr"] = hyper.lr
    group["betas"] = (hyper.beta1, hyper.beta2)
    for key in ("eps", "weight_decay", "fisher_beta", "fisher_scale", "freeze_above",
                "freeze_below"):
        group[key] = getattr(hyper, key)
    group["fisher"] = None if hyper.fisher_mode is None else str(hyper.fisher_mode)
    group["backend"] = str(group["backend"])
    return hyper


def _group_values(group: dict[str, Any]) -> tuple:
    """What a group's StepHyper is built from, cheap to compare: a tensor lr by identity and
    version counter (an in-place change bumps it), never by value (that would read the device)."""
    lr = group["lr"]
    lr_key = (id(lr), lr._version) if isinstance(lr, Tensor) else lr
    return (lr_key,) + tuple(group[k] for k in _GROUP_KEYS[1:])


class _HyperCache:
    """The StepHyper of one group, rebuilt (and so validated) only when a value changed."""

    __slots__ = ("values", "hyper")

    def __init__(self, values: tuple, hyper: ops.StepHyper):
        self.values = values
        self.hyper = hyper  # holds a tensor lr, so its id in ``values`` cannot be reused


class _Bucket:
    """One launch: a (device, dtype) slice of a group's params with gradients."""

    __slots__ = ("index", "tensors", "backend", "masked", "on_cpu")

    def __init__(self, index: Optional[list[int]], tensors: ops.StepTensors, backend: str):
        self.index = index  # positions in the group's params-with-grad list; None: all
        self.tensors = tensors  # grads is a placeholder, filled per step
        self.backend = backend
        self.masked = any(m is not None for m in tensors.masks)
        self.on_cpu = all(p.device.type == "cpu" and not _dist.is_dtensor(p)
                          for p in tensors.params)

    def with_grads(self, grads: list[Tensor]) -> ops.StepTensors:
        picked = grads if self.index is None else [grads[i] for i in self.index]
        return self.tensors._replace(grads=picked)


def _with_grads(params: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """The params that have a gradient, and their gradients: C-level passes when none is missing
    (the usual step), plain comprehensions when traced."""
    if torch.compiler.is_compiling():
        params = [p for p in params if p.grad is not None]
        return params, [p.grad for p in params]
    grads = list(map(_GRAD, params))
    if any(map(operator.is_, grads, itertools.repeat(None))):
        params = [p for p, g in zip(params, grads) if g is not None]
        grads = [g for g in grads if g is not None]
    return params, grads


class _Plan:
    """A group's launches, built once and reused while its params-with-grad, state layout and
    settings stay the same (the key). Per step only the gradients are gathered and compared, as
    a set, with the gradients the plan was checked with."""

    __slots__ = ("key", "buckets", "shapes", "dtypes", "devices", "distributed", "grads_key",
                 "checked_hyper")

    def __init__(self, key: tuple, buckets: list[_Bucket], params: list[Tensor],
                 grads: list[Tensor]):
        self.key = key
        self.buckets = buckets
        self.distributed = any(map(_dist.is_dtensor, params))
        # A compiled step is traced once (no plan is kept): the Python comparison traces.
        self.grads_key = None if torch.compiler.is_compiling() else _layout_key(grads)
        if self.grads_key is None:  # what the Python comparison compares with
            self.shapes = [p.shape for p in params]
            self.dtypes = [p.dtype for p in params]
            self.devices = [p.device for p in params]
        self.checked_hyper: Optional[ops.StepHyper] = None  # the backends' preflight passed

    def grads_match(self, grads: list[Tensor]) -> bool:
        """Whether ``grads`` have the types, dtypes, devices, layouts and shapes of the
        gradients the plan was checked with: one C++ pass where the extension is built, else
        one Python pass per property. No strings are built."""
        if self.distributed:
            return False
        if self.grads_key is not None:
            return _layout_key(grads) == self.grads_key
        return ([g.shape for g in grads] == self.shapes
                and [g.dtype for g in grads] == self.dtypes
                and [g.device for g in grads] == self.devices
                and {g.layout for g in grads} == _STRIDED
                and {type(g) for g in grads} <= _PLAIN_TENSOR_TYPES)


def _naming_the_param(exc: Exception, gi: int, group: dict[str, Any], params: list[Tensor],
                      bucket: _Bucket) -> Exception:
    """A backend's preflight error about an entry of one launch (its ``step_entry``, e.g.
    ``("params", 1)``: :func:`fisherforget.ops.entry_error`); the same error, naming the param
    of the group it belongs to. The error path only."""
    entry = getattr(exc, "step_entry", None)
    if entry is None:
        return exc
    j = entry[1]
    i = j if bucket.index is None else bucket.index[j] if j < len(bucket.index) else None
    if i is None or i >= len(params):
        return exc
    p = params[i]
    pi = next(k for k, q in enumerate(group["params"]) if q is p)
    try:
        return type(exc)(f"param {pi} of group {gi} (shape {tuple(p.shape)}): {exc}")
    except Exception:  # an exception type built differently: keep it as it is
        return exc


def _layout_key(tensors: list[Tensor]) -> Optional[bytes]:
    """``fisherforget._C.layout_key`` (None without the extension): bytes equal exactly when two
    lists hold tensors of the same type, dtype, device, layout and shape, index by index."""
    native = _native.helpers()
    return None if native is None else native.layout_key(tensors)


_STRIDED = {torch.strided}
_PLAIN_TENSOR_TYPES = {Tensor, torch.nn.Parameter}


class FisherAdamW(Optimizer):
    r"""AdamW whose step also accumulates a diagonal Fisher estimate and can freeze or damp
    elements by it.

    Per element (the full statement is :mod:`fisherforget.ops`): the Fisher accumulates
    ``F = a*F + b*g^2`` (``fisher`` = ``"ema"``, ``"mean"``, ``"sum"`` or ``None``); an element is
    frozen where its mask is False or ``F`` is above ``freeze_above`` / below ``freeze_below``;
    the others take an AdamW step divided by ``1 + fisher_scale * F``. With ``fisher=None``, no
    mask, no thresholds and ``fisher_scale=0`` this is ``torch.optim.AdamW`` to fp32 rounding,
    not bitwise (the expression order differs): over 200 steps every element stays within
    ``1e-6 * (|p| + lr * t)`` of the for-loop AdamW (tests/test_misuse.py).

    **Estimator.** The in-step accumulation squares the *mini-batch* gradient (the statistic Adam's
    ``v`` tracks, un-bias-corrected). It is neither the empirical Fisher (mean of squared
    *per-sample* gradients) nor the true Fisher (labels sampled from the model); use
    :func:`fisherforget.fisher.estimate_fisher` for those.

    Args:
        params: parameters or param groups, as for any ``torch.optim.Optimizer``.
        lr: learning rate, float or 0-dim tensor (read on the device; no host sync).
        betas, eps, weight_decay, amsgrad, maximize: as ``torch.optim.AdamW``.
        fisher: ``"ema"`` | ``"mean"`` | ``"sum"`` | ``None`` (no accumulation).
        fisher_beta: EMA decay of ``fisher="ema"``.
        fisher_scale: ``s = 1 / (1 + fisher_scale * F)`` damps each element's step; in units of
            1/F (see :meth:`fisher_mean` to make it scale-free). 0 disables it.
        freeze_above, freeze_below: freeze elements whose Fisher is above / below the threshold.
        state_dtype: dtype of ``exp_avg``/``exp_avg_sq``/``max_exp_avg_sq`` (fp32 default, also for
            bf16/fp16 params; fp64 params always keep fp64 state).
        fisher_dtype: dtype of the Fisher estimate (fp32 default). A bf16 Fisher (half the
            memory, 8 significant bits) is stored with stochastic rounding on every backend, so
            that increments under half an ulp of the running value are not rounded away: the
            stored value is within one bf16 ulp of the fp32 accumulation and equals it in
            expectation (a "sum" of 1,000 steps of ``g = 1`` averages 1,000 over the elements,
            each element a few percent off). The random bits are a hash of the Fisher count and
            the element's index: reproducible, the same on every backend, and carried by
            checkpoints and copies with the count (docs/design.md, "Low-precision Fisher").
        backend: ``"auto"`` | ``"cuda"`` | ``"triton"`` | ``"reference"``.

    Every option is an ordinary param-group key: schedulers, ``add_param_group`` and per-group
    settings work, and changing any of them never recompiles a kernel.

    Distributed: under DDP every rank takes the same step. DTensor params (FSDP2) are stepped
    shard by shard, their state is sharded like them, and :meth:`fisher_mean` /
    :meth:`fisher_quantile` are global (see :mod:`fisherforget.distributed`).
    """

    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: Union[float, Tensor] = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        maximize: bool = False,
        *,
        fisher: Optional[str] = "ema",
        fisher_beta: float = 0.99,
        fisher_scale: float = 0.0,
        freeze_above: Optional[float] = None,
        freeze_below: Optional[float] = None,
        state_dtype: torch.dtype = torch.float32,
        fisher_dtype: torch.dtype = torch.float32,
        backend: str = "auto",
    ):
        defaults = dict(
            lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
            weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize, fisher=fisher,
            fisher_beta=fisher_beta, fisher_scale=fisher_scale, freeze_above=freeze_above,
            freeze_below=freeze_below, state_dtype=state_dtype, fisher_dtype=fisher_dtype,
            backend=backend,
        )
        _normalize_group(defaults)
        self._hyper_cache: dict[int, _HyperCache] = {}
        self._plans: dict[int, _Plan] = {}
        self._state_epoch = 0  # bumped whenever state entries are added, removed or swapped
        # The state entries as the last planning saw them (a user's reset is told by identity).
        self._seen_states: list = []
        self._seen_epoch = -1
        # The learning settings of each group while inside unlearning(), else None.
        self._phase: Optional[dict[str, Any]] = None
        # Each degenerate-setting warning is given once per optimizer.
        self._warned: set[str] = set()
        if backend not in ("auto", "reference") and not backends.is_available(backend):
            raise RuntimeError(
                f"backend={backend!r} was requested but is not available: "
                f"{backends.unavailable_reason(backend)}"
            )
        # Register the ground-truth ops now rather than on the first step, which may run inside
        # torch.compile (an import there breaks the graph).
        backends.load("reference")
        super().__init__(params, defaults)

    def __getstate__(self) -> dict[str, Any]:
        # The base class keeps defaults, state and param groups; a copy made inside an
        # unlearning() phase must still restore the learning settings on exit.
        return {**super().__getstate__(), "_phase": self._phase, "_warned": set(self._warned)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Called by copy.deepcopy / pickle (a fresh object: its caches start empty, as plans
        # hold the original's tensors and the base class carries no private attribute) and by
        # the base load_state_dict (an existing object: caches kept, the new state mapping
        # makes every plan stale).
        defaults = state.get("defaults", self.__dict__.get("defaults", {}))
        had_differentiable = "differentiable" in defaults
        super().__setstate__(state)
        if not had_differentiable:
            # The base class adds it for its own optimizers; it is no FisherAdamW setting (a
            # group added to a copy would carry it into the copy's state dict).
            self.defaults.pop("differentiable", None)
        if "_plans" not in self.__dict__:
            self._hyper_cache = {}
            self._plans = {}
            self._state_epoch = 0
            self._seen_states, self._seen_epoch = [], -1
            self.__dict__.setdefault("_phase", None)
            self.__dict__.setdefault("_warned", set())

    def _state_changed(self) -> None:
        """State entries or groups were added, removed or swapped: no cached launch plan may be
        reused. (A compiled step caches no plan, and the next eager step sees the state mapping
        changed; some torch versions cannot trace an attribute write on the optimizer, so
        none is made there.)"""
        if not torch.compiler.is_compiling():
            self._state_epoch += 1

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # Inside a phase the new group would take the phase's direction with nothing to restore
        # on exit (and no learning moments with moments="separate").
        self._refuse_in_phase("add_param_group()", "add the group before or after the phase")
        self._state_changed()
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _normalize_group(group)
            for p in group["params"]:
                if p.dtype not in _PARAM_DTYPES:
                    raise TypeError(
                        f"FisherAdamW supports params of dtypes {_PARAM_DTYPES}, got {p.dtype}"
                    )
            below = group["freeze_below"]
            if group["fisher"] is None and below is not None and below > 0:
                # A new group has no Fisher, and fisher=None never accumulates one: F stays 0
                # and every element is frozen for good. (unlearning() may set fisher=None with
                # freeze_below: there the learning Fisher exists.)
                raise ValueError(
                    f"Invalid freeze_below: {below!r} with fisher=None: the Fisher is never "
                    "accumulated, stays 0 and every element would be frozen for good; set "
                    "fisher='ema'/'mean'/'sum', or use freeze_below in unlearning() only")
            self._check_backend_runs(len(self.param_groups) - 1, group, group["params"])
        except Exception:
            self.param_groups.pop()  # nothing half-added
            raise

    @staticmethod
    def _check_backend_runs(gi: int, group: dict[str, Any], params: list[Tensor]) -> None:
        """An explicit kernel backend must run every param of its group (device and dtype), as
        ``torch.optim.AdamW(fused=True)`` refuses at construction rather than at the first step."""
        if group["backend"] in ("auto", "reference"):
            return
        for pi, p in enumerate(params):
            try:
                backends.resolve(group["backend"], p.device, p.dtype)
            except RuntimeError as exc:
                raise RuntimeError(f"{exc} (param {pi} of group {gi})") from None

    # ------------------------------------------------------------------ step

    def _check_grads_one_by_one(self, gi: int, group: dict[str, Any]) -> None:
        """Name the first param whose gradient (or mask) does not fit it; the slow path, run only
        when the set-level check of a step failed or its plan is rebuilt."""
        for pi, p in enumerate(group["params"]):
            grad = p.grad
            if grad is None:
                continue
            where = f"param {pi} of group {gi} (shape {tuple(p.shape)})"
            if grad.is_sparse or grad.layout != torch.strided:
                raise RuntimeError(f"FisherAdamW does not support sparse gradients: {where}")
            if torch.is_complex(grad) or torch.is_complex(p):
                raise RuntimeError(f"FisherAdamW does not support complex tensors: {where}")
            if grad.shape != p.shape:
                raise RuntimeError(
                    f"gradient shape {tuple(grad.shape)} does not match {where}"
                )
            if grad.device != p.device:
                raise RuntimeError(
                    f"gradient is on {grad.device} but {where} is on {p.device}"
                )
            if grad.dtype != p.dtype:
                raise RuntimeError(
                    f"gradient dtype {grad.dtype} does not match {where} of dtype {p.dtype}"
                )
            _dist.check_grad_layout(p, grad, where)
            state = self.state.get(p)
            if not state:
                continue
            mask = state.get("mask")
            if mask is not None and (
                mask.shape != p.shape
                or mask.device != p.device
                or not _dist.same_layout(mask, p)
            ):
                raise RuntimeError(f"the mask of {where} no longer matches it; set_mask again")
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "fisher"):
                value = state.get(key)
                if value is not None and (value.shape != p.shape or value.device != p.device):
                    raise RuntimeError(
                        f"the {key} state of {where} has shape {tuple(value.shape)} on "
                        f"{value.device}: the param changed shape or device since its state was "
                        "made; reset the optimizer state for it")

    def _hyper(self, gi: int, group: dict[str, Any]) -> ops.StepHyper:
        if torch.compiler.is_compiling():  # a compiled step is traced once: nothing to cache
            return _group_hyper(group)
        values = _group_values(group)
        cached = self._hyper_cache.get(gi)
        if cached is None or cached.values != values:
            cached = _HyperCache(values, _group_hyper(group))
            self._hyper_cache[gi] = cached
        return cached.hyper

    def _plan(self, gi: int, group: dict[str, Any], hyper: ops.StepHyper,
              params: list[Tensor], grads: list[Tensor]) -> _Plan:
        # A compiled step is traced once and never reuses a plan (nor can it trace id() of the
        # state dict on every torch version): no key.
        key = None
        if not torch.compiler.is_compiling():
            key = (self._state_epoch, id(self.state), group["backend"], hyper.amsgrad,
                   hyper.uses_fisher, group["state_dtype"], group["fisher_dtype"],
                   tuple(map(id, params)))
            plan = self._plans.get(gi)
            if plan is not None and plan.key == key:
                return plan
        self._check_grads_one_by_one(gi, group)
        # Resolve every bucket's backend before creating any state, so that a backend that
        # cannot run here fails with nothing changed.
        grouped: dict[tuple, list[int]] = defaultdict(list)
        wide = {torch.float64}
        for i, p in enumerate(params):
            state = self.state.get(p, {})
            state_dtype = torch.float64 if p.dtype in wide else (
                state["exp_avg"].dtype if "exp_avg" in state else group["state_dtype"])
            fisher_dtype = None
            if hyper.uses_fisher:
                fisher_dtype = torch.float64 if p.dtype in wide else (
                    state["fisher"].dtype if "fisher" in state else group["fisher_dtype"])
            grouped[(p.device, p.dtype, state_dtype, fisher_dtype)].append(i)
        resolved = {key_: backends.resolve(group["backend"], key_[0], key_[1])
                    for key_ in grouped}
        buckets = []
        local = _dist.local
        for bucket_key, index in grouped.items():
            members = [params[i] for i in index]
            states = [self._init_state(p, group, hyper) for p in members]
            tensors = ops.StepTensors(
                params=[local(p) for p in members],
                grads=[],
                exp_avgs=[local(st["exp_avg"]) for st in states],
                exp_avg_sqs=[local(st["exp_avg_sq"]) for st in states],
                max_exp_avg_sqs=([local(st["max_exp_avg_sq"]) for st in states]
                                 if hyper.amsgrad else []),
                fishers=[local(st["fisher"]) for st in states] if hyper.uses_fisher else [],
                masks=[None if st.get("mask") is None else local(st["mask"]) for st in states],
                steps=[st["step"] for st in states],
                fisher_counts=([st["fisher_count"] for st in states]
                               if hyper.uses_fisher else []),
            )
            whole = len(grouped) == 1
            buckets.append(_Bucket(None if whole else index, tensors, resolved[bucket_key]))
        # _init_state may have added entries: step() gives the key the epoch after them.
        plan = _Plan(key, buckets, params, grads)
        if not torch.compiler.is_compiling():
            self._plans[gi] = plan
        return plan

    def _init_state(self, p: Tensor, group: dict[str, Any],
                    hyper: ops.StepHyper) -> dict[str, Any]:
        state = self.state[p]
        wide = p.dtype == torch.float64
        state_dtype = torch.float64 if wide else group["state_dtype"]
        if ("step" not in state or (group["amsgrad"] and "max_exp_avg_sq" not in state)
                or (hyper.uses_fisher and "fisher" not in state)):
            self._state_changed()
        if "step" not in state:
            # 0-dim fp32 on the param's device, as torch's fused/capturable AdamW: no host sync.
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            # Shaped and, for DTensor params (FSDP2), sharded like the param.
            state["exp_avg"] = _dist.zeros_like_param(p, state_dtype)
            state["exp_avg_sq"] = _dist.zeros_like_param(p, state_dtype)
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = _dist.zeros_like_param(p, state_dtype)
        if hyper.uses_fisher and "fisher" not in state:
            fisher_dtype = torch.float64 if wide else group["fisher_dtype"]
            state["fisher"] = _dist.zeros_like_param(p, fisher_dtype)
            state["fisher_count"] = torch.zeros((), dtype=torch.float32, device=p.device)
        return state

    @torch.no_grad()
    def step(
        self,
        closure: Optional[Callable[[], Any]] = None,
        *,
        grad_scale: Optional[Tensor] = None,
        found_inf: Optional[Tensor] = None,
    ) -> Any:
        """Perform one step. ``grad_scale``/``found_inf`` default to the attributes a
        ``torch.amp.GradScaler`` sets on optimizers with ``_step_supports_amp_scaling``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if grad_scale is None:
            grad_scale = getattr(self, "grad_scale", None)
        if found_inf is None:
            found_inf = getattr(self, "found_inf", None)
        ops.check_scalar_arg("grad_scale", grad_scale)
        ops.check_scalar_arg("found_inf", found_inf)
        # A zero (or inf, NaN, negative) scale makes every unscaled gradient inf/NaN or flips it.
        # Checked where reading it is free (CPU); a device scale is never read (no sync).
        if (grad_scale is not None and grad_scale.device.type == "cpu"
                and not torch.compiler.is_compiling()):
            scale = float(grad_scale)
            if not (math.isfinite(scale) and scale > 0):
                raise ValueError(f"Invalid grad_scale: {scale} (must be a finite number > 0)")

        compiling = torch.compiler.is_compiling()
        if not compiling and (len(self.state) != len(self._seen_states) or not all(
                map(operator.is_, self.state.values(), self._seen_states))):
            # The state mapping changed behind the optimizer's back (del opt.state[p], pop,
            # clear, opt.state[p] = {}): no cached plan may keep updating orphaned tensors.
            # One C-level pass over the entries, no Python per tensor.
            self._state_changed()
        # Everything is checked and planned (state, buckets, backends) before any launch, so a
        # failure leaves params and state unchanged.
        launches = []
        unchecked = []  # plans whose launches the backends have not preflighted with these values
        plans = []
        for gi, group in enumerate(self.param_groups):
            hyper = self._hyper(gi, group)
            params, grads = _with_grads(group["params"])
            if not params:
                continue
            plan = self._plan(gi, group, hyper, params, grads)
            if not plan.grads_match(grads):
                self._check_grads_one_by_one(gi, group)
                grads = [_dist.local(g) for g in grads]
                plan.checked_hyper = None
            if plan.checked_hyper is not hyper:
                unchecked.append((plan, hyper, len(launches), gi, params))
            for bucket in plan.buckets:
                launches.append((bucket.with_grads(grads), hyper, bucket))
            plans.append(plan)
        # State that this step created (each plan's own, and that of later groups, for their
        # params only) leaves the plans valid: they take the epoch after it, or the next step
        # would rebuild them.
        if not compiling:
            for plan in plans:
                plan.key = (self._state_epoch,) + plan.key[1:]
            if self._seen_epoch != self._state_epoch:
                self._seen_states = list(self.state.values())
                self._seen_epoch = self._state_epoch
        # The backends' own checks (dtypes their kernels take, devices) depend only on what the
        # plan and the gradient layout fix: they run when either changes, for every launch of
        # the step before the first launch.
        for plan, hyper, first, gi, params in unchecked:
            for tensors, _, bucket in launches[first:first + len(plan.buckets)]:
                try:
                    ops.preflight_fused_step(tensors, hyper, bucket.backend)
                except (ValueError, TypeError, RuntimeError) as exc:
                    raise _naming_the_param(exc, gi, self.param_groups[gi], params,
                                            bucket) from None
        for plan, hyper, *_ in unchecked:
            plan.checked_hyper = hyper
        for tensors, hyper, bucket in launches:
            ops.dispatch_fused_step(tensors, hyper, grad_scale, found_inf, bucket.backend)
        if "frozen" not in self._warned and not torch.compiler.is_compiling():
            self._warn_if_all_frozen(launches, found_inf)
        return loss

    def _warn_if_all_frozen(self, launches: list, found_inf: Optional[Tensor]) -> None:
        """Warn (once) when this step froze every element that had a gradient.

        Costs nothing unless a mask or threshold is set, and is checked only where reading is
        free: every such bucket on CPU (a device tensor would need a host sync, so GPU steps
        are not checked). It stops at the first param with a free element, so a healthy step
        pays one elementwise pass over one param."""
        settings: set[str] = set()
        for tensors, hyper, bucket in launches:
            if not (bucket.masked or hyper.freezes_by_fisher):
                if any(p.numel() for p in tensors.params):
                    return  # elements that nothing can freeze
                continue
            if not bucket.on_cpu:
                return
            settings.update(name for name, on in (
                ("set_mask", bucket.masked), ("freeze_above", hyper.freeze_above is not None),
                ("freeze_below", hyper.freeze_below is not None)) if on)
        if not settings or (found_inf is not None
                            and (found_inf.device.type != "cpu" or bool(found_inf))):
            return  # a skipped step freezes nothing
        for tensors, hyper, bucket in launches:
            for i, p in enumerate(tensors.params):
                if p.numel() == 0:
                    continue
                free = torch.ones(p.shape, dtype=torch.bool)
                if tensors.masks[i] is not None:
                    free &= tensors.masks[i]
                if hyper.freezes_by_fisher:
                    fisher = tensors.fishers[i]
                    if hyper.freeze_above is not None:
                        free &= ~(fisher > hyper.freeze_above)
                    if hyper.freeze_below is not None:
                        free &= ~(fisher < hyper.freeze_below)
                if bool(free.any()):
                    return
        self._warned.add("frozen")
        warnings.warn(
            f"FisherAdamW: this step froze every element of the optimizer (by "
            f"{', '.join(sorted(settings))}): no param moves. Compare the thresholds with "
            "fisher_quantile(), or check the masks", UserWarning, stacklevel=3)

    # ------------------------------------------------------------ Fisher API

    def _params(self) -> Iterator[Tensor]:
        for group in self.param_groups:
            yield from group["params"]

    def _check_managed(self, p: Tensor, name: str = "p") -> None:
        if not any(p is q for q in self._params()):
            raise ValueError(f"{name} is not a parameter of this optimizer")

    def fisher(self, p: Tensor) -> Tensor:
        """The Fisher estimate of ``p`` (the live state tensor; zeros before any accumulation)."""
        self._check_managed(p)
        state = self.state.get(p, {})
        if "fisher" in state:
            return state["fisher"]
        return _dist.zeros_like_param(p, torch.float32)

    def _fisher_tensors(self) -> list[Tensor]:
        return [self.fisher(p) for p in self._params()]

    def fisher_mean(self) -> float:
        """Mean of the Fisher estimate over every element of every param (one host sync).
        Raises on a negative or NaN Fisher, as :meth:`fisher_quantile` does.

        With DTensor params (FSDP2) the mean is global: every element of every shard counts
        once, and every rank gets the same value (one all-reduce per mesh dimension).
        """
        counter = _dist.GlobalCounter(self._fisher_tensors())
        if counter.numel == 0:
            return 0.0
        _check_fisher_values(counter, counter.devices[0], "fisher_mean")
        total = counter.total(
            lambda t: t.sum(dtype=torch.float64), torch.float64, counter.devices[0]
        )
        return total.item() / counter.numel

    def fisher_quantile(self, q: float) -> float:
        """The ``q``-quantile of the Fisher over every element of every param, with
        ``torch.quantile``'s linear interpolation between order statistics.

        The order statistics are exact fp32 values (an fp64 Fisher is rounded to fp32 first:
        relative error <= 2**-24) and the interpolation is done in float64: the result equals
        ``torch.quantile`` of the fp32 Fisher cast to float64 (to float64 rounding); an fp32
        ``torch.quantile``, which interpolates in fp32, may differ in the last digits. Raises
        on a negative or NaN Fisher (as :meth:`fisher_mean` does) and warns once when the
        Fisher is zero everywhere.

        Computed without concatenating the params (no extra copy of the model): each order
        statistic is found by bisection on the fp32 bit pattern, which orders non-negative
        floats like their values, counting elements below a candidate in one pass per bit.
        With DTensor params (FSDP2) the counts are all-reduced across ranks, so the quantile is
        global and every rank gets the same value.
        """
        if not ops.is_number(q) or not 0.0 <= q <= 1.0:
            raise ValueError(f"Invalid q: {q!r} (must be in [0, 1])")
        counter = _dist.GlobalCounter(
            self._fisher_tensors(), prepare=lambda t: t.float().reshape(-1)
        )
        total = counter.numel
        if total == 0:
            raise ValueError("fisher_quantile: the optimizer manages no elements")
        device = counter.devices[0]
        _check_fisher_values(counter, device, "fisher_quantile")
        if "zero quantile" not in self._warned:
            positive = counter.total(lambda t: (t > 0).sum(), torch.int64, device)
            if not bool(positive > 0):
                self._warned.add("zero quantile")
                warnings.warn(
                    f"fisher_quantile({q}): the Fisher is zero everywhere (no step has "
                    "accumulated it yet, or fisher=None): a mask or freeze threshold taken "
                    "from it freezes all elements or none", UserWarning, stacklevel=2)
        position = q * (total - 1)
        lower = math.floor(position)
        low_value = _kth_smallest(counter, lower, device)
        if lower == position:
            return low_value
        high_value = _kth_smallest(counter, lower + 1, device)
        return low_value + (high_value - low_value) * (position - lower)

    def set_mask(self, p: Tensor, mask: Optional[Tensor]) -> None:
        """Restrict ``p``'s updates to the elements where ``mask`` is True; ``None`` clears it.

        ``mask`` must be a bool tensor shaped like ``p``; it is copied to ``p``'s device. For a
        DTensor ``p`` (FSDP2) the mask is stored sharded like ``p``: pass a DTensor on ``p``'s mesh
        (redistributed if placed differently) or the full mask, the same on every rank, from
        which each rank keeps its own shard.
        """
        self._check_managed(p)
        if mask is None:
            if p in self.state:
                self.state[p].pop("mask", None)
                self._state_changed()
            return
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a torch.Tensor of dtype torch.bool, got {type(mask)}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must have dtype torch.bool, got {mask.dtype}")
        if mask.shape != p.shape:
            raise ValueError(
                f"mask shape {tuple(mask.shape)} does not match the param's {tuple(p.shape)}"
            )
        if mask.device.type == "meta":
            raise ValueError("mask is on the meta device: it holds no values to copy; build the "
                             "mask on a real device (e.g. after materialising the model)")
        self._state_changed()
        if _dist.is_dtensor(p) or _dist.is_dtensor(mask):
            self.state[p]["mask"] = _dist.to_param_layout(p, mask, "mask")
            return
        self.state[p]["mask"] = mask.to(device=p.device).contiguous().clone()

    @contextlib.contextmanager
    def unlearning(self, moments: str = "shared", **overrides: Any) -> Iterator["FisherAdamW"]:
        """Temporarily switch every group to unlearning: ``maximize=True``, Fisher accumulation
        off (``fisher=None``) and the given group overrides (e.g. ``lr``, ``fisher_scale``,
        ``freeze_above``; ``maximize``/``fisher`` override those two defaults too). Everything is
        restored on exit, also after an exception.

        ``moments="separate"`` gives unlearning its own AdamW moments and step counts (kept in
        the state across unlearning phases) so ascent steps do not disturb the learning task's;
        ``"shared"`` (default) uses the same moments.

        Inside a phase: another ``unlearning()`` (nesting), ``add_param_group()`` and
        ``load_state_dict()`` raise ``RuntimeError`` with nothing changed; ``state_dict()`` saves
        the learning settings and the learning moments (and the unlearning moments as
        ``unlearn_*``, as outside a phase), nothing of the phase: resuming from it continues as
        if the phase had just ended.
        """
        self._refuse_in_phase("unlearning()", "nested phases are not supported; exit the first")
        if moments not in ("shared", "separate"):
            raise ValueError(f"Invalid moments: {moments!r} (must be 'shared' or 'separate')")
        unknown = set(overrides) - set(_GROUP_KEYS)
        if unknown:
            raise ValueError(f"unlearning() got unknown group settings: {sorted(unknown)}")
        settings = dict(maximize=True, fisher=None)
        settings.update(overrides)
        saved = [{k: g[k] for k in _GROUP_KEYS} for g in self.param_groups]
        candidates = []
        for group in self.param_groups:
            candidate = dict(group)
            candidate.update(settings)
            _normalize_group(candidate)  # all checked before any group changes
            candidates.append(candidate)
        for group, candidate in zip(self.param_groups, candidates):
            group.update({k: candidate[k] for k in _GROUP_KEYS})
        if moments == "separate":
            self._swap_unlearning_moments()
        self._phase = dict(saved=saved, moments=moments)
        try:
            yield self
        finally:
            self._phase = None
            if moments == "separate":
                self._swap_unlearning_moments()
            for group, old in zip(self.param_groups, saved):
                group.update(old)

    def _refuse_in_phase(self, what: str, advice: str) -> None:
        if self._phase is not None:
            raise RuntimeError(f"{what} inside opt.unlearning(): {advice}")

    def _swap_unlearning_moments(self) -> None:
        self._state_changed()
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state is not None:
                    swapped = _swapped_moments(state)
                    state.clear()
                    state.update(swapped)

    # ------------------------------------------------------------ state dict

    def state_dict(self) -> dict[str, Any]:
        """The base class's state dict, with the group dtypes (``state_dtype``,
        ``fisher_dtype``) saved by name (``"float32"``): a state dict of tensors, numbers and
        strings only, which ``torch.distributed.checkpoint``'s full-state-dict gathering requires
        (it rejects ``torch.dtype`` values). :meth:`load_state_dict` reads names and dtypes."""
        state_dict = super().state_dict()
        if self._phase is not None:
            # Inside unlearning(): save what the phase's exit restores, so a resumed run
            # continues as if the phase had just ended (never stays in unlearning mode).
            for group, learning in zip(state_dict["param_groups"], self._phase["saved"]):
                group.update(learning)
            if self._phase["moments"] == "separate":
                state_dict["state"] = {pid: _swapped_moments(pstate)
                                       for pid, pstate in state_dict["state"].items()}
        for group in state_dict["param_groups"]:
            if group["amsgrad"]:
                # amsgrad switched on after the last step: the max_exp_avg_sq the next step
                # creates as zeros is saved as such, so the state is complete for loading.
                for pid in group["params"]:
                    pstate = state_dict["state"].get(pid)
                    if pstate and "step" in pstate and "max_exp_avg_sq" not in pstate:
                        state_dict["state"][pid] = dict(
                            pstate, max_exp_avg_sq=torch.zeros_like(pstate["exp_avg_sq"]))
        for group in state_dict["param_groups"]:
            # A value set later (e.g. a numpy scalar from a schedule) is saved as a plain number.
            _normalize_group(group)
            for key in _DTYPE_KEYS:
                if isinstance(group.get(key), torch.dtype):
                    group[key] = str(group[key]).removeprefix("torch.")
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``FisherAdamW`` state dict, keeping every state tensor's saved dtype (the base
        class would cast fp32 moments and the Fisher to a bf16 param's dtype, and a bool mask to
        float). Validates everything first; on error nothing changes. Each group keeps this
        optimizer's ``backend`` (a checkpoint saved with ``backend="cuda"`` on a GPU machine
        loads on a CPU one).

        For DTensor params (FSDP2) every shaped state tensor is laid out like its param: a
        DTensor is redistributed when placed differently, a full plain tensor is cut into this
        rank's shard (as ``torch.distributed.checkpoint.state_dict.set_optimizer_state_dict``
        and ``torch.distributed.checkpoint.load`` use it)."""
        self._refuse_in_phase("load_state_dict()", "load outside the phase")
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError("state_dict must be a dict with 'state' and 'param_groups'")
        saved_groups = [_dtypes_from_names(g) for g in state_dict["param_groups"]]
        for saved, group in zip(saved_groups, self.param_groups):
            if isinstance(saved, dict) and saved.get("backend") in backends.BACKEND_CHOICES:
                # The backend is an implementation choice of this machine, not state: a
                # checkpoint saved with backend="cuda" loads where there is no GPU, with the
                # backend this optimizer was built with (a name that is no backend at all is
                # still refused below).
                saved["backend"] = group["backend"]
        for gi, saved in enumerate(saved_groups):
            missing = [k for k in _GROUP_KEYS if k not in saved]
            if missing:
                raise ValueError(
                    f"state_dict was not produced by FisherAdamW: param group {gi} lacks "
                    f"{missing} (a torch.optim.AdamW/Adam state dict: load "
                    "FisherAdamW.from_torch_state_dict(state_dict))"
                )
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"state_dict has {len(saved_groups)} param groups, this optimizer "
                f"{len(self.param_groups)}"
            )
        id_map: dict[int, Tensor] = {}
        where_of: dict[int, tuple[str, dict[str, Any]]] = {}
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"state_dict param group {gi} has {len(saved['params'])} params, this "
                    f"optimizer's {len(group['params'])}: a different parameter layout"
                )
            id_map.update(zip(saved["params"], group["params"]))
            for pi, pid in enumerate(saved["params"]):
                where_of[pid] = (f"param {pi} of group {gi} (state id {pid})", saved)
            _normalize_group(saved)  # a copy: written back as plain numbers
            self._check_backend_runs(gi, saved, group["params"])
        tensors: dict[int, dict[str, Tensor]] = {}
        for pid, pstate in state_dict["state"].items():
            if pid not in id_map:
                raise ValueError(f"state_dict holds state for unknown param id {pid}")
            where, saved = where_of[pid]
            tensors[pid] = _checked_param_state(pstate, id_map[pid], saved, where)
        stripped = dict(state_dict)
        stripped["param_groups"] = saved_groups
        stripped["state"] = {pid: {} for pid in state_dict["state"]}  # every entry is a tensor
        converted: dict[int, dict[str, Tensor]] = {}
        for pid, values in tensors.items():
            p = id_map[pid]
            converted[pid] = {
                key: (
                    _dist.to_param_layout(p, value, f"state_dict state {key!r} of param id {pid}")
                    if value.dim() > 0 and (_dist.is_dtensor(p) or _dist.is_dtensor(value))
                    else value.to(device=p.device, copy=True)
                )
                for key, value in values.items()
            }
        self._state_changed()
        super().load_state_dict(stripped)
        for pid, values in converted.items():
            self.state[id_map[pid]].update(values)
        for group in self.param_groups:
            if isinstance(group["betas"], list):
                group["betas"] = tuple(group["betas"])

    @classmethod
    def from_torch_state_dict(cls, state_dict: dict[str, Any], **settings: Any) -> dict[str, Any]:
        """Migrate a ``torch.optim.AdamW`` (or ``Adam`` without L2 weight decay) state dict into
        a ``FisherAdamW`` one, for :meth:`load_state_dict`::

            opt = FisherAdamW(model.parameters(), fisher=None)
            opt.load_state_dict(FisherAdamW.from_torch_state_dict(torch_sd, fisher=None))

        Kept: ``step``/``exp_avg``/``exp_avg_sq``/``max_exp_avg_sq`` and the group keys ``lr``,
        ``betas``, ``eps``, ``weight_decay``, ``amsgrad``, ``maximize`` (and any other key, e.g.
        a scheduler's ``initial_lr``); dropped: torch's implementation switches (``foreach``,
        ``fused``, ``capturable``, ``differentiable``, ``decoupled_weight_decay``). The
        FisherAdamW settings (``fisher``, ``fisher_scale``, ...) are ``settings``, else the
        constructor's defaults: a loaded state dict sets the groups, so pass the ones you
        construct with. fp16 moments become fp32 (the state dtypes are fp32/bf16). Integer
        step counts (older torch) become fp32 tensors. ``Adam`` with ``weight_decay != 0`` (L2,
        coupled) is refused: no FisherAdamW setting reproduces it.
        """
        # The constructor's own defaults for the keyword-only FisherAdamW settings.
        defaults = {name: param.default
                    for name, param in inspect.signature(cls.__init__).parameters.items()
                    if param.kind is inspect.Parameter.KEYWORD_ONLY}
        unknown = set(settings) - set(defaults)
        if unknown:
            raise ValueError(f"from_torch_state_dict: unknown FisherAdamW settings "
                             f"{sorted(unknown)} (the others come from the state dict)")
        defaults.update(settings)
        for key, value in list(defaults.items()):
            if isinstance(value, torch.dtype):
                defaults[key] = str(value).removeprefix("torch.")
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError("state_dict must be a dict with 'state' and 'param_groups'")
        groups = []
        for gi, saved in enumerate(state_dict["param_groups"]):
            torch_keys = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize")
            missing = [k for k in torch_keys + ("params",) if k not in saved]
            if missing:
                raise ValueError(f"from_torch_state_dict: param group {gi} lacks {missing} "
                                 "(not an AdamW/Adam state dict)")
            if saved.get("decoupled_weight_decay") is False and saved["weight_decay"] != 0:
                raise ValueError(
                    f"from_torch_state_dict: param group {gi} is torch.optim.Adam with "
                    f"weight_decay={saved['weight_decay']} (L2, added to the gradient); "
                    "FisherAdamW decays decoupled, as AdamW, and cannot continue it")
            group = {k: v for k, v in saved.items() if k not in _TORCH_ONLY_GROUP_KEYS}
            group.update(defaults)
            groups.append(group)
        state = {}
        for pid, pstate in state_dict["state"].items():
            moved = {}
            for key, value in pstate.items():
                if (isinstance(value, Tensor) and key != "step"
                        and value.dtype == torch.float16):
                    value = value.float()
                moved[key] = value
            state[pid] = moved
        return {"state": state, "param_groups": groups}


_TORCH_ONLY_GROUP_KEYS = ("foreach", "fused", "capturable", "differentiable",
                          "decoupled_weight_decay")
_COUNT_KEYS = ("step", "fisher_count", "unlearn_step")
_SHAPED_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "fisher", "unlearn_exp_avg",
                "unlearn_exp_avg_sq", "unlearn_max_exp_avg_sq", "mask")
# Entries that are >= 0 by construction; a negative (or NaN) one would give NaN params.
_NONNEG_KEYS = ("exp_avg_sq", "max_exp_avg_sq", "fisher", "unlearn_exp_avg_sq",
                "unlearn_max_exp_avg_sq")
# Entries that come together: the first needs every other (what one step creates).
_TOGETHER = (
    ("step", "exp_avg", "exp_avg_sq"),
    ("fisher", "fisher_count"),
    ("fisher_count", "fisher"),
    ("unlearn_step", "unlearn_exp_avg", "unlearn_exp_avg_sq"),
)


def _checked_param_state(pstate: Any, p: Tensor, group: dict[str, Any],
                         where: str) -> dict[str, Tensor]:
    """One param's saved state, validated against ``p`` and its (saved) group: keys, types,
    dtypes, shapes and the value ranges that cost nothing to check (plain CPU tensors). Counts
    given as numbers or integer tensors (older torch checkpoints) become 0-dim fp32 tensors.
    Returns the entries to load; raises naming ``where`` and the key; changes nothing."""

    def bad(key: str, problem: str) -> ValueError:
        return ValueError(f"state_dict: {key!r} of {where} {problem}")

    if not isinstance(pstate, dict):
        raise ValueError(f"state_dict: the state of {where} is a {type(pstate).__name__}, "
                         "not a dict")
    unknown = sorted(set(pstate) - set(_COUNT_KEYS) - set(_SHAPED_KEYS), key=str)
    if unknown:
        raise ValueError(f"state_dict: the state of {where} has unknown entries {unknown} "
                         "(not a FisherAdamW state)")
    needs = list(_TOGETHER)
    if group["amsgrad"]:  # (state_dict() saves the zeros of amsgrad switched on after a step)
        needs.append(("step", "max_exp_avg_sq"))
    for first, *others in needs:
        for other in others:
            if first in pstate and other not in pstate:
                raise bad(other, f"is missing (the state has {first!r})")
    # Learning moments need their step count, unlearning moments theirs; a state may hold
    # either set alone (e.g. only unlearn_* after an early unlearning phase), and a Fisher
    # without either (made by an early unlearning phase that scales or freezes by it).
    for count, keys in (("step", ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")),
                        ("unlearn_step", ("unlearn_exp_avg", "unlearn_exp_avg_sq",
                                          "unlearn_max_exp_avg_sq"))):
        present = [k for k in keys if k in pstate]
        if present and count not in pstate:
            raise bad(count, f"is missing (the state has {present[0]!r})")
    wide = p.dtype == torch.float64
    out: dict[str, Tensor] = {}
    for key, value in pstate.items():
        if key in _COUNT_KEYS:
            if ops.is_number(value):
                value = torch.tensor(float(value), dtype=torch.float32)
            elif not isinstance(value, Tensor) or value.numel() != 1 or value.dim() != 0:
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise bad(key, f"must be a number or a 0-dim tensor, got {shape}")
            elif value.dtype == torch.bool or value.is_complex():
                raise bad(key, f"must be a real count, got dtype {value.dtype}")
            else:
                value = value.to(torch.float32) if value.dtype != torch.float32 else value
            if value.device.type == "cpu":
                count = float(value)
                if not math.isfinite(count) or count < 0 or count != int(count):
                    raise bad(key, f"is {count}: must be a whole number >= 0")
            out[key] = value
            continue
        if not isinstance(value, Tensor):
            raise bad(key, f"must be a tensor, got {type(value).__name__}")
        if tuple(value.shape) != tuple(p.shape):
            raise bad(key, f"has shape {tuple(value.shape)}, the param {tuple(p.shape)}: a "
                      "different parameter layout")
        if key == "mask":
            if value.dtype != torch.bool:
                raise bad(key, f"must have dtype torch.bool, got {value.dtype}")
        elif value.dtype not in ((torch.float64,) if wide else _STATE_DTYPES):
            allowed = "torch.float64 (a float64 param)" if wide else \
                "torch.float32 or torch.bfloat16"
            raise bad(key, f"has dtype {value.dtype}; must be {allowed}")
        elif (key in _NONNEG_KEYS and value.device.type == "cpu" and not _dist.is_dtensor(value)
              and not bool((value >= 0).all())):
            raise bad(key, "has negative or NaN entries (it is a sum of squares)")
        out[key] = value
    return out


def _check_fisher_values(counter: _dist.GlobalCounter, device: torch.device, name: str) -> None:
    # Counted globally so that every rank raises (or none does) and no collective hangs.
    bad = counter.total(lambda t: ((t < 0) | t.isnan()).sum(), torch.int64, device)
    if bool(bad > 0):
        raise ValueError(f"{name}: the Fisher has negative or NaN entries")


def _kth_smallest(counter: _dist.GlobalCounter, k: int, device: torch.device) -> float:
    """The ``k``-th smallest (0-based) value over the non-negative fp32 tensors of ``counter``,
    exactly.

    Bisection over the int32 bit pattern (monotone in the value for non-negative floats): the
    answer is the smallest pattern ``x`` with ``count(t <= x) > k``. 32 passes, all on the device;
    with DTensors each pass all-reduces its count across ranks.
    """
    lo = torch.zeros((), dtype=torch.int64, device=device)
    hi = torch.full((), 0x7F800000, dtype=torch.int64, device=device)  # +inf
    for _ in range(32):
        mid = (lo + hi) // 2
        count = counter.total(
            lambda t: (t.view(torch.int32) <= mid.to(t.device, torch.int32)).sum(),
            torch.int64, device,
        )
        below = count > k
        hi = torch.where(below, mid, hi)
        lo = torch.where(below, lo, mid + 1)
    value = hi.to(torch.int32).view(torch.float32)
    return float(value.item())
