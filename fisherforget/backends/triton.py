"""Triton backend: the three ops on the multi-tensor Triton kernels of ``fisherforget.kernels``.

This module is the checked entry point: it validates the op arguments (so that bad input raises a
clear error before anything changes), groups tensors into buckets of one device and one dtype per
operand (one launch per bucket), gives the kernels contiguous tensors (non-contiguous ones go
through contiguous copies that are written back) and moves ``lr``/``grad_scale``/``found_inf``
tensors to each bucket's device without a host synchronisation. The math is the reference
backend's (``fisherforget/backends/reference.py``, DESIGN section 2).

Runs on CUDA tensors, and on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1``, set
before the kernels are imported), which is how the tests run without a GPU.

The kernels live in the top-level ``kernels/`` folder, installed as ``fisherforget.kernels``
(``setup.py`` maps the package there). From a source checkout that is only on ``sys.path`` (no
install) that name does not exist, so :func:`load_kernels` loads ``kernels/`` under it directly.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
from collections import defaultdict
from pathlib import Path
from types import ModuleType
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from fisherforget import ops
from fisherforget.backends.staging import ContiguousStaging, ScalarOnDevice

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_KERNEL_DTYPE_SET = set(_KERNEL_DTYPES)
_STRIDED = {torch.strided}
_FLOAT32 = {torch.float32}
_KERNELS_NAME = "fisherforget.kernels"

_kernels: Optional[ModuleType] = None
_import_error: Optional[str] = None


def load_kernels() -> ModuleType:
    """Import ``fisherforget.kernels`` (installed, or ``kernels/`` of a source checkout)."""
    global _kernels
    if _kernels is not None:
        return _kernels
    try:
        _kernels = importlib.import_module(_KERNELS_NAME)
        return _kernels
    except ModuleNotFoundError as exc:
        if exc.name != _KERNELS_NAME:
            raise  # e.g. triton itself is missing
    import fisherforget

    folder = Path(fisherforget.__file__).resolve().parent.parent / "kernels"
    init = folder / "__init__.py"
    if not init.is_file():
        raise ModuleNotFoundError(
            f"{_KERNELS_NAME} is not installed and no source checkout kernels/ folder was found "
            f"at {folder}",
            name=_KERNELS_NAME,
        )
    spec = importlib.util.spec_from_file_location(
        _KERNELS_NAME, init, submodule_search_locations=[str(folder)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[_KERNELS_NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[_KERNELS_NAME]
        raise
    fisherforget.kernels = module
    _kernels = module
    return module


def availability_error() -> Optional[str]:
    """``None`` when the Triton kernels import; otherwise why they cannot be used."""
    global _import_error
    if _kernels is not None:
        return None
    if _import_error is None:
        try:
            import triton  # noqa: F401
        except Exception as exc:  # ImportError, or a broken install
            _import_error = (
                f"triton is not importable ({type(exc).__name__}: {exc}); "
                "install it with `pip install triton` (Linux, with a CUDA build of torch)"
            )
            return _import_error
        try:
            load_kernels()
        except Exception as exc:
            _import_error = f"the Triton kernels failed to import ({type(exc).__name__}: {exc})"
    return _import_error


def supports_device(device: torch.device) -> bool:
    """CUDA devices; CPU too when Triton's interpreter is on (``TRITON_INTERPRET=1``)."""
    device = torch.device(device)
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ------------------------------------------------------------------------------------ checks


def _check_device(device: torch.device, what: str) -> None:
    if not supports_device(device):
        hint = (
            " (CPU tensors run only in Triton's interpreter, TRITON_INTERPRET=1)"
            if device.type == "cpu" else ""
        )
        raise RuntimeError(f"backend 'triton' cannot run on {device} tensors: {what}{hint}")


def _check_float(t: Tensor, what: str, allowed=_KERNEL_DTYPES) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in allowed:
        raise TypeError(
            f"{what} has dtype {t.dtype}; backend 'triton' supports {allowed} "
            "(use backend='reference' for others)"
        )
    if t.layout != torch.strided:
        raise TypeError(f"{what} must be a dense (strided) tensor, got layout {t.layout}")


def _check_like(t: Tensor, param: Tensor, what: str, allowed=_KERNEL_DTYPES) -> None:
    _check_float(t, what, allowed)
    if t.shape != param.shape:
        raise ValueError(f"{what} has shape {tuple(t.shape)}, its param {tuple(param.shape)}")
    if t.device != param.device:
        raise ValueError(f"{what} is on {t.device}, its param on {param.device}")


def _check_scalar_tensor(t: Tensor, what: str, device: torch.device) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if t.numel() != 1 or t.dim() != 0:
        raise ValueError(f"{what} must be a 0-dim tensor, got shape {tuple(t.shape)}")
    if t.dtype != torch.float32:
        raise TypeError(f"{what} must be float32, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{what} is on {t.device}, its param on {device}")


