"""Observer tests run many tiny tensor ops; on a small shared CPU, intra-op threads only add
synchronisation cost, so these tests use one thread (restored afterwards)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
