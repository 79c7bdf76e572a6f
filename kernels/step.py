"""The fused Fisher-AdamW step: one pass over every element of a bucket of tensors.

Per element, in fp32 (``fisherforget.ops`` states the contract; ``docs/design.md``)::

    g = grad / grad_scale;  g = -g if maximize
    F = a*F + b*g^2                                  (when the Fisher accumulates)
    frozen = ~mask | F > freeze_above | F < freeze_below
    unfrozen: p = p*(1 - lr*wd); m = lerp(m, g, 1-beta1); v = beta2*v + (1-beta2)*g^2
              vmax = max(vmax, v) (amsgrad)
              p = p - lr/(1-beta1^t) * m / (sqrt(v)/sqrt(1-beta2^t) + eps) / (1 + fisher_scale*F)

Bytes per element (fp32 everything): reads p, g, m, v, F (20 B), writes p, m, v, F (16 B); a mask
adds 1 B, amsgrad 8 B. Frozen elements store nothing; a step skipped by ``found_inf`` loads and
stores nothing. Every hyperparameter is a runtime argument (changing lr, betas, eps, the Fisher
coefficients, thresholds, scale or ``maximize`` never recompiles); compile-time constants are only
the dtypes, which optional operands exist (amsgrad, Fisher, masks, tensor lr, grad scale,
found_inf), whether freezing is possible at all, address alignment, vector width and block size.

The step counts are advanced by a second, tiny kernel after the main one (one thread per tensor),
so that every program of the main kernel reads the old count and uses ``t = step + 1``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .multi_tensor import (
    EXACT_FP32,
    NO_LAUNCH,
    program_chunk,
    Rows,
    address_rows,
    build_tables,
    launch_config,
    on_device,
    split_by_alignment,
    triton_dtype,
    vector_elems,
)

__all__ = ["fused_step", "step_rows", "FIELDS"]

# Columns of the tensor table (the element count must stay last: see multi_tensor.build_tables).
_P, _G, _M, _V, _VMAX, _F, _MASK, _STEP, _COUNT, _NUMEL = range(10)
FIELDS = ("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "fisher", "mask", "step",
          "fisher_count", "numel")
N_FIELDS: tl.constexpr = tl.constexpr(10)
P_FIELD: tl.constexpr = tl.constexpr(_P)
G_FIELD: tl.constexpr = tl.constexpr(_G)
M_FIELD: tl.constexpr = tl.constexpr(_M)
V_FIELD: tl.constexpr = tl.constexpr(_V)
VMAX_FIELD: tl.constexpr = tl.constexpr(_VMAX)
F_FIELD: tl.constexpr = tl.constexpr(_F)
MASK_FIELD: tl.constexpr = tl.constexpr(_MASK)
STEP_FIELD: tl.constexpr = tl.constexpr(_STEP)
COUNT_FIELD: tl.constexpr = tl.constexpr(_COUNT)
NUMEL_FIELD: tl.constexpr = tl.constexpr(_NUMEL)


@triton.jit
def _mix32(x):
    """csrc/ff_math.h's mix32 on uint32 lanes (the random bits of a bf16 Fisher's rounding)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit(do_not_specialize=["blocks_per_chunk", "fisher_accumulates", "fisher_is_mean"])
