"""The ``transformers`` integration: trains, logs, checkpoints and resumes to the same result."""

import os
import shutil

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # Trainer needs it
from transformers import Trainer, TrainingArguments  # noqa: E402

from fisherforget import FisherAdamW  # noqa: E402
from fisherforget.lwf import (  # noqa: E402
    LearningWithForgetting,
    LWFCallback,
    LWFConfig,
    LWFTrainer,
    collate,
)
from fisherforget.lwf.trainer import STATE_FILE  # noqa: E402
from lwf_testing import make_samples, tiny_llama  # noqa: E402

CONFIG = LWFConfig(every=3, steps=2, warmup=2, rescore_every=6, fraction=0.5, lr=2e-3,
                   batch_size=4, forget_eval_size=8)


def arguments(out, max_steps=10, **overrides):
    kwargs = dict(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4,
                  gradient_accumulation_steps=2, learning_rate=3e-3, lr_scheduler_type="linear",
                  logging_steps=1, save_strategy="steps", save_steps=5, report_to=[],
                  use_cpu=True, seed=0, data_seed=0, disable_tqdm=True, dataloader_num_workers=0,
                  remove_unused_columns=False)
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def make_trainer(out, **overrides):
    model = tiny_llama(seed=0)
    lwf = LearningWithForgetting(None, None, make_samples(16, seed=7), CONFIG)
    trainer = LWFTrainer(model=model, args=arguments(out, **overrides),
                         train_dataset=make_samples(64, seed=2), data_collator=collate, lwf=lwf,
                         fisher_kwargs={"fisher_beta": 0.9})
    return trainer, lwf


def lwf_logs(trainer):
    return [entry for entry in trainer.state.log_history if "lwf/phase" in entry]


def test_trainer_trains_logs_checkpoints_and_resumes_exactly(tmp_path):
    full, full_lwf = make_trainer(tmp_path / "full")
    full.train()
    assert isinstance(full.optimizer.optimizer if hasattr(full.optimizer, "optimizer")
                      else full.optimizer, FisherAdamW)
    # phases after learning steps 2, 5, 8 (warmup 2, every 3), each in the Trainer's logs
    logs = lwf_logs(full)
    assert [entry["step"] for entry in logs] == [2, 5, 8]
    for key in ("lwf/fc_mean", "lwf/unlearn_loss", "lwf/forget_loss", "lwf/selected",
                "lwf/retain_loss"):
        assert key in logs[0], key
    assert "lwf/fc_mean" in logs[2] and "lwf/fc_mean" not in logs[1]  # rescored at step 8
    assert any("loss" in entry for entry in full.state.log_history)
    assert os.path.isfile(tmp_path / "full" / "checkpoint-5" / STATE_FILE)
    assert full_lwf.global_step == 10

    # Resume from the step-5 checkpoint (outside the new run's output_dir) with a fresh model.
    resumed, resumed_lwf = make_trainer(tmp_path / "resumed")
    torch.manual_seed(123)  # a different global RNG state: everything must come from checkpoints
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-5"))
    assert resumed_lwf.global_step == 10
    # the resumed log history holds the checkpoint's entries, then this run's phase at step 8
    assert lwf_logs(resumed) == logs
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert resumed_lwf.history == full_lwf.history
    full_opt = full_lwf.optimizer
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(full_opt.fisher(a), resumed_lwf.optimizer.fisher(b))


def test_plain_trainer_with_callback_resumes_from_output_dir(tmp_path):
    def plain(out):
        model = tiny_llama(seed=0)
        lwf = LearningWithForgetting(None, None, make_samples(16, seed=7), CONFIG)
        opt = FisherAdamW(model.parameters(), lr=3e-3, weight_decay=0.0, fisher="ema",
                          fisher_beta=0.9)
        trainer = Trainer(model=model, args=arguments(out), train_dataset=make_samples(64, seed=2),
                          data_collator=collate, optimizers=(opt, None),
                          callbacks=[LWFCallback(lwf)])
        return trainer, lwf

    first, first_lwf = plain(tmp_path / "plain")
    first.train()
    assert [e["step"] for e in first.state.log_history if "lwf/phase" in e] == [2, 5, 8]
    shutil.rmtree(tmp_path / "plain" / "checkpoint-10")
    again, again_lwf = plain(tmp_path / "plain")
    again.train(resume_from_checkpoint=True)  # finds checkpoint-5 and its lwf_state.pt
    for a, b in zip(first.model.parameters(), again.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert again_lwf.history == first_lwf.history
    shutil.rmtree(tmp_path / "plain" / "checkpoint-10")
    os.remove(tmp_path / "plain" / "checkpoint-5" / STATE_FILE)
    missing, _ = plain(tmp_path / "plain")
    with pytest.raises(RuntimeError, match=STATE_FILE):
        missing.train(resume_from_checkpoint=True)


def test_trainer_rejects_other_optimizers(tmp_path):
    model = tiny_llama()
    lwf = LearningWithForgetting(None, None, make_samples(4), CONFIG)
    trainer = Trainer(model=model, args=arguments(tmp_path, max_steps=2),
                      train_dataset=make_samples(16), data_collator=collate,
                      callbacks=[LWFCallback(lwf)])
    with pytest.raises(TypeError, match="FisherAdamW"):
        trainer.train()


def test_bf16_autocast_reaches_the_unlearning_passes(tmp_path):
    trainer, lwf = make_trainer(tmp_path, max_steps=3, bf16=True, save_strategy="no")
    dtypes = {"unlearn": set()}
    inside = {"flag": False}
    original = lwf.unlearn

    def unlearn(n):
        inside["flag"] = True
        try:
            return original(n)
        finally:
            inside["flag"] = False

    lwf.unlearn = unlearn
    trainer.model.lm_head.register_forward_hook(
        lambda mod, inp, out: dtypes["unlearn"].add(out.dtype) if inside["flag"] else None)
    trainer.train()
    assert [e["step"] for e in lwf_logs(trainer)] == [2]
    assert dtypes["unlearn"] == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
