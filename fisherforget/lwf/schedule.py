"""When to unlearn and what: the periodic schedule and the top-fraction selection of ``D_self``."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

__all__ = ["UnlearningSchedule", "select"]


@dataclass(frozen=True)
class UnlearningSchedule:
    """Fine-tune normally; after learning step ``t`` (1-based count of optimizer steps) run
    ``steps`` unlearning steps when ``t >= max(warmup, 1)`` and ``(t - warmup) % every == 0``.

    So with ``warmup=100, every=50`` unlearning follows steps 100, 150, 200, ...; with ``warmup=0``
    it follows 50, 100, ... Nothing fires during warm-up (``t < warmup``).

    ``rescore_every``: recompute the forgetting confidence (and the selection) before a phase when
    at least this many learning steps passed since the last scoring; ``None`` scores once, at the
    first phase. ``early=True`` is the control that runs every unlearning step before fine-tuning
    (:meth:`total_unlearning_steps` of them at step 0) and none during it.
    """

    every: int = 50
    steps: int = 5
    warmup: int = 0
    rescore_every: Optional[int] = None
    early: bool = False

    def __post_init__(self) -> None:
        for name in ("every", "steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Invalid {name}: {value!r} (must be an int >= 1)")
        if not isinstance(self.warmup, int) or isinstance(self.warmup, bool) or self.warmup < 0:
            raise ValueError(f"Invalid warmup: {self.warmup!r} (must be an int >= 0)")
        if self.rescore_every is not None and (
            not isinstance(self.rescore_every, int) or self.rescore_every < 1
        ):
            raise ValueError(
                f"Invalid rescore_every: {self.rescore_every!r} (must be None or >= 1)"
            )
        if not isinstance(self.early, bool):
            raise TypeError(f"Invalid early: {self.early!r} (must be a bool)")

    def fires(self, step: int) -> bool:
        """Whether an unlearning phase follows learning step ``step`` (never in early mode)."""
        if self.early:
            return False
        return step >= max(self.warmup, 1) and (step - self.warmup) % self.every == 0

    def phases(self, total_steps: int) -> int:
        """How many phases the periodic schedule runs in ``total_steps`` learning steps."""
        if total_steps < max(self.warmup, 1):
            return 0
        return (total_steps - self.warmup) // self.every + (1 if self.warmup >= 1 else 0)

    def total_unlearning_steps(self, total_steps: int) -> int:
        """Unlearning steps of the periodic schedule over ``total_steps`` (the budget of the
        early variant)."""
        return self.phases(total_steps) * self.steps

    def needs_rescore(self, step: int, last_scored: Optional[int]) -> bool:
        """Whether to (re)compute the scores before the phase after step ``step``."""
        if last_scored is None:
            return True
        return self.rescore_every is not None and step - last_scored >= self.rescore_every


def select(scores: Tensor, fraction: float, *, positive_only: bool = False) -> Tensor:
    """Indices of the top ``fraction`` of ``scores`` (``round(fraction * len(scores))`` of them,
    at least one), highest first; ties keep the lower index first. ``positive_only`` then keeps
    only those with a score > 0 (possibly none: an empty index tensor).

    Non-finite scores: ``+inf`` ranks first and ``-inf`` after every finite score. A NaN score
    (an overflow, a NaN direction, ``eta=inf``) ranks last, below ``-inf``, so it is never
    chosen ahead of a number: NaN samples are selected only when the fraction reaches past every
    number (then in index order), and never with ``positive_only``. All-NaN scores are a
    :class:`ValueError`: they rank nothing, and unlearning arbitrary samples would be wrong."""
    if (not isinstance(fraction, numbers.Real) or isinstance(fraction, bool)
            or not 0 < fraction <= 1):
        raise ValueError(f"Invalid fraction: {fraction!r} (must be in (0, 1])")
    if not isinstance(scores, Tensor) or scores.dim() != 1 or scores.numel() == 0:
        raise ValueError("select: scores must be a non-empty 1-D tensor")
    nan = torch.isnan(scores)
    if bool(nan.all()):
        raise ValueError(f"select: all {scores.numel()} scores are NaN (the scoring diverged); "
                         "nothing can be ranked")
    count = max(1, int(round(fraction * scores.numel())))
    # Sort the numbers (stable, highest first), then append the NaNs in index order.
    order = torch.sort(scores.masked_fill(nan, 0.0), descending=True, stable=True).indices
    order = torch.cat([order[~nan[order]], torch.nonzero(nan).flatten()])[:count]
    if positive_only:
        order = order[scores[order] > 0]
    return order
