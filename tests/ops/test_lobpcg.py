"""lobpcg and the dense solver: the torch reference against scipy's generalized eigh, its warnings (jitter,
non-convergence) and the public op's boundary checks."""

import numpy as np
import pytest
import scipy.linalg
import torch

import spectra_gpu as sg
from spectra_gpu.ops.graph_laplacian import graph_laplacian_dense, graph_laplacian_torch
from spectra_gpu.ops.knn_graph import knn_graph_torch
from spectra_gpu.ops.lobpcg import cholesky_jitter, lobpcg_torch
from spectra_gpu.ops.union_graph import union_graph_torch


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


@pytest.mark.slow
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
    gx, gy = union_graph_torch(knn_graph_torch(x, 8)), union_graph_torch(knn_graph_torch(y + 1e-3 * x, 8))
    lx, ly = graph_laplacian_torch(gx), graph_laplacian_torch(gy)
    n = 400
    c = float(gy.degree().mean()) / n
    b_dense = graph_laplacian_dense(gy) + c
    res = sg.lobpcg(lx, 8, lambda v: ly @ v + c * v.sum(0, keepdim=True), n=n, tol=1e-8, maxiter=3000)
    assert res.converged
    check_pairs(graph_laplacian_dense(gx), b_dense, res, 8)


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


def test_jitter_ladder_warns_and_keeps_the_factor():
    a, b = pencil(8, seed=4)
    assert torch.equal(cholesky_jitter(b), torch.linalg.cholesky(b))  # SPD: no jitter, no warning
    singular = torch.ones(5, 5, dtype=torch.float64)  # rank one: PSD, not PD
    with pytest.warns(sg.NumericalWarning, match="not positive definite in torch.float64; added 1e-12 x mean diag"):
        r = cholesky_jitter(singular)
    torch.testing.assert_close(r @ r.T, singular + 1e-12 * torch.eye(5, dtype=torch.float64), rtol=0, atol=1e-12)


def test_non_convergence_warning_is_a_numerical_warning_pointing_at_the_caller():
    a, b = pencil(90, seed=2)
    with pytest.warns(sg.NumericalWarning) as rec:
        sg.lobpcg(a, 4, b, tol=1e-14, maxiter=2)
    assert rec[0].category is sg.ConvergenceWarning and rec[0].filename == __file__


def test_public_op_is_the_reference_on_cpu():
    a, b = pencil(60, seed=3)
    ref = lobpcg_torch(a, 3, b, tol=1e-9, maxiter=500)
    got = sg.lobpcg(a, 3, b, tol=1e-9, maxiter=500)
    assert torch.equal(got.eigenvalues, ref.eigenvalues) and got.iterations == ref.iterations
    got = sg.lobpcg(lambda v: a @ v, 3, b, n=60, tol=1e-9, maxiter=500, backend="torch")
    assert torch.equal(got.eigenvalues, ref.eigenvalues)


@pytest.mark.parametrize("call,exc,match", [
    (lambda a, b: sg.lobpcg("a", 2, b), TypeError, "a: expected a matrix or a callable"),
    (lambda a, b: sg.lobpcg(a, 2, b, tol=0), ValueError, "tol: expected a positive float"),
    (lambda a, b: sg.lobpcg(lambda v: a @ v, 2, b), ValueError, "give n"),
    (lambda a, b: sg.lobpcg(a, 2.0, b), TypeError, "k: expected an int"),
    (lambda a, b: sg.lobpcg(a, 0, b), ValueError, "1 <= k <= block"),
])
def test_lobpcg_bad_input(call, exc, match):
    a, b = pencil(40)
    with pytest.raises(exc, match=match):
        call(a, b)
