"""Faults: interruption and resume at any step, and non-finite gradients under a GradScaler.

The training run exercises every piece of state at once: a mask, amsgrad, the mean-mode Fisher
(whose weights depend on the accumulation count), ``fisher_scale``, an LR schedule, a GradScaler
that meets an overflow, and unlearning steps with their own moments. The reference backend is
deterministic, so resuming must be bit-identical.
"""

from __future__ import annotations

import io

import pytest
import torch
from torch.nn.functional import mse_loss

from fisherforget import FisherAdamW

STEPS = 8
UNLEARN_STEPS = (4, 5)  # unlearning (ascent, separate moments) at these step indices
OVERFLOW_STEP = 2  # this batch overflows: the scaler skips the step
SETTINGS = dict(lr=1e-2, weight_decay=0.01, amsgrad=True, fisher="mean", fisher_scale=2.0,
                backend="reference")


def _model(dtype, seed=7):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3)
    ).to(dtype)


def _batches(dtype):
    gen = torch.Generator().manual_seed(11)
    batches = [(torch.randn(8, 6, generator=gen).to(dtype), torch.randn(8, 3, generator=gen))
               for _ in range(STEPS)]
    x, y = batches[OVERFLOW_STEP]
    batches[OVERFLOW_STEP] = (x, torch.full_like(y, float("inf")))
    return batches


class Job:
    """Everything a training job holds: model, optimizer, LR scheduler, GradScaler."""

    def __init__(self, dtype, seed=7):
        self.model = _model(dtype, seed)
        self.opt = FisherAdamW(self.model.parameters(), **SETTINGS)
        mask = torch.rand(self.model[0].weight.shape,
                          generator=torch.Generator().manual_seed(seed)) > 0.3
        self.opt.set_mask(self.model[0].weight, mask)
        self.sched = torch.optim.lr_scheduler.StepLR(self.opt, step_size=3, gamma=0.5)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)

    def run(self, batches, start, stop):
        for i in range(start, stop):
            x, y = batches[i]
            self.scaler.scale(mse_loss(self.model(x).float(), y)).backward()
            if i in UNLEARN_STEPS:
                with self.opt.unlearning(moments="separate", lr=3e-3, fisher_scale=5.0):
                    self.scaler.step(self.opt)
            else:
                self.scaler.step(self.opt)
            self.scaler.update()
            self.sched.step()
            self.opt.zero_grad(set_to_none=True)

    def checkpoint(self) -> bytes:
        buffer = io.BytesIO()
        torch.save({"model": self.model.state_dict(), "opt": self.opt.state_dict(),
                    "sched": self.sched.state_dict(), "scaler": self.scaler.state_dict()},
                   buffer)
        return buffer.getvalue()

    def restore(self, blob: bytes):
        saved = torch.load(io.BytesIO(blob), weights_only=True)
        self.model.load_state_dict(saved["model"])
        self.opt.load_state_dict(saved["opt"])
        self.sched.load_state_dict(saved["sched"])
        self.scaler.load_state_dict(saved["scaler"])

    def tensors(self):
        """Params and every optimizer state tensor, in a fixed order."""
        out = [("param", p.detach()) for p in self.model.parameters()]
        for i, p in enumerate(self.model.parameters()):
            out += [(f"{i}.{k}", v) for k, v in sorted(self.opt.state[p].items())]
        return out


def _assert_bitwise_equal(a: Job, b: Job, where: str):
    ta, tb = a.tensors(), b.tensors()
    assert [k for k, _ in ta] == [k for k, _ in tb], where
    for (key, x), (_, y) in zip(ta, tb):
        assert x.dtype == y.dtype and torch.equal(x, y), f"{where}: {key} differs"
    assert a.scaler.get_scale() == b.scaler.get_scale(), where
    assert a.opt.param_groups[0]["lr"] == b.opt.param_groups[0]["lr"], where


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_after_interruption_at_any_step_is_bitwise_identical(dtype):
    """Interrupt after every step k = 0..8 (checkpoint through ``torch.save`` with
    ``weights_only`` loading, then a fresh process-like job with different weights), resume, and
    finish: the result equals the uninterrupted run bit for bit (params, moments, unlearning
    moments, Fisher, counts, steps, mask, lr, loss scale)."""
    batches = _batches(dtype)
    uninterrupted = Job(dtype)
    uninterrupted.run(batches, 0, STEPS)
    assert uninterrupted.scaler.get_scale() != 2.0**12  # the overflow and growth happened

    for k in range(STEPS + 1):
        first = Job(dtype)
        first.run(batches, 0, k)
        blob = first.checkpoint()
        del first  # the process dies
        resumed = Job(dtype, seed=100 + k)
        resumed.restore(blob)
        resumed.run(batches, k, STEPS)
        _assert_bitwise_equal(uninterrupted, resumed, f"resumed after step {k}")


def _plain_job():
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = FisherAdamW(model.parameters(), **SETTINGS)
    opt.set_mask(model[2].weight, torch.rand(2, 8, generator=torch.Generator().manual_seed(1)) > 0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    return model, opt, scaler


def _all_tensors(model, opt):
    return [p.detach().clone() for p in model.parameters()] + [
        v.clone() for p in model.parameters() for _, v in sorted(opt.state[p].items())
    ]


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("unscale_first", [False, True], ids=["step", "unscale_clip_step"])
def test_non_finite_gradients_under_grad_scaler_skip_the_step(bad, unscale_first):
    """A single non-finite gradient element (in one param, the others finite) makes the scaler
    skip the whole step: params, moments, Fisher, counts and steps stay bit-identical, the scale
    halves, and the run continues exactly as if that batch had never been seen (power-of-two loss
    scales unscale exactly). Both with ``scaler.step`` alone and with ``unscale_`` + gradient
    clipping first."""
    gen = torch.Generator().manual_seed(5)
    data = [(torch.randn(4, 8, generator=gen), torch.randn(4, 2, generator=gen)) for _ in range(5)]
    poisoned_at = 2

    def train(model, opt, scaler, skip_poisoned_batch):
        for i, (x, y) in enumerate(data):
            if i == poisoned_at and skip_poisoned_batch:
                continue
            scaler.scale(mse_loss(model(x), y)).backward()
            if i == poisoned_at:
                model[0].weight.grad[1, 3] = bad
                before = _all_tensors(model, opt)
                scale_before = scaler.get_scale()
            if unscale_first:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            if i == poisoned_at:
                after = _all_tensors(model, opt)
                assert all(torch.equal(a, b) for a, b in zip(before, after))
                assert scaler.get_scale() == scale_before / 2

    model, opt, scaler = _plain_job()
    train(model, opt, scaler, skip_poisoned_batch=False)
    clean_model, clean_opt, clean_scaler = _plain_job()
    train(clean_model, clean_opt, clean_scaler, skip_poisoned_batch=True)
    for a, b in zip(_all_tensors(model, opt), _all_tensors(clean_model, clean_opt)):
        assert torch.equal(a, b)
    assert opt.state[model[0].weight]["fisher_count"].item() == len(data) - 1


def test_found_inf_keeps_everything_even_with_nan_gradients():
    """``step(found_inf=1)`` with NaN gradients everywhere changes nothing, bit for bit (the skip
    selects the old values; NaNs in the discarded branch do not leak)."""
    model, opt, _ = _plain_job()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    before = _all_tensors(model, opt)
    opt.step(grad_scale=torch.tensor(4.0), found_inf=torch.tensor(1.0))
    assert all(torch.equal(a, b) for a, b in zip(before, _all_tensors(model, opt)))
