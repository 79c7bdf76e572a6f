"""The host helpers of the step path (``csrc/host_tables.h``, ``fisherforget._C``): the gradient
layout key the optimizer compares per step, the address rows of the Triton tables, and the CUDA
binding's dry run. Each is compared with an independent Python statement of what it computes,
and the optimizer and the Triton backend are checked to behave the same with and without them."""

from __future__ import annotations

import copy

import pytest
import torch

from fisherforget import FisherAdamW, _native, ops
from fisherforget.backends.triton import ops as triton_backend

triton_backend.load_kernels()  # fisherforget.kernels, also from a source checkout
from fisherforget.kernels import multi_tensor  # noqa: E402

try:
    import fisherforget._C as native
except ImportError as error:  # absent, or built for another torch: the same skip either way
    pytest.skip(f"fisherforget._C does not import: {error}", allow_module_level=True)
if not hasattr(native, "layout_key"):
    pytest.skip("fisherforget._C predates the host helpers; rebuild it", allow_module_level=True)


def _python_key(tensors):
    return [(type(t), t.dtype, t.device, t.layout, tuple(t.shape)) for t in tensors]


def _variants():
    base = [torch.zeros(3, 4), torch.zeros(5), torch.zeros(()), torch.zeros(2, 0)]
    yield "equal", [t.clone() for t in base]
    yield "strides are not layout", [base[0].t().contiguous().t(), *base[1:]]
    yield "dtype", [base[0].double(), *base[1:]]
    yield "shape", [base[0].view(4, 3), *base[1:]]
    yield "ndim", [base[0].view(12), *base[1:]]
    yield "type", [torch.nn.Parameter(base[0]), *base[1:]]
    yield "device", [base[0].to("meta"), *base[1:]]
    yield "layout", [base[0].to_sparse(), *base[1:]]
    yield "length", base[:-1]
    yield "order", [base[1], base[0], *base[2:]]
    yield "base", base


@pytest.mark.parametrize("name, other", list(_variants()))
def test_layout_key_is_equal_exactly_when_the_python_statement_is(name, other):
    base = [torch.zeros(3, 4), torch.zeros(5), torch.zeros(()), torch.zeros(2, 0)]
    same = _python_key(other) == _python_key(base)
    assert (native.layout_key(other) == native.layout_key(base)) == same
    assert same == (name in ("equal", "strides are not layout", "base"))


def _columns(n=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(int(s), generator=gen) for s in torch.randint(1, 40, (n,), generator=gen)]
    grads = [torch.randn_like(p) for p in params]
    masks = [torch.rand(p.shape, generator=gen) > 0.5 if i % 3 == 0 else None
             for i, p in enumerate(params)]
    steps = [torch.zeros(()) for _ in params]
    return [params, grads, None, masks, steps]


def _irregular(columns, how):
    columns = [None if c is None else list(c) for c in columns]
    if how == "non-contiguous":
        columns[1][2] = torch.randn(2 * columns[0][2].numel())[::2]
    elif how == "mixed dtype":
        columns[1][3] = columns[1][3].double()
    elif how == "two devices":
        columns[0][1] = columns[0][1].to("meta")
    elif how == "misaligned":
        columns[0][4] = torch.randn(columns[0][4].numel() + 1)[1:]
    return columns


@pytest.mark.parametrize("how", ["regular", "non-contiguous", "mixed dtype", "two devices",
                                 "misaligned"])
def test_address_rows_match_the_python_statement(how):
    columns = _irregular(_columns(), how)
    got = multi_tensor.Rows(*native.address_rows(columns, 3))
    want = multi_tensor._address_rows_python(columns, 3)
    assert torch.equal(got.rows, want.rows)
    assert (got.regular, got.aligned) == (want.regular, want.aligned)
    assert got.regular == (how in ("regular", "misaligned"))
    assert got.aligned == (how not in ("misaligned",))
    # The rows hold what they claim: addresses, 0 where absent, element counts last.
    params, grads, _, masks, steps = columns
    assert got.rows[:, 0].tolist() == [p.data_ptr() for p in params]
    assert got.rows[:, 2].eq(0).all()
    assert got.rows[:, 3].tolist() == [0 if m is None else m.data_ptr() for m in masks]
    assert got.rows[:, -1].tolist() == [p.numel() for p in params]


