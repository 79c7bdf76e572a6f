"""Results files: the JSON document, its markdown table, its plot, and a short summary table.

Everything here reads the JSON document only, so ``python -m benchmarks --from-json DIR`` can redo
the markdown and the plot later (e.g. on a machine with matplotlib, for results measured on one
without it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

SCHEMA = "fisherforget-bench/1"
BENCHMARK_FILES = ("step", "score", "estimate")

__all__ = ["SCHEMA", "write_json", "read_results", "markdown", "plot", "summary_lines",
           "write_artifacts"]


def write_json(path: Path, doc: dict) -> None:
    """Write atomically (a run killed mid-write keeps the previous complete file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


def read_results(folder: Path) -> list[dict]:
    docs = []
    for name in BENCHMARK_FILES:
        path = folder / f"{name}.json"
        if path.exists():
            docs.append(json.loads(path.read_text()))
    return docs


# ------------------------------------------------------------------ formatting


def _ms(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _num(value: Optional[float], fmt: str = "{:.3g}") -> str:
    return "-" if value is None else fmt.format(value)


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _mib(value: Optional[int]) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def _baseline_names(rows: list[dict]) -> list[str]:
    names: list[str] = []
    for row in rows:
        if row["kind"] == "baseline" and row["variant"] not in names:
            names.append(row["variant"])
    return names


def _speedup(row: dict, baseline: str, multi_setting: bool) -> Optional[float]:
    speedups = row.get("speedup") or {}
    if not multi_setting:
        return speedups.get(baseline)
    return speedups.get(f"{baseline} [{row['setting']}]", speedups.get(f"{baseline} [off]"))


def _device_line(doc: dict) -> str:
    env = doc["environment"]
    device = env["device"]
    versions = env["versions"]
    git = env["git"]
    commit = (git.get("commit") or "unknown")[:12] + (" (with local edits)" if git.get("dirty")
                                                      else "")
    what = device["name"] + (f" ({device.get('capability')})" if device.get("capability") else "")
    if device["type"] == "cpu":
        what = (f"CPU: {device['name']}, {device.get('logical_cpus')} logical CPUs, "
                f"{device.get('torch_threads')} torch threads")
    return (f"{what}; torch {versions['torch']} (CUDA {versions['torch_cuda']}), triton "
            f"{versions['triton']}, fisherforget {versions['fisherforget']}, commit {commit}; "
            f"{doc['config']['mode']} mode; started {env['started_utc']}")


def markdown(doc: dict) -> str:
    rows = doc["rows"]
    multi = len(doc["config"]["settings"]) > 1
    baselines = _baseline_names(rows)
    copy = doc.get("copy_bandwidth") or {}
    lines = [f"## {doc['title']}", "", _device_line(doc), ""]
    if doc["environment"]["device"]["type"] == "cpu":
        lines += ["**CPU figures**: a host CPU, not a GPU; they show the tool works and rank "
                  "the CPU paths, nothing about the kernels' GPU speed.", ""]
    load = (doc["environment"].get("load_average_at_start"), doc.get("load_average_at_end"))
    if load[0] is not None:
        lines += [f"Load average (1/5/15 min) at start {load[0]}, at end {load[1]}.", ""]
    if copy.get("gbps"):
        lines += [f"Device-to-device copy bandwidth measured in this run: **{copy['gbps']:.1f} "
                  f"GB/s** ({copy['numel']:,} fp32 elements, 8 B/element; the best of the "
                  "measurements at the start and the end).", ""]
    lines += [f"GB/s = {doc['bytes_note']}, divided by the median time. "
              f"Baselines: {doc['baseline_note']}", ""]
    if not doc.get("complete", True):
        lines += ["**Incomplete run** (interrupted): the rows below are those that finished.", ""]
    header = ["workload", "dtype"] + (["setting"] if multi else []) + [
        "variant", "median ms", "GB/s", "% of copy"]
    header += [f"x vs {b}" for b in baselines]
    header += ["state B/param", "peak workspace MiB", "reps"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if row.get("status") != "ok":
            continue
        cells = [row["workload"], row["dtype"]] + ([row["setting"]] if multi else []) + [
            row["variant"], _ms(row.get("median_s")), _num(row.get("gbps"), "{:.1f}"),
            _pct(row.get("copy_fraction"))]
        cells += [_num(_speedup(row, b, multi), "{:.2f}") for b in baselines]
        cells += [_num(row.get("state_bytes_per_param"), "{:.1f}"),
                  _mib(row.get("step_workspace_bytes")), str(row.get("repeats", "-"))]
        lines.append("| " + " | ".join(cells) + " |")
    not_run = [row for row in rows if row.get("status") != "ok"]
    if not_run:
        lines += ["", "Not measured:", ""]
        seen = set()
        for row in not_run:
            key = (row["variant"], row["status"], row["reason"])
            if key in seen:
                continue
            seen.add(key)
            count = sum(1 for r in not_run
                        if (r["variant"], r["status"], r["reason"]) == key)
            lines.append(f"- `{row['variant']}` {row['status']} ({count} rows): {row['reason']}")
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> Optional[str]:
    """Bar chart of GB/s per variant, one panel per (workload, dtype), the copy bandwidth as a
    dashed line. Returns ``None`` on success, else why no plot was made."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:
        return f"no plot: matplotlib unavailable ({type(exc).__name__}: {exc})"
    rows = [r for r in doc["rows"] if r.get("status") == "ok" and r.get("gbps")]
    if not rows:
        return "no plot: no measured rows"
    multi = len(doc["config"]["settings"]) > 1
    panels: list[tuple[str, str]] = []
    for r in rows:
        if (r["workload"], r["dtype"]) not in panels:
            panels.append((r["workload"], r["dtype"]))
    heights = [sum(1 for r in rows if (r["workload"], r["dtype"]) == p) for p in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 1.2 + sum(0.28 * h + 0.6
                                                                     for h in heights)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    copy = (doc.get("copy_bandwidth") or {}).get("gbps")
    colors = {"baseline": "#8c8c8c", "ours": "#1f77b4"}
    for ax, (workload, dtype) in zip(axes[:, 0], panels):
        panel = [r for r in rows if (r["workload"], r["dtype"]) == (workload, dtype)]
        labels = [f"{r['variant']} [{r['setting']}]" if multi else r["variant"] for r in panel]
        ax.barh(range(len(panel)), [r["gbps"] for r in panel],
                color=[colors.get(r["kind"], "#1f77b4") for r in panel])
        ax.set_yticks(range(len(panel)), labels, fontsize=7)
        for y, r in enumerate(panel):
            ax.text(r["gbps"], y, f" {r['gbps']:.3g}", va="center", fontsize=6)
        ax.invert_yaxis()
        if copy:
            ax.axvline(copy, color="k", linestyle="--", linewidth=1)
            ax.text(copy, -0.6, " copy", fontsize=7, va="bottom")
        ax.set_title(f"{workload}, {dtype}", fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    axes[-1, 0].set_xlabel("effective GB/s over the minimum bytes (higher is better)", fontsize=8)
    device = doc["environment"]["device"]
    fig.suptitle(f"{doc['title']}: {device['name']} ({device['type']}, "
                 f"{doc['config']['mode']} mode)"
                 + ("" if doc.get("complete", True) else ", INCOMPLETE RUN"), fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write_artifacts(doc: dict, folder: Path) -> dict:
    """Write ``<benchmark>.json``, ``.md`` and ``.png`` into ``folder``; return the artifact
    note stored in the JSON."""
    folder.mkdir(parents=True, exist_ok=True)
    name = doc["benchmark"]
    (folder / f"{name}.md").write_text(markdown(doc))
    why_not = plot(doc, folder / f"{name}.png")
    doc["artifacts"] = {
        "markdown": f"{name}.md",
        "plot": None if why_not else f"{name}.png",
        "plot_note": why_not,
    }
    write_json(folder / f"{name}.json", doc)
    return doc["artifacts"]


def _short(name: str) -> str:
    return {"torch-adamw-fused": "fused", "torch-adamw-foreach": "foreach",
            "composition": "comp", "torch-plain": "plain",
            "torch-foreach": "foreach"}.get(name, name)


def summary_lines(docs: list[dict]) -> list[str]:
    """A short fixed-width table: per workload/dtype/setting, the fastest ``FisherAdamW``
    variant on a kernel backend with its headline figures and speed-ups, and the other kernel
    backends' share of the copy bandwidth beside it. The reference backend (a slow ground truth)
    appears only where no kernel ran, e.g. on a CPU."""
    out = []
    for doc in docs:
        multi = len(doc["config"]["settings"]) > 1
        copy = (doc.get("copy_bandwidth") or {}).get("gbps")
        device = doc["environment"]["device"]
        out.append(f"[{doc['benchmark']}] {device['name']} ({device['type']}), copy "
                   f"{_num(copy, '{:.1f}')} GB/s, {doc['config']['mode']} mode"
                   + ("" if doc.get("complete", True) else ", INCOMPLETE"))
        ours = [r for r in doc["rows"] if r.get("status") == "ok" and r["kind"] == "ours"
                and not r["variant"].startswith("fisherforget-op-")]
        kernels = [r for r in ours if r.get("backend") != "reference"]
        shown = kernels or ours
        baselines = _baseline_names(doc["rows"])
        out.append(f"  {'workload':<21}{'dtype':<6}{'setting':<12}{'ours (fastest kernel)':<24}"
                   f"{'ms':>8}{'GB/s':>8}{'%copy':>6}  speed-up vs baselines; others")
        groups: list[tuple] = []
        for r in shown:
            key = (r["workload"], r["dtype"], r["setting"])
            if key not in groups:
                groups.append(key)
        for key in groups:
            members = sorted((r for r in shown if (r["workload"], r["dtype"], r["setting"])
                              == key), key=lambda r: r["median_s"])
            best = members[0]
            ups = [f"{_speedup(best, b, multi):.2f}x {_short(b)}" for b in baselines
                   if _speedup(best, b, multi) is not None]
            others = [f"{r['backend']} {_pct(r.get('copy_fraction'))}" for r in members[1:]]
            tail = ", ".join(ups) or "-"
            if others:
                tail += "; " + ", ".join(others)
            out.append(
                f"  {key[0]:<21}{key[1]:<6}{(key[2] if multi else '-'):<12}"
                f"{best['variant']:<24}{_ms(best.get('median_s')):>8}"
                f"{_num(best.get('gbps'), '{:.1f}'):>8}{_pct(best.get('copy_fraction')):>6}  {tail}"
            )
        skipped: dict[tuple[str, str], int] = {}
        for r in doc["rows"]:
            if r.get("status") == "skipped":
                k = (r["variant"], r["reason"])
                skipped[k] = skipped.get(k, 0) + 1
        for (variant, reason), count in skipped.items():
            out.append(f"  skipped {variant} ({count}): {reason[:110]}")
        for r in doc["rows"]:
            if r.get("status") == "failed":
                out.append(f"  FAILED {r['variant']} {r['workload']}/{r['dtype']}/{r['setting']}: "
                           f"{r['reason'][:110]}")
    return out
