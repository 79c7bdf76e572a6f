"""Per-sample sums over parameters from one backward pass, layer by layer.

Every LWF scorer is made of per-sample sums over the scored parameters of the gradient ``g_x`` of a
sample's token-averaged NLL: linear terms ``<v, g_x>`` and quadratic terms
``sum_i w[i] * g_x[i]^2``. None of them needs the per-sample gradients of the whole model at once.

:func:`per_sample_terms` runs one forward pass of the batch with hooks on the modules that hold
scored parameters, then one backward pass of ``sum_x l_x`` to those modules' *outputs* (no weight
gradient is formed and no ``.grad`` is touched). Rows of a causal LM batch do not interact, so the
output gradient of row ``x`` is exactly that of ``l_x``, and each parameter's per-sample gradient
follows from its module's inputs and output gradients:

* ``nn.Linear`` (also peft LoRA's ``lora_A`` / ``lora_B``): ``G_x = dy_x^T x_x``, bias
  ``sum_t dy_x,t``; GPT-2's ``Conv1D`` (``y = x W + b``): ``G_x = x_x^T dy_x``;
* ``nn.Embedding``: the rows of the sample's token ids, ``dy`` summed over repeated ids (rows at
  ``padding_idx`` get none), never a dense ``(V, d)`` per sample;
* any other module (norms): a module-local vector-Jacobian product ``vmap``-ed over the rows.

A parameter used by several modules (tied weights: SmolLM2's ``lm_head`` is its embedding) gets
the *sum* of its uses' per-sample gradients before anything is squared. Per-sample gradients are
formed for a chunk of samples at a time and reduced at once: at most one parameter's chunk is
alive. A parameter used outside its modules' forward (``F.linear(h, self.wte.weight)`` in a
parent) is detected from the autograd graph and refused rather than scored wrong.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from fisherforget.fisher import _check_batch, labels_of, logits_of, model_inputs, sequence_nll

__all__ = ["per_sample_terms", "Lazy"]

# Per-sample gradient elements formed at once (a block of rows of one parameter for every sample,
# squared in place): 2^20 fp32 elements = 4 MiB, about what stays in the last-level cache.
MAX_ELEMENTS = 1 << 20


class Lazy(Sequence):
    """A per-parameter sequence whose item ``j`` is ``make(j)``, made when read: a vector like
    ``F_L * (theta*_L - theta_0)`` then costs one parameter's worth of memory at a time, not a
    copy of the model."""

    def __init__(self, make, length: int):
        self.make, self.length = make, length

    def __getitem__(self, j):
        if isinstance(j, slice):
            return [self.make(i) for i in range(self.length)[j]]
        if not -self.length <= j < self.length:
            raise IndexError(j)
        return self.make(j % self.length)

    def __len__(self) -> int:
        return self.length


@dataclass
class _Use:
    """One call of a module that holds a scored parameter, and what its gradient needs."""

    module: nn.Module
    kind: str  # "linear", "conv1d", "embedding" or "generic"
    inputs: tuple  # detached positional inputs (generic: all, others: the first)
    kwargs: dict
    output: Tensor
    names: dict[int, str] = field(default_factory=dict)  # param index -> attribute name
    grad_output: Optional[Tensor] = None


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers' GPT-2 layer
        return "conv1d"
    return "generic"


def per_sample_terms(
    model: nn.Module,
    batch: Mapping[str, Tensor],
    params: Mapping[str, Tensor],
    *,
    linear: Sequence[Sequence[Tensor]] = (),
    quadratic: Sequence[Optional[Sequence[Tensor]]] = (),
    max_elements: int = MAX_ELEMENTS,
) -> Tensor:
    """``(B, len(linear) + len(quadratic))`` float64 on the model's device: column ``k`` is
    ``<linear[k], g_x>``, then ``sum_i quadratic[q][i] * g_x[i]^2`` (``None``: ones, i.e.
    ``||g_x||^2``), for each row ``x`` of ``batch``.

    ``g_x`` is the gradient of row ``x``'s token-averaged NLL
    (:func:`fisherforget.fisher.sequence_nll`) with respect to ``params`` (``{name: parameter}``
    as :func:`~fisherforget.fisher.resolve_params` returns them); ``linear[k]`` and ``quadratic[q]`` are lists aligned with ``params``, shaped
    like the params. Products are formed in fp32 (fp64 for fp64 params) and summed over params in
    float64. ``max_elements`` bounds the per-sample gradient elements formed at once. Left or right
    padding, autocast, train or eval mode: the model runs as it is.
    """
    _check_batch(batch)
    tensors = list(params.values())
    if not tensors:
        raise ValueError("per_sample_terms: params is empty")
    linear = [_aligned_list(v, tensors, f"linear[{k}]") for k, v in enumerate(linear)]
    quadratic = [None if w is None else _aligned_list(w, tensors, f"quadratic[{q}]")
                 for q, w in enumerate(quadratic)]
    if not linear and not quadratic:
        raise ValueError("per_sample_terms: no linear or quadratic term asked for")
    if not isinstance(max_elements, int) or max_elements < 1:
        raise ValueError(f"Invalid max_elements: {max_elements!r} (must be an int >= 1)")
    index = {id(p): j for j, p in enumerate(tensors)}
    for name, p in params.items():
        if not p.requires_grad:
            raise ValueError(f"params: {name!r} does not require grad")

    batch_size = batch["input_ids"].shape[0]
    uses: list[_Use] = []
    handles = []

    def record(module, args, kwargs, output):
        if not isinstance(output, Tensor):
            raise TypeError(f"per_sample_terms: {type(module).__name__} holds scored parameters "
                            f"but returns {type(output).__name__}, not a tensor; use "
                            "method='loop'")
        if not output.requires_grad:
            if not torch.is_grad_enabled():
                raise ValueError(
                    f"per_sample_terms: a {type(module).__name__} holding scored parameters ran "
                    "without autograd (under torch.no_grad, or inside reentrant gradient "
                    "checkpointing, which recomputes it during backward): its share of the "
                    "gradient cannot be read from its output; use gradient checkpointing with "
                    "use_reentrant=False, or method='loop'")
            return None  # its scored parameters did not enter this call: no gradient from it
        kind = _kind(module)
        names = {index[id(p)]: n for n, p in module.named_parameters(recurse=False)
                 if id(p) in index}
        inputs = tuple(a.detach() if isinstance(a, Tensor) else a for a in args)
        if kind != "generic":
            inputs = inputs[:1]
        broadcast = batch_size > 1 and output.dim() >= 1 and output.shape[0] == 1
        if broadcast:
            # Shared by every row (GPT-2's position embeddings get positions shaped (1, T)):
            # hand the rows an expanded view, so that each row's output gradient stays its own.
            output = output.expand(batch_size, *output.shape[1:])
            inputs = tuple(a.expand(batch_size, *a.shape[1:])
                           if isinstance(a, Tensor) and a.dim() >= 1 and a.shape[0] == 1 else a
                           for a in inputs)
        for a in inputs:
            if isinstance(a, Tensor) and a.dim() >= 1 and a.shape[0] != batch_size:
                raise ValueError(
                    f"per_sample_terms: {type(module).__name__} received an input of shape "
                    f"{tuple(a.shape)} whose first dimension is not the batch ({batch_size}); "
                    "per-sample terms need the batch dimension first (use method='loop')")
        uses.append(_Use(module, kind, inputs,
                         {k: v.detach() if isinstance(v, Tensor) else v
                          for k, v in kwargs.items()}, output, names))
        return output if broadcast else None

    for module in model.modules():
        if any(id(p) in index for p in module.parameters(recurse=False)):
            handles.append(module.register_forward_hook(record, with_kwargs=True))
    try:
        logits = logits_of(model(**model_inputs(batch)))
    finally:
        for handle in handles:
            handle.remove()
    loss = sequence_nll(logits, labels_of(batch), "mean").sum()
    _check_coverage(loss, tensors, uses, list(params))
    outputs = [u.output for u in uses]
    # No hooked call (no scored param enters the forward): every term is 0.
    grads = torch.autograd.grad(loss, outputs, allow_unused=True) if outputs else []
    del loss, logits
    for use, g in zip(uses, grads):
        use.grad_output = g
        use.output = None  # the graph is gone; keep only what the reduction reads
    del grads, outputs

    by_param: dict[int, list[_Use]] = defaultdict(list)
    for use in uses:
        for j in use.names:
            by_param[j].append(use)
    device = tensors[0].device
    total = torch.zeros(batch_size, len(linear) + len(quadratic), dtype=torch.float64,
                        device=device)
    for j, p in enumerate(tensors):
        param_uses = [u for u in by_param.get(j, []) if u.grad_output is not None]
        if param_uses:
            _reduce_param(total, j, p, param_uses, linear, quadratic, batch_size, max_elements)
    return total


def _aligned_list(values: Sequence[Tensor], tensors: Sequence[Tensor],
                  what: str) -> Sequence[Tensor]:
    if isinstance(values, Lazy):  # made (and checked) one param at a time
        if len(values) != len(tensors):
            raise ValueError(f"{what} has {len(values)} tensors for {len(tensors)} params")
        return values
    values = list(values)
    if len(values) != len(tensors):
        raise ValueError(f"{what} has {len(values)} tensors for {len(tensors)} params")
    for i, (v, p) in enumerate(zip(values, tensors)):
        if not isinstance(v, Tensor) or v.shape != p.shape:
            raise ValueError(f"{what}[{i}] must be a tensor shaped like its param "
                             f"{tuple(p.shape)}, got "
                             f"{tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__}")
    return values


def _check_coverage(loss: Tensor, tensors: Sequence[Tensor], uses: Sequence[_Use],
                    names: Sequence[str]) -> None:
    """Each scored param consumed by the linear/embedding/Conv1D modules only must enter the
    autograd graph exactly once per recorded call; an extra edge is a use outside them, whose
    share of the gradient the hooks would miss."""
    recorded: dict[int, int] = defaultdict(int)
    generic: set[int] = set()
    for use in uses:
        for j in use.names:
            recorded[j] += 1
            if use.kind == "generic":
                generic.add(j)
    wanted = {id(p): j for j, p in enumerate(tensors)}
    edges: dict[int, int] = defaultdict(int)
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for child, _ in node.next_functions:
            if child is None:
                continue
            variable = getattr(child, "variable", None)
            if variable is not None and id(variable) in wanted:
                edges[wanted[id(variable)]] += 1
            elif child not in seen:
                stack.append(child)
    for j, count in edges.items():
        if j not in generic and count != recorded.get(j, 0):
            raise ValueError(
                f"per_sample_terms: parameter {names[j]!r} is used {count} time(s) in the forward "
                f"pass but its modules were called {recorded.get(j, 0)} time(s): it is also used "
                "outside them (e.g. F.linear(h, weight) in a parent module); use method='loop'")


def _flat(x: Tensor) -> Tensor:
    """``(rows, tokens, features)`` in fp32 (fp64 stays fp64)."""
    x = x.reshape(x.shape[0], -1, x.shape[-1]) if x.dim() > 1 else x.reshape(-1, 1, 1)
    return x if x.dtype == torch.float64 else x.float()


def _sparse_rows(use: _Use) -> tuple[Tensor, Tensor, Tensor]:
    """An embedding call's per-sample gradient as ``(sample, row, values)``: one entry per
    distinct (sample, token id), ``dy`` summed over the sample's repeats of the id;
    ``padding_idx`` gets none."""
    module = use.module
    ids = use.inputs[0]
    dy = _flat(use.grad_output)
    vocab = module.num_embeddings
    sample = torch.arange(ids.shape[0], device=ids.device).unsqueeze(1).expand_as(ids)
    keep = torch.ones_like(ids, dtype=torch.bool)
    if module.padding_idx is not None:
        keep = ids != module.padding_idx
    keys = (sample * vocab + ids)[keep]
    unique, inverse = torch.unique(keys, return_inverse=True)
    values = torch.zeros(unique.numel(), dy.shape[-1], dtype=dy.dtype, device=dy.device)
    values.index_add_(0, inverse, dy.reshape(-1, dy.shape[-1])[keep.reshape(-1)])
    return unique // vocab, unique % vocab, values


def _generic_grads(use: _Use, name: str) -> Tensor:
    """Per-sample gradients ``(B, *shape)`` of one parameter of any module whose rows are
    independent: the module's own forward, one row at a time under ``vmap``, pulled back by
    ``vjp``."""
    from torch.func import functional_call, vjp, vmap

    module = use.module
    own = {n: p.detach() for n, p in module.named_parameters(recurse=False)}
    rows_total = use.grad_output.shape[0]

    def per_row(value: Any) -> bool:  # a tensor with one entry per row of the batch
        return isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == rows_total

    args = list(use.inputs)
    keys = list(use.kwargs)
    values = args + [use.kwargs[k] for k in keys]
    batched = [per_row(v) for v in values]
    tensor_args = [v for v, b in zip(values, batched) if b]

    def one_row(dy_row: Tensor, *rows: Tensor) -> Tensor:
        row_iter = iter(rows)
        call = [next(row_iter).unsqueeze(0) if b else v for v, b in zip(values, batched)]
        call_args, call_kwargs = call[:len(args)], dict(zip(keys, call[len(args):]))

        def forward(weight: Tensor) -> Tensor:
            return functional_call(module, {**own, name: weight}, tuple(call_args), call_kwargs)

        output, pullback = vjp(forward, own[name])
        return pullback(dy_row.unsqueeze(0).to(output.dtype))[0]

    grads = vmap(one_row)(use.grad_output, *tensor_args)
    return grads if grads.dtype == torch.float64 else grads.float()


def _dense_grads(use: _Use, name: str) -> Tensor:
    """The whole per-sample gradient ``(B, *shape)`` of parameter ``name`` from one call of its
    (non-embedding) module: for small or opaque params (the row blocks of
    :func:`_reduce_param` serve large weights)."""
    if use.kind == "generic":
        return _generic_grads(use, name)
    dy = _flat(use.grad_output)
    if name == "bias":
        return dy.sum(dim=1)
    x = _flat(use.inputs[0])
    if use.kind == "linear":  # weight (out, in): G = dy^T x
        return torch.bmm(dy.transpose(1, 2), x)
    return torch.bmm(x.transpose(1, 2), dy)  # Conv1D weight (in, out): G = x^T dy


def _linear_terms(use: _Use, name: str, vectors: Sequence[Tensor], dtype: torch.dtype,
                  rows: Optional[tuple[Tensor, Tensor, Tensor]] = None) -> Tensor:
    """``(B, k)`` float64: ``<v, g_x>`` of this call's share of the gradient, without forming it:
    ``<V, dy^T x> = sum_t dy_t . (V x_t)``, one matrix product over the whole batch; products in
    the param's precision, sums over tokens and features in float64 (these sums cancel). An
    embedding call's :func:`_sparse_rows` may be given as ``rows``."""
    dy = _flat(use.grad_output).to(dtype)
    if use.kind == "embedding":
        sample, row, values = rows if rows is not None else _sparse_rows(use)
        values = values.to(dtype)
        out = torch.zeros(dy.shape[0], len(vectors), dtype=torch.float64, device=dy.device)
        columns = [(values * v.view(-1, values.shape[1])[row]).double().sum(dim=1)
                   for v in vectors]
        return out.index_add_(0, sample, torch.stack(columns, dim=1))
    if name == "bias":  # <v, sum_t dy_t>
        return torch.stack([(dy * v.view(1, 1, -1)).double().sum(dim=(1, 2)) for v in vectors],
                           dim=1)
    x = _flat(use.inputs[0]).to(dtype)
    columns = []
    for v in vectors:
        # Linear: y = x W^T, so <V, G> = sum dy * (x V^T); Conv1D: y = x W, <V, G> = sum dy * (x V).
        mapped = x @ (v.T if use.kind == "linear" else v)
        columns.append((mapped * dy).double().sum(dim=(1, 2)))
    return torch.stack(columns, dim=1)