def test_address_rows_refuse_a_short_list_naming_it():
    columns = _columns()
    columns[1] = columns[1][:-1]
    with pytest.raises(RuntimeError, match="list 1 has 6 tensors, the first list 7"):
        native.address_rows(columns, 2)
    with pytest.raises(TypeError, match=r"columns\[1\]\[0\] must be a tensor or None, got int"):
        native.address_rows([columns[0], [1] * 7], 2)


def test_chunk_tables_cut_each_tensor_into_chunks():
    numels = [1, 5000, 0, 70000, 33]
    rows = torch.tensor([[11 * i, 0, n] for i, n in enumerate(numels)], dtype=torch.int64)
    tables = multi_tensor.build_tables(rows, 4096, torch.device("cpu"), aligned=True)
    expected = [(i, c) for i, n in enumerate(numels) for c in range(-(-n // 4096))]
    assert [(int(w >> 32), int(w & 0xFFFFFFFF)) for w in tables.chunks] == expected
    assert tables.tensors.tolist()[:15] == rows.flatten().tolist()


def _model_and_grads(dtype=torch.float32):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in ((4, 3), (7,), (1,))]
    return params, [[torch.randn_like(p) for p in params] for _ in range(3)]


@pytest.fixture(params=["native", "python"])
def helpers(request, monkeypatch):
    """Run a test with the extension's host helpers and with the Python fallbacks."""
    if request.param == "python":
        monkeypatch.setattr(_native, "_RESOLVED", [None])
    return request.param


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_steps_are_the_same_with_and_without_the_helpers(helpers, backend):
    params, grads = _model_and_grads()
    reference = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = FisherAdamW(params, lr=1e-2, backend=backend)
    ref = FisherAdamW(reference, lr=1e-2, backend="reference")
    for step_grads in grads:
        for p, q, g in zip(params, reference, step_grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for p, q in zip(params, reference):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


@pytest.mark.parametrize("change, message", [
    (lambda g: g.double(), "gradient dtype torch.float64 does not match param 1"),
    (lambda g: g[:-1], r"the exp_avg state of param 1 of group 0 \(shape \(6,\)\) has shape "
                       r"\(7,\)"),
    (lambda g: g.to_sparse(), "does not support sparse gradients: param 1"),
])
def test_a_gradient_that_changes_after_the_plan_is_named_and_nothing_moves(helpers, change,
                                                                           message):
    params, grads = _model_and_grads()
    opt = FisherAdamW(params, lr=1e-2, backend="reference")
    for p, g in zip(params, grads[0]):
        p.grad = g
    opt.step()  # builds the plan
    new_grad = change(grads[1][1])
    if new_grad.shape != params[1].shape:  # the param itself changed shape (torch refuses a
        params[1].data = torch.randn(new_grad.shape)  # grad of another shape)
    if new_grad.dtype != params[1].dtype:
        params[1].grad_dtype = None  # torch refuses a grad of another dtype unless told
    params[1].grad = new_grad
    before = [p.detach().clone() for p in params]
    state = copy.deepcopy(opt.state_dict())
    with pytest.raises(RuntimeError, match=message):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    after = opt.state_dict()
    for key, value in state["state"].items():
        for name, tensor in value.items():
            assert torch.equal(after["state"][key][name], tensor), name


def test_backend_preflight_runs_when_the_plan_or_the_settings_change_not_every_step(
        monkeypatch):
    params = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3).double())]
    opt = FisherAdamW([{"params": [params[0]], "backend": "cpu"},
                       {"params": [params[1]], "backend": "reference"}], lr=1e-2)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    calls = []
    monkeypatch.setitem(ops._CHECKS["fused_step"], "cpu",
                        lambda tensors, hyper: calls.append(len(tensors.params)))
    opt.step()
    assert calls == []  # same plan, same gradients, same settings: no per-step preflight
    opt.param_groups[0]["lr"] = 5e-3
    opt.step()
    assert calls == [1]  # new settings: checked again
    opt.step()
    assert calls == [1]
    opt.param_groups[0]["amsgrad"] = True  # a new plan (and state)
    opt.step()
    assert calls == [1, 1]


