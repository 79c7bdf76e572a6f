"""Many tensors per launch: address tables, chunking and the launch heuristic.

A launch covers a bucket of tensors that share a device and dtypes. The host describes the bucket
in one int64 buffer, as ATen's ``MultiTensorApply.cuh`` does with its kernel-argument struct, except
that the tables live in device memory so that one launch covers any number of tensors:

``tensor table``  ``[n_tensors, n_fields]`` int64: for each tensor the addresses of its
                  operands (0 where an operand is absent, e.g. a tensor without a mask) and its
                  element count.
``chunk table``   ``[n_chunks]`` int64: program ``pid`` works on chunk ``pid``, the
                  ``chunk_index``-th run of ``blocks_per_chunk * BLOCK`` elements of tensor
                  ``tensor_index``, packed as ``tensor_index << 32 | chunk_index``.

The buffer is rebuilt for every call from the tensors it is given: nothing is cached by address
(the allocator reuses addresses). Uploading it never synchronises with the host: one pinned
staging buffer and one ``non_blocking`` copy. Inside CUDA-graph capture that copy is one memcpy
node of the graph (the pinned source is kept alive for the graph's replays), instead of the
~n_tensors * 11/16 one-program writer kernels an earlier version captured.
"""

from __future__ import annotations

import array
import contextlib
import functools
import itertools
import operator
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

__all__ = [
    "LaunchConfig",
    "Tables",
    "interpreting",
    "launch_config",
    "build_tables",
    "ALIGNMENT_BYTES",
    "all_aligned",
    "vector_elems",
    "optional_ptr",
    "program_chunk",
    "on_device",
    "triton_dtype",
]

# 16-byte vector loads need every base address 16-byte aligned; chunks start at multiples of BLOCK
# elements, so aligned bases keep every chunk aligned.
ALIGNMENT_BYTES = 16
# Chunk tables pack the tensor index above the chunk index.
_CHUNK_INDEX_BITS = 32

# Launch heuristic (one place, overridable by environment for benchmark sweeps). BLOCK elements
# per inner iteration: 2048 over 8 warps is 8 elements per thread, two 16-byte vectors of each
# fp32 operand in flight per thread (76 registers for the fp32 Fisher step on sm_90; 4 warps
# would need 146). A program walks up to MAX_BLOCKS_PER_CHUNK blocks of one tensor, so that the
# chunk table stays small for large models while the grid still has many waves.
_DEFAULT_BLOCK = 2048
_DEFAULT_NUM_WARPS = 8
_MAX_BLOCKS_PER_CHUNK = 16
_TARGET_PROGRAMS_PER_SM = 32


# Compile options of the kernels whose fp32 results must match the reference op for op (the step
# and the Fisher accumulation). With fusion on, Triton contracts `a*F + b*g*g` into fused
# multiply-adds (one rounding instead of two): F then differs from the reference by 1 ulp on a
# few percent of elements, enough to flip a freeze_above/freeze_below decision, and the
# interpreter (which never fuses) would not show it. These kernels are memory-bound: the extra
# roundings cost nothing measurable. The interpreter ignores compile options.
EXACT_FP32 = dict(enable_fp_fusion=False)


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True)
class LaunchConfig:
    """How a bucket is cut into programs: ``block`` elements per inner step (a compile-time
    constant), ``num_warps`` per program, ``blocks_per_chunk`` inner steps per program (a runtime
    argument, so changing it never recompiles)."""

    block: int
    num_warps: int
    blocks_per_chunk: int

    @property
    def chunk_elems(self) -> int:
        return self.block * self.blocks_per_chunk


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        parsed = int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None
    if parsed <= 0:
        raise ValueError(f"{name}={value!r} must be positive")
    return parsed


_SM_COUNTS: dict[int, int] = {}


def _processor_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # the interpreter runs programs one after another
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


