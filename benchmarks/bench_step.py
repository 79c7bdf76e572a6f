#!/usr/bin/env python
"""Benchmark the optimizer step: torch AdamW foreach and fused, the composition, and FisherAdamW
on each backend.

Same as ``fisherforget bench step [options]``; ``--help`` lists the options, docs/benchmarks.md
explains the figures. Uses the fisherforget of the checkout it sits in (installed or not).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fisherforget.bench.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["step", *sys.argv[1:]]))
