"""``python -m benchmarks``: run the step, score and estimation benchmarks and write their results.

Modes:

* default on a GPU: the full workloads (Llama ~125M and ~1B shapes, a flat 2^28 tensor, 2,000
  tensors of 4,096 elements), fp32 and bf16, many repeats;
* ``--quick``: small workloads and few repeats, one CPU thread (on a machine without a GPU,
  ``python -m benchmarks`` runs this; about two minutes on two shared CPU cores, and never more
  than its 130 s time budget plus start-up);
* ``--tiny``: toy sizes of the same workload kinds, seconds (tests, dry runs of gpu_check.sh).

Each benchmark writes ``<out>/<name>.json`` (rewritten after every row, so an interrupted run
keeps what it measured), ``<name>.md`` and ``<name>.png``; ``summary.txt`` holds the short table
printed last. ``--from-json DIR`` redoes the tables, plots and summary from existing JSON files.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from benchmarks import core, environment, report, timing, workloads
from benchmarks import estimate as estimate_bench
from benchmarks import overhead as overhead_bench
from benchmarks import score as score_bench
from benchmarks import step as step_bench

BENCHMARKS = {
    "step": step_bench.BENCHMARK,
    "score": score_bench.BENCHMARK,
    "estimate": estimate_bench.BENCHMARK,
}
# Share of the time budget each benchmark gets (time one leaves unused passes to the next).
BUDGET_WEIGHTS = {"step": 0.6, "score": 0.2, "estimate": 0.2}

MODES = {
    "full": dict(workloads=workloads.FULL_WORKLOADS, copy_numel=2**28,
                 timing=timing.TimingOptions(warmup=5, min_reps=10, max_reps=200,
                                             target_seconds=0.5)),
    "quick": dict(workloads=workloads.QUICK_WORKLOADS, copy_numel=2**24,
                  timing=timing.TimingOptions(warmup=2, min_reps=5, max_reps=30,
                                              target_seconds=0.25),
                  time_budget=130.0, threads=1),
    "tiny": dict(workloads=workloads.TINY_WORKLOADS, copy_numel=2**16,
                 timing=timing.TimingOptions(warmup=1, min_reps=2, max_reps=5,
                                             target_seconds=0.01),
                 time_budget=120.0, max_replicas=2, threads=1),
}


def _csv(text: Optional[str]) -> Optional[list[str]]:
    if text is None:
        return None
    return [item.strip() for item in text.split(",") if item.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("benchmarks", nargs="*", metavar="BENCHMARK",
                        help="any of step, score, estimate (default: all three)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="small workloads, few repeats (the default without a GPU)")
    size.add_argument("--tiny", action="store_true",
                      help="toy sizes of the same workload kinds (tests, dry runs)")
    parser.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda if available)")
    parser.add_argument("--workloads",
                        help="comma-separated: llama-125m, llama-1b, flat-2^K, many-small-NxM "
                             "(with --tiny, those over 2^17 elements map to their toy "
                             "counterparts)")
    parser.add_argument("--dtypes", help=f"comma-separated of {sorted(workloads.DTYPE_CONFIGS)} "
                                         "(default fp32,bf16)")
    parser.add_argument("--settings",
                        help="step settings, comma-separated of off, fisher, fisher+mask")
    parser.add_argument("--variants",
                        help="only variants whose name contains one of these comma-separated "
                             "words (e.g. 'torch,triton')")
    parser.add_argument("--skip-variants", help="drop variants whose name contains these words")
    parser.add_argument("--op-variants", action="store_true",
                        help="also time ops.fused_step directly (no optimizer bookkeeping)")
    parser.add_argument("--allow-interpreter", action="store_true",
                        help="time the Triton backend on CPU tensors (interpreter; very slow)")
    parser.add_argument("--out", default="benchmark-results", help="output folder")
    parser.add_argument("--time-budget", type=float,
                        help="seconds for the whole run; rows past it are recorded as skipped")
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--min-reps", type=int)
    parser.add_argument("--max-reps", type=int)
    parser.add_argument("--target-seconds", type=float,
                        help="timed seconds per variant the repeat count aims at")
    parser.add_argument("--copy-numel", type=int, help="elements of the copy-bandwidth probe")
    parser.add_argument("--max-replicas", type=int,
                        help="most input replicas rotated through against cache effects "
                             "(default 16; --tiny 2)")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads (default: torch's; --quick and --tiny use 1, "
                             "steadier on a shared CPU)")
    parser.add_argument("--shapes-from", choices=("list", "transformers"), default="list",
                        help="Llama shapes from the config arithmetic or a meta-device model")
    parser.add_argument("--from-json", metavar="DIR",
                        help="only redo markdown, plots and summary from DIR's JSON files")


def _pick_device(args: argparse.Namespace) -> torch.device:
    if args.device:
        device = torch.device(args.device)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise SystemExit("--device cuda: no CUDA GPU is visible")
            if device.index is None:
                device = torch.device("cuda", torch.cuda.current_device())
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _mode(args: argparse.Namespace, device: torch.device) -> str:
    if args.tiny:
        return "tiny"
    if args.quick:
        return "quick"
    if device.type == "cpu" and args.workloads is None:
        print("no GPU: running the --quick CPU mode", flush=True)
        return "quick"
    return "full"


def _variant_filter(args: argparse.Namespace):
    keep, drop = _csv(args.variants), _csv(args.skip_variants)

    def accept(variant: core.Variant) -> bool:
        if keep and not any(word in variant.name for word in keep):
            return False
        if drop and any(word in variant.name for word in drop):
            return False
        return True

    return accept


def _progress(row: dict, said: set) -> None:
    where = f"{row['benchmark']:<8} {row['workload']:<20} {row['dtype']:<6} {row['setting']:<12}"
    if row["status"] == "ok":
        copy = row.get("copy_fraction")
        print(f"{where} {row['variant']:<26} {row['median_s'] * 1e3:10.3f} ms "
              f"{row['gbps']:9.1f} GB/s" + (f" ({100 * copy:.0f}% of copy)" if copy else ""),
              flush=True)
    elif row["status"] == "failed":
        print(f"{where} {row['variant']:<26} FAILED: {row['reason']}", flush=True)
    elif (row["variant"], row["reason"]) not in said:
        said.add((row["variant"], row["reason"]))
        print(f"{row['benchmark']:<8} skipping {row['variant']}: {row['reason']}", flush=True)


def _run_one(name: str, args: argparse.Namespace, mode: str, device: torch.device,
             deadline: timing.Deadline, out_dir: Path, command: str) -> dict:
    bench = BENCHMARKS[name]
    preset = MODES[mode]
    names = _csv(args.workloads) or list(preset["workloads"])
    loads = [workloads.get_workload(n, shapes_from=args.shapes_from) for n in names]
    if mode == "tiny":  # the toy workload of the same kind, unless it is small already
        names = list(dict.fromkeys(
            workloads.tiny_counterpart(w.name)
            if w.num_elements > workloads.TINY_MAX_ELEMENTS else w.name
            for w in loads))
        loads = [workloads.get_workload(n, shapes_from=args.shapes_from) for n in names]
    dtype_names = _csv(args.dtypes) or ["fp32", "bf16"]
    unknown = [d for d in dtype_names if d not in workloads.DTYPE_CONFIGS]
    if unknown:
        raise SystemExit(f"--dtypes: unknown {unknown}; choose from "
                         f"{sorted(workloads.DTYPE_CONFIGS)}")
    dtype_configs = [workloads.DTYPE_CONFIGS[d] for d in dtype_names]
    settings = list(bench.settings)
    if name == "step" and args.settings:
        settings = _csv(args.settings)
        bad = [s for s in settings if s not in bench.settings]
        if bad:
            raise SystemExit(f"--settings: unknown {bad}; choose from {bench.settings}")
    base = preset["timing"]
    options = timing.TimingOptions(
        warmup=args.warmup if args.warmup is not None else base.warmup,
        min_reps=args.min_reps if args.min_reps is not None else base.min_reps,
        max_reps=args.max_reps if args.max_reps is not None else base.max_reps,
        target_seconds=(args.target_seconds if args.target_seconds is not None
                        else base.target_seconds),
    )
    copy_numel = args.copy_numel or preset["copy_numel"]
    max_replicas = args.max_replicas or preset.get("max_replicas", 16)
    free = timing.free_device_bytes(device)
    if free is not None:
        copy_numel = min(copy_numel, max(2**20, free // 16))  # source + destination + headroom

    started = time.monotonic()
    doc = {
        "schema": report.SCHEMA,
        "benchmark": name,
        "title": bench.title,
        "complete": False,
        "command": command,
        "environment": environment.environment(device),
        "config": {
            "mode": mode,
            "device": str(device),
            "workloads": [w.to_json() for w in loads],
            "dtypes": [d.to_json() for d in dtype_configs],
            "settings": settings,
            "timing": options.to_json(),
            "time_budget_s": deadline.seconds,
            "shapes_from": args.shapes_from,
            "op_variants": args.op_variants,
            "allow_interpreter": args.allow_interpreter,
            "max_replicas": max_replicas,
            "torch_threads": torch.get_num_threads(),
        },
        "baseline_note": bench.baseline_note,
        "bytes_note": bench.bytes_note(),
        "copy_bandwidth": None,
        "rows": [],
    }
    json_path = out_dir / f"{name}.json"
    print(f"== {bench.title} on {doc['environment']['device']['name']} ({device}), {mode} mode",
          flush=True)
    copy_start = timing.measure_copy_bandwidth(device, copy_numel, options)
    doc["copy_bandwidth"] = {"numel": copy_numel, "start": copy_start, "end": None,
                             "gbps": copy_start["gbps"]}
    print(f"{name:<8} copy bandwidth {copy_start['gbps']:.1f} GB/s", flush=True)
    said: set = set()

    def on_row(row: dict) -> None:
        doc["rows"].append(row)
        core.derive_figures(doc["rows"], doc["copy_bandwidth"]["gbps"], len(settings) > 1)
        _progress(row, said)
        report.write_json(json_path, doc)

    core.run_benchmark(
        bench, loads, dtype_configs, settings, device, options, deadline,
        variant_filter=_variant_filter(args), allow_interpreter=args.allow_interpreter,
        op_variants=args.op_variants, max_replicas=max_replicas, on_row=on_row,
    )
    copy_end = timing.measure_copy_bandwidth(device, copy_numel, options)
    doc["copy_bandwidth"]["end"] = copy_end
    # The better of the two: the fraction of copy bandwidth is then never flattered by a slow probe.
    doc["copy_bandwidth"]["gbps"] = max(copy_start["gbps"], copy_end["gbps"])
    core.derive_figures(doc["rows"], doc["copy_bandwidth"]["gbps"], len(settings) > 1)
    doc["complete"] = True
    doc["wall_seconds"] = time.monotonic() - started
    doc["finished_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds")
    doc["load_average_at_end"] = environment.load_average()
    report.write_artifacts(doc, out_dir)
    return doc


def run(args: argparse.Namespace) -> int:
    if args.from_json:
        folder = Path(args.from_json)
        docs = report.read_results(folder)
        if not docs:
            print(f"no results (step/score/estimate .json) in {folder}", file=sys.stderr)
            return 1
        for doc in docs:
            report.write_artifacts(doc, folder)
        lines = report.summary_lines(docs)
        (folder / "summary.txt").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        return 0
    device = _pick_device(args)
    mode = _mode(args, device)
    # The CPU/host-overhead tables run by default on a CPU machine (quick mode) and on request.
    default = list(BENCHMARKS) + (["overhead"] if mode == "quick" else [])
    names = args.benchmarks or default
    unknown = [n for n in names if n not in BENCHMARKS and n != "overhead"]
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; choose from "
                         f"{list(BENCHMARKS) + ['overhead']}")
    run_overhead = "overhead" in names
    names = [n for n in names if n != "overhead"]
    threads = args.threads or MODES[mode].get("threads")
    if threads:
        torch.set_num_threads(threads)
    budget = args.time_budget if args.time_budget is not None else MODES[mode].get("time_budget")
    total = timing.Deadline(budget)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    argv = getattr(args, "argv", None) or []
    command = "python -m benchmarks " + " ".join(shlex.quote(a) for a in argv)
    docs = []
    for i, name in enumerate(names):
        share = None
        if budget is not None:
            left = sum(BUDGET_WEIGHTS[n] for n in names[i:])
            share = max(0.0, total.remaining()) * BUDGET_WEIGHTS[name] / left
        docs.append(_run_one(name, args, mode, device, timing.Deadline(share), out_dir, command))
    lines = report.summary_lines(docs)
    written: list[str] = []
    if run_overhead:
        lines += [""] + _run_overhead(args, mode, out_dir, command)
        written += ["overhead.json", "overhead.md"]
    (out_dir / "summary.txt").write_text("\n".join(lines) + "\n")
    print()
    print("\n".join(lines))
    for d in docs:
        art = d.get("artifacts", {})
        written += [f"{d['benchmark']}.json", art.get("markdown")]
        written.append(art.get("plot") or f"(no {d['benchmark']}.png: {art.get('plot_note')})")
    print(f"\nresults in {out_dir}/: {', '.join(w for w in written if w)}, summary.txt")
    failed = sum(1 for d in docs for r in d["rows"] if r.get("status") == "failed")
    return 1 if failed else 0


def _run_overhead(args: argparse.Namespace, mode: str, out_dir: Path, command: str) -> list[str]:
    """The CPU step ratios and host-overhead table (``benchmarks.overhead``)."""
    started = time.monotonic()
    doc = overhead_bench.run(quick=mode != "full")
    doc.update(
        environment=environment.environment(torch.device("cpu")), command=command,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        wall_seconds=round(time.monotonic() - started, 1),
    )
    (out_dir / "overhead.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out_dir / "overhead.md").write_text("\n".join(doc["markdown"]) + "\n")
    return doc["markdown"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
