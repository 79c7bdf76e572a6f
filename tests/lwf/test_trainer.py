"""The ``transformers`` integration: trains, logs, checkpoints and resumes to the same result."""

import os
import pathlib
import shutil
import types
import warnings

import numpy as np
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
from fisherforget.lwf.trainer import STATE_FILE, weights_only_state  # noqa: E402
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


def make_trainer(out, config=CONFIG, **overrides):
    model = tiny_llama(seed=0)
    lwf = LearningWithForgetting(None, None, make_samples(16, seed=7), config)
    trainer = LWFTrainer(model=model, args=arguments(out, **overrides),
                         train_dataset=make_samples(64, seed=2), data_collator=collate, lwf=lwf,
                         fisher_kwargs={"fisher_beta": 0.9})
    return trainer, lwf


def spy_state_loads(monkeypatch):
    """Record the keyword arguments of every torch.load of an LWF state file."""
    calls = []
    original = torch.load

    def load(f, *args, **kwargs):
        if str(f).endswith(STATE_FILE):
            calls.append(kwargs)
        return original(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    return calls


def lwf_logs(trainer):
    return [entry for entry in trainer.state.log_history if "lwf/phase" in entry]


def test_trainer_trains_logs_checkpoints_and_resumes_exactly(tmp_path, monkeypatch):
    full, full_lwf = make_trainer(tmp_path / "full")
    full.train()
    # 10 optimizer steps of 2 micro-batches each: LWF counts optimizer steps, not micro-batches
    assert full.args.gradient_accumulation_steps == 2 and full.state.global_step == 10
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

    # Resume from the step-5 checkpoint (outside the new run's output_dir, given as a
    # pathlib.Path) with a fresh model; the LWF state is read with weights_only=True.
    resumed, resumed_lwf = make_trainer(tmp_path / "resumed")
    torch.manual_seed(123)  # a different global RNG state: everything must come from checkpoints
    loads = spy_state_loads(monkeypatch)
    resumed.train(resume_from_checkpoint=pathlib.Path(tmp_path / "full" / "checkpoint-5"))
    assert [kwargs.get("weights_only") for kwargs in loads] == [True]
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


def test_state_file_loads_with_weights_only_and_a_tampered_one_is_refused(tmp_path):
    trainer, lwf = make_trainer(tmp_path / "run", max_steps=5)
    trainer.train()
    path = tmp_path / "run" / "checkpoint-5" / STATE_FILE
    state = torch.load(path, weights_only=True)  # plain tensors and containers only
    assert state["global_step"] == 5 and len(state["start_weights"]) > 0

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo tampered > " + str(tmp_path / "ran"),))

    state["history"].append(Payload())
    torch.save(state, path)
    resumed, _ = make_trainer(tmp_path / "run", max_steps=6)
    with pytest.raises(RuntimeError, match=r"lwf_state.pt is not an LWF state.*weights_only"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-5"))
    assert not (tmp_path / "ran").exists()


def test_train_twice_on_one_lwf_is_refused(tmp_path):
    trainer, lwf = make_trainer(tmp_path, max_steps=3)
    trainer.train()
    weights = [p.detach().clone() for p in trainer.model.parameters()]
    history = list(lwf.history)
    with pytest.raises(RuntimeError, match="already ran 3 learning steps"):
        trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(weights, trainer.model.parameters()))
    assert lwf.global_step == 3 and lwf.history == history


def test_numpy_config_values_round_trip_with_weights_only(tmp_path, monkeypatch):
    """np.float64 is a float, so LWFConfig takes it, but it pickles as NumPy, which
    weights_only=True refuses: the saved state holds plain Python numbers instead."""
    config = LWFConfig(every=3, steps=2, warmup=2, fraction=np.float64(0.5),
                       lr=np.float64(2e-3), batch_size=4, forget_eval_size=8)
    full, full_lwf = make_trainer(tmp_path, config=config, max_steps=6, save_steps=3)
    full.train()
    state = torch.load(tmp_path / "checkpoint-3" / STATE_FILE, weights_only=True)
    assert type(state["config"]["lr"]) is float and state["config"]["lr"] == 2e-3
    resumed, resumed_lwf = make_trainer(tmp_path, config=config, max_steps=6, save_steps=3)
    loads = spy_state_loads(monkeypatch)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert [kwargs.get("weights_only") for kwargs in loads] == [True]
    assert resumed_lwf.history == full_lwf.history
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


def test_weights_only_state_converts_or_names_what_it_cannot_store():
    param = torch.nn.Parameter(torch.ones(2))
    state = {"a": [np.float32(0.5), np.int64(3), np.bool_(True), (1, None)],
             "p": param, "arr": np.arange(3), "nested": {"x": "s"}}
    out = weights_only_state(state)
    assert out["a"] == [0.5, 3, True, (1, None)]
    assert [type(v) for v in out["a"][:3]] == [float, int, bool]
    assert type(out["p"]) is torch.Tensor and torch.equal(out["p"], param.detach())
    assert torch.equal(out["arr"], torch.arange(3)) and out["nested"] == {"x": "s"}
    with pytest.raises(TypeError, match=r"state\['history'\]\[1\] holds a .*object"):
        weights_only_state({"history": [1, object()]})


def test_resuming_without_optimizer_state_is_refused(tmp_path):
    """save_only_model=True checkpoints hold no optimizer state; the Fisher that LWF scores and
    protects with would silently restart from nothing."""
    first, _ = make_trainer(tmp_path, max_steps=3, save_steps=3, save_only_model=True)
    first.train()
    assert not os.path.exists(tmp_path / "checkpoint-3" / "optimizer.pt")
    again, lwf = make_trainer(tmp_path, max_steps=5, save_only_model=True)
    with pytest.raises(RuntimeError, match="without the optimizer state.*save_only_model=True"):
        again.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert lwf.global_step == 0 and lwf.history == []


def test_lwf_trainer_refuses_other_optimizers_up_front(tmp_path):
    def build(**kwargs):
        model = tiny_llama()
        lwf = LearningWithForgetting(None, None, make_samples(4), CONFIG)
        args = kwargs.pop("args", arguments(tmp_path, max_steps=2))
        return LWFTrainer(model=model, args=args, train_dataset=make_samples(16),
                          data_collator=collate, lwf=lwf, **kwargs)

    model = tiny_llama()
    with pytest.raises(TypeError, match="optimizers: LWF needs a .*FisherAdamW, got SGD"):
        build(optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None))
    with pytest.raises(TypeError, match="optimizer_cls_and_kwargs: .* got 'AdamW'"):
        build(optimizer_cls_and_kwargs=(torch.optim.AdamW, {"lr": 1e-3}))
    with pytest.raises(ValueError, match=r"args.optim='adafactor'"):
        build(args=arguments(tmp_path, max_steps=2, optim="adafactor"))
    with pytest.raises(ValueError, match="callbacks: LWFTrainer adds its own LWFCallback"):
        build(callbacks=[LWFCallback(LearningWithForgetting(None, None, make_samples(4)))])
    with pytest.raises(TypeError, match="lwf must be"):
        LWFTrainer(model=model, args=arguments(tmp_path), lwf=None)
    # A FisherAdamW given by the caller is used as it is.
    own = FisherAdamW(model.parameters(), lr=1e-3)
    trainer = LWFTrainer(model=model, args=arguments(tmp_path, max_steps=3, save_strategy="no"),
                         train_dataset=make_samples(16), data_collator=collate,
                         lwf=LearningWithForgetting(None, None, make_samples(4), CONFIG),
                         optimizers=(own, None))
    trainer.train()
    assert trainer.lwf.optimizer is own


