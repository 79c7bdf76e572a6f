"""Shared helpers for the step tests of every backend: calling the op from plain keyword dicts,
and the one ulp measure the comparisons use."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from fisherforget import ops


def ulp(x: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """One unit in the last place of each value of ``x`` in ``dtype``'s precision (default:
    ``x.dtype``), as float64: the spacing of that dtype's floats at the value's magnitude
    (subnormals get the spacing at the smallest normal)."""
    dtype = x.dtype if dtype is None else dtype
    finfo = torch.finfo(dtype)
    magnitude = x.detach().double().abs().clamp_min(finfo.tiny)
    return torch.exp2(torch.floor(torch.log2(magnitude))) * finfo.eps


def run_step(lists: Sequence, kwargs: dict, backend: str) -> None:
    """``ops.fused_step`` on the nine lists of ``lists`` with the hyperparameters of ``kwargs``
    (``StepHyper`` fields, plus ``grad_scale``/``found_inf`` if given)."""
    kw = dict(kwargs)
    grad_scale, found_inf = kw.pop("grad_scale", None), kw.pop("found_inf", None)
    ops.fused_step(ops.StepTensors(*lists), ops.StepHyper(**kw), grad_scale=grad_scale,
                   found_inf=found_inf, backend=backend)