def _check_optional_scalar(t: Optional[Tensor], name: str) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a 0-dim tensor or None, got {type(t).__name__}")
    if t.numel() != 1:
        raise ValueError(f"{name} must hold one value, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


# List-level checks: one cheap pass per list (a step may carry a thousand tensors); only when one
# fails is the list walked element by element to name the first offender.


def _check_params_named(params: Sequence[Tensor], name: str) -> tuple[list, list]:
    """Check the list the others are compared with; return its shapes and devices."""
    try:
        ok = ({p.dtype for p in params} <= _KERNEL_DTYPE_SET
              and {p.layout for p in params} <= _STRIDED)
        shapes = [p.shape for p in params]
        devices = [p.device for p in params]
    except AttributeError:  # not a tensor: named below
        ok = False
    if not ok:
        for i, p in enumerate(params):
            _check_float(p, f"{name}[{i}]")
        shapes = [p.shape for p in params]
        devices = [p.device for p in params]
    for device in set(devices):
        if not supports_device(device):
            _check_device(device, f"{name}[{devices.index(device)}]")
    return shapes, devices


def _check_all_like(name: str, tensors: Sequence, params: Sequence[Tensor], shapes: list,
                    devices: list, allowed=_KERNEL_DTYPES) -> None:
    try:
        if ({t.dtype for t in tensors} <= set(allowed) and {t.layout for t in tensors} <= _STRIDED
                and [t.shape for t in tensors] == shapes
                and [t.device for t in tensors] == devices):
            return
    except AttributeError:  # not a tensor: named below
        pass
    for i, (t, p) in enumerate(zip(tensors, params)):
        _check_like(t, p, f"{name}[{i}]", allowed)


def _check_all_scalars(name: str, tensors: Sequence, devices: list) -> None:
    try:
        if ({t.dtype for t in tensors} <= _FLOAT32 and not any(map(Tensor.dim, tensors))
                and [t.device for t in tensors] == devices):
            return
    except AttributeError:  # not a tensor: named below
        pass
    for i, t in enumerate(tensors):
        _check_scalar_tensor(t, f"{name}[{i}]", devices[i])


# ------------------------------------------------------------------------------------ ops


@ops.register("fused_step", "triton")
@torch.no_grad()
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
) -> None:
    kernels = load_kernels()
    n = len(params)
    _check_fused_step(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, fishers, masks, steps,
        fisher_counts, lr=lr, amsgrad=amsgrad, fisher_mode=fisher_mode,
        fisher_scale=fisher_scale, freeze_above=freeze_above, freeze_below=freeze_below,
        grad_scale=grad_scale, found_inf=found_inf,
    )
    if n == 0:
        return
    has_fisher = len(fishers) > 0
    accumulates = has_fisher and fisher_mode is not None

    # One launch per (device, dtype of every operand); usually the whole list is one bucket.
    keyed = [params, grads, exp_avgs, exp_avg_sqs]
    if amsgrad:
        keyed.append(max_exp_avg_sqs)
    if has_fisher:
        keyed.append(fishers)
    columns = [[p.device for p in params]] + [[t.dtype for t in lst] for lst in keyed]
    buckets = _group(list(zip(*columns)))

    lr_on = ScalarOnDevice(lr) if isinstance(lr, Tensor) else None
    scale_on = ScalarOnDevice(grad_scale)
    found_inf_on = ScalarOnDevice(found_inf)
    contiguous = ContiguousStaging()
    for key, index in buckets.items():
        device = key[0]

        kernels.fused_step(
            contiguous.inplace(_pick(params, index)),
            contiguous.read(_pick(grads, index)),
            contiguous.inplace(_pick(exp_avgs, index)),
            contiguous.inplace(_pick(exp_avg_sqs, index)),
            contiguous.inplace(_pick(max_exp_avg_sqs, index)) if amsgrad else [],
            contiguous.inplace(_pick(fishers, index)) if has_fisher else [],
            contiguous.read(_pick(masks, index)),
            _pick(steps, index),
            _pick(fisher_counts, index) if accumulates else [],
            lr=lr_on.on(device) if lr_on is not None else lr,
            beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            maximize=maximize, fisher_mode=fisher_mode, fisher_beta=fisher_beta,
            fisher_scale=fisher_scale, freeze_above=freeze_above, freeze_below=freeze_below,
            grad_scale=scale_on.on(device), found_inf=found_inf_on.on(device),
        )
    contiguous.finish()


def _pick(values: Sequence, index: Optional[list]) -> list:
    return list(values) if index is None else [values[i] for i in index]