def _checked(value: Tensor, p: Tensor, what: str) -> Tensor:
    if not isinstance(value, Tensor) or value.shape != p.shape:
        raise ValueError(f"a {what} vector is not a tensor shaped like its param {tuple(p.shape)}")
    return value


def _reduce_param(total: Tensor, j: int, p: Tensor, uses: Sequence[_Use],
                  linear: Sequence[Sequence[Tensor]],
                  quadratic: Sequence[Optional[Sequence[Tensor]]], batch_size: int,
                  max_elements: int) -> None:
    """Add parameter ``j``'s columns to ``total`` (linear terms first, then quadratic)."""
    dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
    vectors = [_checked(v[j], p, "linear").to(device=p.device, dtype=dtype) for v in linear]
    weights = [None if w is None else _checked(w[j], p, "quadratic").to(device=p.device,
                                                                        dtype=dtype)
               for w in quadratic]
    k = len(vectors)
    if any(u.kind == "generic" for u in uses) or p.dim() <= 1:
        # Small or opaque: the whole per-sample gradient, every use summed.
        grad = None
        for use in uses:
            if use.kind == "embedding":
                part = torch.zeros(batch_size, *p.shape, dtype=dtype, device=p.device)
                sample, row, values = _sparse_rows(use)
                part.index_put_((sample, row), values.to(dtype), accumulate=True)
            else:
                part = _dense_grads(use, use.names[j]).to(dtype)
            grad = part if grad is None else grad + part
        flat = grad.reshape(batch_size, -1)
        columns = [(flat * v.reshape(1, -1)).double().sum(dim=1) for v in vectors]
        square = flat * flat
        columns += [square.sum(dim=1).double() if w is None else (square @ w.reshape(-1)).double()
                    for w in weights]
        total += torch.stack(columns, dim=1)
        return
    dense = [u for u in uses if u.kind != "embedding"]
    # Each embedding call's rows, made once for the linear and the quadratic terms.
    rows_of = {id(u): _sparse_rows(u) for u in uses if u.kind == "embedding"}
    if not weights or not dense:
        # Linear terms are additive over uses: each from its inputs and output gradients,
        # without forming the per-sample gradient.
        for use in uses if vectors else []:
            total[:, :k] += _linear_terms(use, use.names[j], vectors, dtype, rows_of.get(id(use)))
        if not weights:
            return
    sparse = list(rows_of.values())
    if not dense and len(sparse) == 1:
        # An embedding alone: the rows the samples touch, never a dense (V, d) block.
        sample, row, values = sparse[0]
        values = values.to(dtype)
        width = values.shape[1]
        square = values * values
        columns = [square.sum(dim=1) if w is None else (square * w.view(-1, width)[row]).sum(1)
                   for w in weights]
        total[:, k:].index_add_(0, sample, torch.stack(columns, dim=1).double())
        return
    # Quadratic terms need the per-sample gradient itself (the sum of every use, tied weights
    # included): formed a block of rows at a time, small enough to stay in cache, and reduced
    # at once.
    if sparse:
        sample = torch.cat([e[0] for e in sparse])
        row = torch.cat([e[1] for e in sparse])
        values = torch.cat([e[2] for e in sparse]).to(dtype)
        order = torch.argsort(row, stable=True)
        sample, row, values = sample[order], row[order], values[order]
    rows = p.shape[0]
    row_size = p.numel() // rows
    step = max(1, min(rows, max_elements // (batch_size * row_size)))
    flat_weights = [None if w is None else w.reshape(rows, -1) for w in weights]
    # Without a dense use the linear terms were added above, from each use's rows.
    flat_vectors = [v.reshape(rows, -1) for v in vectors] if dense else []
    acc = torch.zeros(batch_size, k + len(weights), dtype=torch.float64, device=p.device)
    # One buffer for every block (no allocation per block); the row-major operands of each
    # use's product made once: G[rows] = dy^T[rows] x (Linear) or x^T[rows] dy (Conv1D).
    workspace = torch.empty(batch_size * step * row_size, dtype=dtype, device=p.device)
    operands = []
    for use in dense:
        dy, x = _flat(use.grad_output).to(dtype), _flat(use.inputs[0]).to(dtype)
        operands.append((dy.transpose(1, 2).contiguous(), x) if use.kind == "linear"
                        else (x.transpose(1, 2).contiguous(), dy))
    for lo in range(0, rows, step):
        hi = min(rows, lo + step)
        block = workspace[:batch_size * (hi - lo) * row_size].view(batch_size, hi - lo, row_size)
        if not operands:
            block.zero_()
        for i, (left, right) in enumerate(operands):
            if i == 0:
                torch.bmm(left[:, lo:hi], right, out=block)
            else:
                block.baddbmm_(left[:, lo:hi], right)
        if sparse:
            first, last = torch.searchsorted(row, torch.tensor([lo, hi], device=row.device))
            if last > first:
                block.index_put_((sample[first:last], row[first:last] - lo),
                                 values[first:last], accumulate=True)
        flat = block.reshape(batch_size, -1)
        for i, v in enumerate(flat_vectors):
            # A block's dot product in fp32 (a cache-sized sum), the blocks summed in float64.
            acc[:, i] += (flat @ v[lo:hi].reshape(-1)).double()
        square = flat.square_()
        for q, w in enumerate(flat_weights):
            # Squares are non-negative: an fp32 sum loses nothing to cancellation.
            acc[:, k + q] += (square.sum(dim=1) if w is None
                              else square @ w[lo:hi].reshape(-1)).double()
    total += acc
