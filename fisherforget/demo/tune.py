"""The tuning half of the protocol: every method gets the same budget, on validation entities
with tuning seeds that are never reported.

For each method and each learning rate of the setting's sweep (the same sweep for every method,
AdamW included), fine-tune from each tuning seed's pre-trained model and record the validation
learning accuracy; the chosen lr of a method maximises its mean over the tuning seeds (ties: the
higher mean validation kept accuracy outside ``D_self``, then the smaller lr). The test entities
are never evaluated here.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

from fisherforget.demo.report import mean_std
from fisherforget.demo.train import Bench

TUNING_SEED_BASE = 100  # tuning seeds are 100, 101, ...; reported seeds are 0, 1, ...


def tune(bench: Bench, methods: Sequence[str], seeds: Sequence[int],
         log: Callable[[str], None] = print) -> dict:
    """Validation scores of every (method, lr) and the chosen lr of each method."""
    lrs = list(bench.setting.lrs)
    scores: dict[str, dict[str, list[dict]]] = {m: {str(lr): [] for lr in lrs} for m in methods}
    start = time.perf_counter()
    for seed in seeds:
        pre = bench.pretrain(seed, conflict=True)
        d_self, relations = bench.self_knowledge(pre, seed)
        for method in methods:
            for lr in lrs:
                result = bench.finetune(method, pre, d_self, relations, seed, lr, split="val")
                scores[method][str(lr)].append(
                    {"seed": seed, **{k: result["final"][k] for k in ("learn", "kept_outside")}})
        log(f"  [{bench.setting.world}] tuning seed {seed} done ({time.perf_counter() - start:.0f}s)")
    table: dict[str, dict[str, dict]] = {}
    chosen: dict[str, float] = {}
    for method in methods:
        table[method] = {
            lr: {"val_learn": mean_std([r["learn"] for r in rows])[0],
                 "val_kept_outside": mean_std([r["kept_outside"] for r in rows])[0]}
            for lr, rows in scores[method].items()}
        best = max(lrs, key=lambda lr: (table[method][str(lr)]["val_learn"],
                                        table[method][str(lr)]["val_kept_outside"], -lr))
        chosen[method] = best
    return {"seeds": list(seeds), "lrs": lrs, "validation": table, "chosen_lr": chosen,
            "wall_s": time.perf_counter() - start}
