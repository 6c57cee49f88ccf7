"""knn_graph: the torch reference against a numpy brute force (ties, Gram path, batches) and the public op's
boundary checks."""

import numpy as np
import pytest
import torch

import spectra_gpu as sg
from spectra_gpu.ops.knn_graph import SqDist, knn_from_sqdist, knn_graph_torch, knn_symmetric


def brute(x, k):
    x = np.asarray(x, dtype=np.float64)
    d2 = ((x[:, None] - x[None]) ** 2).sum(-1)
    np.fill_diagonal(d2, np.inf)
    idx = np.argsort(d2, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(d2, idx, 1)


@pytest.mark.parametrize("n,d,k", [(7, 3, 1), (50, 8, 10), (33, 1, 32), (300, 64, 10)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_knn_graph_matches_brute_force(n, d, k, dtype):
    x = torch.randn(n, d, dtype=dtype)
    g = sg.knn_graph(x, k)
    idx, d2 = brute(x.double(), k)
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    np.testing.assert_allclose(g.sqdist.numpy(), d2, rtol=tol, atol=tol * d2.max())
    if dtype == torch.float64:
        np.testing.assert_array_equal(g.idx.numpy(), idx)


def test_knn_ties_go_to_lower_index():
    # points on a line: 0, 1, 2, 3 ; node 1 and 2 each have two neighbours at distance 1
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0], [1.0]])  # node 4 duplicates node 1
    g = sg.knn_graph(x, 2)
    assert g.idx[0].tolist() == [1, 4]  # tie at d=1 between 1 and 4 -> lower index first
    assert g.idx[2].tolist() == [1, 3]  # 1, 3, 4 all at distance 1 -> lowest two
    assert g.idx[1].tolist()[0] == 4  # its duplicate at distance 0


def test_knn_from_gram_equals_rows():
    x = torch.randn(80, 20, dtype=torch.float64)
    a = knn_graph_torch(x, 5)
    b = knn_from_sqdist(SqDist(gram=x @ x.T), 5)
    assert torch.equal(a.idx, b.idx)
    torch.testing.assert_close(a.sqdist, b.sqdist)


def test_knn_half_precision_is_upcast():
    x = torch.randn(40, 16)
    g16 = sg.knn_graph(x.half(), 3)
    g32 = sg.knn_graph(x.half().float(), 3)
    assert torch.equal(g16.idx, g32.idx)


def test_knn_non_contiguous_input():
    x = torch.randn(16, 60, dtype=torch.float64)[:, ::2].T  # [30, 16] non-contiguous
    assert not x.is_contiguous()
    g = sg.knn_graph(x, 4)
    idx, _ = brute(x, 4)
    np.testing.assert_array_equal(g.idx.numpy(), idx)


@pytest.mark.parametrize("bad,exc,match", [
    (lambda: sg.knn_graph(torch.randn(5), 2), ValueError, "2-D"),
    (lambda: sg.knn_graph(torch.randn(5, 2), 5), ValueError, "1 <= k < N=5"),
    (lambda: sg.knn_graph(torch.ones(5, 2, dtype=torch.int64), 2), TypeError, "float"),
    (lambda: sg.knn_graph(torch.tensor([[0.0], [float("nan")], [1.0]]), 1), ValueError, "NaN"),
])
def test_knn_bad_input(bad, exc, match):
    with pytest.raises(exc, match=match):
        bad()


@pytest.mark.parametrize("block", [1, 4, 7, 64])
@pytest.mark.parametrize("k", [1, 3, 22])
def test_symmetric_blocked_knn_matches_brute_force_with_ties(block, k):
    g = torch.Generator().manual_seed(block * 31 + k)
    x = torch.randint(0, 3, (23, 2), generator=g).double()  # a 3x3 grid: many duplicates and equal distances
    got = knn_symmetric(SqDist(x), k, block=block)
    idx, d2 = brute(x, k)
    np.testing.assert_array_equal(got.idx.numpy(), idx)
    np.testing.assert_allclose(got.sqdist.numpy(), d2)


def test_batched_reference_pads_and_matches_each_layer():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 20, 4, generator=g, dtype=torch.float64)
    got = knn_graph_torch(x, 3, [20, 7, 12])
    assert got.idx.shape == got.sqdist.shape == (3, 20, 3) and got.k == 3
    for b, n in enumerate([20, 7, 12]):
        idx, d2 = brute(x[b, :n], 3)
        np.testing.assert_array_equal(got.idx[b, :n].numpy(), idx)
        np.testing.assert_allclose(got.sqdist[b, :n].numpy(), d2)
        assert bool((got.idx[b, n:] == -1).all()) and bool(torch.isinf(got.sqdist[b, n:]).all())
    flat = knn_graph_torch(x[0], 3)
    assert torch.equal(knn_graph_torch(x[:1], 3).idx[0], flat.idx)
    with pytest.raises(ValueError, match=r"lengths: expected every row count in \[2, N=20\]"):
        knn_graph_torch(x, 3, [20, 1, 5])
