"""Forgetting-confidence scoring split over ranks: ``shard_range`` splits the samples,
``gather_scores`` assembles the scores on every rank, and every rank selects the same samples.

The scores are the forgetting confidence of docs/design.md built from ``ops.fisher_score``
(``FC(s) = -(eta <gbar, g_s> + eta^2/2 sum F g_s^2)``) on per-sample gradients of a small model.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.nn.functional import cross_entropy

from fisherforget import ops
from fisherforget.distributed import gather_scores, shard_range
from multiproc import run_workers

WORLD_SIZE = 2
N_SAMPLES = 11  # odd: the ranks score 6 and 5 samples
ETA = 0.5
FRACTION = 0.3


def _problem():
    """The model, the samples, the learning-task gradient and Fisher (the same on every rank)."""
    gen = torch.Generator().manual_seed(11)
    model = torch.nn.Linear(4, 3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    xs = torch.randn(N_SAMPLES, 4, generator=gen)
    ys = torch.randint(0, 3, (N_SAMPLES,), generator=gen)
    direction = [torch.randn(p.shape, generator=gen) for p in model.parameters()]
    fisher = [torch.rand(p.shape, generator=gen) for p in model.parameters()]
    return model, xs, ys, direction, fisher


def _forgetting_confidence(model, xs, ys, direction, fisher, indices) -> torch.Tensor:
    scores = []
    for i in indices:
        model.zero_grad(set_to_none=True)
        cross_entropy(model(xs[i : i + 1]), ys[i : i + 1]).backward()
        grads = [p.grad for p in model.parameters()]
        dot, weighted = ops.fisher_score(direction, grads, fisher).tolist()
        scores.append(-(ETA * dot + 0.5 * ETA**2 * weighted))
    return torch.tensor(scores, dtype=torch.float64)


def _select(scores: torch.Tensor) -> torch.Tensor:
    """Top ``FRACTION`` by score, ties to the lower index: a deterministic function of the
    scores, so equal scores give equal selections."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[: max(1, round(FRACTION * scores.numel()))].sort().values


def _scores_worker(rank: int, world_size: int) -> None:
    problem = _problem()
    single = _forgetting_confidence(*problem, range(N_SAMPLES))

    # Contiguous blocks.
    block = shard_range(N_SAMPLES)
    assert len(block) == (6 if rank == 0 else 5)
    gathered = gather_scores(_forgetting_confidence(*problem, block))
    assert torch.equal(gathered, single), (rank, gathered, single)

    # Strided assignment with explicit indices.
    strided = torch.arange(rank, N_SAMPLES, world_size)
    scattered = gather_scores(
        _forgetting_confidence(*problem, strided.tolist()), strided, total=N_SAMPLES
    )
    assert torch.equal(scattered, single)

    # The same selection on every rank, and the single-process one.
    selection = _select(gathered)
    assert torch.equal(selection, _select(single))
    everyone = [torch.empty_like(selection) for _ in range(world_size)]
    dist.all_gather(everyone, selection)
    assert all(torch.equal(s, selection) for s in everyone)

    # Indices that do not cover range(total) exactly once fail on every rank (none hangs).
    overlapping = torch.arange(0, 6)
    with pytest.raises(ValueError, match="exactly once"):
        gather_scores(torch.zeros(6, dtype=torch.float64), overlapping, total=N_SAMPLES)


def test_scores_split_over_ranks_are_gathered_and_select_the_same_samples(tmp_path):
    """2 gloo ranks score 6 + 5 of 11 samples (contiguous, then strided): the gathered scores are
    bitwise the single-process scores on every rank, so the top-30% selection is identical
    everywhere; bad index coverage raises on every rank."""
    run_workers(_scores_worker, WORLD_SIZE, tmp_path)


@pytest.mark.parametrize("n", [0, 1, 5, 11, 64])
@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_shard_range_partitions_evenly(n, world_size):
    blocks = [shard_range(n, rank, world_size) for rank in range(world_size)]
    assert [i for b in blocks for i in b] == list(range(n))
    assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def test_single_process_gather_and_bad_input():
    scores = torch.randn(5, dtype=torch.float64)
    assert shard_range(5) == range(5)
    assert torch.equal(gather_scores(scores), scores)
    order = torch.tensor([3, 0, 4, 1, 2])
    assert torch.equal(gather_scores(scores, order, total=5)[order], scores)
    with pytest.raises(ValueError, match="1-D"):
        gather_scores(scores.reshape(1, 5))
    with pytest.raises(ValueError, match="int64"):
        gather_scores(scores, order.int(), total=5)
    with pytest.raises(ValueError, match="total is required"):
        gather_scores(scores, order)
    with pytest.raises(ValueError, match="exactly once"):
        gather_scores(scores, torch.tensor([0, 0, 1, 2, 3]), total=5)
    with pytest.raises(ValueError, match="exactly once"):
        gather_scores(scores, order, total=6)
    with pytest.raises(ValueError, match="Invalid rank"):
        shard_range(5, rank=2, world_size=2)
