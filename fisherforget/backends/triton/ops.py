"""Triton backend: the three ops on the multi-tensor Triton kernels of ``fisherforget.kernels``.

The op contract (:mod:`fisherforget.ops`) has checked shapes, devices and list lengths; this
module adds only what Triton requires (kernel dtypes, devices it runs on), groups tensors into
buckets of one device and one dtype per operand (one launch per bucket), gives the kernels contiguous tensors (non-contiguous ones go
through contiguous copies that are written back) and moves ``lr``/``grad_scale``/``found_inf``
tensors to each bucket's device without a host synchronisation. The math is stated in
:mod:`fisherforget.ops`.

Runs on CUDA tensors, and on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1``, set
before the kernels are imported), which is how the tests run without a GPU.

The kernels live in the top-level ``kernels/`` folder, installed as ``fisherforget.kernels``
(``setup.py`` maps the package there). From a source checkout that is only on ``sys.path`` (no
install) that name does not exist, so :func:`load_kernels` loads ``kernels/`` under it directly.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections import defaultdict
from pathlib import Path
from types import ModuleType
from typing import Optional, Sequence

import torch
from torch import Tensor

from fisherforget import backends, ops
from fisherforget.backends import KERNEL_DTYPES
from fisherforget.backends.staging import ContiguousStaging, ScalarOnDevice

_KERNEL_DTYPE_SET = set(KERNEL_DTYPES)
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


def host_only_error() -> Optional[str]:
    """Why ``backends.host_only("triton")`` cannot run here (Triton does not import), or None."""
    return availability_error()


def supports_device(device: torch.device) -> bool:
    """CUDA devices; CPU too when Triton's interpreter is on (``TRITON_INTERPRET=1``), and any
    device under ``backends.host_only("triton")`` (nothing is launched)."""
    device = torch.device(device)
    if device.type == "cuda" or backends.is_host_only("triton"):
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


# ------------------------------------------------------------------------------------ ops


@ops.register("fused_step", "triton")
@torch.no_grad()
def fused_step(
    tensors: ops.StepTensors,
    hyper: ops.StepHyper,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
) -> None:
    kernels = load_kernels()
    params = tensors.params
    if len(params) == 0:
        return
    lr_on = ScalarOnDevice(hyper.lr, "lr") if isinstance(hyper.lr, Tensor) else None
    scale_on = ScalarOnDevice(grad_scale, "grad_scale")
    found_inf_on = ScalarOnDevice(found_inf, "found_inf")
    launches = not backends.is_host_only("triton")

    def launch(bucket: ops.StepTensors, rows=None) -> None:
        device = bucket.params[0].device
        bucket_hyper = hyper if lr_on is None else hyper.replace(lr=lr_on.on(device))
        kernels.fused_step(bucket, bucket_hyper, grad_scale=scale_on.on(device),
                           found_inf=found_inf_on.on(device), rows=rows, launch=launches)

    # The common case, an optimizer bucket: one device, one dtype per list, contiguous. The
    # address table is read in one pass and that is all the per-tensor work of the step.
    rows = kernels.step_rows(tensors, hyper)
    if rows.regular:
        launch(tensors, rows)
        return

    # Otherwise one launch per (device, dtype of every operand), on contiguous stand-ins.
    has_fisher = len(tensors.fishers) > 0
    accumulates = has_fisher and hyper.fisher_mode is not None
    keyed = [params, tensors.grads, tensors.exp_avgs, tensors.exp_avg_sqs]
    if hyper.amsgrad:
        keyed.append(tensors.max_exp_avg_sqs)
    if has_fisher:
        keyed.append(tensors.fishers)
    columns = [[p.device for p in params]] + [[t.dtype for t in lst] for lst in keyed]
    buckets = _group(list(zip(*columns)))
    contiguous = ContiguousStaging()
    for index in buckets.values():
        launch(ops.StepTensors(
            contiguous.inplace(_pick(params, index)),
            contiguous.read(_pick(tensors.grads, index)),
            contiguous.inplace(_pick(tensors.exp_avgs, index)),
            contiguous.inplace(_pick(tensors.exp_avg_sqs, index)),
            contiguous.inplace(_pick(tensors.max_exp_avg_sqs, index)) if hyper.amsgrad else [],
            contiguous.inplace(_pick(tensors.fishers, index)) if has_fisher else [],
            contiguous.read(_pick(tensors.masks, index)),
            _pick(tensors.steps, index),
            _pick(tensors.fisher_counts, index) if accumulates else [],
        ))
    contiguous.finish()


@ops.register_check("fused_step", "triton")
def check_fused_step(tensors: ops.StepTensors, hyper: ops.StepHyper) -> None:
    _check_kernel_dtypes_and_devices(tensors.params, "params")


def _check_kernel_dtypes_and_devices(tensors: Sequence[Tensor], name: str) -> None:
    """What only this backend requires beyond the op contract (checked by ``fisherforget.ops``):
    kernel dtypes and devices Triton runs on."""
    if not {t.dtype for t in tensors} <= _KERNEL_DTYPE_SET:
        i = next(i for i, t in enumerate(tensors) if t.dtype not in _KERNEL_DTYPE_SET)
        raise ops.entry_error(TypeError, name, i, f"has dtype {tensors[i].dtype}; backend "
                              f"'triton' supports {KERNEL_DTYPES} (use backend='reference' for "
                              "others)")
    for device in {t.device for t in tensors}:
        if not supports_device(device):
            i = next(i for i, t in enumerate(tensors) if t.device == device)
            _check_device(device, f"{name}[{i}]")


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
    if len(fishers) == 0 or backends.is_host_only("triton"):
        return
    _check_kernel_dtypes_and_devices(fishers, "fishers")
    _check_kernel_dtypes_and_devices(grads, "grads")
    devices = [f.device for f in fishers]
    buckets = _group(list(zip(devices, [f.dtype for f in fishers], [g.dtype for g in grads])))
    scale_on = ScalarOnDevice(grad_scale, "grad_scale")
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
    if len(grads) == 0 or backends.is_host_only("triton"):
        return torch.zeros(2, dtype=torch.float64)
    for name, values in (("directions", directions), ("grads", grads), ("fishers", fishers)):
        _check_kernel_dtypes_and_devices(values, name)
    device = grads[0].device
    buckets = _group(list(zip([d.dtype for d in directions], [g.dtype for g in grads],
                              [f.dtype for f in fishers])))
    contiguous = ContiguousStaging()
    work = []
    for index in buckets.values():
        work.append((contiguous.read(_pick(directions, index)),
                     contiguous.read(_pick(grads, index)),
                     contiguous.read(_pick(fishers, index))))
    return kernels.fisher_score(work, device)
