"""Reference backend: the ops in readable PyTorch, one tensor at a time, on any device.

This is the ground truth of the package. It follows the math of :mod:`fisherforget.ops` line by line and mirrors
``torch.optim.AdamW``'s single-tensor path (``lerp`` for the first moment, ``addcmul`` for the
second, bias corrections in float64) so that with every Fisher feature off it matches AdamW to
rounding. It never synchronises with the host: ``found_inf``, ``grad_scale``, a tensor ``lr`` and
the step counts are used as device tensors, and a skipped step is a ``torch.where`` back to the old
values (bit-identical, since the old values are stored unchanged).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from fisherforget import backends, ops
from fisherforget.backends.staging import ScalarOnDevice


def _compute_dtype(t: Tensor) -> torch.dtype:
    # fp32 math for fp32/bf16/fp16; never downcast fp64 params.
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _where_kept(keep: Optional[Tensor], old: Tensor, new: Tensor) -> Tensor:
    return new if keep is None else torch.where(keep, old, new)


# Stochastic rounding of a bf16 Fisher (docs/design.md, "Low-precision Fisher"), the same bits as
# the kernels (csrc/ff_math.h: mix32, fisher_key, bf16_bits_stochastic): uint32 arithmetic done in
# int64, a product split in 16-bit halves so that it never overflows.
_MASK32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: Tensor) -> Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def round_fisher_bf16(value: Tensor, count_after: Tensor) -> Tensor:
    """``value`` (fp32) as a bf16 Fisher stores it: stochastically rounded, with the random bits
    of each element hashed from ``count_after`` (the tensor's Fisher count after this step) and
    the element's row-major index. Exact values stay exact; the expectation is ``value``."""
    key = _mix32(count_after.to(torch.int64) & _MASK32)
    index = torch.arange(value.numel(), dtype=torch.int64, device=value.device)
    random = _mix32((index & _MASK32) ^ key) & 0xFFFF
    bits = value.reshape(-1).view(torch.int32).to(torch.int64) & _MASK32
    rounded = (bits + random) & 0xFFFF0000
    rounded = torch.where(rounded > 0x7FFFFFFF, rounded - (1 << 32), rounded)
    rounded = rounded.to(torch.int32).view(torch.float32).view(value.shape)
    return torch.where(value.isnan(), value, rounded).to(torch.bfloat16)


@ops.register("fused_step", "reference")
def fused_step(
    tensors: ops.StepTensors,
    hyper: ops.StepHyper,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
) -> None:
    if backends.is_host_only("reference"):  # all of it is device work
        return
    (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, fishers, masks, steps,
     fisher_counts) = tensors
    lr, beta1, beta2, eps = hyper.lr, hyper.beta1, hyper.beta2, hyper.eps
    weight_decay, amsgrad, maximize = hyper.weight_decay, hyper.amsgrad, hyper.maximize
    fisher_mode, fisher_beta, fisher_scale = hyper.fisher_mode, hyper.fisher_beta, hyper.fisher_scale
    freeze_above, freeze_below = hyper.freeze_above, hyper.freeze_below
    found_inf_on = ScalarOnDevice(found_inf, "found_inf")
    grad_scale_on = ScalarOnDevice(grad_scale, "grad_scale")
    lr_on = ScalarOnDevice(lr, "lr") if isinstance(lr, Tensor) else None
    uses_fisher = len(fishers) > 0

    for i, param in enumerate(params):
        device = param.device
        cdt = _compute_dtype(param)
        skip = found_inf_on.on(device)
        skip = None if skip is None else skip > 0  # 0-dim bool: the whole step is skipped
        step_lr = lr_on.on(device) if lr_on is not None else lr
        if isinstance(step_lr, Tensor) and step_lr.dtype in (torch.bfloat16, torch.float16):
            # The math is fp32: a low-precision lr tensor is widened, not used to round
            # 1 - lr*wd (a bf16 1 - 1e-5 is 1.0, which would silently drop weight decay).
            step_lr = step_lr.float()

        g = grads[i].to(cdt)
        scale = grad_scale_on.on(device)
        if scale is not None:
            g = g / scale
        if maximize:
            g = -g

        # Step count t, incremented before use as in torch.optim.AdamW (not on a skipped step).
        step = steps[i]
        new_step = step + 1 if skip is None else step + (~skip).to(step.dtype)
        t = new_step.to(torch.float64)

        # Fisher accumulation: every element, frozen or not.
        fisher_old = fisher_new = count_new = None
        if uses_fisher:
            fisher_old = fishers[i].to(cdt)
            fisher_new = fisher_old
            if fisher_mode is not None:
                count = fisher_counts[i]
                count_new = count + 1 if skip is None else count + (~skip).to(count.dtype)
                if fisher_mode == "ema":
                    a, b = fisher_beta, 1.0 - fisher_beta
                elif fisher_mode == "mean":
                    n = count_new.to(cdt)
                    a, b = (n - 1) / n, 1 / n
                elif fisher_mode == "sum":
                    a, b = 1.0, 1.0
                else:
                    raise ValueError(f"unknown fisher mode {fisher_mode!r}")
                fisher_new = a * fisher_old + b * (g * g)

        # Freezing: True where the element keeps its param and moments this step.
        frozen = None
        if masks[i] is not None:
            frozen = ~masks[i]
        if freeze_above is not None:
            above = fisher_new > freeze_above
            frozen = above if frozen is None else frozen | above
        if freeze_below is not None:
            below = fisher_new < freeze_below
            frozen = below if frozen is None else frozen | below
        keep = frozen
        if skip is not None:
            keep = skip if keep is None else keep | skip

        # Decoupled weight decay and AdamW moments.
        p_old = param.to(cdt)
        m_old = exp_avgs[i].to(cdt)
        v_old = exp_avg_sqs[i].to(cdt)
        p_new = p_old * (1 - step_lr * weight_decay)
        m_new = m_old.lerp(g, 1 - beta1)
        v_new = v_old.mul(beta2).addcmul_(g, g, value=1 - beta2)
        if amsgrad:
            vmax_old = max_exp_avg_sqs[i].to(cdt)
            vmax_new = torch.maximum(vmax_old, v_new)
            second_moment = vmax_new
        else:
            second_moment = v_new

        bias_correction1 = 1 - beta1**t
        bias_correction2_sqrt = (1 - beta2**t).sqrt()
        step_size = (step_lr / bias_correction1).to(cdt)
        denom = (second_moment.sqrt() / bias_correction2_sqrt.to(cdt)).add_(eps)
        update = m_new / denom
        if uses_fisher and fisher_scale != 0:
            update = update / (1 + fisher_scale * fisher_new)
        p_new = p_new - step_size * update

        # Write back (rounding to the storage dtypes happens in copy_).
        param.copy_(_where_kept(keep, p_old, p_new))
        exp_avgs[i].copy_(_where_kept(keep, m_old, m_new))
        exp_avg_sqs[i].copy_(_where_kept(keep, v_old, v_new))
        if amsgrad:
            max_exp_avg_sqs[i].copy_(_where_kept(keep, vmax_old, vmax_new))
        if uses_fisher and fisher_mode is not None:
            if fishers[i].dtype == torch.bfloat16:
                fisher_new = round_fisher_bf16(fisher_new, count_new).to(cdt)
            fishers[i].copy_(_where_kept(skip, fisher_old, fisher_new))
            fisher_counts[i].copy_(count_new)
        step.copy_(new_step)


@ops.register("fisher_accumulate", "reference")
def fisher_accumulate(
    fishers: Sequence[Tensor],
    grads: Sequence[Tensor],
    *,
    alpha: float,
    beta: float,
    grad_scale: Optional[Tensor] = None,
) -> None:
    if backends.is_host_only("reference"):
        return
    scale_on = ScalarOnDevice(grad_scale, "grad_scale")
    for fisher, grad in zip(fishers, grads):
        cdt = _compute_dtype(fisher)
        g = grad.to(cdt)
        scale = scale_on.on(g.device)
        if scale is not None:
            g = g / scale
        fisher.copy_(alpha * fisher.to(cdt) + beta * (g * g))


@ops.register("fisher_score", "reference")
def fisher_score(
    directions: Sequence[Tensor], grads: Sequence[Tensor], fishers: Sequence[Tensor]
) -> Tensor:
    if not grads or backends.is_host_only("reference"):
        return torch.zeros(2, dtype=torch.float64)
    device = grads[0].device
    dot = torch.zeros((), dtype=torch.float64, device=device)
    weighted = torch.zeros((), dtype=torch.float64, device=device)
    for i, grad in enumerate(grads):
        g = grad.to(torch.float64)
        dot = dot + (directions[i].to(torch.float64) * g).sum()
        weighted = weighted + (fishers[i].to(torch.float64) * g * g).sum()
    return torch.stack([dot, weighted])
