"""An autouse fixture for tests of tiny encoders: one intra-op thread.

A second thread only adds synchronisation for these sizes, and on a busy 2-core machine it
spin-waits (10x slower measured). Import it into a test module to apply it there.
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
