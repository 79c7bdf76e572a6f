"""The op contract: every op is declared once here and implemented by each backend.

The math of the three ops is stated once, here (and in ``docs/design.md``, which adds the why).

``fused_step(tensors, hyper, grad_scale, found_inf)``
    One Fisher-AdamW step, in place, over the lists of :class:`StepTensors` with the
    hyperparameters of one :class:`StepHyper`. Per element, in fp32 (fp64 for fp64 params)::

        if found_inf: nothing changes (params, moments, Fisher, steps, counts)
        g = grad / grad_scale;  if maximize: g = -g
        t = step + 1                                   (``steps[i]`` is incremented in place)
        F = a*F + b*g^2  when fisher_mode is set:      ema  (fisher_beta, 1 - fisher_beta)
                                                       mean ((n-1)/n, 1/n), n = count + 1
                                                       sum  (1, 1)
        frozen = ~mask | F > freeze_above | F < freeze_below        (each only when set)
        frozen elements keep p, m, v, vmax; the others get
        p = p * (1 - lr*weight_decay)
        m = beta1*m + (1-beta1)*g                      (computed as lerp, as torch.optim.AdamW)
        v = beta2*v + (1-beta2)*g^2
        vmax = max(vmax, v)                            (amsgrad; the denominator then uses vmax)
        p = p - lr/(1-beta1^t) * m / (sqrt(v)/sqrt(1-beta2^t) + eps) / (1 + fisher_scale*F)

    The bias corrections are computed in float64 from the per-tensor step count; params of a
    low-precision dtype are rounded once, when stored. A bf16 Fisher that accumulates is stored
    with stochastic rounding (unbiased; the random bits hash the tensor's Fisher count after the
    step and the element's index, the same on every backend: ``docs/design.md``). With
    ``fisher_mode=None``, no mask, no thresholds and ``fisher_scale=0`` this is
    ``torch.optim.AdamW``'s step (to rounding).
``fisher_accumulate(fishers, grads, alpha, beta, grad_scale)``
    ``F = alpha * F + beta * (g / grad_scale)^2`` in fp32, in place, over many tensors.
``fisher_score(directions, grads, fishers)``
    ``[sum_i d_i * g_i, sum_i F_i * g_i^2]`` over many tensors in one pass, as a float64 tensor of
    shape ``(2,)`` on the tensors' device: the first- and second-order terms of the forgetting
    confidence (``docs/design.md``). Deterministic for a given input on every backend.

**Backends.** Each backend module (``fisherforget/backends/``) registers its implementations with
:func:`register`; ``backend=`` names one and :mod:`fisherforget.backends` resolves ``"auto"``. The
``reference`` backend (pure PyTorch, any device) is the ground truth every other backend is tested
against. Backends receive validated input: the checks of this module run first (set-level, one
pass per list; a message is built only when something is wrong), and hyperparameters are
validated when a :class:`StepHyper` is built, so a backend does no per-tensor validation.

**Dispatch.** Every call goes through :func:`_dispatch`, which picks the registered
implementation. Under ``torch.compile`` the same implementation is reached through the custom op
``torch.ops.fisherforget.<op>`` (schema generated from :class:`StepHyper`, fake kernel for tracing)
so a graph can hold a kernel it cannot trace; eagerly the custom-op boundary is skipped because
converting the tensor lists costs ~1.5 us per tensor (3 ms for 2,000 params, measured), more than
the kernels of such a step.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = [
    "OPS",
    "FISHER_MODES",
    "StepHyper",
    "StepTensors",
    "register",
    "get_impl",
    "registered_backends",
    "fused_step",
    "fisher_accumulate",
    "fisher_score",
    "check_step_tensors",
    "check_scalar_arg",
    "register_check",
    "preflight_fused_step",
    "fused_step_schema",
]

OPS = ("fused_step", "fisher_accumulate", "fisher_score")
FISHER_MODES = ("ema", "mean", "sum", None)


# --------------------------------------------------------------------------- the step contract


def _hyper(schema: str, default=dataclasses.MISSING):
    """A StepHyper field and its custom-op schema type (the one place both are declared)."""
    return field(default=default, metadata={"schema": schema})


# Error messages name a field as the optimizer's param group does (betas[0], not beta1), so a
# user who set the group value reads the name they wrote.
_LABELS = {"beta1": "betas[0]", "beta2": "betas[1]", "fisher_mode": "fisher"}


@dataclass(frozen=True)
class StepHyper:
    """The hyperparameters of one ``fused_step`` call: one frozen value, validated when built.

    Every field is a runtime kernel argument (never a compile-time constant). ``lr`` is a float
    or a 0-dim floating tensor, read on the device (no host sync); a low-precision tensor lr is
    widened to fp32 (a bf16 ``1 - 1e-5`` is 1.0, which would drop weight decay). The math is in
    this module's docstring. Adding a hyperparameter means a field here, its use in each kernel
    and in the float64 oracle of the tests; the custom-op schemas are generated from these fields.
    """

    lr: Union[float, Tensor] = _hyper("float|Tensor")
    beta1: float = _hyper("float", 0.9)
    beta2: float = _hyper("float", 0.999)
    eps: float = _hyper("float", 1e-8)
    weight_decay: float = _hyper("float", 0.0)
    amsgrad: bool = _hyper("bool", False)
    maximize: bool = _hyper("bool", False)
    fisher_mode: Optional[str] = _hyper("str?", None)
    fisher_beta: float = _hyper("float", 0.99)
    fisher_scale: float = _hyper("float", 0.0)
    freeze_above: Optional[float] = _hyper("float?", None)
    freeze_below: Optional[float] = _hyper("float?", None)

    def __post_init__(self) -> None:
        for name, value in _validated_hyper(self).items():
            object.__setattr__(self, name, value)

    @property
    def uses_fisher(self) -> bool:
        """Whether the step reads a Fisher (accumulates it, scales by it or freezes by it)."""
        return (self.fisher_mode is not None or self.fisher_scale != 0
                or self.freeze_above is not None or self.freeze_below is not None)

    @property
    def freezes_by_fisher(self) -> bool:
        return self.freeze_above is not None or self.freeze_below is not None

    def replace(self, **changes) -> "StepHyper":
        return dataclasses.replace(self, **changes)

    def op_kwargs(self) -> dict:
        """The fields as custom-op keyword arguments (a tensor lr travels as ``lr_tensor``)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        lr = values.pop("lr")
        is_tensor = isinstance(lr, Tensor)
        return dict(lr=0.0 if is_tensor else lr, lr_tensor=lr if is_tensor else None, **values)

    def op_args(self) -> tuple:
        """The same values positionally, in schema order (``lr``, ``lr_tensor``, the other
        fields): the arguments the extension's Python entry points take after the lists."""
        lr = self.lr
        if isinstance(lr, Tensor):
            lr, lr_tensor = 0.0, lr
        else:
            lr_tensor = None
        return (lr, lr_tensor) + tuple(getattr(self, name) for name in _FIELDS_AFTER_LR)

    @classmethod
    def from_op_kwargs(cls, lr: float, lr_tensor: Optional[Tensor], **values) -> "StepHyper":
        return cls(lr=lr if lr_tensor is None else lr_tensor, **values)


