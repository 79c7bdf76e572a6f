"""The one table of ``fused_step`` cases and error inputs that every backend's tests consume, the
builder of their tensors, the one ulp comparator, and the drivers comparing a backend with the
reference backend and with the float64 oracle (``tests/oracle.py``).

* :data:`STEP_CASES`: named :class:`StepCase` entries (hyperparameters, tensor layout, the
  backends that run it), as torch's ``OptimizerInfo`` does for its optimizers;
* :func:`make_inputs` / :func:`make_grads`: the nine lists of ``ops.StepTensors`` of a case,
  deterministically from its seed;
* :func:`assert_close_ulp`: ``|actual - expected| <= max_ulp * ulp + rel * terms + atol``,
  elementwise; every backend's tolerance is stated with it;
* :func:`check_against_reference` / :func:`check_against_oracle`: the comparisons every backend
  test runs over the table;
* :data:`ERROR_CASES`: named :class:`ErrorCase` entries (how to corrupt a valid call, the
  exception and a regex of its message naming the parameter) for the op contract
  (``ops.fused_step``, every backend) and for the compiled binding (``fisherforget._C``'s checks,
  shared by the ``cpu`` and ``cuda`` backends).
"""

from __future__ import annotations

import contextlib
import math
import zlib
from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Sequence

import pytest
import torch

from fisherforget import backends, ops
from fisherforget.backends import cpu as cpu_backend
from oracle import OracleState, oracle_step

LISTS = ops.StepTensors._fields
ALL_BACKENDS = ("reference", "cpu", "triton", "cuda")
NO_TRITON = ("reference", "cpu", "cuda")  # large cases: the Triton interpreter is slow
HAS_GPU = torch.cuda.is_available()


# ------------------------------------------------------------------------------------ ulp


def ulp(x: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """One unit in the last place of each value of ``x`` in ``dtype``'s precision (default:
    ``x.dtype``), as float64: the spacing of that dtype's floats at the value's magnitude
    (subnormals get the spacing at the smallest normal)."""
    dtype = x.dtype if dtype is None else dtype
    finfo = torch.finfo(dtype)
    magnitude = x.detach().double().abs().clamp_min(finfo.tiny)
    return torch.exp2(torch.floor(torch.log2(magnitude))) * finfo.eps


def assert_close_ulp(actual: torch.Tensor, expected: torch.Tensor, max_ulp: float = 0, *,
                     dtype: Optional[torch.dtype] = None, rel: float = 0.0,
                     terms: Optional[torch.Tensor] = None, atol=0.0,
                     where: Optional[torch.Tensor] = None, equal_nan: bool = False,
                     what: str = "tensor") -> None:
    """Elementwise ``|actual - expected| <= max_ulp * ulp(expected, dtype) + rel * terms + atol``.

    ``dtype``: the precision the ulp is of; without it ``actual`` and ``expected`` must have the
    same dtype (and it is theirs); with it ``expected`` may be wider (a float64 oracle).
    ``terms``: the magnitudes a rounding error is relative to (default ``|expected|``); ``atol`` a
    number or a tensor. All zero: bitwise equal values (``-0 == 0``). ``where``: only these
    elements. ``equal_nan``: NaN where both are NaN passes; any other NaN fails.
    """
    if dtype is None:
        assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
        dtype = expected.dtype
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    a, e = actual.detach().double(), expected.detach().double().to(actual.device)
    tolerance = max_ulp * ulp(e, dtype) if max_ulp else torch.zeros_like(e)
    if rel:
        tolerance = tolerance + rel * (e.abs() if terms is None else terms.double().to(e.device))
    tolerance = tolerance + (atol.double().to(e.device) if isinstance(atol, torch.Tensor) else atol)
    ok = ((a - e).abs() <= tolerance) | (a == e)
    if equal_nan:
        ok |= a.isnan() & e.isnan()
    if where is not None:
        ok |= ~where.to(ok.device)
    if bool(ok.all()):
        return
    bad = ~ok
    index = tuple(bad.nonzero()[0].tolist())
    raise AssertionError(
        f"{what}: {int(bad.sum())} of {a.numel()} elements off by more than {max_ulp} ulp "
        f"+ {rel} rel + atol; first at {list(index)}: got {a[index].item()!r}, expected "
        f"{e[index].item()!r} (tolerance {tolerance[index].item()!r})")


# ------------------------------------------------------------------------------------ cases


@dataclass(frozen=True)
class StepCase:
    """One ``fused_step`` configuration.

    ``hyper``: ``ops.StepHyper`` keyword arguments (``lr`` a float; ``lr_dtype`` passes it as a
    0-dim tensor of that dtype). Layout: ``shapes`` of the params; ``param_dtype`` (grads too);
    ``state_dtype`` of the moments; ``fisher_dtype`` of the Fisher (default: ``state_dtype`` when
    the step uses the Fisher; no Fisher lists when it does not); ``masks``: params 0, 2, 4, ...
    get a random mask (about 70% True), the others ``None``; ``noncontiguous``: params, grads and
    first moments of odd index are strided views; ``grad_scale``: the grads are multiplied by it
    and it is passed as ``grad_scale``; ``found_inf``: passed as a 0-dim tensor. ``chained``:
    steps taken one after the other (fresh grads each). ``counts``: ``(step, fisher_count)`` of
    every tensor (default: random per tensor, steps 0-29, counts 0-11). ``inputs_seed``: the seed
    of the random inputs (default: from the name). ``moved``: the least fraction of param
    elements a step must change (a check that the comparison is not vacuous). ``backends``: the
    backends that run it (their checks accept it; the Triton interpreter gets the small cases).
    """

    name: str
    hyper: dict
    shapes: tuple = ((1,), (7,), (300,), (4097,))
    param_dtype: torch.dtype = torch.float32
    state_dtype: torch.dtype = torch.float32
    fisher_dtype: Optional[torch.dtype] = None
    masks: bool = False
    noncontiguous: bool = False
    grad_scale: Optional[float] = None
    found_inf: Optional[float] = None
    lr_dtype: Optional[torch.dtype] = None
    chained: int = 1
    counts: Optional[tuple] = None
    inputs_seed: Optional[int] = None
    moved: float = 0.0
    backends: tuple = ALL_BACKENDS

    def __post_init__(self):
        shapes = tuple((s,) if isinstance(s, int) else tuple(s) for s in self.shapes)
        object.__setattr__(self, "shapes", shapes)
        hyper = dict(self.hyper)
        object.__setattr__(self, "hyper", hyper)
        if self.fisher_dtype is None and ops.StepHyper(**hyper).uses_fisher:
            object.__setattr__(self, "fisher_dtype", self.state_dtype)
        assert set(self.backends) <= set(ALL_BACKENDS), self.backends

    __hash__ = None  # (hyper is a dict)

    @property
    def seed(self) -> int:
        return zlib.crc32(self.name.encode()) if self.inputs_seed is None else self.inputs_seed

    @property
    def amsgrad(self) -> bool:
        return bool(self.hyper.get("amsgrad", False))

    @property
    def accumulates(self) -> bool:
        return self.hyper.get("fisher_mode") is not None

    @property
    def freezes(self) -> bool:
        return (self.masks or self.hyper.get("freeze_above") is not None
                or self.hyper.get("freeze_below") is not None)

    def __repr__(self) -> str:  # pytest ids and failure messages
        return f"StepCase({self.name})"


def short_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
            torch.float64: "fp64"}[dtype]


PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
STATE_DTYPES = (torch.float32, torch.bfloat16)

# Sizes around the CPU kernels' 8-lane groups, a tensor split between their threads (16,384
# elements per thread at the least) and an empty one whose step count still advances.
CPU_SIZES = ((1,), (7,), (8,), (9,), (0,), (33, 65), (70001,), (5,))
# Odd sizes and a tensor of several CUDA chunks (65,536 elements each).
CUDA_SIZES = ((1,), (7,), (4097,), (65536 + 5,))

_CPU_BASE = dict(lr=3e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.05, fisher_beta=0.95)
# name -> (hyper over _CPU_BASE, layout)
_MATRIX = {
    # From the CPU kernels' tests: masks everywhere, grads scaled by 2 (not for fp16 params).
    "adamw_masked": (dict(), dict(masks=True)),
    "ema_scale_amsgrad": (dict(fisher_mode="ema", fisher_scale=0.7, amsgrad=True),
                          dict(masks=True)),
    "mean_thresholds_maximize": (dict(fisher_mode="mean", freeze_above=0.8, freeze_below=0.05,
                                      maximize=True), dict(masks=True)),
    "sum_scale_above_beta1_small": (dict(fisher_mode="sum", fisher_scale=0.3, freeze_above=2.5,
                                         beta1=0.3), dict(masks=True)),
    "fisher_read_only": (dict(fisher_scale=2.0, freeze_above=0.6), dict(masks=True)),
    # From the CUDA kernels' tests: amsgrad mostly on, tensor lrs, grad_scale, found_inf = 0.
    "adamw_plain": (dict(), dict(masks=False, grad_scale=None)),
    "ema_scale_mask_amsgrad": (dict(fisher_mode="ema", fisher_beta=0.9, fisher_scale=0.7,
                                    amsgrad=True), dict(masks=True, grad_scale=None)),
    "mean_thresholds_maximize_scaled": (
        dict(fisher_mode="mean", freeze_above=0.8, freeze_below=0.05, maximize=True,
             amsgrad=True), dict(masks=True, grad_scale=2.0, lr_dtype=torch.float32)),
    "sum_lr64_found_inf0": (dict(fisher_mode="sum", fisher_scale=0.3, freeze_above=2.5),
                            dict(masks=True, grad_scale=None, lr_dtype=torch.float64,
                                 found_inf=0.0)),
    "fisher_read_only_lr16": (dict(fisher_scale=2.0, freeze_above=0.6, amsgrad=True),
                              dict(masks=True, grad_scale=None, lr_dtype=torch.bfloat16)),
}
_FROM_CUDA = {"adamw_plain", "ema_scale_mask_amsgrad", "mean_thresholds_maximize_scaled",
              "sum_lr64_found_inf0", "fisher_read_only_lr16"}


def _matrix_cases() -> list:
    cases = []
    for config, (hyper, layout) in _MATRIX.items():
        for param_dtype in PARAM_DTYPES:
            for state_dtype in STATE_DTYPES:
                lay = dict(layout)
                if config not in _FROM_CUDA:
                    lay.setdefault("grad_scale", None if param_dtype == torch.float16 else 2.0)
                cases.append(StepCase(
                    f"{config}-{short_name(param_dtype)}-{short_name(state_dtype)}",
                    dict(_CPU_BASE, **hyper),
                    shapes=CUDA_SIZES if config in _FROM_CUDA else CPU_SIZES,
                    param_dtype=param_dtype, state_dtype=state_dtype, chained=2,
                    counts=None if config in _FROM_CUDA else (3, 2),
                    inputs_seed=None if config in _FROM_CUDA else 0, backends=NO_TRITON, **lay))
    return cases


# The Triton tests' base: Fisher EMA with damping.
_TRITON_BASE = dict(lr=3e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01,
                    fisher_mode="ema", fisher_beta=0.95, fisher_scale=0.3)
