"""Test-wide set-up.

Without a CUDA GPU the Triton kernels run in Triton's interpreter on CPU tensors, which must be
switched on before any kernel is decorated, i.e. before fisherforget's Triton modules import.
Tests marked ``cuda`` are skipped when no GPU is visible.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
