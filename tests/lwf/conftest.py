"""The LWF tests use tiny models, for which one intra-op thread is fastest (and many times faster
than two on a busy CPU); the previous setting is restored after each test."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
