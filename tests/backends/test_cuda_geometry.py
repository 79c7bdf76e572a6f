"""The CUDA kernels' launch geometry (csrc/ff_tensor_table.h, docs/cuda.md "Launch geometry").

Without a GPU:
* a host C++ program (cuda_plan_check.cpp) checks the table planner and the kernels' chunk
  lookups, and prints the launch counts of the real tables: 2,000 x 4,096 fp32 tensors of a
  Fisher step take at most 4 launches, a 2^28 tensor one;
* the PTX of the step, accumulate and score kernels has no contracted fused multiply-add (each
  operation is rounded on its own, as in the host emulation and the reference), and the step
  moves fp32 operands with 16-byte accesses;
* the host emulation (CPU tensors through the extension) runs the kernels' per-thread code with
  3 resident blocks, so blocks stride over many chunks and many tensors; it is compared with the
  reference backend on tensors of one and many chunks, empty ones, and misaligned views beside
  aligned ones in the same launch.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from fisherforget import ops
from fisherforget.backends import cuda as cuda_backend
from fisherforget.backends.cuda import jit as cuda_jit

REPO = Path(__file__).resolve().parents[2]
CSRC = REPO / "csrc"
CHUNK = 65536  # kChunkSize
NVCC_TORCH_FLAGS = [  # torch's CUDAExtension flags
    "-std=c++17", "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
]

_PREBUILT_ERROR = cuda_backend.load_prebuilt()
needs_extension = pytest.mark.skipif(
    _PREBUILT_ERROR is not None, reason=f"fisherforget._C does not import: {_PREBUILT_ERROR}")


# ----------------------------------------------------------------------------- launch planning


def test_launch_plan_covers_every_chunk_once_in_few_launches(tmp_path):
    compiler = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    binary = tmp_path / "plan_check"
    subprocess.run([compiler, "-std=c++17", "-O1", "-Wall", "-Werror", "-I", str(CSRC),
                    str(Path(__file__).with_name("cuda_plan_check.cpp")), "-o", str(binary)],
                   check=True, capture_output=True, text=True, timeout=300)
    result = subprocess.run([str(binary)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "plan check ok" in result.stdout, result.stdout
    launches = {m[0]: int(m[1]) for m in re.findall(r"^launches (\S+ \S+) (\d+)$",
                                                    result.stdout, re.M)}
    # Independent arithmetic: (32,764 - 192 reserved - header) / 8 words, one extent word plus
    # one address per used field for each tensor; 7 fields for the Fisher step.
    assert launches["step-fisher 2000x4096"] == -(-2000 // ((32764 - 192 - 48) // 8 // 8)) == 4
    assert launches["accumulate 2000x4096"] <= 2 and launches["score 2000x4096"] <= 2
    for op in ("step-fisher", "accumulate", "score"):
        assert launches[f"{op} 1x268435456"] == 1  # 4,096 chunks, blocks stride over them
    # (The 4 KB tables of CUDA < 12.1 builds hold 60 tensors: 34 launches.)
    assert launches["step-fisher-4KB 2000x4096"] == 34


# ---------------------------------------------------------------------------- compiled code


def _nvcc():
    home, why = cuda_jit.find_cuda_home()
    if home is None:
        pytest.skip(f"nvcc not found: {why}")
    return str(Path(home) / "bin" / "nvcc")


def _ptx(nvcc: str, source: str, out: Path) -> str:
    subprocess.run([nvcc, *NVCC_TORCH_FLAGS, "-O3", "-arch=sm_90", "-I", str(CSRC), "-ptx",
                    str(CSRC / source), "-o", str(out)], check=True, capture_output=True,
                   text=True, timeout=600)
    return out.read_text()


def _kernels(ptx: str, name: str) -> list[str]:
    """The PTX bodies of the entry points whose mangled name contains ``name``."""
    bodies = re.split(r"(?=^\.visible \.entry )", ptx, flags=re.M)
    return [b for b in bodies if b.startswith(".visible .entry") and name in b.split("(")[0]]


def test_kernels_round_every_operation_and_use_16_byte_packets(tmp_path):
    """nvcc contracts a*b + c into one fused multiply-add unless told not to; the kernels use
    _rn intrinsics so their bits are the host emulation's. (Before, the fp32 step's PTX had 72
    contracted fma.rn.f32.) The double-precision FMAs left in the step come from pow() of the
    bias corrections, a library routine, not from contracting the kernels' own arithmetic."""
    nvcc = _nvcc()
    step = _ptx(nvcc, "fused_step_f32.cu", tmp_path / "step.ptx")
    kernels = _kernels(step, "fused_step_kernel")
    assert len(kernels) == 4  # fp32 params x {fp32, bf16} state x {fp32, bf16} Fisher
    for body in kernels:
        assert "fma.rn.f32" not in body
    fp32 = next(b for b in kernels if "fused_step_kernelIfffE" in b)
    # p, g, m, v, F: two 16-byte packets each per thread and tile, fp32 everywhere.
    assert len(re.findall(r"ld\.global(\.nc)?\.v4\.(f32|u32|b32)", fp32)) >= 10, fp32[:2000]
    assert len(re.findall(r"st\.global\.v4\.(f32|u32|b32)", fp32)) >= 8
    accumulate = _ptx(nvcc, "fisher_accumulate.cu", tmp_path / "acc.ptx")
    assert _kernels(accumulate, "fisher_accumulate_kernel")
    assert "fma.rn.f32" not in accumulate
    score = _ptx(nvcc, "fisher_score.cu", tmp_path / "score.ptx")
    assert _kernels(score, "fisher_score_kernel")
    assert "fma.rn.f64" not in score and "fma.rn.f32" not in score


