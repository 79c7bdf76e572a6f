"""CPU backend: the native CPU kernels of the compiled extension ``fisherforget._C`` (``csrc/cpu/``).

Each op is one call into the extension over all of its tensors: the extension checks every
tensor (dtype, shape, device; a dtype problem raises TypeError) before writing anything, steps
non-contiguous ones through contiguous copies, and splits the elements of all tensors between
ATen's threads (``torch.set_num_threads``). The inner loops run 8 fp32 lanes with AVX2/FMA/F16C where the CPU has
them, else a scalar loop with identical results (``torch.ops.fisherforget_C.cpu_isa()`` says
which). Params fp32/bf16/fp16; optimizer state and the Fisher fp32/bf16.

This glue does no per-tensor work and registers no preflight: the extension's checks are the
backend's checks (one place for each property), and an optimizer's launch plan only holds
buckets the extension takes (``backends.resolve`` picks the backend per device and param dtype;
the optimizer validates its state dtypes and the gradients).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from fisherforget import backends, ops
from fisherforget.backends.staging import scalar_on, step_scalars_on

_CPU = torch.device("cpu")

_load_error: Optional[str] = None
_loaded = False
_kernels = None  # the module fisherforget._C, once loaded


def _load() -> Optional[str]:
    """Import ``fisherforget._C``; None when its CPU kernels are registered, else why not."""
    global _load_error, _loaded, _kernels
    if _loaded or _load_error is not None:
        return _load_error
    try:
        import fisherforget._C as kernels  # also registers torch.ops.fisherforget_C
    except ImportError as exc:
        _load_error = (f"fisherforget._C is not built ({type(exc).__name__}: {exc}); reinstall "
                       "with `pip install --no-build-isolation .` and a C++ compiler")
        return _load_error
    info = build_info()
    if "cpu" not in info.get("kernels", "").split(","):
        _load_error = (f"fisherforget._C was built without the CPU kernels ({info}); rebuild it "
                       "from this version's csrc/")
        return _load_error
    _kernels = kernels
    _loaded = True
    return None


def availability_error() -> Optional[str]:
    return _load()


def supports_device(device: Union[str, torch.device]) -> bool:
    return torch.device(device).type == "cpu"


def build_info() -> dict[str, str]:
    """The extension's build facts, e.g. ``{"kernels": "cpu,cuda", "cpu_isa": "avx2", ...}``."""
    try:
        text = torch.ops.fisherforget_C.build_info()
    except (AttributeError, RuntimeError):
        return {}
    return dict(item.split("=", 1) for item in text.split(";") if "=" in item)


def isa() -> str:
    """The CPU inner loops in use: ``"avx2"`` or ``"scalar"``."""
    return torch.ops.fisherforget_C.cpu_isa()


# ---------------------------------------------------------------------------------------- glue
# The ops are the extension's Python functions fisherforget._C.{fused_step, fisher_accumulate,
# fisher_score}: the same checks and kernels as torch.ops.fisherforget_C on CPU tensors, without
# the conversion of every tensor list that a torch.ops call costs (milliseconds for 2,000 params).


def _require():
    """The extension module, or a RuntimeError saying why it is not there."""
    error = _load()
    if error is not None:
        raise RuntimeError(f"backend 'cpu' is not available: {error}")
    return _kernels


@ops.register("fused_step", "cpu")
def fused_step(tensors: ops.StepTensors, hyper: ops.StepHyper,
               grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None) -> None:
    if backends.is_host_only("cpu"):  # the checks and the kernels are one call: all skipped
        return
    hyper, grad_scale, found_inf = step_scalars_on(hyper, grad_scale, found_inf, _CPU)
    (_kernels or _require()).fused_step(*tensors, *hyper.op_args(), grad_scale, found_inf)


@ops.register("fisher_accumulate", "cpu")
def fisher_accumulate(fishers: Sequence[Tensor], grads: Sequence[Tensor], *, alpha: float,
                      beta: float, grad_scale: Optional[Tensor] = None) -> None:
    if backends.is_host_only("cpu"):
        return
    grad_scale = scalar_on(grad_scale, _CPU, "grad_scale", torch.float32)
    (_kernels or _require()).fisher_accumulate(fishers, grads, alpha, beta, grad_scale)


@ops.register("fisher_score", "cpu")
def fisher_score(directions: Sequence[Tensor], grads: Sequence[Tensor],
                 fishers: Sequence[Tensor]) -> Tensor:
    if backends.is_host_only("cpu"):
        return torch.zeros(2, dtype=torch.float64)
    return (_kernels or _require()).fisher_score(directions, grads, fishers)
