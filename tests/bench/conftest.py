"""The benchmarks are a folder of the checkout (``benchmarks/``), not part of the installed
package: import them from there without putting the checkout on ``sys.path``, so that the second
test stack still imports the installed fisherforget, not the checkout's."""

import importlib.util
import sys
from pathlib import Path

FOLDER = Path(__file__).resolve().parents[2] / "benchmarks"

if "benchmarks" not in sys.modules:
    spec = importlib.util.spec_from_file_location(
        "benchmarks", FOLDER / "__init__.py", submodule_search_locations=[str(FOLDER)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["benchmarks"] = module
    spec.loader.exec_module(module)
