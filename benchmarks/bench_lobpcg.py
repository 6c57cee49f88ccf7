"""lobpcg: the s = 32 dominant pairs of the score's pencil L_X u = lam (L_Y + c 1 1^T) u with the score's damped
Neumann preconditioner, solved by the torch reference and by the CuPy backend (cupyx lobpcg over the same
operators), on the kNN graphs of two synthetic layers. Both must converge to the same eigenvalues.

On a CUDA machine with cupy: python -m pytest benchmarks/bench_lobpcg.py --benchmark-json benchmarks/results/<file>.json
"""

from __future__ import annotations

import pytest
import torch
from _bench import knn_lists, skip_unless_runnable, timed

from spectra_gpu.backends.cupy import lobpcg_cupy
from spectra_gpu.ops.graph_laplacian import graph_laplacian_torch
from spectra_gpu.ops.knn_graph import KnnGraph
from spectra_gpu.ops.laplacian_apply import laplacian_apply_torch
from spectra_gpu.ops.lobpcg import lobpcg_torch
from spectra_gpu.ops.union_graph import union_graph_torch
from spectra_gpu.scoring.spectral import _damping

# GPU benchmarks (`-m cuda` selects them); on a CPU only the torch reference at the small shapes runs, once
pytestmark = pytest.mark.cuda


def _pencil(name: str):
    lists = knn_lists(name, 2)
    gx, gy = (union_graph_torch(KnnGraph(lists.idx[i], lists.sqdist[i])) for i in range(2))
    lx, ly = graph_laplacian_torch(gx), graph_laplacian_torch(gy)
    n = gx.n
    deg = gy.degree()
    c = float(deg.mean()) / n
    jac = (1.0 / (deg + c))[:, None]

    def bmul(v):
        return laplacian_apply_torch(ly, v, c)

    w = _damping(bmul, jac, c, seed=0)

    def prec(r):
        z = r * jac
        return 2 * z - w * (jac * bmul(z))

    return lx, bmul, prec


@pytest.mark.parametrize("name", ["small", "llama7b"])
@pytest.mark.parametrize("provider", ["cupy", "torch"])
def test_lobpcg(benchmark, name, provider):
    skip_unless_runnable(provider, name)
    lx, bmul, prec = _pencil(name)
    n = lx.shape[0]
    fn = {"torch": lobpcg_torch, "cupy": lobpcg_cupy}[provider]

    def solve():
        return fn(lambda v: laplacian_apply_torch(lx, v), 32, bmul, m=prec, n=n, tol=1e-6, maxiter=1000,
                  device=lx.device, warn=False)

    benchmark.group = f"lobpcg-{name}-N{n}-s32"
    res = timed(benchmark, solve, rounds=1 if name == "small" else 2)
    assert res.converged
    if provider == "cupy":
        ref = lobpcg_torch(lambda v: laplacian_apply_torch(lx, v), 32, bmul, m=prec, n=n, tol=1e-6, maxiter=1000)
        torch.testing.assert_close(res.eigenvalues, ref.eigenvalues, rtol=1e-5, atol=1e-8)
    benchmark.extra_info.update(iterations=res.iterations, residual_max=float(res.residuals.max()))