# name -> (hyper over _TRITON_BASE, layout); sizes [1, 7, 300, 4097], fp32, one step.
_FEATURES = {
    "adamw_only": (dict(fisher_mode=None, fisher_scale=0.0), {}),
    "amsgrad": (dict(amsgrad=True), {}),
    "maximize": (dict(maximize=True), {}),
    "fisher_ema": (dict(fisher_mode="ema"), {}),
    "fisher_mean": (dict(fisher_mode="mean"), {}),
    "fisher_sum": (dict(fisher_mode="sum"), {}),
    "fisher_read_only_scale": (dict(fisher_mode=None, fisher_scale=2.0), {}),
    "fisher_scale_zero": (dict(fisher_scale=0.0), {}),
    "freeze_above": (dict(freeze_above=1.0), {}),
    "freeze_below": (dict(freeze_below=0.5), {}),
    "freeze_both_read_only": (dict(fisher_mode=None, freeze_above=1.5, freeze_below=0.3), {}),
    "masks": (dict(), dict(masks=True)),
    "everything": (dict(amsgrad=True, maximize=True, fisher_mode="mean", fisher_scale=1.5,
                        freeze_above=1.2, freeze_below=0.2), dict(masks=True)),
    "grad_scale": (dict(), dict(grad_scale=1024.0)),
    "tensor_lr": (dict(lr=0.02), dict(lr_dtype=torch.float32)),
    "no_weight_decay": (dict(weight_decay=0.0), {}),
    "beta1_zero": (dict(beta1=0.0), {}),
    "lerp_large_weight": (dict(beta1=0.3, beta2=0.5), {}),
    "large_eps": (dict(eps=0.5), {}),
}


def _other_cases() -> list:
    cases = [StepCase(f"feature-{name}", dict(_TRITON_BASE, **hyper), **layout)
             for name, (hyper, layout) in _FEATURES.items()]
    ema_amsgrad = dict(_CPU_BASE, fisher_mode="ema", fisher_scale=0.7, amsgrad=True)
    mean_thresholds = dict(_CPU_BASE, fisher_mode="mean", freeze_above=0.8, freeze_below=0.05,
                           maximize=True)
    for dtype in PARAM_DTYPES:
        # bf16/fp16 params move visibly only with a large lr relative to their spacing.
        cases.append(StepCase(
            f"odd_sizes-{short_name(dtype)}",
            dict(_TRITON_BASE, lr=3e-2 if dtype == torch.float32 else 0.2),
            shapes=((1,), (7,), (4097,), (2**16 + 3,)), param_dtype=dtype,
            moved=0.99 if dtype == torch.float32 else 0.5))
    for state, fisher, param in ((torch.bfloat16, torch.float32, torch.float32),
                                 (torch.float32, torch.bfloat16, torch.bfloat16),
                                 (torch.bfloat16, torch.bfloat16, torch.float16)):
        cases.append(StepCase(
            f"low_precision_state-p{short_name(param)}-s{short_name(state)}-f{short_name(fisher)}",
            dict(_TRITON_BASE, amsgrad=True, lr=0.2, fisher_mode="sum"), shapes=((7,), (4097,)),
            param_dtype=param, state_dtype=state, fisher_dtype=fisher))
    cases += [
        StepCase("fp32_state_bf16_fisher-pbf16",
                 dict(mean_thresholds, amsgrad=True), shapes=((5,), (4099,)),
                 param_dtype=torch.bfloat16, fisher_dtype=torch.bfloat16, masks=True,
                 grad_scale=2.0, lr_dtype=torch.float32),
        StepCase("empty_tensors_count_steps", _TRITON_BASE, shapes=((0,), (5,))),
        StepCase("noncontiguous-pbf16", mean_thresholds, shapes=CPU_SIZES,
                 param_dtype=torch.bfloat16, masks=True, grad_scale=2.0, noncontiguous=True,
                 chained=2, backends=NO_TRITON),
        StepCase("noncontiguous_small", dict(_TRITON_BASE, amsgrad=True),
                 shapes=((7,), (33, 5), (300,), (4, 9)), masks=True, noncontiguous=True),
        # found_inf = 1: nothing changes, bit for bit.
        StepCase("found_inf-pfp16", mean_thresholds, shapes=CPU_SIZES,
                 param_dtype=torch.float16, masks=True, found_inf=1.0, backends=NO_TRITON),
        StepCase("found_inf-pbf16-scaled", dict(mean_thresholds, amsgrad=True),
                 shapes=((3,), (4097,), (65536 + 9,)), param_dtype=torch.bfloat16, masks=True,
                 grad_scale=2.0, lr_dtype=torch.float32, found_inf=1.0, backends=NO_TRITON),
        StepCase("found_inf-small", dict(_TRITON_BASE, amsgrad=True, fisher_mode="mean"),
                 shapes=((7,), (4097,)), masks=True, grad_scale=8.0, found_inf=1.0),
        StepCase("found_inf_zero-small", dict(_TRITON_BASE, amsgrad=True),
                 shapes=((7,), (4097,)), masks=True, found_inf=0.0),
    ]
    for lr_dtype in (torch.float32, torch.float64, torch.bfloat16):
        cases.append(StepCase(f"tensor_lr-{short_name(lr_dtype)}", dict(ema_amsgrad, weight_decay=0.3),
                              shapes=CPU_SIZES, masks=True, grad_scale=2.0, lr_dtype=lr_dtype,
                              chained=2, backends=NO_TRITON))
    return cases


STEP_CASES: list = _matrix_cases() + _other_cases()
assert len({c.name for c in STEP_CASES}) == len(STEP_CASES), "case names must be unique"
CASES_BY_NAME = {c.name: c for c in STEP_CASES}


def cases_for(backend: str) -> list:
    """The table's cases that ``backend`` runs, as pytest params named by the case."""
    return [pytest.param(c, id=c.name) for c in STEP_CASES if backend in c.backends]


# ----------------------------------------------------------------------------------- builder


def _values(shape, gen, *, scale=1.0, positive=False) -> torch.Tensor:
    if positive:
        return torch.rand(shape, generator=gen) * scale
    values = torch.randn(shape, generator=gen) * scale
    return torch.where(values == 0, torch.full_like(values, 0.5 * scale), values)  # never zero


def _place(values: torch.Tensor, dtype, device, noncontiguous=False, low=0.0) -> torch.Tensor:
    values = values.to(dtype=dtype, device=device)
    if low:
        values = values + low  # (in ``dtype``)
    if noncontiguous and values.dim() >= 1:
        # The same values, stored strided so that the tensor is not contiguous.
        wide = torch.empty(values.shape + (2,), dtype=dtype, device=device)
        wide[..., 0] = values
        values = wide[..., 0]
    return values


