"""Settings shared by the whole test session."""
from __future__ import annotations

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    # Every test runs tiny models or layers: on a shared 2-core machine one intra-op thread is faster
    # (a tiny UNet forward: ~25 ms on 1 thread, ~3 s on 2 under load) and far steadier.
    torch.set_num_threads(1)


@pytest.fixture
def fresh_accelerate():
    """Forget accelerate's process-wide state before and after a test that builds an Accelerator."""
    from train_utils import reset_accelerate

    reset_accelerate()
    yield
    reset_accelerate()
