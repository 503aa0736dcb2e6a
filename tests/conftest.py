"""Suite-wide settings."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    # Two OpenMP threads on a 2-core machine that is running anything else spin on each other and
    # slow small models down many-fold; one thread keeps the suite's time predictable.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