def make_inputs(case: StepCase, device="cpu", seed: Optional[int] = None):
    """``({list name: list}, generator)``: the nine lists of ``ops.StepTensors`` for ``case``,
    all but ``grads`` (:func:`make_grads` draws them from the returned generator), fresh random
    values (never zeros), the same for the same seed (default: from the case's name)."""
    gen = torch.Generator().manual_seed(case.seed if seed is None else seed)
    sd, fd = case.state_dtype, case.fisher_dtype
    shapes = case.shapes
    nc = [case.noncontiguous and i % 2 == 1 for i in range(len(shapes))]
    data = dict(
        params=[_place(_values(s, gen), case.param_dtype, device, c) for s, c in zip(shapes, nc)],
        grads=[],
        exp_avgs=[_place(_values(s, gen, scale=0.1), sd, device, c) for s, c in zip(shapes, nc)],
        exp_avg_sqs=[_place(_values(s, gen, scale=0.1, positive=True), sd, device, low=1e-4)
                     for s in shapes],
        # Independent of exp_avg_sqs: the maximum is taken either way.
        max_exp_avg_sqs=[_place(_values(s, gen, scale=0.2, positive=True), sd, device, low=1e-4)
                         for s in shapes] if case.amsgrad else [],
        fishers=[_place(_values(s, gen, scale=2.0, positive=True), fd, device)
                 for s in shapes] if fd is not None else [],
        masks=[(torch.rand(s, generator=gen) > 0.3).to(device) if case.masks and i % 2 == 0
               else None for i, s in enumerate(shapes)],
    )
    # Per-tensor counts that differ from tensor to tensor (t = step + 1 >= 1), or fixed ones.
    if case.counts is None:
        draw = lambda high: float(torch.randint(0, high, (), generator=gen))  # noqa: E731
        steps = [draw(30) for _ in shapes]
        counts = [draw(12) for _ in shapes]
    else:
        steps, counts = [[float(v)] * len(shapes) for v in case.counts]
    data["steps"] = [torch.tensor(v, device=device) for v in steps]
    data["fisher_counts"] = ([torch.tensor(v, device=device) for v in counts]
                             if case.accumulates else [])
    return data, gen


def make_grads(case: StepCase, gen: torch.Generator, device="cpu") -> list:
    scale = case.grad_scale or 1.0
    return [_place(_values(s, gen, scale=scale), case.param_dtype, device,
                   case.noncontiguous and i % 2 == 1) for i, s in enumerate(case.shapes)]


def make_hyper(case: StepCase, device="cpu") -> ops.StepHyper:
    hyper = dict(case.hyper)
    if case.lr_dtype is not None:
        hyper["lr"] = torch.tensor(hyper["lr"], dtype=case.lr_dtype, device=device)
    return ops.StepHyper(**hyper)


def make_scalars(case: StepCase, device="cpu") -> tuple:
    """``(grad_scale, found_inf)`` as the 0-dim tensors the op takes, or None."""
    return tuple(None if v is None else torch.tensor(float(v), device=device)
                 for v in (case.grad_scale, case.found_inf))


def clone(data: dict) -> dict:
    return {k: [None if t is None else t.clone() for t in v] for k, v in data.items()}


def tensors(data: dict, grads: Optional[list] = None) -> ops.StepTensors:
    return ops.StepTensors(*(grads if name == "grads" and grads is not None else data[name]
                             for name in LISTS))


def run_step(lists: Sequence, kwargs: dict, backend: str) -> None:
    """``ops.fused_step`` on the nine lists of ``lists`` with the hyperparameters of ``kwargs``
    (``StepHyper`` fields, plus ``grad_scale``/``found_inf`` if given)."""
    kw = dict(kwargs)
    grad_scale, found_inf = kw.pop("grad_scale", None), kw.pop("found_inf", None)
    with emulated_cuda(backend, lists):
        ops.fused_step(ops.StepTensors(*lists), ops.StepHyper(**kw), grad_scale=grad_scale,
                       found_inf=found_inf, backend=backend)


def run_case(case: StepCase, data: dict, grads: list, backend: str, device="cpu") -> None:
    """One step of ``case`` on ``data`` (in place) with ``grads``, through ``ops.fused_step``."""
    grad_scale, found_inf = make_scalars(case, device)
    with emulated_cuda(backend, data["params"]):
        ops.fused_step(tensors(data, grads), make_hyper(case, device), grad_scale=grad_scale,
                       found_inf=found_inf, backend=backend)


# ------------------------------------------------------------------------------- backends


cpu_backend.availability_error()  # imports fisherforget._C where it is built (its ops register)
BUILD_INFO = cpu_backend.build_info()  # {} without it
# The host emulation of the CUDA kernels (fisherforget_C::emulated_*) exists in builds with the
# CUDA kernels that were made for the tests (FISHERFORGET_TEST_OPS=1, as `make install` does).
CUDA_EMULATION = ("cuda" in BUILD_INFO.get("kernels", "").split(",")
                  and BUILD_INFO.get("test_ops") == "1")
NO_EMULATION = ("fisherforget._C has no CUDA kernels, or was built without the test ops "
                "(FISHERFORGET_TEST_OPS=1, as `make install` builds it)")


@contextlib.contextmanager
def cuda_emulation():
    """The CUDA glue routed to the host emulation of the CUDA kernels' per-thread code: on CPU
    tensors torch.ops.fisherforget_C runs the native CPU kernels, so its ops become their
    ``emulated_*`` twins, and the glue goes through torch.ops (``fisherforget._C.fused_step``
    would run CPU tensors on the native CPU kernels too)."""
    from fisherforget.backends.cuda import ops as cuda_glue

    with pytest.MonkeyPatch.context() as patch:
        for op in ("fused_step", "fisher_accumulate", "fisher_score"):
            patch.setattr(torch.ops.fisherforget_C, op,
                          getattr(torch.ops.fisherforget_C, f"emulated_{op}"))
        patch.setattr(cuda_glue, "_python_entry", lambda: None)
        yield