# ------------------------------------------------------------------------- host emulation
# (The kernels' own code on CPU tensors, compared with the reference backend.)


def _fresh(shape, dtype, low=None, high=None):
    if low is not None:
        values = torch.rand(shape) * (high - low) + low
    else:
        values = torch.randn(shape)
        values = torch.where(values == 0, torch.full_like(values, 0.5), values)
    return values.to(dtype)


def _misaligned(n: int, dtype) -> torch.Tensor:
    """A contiguous view one element past a 16-byte boundary (as a slice of a fused buffer)."""
    base = _fresh((n + 1,), dtype)
    view = base[1:]
    assert view.data_ptr() % 16 != 0
    return view


def _close(actual, expected, what):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    if actual.numel() == 0:
        return
    a, e = actual.double(), expected.double()
    # fp32: a few ulps (the reference's CPU lerp/addcmul may round differently); 16-bit: 1 ulp.
    eps = 4 * torch.finfo(torch.float32).eps if expected.dtype == torch.float32 \
        else torch.finfo(expected.dtype).eps
    limit = torch.maximum(a.abs(), e.abs()) * eps + e.abs().max() * 4 * torch.finfo(
        torch.float32).eps
    bad = ((a - e).abs() > limit) & ~(a.isnan() & e.isnan())
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise AssertionError(f"{what}: {int(bad.sum())} of {a.numel()} elements differ; first "
                             f"at {i}: got {a[i].item()!r}, expected {e[i].item()!r}")


# Tensors of one and several chunks, empty ones, a tail under one tile (2,048 elements), and
# more chunks (~12) than the emulation's 3 resident blocks: each block takes several chunks of
# several tensors.
SIZES = [0, 5, 2 * CHUNK + 3, 4096, CHUNK, CHUNK + 1, 0, 2049, 1, 3 * CHUNK + 2048 * 7]
MISALIGNED = {2, 7}  # a multi-chunk and a single-chunk tensor, beside aligned ones


def _step_lists(param_dtype, state_dtype):
    params, grads = [], []
    for i, n in enumerate(SIZES):
        params.append(_misaligned(n, param_dtype) if i in MISALIGNED else _fresh((n,), param_dtype))
        grads.append(_fresh((n,), param_dtype))
    exp_avgs = [_fresh((n,), state_dtype) * 0.1 for n in SIZES]
    exp_avg_sqs = [_fresh((n,), state_dtype, 1e-4, 1e-2) for n in SIZES]
    max_exp_avg_sqs = [_fresh((n,), state_dtype, 1e-4, 2e-2) for n in SIZES]
    fishers = [_fresh((n,), state_dtype, 0.01, 1.0) for n in SIZES]
    masks = [torch.rand(n) > 0.3 if i % 3 == 0 else None for i, n in enumerate(SIZES)]
    steps = [torch.tensor(float(i % 5)) for i in range(len(SIZES))]
    counts = [torch.tensor(float(i % 3)) for i in range(len(SIZES))]
    return [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, fishers, masks, steps, counts]


