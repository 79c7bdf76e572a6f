"""Statistics, tables, pictures and the environment record of ``fisherforget demo``.

Paired differences: for a method ``M`` and the baseline ``B`` run on the same seeds (same
pre-trained model, same batches), ``d_s = metric(M, s) - metric(B, s)``; reported as the mean of
``d_s`` with the 95% t-interval ``mean +- t_{0.975, n-1} * sd(d) / sqrt(n)``.
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
from typing import Optional, Sequence

import torch

METRICS = ("learn", "kept", "kept_outside")

# Student-t 0.975 quantiles for 1..30 degrees of freedom (standard tables).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (table up to 30, then
    the Cornish-Fisher expansion around the normal quantile, error < 1e-3)."""
    if df < 1:
        raise ValueError(f"t975: df must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def paired(method_values: Sequence[float], baseline_values: Sequence[float]) -> dict:
    """Mean paired difference and its 95% t-interval (``nan`` bounds with one seed)."""
    if len(method_values) != len(baseline_values) or not method_values:
        raise ValueError("paired: need the same non-zero number of values for both")
    diffs = [a - b for a, b in zip(method_values, baseline_values)]
    mean, sd = mean_std(diffs)
    n = len(diffs)
    half = t975(n - 1) * sd / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "n_seeds": n}


def paired_list(setting: str, runs: dict[str, list[dict]], baseline: str,
                metrics: Sequence[str] = METRICS) -> list[dict]:
    """One entry per (method, metric) against ``baseline``, over the seeds both ran."""
    base = {r["seed"]: r["final"] for r in runs[baseline]}
    out = []
    for method, results in runs.items():
        if method == baseline:
            continue
        common = [r for r in results if r["seed"] in base]
        if not common:
            continue
        for metric in metrics:
            stats = paired([r["final"][metric] for r in common],
                           [base[r["seed"]][metric] for r in common])
            out.append({"setting": setting, "method": method, "baseline": baseline,
                        "metric": metric, **stats})
    return out


def summarize(runs: dict[str, list[dict]]) -> dict[str, dict]:
    summary = {}
    for method, results in runs.items():
        row = {m: mean_std([r["final"][m] for r in results])
               for m in ("learn", "forget", "kept", "kept_outside")}
        row["wall_s"] = mean_std([r["wall_s"] for r in results])
        summary[method] = {k: {"mean": v[0], "std": v[1]} for k, v in row.items()}
    return summary


def selection_summary(results: Sequence[dict]) -> Optional[dict]:
    """Mean over seeds of each scorer's precision@k (top, bottom) and AUROC."""
    rows = [r["selection"] for r in results if r.get("selection")]
    if not rows:
        return None
    out = {"k": rows[0]["k"], "base_rate": rows[0]["base_rate"], "n_seeds": len(rows),
           "quadratic_over_linear_max": max(r["quadratic_over_linear_max"] for r in rows)}
    for kind in (k for k, v in rows[0].items() if isinstance(v, dict)):  # the scorers
        out[kind] = {key: mean_std([r[kind][key] for r in rows])[0]
                     for key in ("precision_top", "precision_bottom", "auroc")}
    return out


