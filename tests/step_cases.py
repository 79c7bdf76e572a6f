"""Shared helpers for the step tests of every backend: calling the op from plain keyword dicts."""

from __future__ import annotations

from typing import Sequence

from fisherforget import ops


def run_step(lists: Sequence, kwargs: dict, backend: str) -> None:
    """``ops.fused_step`` on the nine lists of ``lists`` with the hyperparameters of ``kwargs``
    (``StepHyper`` fields, plus ``grad_scale``/``found_inf`` if given)."""
    kw = dict(kwargs)
    grad_scale, found_inf = kw.pop("grad_scale", None), kw.pop("found_inf", None)
    ops.fused_step(ops.StepTensors(*lists), ops.StepHyper(**kw), grad_scale=grad_scale,
                   found_inf=found_inf, backend=backend)