def _clone(lists):
    out = []
    for values in lists:
        copies = []
        for t in values:
            if t is None:
                copies.append(None)
            elif t.data_ptr() % 16 != 0:  # keep the misalignment
                base = torch.empty(t.numel() + 1, dtype=t.dtype)
                base[1:] = t
                copies.append(base[1:])
            else:
                copies.append(t.clone())
        out.append(copies)
    return out


HYPER = ops.StepHyper(lr=3e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.05, amsgrad=True,
                      fisher_mode="mean", fisher_scale=0.5, freeze_above=0.9)


def _reference_step(lists, found_inf=None):
    ops.fused_step(ops.StepTensors(*lists), HYPER, found_inf=found_inf, backend="reference")


def _kernel_step(lists, found_inf=None):
    # On CPU tensors the extension runs the kernels' code in its host emulation.
    cuda_backend.fused_step(ops.StepTensors(*lists), HYPER, None, found_inf)


@needs_extension
@pytest.mark.parametrize("param_dtype,state_dtype", [(torch.float32, torch.float32),
                                                     (torch.bfloat16, torch.float32),
                                                     (torch.bfloat16, torch.bfloat16)], ids=str)
def test_blocks_stride_over_chunks_of_many_tensors(param_dtype, state_dtype):
    """Two steps. Step and Fisher counts: single-chunk tensors are advanced by the step kernel
    after its barrier, the others (empty, multi-chunk) by the count kernel; all must match."""
    want = _step_lists(param_dtype, state_dtype)
    names = ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "fishers")
    for _ in range(2):  # the second step reads the counts the first one advanced
        # From identical state: a 1-ulp difference in a bf16 moment would grow in the next step.
        got = _clone(want)
        _reference_step(want)
        _kernel_step(got)
        for name, g_list, w_list in zip(names, got, want):
            for i, (g, w) in enumerate(zip(g_list, w_list)):
                _close(g, w, f"{name}[{i}]")
        for name, g_list, w_list in (("steps", got[7], want[7]),
                                     ("fisher_counts", got[8], want[8])):
            for i, (g, w) in enumerate(zip(g_list, w_list)):
                assert torch.equal(g, w), f"{name}[{i}]: {g.item()} vs {w.item()}"
    assert [s.item() for s in got[7]] == [float(i % 5 + 2) for i in range(len(SIZES))]


@needs_extension
def test_a_skipped_step_advances_no_count():
    lists = _step_lists(torch.float32, torch.float32)
    before = _clone(lists)
    _kernel_step(lists, found_inf=torch.tensor(1.0))
    for values, old in zip(lists, before):
        for t, o in zip(values, old):
            assert (t is None and o is None) or torch.equal(t, o)


@needs_extension
def test_accumulate_and_score_stride_over_chunks():
    fishers = [_fresh((n,), torch.float32, 0.01, 1.0) for n in SIZES]
    grads = [_misaligned(n, torch.bfloat16) if i in MISALIGNED else _fresh((n,), torch.bfloat16)
             for i, n in enumerate(SIZES)]
    directions = [_fresh((n,), torch.float32) for n in SIZES]
    want = [f.clone() for f in fishers]
    ops.fisher_accumulate(want, grads, alpha=0.9, beta=0.1, backend="reference")
    cuda_backend.fisher_accumulate(fishers, grads, alpha=0.9, beta=0.1)
    for i, (g, w) in enumerate(zip(fishers, want)):
        _close(g, w, f"fishers[{i}]")
    # One partial per chunk, whichever block took it: the sums do not depend on the grid and
    # are the same bits every call.
    score = cuda_backend.fisher_score(directions, grads, fishers)
    expected = torch.stack([
        sum((d.double() * g.double()).sum() for d, g in zip(directions, grads)),
        sum((f.double() * g.double() ** 2).sum() for f, g in zip(fishers, grads)),
    ])
    assert torch.allclose(score, expected, rtol=1e-12, atol=1e-9), (score, expected)
    assert torch.equal(cuda_backend.fisher_score(directions, grads, fishers), score)
