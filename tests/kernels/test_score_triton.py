"""sg.score through the triton backend (kNN, union graph, Laplacian, SpMM kernels; LOBPCG over them) against the
torch backend on the same data. Call counters prove the kernels ran rather than a silent fallback."""

import kernel_fixtures  # skips this module without triton
import pytest
import torch

import spectra_gpu as sg
from spectra_gpu.kernels import graph_laplacian, knn_graph, laplacian_apply, union_graph

device, poison = kernel_fixtures.device, kernel_fixtures.poison  # CPU-interpreter/CUDA device; poisoned outputs


def relu_layer(n, m, seed):
    """pre/post signals [n units, m samples] of a random ReLU layer (tie-free)."""
    g = torch.Generator().manual_seed(seed)
    pre = torch.randn(n, 16, generator=g) @ torch.randn(16, m, generator=g) / 4 + 0.3 * torch.randn(n, 1, generator=g)
    return pre, torch.relu(pre)


@pytest.fixture
def calls(monkeypatch):
    counts = {"knn_graph_triton": 0, "union_csr": 0, "graph_laplacian_triton": 0, "laplacian_apply_triton": 0}

    def counted(mod, name):
        fn = getattr(mod, name)

        def wrapper(*a, **kw):
            counts[name] += 1
            return fn(*a, **kw)

        monkeypatch.setattr(mod, name, wrapper)

    counted(knn_graph, "knn_graph_triton")
    counted(union_graph, "union_csr")
    counted(graph_laplacian, "graph_laplacian_triton")
    counted(laplacian_apply, "laplacian_apply_triton")
    return counts


@pytest.mark.parametrize("solver,n,kwargs", [
    ("dense", 48, {"direction": "sym", "weighted": True}),
    ("lobpcg", 64, {}),
])
@pytest.mark.slow
def test_score_triton_matches_torch(device, calls, solver, n, kwargs):
    pre, post = relu_layer(n, 40, seed=1)
    pre, post = pre.to(device), post.to(device)
    ref = sg.score(pre, post, k=5, num_eigs=8, solver=solver, backend="torch", **kwargs)
    res = sg.score(pre, post, k=5, num_eigs=8, solver=solver, backend="triton", **kwargs)
    assert calls["knn_graph_triton"] == 2 and calls["union_csr"] >= 2
    if solver == "lobpcg":
        assert calls["graph_laplacian_triton"] == 2 and calls["laplacian_apply_triton"] > 0
        assert res.diagnostics["solver"]["converged"]
    assert res.diagnostics["solver"]["name"] == ref.diagnostics["solver"]["name"] == solver
    assert torch.equal(res.neighbors, ref.neighbors)
    # unit weights depend only on the neighbour sets (fp64 rounding apart); exp(-d^2/sigma^2) weights inherit
    # the last-bit differences of the fp32 distances (kernel tl.dot vs BLAS summation order)
    tol = 1e-5 if kwargs.get("weighted") else 1e-8
    torch.testing.assert_close(res.eigenvalues, ref.eigenvalues, rtol=tol, atol=tol)
    torch.testing.assert_close(res.scores, ref.scores, rtol=tol * 10, atol=tol * 10)


def test_score_env_var_selects_triton(device, calls, monkeypatch):
    pre, post = relu_layer(40, 32, seed=2)
    monkeypatch.setenv("SPECTRA_GPU_BACKEND", "triton")
    res = sg.score(pre.to(device), post.to(device), k=4, num_eigs=4)
    assert calls["knn_graph_triton"] == 2
    ref = sg.score(pre.to(device), post.to(device), k=4, num_eigs=4, backend="torch")
    torch.testing.assert_close(res.scores, ref.scores, rtol=1e-6, atol=1e-8)
