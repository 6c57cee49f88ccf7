"""Fixtures of the kernel tests (a plain module, not a conftest.py: tests/conftest.py is imported by name as
`conftest` elsewhere, and a second conftest.py on sys.path would shadow it).

Kernel tests run twice where they can: on CPU tensors under the Triton interpreter (CI; tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports triton) and on CUDA tensors on a GPU machine (run there with
TRITON_INTERPRET=0). Every kernel output buffer is NaN/sentinel-poisoned before the launch."""

import os

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")

from spectra_gpu.kernels import _utils  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(_utils, "POISON", True)
    yield


@pytest.fixture(params=[
    pytest.param("cpu", id="interp"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.cuda),
])
def device(request):
    if request.param == "cpu" and not INTERPRET:
        pytest.skip("CPU kernel runs need TRITON_INTERPRET=1 set before triton is imported")
    if request.param == "cuda" and (INTERPRET or not torch.cuda.is_available()):
        pytest.skip("needs a CUDA GPU and TRITON_INTERPRET unset (compiled kernels, not the interpreter)")
    return torch.device(request.param)


SENTINEL = torch.iinfo(torch.int64).min  # what poisoned int64 buffers hold until a kernel writes them


def knn_lists(n, d, k, device, seed=0, integer=False):
    """(points [n, d] on the CPU, their reference KnnGraph on ``device``); ``integer``: small-integer points, whose
    distances are exact in fp32 (real ties)."""
    from spectra_gpu.ops.knn_graph import KnnGraph, knn_graph_torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 3, (n, d), generator=g).float() if integer else torch.randn(n, d, generator=g)
    knn = knn_graph_torch(x, k)
    return x, KnnGraph(knn.idx.to(device), knn.sqdist.to(device))


def assert_csr_equal(a, r, atol=1e-12):
    """Kernel CSR ``a`` fully written and equal to the reference ``r``: same pattern, values within ``atol``."""
    assert not torch.isnan(a.values()).any() and not (a.col_indices() == SENTINEL).any()
    assert torch.equal(a.crow_indices().cpu(), r.crow_indices().cpu())
    assert torch.equal(a.col_indices().cpu(), r.col_indices().cpu())
    torch.testing.assert_close(a.values().cpu(), r.values().cpu(), rtol=0, atol=atol)
