"""FisherAdamW on FSDP2 (``fully_shard``, DTensor parameters): 2 CPU processes on gloo.

torch 2.14 runs FSDP2 on CPU with gloo, so everything is tested here on CPU; the same worker runs
on GPUs with NCCL in the ``cuda``-marked test (the kernel backends then step the local shards).

The model has odd sizes so that the dim-0 shards are uneven (7 rows -> 4 + 3) and one is empty
(1 row -> 1 + 0).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    get_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor
from torch.nn.functional import mse_loss

from fisherforget import FisherAdamW, ops
from fisherforget.distributed import fisher_score_global, prepare_optimizer_state_for_load
from multiproc import run_workers

WORLD_SIZE = 2
GLOBAL_BATCH = 8
SETTINGS = dict(
    lr=1e-2, weight_decay=0.01, amsgrad=True, fisher="mean", fisher_scale=2.0, backend="auto"
)
QUANTILES = (0.0, 0.3, 0.5, 0.9, 1.0)


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(6, 7), torch.nn.Tanh(), torch.nn.Linear(7, 5), torch.nn.Tanh(),
        torch.nn.Linear(5, 1),
    )


def _shard(model: torch.nn.Module) -> torch.nn.Module:
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def _batches(n: int, device, seed: int):
    data = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(GLOBAL_BATCH, 6, generator=data).to(device),
         torch.randn(GLOBAL_BATCH, 1, generator=data).to(device))
        for _ in range(n)
    ]


def _train(model, opt, batches, rows, unlearn_at=()):
    """Steps on ``batches``; the steps listed in ``unlearn_at`` are unlearning steps with their
    own moments (ascent, no Fisher accumulation, Fisher-damped)."""
    for i, (x, y) in enumerate(batches):
        mse_loss(model(x[rows]), y[rows]).backward()
        if i in unlearn_at:
            with opt.unlearning(moments="separate", lr=5e-3, fisher_scale=4.0):
                opt.step()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)


def _gather(t: torch.Tensor, world_size: int) -> list[torch.Tensor]:
    t = t.detach().contiguous()
    out = [torch.empty_like(t) for _ in range(world_size)]
    dist.all_gather(out, t)
    return out


def _snapshot(opt: FisherAdamW, params) -> list[dict[str, torch.Tensor]]:
    """Each param's state, local shards cloned."""
    return [
        {k: (v.to_local() if isinstance(v, DTensor) else v).clone()
         for k, v in opt.state[p].items()}
        for p in params
    ]


def _assert_same_state(a, b, where):
    for i, (sa, sb) in enumerate(zip(a, b)):
        assert sa.keys() == sb.keys(), f"{where}: param {i} keys {sorted(sa)} != {sorted(sb)}"
        for k in sa:
            assert sa[k].dtype == sb[k].dtype, f"{where}: param {i} {k} dtype"
            assert torch.equal(sa[k], sb[k]), f"{where}: param {i} {k} differs"


