"""``fisherforget demo``: Learning With Forgetting on a built-in benchmark with negative transfer.

**The built-in benchmark** (no download; everything is generated here). A world of ``E`` entities
and three relations, each a random table entity -> value:

* ``R1`` and ``R2``: *kept knowledge*, pre-trained and never touched by the learning task;
* ``R3``: *conflicting knowledge*, pre-trained with values that differ from ``R1`` for every entity.

The *learning task* redefines ``R3``: "``e R3 =``" must now answer ``R1(e)``. It trains on half
the entities; a validation split (for every choice of hyperparameter) and a test split (reported)
are entities it never trains on, so solving them needs the *rule* ``R3 := R1``, not memorisation.
The *forgetting task* is the old ``R3`` (``e R3 =`` -> old value): the pre-trained answers on the
held-out entities compete with the rule, which is the negative transfer. The benchmark shows it: a
model pre-trained on ``R1, R2`` only learns the task better than one pre-trained with ``R3``.

A tiny ``transformers`` Llama is pre-trained on those facts (one per seed), then fine-tuned on the
learning task by each method from the same pre-trained weights:

``adamw``          plain ``torch.optim.AdamW``
``lwf``            ``FisherAdamW`` + LWF: unlearn the top-FC fraction of ``D_self`` periodically
``lwf_random``     control: the same unlearning budget on a random fraction of ``D_self``
``lwf_lowest``     control: the lowest-FC fraction
``lwf_early``      control: all the unlearning before fine-tuning (FC from a fresh gradient and
                   an empirical Fisher of the learning data)
``no_conflict``    AdamW from the model pre-trained *without* ``R3`` (the negative-transfer check)

``D_self`` is the conflicted model's own sampled answers to every ``e R3 =`` prompt (the
forgetting task's prompts; no learning-task label of a validation or test entity is used
anywhere). Reported per method (mean ± std over seeds): learning-task accuracy on test entities,
forgetting-task accuracy (old ``R3`` answers still produced on test entities), kept-knowledge
accuracy (``R1`` and ``R2`` on all entities) and wall time. Accuracy is exact match of the greedy
answer (computed teacher-forced, which for exact match is the same thing).

``--model PATH_OR_ID --learn FILE --forget FILE`` runs the comparison on a real pretrained causal
LM with JSONL prompt/response files instead (see :func:`run_pretrained`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

METHODS = ("adamw", "lwf", "lwf_random", "lwf_lowest", "lwf_early", "no_conflict")
METHOD_LABELS = {
    "adamw": "AdamW (no unlearning)",
    "lwf": "FisherAdamW + LWF (top FC)",
    "lwf_random": "LWF, random selection",
    "lwf_lowest": "LWF, lowest FC",
    "lwf_early": "LWF, early unlearning",
    "no_conflict": "AdamW, pre-trained without R3",
}

# LWF hyperparameters of the built-in benchmark, chosen with `fisherforget demo --tune` on the
# validation entities and tuning seeds disjoint from the reported ones (results in
# benchmarks/results/lwf_demo_tune.json).
DEFAULT_LWF = dict(every=20, steps=4, warmup=20, fraction=0.1, lr=3e-4, freeze_quantile=None,
                   fisher_scale=0.0, normalize=True, positive_only=False, rescore_every=20,
                   moments="separate", batch_size=16)


# ============================================================================ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    builtin = parser.add_argument_group("built-in benchmark")
    builtin.add_argument("--quick", action="store_true",
                         help="one seed, shorter training (CI smoke run, < 1 min)")
    builtin.add_argument("--seeds", type=int, default=None, help="seeds (default 3; quick: 1)")
    builtin.add_argument("--methods", default=",".join(METHODS),
                         help=f"comma-separated subset of {','.join(METHODS)}")
    builtin.add_argument("--entities", type=int, default=120)
    builtin.add_argument("--pretrain-steps", type=int, default=None)
    builtin.add_argument("--steps", type=int, default=None, help="fine-tuning steps")
    builtin.add_argument("--tune", action="store_true",
                         help="grid-search LWF hyperparameters on the validation split")
    common = parser.add_argument_group("both modes")
    common.add_argument("--out", default=None,
                        help="write results JSON (and the curves PNG) into this folder")
    common.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: tiny models gain nothing from more)")
    common.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    common.add_argument("--backend", default="auto", help="FisherAdamW backend (default auto)")
    real = parser.add_argument_group("a real pretrained model")
    real.add_argument("--model", default=None, help="path or hub id of a causal LM")
    real.add_argument("--gguf-file", default=None, help="GGUF file name inside --model")
    real.add_argument("--learn", default=None, help="learning task JSONL (prompt, response)")
    real.add_argument("--forget", default=None, help="forgetting task JSONL (prompt, response)")
    real.add_argument("--chat-template", action="store_true",
                      help="wrap prompts in the tokenizer's chat template")
    real.add_argument("--lr", type=float, default=None)
    real.add_argument("--unlearn-lr", type=float, default=None)
    real.add_argument("--batch-size", type=int, default=None)
    real.add_argument("--score-params", default=None,
                      help="regex of parameter names FC uses (default: all)")
    real.add_argument("--trainable", default=None,
                      help="regex of parameter names to fine-tune (default: all)")
    real.add_argument("--max-new-tokens", type=int, default=None)


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(max(1, args.threads))
    if args.model is not None:
        if not (args.learn and args.forget):
            raise SystemExit("--model needs --learn FILE and --forget FILE (JSONL prompt/response)")
        return run_pretrained(args)
    if args.learn or args.forget:
        raise SystemExit("--learn/--forget need --model")
    if args.tune:
        return run_tuning(args)
    return run_builtin(args)


# ============================================================================ the world


SPECIALS = ("<pad>", "<bos>", "<eos>", "=")
RELATIONS = ("R1", "R2", "R3")


@dataclass
class World:
    """Entities, relation tables, the learning-task splits and a word-level tokenizer."""

    n_entities: int
    n_values: int
    tables: dict[str, list[int]]
    learn_train: list[int]
    forget_only: list[int]
    learn_val: list[int]
    learn_test: list[int]
    words: list[str] = field(default_factory=list)

    @property
    def ids(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(self.words)}

    def prompt(self, entity: int, relation: str) -> str:
        return f"e{entity} {relation} ="

    def facts(self, relation: str, entities: Sequence[int],
              table: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``<bos> e R = v <eos>`` for each entity, ``v`` from ``table`` (default: the relation's
        own); labels cover ``v <eos>``."""
        ids = self.ids
        values = self.tables[table or relation]
        rows = [[ids["<bos>"], ids[f"e{e}"], ids[relation], ids["="], ids[f"v{values[e]}"],
                 ids["<eos>"]] for e in entities]
        x = torch.tensor(rows, dtype=torch.long)
        y = x.clone()
        y[:, :4] = -100
        return x, y


