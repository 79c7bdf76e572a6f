"""FisherAdamW + LWF on a ``peft`` LoRA model: scoring and unlearning see the adapter only, and
``LWFTrainer`` saves and resumes the adapter exactly."""

import os

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from transformers import TrainingArguments  # noqa: E402

from fisherforget import FisherAdamW  # noqa: E402
from fisherforget.fisher import IGNORE_INDEX  # noqa: E402
from fisherforget.lwf import (  # noqa: E402
    SCORE_METHODS,
    LearningWithForgetting,
    LWFConfig,
    LWFTrainer,
    batches_of,
    collate,
    forgetting_confidence,
    optimizer_direction,
    optimizer_fisher,
)
from fisherforget.lwf.trainer import STATE_FILE  # noqa: E402
from lwf_testing import learn_batches, make_samples, tiny_llama  # noqa: E402


def lora_model(seed=0):
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                             target_modules=["q_proj", "v_proj", "down_proj"])
    model = peft.get_peft_model(tiny_llama(seed), config)
    with torch.no_grad():  # B = 0 at init would make every first gradient of A vanish
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def adapter(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", SCORE_METHODS)
def test_scoring_and_unlearning_touch_the_adapter_only(method):
    model = lora_model()
    trainable = adapter(model)
    assert trainable and all("lora_" in n for n in trainable)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = FisherAdamW(trainable.values(), lr=1e-2, fisher="ema", fisher_beta=0.9)
    for batch in learn_batches(3):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    samples = make_samples(6, seed=4)
    params = list(trainable.values())
    direction, fisher = optimizer_direction(opt, params), optimizer_fisher(opt, params)
    scores = forgetting_confidence(model, batches_of(samples, 3), fisher, direction=direction,
                                   eta=0.5, method=method)
    # Brute force: each sample's gradient with respect to the adapter, one autograd call each.
    expected = []
    for sample in samples:
        logits = model(input_ids=sample["input_ids"][None]).logits[0, :-1]
        loss = torch.nn.functional.cross_entropy(logits, sample["labels"][1:],
                                                 ignore_index=IGNORE_INDEX)
        grads = torch.autograd.grad(loss, params)
        first = sum((d.double() * g.double()).sum() for d, g in zip(direction, grads))
        second = sum((f.double() * g.double() ** 2).sum() for f, g in zip(fisher, grads))
        expected.append(-(0.5 * first + 0.125 * second))
    torch.testing.assert_close(scores.fc, torch.stack(expected), rtol=2e-4, atol=1e-9)

    lwf = LearningWithForgetting(model, opt, samples,
                                 LWFConfig(every=1, steps=3, fraction=0.5, lr=1e-2, batch_size=4,
                                           score_method=method))
    before = {n: p.detach().clone() for n, p in trainable.items()}
    lwf.begin()
    stats = lwf.step()
    assert stats["lwf/unlearn_steps"] == 3 and "lwf/retain_loss" in stats
    for n, p in model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), n  # frozen base weights never move
    assert any(not torch.equal(p, before[n]) for n, p in trainable.items())


def test_lwf_trainer_saves_and_resumes_a_lora_adapter(tmp_path):
    def trainer(out):
        model = lora_model()
        lwf = LearningWithForgetting(None, None, make_samples(12, seed=7),
                                     LWFConfig(every=3, steps=2, warmup=2, fraction=0.5, lr=2e-3,
                                               batch_size=4, score_method="vmap"))
        args = TrainingArguments(output_dir=str(out), max_steps=8, per_device_train_batch_size=4,
                                 learning_rate=3e-3, logging_steps=1, save_strategy="steps",
                                 save_steps=4, report_to=[], use_cpu=True, seed=0, data_seed=0,
                                 disable_tqdm=True, dataloader_num_workers=0,
                                 remove_unused_columns=False)
        return LWFTrainer(model=model, args=args, train_dataset=make_samples(48, seed=2),
                          data_collator=collate, lwf=lwf), lwf

    full, full_lwf = trainer(tmp_path / "full")
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-4"
    assert os.path.isfile(checkpoint / STATE_FILE)
    assert os.path.isfile(checkpoint / "adapter_model.safetensors")  # the adapter, not the base
    assert full_lwf.history and all("lwf/retain_loss" in h for h in full_lwf.history)
    resumed, resumed_lwf = trainer(tmp_path / "resumed")
    torch.manual_seed(321)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed_lwf.history == full_lwf.history
    for (n, a), b in zip(adapter(full.model).items(), adapter(resumed.model).values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
