"""Scale-out helpers: DTensor (FSDP2) parameters, cross-rank reductions, gathering scores.

How ``FisherAdamW`` runs on PyTorch's distributed engines:

* **DDP** (and any data-parallel scheme that all-reduces gradients before ``step``): every rank
  holds full, identical parameters and gradients, so every rank computes the same step and the same
  Fisher. Nothing here is needed; plain tensors are treated as *replicated*.
* **FSDP2** (``torch.distributed.fsdp.fully_shard``) and other DTensor parameters: every rule of
  The step (``docs/design.md``) is elementwise, so the optimizer runs the ops on each rank's *local shard*
  (:func:`local`). Its state tensors (moments, Fisher, masks) are DTensors laid out like their
  parameter (:func:`zeros_like_param`, :func:`to_param_layout`), which is what
  ``torch.distributed.checkpoint`` needs to save and load them sharded; the 0-dim ``step`` and
  ``fisher_count`` stay plain tensors, identical on every rank, as in ``torch.optim``.
* Whole-model statistics (``fisher_mean``, ``fisher_quantile``) count every element exactly once
  over all ranks (:class:`GlobalCounter`): a local shard contributes on the ranks that own it, with
  replicas along ``Replicate`` mesh dimensions counted only at mesh coordinate 0, and partial results
  are all-reduced over every mesh dimension. Every rank gets the same, global value.
* Per-sample scores computed on disjoint slices of a data set are assembled on every rank by
  :func:`gather_scores`; each score is computed by exactly one rank, so every rank holds the same
  bits and a deterministic selection picks the same samples everywhere (DDP: the model, the
  learning-task direction and Fisher are replicated, so each rank scores its own samples).
* Under FSDP2 a per-sample gradient is itself sharded: every rank runs the same sample and
  :func:`fisher_score_global` sums the two forgetting-confidence terms over the local shards and
  all-reduces them, so every rank gets the global terms.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "is_dtensor",
    "local",
    "zeros_like_param",
    "check_grad_layout",
    "same_layout",
    "to_param_layout",
    "GlobalCounter",
    "prepare_optimizer_state_for_load",
    "shard_range",
    "gather_scores",
    "fisher_score_global",
]


def is_dtensor(t: object) -> bool:
    # No DTensor can exist before its module is imported; looking it up instead of importing it
    # keeps ``import fisherforget`` free of torch.distributed.tensor's import cost (seconds).
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def local(t: Tensor) -> Tensor:
    """The tensor the kernels see: a DTensor's local shard (sharing its storage), else ``t``."""
    if is_dtensor(t):
        with torch.no_grad():  # the shard itself, not an autograd view of it
            return t.to_local()
    return t


def zeros_like_param(p: Tensor, dtype: torch.dtype) -> Tensor:
    """Contiguous zeros shaped like ``p``; a DTensor with ``p``'s mesh and placements when ``p``
    is one (so the state shards like its parameter)."""
    if is_dtensor(p):
        return torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
    return torch.zeros(p.shape, dtype=dtype, device=p.device)