def build_world(n_entities: int = 120, n_values: int = 16, seed: int = 0) -> World:
    """Random relation tables (``R3(e) != R1(e)`` for every entity) and disjoint entity groups:
    2/5 learning-task training, 4/15 forgetting-task prompts, 2/15 validation, the rest test.
    Fixed by ``seed``."""
    if n_entities < 15:
        raise ValueError(f"--entities must be >= 15, got {n_entities}")
    rng = random.Random(seed)
    r1 = [rng.randrange(n_values) for _ in range(n_entities)]
    r2 = [rng.randrange(n_values) for _ in range(n_entities)]
    r3 = [(a + 1 + rng.randrange(n_values - 1)) % n_values for a in r1]  # never equal to R1
    order = list(range(n_entities))
    rng.shuffle(order)
    n_train, n_forget, n_val = 2 * n_entities // 5, 4 * n_entities // 15, 2 * n_entities // 15
    cuts = [0, n_train, n_train + n_forget, n_train + n_forget + n_val, n_entities]
    groups = [sorted(order[a:b]) for a, b in zip(cuts, cuts[1:])]
    words = (list(SPECIALS) + list(RELATIONS) + [f"v{i}" for i in range(n_values)]
             + [f"e{i}" for i in range(n_entities)])
    return World(n_entities, n_values, {"R1": r1, "R2": r2, "R3": r3}, *groups, words)


