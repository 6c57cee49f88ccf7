"""Laplacian assembly and SpMM kernels vs their torch references (ops.laplacian, checked against dense D - W and
known spectra in tests/ops) and a dense numpy oracle for generic directed graphs."""

import kernel_fixtures  # skips this module without triton
import numpy as np
import pytest
import torch

from spectra_gpu.kernels import laplacian as kl
from spectra_gpu.kernels.knn import knn_topk_torch
from spectra_gpu.ops.knn import KnnGraph, SqDist
from spectra_gpu.ops.laplacian import connect, laplacian_csr, laplacian_dense, union_graph

device, poison = kernel_fixtures.device, kernel_fixtures.poison  # CPU-interpreter/CUDA device; poisoned outputs

SENTINEL = torch.iinfo(torch.int64).min


def _knn(n, d, k, device, seed=0, integer=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 3, (n, d), generator=g).float() if integer else torch.randn(n, d, generator=g)
    idx, dist = knn_topk_torch(x, k)
    return x, KnnGraph(idx.to(device), dist.double().to(device))


def _assert_csr_equal(a, r, atol=1e-12):
    assert not torch.isnan(a.values()).any() and not (a.col_indices() == SENTINEL).any()
    assert torch.equal(a.crow_indices().cpu(), r.crow_indices().cpu())
    assert torch.equal(a.col_indices().cpu(), r.col_indices().cpu())
    torch.testing.assert_close(a.values().cpu(), r.values().cpu(), rtol=0, atol=atol)


@pytest.mark.parametrize("n,k,integer", [(37, 3, False), (20, 1, False), (16, 15, False), (64, 8, False),
                                         (40, 4, True)])
@pytest.mark.parametrize("weighted", [False, True])
def test_union_graph_triton_equals_torch(device, n, k, integer, weighted):
    """Same Graph, bit for bit: edge order, payload (min of the two directed d^2) and weights."""
    _, knn = _knn(n, 6, k, device, integer=integer)
    g = union_graph(knn, weighted=weighted)
    gt = kl.union_graph_triton(knn, weighted=weighted)
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
    u = kl.union_csr(rowptr_d, col_d, pay_d)
    rows, col, payload = u.rows().cpu().numpy(), u.col.cpu().numpy(), u.payload.cpu().numpy()
    got = np.full((n, n), np.inf)
    got[rows, col] = payload
    np.fill_diagonal(sym, 0.0)  # the diagonal entry is stored with payload 0
    np.testing.assert_array_equal(got, sym)
    assert len(col) == int(np.isfinite(sym).sum())  # no duplicate entries
    for r in range(n):  # sorted, unique columns per row
        seg = col[int(u.rowptr[r]):int(u.rowptr[r + 1])]
        assert np.all(np.diff(seg) > 0)


@pytest.mark.parametrize("lengths", [None, [50, 21, 34]])
@pytest.mark.parametrize("weighted", [False, True])
def test_laplacian_from_knn_batched(device, lengths, weighted):
    b = 1 if lengths is None else len(lengths)
    x = torch.randn(b, 50, 7)
    idx, dist = knn_topk_torch(x, 4, lengths)
    idx, dist = idx.to(device), dist.to(device)
    lb = kl.laplacian_from_knn(idx, dist, lengths, weighted=weighted)
    assert not torch.isnan(lb.degree).any()
    ref = kl.laplacian_from_knn_torch(idx, dist, lengths, weighted=weighted)
    for layer in range(b):
        lap = lb.layer(layer)
        _assert_csr_equal(lap, ref[layer])
        dense = lap.to_dense().cpu()
        torch.testing.assert_close(dense, dense.T, rtol=0, atol=0)
        torch.testing.assert_close(dense.sum(1), torch.zeros(dense.shape[0], dtype=torch.float64), rtol=0,
                                   atol=1e-12)
        r0, r1 = int(lb.row_offsets[layer]), int(lb.row_offsets[layer + 1])
        torch.testing.assert_close(lb.degree[r0:r1].cpu(), torch.diagonal(dense), rtol=0, atol=1e-12)


@pytest.mark.parametrize("weighted", [False, True])
def test_graph_laplacian_triton_with_repair_edges(device, weighted):
    """A kNN graph of two far-apart clusters plus its minimum-spanning-tree repair edge, vs laplacian_csr."""
    g = torch.Generator().manual_seed(2)
    x = torch.cat([torch.randn(20, 5, generator=g), torch.randn(17, 5, generator=g) + 40.0])
    idx, dist = knn_topk_torch(x, 3)
    gr = connect(union_graph(KnnGraph(idx, dist.double()), weighted=weighted), SqDist(x.double()),
                 weighted=weighted)
    assert gr.repairs["edges_added"] == 1
    gr = type(gr)(gr.n, gr.row.to(device), gr.col.to(device), gr.weight.to(device), gr.sqdist.to(device))
    lap = kl.graph_laplacian_triton(gr)
    _assert_csr_equal(lap, laplacian_csr(gr))
    torch.testing.assert_close(lap.to_dense(), laplacian_dense(gr), rtol=0, atol=1e-12)


@pytest.mark.parametrize("c", [1, 13, 70])  # 70: two 64-wide column tiles
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shift", [0.0, 0.37])
def test_laplacian_apply_matches_torch(device, c, dtype, shift):
    _, knn = _knn(45, 6, 5, device)
    lap = laplacian_csr(union_graph(knn), dtype)
    x = torch.randn(c, 45, dtype=dtype, device=device).T  # non-contiguous [45, c]
    y = kl.laplacian_apply(lap, x, shift)
    assert not torch.isnan(y).any()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(y, kl.laplacian_apply_torch(lap, x, shift), rtol=tol, atol=tol)
    dense = lap.to_dense() + shift  # independent check: the dense operator
    torch.testing.assert_close(y, dense @ x, rtol=tol, atol=tol * 10)


def test_kernels_validate_inputs(device):
    _, knn = _knn(12, 3, 2, device)
    lap = laplacian_csr(union_graph(knn))
    with pytest.raises(ValueError, match="sparse CSR"):
        kl.laplacian_apply(lap.to_dense(), torch.zeros(12, 2, dtype=torch.float64, device=device))
    with pytest.raises(ValueError, match=r"expected \[12, C\]"):
        kl.laplacian_apply(lap, torch.zeros(11, 2, dtype=torch.float64, device=device))
    with pytest.raises(ValueError, match=r"expected \[12, C\]"):
        kl.laplacian_apply(lap, torch.zeros(12, 2, dtype=torch.float32, device=device))
    with pytest.raises(ValueError, match="node ids"):
        kl.union_csr(torch.tensor([0, 1, 2], device=device), torch.tensor([1, 5], device=device),
                     torch.ones(2, dtype=torch.float64, device=device))
    with pytest.raises(TypeError, match="dtype"):
        kl.union_csr(torch.tensor([0, 1], device=device), torch.tensor([0], device=device),
                     torch.ones(1, dtype=torch.float32, device=device))
    bad = knn.idx[None].clone()
    bad[0, 3, 1] = 12
    with pytest.raises(ValueError, match="neighbour ids"):
        kl.laplacian_from_knn(bad, knn.sqdist[None])
    with pytest.raises(ValueError, match="lengths"):
        kl.laplacian_from_knn(knn.idx[None], knn.sqdist[None], [2])