@contextlib.contextmanager
def emulated_cuda(backend: str, params: Sequence):
    """:func:`cuda_emulation` for backend ``cuda`` on CPU tensors; anything else: nothing
    changes."""
    on_cpu = any(isinstance(p, torch.Tensor) and p.device.type == "cpu" for p in params)
    if backend != "cuda" or not on_cpu or not CUDA_EMULATION:
        yield
        return
    with cuda_emulation():
        yield


def device_for(backend: str) -> str:
    """Where the table's cases run for ``backend`` in the default tests: the Triton kernels on
    the GPU when there is one (else interpreted on CPU), the CUDA kernels through their host
    emulation on CPU (``tests/backends/test_cuda.py`` adds the GPU), the rest on CPU."""
    return "cuda" if backend == "triton" and HAS_GPU else "cpu"


def unavailable(backend: str) -> Optional[str]:
    """Why the table's cases cannot run on ``backend`` here, or None."""
    if backend == "cuda":
        return None if CUDA_EMULATION else NO_EMULATION
    if not backends.is_available(backend):
        return f"backend {backend!r} unavailable: {backends.unavailable_reason(backend)}"
    if not backends.runs_on(backend, torch.device(device_for(backend))):
        return f"backend {backend!r} cannot run on {device_for(backend)} tensors here"
    return None


def skip_unless_available(backend: str):
    """A skipif mark for tests of ``backend`` (with the reason)."""
    reason = unavailable(backend)
    return pytest.mark.skipif(reason is not None, reason=reason or "")


# ------------------------------------------------------------------------------ comparisons

# compare(name, actual, expected, before, dtype) asserts one tensor of list ``name``.
Compare = Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor], None]
_EXACT = ("steps", "fisher_counts", "masks", "grads")


def check_against_reference(case: StepCase, backend: str, compare: Compare,
                            device="cpu") -> None:
    """``case`` through ``backend`` and through the reference from the same state, step by step
    (each step restarts both from the reference's state, so that a rounding difference cannot
    compound); ``compare`` judges params, moments and Fisher; counts, masks and grads must be
    equal bit for bit; a step with ``found_inf = 1`` changes nothing."""
    data, gen = make_inputs(case, device)
    for _ in range(case.chained):
        grads = make_grads(case, gen, device)
        grads_before = [g.clone() for g in grads]
        before, got = clone(data), clone(data)
        run_case(case, data, grads, "reference", device)
        run_case(case, got, grads, backend, device)
        for name in LISTS:
            if name == "grads":
                continue
            for i, (a, e) in enumerate(zip(got[name], data[name])):
                if e is None:
                    assert a is None, f"{name}[{i}]"
                elif name in _EXACT:
                    assert torch.equal(a, e), f"{name}[{i}]: {a} vs {e}"
                else:
                    compare(name, a, e, before[name][i])
        for i, (g, g0) in enumerate(zip(grads, grads_before)):
            assert torch.equal(g, g0), f"grads[{i}] was modified"
        if case.found_inf:
            assert_unchanged(got, before)
        if case.moved:
            moved = sum(int((a != b).sum()) for a, b in zip(got["params"], before["params"]))
            total = sum(p.numel() for p in before["params"])
            assert moved > case.moved * total, f"only {moved} of {total} params moved"


def assert_unchanged(data: dict, before: dict) -> None:
    for name, values in before.items():
        for i, (t, b) in enumerate(zip(data[name], values)):
            assert (t is None and b is None) or torch.equal(t, b), f"{name}[{i}] changed"


def near_threshold(fisher: Optional[torch.Tensor], hyper: dict) -> Optional[torch.Tensor]:
    """Elements whose Fisher is within rounding of a freezing threshold (their freeze decision
    may legitimately differ between fp32 and float64)."""
    near = None
    for thr in (hyper.get("freeze_above"), hyper.get("freeze_below")):
        if thr is not None and fisher is not None:
            close = (fisher - thr).abs() <= 1e-5 * max(thr, 1e-6) + 1e-7
            near = close if near is None else near | close
    return near


def oracle_state(data: dict, i: int) -> OracleState:
    # The oracle computes on the CPU, whatever device the backend under test ran on.
    def wide(key):
        return data[key][i].cpu().double().clone() if data[key] else None

    return OracleState(
        param=data["params"][i].cpu().double().clone(), exp_avg=wide("exp_avgs"),
        exp_avg_sq=wide("exp_avg_sqs"), max_exp_avg_sq=wide("max_exp_avg_sqs"),
        fisher=wide("fishers"), step=int(data["steps"][i]),
        fisher_count=int(data["fisher_counts"][i]) if data["fisher_counts"] else 0,
    )


def full_hyper(hyper: dict) -> dict:
    """Every ``StepHyper`` field of ``hyper`` (the defaults filled in), lr as a float."""
    h = ops.StepHyper(**hyper)
    lr = h.lr
    if isinstance(lr, torch.Tensor):
        lr = float(lr.float()) if lr.dtype in (torch.bfloat16, torch.float16) else float(lr)
    return dict(lr=lr, beta1=h.beta1, beta2=h.beta2, eps=h.eps, weight_decay=h.weight_decay,
                amsgrad=h.amsgrad, maximize=h.maximize, fisher_mode=h.fisher_mode,
                fisher_beta=h.fisher_beta, fisher_scale=h.fisher_scale,
                freeze_above=h.freeze_above, freeze_below=h.freeze_below)