def word_tokenizer(words: Sequence[str]):
    """A ``transformers`` fast tokenizer over whitespace-separated ``words`` (BOS prepended)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>")


def tiny_llama(vocab_size: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
        tie_word_embeddings=False, attn_implementation="eager", bos_token_id=1, eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config)


# ============================================================================ training pieces


@torch.no_grad()
def exact_match(model, data: tuple[torch.Tensor, torch.Tensor], device) -> float:
    """Fraction of rows whose every labelled token is the argmax prediction (teacher-forced,
    which equals greedy decoding for exact match)."""
    x, y = data
    was_training = model.training
    model.eval()
    logits = model(input_ids=x.to(device)).logits[:, :-1]
    target = y[:, 1:].to(device)
    ok = ((logits.argmax(-1) == target) | (target == -100)).all(dim=1)
    model.train(was_training)
    return float(ok.float().mean())


def _minibatches(data: Sequence[tuple[torch.Tensor, torch.Tensor]], batch_size: int,
                 generator: torch.Generator):
    x = torch.cat([d[0] for d in data])
    y = torch.cat([d[1] for d in data])
    while True:
        idx = torch.randint(0, x.shape[0], (batch_size,), generator=generator)
        yield x[idx], y[idx]


def pretrain(world: World, seed: int, steps: int, with_conflict: bool, device) -> dict:
    """Pre-train a tiny Llama on the world's facts (``R3`` only ``with_conflict``)."""
    model = tiny_llama(len(world.words), seed).to(device)
    everyone = range(world.n_entities)
    data = [world.facts("R1", everyone), world.facts("R2", everyone)]
    if with_conflict:
        data.append(world.facts("R3", everyone))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps,
                                                pct_start=0.1)
    batches = _minibatches(data, 64, torch.Generator().manual_seed(seed))
    for _ in range(steps):
        x, y = next(batches)
        model(input_ids=x.to(device), labels=y.to(device)).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
    acc = {rel: exact_match(model, world.facts(rel, everyone), device) for rel in RELATIONS}
    return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "accuracy": acc}


def evaluate(model, world: World, split: str, device) -> dict[str, float]:
    """Learning-task, forgetting-task and kept-knowledge accuracy on ``split`` entities."""
    entities = world.learn_val if split == "val" else world.learn_test
    everyone = range(world.n_entities)
    kept = (exact_match(model, world.facts("R1", everyone), device)
            + exact_match(model, world.facts("R2", everyone), device)) / 2
    return {
        "learn": exact_match(model, world.facts("R3", entities, table="R1"), device),
        "forget": exact_match(model, world.facts("R3", entities), device),
        "kept": kept,
    }


def self_knowledge(model, world: World, seed: int, device) -> list[dict]:
    """``D_self``: the model's own sampled answers to every ``e R3 =`` prompt."""
    from fisherforget.lwf import encode_pairs, generate_self_knowledge

    tokenizer = word_tokenizer(world.words)
    prompts = [world.prompt(e, rel) for rel in RELATIONS for e in world.forget_only]
    pairs = generate_self_knowledge(model, tokenizer, prompts, max_new_tokens=2, batch_size=64,
                                    temperature=1.0, seed=seed, progress=False)
    return encode_pairs(tokenizer, pairs)


@dataclass
class FinetuneConfig:
    steps: int = 200
    lr: float = 3e-4
    batch_size: int = 32
    eval_every: int = 20
    lwf: dict = field(default_factory=lambda: dict(DEFAULT_LWF))


