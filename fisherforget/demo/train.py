"""Pre-training, self-knowledge, fine-tuning by each method, and the metrics, for the built-in
worlds (:mod:`fisherforget.demo.world`).

One tiny ``transformers`` Llama is built per setting and reused: each seed's initial weights are
drawn into it (:func:`init_weights`) and every fine-tuning run starts by loading the pre-trained
weights into it, so nothing is rebuilt. Pre-trained weights are cached per (setting, seed,
conflict) under a cache folder, keyed by everything they depend on.

Methods (all fine-tune on the same batches, seeded by the run's seed):

``adamw``            ``torch.optim.AdamW`` (lr swept and tuned, see :mod:`fisherforget.demo.tune`)
``lwf``              ``FisherAdamW`` + LWF: every ``every`` steps, ``steps`` unlearning steps, each
                     ascending on the top-FC ``fraction`` of ``D_self`` and descending on the rest
``lwf_fc``           the same with the paper's forgetting confidence (``scores="fc"``) instead
                     of the loss-change scorer the built-in settings were tuned with
``lwf_overlap``      the same with the ``fisher_overlap`` scorer instead of FC
``lwf_no_retain``    the same without the retain term (pure gradient ascent)
``retain_only``      control: the same schedule with the ascent removed (plain rehearsal of
                     ``D_self``'s unselected part)
``oracle``           control: ascent on the true forgetting-task facts of the ``D_self`` entities
                     (instead of a selection from ``D_self``), retaining ``D_self``'s other samples
``no_conflict``      AdamW from the model pre-trained *without* the forgetting relations (how much
                     the negative transfer costs; not a competitor)
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch

from fisherforget.demo.world import World, word_tokenizer

METHODS = ("adamw", "lwf", "lwf_fc", "lwf_overlap", "lwf_no_retain", "retain_only", "oracle",
           "no_conflict")
METHOD_LABELS = {
    "adamw": "AdamW (tuned lr)",
    "lwf": "FisherAdamW + LWF (top FC, retain)",
    "lwf_fc": "LWF, paper FC scorer (retain)",
    "lwf_overlap": "LWF, fisher_overlap scorer (retain)",
    "lwf_no_retain": "LWF without retain (ascent only)",
    "retain_only": "retain only (rehearsal, no ascent)",
    "oracle": "oracle (ascent on true forget facts)",
    "no_conflict": "AdamW, pre-trained without conflict",
}
LWF_METHODS = ("lwf", "lwf_fc", "lwf_overlap", "lwf_no_retain", "retain_only", "oracle")
METHOD_COLORS = {"adamw": "black", "lwf": "tab:blue", "lwf_fc": "tab:brown",
                 "lwf_overlap": "tab:cyan",
                 "lwf_no_retain": "tab:orange", "retain_only": "tab:green", "oracle": "tab:red",
                 "no_conflict": "tab:purple"}
SCORERS = ("loss_change", "fisher_alignment", "fisher_overlap")
# Bump when the pre-training code changes, so that cached weights are not reused.
PRETRAIN_VERSION = 2


@dataclass
class Setting:
    """Everything one built-in setting depends on (world, model, pre-training, fine-tuning)."""

    world: str  # "conflict" or "rule"
    entities: int
    values: int
    hidden: int
    layers: int
    heads: int
    pretrain_steps: int
    pretrain_batch: int
    pretrain_lr: float
    steps: int
    batch_size: int
    eval_every: int
    lrs: list[float]  # the learning-rate sweep every method gets
    lwf: dict[str, Any] = field(default_factory=dict)  # LWFConfig options (unlearning)
    max_self: int = 384  # D_self is subsampled to at most this many samples

    def key(self) -> str:
        text = json.dumps({k: v for k, v in asdict(self).items()
                           if k not in ("steps", "batch_size", "eval_every", "lrs", "lwf")},
                          sort_keys=True)
        text = f"{text}|{PRETRAIN_VERSION}|{torch.__version__}"
        return hashlib.sha1(text.encode()).hexdigest()[:12]


class Bench:
    """One setting's world and its single reusable model."""

    def __init__(self, setting: Setting, world: World, device, backend: str = "auto",
                 cache: Optional[str] = None):
        from transformers import LlamaConfig, LlamaForCausalLM

        self.setting, self.world, self.device, self.backend = setting, world, device, backend
        self.cache = cache
        config = LlamaConfig(
            vocab_size=len(world.words), hidden_size=setting.hidden,
            intermediate_size=2 * setting.hidden, num_hidden_layers=setting.layers,
            num_attention_heads=setting.heads, num_key_value_heads=max(1, setting.heads // 2),
            max_position_embeddings=8, tie_word_embeddings=False, attn_implementation="eager",
            bos_token_id=1, eos_token_id=2, pad_token_id=0)
        self.model = LlamaForCausalLM(config).to(device)
        self.tokenizer = word_tokenizer(world.words)
        # Evaluation sets are fixed: build them once.
        w = world
        everyone = range(w.n_entities)
        self.eval_sets = {
            "val": {"learn": w.learn_data(w.learn_val), "forget": w.forget_data(w.learn_val)},
            "test": {"learn": w.learn_data(w.learn_test), "forget": w.forget_data(w.learn_test)},
        }
        self.kept_sets = {"kept": w.kept_data(everyone),
                          "kept_outside": w.kept_data(w.outside_self)}

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def load(self, state: dict) -> torch.nn.Module:
        self.model.load_state_dict(state)
        self.model.train()
        return self.model

    # ------------------------------------------------------------------ metrics

    @torch.no_grad()
    def exact_match(self, data) -> float:
        """Fraction of rows whose every labelled token is the argmax prediction (teacher-forced,
        which equals greedy decoding for exact match)."""
        x, y = data
        model = self.model
        was_training = model.training
        model.eval()
        logits = model(input_ids=x.to(self.device)).logits[:, :-1]
        target = y[:, 1:].to(self.device)
        ok = ((logits.argmax(-1) == target) | (target == -100)).all(dim=1)
        model.train(was_training)
        return float(ok.float().mean())

    def evaluate(self, split: str) -> dict[str, float]:
        """Learning-task and forgetting-task accuracy on ``split`` entities; kept-knowledge
        accuracy on all entities and on those outside ``D_self``."""
        out = {name: self.exact_match(data) for name, data in self.eval_sets[split].items()}
        out.update({name: self.exact_match(data) for name, data in self.kept_sets.items()})
        return out

    # ------------------------------------------------------------------ pre-training

    def init_weights(self, seed: int) -> None:
        """Seeded initial weights, as ``LlamaForCausalLM``'s own init (normal(0, 0.02) for
        matrices, ones for the RMSNorm gains), without rebuilding the model."""
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, p in sorted(self.model.named_parameters()):
                if p.dim() >= 2:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
                else:
                    p.fill_(1.0)

    def pretrain(self, seed: int, conflict: bool) -> dict:
        """Pre-train on the world's facts (the forgetting relations only with ``conflict``);
        cached under ``cache`` when given."""
        path = None
        if self.cache:
            path = os.path.join(self.cache, f"{self.setting.world}-{self.setting.key()}-s{seed}-"
                                            f"{'conflict' if conflict else 'clean'}.pt")
            if os.path.isfile(path):
                cached = torch.load(path, weights_only=False)
                self.load(cached["state"])
                return {**cached, "cached": True}
        s, w = self.setting, self.world
        start = time.perf_counter()
        self.init_weights(seed)
        model = self.model
        model.train()
        relations = w.pretrain_relations if conflict else w.clean_relations
        x, y = w.many(relations, range(w.n_entities))
        opt = torch.optim.AdamW(model.parameters(), lr=s.pretrain_lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=s.pretrain_lr,
                                                    total_steps=s.pretrain_steps, pct_start=0.1)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(s.pretrain_steps):
            idx = torch.randint(0, x.shape[0], (s.pretrain_batch,), generator=gen)
            model(input_ids=x[idx].to(self.device), labels=y[idx].to(self.device)).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
        accuracy = {r: self.exact_match(w.facts(r, range(w.n_entities)))
                    for r in w.pretrain_relations}
        out = {"state": {k: v.detach().clone() for k, v in model.state_dict().items()},
               "accuracy": accuracy, "wall_s": time.perf_counter() - start}
        if path:
            os.makedirs(self.cache, exist_ok=True)
            ignore = os.path.join(self.cache, ".gitignore")
            if not os.path.isfile(ignore):  # a cache inside a checkout stays out of git
                with open(ignore, "w") as f:
                    f.write("*\n")
            torch.save(out, path + ".tmp")
            os.replace(path + ".tmp", path)
        return {**out, "cached": False}

    def self_knowledge(self, pretrained: dict, seed: int) -> tuple[list[dict], list[str]]:
        """``D_self``: the pre-trained model's own sampled answers to the self-knowledge prompts
        (``world.self_relations`` of the ``D_self`` entities), at most ``max_self`` of them (a
        seeded subsample); returns the samples and each one's relation."""
        import random

        from fisherforget.lwf import encode_pairs, generate_self_knowledge

        w = self.world
        prompts = [(rel, w.prompt(e, rel)) for rel in w.self_relations for e in w.self_entities]
        if len(prompts) > self.setting.max_self:
            prompts = random.Random(seed).sample(prompts, self.setting.max_self)
        self.load(pretrained["state"])
        pairs = generate_self_knowledge(self.model, self.tokenizer, [p for _, p in prompts],
                                        max_new_tokens=2, batch_size=128, temperature=1.0,
                                        seed=seed, progress=False)
        return encode_pairs(self.tokenizer, pairs), [rel for rel, _ in prompts]

    # ------------------------------------------------------------------ fine-tuning

    def finetune(self, method: str, pretrained: dict, d_self: list[dict], relations: list[str],
                 seed: int, lr: float, split: str) -> dict:
        """Fine-tune from ``pretrained`` with ``method`` at learning rate ``lr``; return the
        validation curve, the final metrics on ``split`` and the wall time."""
        from fisherforget import FisherAdamW
        from fisherforget.lwf import LearningWithForgetting, LWFConfig

        s, w = self.setting, self.world
        model = self.load(pretrained["state"])
        x, y = w.learn_data(w.learn_train)
        gen = torch.Generator().manual_seed(1000 + seed)
        lwf = None
        if method in ("adamw", "no_conflict"):
            opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        elif method in LWF_METHODS:
            # fisher_scale=0 and no thresholds: FisherAdamW steps exactly like AdamW while
            # learning; it adds the online Fisher that FC and the unlearning use.
            opt = FisherAdamW(model.parameters(), lr=lr, weight_decay=0.01, fisher="ema",
                              fisher_beta=0.95, backend=self.backend)
            options = dict(s.lwf, seed=seed, forget_eval_size=0, backend=self.backend,
                           score_method="vmap")
            samples = d_self
            if method == "lwf_no_retain":
                options["retain"] = None
            elif method == "lwf_overlap":
                options["scores"] = "fisher_overlap"
            elif method == "lwf_fc":
                options["scores"] = "fc"
            elif method == "retain_only":
                options["ascent"] = False
            if method == "oracle":
                samples, selected = self._oracle_samples(d_self, relations)
                lwf = FixedSelection(model, opt, samples, LWFConfig(**options), selected=selected)
            else:
                lwf = LearningWithForgetting(model, opt, samples, LWFConfig(**options))
        else:
            raise ValueError(f"Invalid method: {method!r} (must be one of {METHODS})")
        curve = [{"step": 0, **self.evaluate("val")}]
        selection: Optional[dict] = None
        eval_time = 0.0
        start = time.perf_counter()
        if lwf is not None:
            lwf.begin(s.steps)
        for step in range(1, s.steps + 1):
            idx = torch.randint(0, x.shape[0], (s.batch_size,), generator=gen)
            model(input_ids=x[idx].to(self.device), labels=y[idx].to(self.device)).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if lwf is not None and lwf.step() is not None and selection is None and \
                    method == "lwf" and lwf.fc is not None:
                selection = selection_quality(lwf.fc, relations, w.forget_relations,
                                              int(lwf.selected.numel()))
            if step % s.eval_every == 0 or step == s.steps:
                t = time.perf_counter()
                curve.append({"step": step, **self.evaluate("val")})
                eval_time += time.perf_counter() - t
        wall = time.perf_counter() - start - eval_time
        result = {"method": method, "seed": seed, "lr": lr, "split": split, "curve": curve,
                  "final": self.evaluate(split), "wall_s": wall}
        if lwf is not None:
            result["lwf_phases"] = len(lwf.history)
            last = lwf.history[-1] if lwf.history else {}
            result["last_phase"] = {k: v for k, v in last.items() if k != "step"}
        if selection is not None:
            result["selection"] = selection
        return result

    def _oracle_samples(self, d_self: list[dict], relations: list[str]):
        """The true forgetting-task facts of the ``D_self`` entities (to ascend on) followed by
        the ``D_self`` samples of the other relations (to retain); the selection is the first
        part."""
        w = self.world
        x, y = w.forget_data(w.self_entities)
        truth = [{"input_ids": a, "labels": b} for a, b in zip(x, y)]
        rest = [s for s, r in zip(d_self, relations) if r not in w.forget_relations]
        return truth + rest, torch.arange(len(truth))


class FixedSelection:
    """An LWF helper whose selection is given (the oracle control), not scored."""

    def __new__(cls, model, opt, samples, config, *, selected: torch.Tensor):
        from fisherforget.lwf import LearningWithForgetting

        class _Fixed(LearningWithForgetting):
            def rescore(self) -> dict[str, float]:
                ranking = torch.zeros(len(self.samples), dtype=torch.float64)
                ranking[selected] = 1.0
                self.fc, self.ranking, self.selected = None, ranking, selected.clone()
                self.retain_pool = self._retain_pool(ranking, self.selected)
                self._order, self._cursor = None, 0
                self.last_scored = self.global_step
                return {"selected": float(selected.numel())}

        return _Fixed(model, opt, samples, config)


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Probability that a random positive outranks a random negative (ties count 1/2), by
    direct comparison of every pair."""
    pos, neg = scores[positive], scores[~positive]
    if pos.numel() == 0 or neg.numel() == 0:
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


def selection_quality(fc, relations: list[str], forget_relations: list[str], k: int) -> dict:
    """For each scorer: precision@k of its top ``k`` and of its bottom ``k`` (the fraction that
    are forgetting-relation samples) and AUROC (< 0.5: the positives sit at the bottom)."""
    positive = torch.tensor([r in forget_relations for r in relations])
    out = {"k": k, "base_rate": float(positive.double().mean())}
    for kind in SCORERS:
        score = fc.ranking(kind)
        order = torch.sort(score, descending=True, stable=True).indices
        out[kind] = {"precision_top": float(positive[order[:k]].double().mean()),
                     "precision_bottom": float(positive[order[-k:]].double().mean()),
                     "auroc": auroc(score, positive)}
    first, second = fc.term("direction").abs(), fc.term("fisher_sq")
    ratio = 0.5 * fc.eta * second / torch.where(first > 0, first, torch.ones_like(first))
    out["quadratic_over_linear_max"] = float(ratio.max())
    return out