_FIELDS_AFTER_LR = tuple(f.name for f in dataclasses.fields(StepHyper))[1:]


def is_number(x) -> bool:
    """A real number that is not a bool (numpy scalars included)."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _validated_hyper(h: StepHyper) -> dict:
    """Check every field of ``h``; return plain-Python replacements (numpy scalars become floats,
    so a state dict holding them stays loadable with ``weights_only=True``)."""
    out = {}

    def bad(name, value, why, kind=ValueError):
        raise kind(f"Invalid {_LABELS.get(name, name)}: {value!r} ({why})")

    lr = h.lr
    if isinstance(lr, Tensor):
        if lr.dim() != 0:
            raise ValueError(f"Invalid lr: a tensor lr must be 0-dim, got shape {tuple(lr.shape)}")
        if not lr.is_floating_point():
            raise TypeError(f"Invalid lr: a tensor lr must be floating point, got {lr.dtype}")
        # Reading a device tensor would synchronise (and break a compiled graph): check the
        # value only where that is free.
        if lr.device.type == "cpu" and not torch.compiler.is_compiling():
            value = float(lr)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"Invalid lr: {value} (must be a finite number >= 0)")
    elif not is_number(lr) or not math.isfinite(lr) or lr < 0:
        bad("lr", lr, "must be a finite number >= 0")
    else:
        out["lr"] = float(lr)
    for name in ("beta1", "beta2", "fisher_beta"):
        value = getattr(h, name)
        if isinstance(value, Tensor):
            kind = "betas" if name in _LABELS else name
            raise TypeError(f"Invalid {_LABELS.get(name, name)}: tensor {kind} are not "
                            "supported, pass floats")
        if not is_number(value) or not 0.0 <= value < 1.0:
            bad(name, value, "must be in [0, 1)")
        out[name] = float(value)
    for name in ("eps", "weight_decay", "fisher_scale"):
        value = getattr(h, name)
        if not is_number(value) or not math.isfinite(value) or value < 0:
            bad(name, value, "must be a finite number >= 0")
        out[name] = float(value)
    for name in ("amsgrad", "maximize"):
        if not isinstance(getattr(h, name), bool):
            bad(name, getattr(h, name), "must be a bool", TypeError)
    if h.fisher_mode not in FISHER_MODES:
        bad("fisher_mode", h.fisher_mode, "must be one of 'ema', 'mean', 'sum', None")
    for name, everything in (("freeze_above", -math.inf), ("freeze_below", math.inf)):
        value = getattr(h, name)
        if value is None:
            continue
        if not is_number(value) or math.isnan(value):
            bad(name, value, "must be None or a number")
        if value == everything:
            bad(name, value, "it would freeze every element")
        out[name] = float(value)
    above, below = out.get("freeze_above"), out.get("freeze_below")
    if above is not None and below is not None and above < below:
        raise ValueError(
            f"Invalid freeze_above: {above!r} < freeze_below {below!r}: every element would be "
            "frozen (an element is frozen when F > freeze_above or F < freeze_below)")
    return out


class StepTensors(NamedTuple):
    """The tensor lists of one ``fused_step`` call (element ``i`` of each belongs to param ``i``).

    ``max_exp_avg_sqs`` is empty unless ``amsgrad``; ``fishers`` is empty unless the step uses the
    Fisher; ``fisher_counts`` (0-dim fp32, accumulations so far) is empty unless it accumulates;
    ``masks`` holds ``None`` or a bool tensor (True = update) per param; ``steps`` are 0-dim fp32
    step counts on the params' device.
    """

    params: Sequence[Tensor]
    grads: Sequence[Tensor]
    exp_avgs: Sequence[Tensor]
    exp_avg_sqs: Sequence[Tensor]
    max_exp_avg_sqs: Sequence[Tensor]
    fishers: Sequence[Tensor]
    masks: Sequence[Optional[Tensor]]
    steps: Sequence[Tensor]
    fisher_counts: Sequence[Tensor]


_MUTATED = ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "fishers", "steps",
            "fisher_counts")


def fused_step_schema(namespace: str, *, backend_arg: bool) -> str:
    """The custom-op schema of ``fused_step``, generated from :class:`StepTensors` and
    :class:`StepHyper`. ``fisherforget::fused_step`` (``backend_arg=True``) and the compiled
    extension's ``fisherforget_C::fused_step`` both follow it (a test compares them)."""
    tensors, letters = [], iter("abcdefghijklmnop")
    for name in StepTensors._fields:
        if name == "masks":
            tensors.append(f"Tensor?[] {name}")
        elif name in _MUTATED:
            tensors.append(f"Tensor({next(letters)}!)[] {name}")
        else:
            tensors.append(f"Tensor[] {name}")
    scalars = []
    for f in dataclasses.fields(StepHyper):
        kind = f.metadata["schema"]
        if kind == "float|Tensor":
            scalars += [f"float {f.name}", f"Tensor? {f.name}_tensor"]
        else:
            scalars.append(f"{kind} {f.name}")
    scalars += ["Tensor? grad_scale", "Tensor? found_inf"] + (["str backend"] if backend_arg else [])
    return f"{namespace}::fused_step({', '.join(tensors)}, *, {', '.join(scalars)}) -> ()"


