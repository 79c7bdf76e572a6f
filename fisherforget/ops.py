"""The op contract: every op is declared once here and implemented by each backend.

Three ops make up the hot path (DESIGN section 2 is the math):

``fused_step``
    One Fisher-AdamW step over many tensors: optional Fisher accumulation, freezing (mask,
    ``freeze_above``, ``freeze_below``), decoupled weight decay, AdamW moments with bias
    correction, amsgrad, ``fisher_scale``, maximize, grad unscaling and ``found_inf``.
``fisher_accumulate``
    ``F = alpha * F + beta * (g / grad_scale)^2`` over many tensors (Fisher estimation outside the
    step).
``fisher_score``
    ``[sum_i d_i * g_i, sum_i F_i * g_i^2]`` over many tensors in one pass, as a float64 tensor of
    shape ``(2,)`` on the tensors' device (the two terms of the forgetting confidence).

A backend registers its implementations with :func:`register`; the optimizer and the LWF code call
the module-level functions below with ``backend=<name>`` and never touch kernels. The ``reference``
backend (pure PyTorch, any device) is the ground truth every other backend is tested against.

**torch.compile.** Each op is also a PyTorch custom op, ``torch.ops.fisherforget.<op>``, with the
backend name as an argument and a fake (meta) implementation, so a compiled graph can hold a call to
a kernel backend it cannot trace (Triton launches over pointer tables, the CUDA extension). Inside
``torch.compile`` the functions below call a non-reference backend through that custom op; the
reference backend is plain PyTorch and is traced (and fused by Inductor) like any other code.
Eagerly they call the implementation directly.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = [
    "OPS",
    "FISHER_MODES",
    "register",
    "get_impl",
    "registered_backends",
    "fused_step",
    "fisher_accumulate",
    "fisher_score",
]

OPS = ("fused_step", "fisher_accumulate", "fisher_score")
FISHER_MODES = ("ema", "mean", "sum", None)

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


def registered_backends(op: str) -> list[str]:
    return sorted(_IMPLS[op])


def get_impl(op: str, backend: str) -> Callable:
    impl = _IMPLS[op].get(backend)
    if impl is not None:  # registered: no import machinery (which torch.compile cannot trace)
        return impl
    # Importing the backend module registers its ops; keep it lazy so that a missing Triton or an
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
    return backend != "reference" and torch.compiler.is_compiling()


def fused_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor],
    fishers: Sequence[Tensor],
    masks: Sequence[Optional[Tensor]],
    steps: Sequence[Tensor],
    fisher_counts: Sequence[Tensor],
    *,
    lr: Union[float, Tensor],
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    fisher_mode: Optional[str],
    fisher_beta: float,
    fisher_scale: float,
    freeze_above: Optional[float],
    freeze_below: Optional[float],
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
    backend: str = "reference",
) -> None:
    """One Fisher-AdamW step, in place, over every tensor of the lists (DESIGN section 2).

    Per element, in fp32 (fp64 for fp64 params)::

        if found_inf: nothing changes (params, moments, Fisher, steps, counts)
        g = grad / grad_scale;  if maximize: g = -g
        t = step + 1                                   (``steps[i]`` is incremented in place)
        F = a*F + b*g^2  when fisher_mode is set:      ema (fisher_beta, 1-fisher_beta),
                                                       mean ((n-1)/n, 1/n), n = count + 1,
                                                       sum (1, 1)
        frozen = ~mask | F > freeze_above | F < freeze_below        (each only when set)
        frozen elements keep p, m, v, vmax; the others get
        p = p*(1 - lr*wd); m = beta1*m + (1-beta1)*g; v = beta2*v + (1-beta2)*g^2
        vmax = max(vmax, v) (amsgrad; the denominator then uses vmax)
        p = p - lr/(1-beta1^t) * m / (sqrt(v)/sqrt(1-beta2^t) + eps) / (1 + fisher_scale*F)

    Arguments:
        params, grads, exp_avgs, exp_avg_sqs: equal-length lists, element ``i`` of each shaped alike.
        max_exp_avg_sqs: same length when ``amsgrad``, else empty.
        fishers: same length when the Fisher is accumulated or used (``fisher_mode``,
            ``fisher_scale != 0`` or a threshold), else empty.
        masks: same length; ``None`` or a bool tensor shaped like the param (True = update).
        steps: 0-dim float32 tensors on the params' device, incremented unless ``found_inf``.
        fisher_counts: 0-dim float32 tensors (accumulations so far), same length as ``fishers``;
            incremented whenever the Fisher accumulates.
        lr: float or 0-dim tensor (read on the device: no host synchronisation).
        grad_scale, found_inf: 0-dim float32 tensors from a GradScaler, or ``None``.
    """
    check_fused_step_lists(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, fishers, masks, steps,
        fisher_counts, amsgrad=amsgrad, fisher_mode=fisher_mode, fisher_scale=fisher_scale,
        freeze_above=freeze_above, freeze_below=freeze_below,
    )
    if _through_custom_op(backend):
        lr_is_tensor = isinstance(lr, Tensor)
        torch.ops.fisherforget.fused_step(
            list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(max_exp_avg_sqs),
            list(fishers), list(masks), list(steps), list(fisher_counts),
            lr if lr_is_tensor else None, grad_scale, found_inf,
            lr=0.0 if lr_is_tensor else float(lr), beta1=beta1, beta2=beta2, eps=eps,
            weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
            fisher_mode=fisher_mode, fisher_beta=fisher_beta, fisher_scale=fisher_scale,
            freeze_above=freeze_above, freeze_below=freeze_below, backend=backend,
        )
        return
    get_impl("fused_step", backend)(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, fishers, masks, steps,
        fisher_counts, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
        amsgrad=amsgrad, maximize=maximize, fisher_mode=fisher_mode, fisher_beta=fisher_beta,
        fisher_scale=fisher_scale, freeze_above=freeze_above, freeze_below=freeze_below,
        grad_scale=grad_scale, found_inf=found_inf,
    )


def check_fused_step_lists(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, fishers, masks, steps, fisher_counts,
    *, amsgrad, fisher_mode, fisher_scale, freeze_above, freeze_below,
) -> None:
    """The backend-independent part of ``fused_step``'s contract: which lists must be present
    and of equal length. Raises ``ValueError`` naming the list; backends check dtypes/devices."""
    n = len(params)
    required = dict(grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, masks=masks,
                    steps=steps)
    if amsgrad:
        required["max_exp_avg_sqs"] = max_exp_avg_sqs
    elif len(max_exp_avg_sqs) not in (0, n):
        raise ValueError(f"max_exp_avg_sqs has {len(max_exp_avg_sqs)} entries; it must be "
                         f"empty or match params ({n})")
    if fisher_mode not in FISHER_MODES:
        raise ValueError(f"fisher_mode must be one of {FISHER_MODES}, got {fisher_mode!r}")
    uses_fisher = (fisher_mode is not None or fisher_scale != 0 or freeze_above is not None
                   or freeze_below is not None)
    if uses_fisher and n and not fishers:
        raise ValueError(
            "fishers is empty, but fisher_mode, fisher_scale or a freeze threshold uses the "
            f"Fisher (fisher_mode={fisher_mode!r}, fisher_scale={fisher_scale!r}, "
            f"freeze_above={freeze_above!r}, freeze_below={freeze_below!r}): pass one Fisher "
            "tensor per param")
    if fishers:
        required["fishers"] = fishers
        if fisher_mode is not None:
            required["fisher_counts"] = fisher_counts
    for name, values in required.items():
        if len(values) != n:
            raise ValueError(f"{name} has {len(values)} entries, params {n}: they must match")


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
    if _through_custom_op(backend):
        torch.ops.fisherforget.fisher_accumulate(
            list(fishers), list(grads), grad_scale, alpha=alpha, beta=beta, backend=backend
        )
        return
    get_impl("fisher_accumulate", backend)(
        fishers, grads, alpha=alpha, beta=beta, grad_scale=grad_scale
    )


def fisher_score(
    directions: Sequence[Tensor],
    grads: Sequence[Tensor],
    fishers: Sequence[Tensor],
    *,
    backend: str = "reference",
) -> Tensor:
    """Return ``torch.tensor([sum <d_i, g_i>, sum <F_i, g_i^2>], dtype=float64)`` in one pass.

    With ``d`` the learning-task gradient, ``g`` a sample's gradient and ``F`` the learning-task
    Fisher these are the first- and second-order terms of the forgetting confidence (DESIGN
    section 2). Deterministic for a given input on every backend.
    """
    if _through_custom_op(backend):
        return torch.ops.fisherforget.fisher_score(
            list(directions), list(grads), list(fishers), backend=backend
        )
    return get_impl("fisher_score", backend)(directions, grads, fishers)


# --------------------------------------------------------------------------- custom ops
# The same three ops as PyTorch custom ops (namespace ``fisherforget``; the CUDA extension's own
# ops live in ``fisherforget_C``). The backend is an argument, so one schema serves every backend;
# a tensor lr travels as ``lr_tensor`` (custom ops take no float-or-tensor unions).


@torch.library.custom_op(
    "fisherforget::fused_step",
    mutates_args=(
        "params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "fishers", "steps",
        "fisher_counts",
    ),
)
def _fused_step_op(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    fishers: list[Tensor],
    masks: list[Optional[Tensor]],
    steps: list[Tensor],
    fisher_counts: list[Tensor],
    lr_tensor: Optional[Tensor],
    grad_scale: Optional[Tensor],
    found_inf: Optional[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    fisher_mode: Optional[str],
    fisher_beta: float,
    fisher_scale: float,
    freeze_above: Optional[float],
    freeze_below: Optional[float],
    backend: str,
) -> None:
    get_impl("fused_step", backend)(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, fishers, masks, steps,
        fisher_counts, lr=lr if lr_tensor is None else lr_tensor, beta1=beta1, beta2=beta2,
        eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
        fisher_mode=fisher_mode, fisher_beta=fisher_beta, fisher_scale=fisher_scale,
        freeze_above=freeze_above, freeze_below=freeze_below, grad_scale=grad_scale,
        found_inf=found_inf,
    )


@_fused_step_op.register_fake
def _fused_step_fake(*args, **kwargs) -> None:
    return None  # in place only: no outputs to describe


@torch.library.custom_op("fisherforget::fisher_accumulate", mutates_args=("fishers",))
def _fisher_accumulate_op(
    fishers: list[Tensor],
    grads: list[Tensor],
    grad_scale: Optional[Tensor],
    *,
    alpha: float,
    beta: float,
    backend: str,
) -> None:
    get_impl("fisher_accumulate", backend)(
        fishers, grads, alpha=alpha, beta=beta, grad_scale=grad_scale
    )


@_fisher_accumulate_op.register_fake
def _fisher_accumulate_fake(*args, **kwargs) -> None:
    return None


@torch.library.custom_op("fisherforget::fisher_score", mutates_args=())
def _fisher_score_op(
    directions: list[Tensor], grads: list[Tensor], fishers: list[Tensor], *, backend: str
) -> Tensor:
    # A fresh tensor: custom ops may not return (an alias of) an input.
    return get_impl("fisher_score", backend)(directions, grads, fishers).clone()


@_fisher_score_op.register_fake
def _fisher_score_fake(directions, grads, fishers, *, backend):
    device = grads[0].device if grads else torch.device("cpu")
    return torch.empty(2, dtype=torch.float64, device=device)
