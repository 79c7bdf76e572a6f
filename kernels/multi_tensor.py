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
(the allocator reuses addresses). The addresses are read in one C++ pass
(``fisherforget._C.address_rows``, about 20 ns per tensor and list) where the extension is
built, else in Python; the chunk table is computed with a few vector ops on the element counts. Uploading it never synchronises with the
host: one pinned staging buffer and one ``non_blocking`` copy. Inside CUDA-graph capture that copy
is one memcpy node of the graph, its pinned source taken from memory reserved before capture
(:class:`CaptureStaging`), instead of the ~n_tensors * 11/16 one-program writer kernels an
earlier version captured.
"""

from __future__ import annotations

import array
import contextlib
import functools
import itertools
import operator
import os
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import torch
import triton

from fisherforget import _native
import triton.language as tl

__all__ = [
    "LaunchConfig",
    "Tables",
    "CaptureStaging",
    "CAPTURE_STAGING",
    "interpreting",
    "launch_config",
    "build_tables",
    "Rows",
    "address_rows",
    "split_by_alignment",
    "ALIGNMENT_BYTES",
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
# few percent of elements, enough to flip a freezing threshold's decision, and the
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


def launch_config(numels, device: torch.device) -> LaunchConfig:
    """The heuristic launch shape for a bucket with these element counts (ints, or an int64
    tensor such as the last column of :attr:`Rows.rows`).

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
        if isinstance(numels, torch.Tensor):
            total_blocks = int(((numels + (block - 1)) // block).sum()) if len(numels) else 0
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


class Rows(NamedTuple):
    """The host tensor table of a bucket, before upload: ``rows[i]`` holds tensor ``i``'s address
    in each column (0 for an absent column or a ``None`` item) and its element count last."""

    rows: torch.Tensor  # int64 [n_tensors, n_columns + 1], on the CPU
    regular: bool  # every tensor contiguous, one dtype per column, all on one device
    aligned: bool  # the addresses of the first `aligned_columns` columns are 16-byte aligned


def address_rows(columns: Sequence[Optional[Sequence[Optional[torch.Tensor]]]],
                 aligned_columns: int) -> Rows:
    """The :class:`Rows` of tensor lists ``columns`` (``None`` for an absent list; the element
    counts are the first list's). One pass in C++ when ``fisherforget._C`` is built
    (``address_rows``), else the same in Python."""
    native = _native.helpers()
    if native is not None:
        return Rows(*native.address_rows(columns, aligned_columns))
    return _address_rows_python(columns, aligned_columns)


def _address_rows_python(columns, aligned_columns: int) -> Rows:
    first = columns[0]
    n = len(first)
    address = torch.Tensor.data_ptr
    present = [c for c in columns if c is not None]
    values = []
    for column in columns:
        if column is None:
            values.append([0] * n)
        elif any(t is None for t in column):  # a mask list
            values.append([0 if t is None else t.data_ptr() for t in column])
        else:
            values.append(list(map(address, column)))
    tensors = [t for c in present for t in c if t is not None]
    device = first[0].device if n else None
    regular = (all(map(torch.Tensor.is_contiguous, tensors))
               and all(len({t.dtype for t in c if t is not None}) <= 1 for c in present)
               and {t.device for t in tensors} <= {device})
    bits = 0
    for column in values[:aligned_columns]:
        bits |= functools.reduce(operator.or_, column, 0)
    flat = array.array("q", itertools.chain.from_iterable(
        zip(*values, map(torch.Tensor.numel, first))))
    rows = torch.frombuffer(flat, dtype=torch.int64).clone() if flat else torch.empty(
        0, dtype=torch.int64)
    return Rows(rows.view(n, len(columns) + 1), regular, bits & (ALIGNMENT_BYTES - 1) == 0)


class CaptureStaging:
    """Pinned host memory for the tables of calls made inside CUDA-graph capture.

    A captured host-to-device copy reads its pinned source at every replay, and no graph holds a
    reference to it, so the source must live as long as any graph may replay. Allocating pinned
    memory during capture is itself an illegal call on torch versions whose pinned allocator is
    not capture-aware (the GPU machines' torch 2.11 among them). So: eager calls keep a reserve
    of pinned memory, allocated outside capture (``reserve``); a captured call takes its table
    from it (``take``), never allocating; a captured table equal to one taken before shares its
    memory (re-capturing the same step costs nothing); and the reserve stops growing at
    ``limit_bytes``. A capture that finds too little reserve is refused with what to do: the
    kernels must be compiled before capture anyway, so the warm-up step that ``torch.cuda.graph``
    asks for also makes the reserve.
    """

    MIN_FREE_BYTES = 1 << 20
    BLOCK_BYTES = 8 << 20

    def __init__(self, limit_bytes: int = 256 << 20, allocate=None):
        self.limit_bytes = limit_bytes
        self._allocate = allocate or (
            lambda n: torch.empty(n, dtype=torch.int64, pin_memory=True))
        self._blocks: list[torch.Tensor] = []
        self._used = 0  # int64 words used in the last block
        self._taken: dict[bytes, torch.Tensor] = {}

    @property
    def allocated_bytes(self) -> int:
        return sum(b.numel() for b in self._blocks) * 8

    def _free_words(self) -> int:
        return self._blocks[-1].numel() - self._used if self._blocks else 0

    def reserve(self, words: int) -> None:
        """Outside capture: make sure a captured call of a table of ``words`` int64 words (and
        then some) will find room."""
        if self._free_words() * 8 >= max(2 * 8 * words, self.MIN_FREE_BYTES):
            return
        size = max(self.BLOCK_BYTES, 4 * 8 * words) // 8
        if self.allocated_bytes + size * 8 > self.limit_bytes:
            return  # a capture that needs more is refused by take(), saying so
        self._blocks.append(self._allocate(size))
        self._used = 0

    def take(self, table: torch.Tensor) -> torch.Tensor:
        """Inside capture: pinned memory holding ``table`` (1-D int64), kept for the process."""
        key = table.numpy().tobytes()
        held = self._taken.get(key)
        if held is not None:
            return held
        words = table.numel() + table.numel() % 2  # even offsets: 16-byte aligned slices
        if words > self._free_words():
            raise RuntimeError(
                "fisherforget (backend 'triton'): no pinned staging memory is left for the "
                f"address table ({table.numel() * 8} bytes) of a call inside CUDA-graph capture "
                f"({len(self._taken)} tables captured, {self.allocated_bytes} of at most "
                f"{self.limit_bytes} bytes reserved). Run the step once outside capture before "
                "capturing it (the warm-up torch.cuda.graph asks for: it compiles the kernels "
                "and reserves this memory).")
        block = self._blocks[-1]
        held = block[self._used:self._used + table.numel()]
        held.copy_(table)
        self._used += words
        self._taken[key] = held
        return held


CAPTURE_STAGING = CaptureStaging()


def build_tables(
    rows,
    chunk_elems: int,
    device: torch.device,
    aligned: bool,
) -> Tables:
    """Upload the tensor table ``rows`` (:attr:`Rows.rows`, or one list of ints per column with
    the element counts last) and the chunk table cutting each tensor into chunks of
    ``chunk_elems`` elements: one pinned host buffer, one ``non_blocking`` copy (no host sync).

    Under CUDA-graph capture the copy becomes one memcpy node of the graph, and the device
    buffer comes from the graph's private pool (alive as long as the graph); the pinned source
    comes from :data:`CAPTURE_STAGING` (allocated before capture, kept for every replay)."""
    if not isinstance(rows, torch.Tensor):
        rows = torch.tensor(list(zip(*rows)), dtype=torch.int64).view(len(rows[-1]), len(rows))
    n_tensors = rows.shape[0]
    numels = rows[:, -1]
    counts = (numels + (chunk_elems - 1)) // chunk_elems
    n_chunks = int(counts.sum()) if n_tensors else 0
    first_words = torch.arange(n_tensors, dtype=torch.int64) << _CHUNK_INDEX_BITS
    if n_chunks == n_tensors and bool((counts == 1).all()):  # common: one chunk per tensor
        chunks = first_words
    else:
        tensor_of_chunk = torch.repeat_interleave(torch.arange(n_tensors), counts)
        first_chunk = torch.cumsum(counts, 0) - counts
        within = torch.arange(n_chunks, dtype=torch.int64) - first_chunk[tensor_of_chunk]
        chunks = first_words[tensor_of_chunk] | within
    # Row-major [n_tensors, n_fields], padded to an even length so that the chunk table starts
    # 16-byte aligned.
    table_len = rows.numel() + rows.numel() % 2
    total = table_len + n_chunks
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    host = torch.empty(total, dtype=torch.int64,
                       pin_memory=device.type == "cuda" and not capturing)
    host[:rows.numel()] = rows.reshape(-1)
    host[rows.numel():table_len] = 0
    host[table_len:] = chunks
    if device.type != "cuda":
        buffer = host
    elif capturing:
        buffer = CAPTURE_STAGING.take(host).to(device, non_blocking=True)
    else:
        CAPTURE_STAGING.reserve(total)
        buffer = host.to(device, non_blocking=True)
    return Tables(
        tensors=buffer[:table_len], chunks=buffer[table_len:], n_tensors=n_tensors,
        n_chunks=n_chunks, aligned=aligned,
    )


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


def split_by_alignment(rows: Rows, aligned_columns: int) -> Optional[tuple[list, list]]:
    """``(aligned, misaligned)`` tensor indices when the bucket mixes both, else None.

    One misaligned tensor (an offset view, a DDP bucket view, a fused-QKV slice) would otherwise
    drop the whole launch to scalar accesses: the callers launch the two parts separately, the
    aligned one with 16-byte accesses. Costs nothing when every address is aligned."""
    if rows.aligned:
        return None
    bad = (rows.rows[:, :aligned_columns] & (ALIGNMENT_BYTES - 1)).any(dim=1)
    if bool(bad.all()):
        return None
    return bad.logical_not().nonzero().flatten().tolist(), bad.nonzero().flatten().tolist()


def optional_ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()



_TRITON_DTYPES = {
    torch.float32: tl.float32,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
}


class _NoLaunch:
    """Stands in for a kernel when the host work runs alone (``backends.host_only``):
    ``NO_LAUNCH[grid](*args)`` evaluates the arguments as a launch does, and launches nothing."""

    def __getitem__(self, grid):
        return _nothing


def _nothing(*args, **kwargs) -> None:
    return None


NO_LAUNCH = _NoLaunch()


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
