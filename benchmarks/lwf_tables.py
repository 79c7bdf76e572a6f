"""Markdown tables of a ``fisherforget demo`` result file (what README.md and docs/lwf.md quote).

    python benchmarks/lwf_tables.py [benchmarks/results/lwf_demo.json]
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def tables(path: str) -> str:
    with open(path) as f:
        result = json.load(f)
    labels = result["labels"]
    env = result["environment"]
    out = [f"Result file `{os.path.relpath(path, os.path.dirname(HERE))}`: commit "
           f"`{(env['commit'] or '?')[:10]}`, {env['cpu']} ({env['cpu_count']} cores), "
           f"{env['torch_threads']} torch thread, torch {env['torch']}, total wall "
           f"{result['total_wall_s'] / 60:.0f} min; command `{result['command']}`.", ""]
    for name, setting in result["settings"].items():
        w = setting["world"]
        out.append(f"**{name}** ({w['entities']} entities, {w['test']} test, "
                   f"{len(setting['seeds'])} seeds, tuning seeds {setting['tuning']['seeds']}; "
                   f"chosen lr: " + ", ".join(f"{m} {lr:g}" for m, lr in
                                              setting["chosen_lr"].items()) + ")")
        out.append("")
        out.append("| method | learn | kept | kept outside D_self | Δlearn vs AdamW [95% CI] | "
                   "Δkept outside [95% CI] |")
        out.append("|---|---|---|---|---|---|")
        pairs = {(p["method"], p["metric"]): p for p in setting["paired"]}
        for method, row in setting["summary"].items():
            cells = [f"{row[m]['mean']:.3f} ± {row[m]['std']:.3f}"
                     for m in ("learn", "kept", "kept_outside")]
            diffs = []
            for metric in ("learn", "kept_outside"):
                p = pairs.get((method, metric))
                diffs.append("-" if p is None else
                             f"{p['mean']:+.3f} [{p['ci_low']:+.3f}, {p['ci_high']:+.3f}]")
            out.append(f"| {labels.get(method, method)} | " + " | ".join(cells + diffs) + " |")
        sweep = setting["adamw_sweep"]
        out.append("")
        out.append("AdamW lr sweep (test, mean over seeds): " + "; ".join(
            f"lr {float(lr):g}: learn {sum(r['final']['learn'] for r in runs) / len(runs):.3f}, "
            f"kept outside {sum(r['final']['kept_outside'] for r in runs) / len(runs):.3f}"
            for lr, runs in sorted(sweep.items(), key=lambda kv: float(kv[0]))))
        sel = setting.get("selection")
        if sel:
            out.append("")
            out.append(f"Selection of the forgetting relations in D_self (base rate "
                       f"{sel['base_rate']:.2f}, k = {sel['k']}, first scoring, mean over "
                       f"{sel['n_seeds']} seeds; max quadratic/linear FC term "
                       f"{sel['quadratic_over_linear_max']:.1e}): " + "; ".join(
                           f"`{k}` precision@k top {sel[k]['precision_top']:.2f} / bottom "
                           f"{sel[k]['precision_bottom']:.2f}, AUROC {sel[k]['auroc']:.2f}"
                           for k in ("fc", "fisher_alignment", "fisher_overlap")))
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(tables(sys.argv[1] if len(sys.argv) > 1 else
                 os.path.join(HERE, "results", "lwf_demo.json")))
