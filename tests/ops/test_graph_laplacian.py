import math
import warnings

import numpy as np
import pytest
import torch

import spectra_gpu as sg
from spectra_gpu.ops.knn import SqDist, knn_torch
from spectra_gpu.ops.laplacian import Graph, components, connect, laplacian_csr, laplacian_dense, union_graph


def path_graph(n):
    r = torch.arange(n - 1)
    return Graph(n, r, r + 1, torch.ones(n - 1, dtype=torch.float64), torch.ones(n - 1, dtype=torch.float64))


def cycle_graph(n):
    r = torch.arange(n)
    c = (r + 1) % n
    lo, hi = torch.minimum(r, c), torch.maximum(r, c)
    o = torch.argsort(lo * n + hi)
    return Graph(n, lo[o], hi[o], torch.ones(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64))


@pytest.mark.parametrize("n", [5, 12])
def test_path_and_cycle_spectra(n):
    lp = torch.linalg.eigvalsh(sg.graph_laplacian(path_graph(n)).to_dense())
    want = torch.tensor([2 - 2 * math.cos(math.pi * j / n) for j in range(n)], dtype=torch.float64)
    torch.testing.assert_close(lp, want.sort().values)
    lc = torch.linalg.eigvalsh(sg.graph_laplacian(cycle_graph(n)).to_dense())
    want = torch.tensor([2 - 2 * math.cos(2 * math.pi * j / n) for j in range(n)], dtype=torch.float64)
    torch.testing.assert_close(lc, want.sort().values)


def test_csr_equals_dense_and_rows_sum_to_zero():
    x = torch.randn(60, 5, dtype=torch.float64)
    g = union_graph(knn_torch(x, 4), weighted=True)
    ld = laplacian_dense(g)
    torch.testing.assert_close(laplacian_csr(g).to_dense(), ld)
    torch.testing.assert_close(ld.sum(1), torch.zeros(60, dtype=torch.float64))
    assert torch.equal(ld, ld.T)


def test_union_symmetrisation():
    x = torch.randn(40, 3, dtype=torch.float64)
    knn = knn_torch(x, 3)
    g = union_graph(knn)
    w = laplacian_dense(g)
    adj = (w < 0)
    for i in range(40):
        for j in knn.idx[i].tolist():
            assert adj[i, j] and adj[j, i]
    assert int(adj.sum()) == 2 * g.num_edges
    assert bool((g.row < g.col).all())


def test_connect_adds_spanning_edges_between_clusters():
    x = torch.cat([torch.randn(15, 4, dtype=torch.float64), torch.randn(15, 4, dtype=torch.float64) + 100,
                   torch.randn(10, 4, dtype=torch.float64) - 100])
    d = SqDist(x)
    g = union_graph(knn_torch(x, 3))
    assert components(g)[0] == 3
    g2 = connect(g, d)
    assert components(g2)[0] == 1
    assert g2.repairs == {"components_before": 3, "edges_added": 2}
    # the added edges are the closest inter-cluster pairs
    added = set(zip(g2.row.tolist(), g2.col.tolist())) - set(zip(g.row.tolist(), g.col.tolist()))
    dm = torch.cdist(x, x) ** 2
    lab = torch.tensor([0] * 15 + [1] * 15 + [2] * 10)
    best01 = dm[lab == 0][:, lab == 1].min()
    assert any(abs(float(dm[p, q]) - float(best01)) < 1e-9 or lab[p] == 2 or lab[q] == 2 for p, q in added)
    assert len(added) == 2