def _fsdp2_worker(rank: int, world_size: int, device_type: str, ckpt_dir: str) -> None:
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    torch.manual_seed(0)
    base = _model().to(device)
    batches = _batches(5, device, seed=1)
    masks = torch.Generator().manual_seed(2)
    mask0 = (torch.rand(base[0].weight.shape, generator=masks) > 0.25).to(device)
    mask2 = (torch.rand(base[2].weight.shape, generator=masks) > 0.5).to(device)
    rows = slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)

    # One process on the global batch: the oracle.
    single = copy.deepcopy(base)
    single_opt = FisherAdamW(single.parameters(), **SETTINGS)
    single_opt.set_mask(single[0].weight, mask0)
    single_opt.set_mask(single[2].weight, mask2)
    _train(single, single_opt, batches[:3], slice(None), unlearn_at=(2,))

    model = _shard(copy.deepcopy(base))
    params = list(model.parameters())
    opt = FisherAdamW(params, **SETTINGS)
    # A full mask (every rank keeps its shard) and a replicated DTensor (redistributed).
    opt.set_mask(model[0].weight, mask0)
    mesh = model[2].weight.device_mesh
    opt.set_mask(model[2].weight, distribute_tensor(mask2, mesh, [Replicate()]))
    _train(model, opt, batches[:3], rows, unlearn_at=(2,))

    # --- state is sharded like the params; the steps match one process -------------------
    for p in params:
        assert isinstance(p, DTensor)
        for key, value in opt.state[p].items():
            if key in ("step", "fisher_count", "unlearn_step"):
                assert not isinstance(value, DTensor) and value.dim() == 0, key
            else:
                assert isinstance(value, DTensor), key
                assert value.placements == p.placements and value.device_mesh == p.device_mesh
                assert value.to_local().shape == p.to_local().shape, key
    assert params[-1].to_local().numel() == (1 if rank == 0 else 0)  # an empty shard ran too
    full_fishers = []
    for p, q in zip(params, single.parameters()):
        torch.testing.assert_close(p.full_tensor(), q.detach(), rtol=1e-5, atol=1e-6)
        full_fishers.append(opt.fisher(p).full_tensor())
        torch.testing.assert_close(full_fishers[-1], single_opt.fisher(q), rtol=1e-5, atol=1e-10)
    frozen0 = ~mask0
    assert torch.equal(params[0].full_tensor()[frozen0], base[0].weight.detach()[frozen0])
    assert torch.equal(opt.state[params[0]]["mask"].full_tensor(), mask0)
    assert torch.equal(opt.state[params[2]]["mask"].full_tensor(), mask2)

    # --- fisher_mean / fisher_quantile are global and equal on every rank ----------------
    everything = torch.cat([f.reshape(-1) for f in full_fishers]).double()
    stats = torch.tensor(
        [opt.fisher_mean()] + [opt.fisher_quantile(q) for q in QUANTILES], dtype=torch.float64,
        device=device,
    )
    gathered = _gather(stats, world_size)
    assert all(torch.equal(g, gathered[0]) for g in gathered), gathered
    assert math.isclose(stats[0].item(), everything.mean().item(), rel_tol=1e-12)
    for q, value in zip(QUANTILES, stats[1:].tolist()):
        assert math.isclose(value, torch.quantile(everything, q).item(), rel_tol=1e-9), q
    torch.testing.assert_close(
        stats[1:].cpu(),
        torch.tensor([single_opt.fisher_quantile(q) for q in QUANTILES], dtype=torch.float64),
        rtol=1e-5, atol=1e-12,
    )

    # --- forgetting-confidence terms of one sample: every rank runs it, shards are summed --
    x_s, y_s = batches[4][0][:1], batches[4][1][:1]
    mse_loss(model(x_s), y_s).backward()
    terms = fisher_score_global([opt.state[p]["exp_avg"] for p in params],
                                [p.grad for p in params], [opt.fisher(p) for p in params])
    opt.zero_grad(set_to_none=True)
    gathered = _gather(terms, world_size)
    assert all(torch.equal(g, gathered[0]) for g in gathered), gathered
    unsharded = copy.deepcopy(base)
    with torch.no_grad():
        for q, p in zip(unsharded.parameters(), params):
            q.copy_(p.full_tensor())
    mse_loss(unsharded(x_s), y_s).backward()
    expected = ops.fisher_score(
        [opt.state[p]["exp_avg"].full_tensor() for p in params],
        [q.grad for q in unsharded.parameters()], full_fishers,
    )
    torch.testing.assert_close(terms.cpu(), expected.cpu(), rtol=1e-6, atol=1e-12)

    # --- a gradient laid out unlike its param is refused; nothing changes ----------------
    before = _snapshot(opt, params)
    weights_before = [p.to_local().clone() for p in params]
    for p in params:
        p.grad = torch.ones_like(p)
    params[0].grad = params[0].grad.redistribute(mesh, [Replicate()])
    with pytest.raises(RuntimeError, match="laid out alike"):
        opt.step()
    opt.zero_grad(set_to_none=True)
    _assert_same_state(before, _snapshot(opt, params), "after a refused step")
    assert all(torch.equal(a, p.to_local()) for a, p in zip(weights_before, params))

    # --- torch.distributed.checkpoint: save, continue, load into a fresh job, continue ----
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=ckpt_dir)
    saved = _snapshot(opt, params)
    _train(model, opt, batches[3:], rows, unlearn_at=(1,))
    uninterrupted = _snapshot(opt, params), [p.to_local().clone() for p in params]

    torch.manual_seed(5)  # different weights: everything must come from the checkpoint
    resumed = _shard(_model().to(device))
    resumed_params = list(resumed.parameters())
    resumed_opt = FisherAdamW(resumed_params, **SETTINGS)
    added = prepare_optimizer_state_for_load(resumed, resumed_opt, ckpt_dir)
    assert ("0.weight", "mask") in added and ("2.weight", "unlearn_exp_avg") in added
    model_sd, optim_sd = get_state_dict(resumed, resumed_opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=ckpt_dir)
    set_state_dict(resumed, resumed_opt, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    _assert_same_state(saved, _snapshot(resumed_opt, resumed_params), "after dcp.load")
    assert resumed_opt.state[resumed_params[0]]["mask"].placements == params[0].placements
    _train(resumed, resumed_opt, batches[3:], rows, unlearn_at=(1,))
    _assert_same_state(uninterrupted[0], _snapshot(resumed_opt, resumed_params), "resumed")
    for a, p in zip(uninterrupted[1], resumed_params):
        assert torch.equal(a, p.to_local())

    # --- a full (unsharded) optimizer state dict: gathered, resharded, loaded back -------
    full = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    assert torch.equal(full["state"]["0.weight"]["mask"], mask0)
    assert torch.equal(full["state"]["0.weight"]["fisher"], opt.fisher(params[0]).full_tensor())
    reloaded = _shard(copy.deepcopy(base))
    reloaded_opt = FisherAdamW(reloaded.parameters(), **SETTINGS)
    prepare_optimizer_state_for_load(reloaded, reloaded_opt, full)
    set_optimizer_state_dict(reloaded, reloaded_opt, full,
                             options=StateDictOptions(full_state_dict=True))
    _assert_same_state(
        _snapshot(opt, params), _snapshot(reloaded_opt, list(reloaded.parameters())),
        "full state dict round trip",
    )

    # --- a NaN in one rank's shard: every rank raises, no rank hangs ---------------------
    fisher_shard = opt.fisher(params[0]).to_local()
    if rank == world_size - 1:
        fisher_shard.view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match="negative or NaN"):
        opt.fisher_quantile(0.5)


