"""Markdown tables of a ``fisherforget demo`` result file (what README.md and docs/lwf.md quote):
the built-in settings (``lwf_demo.json``) or a real model (``lwf_real.json``).

    python benchmarks/lwf_tables.py [benchmarks/results/lwf_demo.json]
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


REAL_LABELS = {
    "adamw": "AdamW (tuned lr)",
    "lwf": "FisherAdamW + LWF (paper FC, retain)",
    "lwf_no_retain": "LWF without retain (ascent only)",
    "retain_only": "retain only (rehearsal, no ascent)",
    "lwf_random": "random selection ascent (retain)",
}


def _interval(p) -> str:
    return "-" if p is None else f"{p['mean']:+.3f} [{p['ci_low']:+.3f}, {p['ci_high']:+.3f}]"


def method_rows(summary: dict, paired: list, labels: dict, shown: tuple, compared: tuple,
                headers: tuple) -> list[str]:
    """A markdown table: per method the mean ± sd of each ``shown`` metric, then the paired
    difference against the baseline with its 95% interval for each ``compared`` metric."""
    out = ["| method | " + " | ".join(headers) + " |", "|---" * (1 + len(headers)) + "|"]
    pairs = {(p["method"], p["metric"]): p for p in paired}
    for method, row in summary.items():
        cells = [f"{row[m]['mean']:.3f} ± {row[m]['std']:.3f}" for m in shown]
        cells += [_interval(pairs.get((method, m))) for m in compared]
        out.append(f"| {labels.get(method, method)} | " + " | ".join(cells) + " |")
    return out


def real_table(result: dict, path: str) -> str:
    """The real-model result: every method's test means and its paired differences."""
    env, started = result["environment"], result["run_started"]
    sizes = result["sizes"]
    out = [f"Result file `{os.path.relpath(path, os.path.dirname(HERE))}`: run started at commit "
           f"`{(started['commit'] or '?')[:10]}`, {env['cpu']} ({env['cpu_count']} cores), "
           f"{env['torch_threads']} torch thread per process, torch {env['torch']}, "
           f"transformers {env['transformers']}; command `{result['command']}`. "
           f"Learning {sizes['learn'][0]}/{sizes['learn'][1]}/{sizes['learn'][2]} "
           f"(train/validation/test), |D_self| = {sizes['d_self']}, kept {sizes['kept']} of "
           f"{sizes['kept_asked']} questions; {result['seeds']} seeds, tuning seeds "
           f"{result['tune_seeds']}; chosen lr: " + ", ".join(
               f"{m} {lr:g}" for m, lr in result["chosen_lr"].items()) + ".", ""]
    metrics = ("learn", "forget_loss", "kept")
    out += method_rows(result["summary"], result["paired"], REAL_LABELS, metrics, metrics,
                       ("learn", "forget NLL", "kept", "Δlearn vs AdamW [95% CI]",
                        "Δforget NLL [95% CI]", "Δkept [95% CI]"))
    return "\n".join(out)


def tables(path: str) -> str:
    with open(path) as f:
        result = json.load(f)
    if "settings" not in result:
        return real_table(result, path)
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
        out += method_rows(setting["summary"], setting["paired"], labels,
                           ("learn", "kept", "kept_outside"), ("learn", "kept_outside"),
                           ("learn", "kept", "kept outside D_self", "Δlearn vs AdamW [95% CI]",
                            "Δkept outside [95% CI]"))
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
                           for k in sel if isinstance(sel[k], dict)))
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(tables(sys.argv[1] if len(sys.argv) > 1 else
                 os.path.join(HERE, "results", "lwf_demo.json")))