def oracle_expected(h: dict, data: dict, grads: list, grad_scale: Optional[float],
                    found_inf: bool) -> list:
    """``[(new OracleState, frozen)]`` per param of one step from ``data`` (``h``: every
    hyperparameter, as :func:`full_hyper` gives them)."""
    oracle_hyper = dict(
        lr=h["lr"], betas=(h["beta1"], h["beta2"]), eps=h["eps"], weight_decay=h["weight_decay"],
        amsgrad=h["amsgrad"], maximize=h["maximize"], fisher=h["fisher_mode"],
        fisher_beta=h["fisher_beta"], fisher_scale=h["fisher_scale"],
        freeze_above=h["freeze_above"], freeze_below=h["freeze_below"],
    )
    return [oracle_step(oracle_state(data, i), grads[i].cpu(), mask=None if data["masks"][i] is None
                        else data["masks"][i].cpu(), grad_scale=grad_scale or 1.0,
                        found_inf=found_inf, **oracle_hyper)
            for i in range(len(data["params"]))]


def assert_matches_oracle(h: dict, param_dtype: torch.dtype, grad_scale: Optional[float],
                          data: dict, before: dict, grads: list, i: int, new: OracleState,
                          frozen: torch.Tensor) -> None:
    """Param ``i`` of ``data`` (after one step from ``before``) against the oracle's ``new``:
    frozen elements bit for bit, the rest within rounding of the terms (elements within rounding
    of a freezing threshold are skipped)."""
    sd = data["exp_avgs"][i].dtype
    frozen = frozen.to(data["params"][i].device)
    near = near_threshold(new.fisher, h)
    check = torch.ones_like(frozen) if near is None else ~near.to(frozen.device)
    # Frozen elements keep param and moments bit for bit.
    for key in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"):
        if data[key]:
            assert torch.equal(data[key][i][frozen & check], before[key][i][frozen & check]), key
    # fp32 rounding is relative to the size of the terms a result is made of, not to the result:
    # m = beta1*m + (1-beta1)*g can cancel to ~0, and the param update inherits that noise. The
    # weight 1-beta1 itself is rounded to fp32 (as in torch's AdamW), an error of up to 2^-24
    # times |m| + |g| whatever beta1 (the last term, scaled to the 4e-6 used below).
    g = grads[i].double().abs().cpu() / (grad_scale or 1.0)
    m_old = before["exp_avgs"][i].double().abs().cpu()
    m_terms = h["beta1"] * m_old + (1 - h["beta1"]) * g + 0.03 * (m_old + g)
    second = new.max_exp_avg_sq if h["amsgrad"] else new.exp_avg_sq
    t = new.step
    denom = second.sqrt() / math.sqrt(1 - h["beta2"] ** t) + h["eps"]
    damping = 1.0 if h["fisher_scale"] == 0 else 1 / (1 + h["fisher_scale"] * new.fisher)
    update_bound = h["lr"] / (1 - h["beta1"] ** t) * damping * m_terms / denom
    decayed = before["params"][i].double().cpu() * (1 - h["lr"] * h["weight_decay"])
    check = check.cpu()
    # Param: 1 ulp of its dtype (storage rounding) plus fp32 noise of the decayed value and of
    # the update.
    assert_close_ulp(data["params"][i].cpu(), new.param, 1, dtype=param_dtype, rel=4e-6,
                     terms=decayed.abs() + update_bound, atol=1e-30, where=check,
                     what=f"params[{i}] vs oracle")
    # State, stored in state_dtype: its ulp plus fp32 noise of the terms (all non-negative but
    # the first moment's).
    for key, value in (("exp_avgs", new.exp_avg), ("exp_avg_sqs", new.exp_avg_sq),
                       ("max_exp_avg_sqs", new.max_exp_avg_sq), ("fishers", new.fisher)):
        if not data[key]:
            continue
        got = data[key][i]
        assert got.dtype == (sd if key != "fishers" else got.dtype)
        terms = m_terms if key == "exp_avgs" else value.abs()
        assert_close_ulp(got.cpu(), value, 1, dtype=got.dtype, rel=4e-6, terms=terms,
                         atol=1e-30, where=check, what=f"{key}[{i}] vs oracle")
    assert int(data["steps"][i]) == new.step
    if data["fisher_counts"]:
        assert int(data["fisher_counts"][i]) == new.fisher_count


def check_against_oracle(case: StepCase, backend: str, device="cpu") -> None:
    """``case`` through ``backend`` against the float64 oracle (``tests/oracle.py``), its chained
    steps each from the backend's own state: within rounding of the terms (the tolerance of
    :func:`assert_matches_oracle`), frozen elements and skipped steps bit for bit; where the case
    freezes, some elements but not all are frozen (so that both checks mean something)."""
    h = full_hyper(case.hyper)
    if case.lr_dtype is not None:
        h["lr"] = full_hyper(dict(case.hyper, lr=torch.tensor(case.hyper["lr"],
                                                               dtype=case.lr_dtype)))["lr"]
    data, gen = make_inputs(case, device)
    for _ in range(case.chained):
        grads = make_grads(case, gen, device)
        before = clone(data)
        expected = oracle_expected(h, data, grads, case.grad_scale, bool(case.found_inf))
        run_case(case, data, grads, backend, device)
        if case.found_inf:  # nothing at all changes
            assert_unchanged(data, before)
            continue
        for i, (new, frozen) in enumerate(expected):
            assert_matches_oracle(h, case.param_dtype, case.grad_scale, data, before, grads, i,
                                  new, frozen)
        if case.freezes:
            n_frozen = sum(int(frozen.sum()) for _, frozen in expected)
            total = sum(p.numel() for p in data["params"])
            assert 0 < n_frozen < total, f"{n_frozen} of {total} elements frozen"


# ------------------------------------------------------------------------------ error inputs


@dataclass
class StepCall:
    """A valid ``fused_step`` call for an :class:`ErrorCase` to corrupt: the nine lists, the
    ``StepHyper`` keyword arguments, ``grad_scale`` and ``found_inf``."""

    lists: dict
    hyper: dict
    grad_scale: Optional[torch.Tensor] = None
    found_inf: Optional[torch.Tensor] = None
    index: int = 0  # the param an error case corrupts

    def op_kwargs(self) -> dict:
        """The arguments of ``torch.ops.fisherforget_C.fused_step`` (the binding) past the
        lists; unknown Fisher modes etc. are passed through unvalidated."""
        kw = dict(lr=1e-3, lr_tensor=None, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                  amsgrad=False, maximize=False, fisher_mode=None, fisher_beta=0.9,
                  fisher_scale=0.0, freeze_above=None, freeze_below=None)
        kw.update({k: v for k, v in self.hyper.items() if k != "lr"})
        lr = self.hyper.get("lr", 1e-3)
        if isinstance(lr, torch.Tensor):
            kw["lr_tensor"] = lr
        else:
            kw["lr"] = lr
        return dict(kw, grad_scale=self.grad_scale, found_inf=self.found_inf)