# --------------------------------------------------------------------------- registry


# op name -> backend name -> implementation
_IMPLS: dict[str, dict[str, Callable]] = {op: {} for op in OPS}


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator registering ``fn`` as ``backend``'s implementation of ``op``."""
    if op not in _IMPLS:
        raise ValueError(f"unknown op {op!r}; the ops are {OPS}")

    def decorator(fn: Callable) -> Callable:
        _IMPLS[op][backend] = fn
        return fn

    return decorator


# op name -> backend name -> a check run before any launch of a step (see preflight_fused_step)
_CHECKS: dict[str, dict[str, Callable]] = {op: {} for op in OPS}


def register_check(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator registering what ``backend`` must verify before ``op`` runs (e.g. dtypes its
    kernels support). It takes the op's arguments and raises on input it cannot run; it must
    not write anything."""
    if op not in _CHECKS:
        raise ValueError(f"unknown op {op!r}; the ops are {OPS}")

    def decorator(fn: Callable) -> Callable:
        _CHECKS[op][backend] = fn
        return fn

    return decorator


def entry_error(error_type: type, name: str, index: int, problem: str) -> Exception:
    """An error about entry ``index`` of the step's list ``name``: the message reads
    ``"{name}[{index}] {problem}"`` and the exception carries ``step_entry = (name, index)``, by
    which the optimizer names the param (a launch's index is not the group's)."""
    error = error_type(f"{name}[{index}] {problem}")
    error.step_entry = (name, index)
    return error


def preflight_fused_step(tensors: StepTensors, hyper: StepHyper, backend: str) -> None:
    """Run ``backend``'s registered check of one ``fused_step`` call. The optimizer runs it for
    every launch of a step before the first launch, so a backend refusing its second bucket
    leaves the first unchanged."""
    get_impl("fused_step", backend)  # loads the backend module, which registers its check
    check_writable(tensors)
    check = _CHECKS["fused_step"].get(backend)
    if check is not None:
        check(tensors, hyper)


_WRITTEN = ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "fishers", "steps",
            "fisher_counts")


def check_writable(tensors: StepTensors) -> None:
    """Every tensor a step writes can be written element by element, on every backend: none
    overlaps itself (an ``expand``-ed view: a kernel's write-back would fail, or race, midway)
    and no two entries share their memory (a duplicated param or step tensor: one update
    would overwrite the other). Raises naming the list and index; part of the preflight, so
    nothing is written when it fails."""
    _check_written([(name, getattr(tensors, name)) for name in _WRITTEN])


def _check_written(lists: Sequence[tuple[str, Sequence[Optional[Tensor]]]]) -> None:
    """:func:`check_writable` over named lists of tensors an op writes."""
    if torch.compiler.is_compiling():
        return  # checked eagerly; a traced step takes the same tensors (and cannot trace this)
    seen: dict[tuple, str] = {}
    for name, values in lists:
        for i, t in enumerate(values):
            if t is None or t.numel() == 0 or t.device.type == "meta":  # meta: no memory
                continue
            if t.numel() > 1 and torch._debug_has_internal_overlap(t) == 1:
                raise entry_error(
                    ValueError, name, i, f"(shape {tuple(t.shape)}, stride {t.stride()}) "
                    "overlaps itself (e.g. an expand()-ed view): a step cannot write it element "
                    "by element; pass a tensor that owns its elements (.contiguous() or .clone())")
            where = f"{name}[{i}]"
            first = seen.setdefault((t.device, t.data_ptr()), where)
            if first != where:
                raise entry_error(
                    ValueError, name, i, f"shares its memory with {first}: a step would write "
                    "both and lose one update; give each entry its own tensor (a param listed "
                    "twice, or one step tensor for two params)")


def registered_backends(op: str) -> list[str]:
    return sorted(_IMPLS[op])


def get_impl(op: str, backend: str) -> Callable:
    impl = _IMPLS[op].get(backend)
    if impl is not None:  # registered: no import machinery (which torch.compile cannot trace)
        return impl
    # Importing the backend module registers its ops; lazy, so that a missing Triton or an
    # unbuilt extension costs nothing until it is asked for.
    from fisherforget import backends

    backends.load(backend)
    try:
        return _IMPLS[op][backend]
    except KeyError:
        raise RuntimeError(
            f"backend {backend!r} does not implement op {op!r} "
            f"(implemented by: {registered_backends(op)})"
        ) from None


def _through_custom_op(backend: str) -> bool:
    # The reference is plain PyTorch: traced (and fused by Inductor) like any other code.
    return backend != "reference" and torch.compiler.is_compiling()


# --------------------------------------------------------------------------- the ops


def fused_step(
    tensors: StepTensors,
    hyper: StepHyper,
    *,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
    backend: str = "reference",
) -> None:
    """One Fisher-AdamW step, in place, over every tensor of ``tensors`` (math: module docstring).

    ``grad_scale``/``found_inf`` are 0-dim float tensors from a GradScaler, or ``None``. Every
    list is checked (:func:`check_step_tensors`) before anything is written.
    """
    tensors = StepTensors(*tensors)
    check_step_tensors(tensors, hyper, grad_scale, found_inf)
    preflight_fused_step(tensors, hyper, backend)
    dispatch_fused_step(tensors, hyper, grad_scale, found_inf, backend)


def dispatch_fused_step(tensors: StepTensors, hyper: StepHyper, grad_scale: Optional[Tensor],
                        found_inf: Optional[Tensor], backend: str) -> None:
    """``fused_step`` without the checks, for callers that have checked (the optimizer checks
    the only lists that change between its steps, the gradients)."""
    if _through_custom_op(backend):
        torch.ops.fisherforget.fused_step(
            *map(list, tensors), **hyper.op_kwargs(), grad_scale=grad_scale,
            found_inf=found_inf, backend=backend,
        )
        return
    get_impl("fused_step", backend)(tensors, hyper, grad_scale, found_inf)
    # Kernels write through data pointers, which autograd does not see: bump the params'
    # version counters as torch's fused step does, so that a step between a forward and its
    # backward is caught ("modified by an inplace operation"). fisherforget._C.fused_step
    # (backend "cpu") bumps them in C++ (a Python-level bump of 2,000 params costs ~80 us).
    if backend != "cpu":
        torch._C._increment_version(tensors.params)


def fisher_accumulate(
    fishers: Sequence[Tensor],
    grads: Sequence[Tensor],
    *,
    alpha: float,
    beta: float,
    grad_scale: Optional[Tensor] = None,
    backend: str = "reference",
) -> None:
    """In place, for every pair: ``F = alpha * F + beta * (g / grad_scale)^2`` in fp32.

    ``alpha``/``beta`` are the estimator's weights: (1, 1) sums squared gradients, (n-1)/n and 1/n
    keep a running mean, ``(beta, 1 - beta)`` an exponential moving average.
    """
    _check_like_lists("fishers", fishers, {"grads": grads})
    check_scalar_arg("grad_scale", grad_scale)
    for name, value in (("alpha", alpha), ("beta", beta)):
        if not is_number(value) or not math.isfinite(value):
            raise ValueError(f"Invalid {name}: {value!r} (must be a finite number)")
    _check_written([("fishers", fishers)])  # an entry given twice would lose an accumulation
    if _through_custom_op(backend):
        torch.ops.fisherforget.fisher_accumulate(
            list(fishers), list(grads), grad_scale, alpha=float(alpha), beta=float(beta),
            backend=backend,
        )
        return
    get_impl("fisher_accumulate", backend)(
        fishers, grads, alpha=float(alpha), beta=float(beta), grad_scale=grad_scale
    )
    torch._C._increment_version(list(fishers))  # written through data pointers, as fused_step


def fisher_score(
    directions: Sequence[Tensor],
    grads: Sequence[Tensor],
    fishers: Sequence[Tensor],
    *,
    backend: str = "reference",
) -> Tensor:
    """Return ``torch.tensor([sum <d_i, g_i>, sum <F_i, g_i^2>], dtype=float64)`` in one pass.

    With ``d`` the learning-task gradient, ``g`` a sample's gradient and ``F`` the learning-task
    Fisher these are the first- and second-order terms of the forgetting confidence
    (``docs/design.md``). All tensors must be on one device. Deterministic on every backend.
    """
    _check_like_lists("grads", grads, {"directions": directions, "fishers": fishers})
    devices = {g.device for g in grads}
    if len(devices) > 1:
        first = grads[0].device
        i = next(i for i, g in enumerate(grads) if g.device != first)
        raise ValueError(f"grads[{i}] is on {grads[i].device}, grads[0] on {first}: use one device")
    if _through_custom_op(backend):
        return torch.ops.fisherforget.fisher_score(
            list(directions), list(grads), list(fishers), backend=backend
        )
    return get_impl("fisher_score", backend)(directions, grads, fishers)


# --------------------------------------------------------------------------- checks
# Set-level: one comprehension per list (a step may carry thousands of tensors); only when one
# fails is the list walked to name the first offender, so the success path builds no strings.

_STRIDED = {torch.strided}


def _first_bad(name: str, values: Sequence, params: Sequence[Tensor], ok) -> None:
    for i, (t, p) in enumerate(zip(values, params)):
        problem = ok(t, p)
        if problem:
            raise (TypeError if "must be" in problem else ValueError)(f"{name}[{i}] {problem}")


def _like_problem(t, p, floating: bool = True) -> Optional[str]:
    if not isinstance(t, Tensor):
        return f"must be a torch.Tensor, got {type(t).__name__}"
    if t.layout != torch.strided:
        return f"must be a dense (strided) tensor, got layout {t.layout}"
    if floating and not t.is_floating_point():
        return f"must be a floating-point tensor, got {t.dtype}"
    if t.shape != p.shape:
        return f"has shape {tuple(t.shape)}, its param {tuple(p.shape)}"
    if t.device != p.device:
        return f"is on {t.device}, its param on {p.device}"
    return None


def _check_like_lists(first_name: str, first: Sequence[Tensor], others: dict) -> None:
    """``first`` holds dense floating tensors; each list of ``others`` matches it in length,
    shape and device, element by element."""
    n = len(first)
    for name, values in others.items():
        if len(values) != n:
            raise ValueError(f"{name} has {len(values)} entries, {first_name} {n}: they must match")
    try:
        ok = ({t.layout for t in first} <= _STRIDED
              and all(t.is_floating_point() for t in first))
    except AttributeError:  # not a tensor: named below
        ok = False
    if not ok:
        _first_bad(first_name, first, first, lambda t, _: _like_problem(t, t))
    shapes = [t.shape for t in first]
    devices = [t.device for t in first]
    for name, values in others.items():
        _check_list_like(name, values, first, shapes, devices)


def _check_list_like(name, values, params, shapes, devices, floating=True) -> None:
    try:
        if ([t.shape for t in values] == shapes and [t.device for t in values] == devices
                and {t.layout for t in values} <= _STRIDED
                and (not floating or all(t.is_floating_point() for t in values))):
            return
    except AttributeError:  # not a tensor: named below
        pass
    _first_bad(name, values, params, lambda t, p: _like_problem(t, p, floating))


def _check_scalar_list(name: str, values: Sequence[Tensor], devices: list) -> None:
    try:
        if ({t.dtype for t in values} <= {torch.float32} and not any(t.dim() for t in values)
                and [t.device for t in values] == devices):
            return
    except AttributeError:
        pass
    for i, (t, device) in enumerate(zip(values, devices)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}[{i}] must be a 0-dim float32 tensor, got {type(t).__name__}")
        if t.dim() != 0 or t.dtype != torch.float32:
            raise ValueError(f"{name}[{i}] must be a 0-dim float32 tensor, got shape "
                             f"{tuple(t.shape)} and dtype {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name}[{i}] is on {t.device}, its param on {device}")


def check_scalar_arg(name: str, value: Optional[Tensor]) -> None:
    if value is None:
        return
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a 0-dim tensor or None, got {type(value).__name__} "
                        f"(a GradScaler passes tensors)")
    if value.numel() != 1:
        raise ValueError(f"{name} must hold one value, got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")


def check_step_tensors(tensors: StepTensors, hyper: StepHyper,
                       grad_scale: Optional[Tensor] = None,
                       found_inf: Optional[Tensor] = None) -> None:
    """The backend-independent checks of ``fused_step``: which lists must be present, and that
    every tensor matches its param in shape and device. Raises naming the list and index."""
    if not isinstance(hyper, StepHyper):
        raise TypeError(f"hyper must be a fisherforget.ops.StepHyper, got {type(hyper).__name__}")
    t = tensors
    n = len(t.params)
    required = dict(grads=t.grads, exp_avgs=t.exp_avgs, exp_avg_sqs=t.exp_avg_sqs,
                    masks=t.masks, steps=t.steps)
    if hyper.amsgrad:
        required["max_exp_avg_sqs"] = t.max_exp_avg_sqs
    elif len(t.max_exp_avg_sqs) not in (0, n):
        raise ValueError(f"max_exp_avg_sqs has {len(t.max_exp_avg_sqs)} entries; it must be "
                         f"empty or match params ({n})")
    if hyper.uses_fisher and n and not t.fishers:
        raise ValueError(
            "fishers is empty, but fisher_mode, fisher_scale or a freeze threshold uses the "
            f"Fisher (fisher_mode={hyper.fisher_mode!r}, fisher_scale={hyper.fisher_scale!r}, "
            f"freeze_above={hyper.freeze_above!r}, freeze_below={hyper.freeze_below!r}): pass "
            "one Fisher tensor per param")
    if t.fishers:
        required["fishers"] = t.fishers
        if hyper.fisher_mode is not None:
            required["fisher_counts"] = t.fisher_counts
    for name, values in required.items():
        if len(values) != n:
            raise ValueError(f"{name} has {len(values)} entries, params {n}: they must match")
    check_scalar_arg("grad_scale", grad_scale)
    check_scalar_arg("found_inf", found_inf)
    if n == 0:
        return
    _check_like_lists("params", t.params, {})
    shapes = [p.shape for p in t.params]
    devices = [p.device for p in t.params]
    for name in ("grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "fishers"):
        if name in required:
            _check_list_like(name, required[name], t.params, shapes, devices)
    present = [i for i, m in enumerate(t.masks) if m is not None]
    if present:
        masks = [t.masks[i] for i in present]
        params = [t.params[i] for i in present]
        if {m.dtype for m in masks if isinstance(m, Tensor)} != {torch.bool} or not all(
                isinstance(m, Tensor) for m in masks):
            for i in present:
                m = t.masks[i]
                if not isinstance(m, Tensor) or m.dtype != torch.bool:
                    raise TypeError(f"masks[{i}] must be a bool tensor, got "
                                    f"{getattr(m, 'dtype', type(m).__name__)}")
        _check_list_like("masks", masks, params, [p.shape for p in params],
                         [p.device for p in params], floating=False)
    _check_scalar_list("steps", t.steps, devices)
    if "fisher_counts" in required:
        _check_scalar_list("fisher_counts", t.fisher_counts, devices)


# --------------------------------------------------------------------------- custom ops
# The same three ops as PyTorch custom ops (namespace ``fisherforget``), reached under
# torch.compile. The backend is an argument, so one schema serves every backend.

_LIB = torch.library.Library("fisherforget", "DEF")
_LIB.define(fused_step_schema("fisherforget", backend_arg=True).split("::", 1)[1])
_LIB.define("fisher_accumulate(Tensor(a!)[] fishers, Tensor[] grads, Tensor? grad_scale, *, "
            "float alpha, float beta, str backend) -> ()")
_LIB.define("fisher_score(Tensor[] directions, Tensor[] grads, Tensor[] fishers, *, "
            "str backend) -> Tensor")


def _fused_step_op(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, fishers, masks,
                   steps, fisher_counts, *, grad_scale, found_inf, backend, **hyper) -> None:
    tensors = StepTensors(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, fishers,
                          masks, steps, fisher_counts)
    get_impl("fused_step", backend)(tensors, StepHyper.from_op_kwargs(**hyper), grad_scale,
                                    found_inf)


def _fisher_accumulate_op(fishers, grads, grad_scale, *, alpha, beta, backend) -> None:
    get_impl("fisher_accumulate", backend)(
        fishers, grads, alpha=alpha, beta=beta, grad_scale=grad_scale
    )


def _fisher_score_op(directions, grads, fishers, *, backend) -> Tensor:
    # A fresh tensor: custom ops may not return (an alias of) an input.
    return get_impl("fisher_score", backend)(directions, grads, fishers).clone()


def _fisher_score_fake(directions, grads, fishers, *, backend) -> Tensor:
    device = grads[0].device if grads else torch.device("cpu")
    return torch.empty(2, dtype=torch.float64, device=device)


def _no_outputs(*args, **kwargs) -> None:
    return None  # in place only: no outputs to describe


for _name, _impl, _fake in (("fused_step", _fused_step_op, _no_outputs),
                            ("fisher_accumulate", _fisher_accumulate_op, _no_outputs),
                            ("fisher_score", _fisher_score_op, _fisher_score_fake)):
    _LIB.impl(_name, _impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"fisherforget::{_name}", _fake, lib=_LIB)
