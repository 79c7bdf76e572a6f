#!/usr/bin/env python
"""Benchmark the Fisher score op against plain torch.

Same as ``fisherforget bench score [options]``; ``--help`` lists the options, docs/benchmarks.md
explains the figures. Uses the fisherforget of the checkout it sits in (installed or not).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fisherforget.bench.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