def finetune(method: str, world: World, pretrained: dict, forget_samples: list[dict],
             seed: int, cfg: FinetuneConfig, device, backend: str = "auto",
             split: str = "test") -> dict:
    """Fine-tune a copy of the pre-trained model on the learning task with ``method``; return the
    validation curves, the final metrics on ``split`` and the wall time."""
    from fisherforget import FisherAdamW
    from fisherforget.lwf import LearningWithForgetting, LWFConfig, collate

    model = tiny_llama(len(world.words), seed).to(device)
    model.load_state_dict(pretrained["state"])
    model.train()
    train_data = world.facts("R3", world.learn_train, table="R1")
    batches = _minibatches([train_data], cfg.batch_size, torch.Generator().manual_seed(1000 + seed))
    lwf = None
    if method in ("adamw", "no_conflict"):
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    else:
        # FisherAdamW with fisher_scale=0 and no thresholds steps exactly like AdamW while
        # learning; it only adds the Fisher (accumulated online) that protects the unlearning.
        opt = FisherAdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, fisher="ema",
                          fisher_beta=0.95, backend=backend)
        options = dict(cfg.lwf, seed=seed, forget_eval_size=0, backend=backend,
                       score_method="vmap")
        options["scores"] = {"lwf_random": "random", "lwf_lowest": "reversed"}.get(method, "fc")
        if method == "lwf_early":
            options.update(early=True, direction="fresh", fisher_source="empirical",
                           score_batches=4)
        learn_samples = [{"input_ids": x, "labels": y} for x, y in zip(*train_data)]
        learn_batches = [collate(learn_samples[i:i + 16]) for i in range(0, len(learn_samples), 16)]
        lwf = LearningWithForgetting(model, opt, forget_samples, LWFConfig(**options),
                                     learn_batches=learn_batches)
    # Which relations the selections picked (only R3 conflicts with the learning task).
    relation_of = [world.words[int(s["input_ids"][2])] for s in forget_samples]
    picked = {rel: 0 for rel in RELATIONS}

    def count_selection() -> None:
        if lwf is not None and lwf.last_scored == lwf.global_step and lwf.selected is not None:
            for i in lwf.selected.tolist():
                picked[relation_of[i]] += 1

    curve = [{"step": 0, **evaluate(model, world, "val", device)}]
    eval_time = 0.0
    start = time.perf_counter()
    if lwf is not None:
        lwf.begin(cfg.steps)
        count_selection()
    for step in range(1, cfg.steps + 1):
        x, y = next(batches)
        model(input_ids=x.to(device), labels=y.to(device)).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if lwf is not None and lwf.step() is not None:
            count_selection()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            t = time.perf_counter()
            curve.append({"step": step, **evaluate(model, world, "val", device)})
            eval_time += time.perf_counter() - t
    wall = time.perf_counter() - start - eval_time
    result = {"curve": curve, "final": evaluate(model, world, split, device), "wall_s": wall}
    if lwf is not None:
        result["lwf_phases"] = len(lwf.history)
        total = sum(picked.values())
        result["selected_relations"] = {rel: n / total for rel, n in picked.items()} if total else {}
        if lwf.fc is not None:
            result["fc"] = lwf.fc.stats()
    return result


# ============================================================================ the built-in run


def _settings(args) -> dict:
    quick = args.quick
    return dict(
        seeds=args.seeds if args.seeds is not None else (1 if quick else 3),
        pretrain_steps=args.pretrain_steps or (300 if quick else 500),
        steps=args.steps or (100 if quick else 200),
        entities=args.entities,
    )