cuda_binding = pytest.mark.skipif(not hasattr(native, "dry_run_fused_step"),
                                  reason="fisherforget._C has no CUDA binding (a CPU-only build) "
                                  "or was built without the test ops (FISHERFORGET_TEST_OPS=1)")


def _step_lists(n=5, fisher=True):
    gen = torch.Generator().manual_seed(1)
    params = [torch.randn(9, generator=gen) for _ in range(n)]
    return ops.StepTensors(
        params, [torch.randn(9, generator=gen) for _ in params],
        [torch.zeros(9) for _ in params], [torch.zeros(9) for _ in params], [],
        [torch.zeros(9) for _ in params] if fisher else [], [None] * n,
        [torch.zeros(()) for _ in params], [torch.zeros(()) for _ in params] if fisher else [])


@cuda_binding
def test_the_dry_run_plans_the_cuda_step_and_writes_nothing():
    tensors = _step_lists()
    before = copy.deepcopy(tensors)
    native.dry_run_fused_step(*tensors, *ops.StepHyper(lr=0.1, fisher_mode="ema").op_args(),
                              None, None)
    for got, want in zip(tensors, before):
        assert all(a is b is None or torch.equal(a, b) for a, b in zip(got, want))


@cuda_binding
def test_the_dry_run_checks_like_the_cuda_binding():
    tensors = _step_lists()
    tensors.grads[2] = tensors.grads[2].double()
    with pytest.raises(TypeError, match=r"grads\[2\] has dtype Double but params\[2\]"):
        native.dry_run_fused_step(*tensors, *ops.StepHyper(lr=0.1).op_args(), None, None)


# ------------------------------------------------------------ pinned memory for captured tables

def _staging(limit_bytes=1 << 20):
    """A CaptureStaging over pageable memory that counts its allocations (none under capture)."""
    calls = []

    def allocate(n):
        calls.append(n)
        return torch.empty(n, dtype=torch.int64)

    staging = multi_tensor.CaptureStaging(limit_bytes=limit_bytes, allocate=allocate)
    staging.MIN_FREE_BYTES, staging.BLOCK_BYTES = 64, 256  # small, to reach every branch
    return staging, calls


def test_captured_tables_come_from_memory_reserved_outside_capture():
    staging, calls = _staging()
    with pytest.raises(RuntimeError, match=r"no pinned staging memory is left .* Run the step "
                                           r"once outside capture before capturing it"):
        staging.take(torch.arange(5))  # a capture before any eager call
    staging.reserve(5)  # the eager call
    assert len(calls) == 1
    first = staging.take(torch.arange(5))
    second = staging.take(torch.arange(7) * 3)
    assert len(calls) == 1  # take() never allocates
    assert first.tolist() == list(range(5)) and second.tolist() == [3 * i for i in range(7)]
    assert first.data_ptr() + 6 * 8 == second.data_ptr()  # even offsets, no overlap


def test_an_equal_captured_table_shares_its_memory():
    staging, _ = _staging()
    staging.reserve(4)
    a = staging.take(torch.tensor([1, 2, 3, 4]))
    b = staging.take(torch.tensor([1, 2, 3, 4]))
    c = staging.take(torch.tensor([1, 2, 3, 5]))
    assert a.data_ptr() == b.data_ptr() != c.data_ptr()
    assert len(staging._taken) == 2


def test_the_reserve_grows_before_it_runs_low_and_stops_at_its_limit():
    staging, calls = _staging(limit_bytes=1024)
    staging.reserve(4)
    assert calls == [32]  # BLOCK_BYTES / 8 words
    staging.reserve(4)
    assert calls == [32]  # enough left: no allocation
    staging.take(torch.arange(26))  # 6 words left: < 2 * 4 words, < MIN_FREE_BYTES
    staging.reserve(4)
    assert calls == [32, 32]
    staging.reserve(40)  # wants 4 * 40 words: past the 1 KiB limit, so nothing is allocated
    assert calls == [32, 32] and staging.allocated_bytes == 512
    with pytest.raises(RuntimeError, match=r"1 tables captured, 512 of at most 1024 bytes"):
        staging.take(torch.arange(40))
    # The memory already taken stays valid (a graph may still replay it).
    assert staging.take(torch.arange(26)).tolist() == list(range(26))
