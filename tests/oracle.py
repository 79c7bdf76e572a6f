"""An independent float64 oracle of one Fisher-AdamW step (docs/design.md), for tests.

Written from docs/design.md, not from the reference backend: plain float64 arithmetic on copies,
returning the new values instead of mutating anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class OracleState:
    param: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    max_exp_avg_sq: Optional[torch.Tensor]
    fisher: Optional[torch.Tensor]
    step: int
    fisher_count: int


def oracle_step(
    state: OracleState,
    grad: torch.Tensor,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    amsgrad: bool = False,
    maximize: bool = False,
    fisher: Optional[str] = None,
    fisher_beta: float = 0.99,
    fisher_scale: float = 0.0,
    freeze_above: Optional[float] = None,
    freeze_below: Optional[float] = None,
    mask: Optional[torch.Tensor] = None,
    grad_scale: float = 1.0,
    found_inf: bool = False,
) -> tuple[OracleState, torch.Tensor]:
    """Return (new state, frozen) in float64; ``frozen`` marks elements left unchanged."""
    d = torch.float64
    p = state.param.to(d)
    m = state.exp_avg.to(d)
    v = state.exp_avg_sq.to(d)
    vmax = None if state.max_exp_avg_sq is None else state.max_exp_avg_sq.to(d)
    F = None if state.fisher is None else state.fisher.to(d)
    if found_inf:
        return state, torch.ones_like(p, dtype=torch.bool)
    beta1, beta2 = betas
    g = grad.to(d) / grad_scale
    if maximize:
        g = -g
    t = state.step + 1
    n = state.fisher_count
    if fisher is not None:
        n += 1
        if fisher == "ema":
            a, b = fisher_beta, 1 - fisher_beta
        elif fisher == "mean":
            a, b = (n - 1) / n, 1 / n
        else:
            a, b = 1.0, 1.0
        F = a * F + b * g * g
    frozen = torch.zeros_like(p, dtype=torch.bool)
    if mask is not None:
        frozen |= ~mask
    if freeze_above is not None:
        frozen |= F > freeze_above
    if freeze_below is not None:
        frozen |= F < freeze_below
    p_new = p * (1 - lr * weight_decay)
    m_new = beta1 * m + (1 - beta1) * g
    v_new = beta2 * v + (1 - beta2) * g * g
    second = v_new
    vmax_new = None
    if amsgrad:
        vmax_new = torch.maximum(vmax, v_new)
        second = vmax_new
    denom = second.sqrt() / math.sqrt(1 - beta2**t) + eps
    s = 1.0 / (1.0 + fisher_scale * F) if fisher_scale != 0 else 1.0
    p_new = p_new - (lr / (1 - beta1**t)) * s * m_new / denom

    def keep(old, new):
        return None if old is None else torch.where(frozen, old, new)

    return (
        OracleState(
            param=keep(p, p_new),
            exp_avg=keep(m, m_new),
            exp_avg_sq=keep(v, v_new),
            max_exp_avg_sq=keep(vmax, vmax_new),
            fisher=F,
            step=t,
            fisher_count=n,
        ),
        frozen,
    )
