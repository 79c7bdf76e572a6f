"""LWF under DDP: with ``split_scoring`` each rank scores its slice of ``D_self`` and the gathered
forgetting confidences equal the unsplit scores, identically on every rank."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from fisherforget import FisherAdamW
from fisherforget.lwf import LearningWithForgetting, LWFConfig
from fisherforget.lwf import loop
from lwf_testing import learn_batches, make_samples, tiny_llama
from multiproc import run_workers

WORLD_SIZE = 2


def _lwf_worker(rank: int, world_size: int) -> None:
    model = tiny_llama(seed=0)
    ddp = DistributedDataParallel(model)
    opt = FisherAdamW(ddp.parameters(), lr=3e-3, fisher="ema", fisher_beta=0.9)
    samples = make_samples(11, seed=7)  # odd: the ranks score 6 and 5 samples
    # Bound before fine-tuning: theta_0 is the weights before the steps below (paper's FC).
    helpers = {split: LearningWithForgetting(
        ddp.module, opt, samples, LWFConfig(split_scoring=split, fraction=0.3, batch_size=4))
        for split in (False, True)}
    batches = learn_batches(3, seed=11)
    for batch in batches:  # the same batch on every rank: identical optimizer state everywhere
        ddp(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    scored = []  # how many samples each scoring pass ran on this rank
    original = loop.forgetting_confidence

    def counting(model, batches, *args, **kwargs):
        batches = list(batches)
        scored.append(sum(b["input_ids"].shape[0] for b in batches))
        return original(model, batches, *args, **kwargs)

    loop.forgetting_confidence = counting
    scores = {split: helpers[split].score() for split in (False, True)}
    loop.forgetting_confidence = original
    assert scored == [11, 6 if rank == 0 else 5]
    whole, split = scores[False], scores[True]
    assert split.fc.shape == whole.fc.shape == (11,)
    assert set(split.terms) == set(whole.terms) == {"displacement", "fisher_sq", "sq_norm"}
    assert whole.fc.abs().max() > 0
    for name in ["fc"] + list(whole.terms):
        a = split.fc if name == "fc" else split.terms[name]
        b = whole.fc if name == "fc" else whole.terms[name]
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-12), name
    everyone = [torch.empty_like(split.fc) for _ in range(world_size)]
    dist.all_gather(everyone, split.fc)
    assert all(torch.equal(other, split.fc) for other in everyone)


def test_lwf_split_scoring_under_ddp_matches_unsplit_and_agrees_across_ranks(tmp_path):
    run_workers(_lwf_worker, WORLD_SIZE, tmp_path)
