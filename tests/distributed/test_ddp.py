"""FisherAdamW under DistributedDataParallel: 2 CPU processes on gloo.

DDP all-reduces (averages) the gradients before ``step``, so every rank takes the same step as one
process on the global batch, and the Fisher, which squares the reduced gradient, is identical on
every rank.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch.nn.functional import mse_loss
from torch.nn.parallel import DistributedDataParallel as DDP

from fisherforget import FisherAdamW
from multiproc import run_workers

WORLD_SIZE = 2
STEPS = 4
GLOBAL_BATCH = 8
SETTINGS = dict(
    lr=1e-2, weight_decay=0.01, amsgrad=True, fisher="mean", fisher_scale=2.0, backend="auto"
)


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _all_equal_across_ranks(t: torch.Tensor, world_size: int) -> bool:
    t = t.detach().contiguous()
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    gathered = [torch.empty_like(t) for _ in range(world_size)]
    dist.all_gather(gathered, t)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def _train(model, opt, batches, rows):
    for x, y in batches:
        mse_loss(model(x[rows]), y[rows]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _ddp_worker(rank: int, world_size: int) -> None:
    torch.manual_seed(0)
    base = _model()
    data = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(GLOBAL_BATCH, 5, generator=data), torch.randn(GLOBAL_BATCH, 3, generator=data))
        for _ in range(STEPS)
    ]
    mask = torch.rand(base[0].weight.shape, generator=data) > 0.25

    # One process on the global batch: the oracle.
    single = copy.deepcopy(base)
    single_opt = FisherAdamW(single.parameters(), **SETTINGS)
    single_opt.set_mask(single[0].weight, mask)
    _train(single, single_opt, batches, slice(None))

    local_rows = slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)
    for bucket_view in (False, True):
        model = DDP(copy.deepcopy(base), gradient_as_bucket_view=bucket_view)
        opt = FisherAdamW(model.parameters(), **SETTINGS)
        opt.set_mask(model.module[0].weight, mask)
        _train(model, opt, batches, local_rows)

        where = f"rank {rank}, gradient_as_bucket_view={bucket_view}"
        params = list(model.module.parameters())
        for p, q in zip(params, single.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m: f"{where}: {m}")
        for p, q in zip(params, single.parameters()):
            torch.testing.assert_close(
                opt.fisher(p), single_opt.fisher(q), rtol=1e-5, atol=1e-10,
                msg=lambda m: f"{where}, Fisher: {m}",
            )
        # Masked elements never moved.
        w0 = base[0].weight.detach()
        assert torch.equal(params[0].detach()[~mask], w0[~mask]), where

        # Identical on every rank, bit for bit: params, Fisher, moments, counts.
        state = [v for p in params for v in opt.state[p].values()]
        for t in params + state:
            assert _all_equal_across_ranks(t, world_size), where
        stats = torch.tensor(
            [opt.fisher_mean()] + [opt.fisher_quantile(q) for q in (0.0, 0.5, 0.9, 1.0)],
            dtype=torch.float64,
        )
        assert _all_equal_across_ranks(stats, world_size), where
        expected = torch.tensor(
            [single_opt.fisher_mean()]
            + [single_opt.fisher_quantile(q) for q in (0.0, 0.5, 0.9, 1.0)],
            dtype=torch.float64,
        )
        torch.testing.assert_close(stats, expected, rtol=1e-5, atol=1e-12)


def test_ddp_matches_single_process_and_fisher_is_identical_on_every_rank(tmp_path):
    """2 gloo ranks, each with half of a global batch of 8, 4 steps (mask, amsgrad, mean Fisher,
    fisher_scale), with and without ``gradient_as_bucket_view``: parameters and Fisher match one
    process trained on the whole batch (to rounding: the all-reduce sums in another order), and
    every rank holds bitwise the same parameters, state, ``fisher_mean`` and quantiles."""
    run_workers(_ddp_worker, WORLD_SIZE, tmp_path)