def same_layout(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` are both plain or both DTensors on one mesh with one placement."""
    if is_dtensor(a) != is_dtensor(b):
        return False
    if is_dtensor(a):
        return a.device_mesh == b.device_mesh and tuple(a.placements) == tuple(b.placements)
    return True


def check_grad_layout(p: Tensor, grad: Tensor, where: str) -> None:
    """Raise unless ``grad`` is distributed exactly like ``p`` (the elementwise step then maps
    local shard to local shard)."""
    if not (is_dtensor(p) or is_dtensor(grad)):
        return
    if not same_layout(p, grad):
        raise RuntimeError(
            f"the gradient of {where} is {_describe(grad)} but the param is {_describe(p)}; "
            "FisherAdamW steps each local shard, so both must be laid out alike (reduce or "
            "redistribute the gradient first)"
        )


def _describe(t: Tensor) -> str:
    if is_dtensor(t):
        return f"a DTensor with placements {tuple(t.placements)} on {t.device_mesh}"
    return "a plain tensor"


def to_param_layout(p: Tensor, value: Tensor, what: str) -> Tensor:
    """A copy of ``value`` (shaped like ``p``) laid out like ``p``: on ``p``'s device, and for a
    DTensor ``p`` a DTensor with ``p``'s mesh and placements.

    A plain ``value`` for a DTensor ``p`` is the full tensor; every rank cuts out its own shard
    (no communication, so every rank must pass the same full tensor). A DTensor ``value`` on
    another placement is redistributed.
    """
    if not is_dtensor(p):
        if is_dtensor(value):
            raise ValueError(f"{what} is a DTensor but the param is a plain tensor")
        return value.to(device=p.device, copy=True).contiguous()
    if is_dtensor(value):
        if value.device_mesh != p.device_mesh:
            raise ValueError(
                f"{what} lives on {value.device_mesh}, the param on {p.device_mesh}"
            )
        if tuple(value.placements) != tuple(p.placements):
            value = value.redistribute(p.device_mesh, p.placements)
        result = value.to(device=p.device, copy=True)
    else:
        from torch.distributed.tensor import distribute_tensor

        full = value.to(device=p.device).contiguous()
        result = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
    if not result.to_local().is_contiguous():
        result = result.contiguous()
    return result


class GlobalCounter:
    """Totals of per-element statistics over a list of tensors, every element counted once over
    all ranks.

    Plain tensors are counted as they are (single process, or replicated on every rank as under
    DDP). A DTensor contributes its local shard on the ranks that own it: along a ``Shard`` mesh
    dimension every rank owns its own piece, along a ``Replicate`` one only coordinate 0 does. The
    owned partial totals are all-reduced over every dimension of each mesh, so every rank of the
    mesh gets the global total (one all-reduce per mesh dimension per call).

    Every rank must build it from the same list of parameters (as every rank of an FSDP2 job
    does); otherwise the collectives do not match. ``prepare`` maps each local piece once (e.g.
    to a flat fp32 view) before any statistic is taken.
    """

    def __init__(
        self, tensors: Sequence[Tensor], prepare: Optional[Callable[[Tensor], Tensor]] = None
    ):
        prepare = prepare or (lambda t: t)
        self.plain: list[Tensor] = []
        # mesh -> (device of its local shards, owned local shards); insertion order is the
        # param order, identical on every rank, so the collectives line up.
        self.meshes: dict[object, tuple[torch.device, list[Tensor]]] = {}
        self.numel = 0
        for t in tensors:
            self.numel += t.numel()  # a DTensor's numel is the global one
            if not is_dtensor(t):
                self.plain.append(prepare(t))
                continue
            from torch.distributed.tensor import Partial

            if any(isinstance(pl, Partial) for pl in t.placements):
                raise ValueError("a Partial DTensor has no element values until it is reduced")
            shard = local(t)
            _, owned = self.meshes.setdefault(t.device_mesh, (shard.device, []))
            if _owns(t):
                owned.append(prepare(shard))

    @property
    def devices(self) -> list[torch.device]:
        return [t.device for t in self.plain] + [d for d, _ in self.meshes.values()]

    def total(
        self, stat: Callable[[Tensor], Tensor], dtype: torch.dtype, device: torch.device
    ) -> Tensor:
        """``sum over every element-owning piece t of stat(t)`` as a 0-dim ``dtype`` tensor on
        ``device``; ``stat`` returns a 0-dim tensor (e.g. a sum or a count)."""
        result = torch.zeros((), dtype=dtype, device=device)
        for t in self.plain:
            result = result + stat(t).to(device=device, dtype=dtype)
        for mesh, (mesh_device, owned) in self.meshes.items():
            part = torch.zeros((), dtype=dtype, device=mesh_device)
            for t in owned:
                part = part + stat(t).to(dtype)
            if mesh.get_coordinate() is not None:  # ranks outside the mesh hold nothing
                for dim in range(mesh.ndim):
                    dist.all_reduce(part, op=dist.ReduceOp.SUM, group=mesh.get_group(dim))
            result = result + part.to(device)
        return result


def _owns(t: Tensor) -> bool:
    """Whether this rank's local shard of ``t`` counts (coordinate 0 of every non-Shard dim)."""
    from torch.distributed.tensor import Shard

    mesh = t.device_mesh
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        return False
    return all(
        isinstance(placement, Shard) or coordinate[dim] == 0
        for dim, placement in enumerate(t.placements)
    )


# ------------------------------------------------------------------------ checkpoints


def prepare_optimizer_state_for_load(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    source: Union[str, "os.PathLike[str]", Any],
    prefix: str = "optim",
) -> list[tuple[str, str]]:
    """Give ``optimizer`` every state entry that ``source`` holds, as zeros, so that loading
    fills them in instead of dropping them.

    ``torch.distributed.checkpoint`` loads *in place into the state dict it is given* and
    silently skips checkpoint entries that state dict lacks; ``set_optimizer_state_dict`` with a
    full state dict fails on them. A fresh optimizer (or one that ``get_state_dict`` initialised
    with its zero-gradient step) has no ``mask`` entries and no ``unlearn_*`` moments, so without
    this call those would be lost. Call it first on the loading side::

        prepare_optimizer_state_for_load(model, opt, checkpoint_dir)
        model_sd, optim_sd = get_state_dict(model, opt)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=checkpoint_dir)
        set_state_dict(model, opt, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])

    ``source`` is a checkpoint directory or its ``Metadata`` (``prefix``: the key the optimizer
    state dict was saved under), or an optimizer state dict keyed by parameter name (as
    ``get_optimizer_state_dict`` returns, full or sharded). Shaped entries are created laid out
    like their param (sharded for DTensors), 0-dim ones as plain tensors, with the saved dtype.
    Returns the ``(param name, state key)`` pairs added.
    """
    entries = _saved_state_entries(source, prefix)
    managed = {id(p) for group in optimizer.param_groups for p in group["params"]}
    added = []
    for name, p in model.named_parameters():
        if id(p) not in managed:
            continue
        for key, (dtype, shape) in entries.get(_checkpoint_fqn(model, name), {}).items():
            if key in optimizer.state[p]:
                continue
            if len(shape) == 0:
                value = torch.zeros((), dtype=dtype, device=local(p).device)
            else:
                if tuple(shape) != tuple(p.shape):
                    raise ValueError(
                        f"saved state {key!r} of {name!r} has shape {tuple(shape)}, the param "
                        f"{tuple(p.shape)}: a different parameter layout"
                    )
                value = zeros_like_param(p, dtype)
            optimizer.state[p][key] = value
            added.append((name, key))
    return added


def _saved_state_entries(source: Any, prefix: str) -> dict[str, dict[str, tuple]]:
    """``{param name: {state key: (dtype, global shape)}}`` of a checkpoint or state dict."""
    if isinstance(source, dict):
        return {
            str(name): {
                key: (value.dtype, tuple(value.shape))
                for key, value in pstate.items() if isinstance(value, Tensor)
            }
            for name, pstate in source.get("state", {}).items()
        }
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if isinstance(source, (str, os.PathLike)):
        source = FileSystemReader(os.fspath(source)).read_metadata()
    # Flattened keys read "<prefix>.state.<param name>.<state key>"; names hold dots, keys not.
    stem = f"{prefix}.state."
    entries: dict[str, dict[str, tuple]] = {}
    for flat_key, entry in source.state_dict_metadata.items():
        if not flat_key.startswith(stem) or not isinstance(entry, TensorStorageMetadata):
            continue
        name, _, key = flat_key[len(stem):].rpartition(".")
        entries.setdefault(name, {})[key] = (entry.properties.dtype, tuple(entry.size))
    return entries


def _checkpoint_fqn(model: torch.nn.Module, name: str) -> str:
    """The name ``torch.distributed.checkpoint.state_dict`` saves a parameter under (wrapper
    prefixes such as ``_orig_mod.`` of ``torch.compile`` removed)."""
    try:
        from torch.distributed.checkpoint.state_dict import _get_fqns

        fqns = _get_fqns(model, name)
        if len(fqns) == 1:
            return next(iter(fqns))
    except Exception:  # a private helper; fall back to the plain name
        pass
    return name


# ---------------------------------------------------------------------------- scores


def _world(group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def shard_range(
    n: int, rank: Optional[int] = None, world_size: Optional[int] = None,
    group: Optional[dist.ProcessGroup] = None,
) -> range:
    """The contiguous block of ``range(n)`` that ``rank`` scores: ranks get ``n // world_size``
    items each and the first ``n % world_size`` ranks one more. Defaults to this process's rank
    and world size in ``group`` (0 and 1 without an initialised process group)."""
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"Invalid n: {n!r} (must be an int >= 0)")
    this_rank, this_world = _world(group)
    rank = this_rank if rank is None else rank
    world_size = this_world if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"Invalid rank {rank} for world_size {world_size}")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def _collective_device(group: Optional[dist.ProcessGroup], device: torch.device) -> torch.device:
    backend = dist.get_backend(group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if backend == "gloo":
        return torch.device("cpu")
    return device


def gather_scores(
    local_scores: Tensor,
    indices: Optional[Tensor] = None,
    total: Optional[int] = None,
    group: Optional[dist.ProcessGroup] = None,
) -> Tensor:
    """Assemble per-sample scores computed on disjoint slices of a data set, on every rank.

    Without ``indices`` the ranks' 1-D ``local_scores`` are concatenated in rank order (the layout
    of :func:`shard_range`). With ``indices`` (1-D int64, the sample index of each local score) the
    result has ``total`` entries and ``result[indices] = local_scores`` for every rank's pieces;
    every index in ``range(total)`` must be scored by exactly one rank.

    Every rank gets the same tensor, bit for bit (each value was computed once and is copied), on
    ``local_scores``' device with its dtype. Without an initialised process group this is the
    single-process result. One all-gather of the counts and one of the (padded) values; with
    ``indices`` one more of the indices.
    """
    if not isinstance(local_scores, Tensor) or local_scores.dim() != 1:
        raise ValueError("local_scores must be a 1-D tensor")
    if indices is not None:
        if not isinstance(indices, Tensor) or indices.dim() != 1 or indices.dtype != torch.int64:
            raise ValueError("indices must be a 1-D int64 tensor")
        if indices.numel() != local_scores.numel():
            raise ValueError(
                f"indices has {indices.numel()} entries, local_scores {local_scores.numel()}"
            )
        if total is None:
            raise ValueError("total is required with indices")
    _, world_size = _world(group)
    if world_size == 1:
        pieces, index_pieces = [local_scores], [indices]
    else:
        pieces = _all_gather_ragged(local_scores, group)
        index_pieces = _all_gather_ragged(indices, group) if indices is not None else None
    if indices is None:
        return torch.cat([p.to(local_scores.device) for p in pieces])
    all_indices = torch.cat([p.to("cpu") for p in index_pieces])
    if all_indices.numel() != total or (
        all_indices.numel() > 0
        and (
            int(all_indices.min()) < 0
            or int(all_indices.max()) >= total
            or torch.bincount(all_indices, minlength=total).ne(1).any()
        )
    ):
        raise ValueError(
            f"the ranks' indices must cover range({total}) exactly once; got "
            f"{all_indices.numel()} indices"
        )
    result = torch.empty(total, dtype=local_scores.dtype, device=local_scores.device)
    result[all_indices.to(local_scores.device)] = torch.cat(
        [p.to(local_scores.device) for p in pieces]
    )
    return result


def fisher_score_global(
    directions: Sequence[Tensor],
    grads: Sequence[Tensor],
    fishers: Sequence[Tensor],
    *,
    backend: str = "auto",
) -> Tensor:
    """``ops.fisher_score`` over tensors that may be DTensors: ``[sum <d, g>, sum F g^2]``
    (float64, shape ``(2,)``) over every element of every tensor, the same on every rank.

    Plain tensors are scored as they are (replicated or single process). For DTensors (FSDP2:
    every rank ran the same sample, so the reduce-scattered gradient is that sample's gradient,
    sharded) each rank scores the local shards it owns (see :class:`GlobalCounter`) with the op
    and the partial terms are all-reduced over the mesh. ``directions[i]``, ``grads[i]`` and
    ``fishers[i]`` must be laid out alike. One op call per (mesh, device, dtype) bucket, one
    all-reduce per mesh dimension.
    """
    from fisherforget import backends, ops

    if not (len(directions) == len(grads) == len(fishers)):
        raise ValueError(
            f"directions, grads and fishers have {len(directions)}, {len(grads)} and "
            f"{len(fishers)} tensors: they must match"
        )
    # (mesh or None, device, dtype) -> (directions, grads, fishers) of the pieces this rank scores
    buckets: dict[tuple, tuple[list, list, list]] = {}
    meshes: dict[object, torch.device] = {}
    for i, (d, g, f) in enumerate(zip(directions, grads, fishers)):
        if not (same_layout(g, d) and same_layout(g, f)):
            raise ValueError(f"direction, grad and fisher {i} are not laid out alike")
        mesh = g.device_mesh if is_dtensor(g) else None
        if mesh is not None:
            meshes.setdefault(mesh, local(g).device)
            if not _owns(g):
                continue
        gl = local(g)
        bucket = buckets.setdefault((mesh, gl.device, gl.dtype), ([], [], []))
        bucket[0].append(local(d))
        bucket[1].append(gl)
        bucket[2].append(local(f))
    partial: dict[object, Tensor] = {}
    for (mesh, device, dtype), (ds, gs, fs) in buckets.items():
        terms = ops.fisher_score(ds, gs, fs, backend=backends.resolve(backend, device, dtype))
        target = meshes.get(mesh, device) if mesh is not None else None
        terms = terms.to(target) if target is not None else terms
        partial[mesh] = terms if mesh not in partial else partial[mesh] + terms.to(
            partial[mesh].device)
    result = partial.pop(None, None)
    for mesh, device in meshes.items():  # every rank reduces every mesh, scored or not
        part = partial.get(mesh, torch.zeros(2, dtype=torch.float64, device=device))
        if mesh.get_coordinate() is not None:
            for dim in range(mesh.ndim):
                dist.all_reduce(part, op=dist.ReduceOp.SUM, group=mesh.get_group(dim))
        result = part if result is None else result + part.to(result.device)
    if result is None:
        return torch.zeros(2, dtype=torch.float64)
    return result


def _all_gather_ragged(t: Tensor, group: Optional[dist.ProcessGroup]) -> list[Tensor]:
    """All-gather 1-D tensors whose lengths differ between ranks."""
    _, world_size = _world(group)
    device = _collective_device(group, t.device)
    count = torch.tensor([t.numel()], dtype=torch.int64, device=device)
    counts = [torch.empty_like(count) for _ in range(world_size)]
    dist.all_gather(counts, count, group=group)
    sizes = [int(c) for c in counts]
    longest = max(sizes)
    padded = torch.zeros(longest, dtype=t.dtype, device=device)
    padded[: t.numel()] = t.to(device)
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded, group=group)
    return [g[:size] for g, size in zip(gathered, sizes)]
