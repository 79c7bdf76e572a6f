"""``fisherforget demo``: does Learning With Forgetting beat a tuned AdamW? A fair, paired test.

Built-in (no download; everything is generated here): two settings, each with a tiny
``transformers`` Llama pre-trained here and then fine-tuned by every method from the same weights:

* ``conflict``: pre-trained facts conflict with the learning task (:mod:`.world`);
* ``rule``: pre-trained rules unrelated to the learning task cost plasticity (:mod:`.world`).

Protocol: every method (AdamW, LWF and its controls, :mod:`.train`) gets the same lr sweep on
validation entities with tuning seeds (:mod:`.tune`); the reported seeds then run on test
entities, and each method is compared with AdamW at its tuned lr by paired per-seed differences
with 95% t-intervals, on learning accuracy, kept accuracy and kept accuracy outside ``D_self``
(:mod:`.report`). FisherAdamW runs the backend a user gets (``auto``: the native CPU kernels on
CPU); a result reproduces exactly on the same CPU and vector ISA.

``--model PATH --learn FILE --forget FILE`` runs the comparison on a real causal LM
(:mod:`.pretrained`).

Parts: :mod:`.world` (the generated worlds), :mod:`.train` (pre-training, methods, metrics),
:mod:`.tune` (the tuning budget), :mod:`.report` (statistics, tables, plot), :mod:`.builtin` (the
protocol), :mod:`.pretrained` (a real model).
"""

from __future__ import annotations

import argparse

import torch

from fisherforget.demo.train import METHOD_LABELS, METHODS  # noqa: F401  (public names)
from fisherforget.demo.world import conflict_world, rule_world, word_tokenizer  # noqa: F401


def add_arguments(parser: argparse.ArgumentParser) -> None:
    builtin = parser.add_argument_group("built-in benchmark")
    builtin.add_argument("--quick", action="store_true",
                         help="small conflict setting, 1 tuning seed, 1 seed (< 1 min)")
    builtin.add_argument("--setting", choices=("conflict", "rule", "both"), default=None,
                         help="default conflict (the reported run uses both)")
    builtin.add_argument("--seeds", type=int, default=None,
                         help="reported seeds 0..N-1 (default 2; quick: 1)")
    builtin.add_argument("--tune-seeds", type=int, default=None,
                         help="tuning seeds 100..100+N-1 (default 1)")
    builtin.add_argument("--methods", default=None,
                         help=f"comma-separated subset of {','.join(METHODS)} (default: "
                              "adamw,lwf,retain_only,oracle,no_conflict)")
    builtin.add_argument("--jobs", type=int, default=1,
                         help="run the settings in this many processes (one thread each)")
    builtin.add_argument("--pretrain-steps", type=int, default=None)
    builtin.add_argument("--steps", type=int, default=None, help="fine-tuning steps")
    builtin.add_argument("--cache", default=None,
                         help="folder for pre-trained weights per seed (default: "
                              "OUT/.lwf_demo_cache with --out, else ~/.cache/fisherforget/demo; "
                              "'none' disables it)")
    common = parser.add_argument_group("both modes")
    common.add_argument("--out", default=None,
                        help="write results JSON (and the PNG) into this folder")
    common.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: tiny models gain nothing from more)")
    common.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    common.add_argument("--backend", default="auto",
                        help="FisherAdamW backend (default auto, what a user gets: the native "
                             "CPU kernels on CPU; results reproduce on the same CPU and ISA)")
    real = parser.add_argument_group("a real pretrained model")
    real.add_argument("--model", default=None, help="path or hub id of a causal LM")
    real.add_argument("--gguf-file", default=None, help="GGUF file name inside --model")
    real.add_argument("--learn", default=None, help="learning task JSONL (prompt, response)")
    real.add_argument("--forget", default=None, help="forgetting task JSONL (prompt, response)")
    real.add_argument("--forget-size", type=int, default=None,
                      help="use a seeded subsample of this many forgetting prompts")
    real.add_argument("--kept", default=None,
                      help="general-knowledge JSONL (prompt, reference answer): kept accuracy "
                           "on the questions answered correctly before fine-tuning")
    real.add_argument("--kept-size", type=int, default=64,
                      help="at most this many kept questions (a seeded subsample)")
    real.add_argument("--kept-new-tokens", type=int, default=24,
                      help="greedy answer length for the kept questions")
    real.add_argument("--tune-only", action="store_true",
                      help="stop after the lr sweep on validation (a pilot)")
    real.add_argument("--chat-template", action="store_true",
                      help="wrap prompts in the tokenizer's chat template")
    real.add_argument("--lr", type=float, default=None,
                      help="learning rate (default: tune over --lrs on validation)")
    real.add_argument("--lrs", default=None, help="comma-separated lr sweep (real model)")
    real.add_argument("--unlearn-lr", type=float, default=None)
    real.add_argument("--batch-size", type=int, default=None)
    real.add_argument("--score-params", default=None,
                      help="regex of parameter names FC uses (default: all trainable)")
    real.add_argument("--trainable", default=None,
                      help="regex of parameter names to fine-tune (default: all)")
    real.add_argument("--lora", type=int, default=None,
                      help="fine-tune a peft LoRA adapter of this rank instead of all weights")
    real.add_argument("--lora-layers", type=int, default=None,
                      help="with --lora: adapt only the last N transformer blocks")
    real.add_argument("--max-new-tokens", type=int, default=None)
    real.add_argument("--state", default=None,
                      help="JSON file of finished (method, seed) runs: resume from it")


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(max(1, args.threads))
    if args.model is not None:
        if not (args.learn and args.forget):
            raise SystemExit("--model needs --learn FILE and --forget FILE (JSONL prompt/response)")
        from fisherforget.demo.pretrained import run_pretrained

        return run_pretrained(args)
    if args.learn or args.forget:
        raise SystemExit("--learn/--forget need --model")
    from fisherforget.demo.builtin import run_builtin

    return run_builtin(args)