def format_tables(setting: str, summary: dict, pairs: list[dict], labels: dict,
                  selection: Optional[dict]) -> str:
    head = (f"{'method':<40} {'learn':>13} {'forget':>13} {'kept':>13} {'kept outside':>13} "
            f"{'wall s':>6}")
    lines = [f"[{setting}] mean ± std over seeds (test entities; kept on all / outside D_self)",
             head, "-" * len(head)]
    for method, row in summary.items():
        cells = [f"{row[m]['mean']:.3f} ± {row[m]['std']:.3f}"
                 for m in ("learn", "forget", "kept", "kept_outside")]
        lines.append(f"{labels.get(method, method):<40} {cells[0]:>13} {cells[1]:>13} "
                     f"{cells[2]:>13} {cells[3]:>13} {row['wall_s']['mean']:>6.1f}")
    if pairs:
        lines.append("")
        lines.append(f"[{setting}] paired difference vs {pairs[0]['baseline']} "
                     f"(mean [95% t-interval], {pairs[0]['n_seeds']} seeds)")
        by_method: dict[str, dict] = {}
        for p in pairs:
            by_method.setdefault(p["method"], {})[p["metric"]] = p
        for method, cells in by_method.items():
            text = "  ".join(f"{m} {cells[m]['mean']:+.3f} [{cells[m]['ci_low']:+.3f}, "
                             f"{cells[m]['ci_high']:+.3f}]" for m in METRICS if m in cells)
            lines.append(f"  {labels.get(method, method):<40} {text}")
    if selection:
        lines.append("")
        lines.append(f"[{setting}] selection quality at the first scoring (k = {selection['k']}, "
                     f"base rate {selection['base_rate']:.2f}; max quadratic/linear FC term "
                     f"{selection['quadratic_over_linear_max']:.1e})")
        for kind in (k for k, v in selection.items() if isinstance(v, dict)):
            s = selection[kind]
            lines.append(f"  {kind:<17} precision@k top {s['precision_top']:.2f}  bottom "
                         f"{s['precision_bottom']:.2f}  AUROC {s['auroc']:.2f}")
    return "\n".join(lines)


def plot(results: dict, path: str, labels: dict, colors: dict) -> None:
    """Per setting: kept accuracy outside ``D_self`` vs learning accuracy (AdamW's lr sweep as a
    curve, every other method as a point with its per-seed spread), and the validation learning
    curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(results)
    fig, axes = plt.subplots(len(settings), 2, figsize=(12, 4.6 * len(settings)), squeeze=False)
    for row, setting in zip(axes, settings):
        res = results[setting]
        ax = row[0]
        sweep = res["adamw_sweep"]
        lrs = sorted(sweep, key=float)
        xs = [mean_std([r["final"]["learn"] for r in sweep[lr]])[0] for lr in lrs]
        ys = [mean_std([r["final"]["kept_outside"] for r in sweep[lr]])[0] for lr in lrs]
        ax.plot(xs, ys, "-o", color=colors.get("adamw", "black"), label="AdamW, lr sweep")
        for x, y, lr in zip(xs, ys, lrs):
            ax.annotate(f"{float(lr):g}", (x, y), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
        for method, runs in res["runs"].items():
            if method == "adamw":
                continue
            learn = mean_std([r["final"]["learn"] for r in runs])
            kept = mean_std([r["final"]["kept_outside"] for r in runs])
            ax.errorbar(learn[0], kept[0], xerr=learn[1], yerr=kept[1], fmt="o", capsize=3,
                        color=colors.get(method), label=labels.get(method, method))
        ax.set_xlabel("learning accuracy (test entities)")
        ax.set_ylabel("kept accuracy (entities outside D_self)")
        ax.set_title(f"{setting}: learning vs kept (mean ± std over seeds)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
        ax = row[1]
        for method, runs in res["runs"].items():
            steps = [p["step"] for p in runs[0]["curve"]]
            mean = [mean_std([r["curve"][i]["learn"] for r in runs])[0] for i in range(len(steps))]
            ax.plot(steps, mean, color=colors.get(method), label=labels.get(method, method))
        ax.set_xlabel("fine-tuning step")
        ax.set_ylabel("learning accuracy (validation entities)")
        ax.set_title(f"{setting}: learning curves (mean over seeds)", fontsize=10)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device) -> dict:
    import transformers

    import fisherforget

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(__file__), timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, cwd=os.path.dirname(__file__),
                               timeout=5).stdout.strip()
    except Exception:
        commit, dirty = "", ""
    return {"fisherforget": fisherforget.__version__, "commit": commit or None,
            "uncommitted_changes": bool(dirty), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "device": str(device), "cpu": cpu_model(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}