def _valid_call(n: int, index: int, device="cpu") -> StepCall:
    """``n`` params of 10 elements, amsgrad and a Fisher EMA, no masks; ``index`` is the param
    the error cases corrupt."""
    case = StepCase("errors", dict(lr=1e-3, amsgrad=True, fisher_mode="ema", fisher_beta=0.9),
                    shapes=((10,),) * n)
    data, gen = make_inputs(case, device, seed=17)
    data["grads"] = make_grads(case, gen, device)
    return StepCall(data, dict(case.hyper), index=index)


@dataclass(frozen=True)
class ErrorCase:
    """A call that must fail, naming the parameter, and change nothing.

    ``corrupt(call)`` changes a valid :class:`StepCall` (param ``call.index`` of it, where it
    touches one tensor). ``match`` is a regex of the message; ``{i}``, ``{n}`` and
    ``{backend}`` are replaced by the corrupted index, the number of params and the backend.
    ``level``: ``"ops"`` through ``ops.fused_step`` (the op contract, then the backend's checks;
    every backend of ``backends``), or ``"binding"``: the compiled binding's checks called
    directly (``fisherforget._C``, shared by backends ``cpu`` and ``cuda``). ``overrides``:
    ``{backend: (error, match)}`` where a backend refuses the input at another place.
    """

    name: str
    corrupt: Callable[[StepCall], None]
    error: type
    match: str
    level: str = "ops"
    backends: tuple = ALL_BACKENDS
    overrides: dict = field(default_factory=dict)

    __hash__ = None

    def expected(self, backend: str, call: StepCall) -> tuple:
        error, match = self.overrides.get(backend, (self.error, self.match))
        n = len(call.lists["params"])
        return error, (match.replace("{i}", str(call.index)).replace("{n-1}", str(n - 1))
                       .replace("{n}", str(n)).replace("{backend}", backend))

    def __repr__(self) -> str:
        return f"ErrorCase({self.name})"


def _set(name: str, make: Callable) -> Callable[[StepCall], None]:
    """Replace tensor ``call.index`` of list ``name`` by ``make(old tensor, call)``."""
    def corrupt(call: StepCall) -> None:
        values = call.lists[name]
        old = values[call.index] if call.index < len(values) else None
        values[call.index] = make(old, call)
    return corrupt


def _hyper(**changes) -> Callable[[StepCall], None]:
    return lambda call: call.hyper.update(changes)


def _pop(name: str) -> Callable[[StepCall], None]:
    return lambda call: call.lists[name].pop()


def _clear(*names: str) -> Callable[[StepCall], None]:
    def corrupt(call):
        for name in names:
            call.lists[name].clear()
    return corrupt


def _both(*changes) -> Callable[[StepCall], None]:
    def corrupt(call):
        for change in changes:
            change(call)
    return corrupt


def _scalar(name: str, value) -> Callable[[StepCall], None]:
    return lambda call: setattr(call, name, value)


