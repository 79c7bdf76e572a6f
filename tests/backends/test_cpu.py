"""Tests of the CPU backend: the native CPU kernels of fisherforget._C (csrc/cpu/) and
fisherforget/backends/cpu.py.

* the extension carries its CPU kernels wherever it is built (CPU-only builds too), ``auto`` picks
  them for CPU tensors, and the AVX2 loops are chosen where the CPU has AVX2, FMA and F16C;
* each op against the reference backend on random inputs: every feature, the dtypes, sizes around
  the 8-lane groups and the thread split, two chained steps. The moments and the Fisher must be
  equal bit for bit (the kernels round as torch's CPU ops do); params within the rounding of
  torch's sqrt, which is not correctly rounded on every CPU;
* the AVX2 and the scalar loops, and 1 and 2 threads, give the same bits;
* the shared table of cases and error inputs (tests/step_cases.py) against the reference and the
  float64 oracle (tests/oracle.py); tests/test_fuzz.py runs its oracle test on this backend too;
* FisherAdamW(fisher=None, backend="cpu") against torch.optim.AdamW;
* errors name the tensor and leave every tensor unchanged; non-contiguous tensors are stepped.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fisherforget
from fisherforget import FisherAdamW, backends, ops
from fisherforget.backends import cpu as cpu_backend
from step_cases import (CASES_BY_NAME, CPU_SIZES, short_name, assert_close_ulp, cases_for,
                        check_against_oracle, check_against_reference, check_error, clone,
                        errors_for, make_grads, make_inputs, replace_case, run_case)

REPO = Path(__file__).resolve().parents[2]
# Where the fisherforget under test is imported from: the checkout (editable installs) or
# site-packages (the second stack's regular install); a fresh process must import the same one.
PACKAGE_ROOT = Path(fisherforget.__file__).resolve().parents[1]
_ERROR = cpu_backend.availability_error()
needs_cpu_kernels = pytest.mark.skipif(
    _ERROR is not None, reason=f"the CPU kernels are not available: {_ERROR}")

PARAM_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
STATE_DTYPES = [torch.float32, torch.bfloat16]


def _cpu_flags() -> set:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((l for l in text.splitlines() if l.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


HAS_AVX2 = {"avx2", "fma", "f16c"} <= _cpu_flags()
ISAS = ["scalar", pytest.param("avx2", marks=pytest.mark.skipif(
    not HAS_AVX2, reason="this CPU lacks AVX2, FMA or F16C"))]
# torch's own CPU kernels fuse the multiply-adds of lerp and addcmul (as these kernels do) where
# its vector code has FMA; elsewhere the reference rounds twice and only a tolerance holds.
TORCH_FUSES = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


@pytest.fixture
def isa(request):
    """Runs the test with the inner loops ``request.param`` (restored afterwards)."""
    previous = torch.ops.fisherforget_C.cpu_isa()
    torch.ops.fisherforget_C.cpu_isa(request.param)
    yield request.param
    torch.ops.fisherforget_C.cpu_isa(previous)


@pytest.fixture
def threads(request):
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)


# ----------------------------------------------------------------------------------- build checks


def test_extension_has_the_cpu_kernels_wherever_it_is_built():
    """`make test` always builds _C (CPU-only without nvcc): a missing _C is a failure here."""
    assert _ERROR is None, _ERROR
    info = cpu_backend.build_info()
    assert "cpu" in info["kernels"].split(","), info
    assert info["cpu_isa"] == cpu_backend.isa()


@needs_cpu_kernels
@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="CPU flags read from /proc/cpuinfo")
def test_avx2_loops_are_chosen_where_the_cpu_has_them():
    # The default, not a test's choice: a fresh process.
    code = "import torch, fisherforget._C; print(torch.ops.fisherforget_C.cpu_isa())"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(PACKAGE_ROOT),
                                                       os.environ.get("PYTHONPATH", "")]))
    chosen = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, timeout=120, check=True).stdout.strip()
    machine_is_x86 = os.uname().machine in ("x86_64", "AMD64")
    assert chosen == ("avx2" if HAS_AVX2 and machine_is_x86 else "scalar")
    with pytest.raises(RuntimeError, match="'sse9' cannot run here"):
        torch.ops.fisherforget_C.cpu_isa("sse9")


@needs_cpu_kernels
def test_auto_picks_cpu_for_cpu_tensors_of_kernel_dtypes():
    cpu = torch.device("cpu")
    for dtype in PARAM_DTYPES:
        assert backends.resolve("auto", cpu, dtype) == "cpu"
    assert backends.resolve("auto", cpu, torch.float64) == "reference"
    with pytest.raises(RuntimeError, match="supports params of dtypes"):
        backends.resolve("cpu", cpu, torch.float64)
    assert not cpu_backend.supports_device("cuda")


def test_doctor_reports_the_cpu_kernels():
    from fisherforget import doctor

    report = doctor.report()
    line = report["cpu_kernels"]
    if _ERROR is None:
        assert line == f"available ({cpu_backend.isa()}, {torch.get_num_threads()} threads)"
        assert report["auto_picks"]["cpu"] == "cpu"
    else:
        assert line.startswith("unavailable")


# ------------------------------------------------------------------------------------ fused_step
# The cases are the shared table of tests/step_cases.py.


def _compare(name: str, actual: torch.Tensor, expected: torch.Tensor, before: torch.Tensor):
    """The CPU kernels against the reference: moments and Fisher bit for bit where torch's CPU
    ops fuse their multiply-adds as these kernels do; params (and elsewhere everything) within
    1 ulp of the dtype plus 2 fp32 ulps of the terms, since torch.sqrt may differ from the
    correctly rounded sqrt by an ulp, which moves the update by about an ulp."""
    if TORCH_FUSES and name != "params":
        assert_close_ulp(actual, expected, 0, what=name)
        return
    e = expected.double()
    assert_close_ulp(actual, expected, 1, rel=2.4e-7,
                     terms=e.abs() + (e - before.double()).abs(), atol=1e-30, what=name)


def _cases_and_loops() -> list:
    """The table's cases for this backend; those with the sizes around the 8-lane groups on both
    inner loops, the others on the loops this CPU picks."""
    params = []
    for param in cases_for("cpu"):
        case = param.values[0]
        # Without the kernels (the tests are skipped) there is no ISA to ask for at collection.
        here = cpu_backend.isa() if _ERROR is None else "scalar"
        loops = ISAS if case.shapes == CPU_SIZES else [here]
        for loop in loops:
            marks = loop.marks if hasattr(loop, "marks") else ()
            name = loop.values[0] if hasattr(loop, "values") else loop
            params.append(pytest.param(case, name, id=f"{case.name}-{name}", marks=marks))
    return params


@needs_cpu_kernels
@pytest.mark.parametrize("case, isa", _cases_and_loops(), indirect=["isa"])
def test_step_cases_match_reference(case, isa):
    check_against_reference(case, "cpu", _compare)


@needs_cpu_kernels
@pytest.mark.parametrize("case", cases_for("cpu"))
def test_step_cases_match_float64_oracle(case):
    check_against_oracle(case, "cpu")


def _all_outputs(case) -> list:
    data, gen = make_inputs(case)
    out = []
    for _ in range(case.chained):
        run_case(case, data, make_grads(case, gen), "cpu")
        out.append(clone(data))
    return out


@needs_cpu_kernels
@pytest.mark.skipif(not HAS_AVX2, reason="this CPU lacks AVX2, FMA or F16C")
@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=str)
def test_avx2_and_scalar_loops_and_thread_counts_agree_bit_for_bit(dtype):
    base = CASES_BY_NAME[f"ema_scale_amsgrad-{short_name(dtype)}-bf16"]
    case = replace_case(base, shapes=CPU_SIZES + ((2**17 + 3,),),
                        hyper=dict(base.hyper, freeze_below=0.1, maximize=True))
    results = []
    previous_isa, previous_threads = torch.ops.fisherforget_C.cpu_isa(), torch.get_num_threads()
    try:
        for isa_name, threads in (("avx2", 2), ("avx2", 1), ("scalar", 2)):
            torch.ops.fisherforget_C.cpu_isa(isa_name)
            torch.set_num_threads(threads)
            results.append(_all_outputs(case))
    finally:
        torch.ops.fisherforget_C.cpu_isa(previous_isa)
        torch.set_num_threads(previous_threads)
    for other in results[1:]:
        for step_a, step_b in zip(results[0], other):
            for key, values in step_a.items():
                for a, b in zip(values, step_b[key]):
                    assert a is None or torch.equal(a, b), key


@needs_cpu_kernels
@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_frozen_elements_keep_their_bits(isa):
    """NaN in the state of masked-out elements survives a step (frozen lanes are stored with
    their old values), and a fully masked tensor is unchanged."""
    case = replace_case(CASES_BY_NAME["ema_scale_amsgrad-fp32-fp32"], shapes=((64,), (4101,)))
    data, gen = make_inputs(case)
    mask = data["masks"][0]
    for key in ("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"):
        data[key][0][~mask] = float("nan")
    data["masks"][1] = torch.zeros(4101, dtype=torch.bool)
    before = clone(data)
    run_case(case, data, make_grads(case, gen), "cpu")
    assert data["exp_avgs"][0][~mask].isnan().all() and not data["exp_avgs"][0][mask].isnan().any()
    assert data["params"][0][~mask].equal(before["params"][0][~mask])
    for key in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"):
        assert torch.equal(data[key][1], before[key][1]), key


@needs_cpu_kernels
@pytest.mark.parametrize("threads", [1, 2], indirect=True)
def test_many_small_tensors_in_one_call(threads):
    """2,000 tensors of 1-40 elements and a few large ones: one kernel call, split by elements."""
    generator = torch.Generator().manual_seed(7)
    sizes = [(int(torch.randint(1, 40, (), generator=generator)),) for _ in range(2000)]
    sizes[100], sizes[1500] = (70000,), (16385,)
    case = replace_case(CASES_BY_NAME["mean_thresholds_maximize-fp32-fp32"], shapes=sizes)
    check_against_reference(case, "cpu", _compare)


# ------------------------------------------------------------------------------- AdamW parity


@needs_cpu_kernels
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("settings", [dict(lr=1e-3, weight_decay=1e-2),
                                      dict(lr=2e-3, amsgrad=True, maximize=True, betas=(0.8, 0.95),
                                           weight_decay=0.1)])
def test_parity_with_torch_adamw(fused, settings):
    torch.manual_seed(5)
    ours = [torch.randn(n, requires_grad=True) for n in (1, 7, 4097, 33)]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    opt = FisherAdamW(ours, fisher=None, backend="cpu", **settings)
    ref = torch.optim.AdamW(theirs, fused=fused, foreach=False if not fused else None, **settings)
    for _ in range(100):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    for p, q in zip(ours, theirs):
        rel = ((p - q).norm() / q.norm()).item()
        assert rel < 1e-6, rel
        v_rel = ((opt.state[p]["exp_avg_sq"] - ref.state[q]["exp_avg_sq"]).norm()
                 / ref.state[q]["exp_avg_sq"].norm()).item()
        assert v_rel < 1e-6, v_rel


@needs_cpu_kernels
def test_fisher_adamw_auto_runs_the_cpu_kernels(monkeypatch):
    calls = []
    kernel = cpu_backend.fused_step
    monkeypatch.setitem(ops._IMPLS["fused_step"], "cpu",
                        lambda *args: calls.append(1) or kernel(*args))
    params = [torch.randn(5, requires_grad=True), torch.randn(3, dtype=torch.float64,
                                                               requires_grad=True)]
    twins = [p.detach().clone().requires_grad_() for p in params]
    opt = FisherAdamW(params, fisher="ema", fisher_scale=0.5, backend="auto")
    ref = FisherAdamW(twins, fisher="ema", fisher_scale=0.5, backend="reference")
    for p, q in zip(params, twins):
        p.grad = torch.ones_like(p)
        q.grad = torch.ones_like(q)
    opt.step()
    ref.step()
    assert calls == [1]  # the fp32 bucket; the fp64 one went to the reference
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------- fisher_accumulate/score


def _score_inputs(sizes, dtypes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    d_dtype, g_dtype, f_dtype = dtypes
    directions = [torch.randn(s, generator=gen).to(d_dtype) for s in sizes]
    grads = [torch.randn(s, generator=gen).to(g_dtype) for s in sizes]
    fishers = [(torch.rand(s, generator=gen) + 0.01).to(f_dtype) for s in sizes]
    return directions, grads, fishers


@needs_cpu_kernels
@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("fisher_dtype", STATE_DTYPES, ids=str)
@pytest.mark.parametrize("grad_dtype", PARAM_DTYPES, ids=str)
@pytest.mark.parametrize("scaled", [False, True])
def test_fisher_accumulate_matches_reference_exactly(isa, fisher_dtype, grad_dtype, scaled):
    sizes = [(n,) for n in (1, 7, 8, 9, 0, 4097, 70001)]
    _, grads, want = _score_inputs(sizes, (torch.float32, grad_dtype, fisher_dtype))
    got = [f.clone() for f in want]
    scale = torch.tensor(4.0) if scaled else None
    ops.fisher_accumulate(want, grads, alpha=0.9, beta=0.1 + 1e-3, grad_scale=scale,
                          backend="reference")
    ops.fisher_accumulate(got, grads, alpha=0.9, beta=0.1 + 1e-3, grad_scale=scale,
                          backend="cpu")
    for i, (a, e) in enumerate(zip(got, want)):
        assert torch.equal(a, e), i


@needs_cpu_kernels
@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("dtypes", [
    (torch.float32, torch.float32, torch.float32),
    (torch.float32, torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float16, torch.float32),
    (torch.float16, torch.float32, torch.bfloat16),
], ids=lambda d: "-".join(str(t).split(".")[1] for t in d))
def test_fisher_score_matches_float64(isa, dtypes):
    # Tensors crossing the fixed 16,384-element reduction chunks, and many tiny ones.
    sizes = [(n,) for n in (1, 7, 16383, 2, 40000, 0, 9)] + [(3,)] * 80
    directions, grads, fishers = _score_inputs(sizes, dtypes)
    got = ops.fisher_score(directions, grads, fishers, backend="cpu")
    assert got.dtype == torch.float64 and got.shape == (2,)
    d = [t.double() for t in directions]
    g = [t.double() for t in grads]
    f = [t.double() for t in fishers]
    exact = [math.fsum((a * b).tolist()) for a, b in zip(d, g)]
    weighted = [math.fsum((c * b * b).tolist()) for c, b in zip(f, g)]
    want = torch.tensor([math.fsum(exact), math.fsum(weighted)], dtype=torch.float64)
    magnitude = torch.tensor([sum((a * b).abs().sum().item() for a, b in zip(d, g)),
                              sum((c * b * b).sum().item() for c, b in zip(f, g))])
    assert ((got - want).abs() <= 1e-13 * magnitude).all(), (got, want)


@needs_cpu_kernels
@pytest.mark.skipif(not HAS_AVX2, reason="this CPU lacks AVX2, FMA or F16C")
def test_fisher_score_is_the_same_for_any_threads_and_loops():
    directions, grads, fishers = _score_inputs([(5,), (2**18 + 11,), (333,)],
                                               (torch.float32, torch.bfloat16, torch.float32))
    results = []
    previous_isa, previous_threads = torch.ops.fisherforget_C.cpu_isa(), torch.get_num_threads()
    try:
        for isa_name, threads in (("avx2", 1), ("avx2", 2), ("scalar", 2)):
            torch.ops.fisherforget_C.cpu_isa(isa_name)
            torch.set_num_threads(threads)
            results.append(ops.fisher_score(directions, grads, fishers, backend="cpu"))
    finally:
        torch.ops.fisherforget_C.cpu_isa(previous_isa)
        torch.set_num_threads(previous_threads)
    assert all(torch.equal(results[0], r) for r in results[1:]), results
    empty = ops.fisher_score([], [], [], backend="cpu")
    assert torch.equal(empty, torch.zeros(2, dtype=torch.float64))


# ---------------------------------------------------------------------------------------- errors
# The error inputs are the shared table of tests/step_cases.py.


@needs_cpu_kernels
@pytest.mark.parametrize("error, n, index", errors_for("cpu"))
def test_bad_step_input_is_refused_and_changes_nothing(error, n, index):
    check_error(error, "cpu", n, index)


@needs_cpu_kernels
@pytest.mark.parametrize("error, n, index", errors_for("cpu", "binding"))
def test_binding_errors_name_the_tensor_and_change_nothing(error, n, index):
    check_error(error, "cpu", n, index, call_binding=lambda lists, kwargs:
                torch.ops.fisherforget_C.fused_step(*lists, **kwargs))


@needs_cpu_kernels
def test_other_errors_name_the_problem():
    with pytest.raises(RuntimeError, match=r"grads has 1 tensors, expected 2 \(one per fisher\)"):
        torch.ops.fisherforget_C.fisher_accumulate([torch.ones(3)] * 2, [torch.ones(3)],
                                                   alpha=1.0, beta=1.0, grad_scale=None)
    with pytest.raises(TypeError, match=r"fishers\[0\] has dtype Half"):
        torch.ops.fisherforget_C.fisher_score([torch.ones(3)], [torch.ones(3)],
                                              [torch.ones(3, dtype=torch.half)])


def test_positional_hyperparameters_follow_the_schema():
    """The glue (cpu and cuda backends) passes StepHyper.op_args() positionally to
    fisherforget._C.fused_step: in the order of StepHyper.op_kwargs (the schema's), a tensor lr
    as lr_tensor."""
    hyper = ops.StepHyper(lr=torch.tensor(0.5, dtype=torch.float64), beta1=0.1, beta2=0.2,
                          eps=0.3, weight_decay=0.4, amsgrad=True, maximize=True,
                          fisher_mode="sum", fisher_beta=0.6, fisher_scale=0.7,
                          freeze_above=0.8, freeze_below=0.05)
    expected = list(hyper.op_kwargs().values())
    got = list(hyper.op_args())
    assert got[1] is expected[1] and got[:1] + got[2:] == expected[:1] + expected[2:]
    assert hyper.replace(lr=0.25).op_args()[:2] == (0.25, None)
