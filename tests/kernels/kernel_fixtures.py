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
