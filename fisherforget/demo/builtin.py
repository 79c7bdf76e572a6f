"""The built-in benchmark's protocol: tune every method on validation entities with tuning seeds
(:mod:`fisherforget.demo.tune`), then run the reported seeds on test entities and report paired
differences against the tuned AdamW (:mod:`fisherforget.demo.report`).

Reported per setting: every method at its chosen lr, AdamW at *every* lr of the sweep (the
trade-off curve of the picture), and ``no_conflict`` (AdamW at AdamW's chosen lr, from the model
pre-trained without the forgetting relations). The baseline of the paired differences is AdamW at
its chosen lr.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from typing import Optional, Sequence

import torch

from fisherforget.demo import report
from fisherforget.demo.train import (
    LWF_METHODS,
    METHOD_COLORS,
    METHOD_LABELS,
    METHODS,
    Bench,
    Setting,
)
from fisherforget.demo.tune import TUNING_SEED_BASE, tune
from fisherforget.demo.world import conflict_world, rule_world

# The unlearning options are fixed per setting (not tuned: every method gets the same lr-sweep
# budget). conflict: the options the previous demo chose on validation; rule: the same schedule
# scaled to its 150 steps.
_CONFLICT_LWF = dict(every=20, steps=4, warmup=20, fraction=0.1, lr=3e-4, normalize=True,
                     scores="loss_change",
                     rescore_every=40, batch_size=16, score_batch_size=128)
_RULE_LWF = dict(every=15, steps=4, warmup=15, fraction=0.5, lr=1e-3, normalize=True,
                 scores="loss_change",
                 rescore_every=30, batch_size=32, score_batch_size=128)

SETTINGS = {
    "conflict": Setting("conflict", entities=480, values=16, hidden=64, layers=2, heads=4,
                        pretrain_steps=1000, pretrain_batch=64, pretrain_lr=3e-3, steps=200,
                        batch_size=32, eval_every=20, lrs=[3e-4, 6e-4, 1e-3, 2e-3],
                        lwf=_CONFLICT_LWF),
    "rule": Setting("rule", entities=256, values=32, hidden=32, layers=2, heads=4,
                    pretrain_steps=1500, pretrain_batch=128, pretrain_lr=3e-3, steps=150,
                    batch_size=32, eval_every=15, lrs=[1e-3, 3e-3, 1e-2], lwf=_RULE_LWF),
}
QUICK = Setting("conflict", entities=240, values=16, hidden=64, layers=2, heads=4,
                pretrain_steps=400, pretrain_batch=64, pretrain_lr=3e-3, steps=80,
                batch_size=32, eval_every=20, lrs=[3e-4, 1e-3],
                lwf=_CONFLICT_LWF)
# What `fisherforget demo` runs without --methods (the reported run adds the other variants).
DEFAULT_METHODS = ("adamw", "lwf", "retain_only", "oracle", "no_conflict")


def make_world(setting: Setting):
    if setting.world == "conflict":
        return conflict_world(setting.entities, setting.values)
    if setting.world == "rule":
        return rule_world(setting.entities, setting.values)
    raise ValueError(f"Invalid world: {setting.world!r} (must be 'conflict' or 'rule')")


def run_setting(name: str, setting: Setting, methods: list[str], seeds: list[int],
                tune_seeds: list[int], device, backend: str, cache: Optional[str],
                partial: Optional[str] = None) -> dict:
    """Tune, then run the reported seeds; after each seed the results so far are written to
    ``partial`` (when given), so that a run cut short still records what finished."""
    world = make_world(setting)
    bench = Bench(setting, world, device, backend=backend, cache=cache)
    print(f"[{name}] {world.n_entities} entities ({len(world.learn_train)} learning, "
          f"{len(world.self_entities)} D_self, {len(world.learn_val)} validation, "
          f"{len(world.learn_test)} test), tiny Llama {bench.n_params / 1e3:.0f}k params; "
          f"lr sweep {setting.lrs}; tuning seeds {tune_seeds}, reported seeds "
          f"{seeds[0]}..{seeds[-1]}")
    start = time.perf_counter()
    tuned_methods = [m for m in methods if m != "no_conflict"]
    if "adamw" not in tuned_methods:
        tuned_methods.insert(0, "adamw")
    tuning = tune(bench, tuned_methods, tune_seeds)
    for method in tuned_methods:
        cells = "  ".join(f"{lr}: {v['val_learn']:.3f}/{v['val_kept_outside']:.3f}"
                          for lr, v in tuning["validation"][method].items())
        print(f"  tuned {method:<14} -> lr {tuning['chosen_lr'][method]:g}   (val learn/kept "
              f"outside: {cells})")
    chosen = dict(tuning["chosen_lr"])
    chosen["no_conflict"] = chosen["adamw"]
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    sweep: dict[str, list[dict]] = {str(lr): [] for lr in setting.lrs}
    pretraining = []
    for seed in seeds:
        t = time.perf_counter()
        conflicted = bench.pretrain(seed, conflict=True)
        clean = bench.pretrain(seed, conflict=False) if "no_conflict" in methods else None
        d_self, relations = bench.self_knowledge(conflicted, seed)
        pretraining.append({"seed": seed, "conflicted": conflicted["accuracy"],
                            "clean": clean["accuracy"] if clean else None,
                            "cached": conflicted["cached"], "d_self": len(d_self)})
        for lr in setting.lrs:
            result = bench.finetune("adamw", conflicted, d_self, relations, seed, lr, "test")
            sweep[str(lr)].append(result)
            if lr == chosen["adamw"] and "adamw" in runs:
                runs["adamw"].append(result)
        for method in methods:
            if method == "adamw":
                continue
            source = clean if method == "no_conflict" else conflicted
            runs[method].append(bench.finetune(method, source, d_self, relations, seed,
                                               chosen[method], "test"))
        line = "  ".join(f"{m} {runs[m][-1]['final']['learn']:.2f}/"
                         f"{runs[m][-1]['final']['kept_outside']:.2f}" for m in methods)
        print(f"  [{name}] seed {seed} ({time.perf_counter() - t:.0f}s) learn/kept outside: "
              f"{line}")
        sys.stdout.flush()
        if partial:
            with open(partial + ".tmp", "w") as f:
                json.dump({"setting": name, "tuning": tuning, "chosen_lr": chosen,
                           "seeds_done": seeds[:len(pretraining)],
                           "paired": report.paired_list(name, runs, "adamw"),
                           "summary": report.summarize(runs)}, f, indent=1)
            os.replace(partial + ".tmp", partial)
    if partial and os.path.isfile(partial):
        os.remove(partial)  # the setting finished: its full result replaces the partial one
    summary = report.summarize(runs)
    pairs = report.paired_list(name, runs, "adamw")
    selection = report.selection_summary(runs.get("lwf", []))
    print()
    print(report.format_tables(name, summary, pairs, METHOD_LABELS, selection))
    print()
    return {
        "setting": {k: v for k, v in vars(setting).items()},
        "world": {"entities": world.n_entities, "values": world.n_values,
                  "learn_train": len(world.learn_train),
                  "d_self_entities": len(world.self_entities),
                  "val": len(world.learn_val), "test": len(world.learn_test),
                  "learn_relations": world.learn_relations,
                  "forget_relations": world.forget_relations,
                  "kept_relations": world.kept_relations},
        "params": bench.n_params, "tuning": tuning, "chosen_lr": chosen, "seeds": seeds,
        "pretraining": pretraining, "summary": summary, "paired": pairs,
        "selection": selection, "runs": runs, "adamw_sweep": sweep,
        "wall_s": time.perf_counter() - start,
    }


def settings_for(args) -> dict[str, Setting]:
    if args.quick:
        return {"conflict": copy.deepcopy(QUICK)}
    names = ["conflict", "rule"] if args.setting == "both" else [args.setting or "conflict"]
    out = {}
    for name in names:
        setting = copy.deepcopy(SETTINGS[name])
        if args.steps:
            setting.steps = args.steps
        if args.pretrain_steps:
            setting.pretrain_steps = args.pretrain_steps
        out[name] = setting
    return out


def parse_methods(text: str, known: Sequence[str] = METHODS) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in known]
    if unknown or not methods:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {','.join(known)}")
    return methods


def run_builtin(args) -> int:
    methods = parse_methods(args.methods or ",".join(DEFAULT_METHODS))
    settings = settings_for(args)
    n_seeds = args.seeds if args.seeds is not None else (1 if args.quick else 2)
    n_tune = args.tune_seeds if args.tune_seeds is not None else 1
    if n_seeds < 1 or n_tune < 1:
        raise SystemExit(f"--seeds and --tune-seeds must be >= 1 (got {n_seeds}, {n_tune})")
    seeds = list(range(n_seeds))
    tune_seeds = [TUNING_SEED_BASE + i for i in range(n_tune)]
    device = torch.device(args.device)
    cache = args.cache
    if cache is None:
        cache = (os.path.join(args.out, ".lwf_demo_cache") if args.out else os.path.join(
            os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "fisherforget",
            "demo"))
    elif cache == "none":
        cache = None
    env = report.environment(device)  # before the run: the commit and tree it starts from
    print(f"fisherforget demo: settings {', '.join(settings)}; {torch.get_num_threads()} "
          f"thread(s) on {device}; FisherAdamW backend {args.backend!r}")
    start = time.perf_counter()
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    jobs = [(name, s, methods, seeds, tune_seeds, device, args.backend, cache,
             os.path.join(args.out, f".partial_{name}.json") if args.out else None)
            for name, s in settings.items()]
    if args.jobs > 1 and len(jobs) > 1:
        # One process per setting (each single-threaded): the settings share nothing.
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(args.jobs, len(jobs)), mp_context=context,
                                 initializer=torch.set_num_threads,
                                 initargs=(torch.get_num_threads(),)) as pool:
            futures = [pool.submit(run_setting, *job) for job in jobs]
            results = {job[0]: f.result() for job, f in zip(jobs, futures)}
    else:
        results = {job[0]: run_setting(*job) for job in jobs}
    total = time.perf_counter() - start
    print(f"total wall time {total:.1f}s")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        name = "lwf_demo_quick" if args.quick else "lwf_demo"
        payload = {
            "benchmark": "fisherforget demo (built-in): tuned AdamW vs LWF and controls",
            "command": args.command_line,
            "methods": methods, "labels": {m: METHOD_LABELS[m] for m in methods},
            "lwf_methods": [m for m in methods if m in LWF_METHODS],
            "environment": env, "total_wall_s": total,
            "paired": [p for r in results.values() for p in r["paired"]],
            "settings": results,
        }
        path = os.path.join(args.out, f"{name}.json")
        with open(path, "w") as f:
            json.dump(payload, f, indent=1)
        png = os.path.join(args.out, f"{name}.png")
        report.plot(results, png, METHOD_LABELS, METHOD_COLORS)
        print(f"wrote {path} and {png}")
    return 0
