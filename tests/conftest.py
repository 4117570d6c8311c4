"""Suite-wide fixtures."""

import pytest
import torch

# Modules whose tests run tiny tensors in this process: one thread is ~100x faster than
# two on a busy 2-core machine (no OpenMP workers spinning against each other).
ONE_THREAD_MODULES = ("test_balance", "test_routing_causality", "test_routing_options")


@pytest.fixture(autouse=True, scope="module")
def one_thread(request):
    if request.module.__name__.rsplit(".", 1)[-1] not in ONE_THREAD_MODULES:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
