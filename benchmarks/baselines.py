"""Every baseline the benchmarks compare against, in one place.

* ``torch_adamw``: ``torch.optim.AdamW`` with ``foreach=True`` or ``fused=True`` (Fisher off).
  torch keeps AdamW state in the param dtype: for bf16 params its moments are bf16.
* ``FisherAdamWComposition``: what a user would write without fisherforget to get the same
  semantics as ``FisherAdamW(fisher="ema")`` (+ a mask): ``torch.optim.AdamW(fused=True)`` plus a
  foreach Fisher EMA (``_foreach_mul_`` + ``_foreach_addcmul_``) plus, with a mask, restoring the
  frozen elements' param and moments (snapshot before the step, ``_foreach_lerp_`` with the
  frozen-mask as weight after it; lerp with weight 0 or 1 is exact). Multiplying the gradient by
  the mask instead would be cheaper but is *not* freezing: the moments keep decaying and weight
  decay and momentum still move a masked element.
* ``plain_fisher_score``: ``[sum <d, g>, sum <F, g^2>]`` with one ``torch.dot`` pair per tensor
  (fp32 accumulation, summed in float64).
* ``plain_fisher_accumulate``: ``F = alpha*F + beta*g^2`` with ``_foreach_mul_`` +
  ``_foreach_addcmul_``.

``tests/bench/test_baselines.py`` checks each against the reference backend.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = [
    "torch_adamw",
    "FisherAdamWComposition",
    "plain_fisher_score",
    "plain_fisher_accumulate",
]


def torch_adamw(
    params: Sequence[Tensor], *, impl: str, lr: float, betas: tuple[float, float], eps: float,
    weight_decay: float,
) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` with ``impl`` = ``"foreach"`` or ``"fused"``."""
    if impl not in ("foreach", "fused"):
        raise ValueError(f"impl must be 'foreach' or 'fused', got {impl!r}")
    return torch.optim.AdamW(
        list(params), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
        foreach=impl == "foreach", fused=impl == "fused",
    )


class FisherAdamWComposition:
    """Fused ``torch.optim.AdamW`` + foreach Fisher EMA + (optional) mask freezing.

    Same semantics as ``FisherAdamW(fisher="ema", fisher_scale=0)`` with ``set_mask``, except
    that torch keeps the moments in the param dtype (bf16 moments for bf16 params). Persistent
    buffers (the Fisher, the frozen-weight masks, the snapshots) are allocated once, as a careful
    user would.
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        *,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        fisher_beta: float,
        masks: Optional[Sequence[Tensor]] = None,
        fisher_dtype: torch.dtype = torch.float32,
    ):
        self.params = list(params)
        self.fisher_beta = fisher_beta
        self.adamw = torch_adamw(
            self.params, impl="fused", lr=lr, betas=betas, eps=eps, weight_decay=weight_decay
        )
        # Initialise AdamW's state now (as its first step would) so the snapshots can pair with it.
        for p in self.params:
            state = self.adamw.state[p]
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        self.exp_avgs = [self.adamw.state[p]["exp_avg"] for p in self.params]
        self.exp_avg_sqs = [self.adamw.state[p]["exp_avg_sq"] for p in self.params]
        self.fishers = [torch.zeros(p.shape, dtype=fisher_dtype, device=p.device)
                        for p in self.params]
        self.masked = masks is not None
        if self.masked:
            if len(masks) != len(self.params):
                raise ValueError("masks must have one entry per param")
            # Weight 1 where frozen (lerp back to the snapshot), 0 where updated. The moments
            # share the params' weight tensor when their dtypes agree.
            self.frozen_weights = [(~m).to(p.dtype) for m, p in zip(masks, self.params)]
            self.frozen_state_weights = [
                w if w.dtype == s.dtype else w.to(s.dtype)
                for w, s in zip(self.frozen_weights, self.exp_avgs)
            ]
            self.snapshots = {
                name: [torch.empty_like(t) for t in tensors]
                for name, tensors in (("param", self.params), ("exp_avg", self.exp_avgs),
                                      ("exp_avg_sq", self.exp_avg_sqs))
            }

    @torch.no_grad()
    def step(self) -> None:
        params = [p for p in self.params if p.grad is not None]
        if len(params) != len(self.params):
            raise RuntimeError("the composition baseline expects a gradient for every param")
        grads = [p.grad for p in params]
        torch._foreach_mul_(self.fishers, self.fisher_beta)
        torch._foreach_addcmul_(self.fishers, grads, grads, value=1.0 - self.fisher_beta)
        if self.masked:
            torch._foreach_copy_(self.snapshots["param"], self.params)
            torch._foreach_copy_(self.snapshots["exp_avg"], self.exp_avgs)
            torch._foreach_copy_(self.snapshots["exp_avg_sq"], self.exp_avg_sqs)
        self.adamw.step()
        if self.masked:
            torch._foreach_lerp_(self.params, self.snapshots["param"], self.frozen_weights)
            torch._foreach_lerp_(self.exp_avgs, self.snapshots["exp_avg"],
                                 self.frozen_state_weights)
            torch._foreach_lerp_(self.exp_avg_sqs, self.snapshots["exp_avg_sq"],
                                 self.frozen_state_weights)

    def state_tensors(self) -> dict[str, list[Tensor]]:
        """Every persistent buffer, by role (for the optimizer-state bytes per param)."""
        out: dict[str, list[Tensor]] = {
            "step": [self.adamw.state[p]["step"] for p in self.params],
            "exp_avg": self.exp_avgs,
            "exp_avg_sq": self.exp_avg_sqs,
            "fisher": self.fishers,
        }
        if self.masked:
            out["frozen_weight"] = self.frozen_weights
            out["frozen_state_weight"] = [
                w for w, pw in zip(self.frozen_state_weights, self.frozen_weights) if w is not pw
            ]
            for name, tensors in self.snapshots.items():
                out[f"snapshot_{name}"] = tensors
        return out


def plain_fisher_score(
    directions: Sequence[Tensor], grads: Sequence[Tensor], fishers: Sequence[Tensor]
) -> Tensor:
    """``[sum_i <d_i, g_i>, sum_i <F_i, g_i^2>]`` as float64 on the tensors' device."""
    if not grads:
        return torch.zeros(2, dtype=torch.float64)
    dots, weighted = [], []
    for d, g, f in zip(directions, grads, fishers):
        g32 = g.reshape(-1).float()
        dots.append(torch.dot(d.reshape(-1).float(), g32))
        weighted.append(torch.dot(f.reshape(-1).float(), g32 * g32))
    return torch.stack([
        torch.stack(dots).sum(dtype=torch.float64),
        torch.stack(weighted).sum(dtype=torch.float64),
    ])


@torch.no_grad()
def plain_fisher_accumulate(
    fishers: Sequence[Tensor], grads: Sequence[Tensor], *, alpha: float, beta: float
) -> None:
    """In place: ``F = alpha * F + beta * g^2`` for every pair."""
    torch._foreach_mul_(list(fishers), alpha)
    torch._foreach_addcmul_(list(fishers), list(grads), list(grads), value=beta)
