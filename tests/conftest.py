import os

# Triton kernels run on CPU tensors under the interpreter; this must be set before any kernel module import.
os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)
    yield


@pytest.fixture
def one_thread():
    """torch on one thread for the test (restored after): results that must not depend on the thread count."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def relu_layer(n: int, m: int, d: int = 32, seed: int = 0, bias: float = 0.3):
    """pre/post signals of a random ReLU layer: [n units, m samples], tie-free."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(d, m, generator=g, dtype=torch.float64)
    w = torch.randn(n, d, generator=g, dtype=torch.float64) / d**0.5
    pre = w @ x + bias * torch.randn(n, 1, generator=g, dtype=torch.float64)
    return pre, torch.relu(pre)