def test_fsdp2_cpu_gloo(tmp_path):
    """FSDP2 on 2 CPU ranks (gloo), 5 steps incl. separate-moment unlearning steps, masks given
    full and as a replicated DTensor:

    * state (moments, Fisher, masks, unlearning moments) is DTensors sharded like the params,
      ``step``/``fisher_count`` plain; parameters and Fisher equal one process on the global
      batch (to rounding);
    * ``fisher_mean`` / ``fisher_quantile`` are bitwise equal on both ranks and equal the mean /
      ``torch.quantile`` of the gathered full Fisher;
    * the forgetting-confidence terms of a sample (``fisher_score_global`` over sharded
      gradients) are equal on both ranks and equal the unsharded ``ops.fisher_score``;
    * a gradient placed unlike its param is refused with nothing changed;
    * ``torch.distributed.checkpoint`` save -> load into a fresh job (weights, moments, Fisher,
      masks, counts, unlearning moments) -> 2 more steps is bitwise the uninterrupted run; a full
      state dict round-trips through ``set_optimizer_state_dict``;
    * a NaN in one rank's Fisher makes ``fisher_quantile`` raise on every rank (no hang).
    """
    run_workers(_fsdp2_worker, WORLD_SIZE, tmp_path, "cpu", str(tmp_path / "ckpt"))


@pytest.mark.cuda
def test_fsdp2_cuda_nccl(tmp_path):
    """The same on GPUs with NCCL (world size 2 when two GPUs are visible, else 1), with the
    ``auto`` backend stepping the local shards with the CUDA or Triton kernels."""
    world_size = min(2, torch.cuda.device_count())
    run_workers(_fsdp2_worker, world_size, tmp_path, "cuda", str(tmp_path / "ckpt"),
                backend="nccl")
