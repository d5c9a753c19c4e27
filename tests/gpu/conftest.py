"""tests/gpu runs only where CUDA is available; elsewhere every test here is skipped."""

import pytest
import torch


def pytest_runtest_setup(item: pytest.Item) -> None:
    # A runtest hook in this conftest is called only for items under tests/gpu.
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (tests/gpu)")
