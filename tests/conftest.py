"""Suite-wide test settings."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # The tests use tiny matrices: on the shared 2-core CI box, OpenMP threads only spin
    # on barriers (steps measured up to 50x slower with 2 threads under load). Restored
    # after each test so code that picks its own thread count is tested as written.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
