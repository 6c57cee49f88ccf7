"""union_graph_triton (and the union_csr kernels it shares with the Laplacian assembly) vs the torch reference
union_graph_torch, and a dense numpy oracle for generic directed graphs."""

import kernel_fixtures  # skips this module without triton
import numpy as np
import pytest
import torch

from spectra_gpu.kernels import union_graph as ku
from spectra_gpu.ops.union_graph import union_graph_torch

device, poison = kernel_fixtures.device, kernel_fixtures.poison  # CPU-interpreter/CUDA device; poisoned outputs
SENTINEL = kernel_fixtures.SENTINEL



@pytest.mark.parametrize("n,k,integer", [(37, 3, False), (20, 1, False), (16, 15, False), (64, 8, False),
                                         (40, 4, True)])
@pytest.mark.parametrize("weighted", [False, True])
def test_union_graph_triton_equals_torch(device, n, k, integer, weighted):
    """Same Graph, bit for bit: edge order, payload (min of the two directed d^2) and weights."""
    _, knn = kernel_fixtures.knn_lists(n, 6, k, device, integer=integer)
    g = union_graph_torch(knn, weighted=weighted)
    gt = ku.union_graph_triton(knn, weighted=weighted)
    for f in ("row", "col", "weight", "sqdist"):
        assert torch.equal(getattr(gt, f), getattr(g, f)), f
    if k == n - 1:
        assert gt.num_edges == n * (n - 1) // 2  # k = N - 1: the complete graph


def test_union_csr_generic_directed_graph_vs_dense_oracle(device):
    """Variable list lengths, empty lists, reciprocal and one-sided edges against a dense numpy union."""
    rng = np.random.default_rng(5)
    n = 40
    lists = [rng.choice(n - 1, size=rng.integers(0, 9), replace=False) for _ in range(n)]
    lists = [np.where(li >= i, li + 1, li) for i, li in enumerate(lists)]  # no self loops
    lists[7] = np.array([], dtype=np.int64)
    pay = [rng.random(len(li)) for li in lists]
    dense = np.full((n, n), np.inf)
    for i, (li, p) in enumerate(zip(lists, pay, strict=True)):
        dense[i, li] = np.minimum(dense[i, li], p)
    sym = np.minimum(dense, dense.T)  # union; a reciprocal pair keeps the smaller payload
    rowptr_d = torch.tensor(np.concatenate([[0], np.cumsum([len(li) for li in lists])]), device=device)
    col_d = torch.tensor(np.concatenate(lists).astype(np.int64), device=device)
    pay_d = torch.tensor(np.concatenate(pay), device=device)
    u = ku.union_csr(rowptr_d, col_d, pay_d)
    rows, col, payload = u.rows().cpu().numpy(), u.col.cpu().numpy(), u.payload.cpu().numpy()
    got = np.full((n, n), np.inf)
    got[rows, col] = payload
    np.fill_diagonal(sym, 0.0)  # the diagonal entry is stored with payload 0
    np.testing.assert_array_equal(got, sym)
    assert len(col) == int(np.isfinite(sym).sum())  # no duplicate entries
    for r in range(n):  # sorted, unique columns per row
        seg = col[int(u.rowptr[r]):int(u.rowptr[r + 1])]
        assert np.all(np.diff(seg) > 0)


def test_union_csr_validates_inputs(device):
    with pytest.raises(ValueError, match="node ids"):
        ku.union_csr(torch.tensor([0, 1, 2], device=device), torch.tensor([1, 5], device=device),
                     torch.ones(2, dtype=torch.float64, device=device))
    with pytest.raises(TypeError, match="dtype"):
        ku.union_csr(torch.tensor([0, 1], device=device), torch.tensor([0], device=device),
                     torch.ones(1, dtype=torch.float32, device=device))
