"""FisherAdamW under ``torch.compile``.

What works (torch 2.14):

* ``opt.step()`` traces into one graph (``fullgraph=True``) with the reference backend; kernel
  backends enter the graph as the custom ops ``torch.ops.fisherforget.*`` with fake kernels.
* A tensor ``lr`` (``lr=torch.tensor(1e-3)``), updated in place by an LR scheduler (torch's
  schedulers ``fill_`` a tensor lr) or by hand, never recompiles. A float ``lr`` is a Python
  constant to dynamo: each new value recompiles (as for ``torch.optim.AdamW``).
* The first step creates the state; the second compiles once more for the steady state (dynamo
  guards on the state dict). After that nothing recompiles.

The compiled runs are compared with eager runs to fp32 rounding (AOTAutograd and Inductor
reorder and fuse fp32 arithmetic); calls of an opaque backend through the custom ops match eager
bit for bit.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters
from torch._inductor.compile_fx import compile_fx

from fisherforget import FisherAdamW, backends, ops
from fisherforget.backends import reference

FEATURES = dict(
    weight_decay=0.05, amsgrad=True, fisher="mean", fisher_scale=3.0, freeze_above=2.0,
)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _model() -> torch.nn.Module:
    torch.manual_seed(7)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3, bias=False)
    )


def _optimizer(model: torch.nn.Module, **kwargs) -> FisherAdamW:
    opt = FisherAdamW(model.parameters(), lr=torch.tensor(1e-2), backend="reference", **kwargs)
    weight = model[0].weight
    mask = torch.rand(weight.shape, generator=torch.Generator().manual_seed(3)) > 0.3
    opt.set_mask(weight, mask)
    return opt


def _state_tensors(opt: FisherAdamW) -> list[torch.Tensor]:
    return [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]


def _graph_count() -> int:
    return counters["stats"]["unique_graphs"]


def test_step_is_one_graph_and_lr_changes_do_not_recompile():
    """``opt.step`` compiles with ``fullgraph=True`` (no graph break anywhere in the optimizer);
    6 steps with a new tensor lr each compile twice (state creation, steady state) and match
    eager to fp32 rounding (AOTAutograd's functionalized graph rounds some ops differently in
    the last bit).

    (An LR scheduler wraps ``opt.step`` in a function dynamo skips, so ``fullgraph=True`` on
    ``opt.step`` itself fails once a scheduler exists; without fullgraph the step still compiles
    as its own frame, see the Inductor test below.)"""
    models = [_model(), _model()]
    opts = [_optimizer(m, **FEATURES) for m in models]
    compiled_step = torch.compile(opts[1].step, fullgraph=True, backend="aot_eager")
    grads = [[torch.randn_like(p) for p in models[0].parameters()] for _ in range(6)]
    for i, step_grads in enumerate(grads):
        for model in models:
            for p, g in zip(model.parameters(), step_grads):
                p.grad = g.clone()
        opts[0].step()
        compiled_step()
        for opt in opts:
            opt.param_groups[0]["lr"].fill_(1e-2 / (2 + i))
        if i == 1:
            graphs_after_warmup = _graph_count()
    assert graphs_after_warmup == 2
    assert _graph_count() == graphs_after_warmup, "a new lr recompiled the step"
    assert float(opts[1].param_groups[0]["lr"]) == pytest.approx(1e-2 / 7)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-8)
    for a, b in zip(_state_tensors(opts[0]), _state_tensors(opts[1])):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-9)


def test_compiled_training_step_inductor_matches_eager():
    """A whole training step (forward, backward, ``step``, ``zero_grad``) under the default
    Inductor backend, with a cosine LR schedule changing the tensor lr every step: no
    recompilation after the first compiled step, parameters and Fisher equal to eager training
    to fp32 rounding."""
    x, y = torch.randn(16, 6), torch.randn(16, 3)

    def make():
        model = _model()
        return model, _optimizer(model, **FEATURES)

    def train_step(model, opt, x, y):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    eager_model, eager_opt = make()
    model, opt = make()
    # One eager step creates the state, so Inductor compiles the steady state only once.
    for m, o in ((eager_model, eager_opt), (model, opt)):
        train_step(m, o, x, y)
    graphs_seen: list = []

    def inductor_recording(gm, example_inputs):
        graphs_seen.append(gm)
        return compile_fx(gm, example_inputs)

    compiled = torch.compile(train_step, backend=inductor_recording)
    scheds = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=4) for o in (eager_opt, opt)]
    for i in range(4):
        train_step(eager_model, eager_opt, x, y)
        compiled(model, opt, x, y)
        for sched in scheds:
            sched.step()
        if i == 0:
            graphs = _graph_count()
            frames = counters["frames"]["total"]
    assert _graph_count() == graphs and counters["frames"]["total"] == frames
    # The optimizer step itself was compiled (its first-moment lerp is in a graph), not run
    # eagerly behind a graph break.
    assert any("lerp" in str(n.target) for gm in graphs_seen for n in gm.graph.nodes)
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.0, abs=1e-12)  # cosine end
    torch._dynamo.config.error_on_recompile = True  # one more lr, strictly no recompile
    try:
        for o in (eager_opt, opt):
            o.param_groups[0]["lr"].fill_(7e-3)  # by hand, as a user would
        train_step(eager_model, eager_opt, x, y)
        compiled(model, opt, x, y)
    finally:
        torch._dynamo.config.error_on_recompile = False
    for a, b in zip(eager_model.parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for a, b in zip(_state_tensors(eager_opt), _state_tensors(opt)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------- custom ops

def _op_inputs(n: int = 3, amsgrad: bool = True):
    shapes = [(5,), (3, 4), (7,)][:n]
    params = [torch.randn(s) for s in shapes]
    params[1] = torch.randn(4, 3).t()  # non-contiguous param
    grads = [torch.randn_like(p) for p in params]
    state = dict(
        exp_avgs=[torch.randn(s).abs() * 0.1 for s in shapes],
        exp_avg_sqs=[torch.rand(s) * 0.1 for s in shapes],
        max_exp_avg_sqs=[torch.rand(s) * 0.2 for s in shapes] if amsgrad else [],
        fishers=[torch.rand(s) for s in shapes],
        masks=[torch.rand(shapes[0]) > 0.3, None, torch.rand(shapes[2]) > 0.5][:n],
        steps=[torch.full((), 3.0) for _ in shapes],
        fisher_counts=[torch.full((), 3.0) for _ in shapes],
    )
    return params, grads, state


_HYPER = dict(
    beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, amsgrad=True, maximize=False,
    fisher_mode="ema", fisher_beta=0.9, fisher_scale=2.0, freeze_above=0.8, freeze_below=None,
)


def test_custom_ops_pass_opcheck():
    """Schemas, fake kernels and mutation annotations of ``torch.ops.fisherforget.*`` agree with
    the implementations (``torch.library.opcheck``: faketensor, autograd registration, aot
    dispatch)."""
    params, grads, st = _op_inputs()
    torch.library.opcheck(
        torch.ops.fisherforget.fused_step.default,
        (params, grads, st["exp_avgs"], st["exp_avg_sqs"], st["max_exp_avg_sqs"],
         st["fishers"], st["masks"], st["steps"], st["fisher_counts"]),
        dict(lr=0.0, lr_tensor=torch.tensor(1e-2), grad_scale=torch.tensor(4.0),
             found_inf=torch.tensor(0.0), backend="reference", **_HYPER),
    )
    torch.library.opcheck(
        torch.ops.fisherforget.fisher_accumulate.default,
        (st["fishers"], grads, torch.tensor(2.0)),
        dict(alpha=0.5, beta=0.5, backend="reference"),
    )
    torch.library.opcheck(
        torch.ops.fisherforget.fisher_score.default,
        (st["exp_avgs"], grads, st["fishers"]), dict(backend="reference"),
    )


@pytest.fixture
def wrapped_backend():
    """A backend the tracer must not enter: the reference implementations registered under
    another name, so ``ops`` calls them through the custom ops inside ``torch.compile`` (as it
    does for Triton and CUDA)."""
    name = "compile_test_opaque"
    for op in ops.OPS:
        ops.register(op, name)(getattr(reference, op))
    yield name
    for op in ops.OPS:
        ops._IMPLS[op].pop(name)


def _recording_backend(graphs):
    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return backend


def test_kernel_backend_enters_graph_as_custom_op(wrapped_backend):
    """Inside ``torch.compile`` a non-reference backend is called as
    ``torch.ops.fisherforget.<op>`` (fullgraph, fake kernels used for tracing) and gives the
    eager result bit for bit; a tensor lr changed between calls does not recompile."""
    eager_inputs = _op_inputs()
    compiled_inputs = tuple(
        [t.clone() for t in x] if isinstance(x, list) else
        {k: [None if t is None else t.clone() for t in v] for k, v in x.items()}
        for x in eager_inputs
    )

    def run(params, grads, st, lr, backend):
        ops.fused_step(ops.StepTensors(params, grads, **st), ops.StepHyper(lr=lr, **_HYPER),
                       backend=backend, grad_scale=torch.tensor(2.0), found_inf=torch.tensor(0.0))
        ops.fisher_accumulate(st["fishers"], grads, alpha=0.5, beta=0.25, backend=backend)
        return ops.fisher_score(st["exp_avgs"], grads, st["fishers"], backend=backend)

    graphs: list = []
    compiled = torch.compile(run, fullgraph=True, backend=_recording_backend(graphs))
    for lr in (1e-2, 3e-3):
        expected = run(*eager_inputs, torch.tensor(lr), "reference")
        got = compiled(*compiled_inputs, torch.tensor(lr), wrapped_backend)
        assert torch.equal(got, expected)
    assert len(graphs) == 1
    targets = {str(node.target) for node in graphs[0].graph.nodes}
    for op in ops.OPS:
        assert f"fisherforget.{op}" in targets, targets
    for a, b in zip(eager_inputs[0], compiled_inputs[0]):
        assert torch.equal(a, b)
    for key, values in eager_inputs[2].items():
        for a, b in zip(values, compiled_inputs[2][key]):
            assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.skipif(
    not backends.is_available("triton"),
    reason=f"Triton backend unavailable: {backends.unavailable_reason('triton')}",
)
def test_compiled_step_with_triton_backend():
    """The optimizer step compiles with the Triton backend (through the custom op) and matches
    the eager Triton step."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    models = [_model().to(device), _model().to(device)]
    opts = [FisherAdamW(m.parameters(), lr=torch.tensor(1e-2, device=device),
                        backend="triton", **FEATURES) for m in models]
    compiled_step = torch.compile(opts[1].step, fullgraph=True, backend="aot_eager")
    for _ in range(3):
        grads = [torch.randn_like(p) for p in models[0].parameters()]
        for model in models:
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
        opts[0].step()
        compiled_step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)


@pytest.mark.cuda
def test_compiled_training_step_on_gpu_auto_backend():
    """On a GPU the auto backend (CUDA extension or Triton) runs inside a compiled training
    step through the custom ops, matching eager to rounding, with no recompile on new lrs."""
    x, y = torch.randn(16, 6, device="cuda"), torch.randn(16, 3, device="cuda")
    pairs = []
    for _ in range(2):
        model = _model().cuda()
        pairs.append((model, FisherAdamW(model.parameters(), lr=torch.tensor(1e-2, device="cuda"),
                                         **FEATURES)))

    def train_step(model, opt, x, y):
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for m, o in pairs:
        train_step(m, o, x, y)
    compiled = torch.compile(train_step)
    for i, lr in enumerate((3e-2, 1e-2, 5e-3)):
        for m, o in pairs:
            o.param_groups[0]["lr"].fill_(lr)
        train_step(*pairs[0], x, y)
        compiled(*pairs[1], x, y)
        if i == 0:
            graphs = _graph_count()
    assert _graph_count() == graphs
    for a, b in zip(pairs[0][0].parameters(), pairs[1][0].parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
