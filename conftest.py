"""pytest: every test starts from a seed fixed by its own name, so a failure reproduces when rerun alone;
TEST_SEED=n shifts every test's seed (a fuzz run over other inputs). Tests that draw a seed of their own
from torch's generator print it in their failure messages."""
import os
import random
import zlib

import numpy as np
import pytest
import torch

TEST_SEED = int(os.environ.get("TEST_SEED", "0"))


def pytest_report_header(config):
    return f"TEST_SEED={TEST_SEED} (each test's seed: crc32 of its node id + TEST_SEED)"


@pytest.fixture(autouse=True)
def _fixed_seed(request):
    seed = (zlib.crc32(request.node.nodeid.encode()) + TEST_SEED) % (1 << 31)
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