def _environment(device) -> dict:
    import transformers

    import fisherforget

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=os.path.dirname(__file__), timeout=5).stdout.strip()
    except Exception:
        commit = ""
    return {"fisherforget": fisherforget.__version__, "commit": commit or None,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "device": str(device),
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarize(runs: dict[str, list[dict]]) -> dict[str, dict]:
    summary = {}
    for method, results in runs.items():
        row = {}
        for metric in ("learn", "forget", "kept"):
            row[metric] = _mean_std([r["final"][metric] for r in results])
        row["wall_s"] = _mean_std([r["wall_s"] for r in results])
        shares = [r["selected_relations"]["R3"] for r in results if r.get("selected_relations")]
        if shares:
            row["selected_R3"] = _mean_std(shares)
        summary[method] = row
    return summary


def format_table(summary: dict[str, dict], n_seeds: int) -> str:
    head = (f"{'method':<32} {'learning acc':>14} {'forgetting acc':>15} {'kept acc':>14} "
            f"{'wall s':>11} {'R3 share':>9}")
    lines = [head, "-" * len(head)]
    for method, row in summary.items():
        cells = [f"{row[m][0]:.3f} ± {row[m][1]:.3f}" for m in ("learn", "forget", "kept")]
        wall = f"{row['wall_s'][0]:.1f} ± {row['wall_s'][1]:.1f}"
        share = f"{row['selected_R3'][0]:.2f}" if "selected_R3" in row else "-"
        lines.append(f"{METHOD_LABELS.get(method, method):<32} {cells[0]:>14} {cells[1]:>15} "
                     f"{cells[2]:>14} {wall:>11} {share:>9}")
    lines.append(f"(mean ± std over {n_seeds} seed{'s' if n_seeds > 1 else ''}; learning and "
                 "forgetting accuracy on test entities, kept on all; R3 share: fraction of the "
                 "unlearned selections that were conflicting R3 samples, 1/3 of D_self)")
    return "\n".join(lines)


def plot_curves(runs: dict[str, list[dict]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for method, results in runs.items():
        steps = [p["step"] for p in results[0]["curve"]]
        for ax, metric in zip(axes, ("learn", "forget", "kept")):
            per_step = [[r["curve"][i][metric] for r in results] for i in range(len(steps))]
            mean = [sum(v) / len(v) for v in per_step]
            std = [_mean_std(v)[1] for v in per_step]
            ax.plot(steps, mean, label=METHOD_LABELS.get(method, method))
            ax.fill_between(steps, [m - s for m, s in zip(mean, std)],
                            [m + s for m, s in zip(mean, std)], alpha=0.15)
    titles = ("learning task (R3 := R1), validation entities",
              "forgetting task (old R3), validation entities", "kept knowledge (R1, R2)")
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("fine-tuning step")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("exact-match accuracy")
    axes[0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {','.join(METHODS)}")
    return methods


def run_builtin(args) -> int:
    settings = _settings(args)
    methods = _parse_methods(args.methods)
    device = torch.device(args.device)
    world = build_world(settings["entities"])
    cfg = FinetuneConfig(steps=settings["steps"])
    print(f"fisherforget demo: {world.n_entities} entities: {len(world.learn_train)} learning, "
          f"{len(world.forget_only)} forgetting prompts, {len(world.learn_val)} validation, "
          f"{len(world.learn_test)} test; "
          f"{settings['seeds']} seed(s), pre-training {settings['pretrain_steps']} steps, "
          f"fine-tuning {cfg.steps} steps, {torch.get_num_threads()} thread(s) on {device}")
    start = time.perf_counter()
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    pretraining = []
    for seed in range(settings["seeds"]):
        t = time.perf_counter()
        conflicted = pretrain(world, seed, settings["pretrain_steps"], True, device)
        clean = (pretrain(world, seed, settings["pretrain_steps"], False, device)
                 if "no_conflict" in methods else None)
        forget_samples = self_knowledge(_load(world, conflicted, seed, device), world, seed, device)
        pretraining.append({"seed": seed, "conflicted": conflicted["accuracy"],
                            "clean": clean["accuracy"] if clean else None,
                            "wall_s": time.perf_counter() - t, "d_self": len(forget_samples)})
        print(f"seed {seed}: pre-trained (R1/R2/R3 accuracy "
              f"{'/'.join(f'{v:.2f}' for v in conflicted['accuracy'].values())}) in "
              f"{time.perf_counter() - t:.1f}s; |D_self| = {len(forget_samples)}")
        for method in methods:
            source = clean if method == "no_conflict" else conflicted
            result = finetune(method, world, source, forget_samples, seed, cfg, device,
                              backend=args.backend)
            result["seed"] = seed
            runs[method].append(result)
            final = result["final"]
            print(f"  {method:<12} learn {final['learn']:.3f}  forget {final['forget']:.3f}  "
                  f"kept {final['kept']:.3f}  ({result['wall_s']:.1f}s)")
    summary = summarize(runs)
    total = time.perf_counter() - start
    print()
    print(format_table(summary, settings["seeds"]))
    print(f"total wall time {total:.1f}s")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        name = "lwf_demo_quick" if args.quick else "lwf_demo"
        payload = {
            "benchmark": "fisherforget demo (built-in): R3 := R1 with conflicting pre-trained R3",
            "settings": {**settings, "methods": methods, "finetune": vars(cfg),
                         "split_sizes": [len(world.learn_train), len(world.learn_val),
                                         len(world.learn_test)]},
            "environment": _environment(device),
            "total_wall_s": total,
            "pretraining": pretraining,
            "summary": {m: {k: {"mean": v[0], "std": v[1]} for k, v in row.items()}
                        for m, row in summary.items()},
            "runs": runs,
        }
        path = os.path.join(args.out, f"{name}.json")
        with open(path, "w") as f:
            json.dump(payload, f, indent=1)
        png = os.path.join(args.out, f"{name}_curves.png")
        plot_curves(runs, png)
        print(f"wrote {path} and {png}")
    return 0


def _load(world: World, pretrained: dict, seed: int, device):
    model = tiny_llama(len(world.words), seed).to(device)
    model.load_state_dict(pretrained["state"])
    return model


# ============================================================================ tuning


TUNING_GRID = {
    "lr": [1e-4, 3e-4, 1e-3, 3e-3],
    "steps": [2, 4, 8],
    "fraction": [0.1, 0.25, 0.5],
    "rescore_every": [None, 20],
    "positive_only": [False, True],
    "normalize": [False, True],
    "freeze_quantile": [None, 0.5, 0.9],
    "every": [10, 20, 40],
}


def run_tuning(args) -> int:
    """Coordinate search over the LWF grid on the *validation* entities, with tuning seeds
    (100, 101, ...) disjoint from the reported seeds. The test split is never evaluated."""
    settings = _settings(args)
    device = torch.device(args.device)
    world = build_world(settings["entities"])
    seeds = [100 + i for i in range(args.seeds or 3)]
    base = FinetuneConfig(steps=settings["steps"])
    prepared = []
    for seed in seeds:
        conflicted = pretrain(world, seed, settings["pretrain_steps"], True, device)
        samples = self_knowledge(_load(world, conflicted, seed, device), world, seed, device)
        prepared.append((seed, conflicted, samples))

    def score(options: dict) -> float:
        cfg = FinetuneConfig(steps=base.steps, lwf=options)
        values = [finetune("lwf", world, pre, samples, seed, cfg, device, args.backend,
                           split="val")["final"]["learn"] for seed, pre, samples in prepared]
        return sum(values) / len(values)

    current = dict(DEFAULT_LWF)
    trials = []
    best = score(current)
    trials.append({"options": dict(current), "val_learn": best})
    print(f"start {current}: validation learning accuracy {best:.3f}")
    for key, values in TUNING_GRID.items():
        tried = current[key]
        for value in values:
            if value == tried:
                continue
            candidate = dict(current, **{key: value})
            got = score(candidate)
            trials.append({"options": candidate, "val_learn": got})
            print(f"  {key}={value}: {got:.3f}")
            if got > best + 1e-9:
                best, current = got, candidate
        print(f"{key} -> {current[key]} (validation {best:.3f})")
    adamw = [finetune("adamw", world, pre, samples, seed, base, device,
                      split="val")["final"]["learn"] for seed, pre, samples in prepared]
    print(f"chosen {current}: validation {best:.3f}; "
          f"AdamW validation {sum(adamw) / len(adamw):.3f}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "lwf_demo_tune.json")
        with open(path, "w") as f:
            json.dump({"seeds": seeds,
                       "settings": {k: v for k, v in settings.items() if k != "seeds"},
                       "grid": TUNING_GRID,
                       "chosen": current, "val_learn_chosen": best,
                       "val_learn_adamw": sum(adamw) / len(adamw), "trials": trials,
                       "environment": _environment(device)}, f, indent=1)
        print(f"wrote {path}")
    return 0


# ============================================================================ a real model


def read_jsonl(path: str) -> list[dict]:
    """Prompt/response pairs from a JSONL file (one ``{"prompt": ..., "response": ...}`` a line)."""
    pairs = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SystemExit(f"{path}:{number}: not JSON ({exc})") from None
            if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) \
                    or not isinstance(item.get("response"), str):
                raise SystemExit(f"{path}:{number}: needs string fields 'prompt' and 'response'")
            pairs.append({"prompt": item["prompt"], "response": item["response"]})
    if not pairs:
        raise SystemExit(f"{path}: no prompt/response pairs")
    return pairs


@torch.no_grad()
def response_metrics(model, samples: Sequence[dict], batch_size: int, pad_id: int,
                     eos_id: Optional[int], device) -> dict[str, float]:
    """Exact match of the greedy answer on the response tokens (teacher-forced; a final EOS is
    not required) and the token-averaged NLL of the responses."""
    from fisherforget.fisher import batch_nll
    from fisherforget.lwf import batches_of

    was_training = model.training
    model.eval()
    hits, nll, tokens = 0, 0.0, 0
    for batch in batches_of(samples, batch_size, pad_id=pad_id, device=device):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        target = batch["labels"][:, 1:]
        count = int((target != -100).sum())
        nll += float(batch_nll(logits, batch["labels"])) * count
        tokens += count
        checked = target != -100
        if eos_id is not None:
            checked &= target != eos_id
        hits += int(((logits[:, :-1].argmax(-1) == target) | ~checked).all(dim=1).sum())
    model.train(was_training)
    return {"accuracy": hits / len(samples), "loss": nll / max(tokens, 1)}


def _split(items: list, seed: int, fractions=(0.6, 0.2, 0.2)) -> tuple[list, list, list]:
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_train = int(round(fractions[0] * len(items)))
    n_val = int(round(fractions[1] * len(items)))
    pick = lambda idx: [items[i] for i in idx]  # noqa: E731
    return (pick(order[:n_train]), pick(order[n_train:n_train + n_val]),
            pick(order[n_train + n_val:]))


def load_pretrained(name: str, gguf_file: Optional[str], device):
    """Tokenizer and fp32 causal LM from a path or hub id (a GGUF file via ``gguf_file``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(name, **extra)
    model_extra = dict(extra)
    if gguf_file:
        from transformers import GgufConfig

        # Fine-tuning needs dense weights: unpack every GGUF block into an fp32 tensor.
        model_extra["quantization_config"] = GgufConfig(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32, **model_extra)
    model = model.to(device)
    quantizer = getattr(model, "hf_quantizer", None)
    if gguf_file and quantizer is not None:
        if not getattr(quantizer.quantization_config, "dequantize", False):
            raise SystemExit(f"{gguf_file} was loaded with packed GGUF weights; cannot fine-tune")
        # Every weight is now an ordinary dense fp32 tensor; the quantizer left attached would
        # make Trainer refuse to fine-tune what is no longer a quantized model.
        model.hf_quantizer = None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, model


def run_pretrained(args) -> int:
    """LWF on a real pretrained causal LM: fine-tune on ``--learn`` (split 60/20/20 into train,
    validation and test), with ``D_self`` the model's own sampled answers to the ``--forget``
    prompts; compare AdamW, FisherAdamW + LWF (top FC) and LWF with random selection, each through
    ``transformers.Trainer`` from the same weights. Reported: learning-task exact match and loss
    on the test split, forgetting-task exact match and loss against the ``--forget`` reference
    answers, and wall time."""
    import re
    import tempfile

    from transformers import Trainer, TrainingArguments

    from fisherforget.lwf import (
        LearningWithForgetting,
        LWFConfig,
        LWFTrainer,
        collate,
        encode_pairs,
        generate_self_knowledge,
    )

    device = torch.device(args.device)
    methods = [m for m in _parse_methods(args.methods) if m in ("adamw", "lwf", "lwf_random",
                                                                 "lwf_lowest")]
    steps = args.steps or 60
    lr = args.lr or 2e-5
    batch_size = args.batch_size or 8
    seed = 0
    t0 = time.perf_counter()
    tokenizer, model = load_pretrained(args.model, args.gguf_file, device)
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    learn_train, learn_val, learn_test = _split(read_jsonl(args.learn), seed)
    forget = read_jsonl(args.forget)
    encode = lambda pairs: encode_pairs(tokenizer, pairs, chat_template=args.chat_template)  # noqa
    train_samples, test_samples = encode(learn_train), encode(learn_test)
    forget_reference = encode(forget)
    max_new = args.max_new_tokens or max(
        len(s["input_ids"]) - int((s["labels"] == -100).sum()) for s in forget_reference) + 2
    load_s = time.perf_counter() - t0
    t = time.perf_counter()
    pairs = generate_self_knowledge(model, tokenizer, [p["prompt"] for p in forget],
                                    max_new_tokens=max_new, batch_size=16, temperature=0.7,
                                    top_p=0.95, seed=seed, chat_template=args.chat_template)
    d_self = encode_pairs(tokenizer, pairs)
    generation_s = time.perf_counter() - t
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.model}{' / ' + args.gguf_file if args.gguf_file else ''}: {n_params / 1e6:.1f}M "
          f"params on {device}; learning {len(learn_train)}/{len(learn_val)}/{len(learn_test)} "
          f"(train/val/test), forgetting {len(forget)} prompts; |D_self| = {len(d_self)} "
          f"(generated in {generation_s:.0f}s); {steps} steps of {batch_size}, lr {lr}")
    for pair in pairs[:3]:
        print(f"  D_self: {pair['prompt']!r} -> {pair['response']!r}")

    def measure(m) -> dict:
        return {"learn": response_metrics(m, test_samples, 16, pad_id, eos_id, device),
                "forget": response_metrics(m, forget_reference, 16, pad_id, eos_id, device)}

    trainable = re.compile(args.trainable) if args.trainable else None
    score_params = None
    if args.score_params:
        pattern = re.compile(args.score_params)
        score_params = lambda name, p: bool(pattern.search(name)) and p.requires_grad  # noqa
    results: dict[str, Any] = {"before": measure(model)}
    print(f"  before fine-tuning: {results['before']}")
    lwf_options = dict(every=max(1, steps // 6), steps=2, warmup=max(1, steps // 6),
                       fraction=0.5, lr=args.unlearn_lr or lr, freeze_quantile=0.9,
                       moments="separate", batch_size=batch_size, forget_eval_size=32,
                       score_params=score_params, seed=seed, backend=args.backend)
    for method in methods:
        model.load_state_dict(base_state)
        for name, p in model.named_parameters():
            p.requires_grad_(trainable is None or bool(trainable.search(name)))
        with tempfile.TemporaryDirectory() as out:
            targs = TrainingArguments(
                output_dir=out, max_steps=steps, per_device_train_batch_size=batch_size,
                learning_rate=lr, lr_scheduler_type="constant", weight_decay=0.0,
                logging_steps=max(1, steps // 6), save_strategy="no", report_to=[], seed=seed,
                use_cpu=device.type == "cpu", disable_tqdm=True, remove_unused_columns=False,
                dataloader_num_workers=0)
            collator = lambda feats: collate(feats, pad_id)  # noqa: E731
            start = time.perf_counter()
            if method == "adamw":
                trainer = Trainer(model=model, args=targs, train_dataset=train_samples,
                                  data_collator=collator)
            else:
                options = dict(lwf_options)
                options["scores"] = {"lwf_random": "random", "lwf_lowest": "reversed"}.get(
                    method, "fc")
                lwf = LearningWithForgetting(None, None, d_self, LWFConfig(**options),
                                             pad_id=pad_id)
                trainer = LWFTrainer(model=model, args=targs, train_dataset=train_samples,
                                     data_collator=collator, lwf=lwf,
                                     fisher_kwargs={"fisher": "ema", "fisher_beta": 0.95,
                                                    "backend": args.backend})
            trainer.train()
            wall = time.perf_counter() - start
        metrics = measure(model)
        metrics["wall_s"] = wall
        metrics["log"] = [e for e in trainer.state.log_history if "lwf/phase" in e or "loss" in e]
        results[method] = metrics
        print(f"  {method:<11} learn acc {metrics['learn']['accuracy']:.3f} "
              f"(loss {metrics['learn']['loss']:.3f})  forget acc "
              f"{metrics['forget']['accuracy']:.3f} (loss {metrics['forget']['loss']:.3f})  "
              f"{wall:.0f}s")
    print()
    head = (f"{'method':<28} {'learn acc':>9} {'learn loss':>10} {'forget acc':>10} "
            f"{'forget loss':>11} {'wall s':>7}")
    print(head)
    print("-" * len(head))
    for method in ["before"] + methods:
        r = results[method]
        label = METHOD_LABELS.get(method, "pre-trained model")
        print(f"{label:<28} {r['learn']['accuracy']:>9.3f} "
              f"{r['learn']['loss']:>10.3f} {r['forget']['accuracy']:>10.3f} "
              f"{r['forget']['loss']:>11.3f} {r.get('wall_s', 0.0):>7.0f}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "lwf_pretrained.json")
        with open(path, "w") as f:
            json.dump({"model": args.model, "gguf_file": args.gguf_file, "learn": args.learn,
                       "forget": args.forget, "steps": steps, "lr": lr, "batch_size": batch_size,
                       "lwf": {k: v for k, v in lwf_options.items() if k != "score_params"},
                       "score_params": args.score_params, "trainable": args.trainable,
                       "sizes": {"learn": [len(learn_train), len(learn_val), len(learn_test)],
                                 "forget": len(forget), "d_self": len(d_self)},
                       "d_self_examples": [{k: p[k] for k in ("prompt", "response")}
                                           for p in pairs[:10]],
                       "load_s": load_s, "generation_s": generation_s,
                       "environment": _environment(device), "results": results}, f, indent=1)
        print(f"wrote {path}")
    return 0
