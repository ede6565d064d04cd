"""Suite-wide fixtures: every test runs torch on one intra-op thread.

The models under test are tiny: a second thread only adds synchronisation, and on a busy
2-core machine it spin-waits (10x slower measured). Subprocess tests (DDP) are unaffected.
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