def test_on_save_writes_only_where_it_should(tmp_path):
    callback = LWFCallback(LearningWithForgetting(None, None, make_samples(4), CONFIG))
    state = types.SimpleNamespace(global_step=4)
    (tmp_path / "checkpoint-4").mkdir()
    callback.on_save(types.SimpleNamespace(should_save=False, output_dir=str(tmp_path)), state,
                     None)
    assert not (tmp_path / "checkpoint-4" / STATE_FILE).exists()  # not the saving process
    with pytest.warns(UserWarning, match="checkpoint-7 does not exist"):
        callback.on_save(types.SimpleNamespace(should_save=True, output_dir=str(tmp_path)),
                         types.SimpleNamespace(global_step=7), None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        callback.on_save(types.SimpleNamespace(should_save=True, output_dir=str(tmp_path)), state,
                         None)
    saved = torch.load(tmp_path / "checkpoint-4" / STATE_FILE, weights_only=True)
    assert saved["global_step"] == 0 and saved["samples"]["count"] == 4


def test_max_steps_shorter_than_warmup_warns(tmp_path):
    model = tiny_llama(seed=0)
    lwf = LearningWithForgetting(None, None, make_samples(8, seed=7),
                                 LWFConfig(every=5, warmup=20, batch_size=4))
    trainer = LWFTrainer(model=model, args=arguments(tmp_path, max_steps=4,
                                                     save_strategy="no"),
                         train_dataset=make_samples(32, seed=2), data_collator=collate, lwf=lwf)
    with pytest.warns(UserWarning, match=r"never unlearn.*4 learning steps.*warmup=20"):
        trainer.train()
    assert lwf.history == []


def test_interleaved_schedule_in_the_trainer(tmp_path):
    """compute_loss adds the interleaved term: the run differs from plain fine-tuning only after
    warm-up, and no periodic phase runs."""
    def run(interleave):
        model = tiny_llama(seed=0)
        config = LWFConfig(interleave=interleave, interleave_weight=0.5, warmup=2, fraction=0.5,
                           batch_size=4, scores="random", forget_eval_size=0)
        lwf = LearningWithForgetting(None, None, make_samples(8, seed=7), config)
        trainer = LWFTrainer(model=model, args=arguments(tmp_path / str(interleave), max_steps=4,
                                                         save_strategy="no"),
                             train_dataset=make_samples(32, seed=2), data_collator=collate,
                             lwf=lwf)
        trainer.train()
        return model, lwf

    plain, _ = run(10**6)  # due only after 10^6 samples: never within the run
    mixed, lwf = run(2)
    assert not any("lwf/phase" in h for h in lwf.history)
    assert any(not torch.equal(a, b) for a, b in zip(plain.parameters(), mixed.parameters()))


def test_two_callbacks_on_one_lwf_are_refused_before_any_step(tmp_path):
    model = tiny_llama()
    lwf = LearningWithForgetting(None, None, make_samples(4), CONFIG)
    opt = FisherAdamW(model.parameters(), lr=1e-3)
    trainer = Trainer(model=model, args=arguments(tmp_path, max_steps=3, save_strategy="no"),
                      train_dataset=make_samples(16), data_collator=collate,
                      optimizers=(opt, None), callbacks=[LWFCallback(lwf), LWFCallback(lwf)])
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="two LWFCallbacks drive the same"):
        trainer.train()
    assert lwf.global_step == 0
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