def _group(keys: list) -> dict:
    """``{key: indices}`` of equal keys in order; ``{key: None}`` when all keys are equal."""
    if len(set(keys)) == 1:
        return {keys[0]: None}
    groups: dict = defaultdict(list)
    for i, key in enumerate(keys):
        groups[key].append(i)
    return groups


def _check_fused_step(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, fishers, masks, steps,
    fisher_counts, *, lr, amsgrad, fisher_mode, fisher_scale, freeze_above, freeze_below,
    grad_scale, found_inf,
) -> None:
    # Which lists must be present and of equal length: the op contract, checked in one place.
    ops.check_fused_step_lists(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, fishers, masks, steps,
        fisher_counts, amsgrad=amsgrad, fisher_mode=fisher_mode, fisher_scale=fisher_scale,
        freeze_above=freeze_above, freeze_below=freeze_below,
    )
    for name, value in (("fisher_scale", fisher_scale), ("freeze_above", freeze_above),
                        ("freeze_below", freeze_below)):
        if value is not None and (not isinstance(value, (int, float)) or math.isnan(value)):
            raise ValueError(f"{name} must be a number, got {value!r}")
    if isinstance(lr, Tensor):
        _check_optional_scalar(lr, "lr")
    elif not isinstance(lr, (int, float)):
        raise TypeError(f"lr must be a float or a 0-dim tensor, got {type(lr).__name__}")
    _check_optional_scalar(grad_scale, "grad_scale")
    _check_optional_scalar(found_inf, "found_inf")

    shapes, devices = _check_params_named(params, "params")
    _check_all_like("grads", grads, params, shapes, devices)
    _check_all_like("exp_avgs", exp_avgs, params, shapes, devices)
    _check_all_like("exp_avg_sqs", exp_avg_sqs, params, shapes, devices)
    if amsgrad:
        _check_all_like("max_exp_avg_sqs", max_exp_avg_sqs, params, shapes, devices)
    if fishers:
        _check_all_like("fishers", fishers, params, shapes, devices)
    for i, mask in enumerate(masks):
        if mask is not None:
            _check_like(mask, params[i], f"masks[{i}]", allowed=(torch.bool,))
    _check_all_scalars("steps", steps, devices)
    if fishers and fisher_mode is not None:
        _check_all_scalars("fisher_counts", fisher_counts, devices)


@ops.register("fisher_accumulate", "triton")
@torch.no_grad()
def fisher_accumulate(
    fishers: Sequence[Tensor],
    grads: Sequence[Tensor],
    *,
    alpha: float,
    beta: float,
    grad_scale: Optional[Tensor] = None,
) -> None:
    kernels = load_kernels()
    n = len(fishers)
    if len(grads) != n:
        raise ValueError(f"grads has {len(grads)} entries, fishers {n}: they must match")
    _check_optional_scalar(grad_scale, "grad_scale")
    if n == 0:
        return
    shapes, devices = _check_params_named(fishers, "fishers")
    _check_all_like("grads", grads, fishers, shapes, devices)
    buckets = _group(list(zip(devices, [f.dtype for f in fishers], [g.dtype for g in grads])))
    scale_on = ScalarOnDevice(grad_scale)
    contiguous = ContiguousStaging()
    for (device, _, _), index in buckets.items():
        kernels.fisher_accumulate(
            contiguous.inplace(_pick(fishers, index)), contiguous.read(_pick(grads, index)),
            alpha=alpha, beta=beta, grad_scale=scale_on.on(device),
        )
    contiguous.finish()


@ops.register("fisher_score", "triton")
@torch.no_grad()
def fisher_score(
    directions: Sequence[Tensor], grads: Sequence[Tensor], fishers: Sequence[Tensor]
) -> Tensor:
    kernels = load_kernels()
    n = len(grads)
    if len(directions) != n or len(fishers) != n:
        raise ValueError(
            f"directions, grads and fishers must have one entry per tensor, got "
            f"{len(directions)}, {n} and {len(fishers)}"
        )
    if n == 0:
        return torch.zeros(2, dtype=torch.float64)
    shapes, devices = _check_params_named(grads, "grads")
    device = devices[0]
    for i, other in enumerate(devices):
        if other != device:
            raise ValueError(f"grads[{i}] is on {other}, grads[0] on {device}: use one device")
    _check_all_like("directions", directions, grads, shapes, devices)
    _check_all_like("fishers", fishers, grads, shapes, devices)
    buckets = _group(list(zip([d.dtype for d in directions], [g.dtype for g in grads],
                              [f.dtype for f in fishers])))
    contiguous = ContiguousStaging()
    work = []
    for index in buckets.values():
        work.append((contiguous.read(_pick(directions, index)),
                     contiguous.read(_pick(grads, index)),
                     contiguous.read(_pick(fishers, index))))
    return kernels.fisher_score(work, device)