def launch_config(numels: Sequence[int], device: torch.device) -> LaunchConfig:
    """The heuristic launch shape for a bucket with these element counts.

    ``FISHERFORGET_TRITON_BLOCK``, ``FISHERFORGET_TRITON_NUM_WARPS`` and
    ``FISHERFORGET_TRITON_BLOCKS_PER_CHUNK`` override it (benchmark sweeps). The kernels run in
    place on tensors reached through address tables, so Triton's autotuner (which reruns a kernel
    on the live arguments and can only restore tensors passed directly) is not used.
    """
    block = _env_int("FISHERFORGET_TRITON_BLOCK", _DEFAULT_BLOCK)
    if block & (block - 1):
        raise ValueError(f"FISHERFORGET_TRITON_BLOCK={block} must be a power of two")
    num_warps = _env_int("FISHERFORGET_TRITON_NUM_WARPS", _DEFAULT_NUM_WARPS)
    forced = os.environ.get("FISHERFORGET_TRITON_BLOCKS_PER_CHUNK")
    if forced:
        blocks_per_chunk = _env_int("FISHERFORGET_TRITON_BLOCKS_PER_CHUNK", 1)
    else:
        total_blocks = sum(-(-n // block) for n in numels)
        target_programs = _TARGET_PROGRAMS_PER_SM * _processor_count(device)
        blocks_per_chunk = max(1, min(_MAX_BLOCKS_PER_CHUNK, total_blocks // target_programs))
    return LaunchConfig(block=block, num_warps=num_warps, blocks_per_chunk=blocks_per_chunk)


@dataclass
class Tables:
    """Device-resident tables of one launch (see the module docstring)."""

    tensors: torch.Tensor  # int64, [n_tensors * n_fields]
    chunks: torch.Tensor  # int64, [n_chunks]
    n_tensors: int
    n_chunks: int
    aligned: bool  # every non-zero address in the tensor table is 16-byte aligned


# Host tables of captured calls. A captured host-to-device copy reads its pinned source at every
# replay of the graph, and no graph holds a reference to it: these stay alive for the process
# (one table per captured call: a few KB to ~100 KB for thousands of tensors).
_CAPTURED_HOST_TABLES: list = []


def build_tables(
    columns: Sequence[Sequence[int]],
    chunk_elems: int,
    device: torch.device,
    aligned: bool,
) -> Tables:
    """Upload the tensor table given by ``columns`` (one list of ints per field, one int per
    tensor; the element counts last) and the chunk table cutting each tensor into chunks of
    ``chunk_elems`` elements: one pinned host buffer, one ``non_blocking`` copy (no host sync).

    Under CUDA-graph capture the copy becomes one memcpy node of the graph, and the device
    buffer comes from the graph's private pool (alive as long as the graph); the pinned source
    is kept alive here, since every replay copies it again."""
    n_fields = len(columns)
    numels = columns[-1]
    n_tensors = len(numels)
    counts = [(n + chunk_elems - 1) // chunk_elems for n in numels]
    n_chunks = sum(counts)
    # Row-major [n_tensors, n_fields], padded to an even length so that the chunk table starts
    # 16-byte aligned.
    # An int64 array: C-speed appends, and torch reads it without a per-element conversion
    # (torch.tensor(list) costs ~0.1 us per int, 2 ms for a 2,000-param step's table).
    flat = array.array("q", itertools.chain.from_iterable(zip(*columns)))
    if len(flat) % 2:
        flat.append(0)
    table_len = len(flat)
    flat.extend(_chunk_table_on_host(counts))
    values = torch.frombuffer(flat, dtype=torch.int64)
    if device.type == "cuda":
        host = torch.empty(len(flat), dtype=torch.int64, pin_memory=True).copy_(values)
        if torch.cuda.is_current_stream_capturing():
            _CAPTURED_HOST_TABLES.append(host)
        buffer = host.to(device, non_blocking=True)
    else:
        buffer = values.clone()  # owns its memory (frombuffer shares the array's)
    return Tables(
        tensors=buffer[:table_len], chunks=buffer[table_len:], n_tensors=n_tensors,
        n_chunks=n_chunks, aligned=aligned,
    )


def _chunk_table_on_host(counts: Sequence[int]) -> array.array:
    step = 1 << _CHUNK_INDEX_BITS
    firsts = range(0, len(counts) * step, step)
    if counts and min(counts) == max(counts) == 1:  # the common case: one chunk per tensor
        return array.array("q", firsts)
    return array.array("q", itertools.chain.from_iterable(
        map(range, firsts, map(operator.add, firsts, counts))))


@triton.jit
def program_chunk(tensor_table_ptr, chunk_table_ptr, blocks_per_chunk,
                  N_FIELDS: tl.constexpr, NUMEL_FIELD: tl.constexpr, BLOCK: tl.constexpr):
    """This program's chunk, decoded from the chunk table: the tensor-table row of its tensor
    and its elements ``[chunk_start, chunk_start + chunk_len)`` (one call per program)."""
    packed = tl.load(chunk_table_ptr + tl.program_id(0))
    tensor_index = packed >> 32
    row = tensor_table_ptr + tensor_index * N_FIELDS
    chunk_elems = blocks_per_chunk.to(tl.int64) * BLOCK
    chunk_start = (packed - (tensor_index << 32)) * chunk_elems
    chunk_len = tl.minimum(tl.load(row + NUMEL_FIELD) - chunk_start, chunk_elems).to(tl.int32)
    return row, chunk_start, chunk_len


def vector_elems(operands: Sequence[torch.Tensor]) -> int:
    """Elements per vector access shared by all operands of a launch: 16 bytes of the widest
    dtype (4 for fp32, 8 when every operand is 16-bit). Narrower operands then use narrower
    accesses, which avoids converting register layouts between operands."""
    return ALIGNMENT_BYTES // max(t.element_size() for t in operands)


def all_aligned(columns: Sequence[Sequence[int]]) -> bool:
    """Whether every address in these table columns (0 = absent) is 16-byte aligned."""
    bits = 0
    for column in columns:
        bits |= functools.reduce(operator.or_, column, 0)
    return bits & (ALIGNMENT_BYTES - 1) == 0


def misaligned_rows(columns: Sequence[Sequence[int]]) -> list[int]:
    """Indices of the tensors with any address in these columns not 16-byte aligned (called only
    when ``all_aligned`` is false, so an aligned bucket pays nothing for it)."""
    bits = functools.reduce(lambda acc, column: list(map(operator.or_, acc, column)), columns)
    return [i for i, b in enumerate(bits) if b & (ALIGNMENT_BYTES - 1)]


def split_by_alignment(columns: Sequence[Sequence[int]], n: int) -> Optional[tuple[list, list]]:
    """``(aligned, misaligned)`` tensor indices when the bucket mixes both, else None.

    One misaligned tensor (an offset view, a DDP bucket view, a fused-QKV slice) would otherwise
    drop the whole launch to scalar accesses: the callers launch the two parts separately, the
    aligned one with 16-byte accesses."""
    if all_aligned(columns):
        return None
    bad = misaligned_rows(columns)
    if len(bad) == n:
        return None
    bad_set = set(bad)
    return [i for i in range(n) if i not in bad_set], bad


def optional_ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()



_TRITON_DTYPES = {
    torch.float32: tl.float32,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
}


def triton_dtype(dtype: torch.dtype):
    """The Triton element type of a torch floating dtype the kernels handle."""
    try:
        return _TRITON_DTYPES[dtype]
    except KeyError:
        raise TypeError(
            f"the Triton kernels handle {tuple(_TRITON_DTYPES)} tensors, got {dtype}"
        ) from None


def on_device(device: torch.device):
    """Triton launches on the current device's current stream: make it ``device``."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()