def _fused_step_kernel(
    tensor_table_ptr, chunk_table_ptr,
    lr_ptr, grad_scale_ptr, found_inf_ptr,
    lr: tl.float64, decay: tl.float64, weight_decay: tl.float32,
    beta1: tl.float64, beta2: tl.float64, lerp_weight: tl.float32,
    beta2_f32: tl.float32, one_minus_beta2: tl.float32, eps: tl.float32, grad_sign: tl.float32,
    fisher_accumulates: tl.int32, fisher_is_mean: tl.int32,
    fisher_a: tl.float32, fisher_b: tl.float32, fisher_scale: tl.float32,
    freeze_above: tl.float32, freeze_below: tl.float32,
    blocks_per_chunk: tl.int32,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, M_DTYPE: tl.constexpr,
    V_DTYPE: tl.constexpr, VMAX_DTYPE: tl.constexpr, F_DTYPE: tl.constexpr,
    LR_IS_TENSOR: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    AMSGRAD: tl.constexpr, HAS_FISHER: tl.constexpr, ANY_MASK: tl.constexpr,
    FREEZES: tl.constexpr, ALIGNED: tl.constexpr, VEC: tl.constexpr, BLOCK: tl.constexpr,
):
    # This program's chunk: elements [chunk_start, chunk_start + chunk_len) of one tensor.
    # (Per-block helpers are inlined by hand: every device-function call costs the interpreter
    # dearly; this one runs once per program.)
    row, chunk_start, chunk_len = program_chunk(tensor_table_ptr, chunk_table_ptr,
                                                blocks_per_chunk, N_FIELDS, NUMEL_FIELD, BLOCK)
    n_blocks = tl.cdiv(chunk_len, BLOCK)

    # Operand base pointers from the tensor table. With ALIGNED (every address 16-byte aligned,
    # checked on the host) the block pointers below are marked aligned and contiguous, which
    # lets the compiler use 16-byte vector accesses (it cannot see through the table).
    p_ptr = tl.load(row + P_FIELD).to(tl.pointer_type(P_DTYPE)) + chunk_start
    g_ptr = tl.load(row + G_FIELD).to(tl.pointer_type(G_DTYPE)) + chunk_start
    m_ptr = tl.load(row + M_FIELD).to(tl.pointer_type(M_DTYPE)) + chunk_start
    v_ptr = tl.load(row + V_FIELD).to(tl.pointer_type(V_DTYPE)) + chunk_start
    step_ptr = tl.load(row + STEP_FIELD).to(tl.pointer_type(tl.float32))

    # Scalars are materialised with explicit dtypes so that the interpreter (which passes Python
    # floats through) computes in the same precision as a compiled kernel.
    wd_f = tl.full([], weight_decay, tl.float32)
    w_f = tl.full([], lerp_weight, tl.float32)
    one_minus_w_f = 1.0 - w_f
    w_is_small = tl.abs(w_f) < 0.5
    beta2_f = tl.full([], beta2_f32, tl.float32)
    one_minus_beta2_f = tl.full([], one_minus_beta2, tl.float32)
    eps_f = tl.full([], eps, tl.float32)
    sign_f = tl.full([], grad_sign, tl.float32)

    # Bias corrections in float64 from t = step + 1, as the reference (1 - beta^t).
    t = (tl.load(step_ptr) + 1.0).to(tl.float64)
    bias_correction1 = 1.0 - tl.exp(t * tl.log(tl.full([], beta1, tl.float64)))
    bias_correction2_sqrt = tl.sqrt(
        1.0 - tl.exp(t * tl.log(tl.full([], beta2, tl.float64)))
    ).to(tl.float32)
    if LR_IS_TENSOR:
        lr_value = tl.load(lr_ptr)
        step_size = (lr_value.to(tl.float64) / bias_correction1).to(tl.float32)
        decay_f = (1.0 - lr_value * wd_f).to(tl.float32)
    else:
        step_size = (tl.full([], lr, tl.float64) / bias_correction1).to(tl.float32)
        decay_f = tl.full([], decay, tl.float64).to(tl.float32)

    active = tl.full([], 1, tl.int1)
    if HAS_FOUND_INF:
        # (written with where: the interpreter mistypes a bool from a loaded-scalar comparison)
        active = tl.where(tl.load(found_inf_ptr).to(tl.float32) > 0.0, 0, 1) != 0
    if HAS_GRAD_SCALE:
        grad_scale = tl.load(grad_scale_ptr).to(tl.float32)

    if AMSGRAD:
        vmax_ptr = tl.load(row + VMAX_FIELD).to(tl.pointer_type(VMAX_DTYPE)) + chunk_start
    if HAS_FISHER:
        f_ptr = tl.load(row + F_FIELD).to(tl.pointer_type(F_DTYPE)) + chunk_start
        accumulates = fisher_accumulates != 0
        above_f = tl.full([], freeze_above, tl.float32)  # +inf when unset
        below_f = tl.full([], freeze_below, tl.float32)  # -inf when unset
        fisher_scale_f = tl.full([], fisher_scale, tl.float32)
        scales = fisher_scale_f != 0.0
        # mean: a = (n-1)/n, b = 1/n with n = count + 1 accumulations, per tensor.
        is_mean = fisher_is_mean != 0
        count_ptr = tl.load(row + COUNT_FIELD).to(tl.pointer_type(tl.float32))
        n = tl.load(count_ptr, mask=accumulates, other=0.0) + 1.0
        if F_DTYPE == tl.bfloat16:
            # Stochastic rounding of the stored Fisher: key from the count after this step.
            fisher_key = _mix32(n.to(tl.uint32))
        a_f = tl.where(is_mean, tl.div_rn(n - 1.0, n), tl.full([], fisher_a, tl.float32))
        b_f = tl.where(is_mean, tl.div_rn(tl.full([], 1.0, tl.float32), n),
                       tl.full([], fisher_b, tl.float32))
    if ANY_MASK:
        mask_address = tl.load(row + MASK_FIELD)
        has_mask = mask_address != 0
        mask_ptr = mask_address.to(tl.pointer_type(tl.int8)) + chunk_start

    # With ALIGNED, every operand is accessed VEC elements at a time (VEC = 16 bytes of the
    # widest operand dtype): one register layout for all operands, so that mixing bf16 params
    # with fp32 state needs no layout conversion through shared memory.
    P_ALIGN: tl.constexpr = VEC * (P_DTYPE.primitive_bitwidth // 8)
    G_ALIGN: tl.constexpr = VEC * (G_DTYPE.primitive_bitwidth // 8)
    M_ALIGN: tl.constexpr = VEC * (M_DTYPE.primitive_bitwidth // 8)
    V_ALIGN: tl.constexpr = VEC * (V_DTYPE.primitive_bitwidth // 8)
    VMAX_ALIGN: tl.constexpr = VEC * (VMAX_DTYPE.primitive_bitwidth // 8)
    F_ALIGN: tl.constexpr = VEC * (F_DTYPE.primitive_bitwidth // 8)

    # Full blocks first, then the partial tail block (if any). Only the tail needs a mask per
    # element; in full blocks the mask is uniform, which keeps 16-byte vector accesses possible.
    n_full = chunk_len // BLOCK
    for tail in tl.static_range(2):
        if tail == 0:
            first_block = 0
            end_block = n_full
        else:
            first_block = n_full
            end_block = n_blocks
        for block_index in range(first_block, end_block):
            offsets = block_index * BLOCK + tl.arange(0, BLOCK)
            if tail == 0:
                live = tl.broadcast_to(active, [BLOCK])  # uniform: only found_inf masks
            else:
                live = (offsets < chunk_len) & active
            p_ptrs = p_ptr + offsets
            g_ptrs = g_ptr + offsets
            m_ptrs = m_ptr + offsets
            v_ptrs = v_ptr + offsets
            if ALIGNED:
                p_ptrs = tl.max_contiguous(tl.multiple_of(p_ptrs, P_ALIGN), VEC)
                g_ptrs = tl.max_contiguous(tl.multiple_of(g_ptrs, G_ALIGN), VEC)
                m_ptrs = tl.max_contiguous(tl.multiple_of(m_ptrs, M_ALIGN), VEC)
                v_ptrs = tl.max_contiguous(tl.multiple_of(v_ptrs, V_ALIGN), VEC)

            # Every load is issued up front (freezing must not delay the moment loads).
            g = tl.load(g_ptrs, mask=live, other=0.0).to(tl.float32)
            p = tl.load(p_ptrs, mask=live, other=0.0).to(tl.float32)
            m = tl.load(m_ptrs, mask=live, other=0.0).to(tl.float32)
            v = tl.load(v_ptrs, mask=live, other=0.0).to(tl.float32)
            if AMSGRAD:
                vmax_ptrs = vmax_ptr + offsets
                if ALIGNED:
                    vmax_ptrs = tl.max_contiguous(tl.multiple_of(vmax_ptrs, VMAX_ALIGN), VEC)
                vmax = tl.load(vmax_ptrs, mask=live, other=0.0).to(tl.float32)
            if HAS_FISHER:
                f_ptrs = f_ptr + offsets
                if ALIGNED:
                    f_ptrs = tl.max_contiguous(tl.multiple_of(f_ptrs, F_ALIGN), VEC)
                f_old = tl.load(f_ptrs, mask=live, other=0.0).to(tl.float32)
            if ANY_MASK:
                mask_ptrs = mask_ptr + offsets
                if ALIGNED:
                    mask_ptrs = tl.max_contiguous(tl.multiple_of(mask_ptrs, VEC), VEC)
                mask_bytes = tl.load(mask_ptrs, mask=live & has_mask, other=1)

            if HAS_GRAD_SCALE:
                g = tl.div_rn(g, grad_scale)
            g = g * sign_f

            if HAS_FISHER:
                f_accumulated = a_f * f_old + b_f * (g * g)
                f_new = tl.where(accumulates, f_accumulated, f_old)
                if F_DTYPE == tl.bfloat16:
                    # bits + 16 random bits, truncated: unbiased (csrc/ff_math.h; NaN kept).
                    index = (chunk_start + offsets).to(tl.uint32)
                    random = _mix32(index ^ fisher_key) & 0xFFFF
                    bits = (f_new.to(tl.uint32, bitcast=True) + random) & 0xFFFF0000
                    f_store = tl.where(f_new != f_new, f_new,
                                       bits.to(tl.float32, bitcast=True)).to(F_DTYPE)
                else:
                    f_store = f_new.to(F_DTYPE)
                tl.store(f_ptrs, f_store, mask=live & accumulates)
            # Frozen elements store nothing. Freezing is compiled in only when a mask or a
            # threshold is set: a per-element store mask rules out vector stores.
            updates = live
            if FREEZES:
                frozen = tl.zeros([BLOCK], dtype=tl.int1)
                if HAS_FISHER:
                    frozen = frozen | (f_new > above_f) | (f_new < below_f)
                if ANY_MASK:
                    frozen = frozen | (mask_bytes == 0)
                updates = live & ~frozen

            p_new = p * decay_f
            # torch.lerp: interpolate from the nearer end for accuracy.
            m_new = tl.where(w_is_small, m + w_f * (g - m), g - (g - m) * one_minus_w_f)
            v_new = v * beta2_f + (one_minus_beta2_f * g) * g
            second_moment = v_new
            if AMSGRAD:
                vmax_new = tl.maximum(vmax, v_new, propagate_nan=tl.PropagateNan.ALL)
                second_moment = vmax_new
            denom = tl.div_rn(tl.sqrt_rn(second_moment), bias_correction2_sqrt) + eps_f
            update = tl.div_rn(m_new, denom)
            if HAS_FISHER:
                update = tl.where(
                    scales, tl.div_rn(update, 1.0 + fisher_scale_f * f_new), update
                )
            p_new = p_new - step_size * update

            tl.store(p_ptrs, p_new.to(P_DTYPE), mask=updates)
            tl.store(m_ptrs, m_new.to(M_DTYPE), mask=updates)
            tl.store(v_ptrs, v_new.to(V_DTYPE), mask=updates)
            if AMSGRAD:
                tl.store(vmax_ptrs, vmax_new.to(VMAX_DTYPE), mask=updates)


@triton.jit(do_not_specialize=["n_tensors", "fisher_accumulates"])
def _advance_counters_kernel(
    tensor_table_ptr, found_inf_ptr, n_tensors: tl.int32, fisher_accumulates: tl.int32,
    HAS_FOUND_INF: tl.constexpr, BLOCK: tl.constexpr,
):
    index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = index < n_tensors
    rows = tensor_table_ptr + index.to(tl.int64) * N_FIELDS
    increment = tl.full([], 1.0, tl.float32)
    if HAS_FOUND_INF:
        increment = tl.where(tl.load(found_inf_ptr).to(tl.float32) > 0.0, 0.0, 1.0)
    step_ptrs = tl.load(rows + STEP_FIELD, mask=valid, other=0).to(tl.pointer_type(tl.float32))
    steps = tl.load(step_ptrs, mask=valid, other=0.0)
    tl.store(step_ptrs, steps + increment, mask=valid)
    count_addresses = tl.load(rows + COUNT_FIELD, mask=valid, other=0)
    counted = valid & (count_addresses != 0) & (fisher_accumulates != 0)
    count_ptrs = count_addresses.to(tl.pointer_type(tl.float32))
    counts = tl.load(count_ptrs, mask=counted, other=0.0)
    tl.store(count_ptrs, counts + increment, mask=counted)


_COUNTERS_BLOCK = 128


def step_rows(tensors, hyper) -> Rows:
    """The host table rows (columns :data:`FIELDS`) of a fused-step bucket, and whether it is
    regular (contiguous, one dtype per list, one device) as :func:`fused_step` requires."""
    (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, fishers, masks, steps,
     fisher_counts) = tensors
    has_fisher = len(fishers) > 0
    accumulates = has_fisher and hyper.fisher_mode is not None
    return address_rows(
        [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if hyper.amsgrad else None,
         fishers if has_fisher else None, masks, steps, fisher_counts if accumulates else None],
        aligned_columns=_MASK + 1)


def fused_step(
    tensors,
    hyper,
    grad_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
    rows: Optional[Rows] = None,
    launch: bool = True,
) -> None:
    """One launch of the fused step (plus the counter kernel) over one bucket (two when it mixes
    16-byte aligned and misaligned tensors).

    ``tensors`` holds the nine lists of ``fisherforget.ops.StepTensors`` and ``hyper`` is a
    ``fisherforget.ops.StepHyper``. The caller (``fisherforget.backends.triton``) has validated
    the arguments: every tensor is contiguous and on one device, each list has one dtype, masks
    are bool, ``steps`` and ``fisher_counts`` are 0-dim fp32, ``lr``/``grad_scale``/``found_inf``
    tensors are on the device. ``fishers`` is empty when no Fisher is used; ``fisher_counts`` may
    be empty when the Fisher does not accumulate. ``rows`` are :func:`step_rows` of ``tensors``
    when the caller has them already. ``launch=False``: everything but the launches (the host
    work that ``backends.host_only`` measures).
    """
    if len(tensors.params) == 0:
        return
    if rows is None:
        rows = step_rows(tensors, hyper)
    split = split_by_alignment(rows, _MASK + 1)
    if split is None:
        _launch(tensors, hyper, rows.rows, rows.aligned, grad_scale, found_inf, launch)
        return
    for index, aligned in zip(split, (True, False)):
        part = type(tensors)(*[[values[i] for i in index] if values else values
                               for values in tensors])
        _launch(part, hyper, rows.rows[index], aligned, grad_scale, found_inf, launch)


def _launch(tensors, hyper, rows: torch.Tensor, aligned: bool,
            grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor],
            launch: bool) -> None:
    (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, fishers, masks, steps,
     fisher_counts) = tensors
    lr, beta1, beta2, eps = hyper.lr, hyper.beta1, hyper.beta2, hyper.eps
    weight_decay, amsgrad, maximize = hyper.weight_decay, hyper.amsgrad, hyper.maximize
    fisher_mode, fisher_beta, fisher_scale = hyper.fisher_mode, hyper.fisher_beta, hyper.fisher_scale
    freeze_above, freeze_below = hyper.freeze_above, hyper.freeze_below
    n_tensors = len(params)
    device = params[0].device
    has_fisher = len(fishers) > 0
    accumulates = has_fisher and fisher_mode is not None
    any_mask = bool(rows[:, _MASK].any())
    config = launch_config(rows[:, _NUMEL], device)
    tables = build_tables(rows, config.chunk_elems, device, aligned=aligned)

    if fisher_mode == "ema":
        fisher_a, fisher_b = fisher_beta, 1.0 - fisher_beta
    else:  # sum; mean computes its weights per tensor in the kernel; None never reads them
        fisher_a, fisher_b = 1.0, 1.0
    lr_is_tensor = isinstance(lr, torch.Tensor)
    lr_float = 0.0 if lr_is_tensor else float(lr)
    placeholder = tables.tensors  # stands in for absent pointer arguments (never read)
    step_kernel = _fused_step_kernel if launch else NO_LAUNCH
    counters_kernel = _advance_counters_kernel if launch else NO_LAUNCH

    with on_device(device):
        if tables.n_chunks:
            step_kernel[(tables.n_chunks,)](
                tables.tensors, tables.chunks,
                lr if lr_is_tensor else placeholder,
                grad_scale if grad_scale is not None else placeholder,
                found_inf if found_inf is not None else placeholder,
                lr_float, 1.0 - lr_float * weight_decay, float(weight_decay),
                float(beta1), float(beta2), 1.0 - beta1,
                float(beta2), 1.0 - beta2, float(eps), -1.0 if maximize else 1.0,
                int(accumulates), int(accumulates and fisher_mode == "mean"),
                float(fisher_a), float(fisher_b), float(fisher_scale),
                math.inf if freeze_above is None else float(freeze_above),
                -math.inf if freeze_below is None else float(freeze_below),
                config.blocks_per_chunk,
                P_DTYPE=triton_dtype(params[0].dtype),
                G_DTYPE=triton_dtype(grads[0].dtype),
                M_DTYPE=triton_dtype(exp_avgs[0].dtype),
                V_DTYPE=triton_dtype(exp_avg_sqs[0].dtype),
                VMAX_DTYPE=triton_dtype(max_exp_avg_sqs[0].dtype) if amsgrad else tl.float32,
                F_DTYPE=triton_dtype(fishers[0].dtype) if has_fisher else tl.float32,
                LR_IS_TENSOR=lr_is_tensor,
                HAS_GRAD_SCALE=grad_scale is not None,
                HAS_FOUND_INF=found_inf is not None,
                AMSGRAD=bool(amsgrad), HAS_FISHER=has_fisher, ANY_MASK=any_mask,
                FREEZES=any_mask or freeze_above is not None or freeze_below is not None,
                ALIGNED=tables.aligned,
                VEC=vector_elems([params[0], grads[0], exp_avgs[0], exp_avg_sqs[0]]
                                 + ([max_exp_avg_sqs[0]] if amsgrad else [])
                                 + ([fishers[0]] if has_fisher else [])),
                BLOCK=config.block, num_warps=config.num_warps, **EXACT_FP32,
            )
        counters_kernel[(triton.cdiv(n_tensors, _COUNTERS_BLOCK),)](
            tables.tensors, found_inf if found_inf is not None else placeholder,
            n_tensors, int(accumulates),
            HAS_FOUND_INF=found_inf is not None, BLOCK=_COUNTERS_BLOCK, num_warps=1,
        )

