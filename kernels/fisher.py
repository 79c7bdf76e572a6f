"""Fisher accumulation and the Fisher score over many tensors per launch.

``fisher_accumulate``: ``F = alpha*F + beta*(g/grad_scale)^2`` in fp32 (reads F, g; writes F).

``fisher_score``: ``[sum_i d_i*g_i, sum_i F_i*g_i^2]`` over every element of every tensor.
Products and sums are float64. The reduction is deterministic: each program writes the two sums
of its chunk (a fixed number of blocks, whatever the GPU) to its own slot of a partials buffer
(a fixed-shape tree reduction inside the program), and a second one-program kernel adds the
partials in a fixed order. No atomics.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from .multi_tensor import (
    EXACT_FP32,
    program_chunk,
    address_rows,
    build_tables,
    launch_config,
    vector_elems,
    on_device,
    split_by_alignment,
    triton_dtype,
)

__all__ = ["fisher_accumulate", "fisher_score"]

# Tensor-table columns (element count last).
ACC_N_FIELDS: tl.constexpr = tl.constexpr(3)
ACC_F_FIELD: tl.constexpr = tl.constexpr(0)
ACC_G_FIELD: tl.constexpr = tl.constexpr(1)
ACC_NUMEL_FIELD: tl.constexpr = tl.constexpr(2)

SCORE_N_FIELDS: tl.constexpr = tl.constexpr(4)
SCORE_D_FIELD: tl.constexpr = tl.constexpr(0)
SCORE_G_FIELD: tl.constexpr = tl.constexpr(1)
SCORE_F_FIELD: tl.constexpr = tl.constexpr(2)
SCORE_NUMEL_FIELD: tl.constexpr = tl.constexpr(3)


@triton.jit(do_not_specialize=["blocks_per_chunk"])
def _fisher_accumulate_kernel(
    tensor_table_ptr, chunk_table_ptr, grad_scale_ptr,
    alpha: tl.float32, beta: tl.float32, blocks_per_chunk: tl.int32,
    F_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
    ALIGNED: tl.constexpr, VEC: tl.constexpr, BLOCK: tl.constexpr,
):
    F_ALIGN: tl.constexpr = VEC * (F_DTYPE.primitive_bitwidth // 8)
    G_ALIGN: tl.constexpr = VEC * (G_DTYPE.primitive_bitwidth // 8)
    # (Inlined like the fused step: device-function calls are slow in the interpreter.)
    row, chunk_start, chunk_len = program_chunk(tensor_table_ptr, chunk_table_ptr,
                                                blocks_per_chunk, ACC_N_FIELDS, ACC_NUMEL_FIELD,
                                                BLOCK)
    f_ptr = tl.load(row + ACC_F_FIELD).to(tl.pointer_type(F_DTYPE)) + chunk_start
    g_ptr = tl.load(row + ACC_G_FIELD).to(tl.pointer_type(G_DTYPE)) + chunk_start
    alpha_f = tl.full([], alpha, tl.float32)
    beta_f = tl.full([], beta, tl.float32)
    if HAS_GRAD_SCALE:
        grad_scale = tl.load(grad_scale_ptr).to(tl.float32)
    # Full blocks (uniform mask: vector accesses), then the partial tail block.
    n_full = chunk_len // BLOCK
    for tail in tl.static_range(2):
        if tail == 0:
            first_block = 0
            end_block = n_full
        else:
            first_block = n_full
            end_block = tl.cdiv(chunk_len, BLOCK)
        for block_index in range(first_block, end_block):
            offsets = block_index * BLOCK + tl.arange(0, BLOCK)
            if tail == 0:
                live = tl.full([BLOCK], 1, tl.int1)
            else:
                live = offsets < chunk_len
            f_ptrs = f_ptr + offsets
            g_ptrs = g_ptr + offsets
            if ALIGNED:
                f_ptrs = tl.max_contiguous(tl.multiple_of(f_ptrs, F_ALIGN), VEC)
                g_ptrs = tl.max_contiguous(tl.multiple_of(g_ptrs, G_ALIGN), VEC)
            g = tl.load(g_ptrs, mask=live, other=0.0).to(tl.float32)
            f = tl.load(f_ptrs, mask=live, other=0.0).to(tl.float32)
            if HAS_GRAD_SCALE:
                g = tl.div_rn(g, grad_scale)
            f = alpha_f * f + beta_f * (g * g)
            tl.store(f_ptrs, f.to(F_DTYPE), mask=live)


@triton.jit(do_not_specialize=["blocks_per_chunk", "first_partial"])
def _fisher_score_kernel(
    tensor_table_ptr, chunk_table_ptr, partials_ptr, first_partial: tl.int32,
    blocks_per_chunk: tl.int32,
    D_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, F_DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr, VEC: tl.constexpr, BLOCK: tl.constexpr,
):
    D_ALIGN: tl.constexpr = VEC * (D_DTYPE.primitive_bitwidth // 8)
    G_ALIGN: tl.constexpr = VEC * (G_DTYPE.primitive_bitwidth // 8)
    F_ALIGN: tl.constexpr = VEC * (F_DTYPE.primitive_bitwidth // 8)
    row, chunk_start, chunk_len = program_chunk(tensor_table_ptr, chunk_table_ptr,
                                                blocks_per_chunk, SCORE_N_FIELDS,
                                                SCORE_NUMEL_FIELD, BLOCK)
    d_ptr = tl.load(row + SCORE_D_FIELD).to(tl.pointer_type(D_DTYPE)) + chunk_start
    g_ptr = tl.load(row + SCORE_G_FIELD).to(tl.pointer_type(G_DTYPE)) + chunk_start
    f_ptr = tl.load(row + SCORE_F_FIELD).to(tl.pointer_type(F_DTYPE)) + chunk_start
    dot = tl.zeros([BLOCK], dtype=tl.float64)
    weighted = tl.zeros([BLOCK], dtype=tl.float64)
    n_full = chunk_len // BLOCK
    for tail in tl.static_range(2):
        if tail == 0:
            first_block = 0
            end_block = n_full
        else:
            first_block = n_full
            end_block = tl.cdiv(chunk_len, BLOCK)
        for block_index in range(first_block, end_block):
            offsets = block_index * BLOCK + tl.arange(0, BLOCK)
            if tail == 0:
                live = tl.full([BLOCK], 1, tl.int1)
            else:
                live = offsets < chunk_len
            d_ptrs = d_ptr + offsets
            g_ptrs = g_ptr + offsets
            f_ptrs = f_ptr + offsets
            if ALIGNED:
                d_ptrs = tl.max_contiguous(tl.multiple_of(d_ptrs, D_ALIGN), VEC)
                g_ptrs = tl.max_contiguous(tl.multiple_of(g_ptrs, G_ALIGN), VEC)
                f_ptrs = tl.max_contiguous(tl.multiple_of(f_ptrs, F_ALIGN), VEC)
            g = tl.load(g_ptrs, mask=live, other=0.0).to(tl.float64)
            d = tl.load(d_ptrs, mask=live, other=0.0).to(tl.float64)
            f = tl.load(f_ptrs, mask=live, other=0.0).to(tl.float64)
            dot += d * g
            weighted += (f * g) * g
    slot = partials_ptr + (first_partial + tl.program_id(0)).to(tl.int64) * 2
    tl.store(slot, tl.sum(dot, axis=0))
    tl.store(slot + 1, tl.sum(weighted, axis=0))


@triton.jit(do_not_specialize=["n_partials"])
def _sum_partials_kernel(partials_ptr, out_ptr, n_partials: tl.int32, BLOCK: tl.constexpr):
    # One program, a fixed order: the result depends only on the partials.
    dot = tl.zeros([BLOCK], dtype=tl.float64)
    weighted = tl.zeros([BLOCK], dtype=tl.float64)
    for start in range(0, n_partials, BLOCK):
        index = start + tl.arange(0, BLOCK)
        live = index < n_partials
        dot += tl.load(partials_ptr + index.to(tl.int64) * 2, mask=live, other=0.0)
        weighted += tl.load(partials_ptr + index.to(tl.int64) * 2 + 1, mask=live, other=0.0)
    tl.store(out_ptr, tl.sum(dot, axis=0))
    tl.store(out_ptr + 1, tl.sum(weighted, axis=0))


_PARTIALS_BLOCK = 1024
# The score's chunking does not follow the device's processor count, so that the same input
# gives the same bits on any GPU (with the same Triton and BLOCK): 16 blocks per partial sum.
_SCORE_BLOCKS_PER_CHUNK = 16
# Tests set this to fill the partials and the result with NaN before the kernels run, so that a
# slot no program writes cannot pass unnoticed.
poison_outputs = False


def fisher_accumulate(
    fishers: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    *,
    alpha: float,
    beta: float,
    grad_scale: Optional[torch.Tensor] = None,
) -> None:
    """One launch over a validated bucket: contiguous tensors on one device, one dtype per list,
    ``grad_scale`` (if any) on that device."""
    if not fishers:
        return
    device = fishers[0].device
    rows = address_rows([fishers, grads], aligned_columns=2)
    split = split_by_alignment(rows, 2)
    if split is not None:  # the aligned part keeps 16-byte accesses
        for index in split:
            fisher_accumulate([fishers[i] for i in index], [grads[i] for i in index],
                              alpha=alpha, beta=beta, grad_scale=grad_scale)
        return
    config = launch_config(rows.rows[:, -1], device)
    tables = build_tables(rows.rows, config.chunk_elems, device, aligned=rows.aligned)
    if not tables.n_chunks:
        return
    with on_device(device):
        _fisher_accumulate_kernel[(tables.n_chunks,)](
            tables.tensors, tables.chunks,
            grad_scale if grad_scale is not None else tables.tensors,
            float(alpha), float(beta), config.blocks_per_chunk,
            F_DTYPE=triton_dtype(fishers[0].dtype), G_DTYPE=triton_dtype(grads[0].dtype),
            HAS_GRAD_SCALE=grad_scale is not None, ALIGNED=tables.aligned,
            VEC=vector_elems([fishers[0], grads[0]]),
            BLOCK=config.block, num_warps=config.num_warps, **EXACT_FP32,
        )


def fisher_score(
    buckets: Sequence[tuple[Sequence[torch.Tensor], ...]],
    device: torch.device,
) -> torch.Tensor:
    """``[sum d*g, sum F*g^2]`` (float64, on ``device``) over validated buckets
    ``(directions, grads, fishers)``, each contiguous with one dtype per list: one launch per
    bucket into a shared partials buffer, then one fixed-order reduction."""
    plans = []
    n_partials = 0
    parts = []
    for bucket in buckets:  # the aligned part of a bucket keeps 16-byte accesses
        rows = address_rows(list(bucket), aligned_columns=3)
        split = split_by_alignment(rows, 3)
        if split is None:
            parts.append((bucket, rows.rows, rows.aligned))
        else:
            parts += [(tuple([t[i] for i in index] for t in bucket), rows.rows[index], aligned)
                      for index, aligned in zip(split, (True, False))]
    for (directions, grads, fishers), rows, aligned in parts:
        config = dataclasses.replace(launch_config(rows[:, -1], device),
                                     blocks_per_chunk=_SCORE_BLOCKS_PER_CHUNK)
        tables = build_tables(rows, config.chunk_elems, device, aligned=aligned)
        plans.append((directions, grads, fishers, config, tables, n_partials))
        n_partials += tables.n_chunks
    out = torch.empty(2, dtype=torch.float64, device=device)
    partials = torch.empty(max(n_partials, 1) * 2, dtype=torch.float64, device=device)
    if poison_outputs:
        out.fill_(float("nan"))
        partials.fill_(float("nan"))
    with on_device(device):
        for directions, grads, fishers, config, tables, first_partial in plans:
            if not tables.n_chunks:
                continue
            _fisher_score_kernel[(tables.n_chunks,)](
                tables.tensors, tables.chunks, partials, first_partial, config.blocks_per_chunk,
                D_DTYPE=triton_dtype(directions[0].dtype), G_DTYPE=triton_dtype(grads[0].dtype),
                F_DTYPE=triton_dtype(fishers[0].dtype), ALIGNED=tables.aligned,
                VEC=vector_elems([directions[0], grads[0], fishers[0]]),
                BLOCK=config.block, num_warps=config.num_warps,
            )
        _sum_partials_kernel[(1,)](
            partials, out, n_partials, BLOCK=_PARTIALS_BLOCK, num_warps=4,
        )
    return out
