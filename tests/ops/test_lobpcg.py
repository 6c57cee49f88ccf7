import numpy as np
import pytest
import scipy.linalg
import torch

import spectra_gpu as sg
from spectra_gpu.ops.knn import knn_torch
from spectra_gpu.ops.laplacian import laplacian_csr, laplacian_dense, union_graph


def pencil(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, n, generator=g, dtype=torch.float64)
    a = q @ q.T / n
    r = torch.randn(n, n, generator=g, dtype=torch.float64)
    b = r @ r.T / n + torch.eye(n, dtype=torch.float64)
    return a, b


def check_pairs(a, b, res, k, largest=True):
    lam_ref = scipy.linalg.eigh(a.numpy(), b.numpy(), eigvals_only=True)
    lam_ref = lam_ref[::-1][:k] if largest else lam_ref[:k]
    np.testing.assert_allclose(res.eigenvalues.numpy(), lam_ref, rtol=1e-6, atol=1e-8)
    u = res.eigenvectors
    torch.testing.assert_close(u.T @ b @ u, torch.eye(k, dtype=torch.float64), atol=1e-6, rtol=0)
    r = a @ u - b @ u * res.eigenvalues
    assert float(r.norm(dim=0).max()) < 1e-4 * float(a.norm())


def test_dense_generalized_matches_scipy():
    a, b = pencil(40)
    check_pairs(a, b, sg.generalized_eigh_dense(a, b, 6), 6)
    check_pairs(a, b, sg.generalized_eigh_dense(a, b, 6, largest=False), 6, largest=False)


@pytest.mark.parametrize("largest", [True, False])
def test_lobpcg_matches_scipy(largest):
    a, b = pencil(120, seed=1)
    res = sg.lobpcg(a, 5, b, largest=largest, tol=1e-9, maxiter=2000)
    assert res.converged
    check_pairs(a, b, res, 5, largest)


def test_lobpcg_laplacian_pencil_csr_with_callables():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(400, 12, generator=g, dtype=torch.float64)
    y = torch.relu(x @ torch.randn(12, 12, generator=g, dtype=torch.float64))
    gx, gy = union_graph(knn_torch(x, 8)), union_graph(knn_torch(y + 1e-3 * x, 8))
    lx, ly = laplacian_csr(gx), laplacian_csr(gy)
    n = 400
    c = float(gy.degree().mean()) / n
    b_dense = laplacian_dense(gy) + c
    res = sg.lobpcg(lx, 8, lambda v: ly @ v + c * v.sum(0, keepdim=True), n=n, tol=1e-8, maxiter=3000)
    assert res.converged
    check_pairs(laplacian_dense(gx), b_dense, res, 8)


def test_lobpcg_warns_when_not_converged():
    a, b = pencil(90, seed=2)
    with pytest.warns(sg.ConvergenceWarning, match="not converged"):
        res = sg.lobpcg(a, 4, b, tol=1e-14, maxiter=2)
    assert not res.converged and res.iterations == 2


def test_lobpcg_refuses_too_small_problem():
    a, b = pencil(10)
    with pytest.raises(ValueError, match="dense solver"):
        sg.lobpcg(a, 4, b)


def test_not_psd_b_raises():
    a, _ = pencil(6)
    with pytest.raises(sg.NotPSDError):
        sg.generalized_eigh_dense(a, -torch.eye(6, dtype=torch.float64), 2)