_KERNELS = ("cpu", "triton", "cuda")
ERROR_CASES = [
    # ---- the op contract: checked by fisherforget.ops (every backend), then the backend's own
    ErrorCase("grads_length", _pop("grads"), ValueError, r"grads has {n-1} entries"),
    ErrorCase("masks_length", _clear("masks"), ValueError,
              r"masks has 0 entries, params {n}: they must match"),
    ErrorCase("grad_not_a_tensor", _set("grads", lambda old, c: 3.0), TypeError,
              r"grads\[{i}\] must be a torch.Tensor"),
    ErrorCase("grad_shape", _set("grads", lambda old, c: old[:3]), ValueError,
              r"grads\[{i}\] has shape \(3,\), its param \(10,\)"),
    ErrorCase("mask_dtype", _set("masks", lambda old, c: c.lists["params"][0].new_ones(10)),
              TypeError,
              r"masks\[{i}\] must be a bool tensor"),
    ErrorCase("step_dtype", _set("steps", lambda old, c: old.double()), ValueError,
              r"steps\[{i}\] must be a 0-dim float32 tensor, got shape \(\) and dtype "
              r"torch.float64"),
    ErrorCase("step_shape", _set("steps", lambda old, c: torch.zeros(1, device=old.device)), ValueError,
              r"steps\[{i}\] must be a 0-dim float32 tensor, got shape \(1,\)"),
    ErrorCase("missing_fishers", _clear("fishers"), ValueError,
              r"fishers is empty, but fisher_mode, fisher_scale or a freeze threshold uses"),
    ErrorCase("missing_max_exp_avg_sqs", _pop("max_exp_avg_sqs"), ValueError,
              r"max_exp_avg_sqs has {n-1} entries, params {n}: they must match"),
    ErrorCase("bad_fisher_mode", _hyper(fisher_mode="median"), ValueError,
              r"Invalid fisher: 'median'"),
    ErrorCase("grad_scale_shape", _scalar("grad_scale", torch.ones(2)), ValueError,
              r"grad_scale must hold one value"),
    # What no backend can write element by element, refused before any launch.
    ErrorCase("self_overlapping_param", _set("params", lambda old, c: old[:1].expand(10)),
              ValueError, r"params\[{i}\] \(shape \(10,\), stride \(0,\)\) overlaps itself"),
    ErrorCase("shared_exp_avg", _set("exp_avgs", lambda old, c: c.lists["exp_avg_sqs"][c.index]),
              ValueError, r"exp_avg_sqs\[{i}\] shares its memory with exp_avgs\[{i}\]"),
    ErrorCase("shared_count", _set("fisher_counts", lambda old, c: c.lists["steps"][c.index]),
              ValueError, r"fisher_counts\[{i}\] shares its memory with steps\[{i}\]"),
    # The kernels' dtypes: fp64 params only on the reference. The compiled backends (cpu, cuda)
    # have no Python preflight: the binding's check is theirs (TypeError, as the contract's).
    ErrorCase("fp64_param", _both(_set("params", lambda old, c: old.double()),
                                  _set("grads", lambda old, c: old.double())), TypeError,
              r"params\[{i}\] has dtype Double; supported: float32, bfloat16, float16",
              backends=_KERNELS, overrides={"triton": (
                  TypeError, r"params\[{i}\] has dtype torch.float64; backend 'triton' "
                             r"supports")}),
    # The compiled kernels need grads of their param's dtype, and fp32/bf16 state.
    ErrorCase("grad_dtype_differs", _set("grads", lambda old, c: old.bfloat16()), TypeError,
              r"grads\[{i}\] has dtype BFloat16 but params\[{i}\] has Float",
              backends=("cpu", "cuda")),
    ErrorCase("fp16_state", _both(*(_set(k, lambda old, c: old.half())
                                    for k in ("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"))),
              TypeError, r"exp_avgs\[{i}\] has dtype Half; supported: float32, bfloat16 \(",
              backends=("cpu", "cuda")),
    # ---- the compiled binding (csrc/binding_checks.h), called directly: cpu and cuda
    ErrorCase("grad_dtype", _set("grads", lambda old, c: old.double()), TypeError,
              r"grads\[{i}\] has dtype Double but params\[{i}\] has Float", level="binding"),
    ErrorCase("half_state", _set("exp_avgs", lambda old, c: old.half()), TypeError,
              r"exp_avgs\[{i}\] has dtype Half; supported: float32, bfloat16 \(",
              level="binding"),
    ErrorCase("state_dtypes_differ", _set("exp_avg_sqs", lambda old, c: old.bfloat16()),
              TypeError, r"exp_avg_sqs\[{i}\] has dtype BFloat16 but exp_avgs\[{i}\] has "
                            r"Float", level="binding"),
    ErrorCase("fisher_shape", _set("fishers", lambda old, c: old[:5]), RuntimeError,
              r"fishers\[{i}\] has shape \[5\] but params\[{i}\] has shape \[10\]",
              level="binding"),
    # (No contiguity error: the CPU and CUDA bindings step non-contiguous tensors themselves.)
    ErrorCase("steps_shape", _set("steps", lambda old, c: torch.zeros(2)), RuntimeError,
              r"steps\[{i}\] must hold one element", level="binding"),
    ErrorCase("fisher_count_dtype", _set("fisher_counts", lambda old, c: old.double()),
              TypeError, r"fisher_counts\[{i}\] must be float32", level="binding"),
    ErrorCase("mask_not_bool", _set("masks", lambda old, c: torch.ones(10)), TypeError,
              r"masks\[{i}\] must be a bool tensor", level="binding"),
    ErrorCase("no_max_exp_avg_sqs", _clear("max_exp_avg_sqs"), RuntimeError,
              r"max_exp_avg_sqs has 0 tensors, expected {n} \(amsgrad=True\)", level="binding"),
    ErrorCase("param_dtype", _set("params", lambda old, c: old.double()), TypeError,
              r"params\[{i}\] has dtype Double; supported: float32, bfloat16, float16",
              level="binding"),
    ErrorCase("unknown_fisher_mode", _hyper(fisher_mode="max"), RuntimeError,
              r"fisher_mode must be 'ema', 'mean', 'sum' or None", level="binding"),
    ErrorCase("freeze_without_fishers", _both(_clear("fishers", "fisher_counts"),
                                              _hyper(freeze_above=1.0)),
              RuntimeError, r"freeze_above needs the fishers list", level="binding"),
    ErrorCase("integer_lr_tensor", _hyper(lr=torch.tensor(1)), TypeError,
              r"lr_tensor must be a floating-point tensor", level="binding"),
]
assert len({e.name for e in ERROR_CASES}) == len(ERROR_CASES)


def errors_for(backend: str, level: str = "ops") -> list:
    """The error cases of ``level`` that ``backend`` is checked with, as pytest params, each at
    param 0 of one and at param 2 of three."""
    return [pytest.param(e, n, i, id=f"{e.name}-{i}of{n}") for e in ERROR_CASES
            if e.level == level and backend in e.backends for n, i in ((1, 0), (3, 2))]


def check_error(error: ErrorCase, backend: str, n: int, index: int,
                call_binding: Optional[Callable] = None, device="cpu") -> None:
    """Corrupt a valid call of ``n`` params at param ``index`` as ``error`` says; the call (through
    ``ops.fused_step``, or ``call_binding(lists, op_kwargs)`` for the binding's checks) raises
    the expected error with the expected message and changes no tensor."""
    call = _valid_call(n, index, device)
    error.corrupt(call)
    kind, match = error.expected(backend, call)
    before = {k: [t.clone() if isinstance(t, torch.Tensor) else t for t in v]
              for k, v in call.lists.items()}
    lists = [call.lists[name] for name in LISTS]
    with pytest.raises(kind, match=match):
        if call_binding is not None:
            call_binding(lists, call.op_kwargs())
        else:
            with emulated_cuda(backend, call.lists["params"]):
                ops.fused_step(ops.StepTensors(*lists), ops.StepHyper(**call.hyper),
                               grad_scale=call.grad_scale, found_inf=call.found_inf,
                               backend=backend)
    for name, values in before.items():
        for i, (t, b) in enumerate(zip(call.lists[name], values)):
            if isinstance(b, torch.Tensor):
                assert torch.equal(t, b), f"{name}[{i}] changed"


def replace_case(case: StepCase, **changes) -> StepCase:
    """``case`` with other fields (e.g. shapes for a backend-specific test)."""
    return replace(case, **changes)
