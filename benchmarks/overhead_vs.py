"""The host-overhead and CPU-step benchmark (benchmarks/overhead.py) of two checkouts, side by
side: each round runs it once in a fresh process per tree, alternating (A B A B ...), so that the
noise of a shared machine falls on both alike; medians over the rounds.

    python benchmarks/overhead_vs.py OLD_TREE NEW_TREE [--rounds 5]

Each tree needs its own fisherforget._C (a copy of the other's works when the ops agree). Prints
one line per row: the median of each tree's medians (ms; host rows: hot, round robin).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

CODE = r'''
import json, torch
torch.set_num_threads(1)
import benchmarks.overhead as o
rows = o.host_rows(repeats=60) + o.cpu_rows(threads_list=(1,), repeats=9)
print("JSON" + json.dumps(rows))
'''


def key(row: dict) -> tuple:
    if row["table"] == "cpu":
        return ("cpu", row["workload"], row["variant"])
    return ("host", row["backend"], row.get("fisher"))


def run(tree: str) -> list:
    out = subprocess.run([sys.executable, "-c", CODE], cwd=tree, capture_output=True, text=True,
                         env={"PYTHONPATH": tree, "PATH": os.environ.get("PATH", "/usr/bin")})
    lines = [line for line in out.stdout.splitlines() if line.startswith("JSON")]
    if not lines:
        raise SystemExit(f"{tree}: the benchmark failed:\n{out.stderr[-2000:]}")
    return json.loads(lines[0][4:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs=2)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    found = {tree: {} for tree in args.trees}
    for _ in range(args.rounds):
        for tree in args.trees:
            for row in run(tree):
                if row.get("status") != "skipped":
                    found[tree].setdefault(key(row), []).append(
                        (row["median_ms"], row.get("round_robin_ms")))
    old, new = args.trees
    for k in found[new]:
        cells = []
        for tree in (old, new):
            values = found[tree].get(k, [])
            hot = statistics.median(v[0] for v in values) if values else float("nan")
            cold = [v[1] for v in values if v[1] is not None]
            cells.append(f"{hot:.3f}" + (f" / {statistics.median(cold):.3f}" if cold else ""))
        print(" ".join(map(str, k)), "|", " | ".join(cells))


if __name__ == "__main__":
    main()
