"""union_graph: the torch reference's symmetrisation, the minimum-spanning-tree connectivity repair and its
NumericalWarning, the degenerate-bandwidth default, and the public op's boundary checks."""

import pytest
import torch

import spectra_gpu as sg
from spectra_gpu.backends import union_graph
from spectra_gpu.ops.graph_laplacian import graph_laplacian_dense
from spectra_gpu.ops.knn_graph import KnnGraph, SqDist, knn_graph_torch
from spectra_gpu.ops.union_graph import components, connect, edge_bandwidth, union_graph_torch


def test_union_symmetrisation():
    x = torch.randn(40, 3, dtype=torch.float64)
    knn = knn_graph_torch(x, 3)
    g = union_graph_torch(knn)
    w = graph_laplacian_dense(g)
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
    g = union_graph_torch(knn_graph_torch(x, 3))
    assert components(g)[0] == 3
    with pytest.warns(sg.NumericalWarning, match="clusters had 3 components; added 2 minimum-spanning-tree edges"):
        g2 = connect(g, d, name="clusters")
    assert components(g2)[0] == 1
    assert g2.repairs == {"components_before": 3, "edges_added": 2}
    # the added edges are the closest inter-cluster pairs
    edges = set(zip(g.row.tolist(), g.col.tolist(), strict=True))
    added = set(zip(g2.row.tolist(), g2.col.tolist(), strict=True)) - edges
    dm = torch.cdist(x, x) ** 2
    lab = torch.tensor([0] * 15 + [1] * 15 + [2] * 10)
    best01 = dm[lab == 0][:, lab == 1].min()
    assert any(abs(float(dm[p, q]) - float(best01)) < 1e-9 or lab[p] == 2 or lab[q] == 2 for p, q in added)
    assert len(added) == 2


def test_connected_graph_is_returned_as_is_without_warning(recwarn):
    x = torch.randn(30, 3, dtype=torch.float64)
    g = union_graph_torch(knn_graph_torch(x, 5))
    assert components(g)[0] == 1
    assert connect(g, SqDist(x)) is g
    assert not [w for w in recwarn if issubclass(w.category, sg.NumericalWarning)]


def test_zero_median_bandwidth_defaults_to_one_and_warns():
    assert edge_bandwidth(torch.tensor([0.5, 2.0, 4.0], dtype=torch.float64)) == 2.0
    with pytest.warns(sg.NumericalWarning, match="median squared edge length is 0"):
        assert edge_bandwidth(torch.tensor([0.0, 0.0, 3.0], dtype=torch.float64)) == 1.0
    x = torch.zeros(6, 2, dtype=torch.float64)
    x[3:] = 1.0  # two triples of duplicates: most kNN distances are 0
    with pytest.warns(sg.NumericalWarning, match="bandwidth sigma\\^2 = 1"):
        g = union_graph_torch(knn_graph_torch(x, 2), weighted=True)
    assert bool((g.weight[g.sqdist == 0] == 1.0).all())


def test_public_op_matches_reference_and_checks_input():
    knn = knn_graph_torch(torch.randn(25, 4, dtype=torch.float64), 3)
    for f in ("row", "col", "weight", "sqdist"):
        assert torch.equal(getattr(union_graph(knn, weighted=True), f),
                           getattr(union_graph_torch(knn, weighted=True), f))
    with pytest.raises(TypeError, match="knn: expected a KnnGraph, got Tensor"):
        union_graph(knn.idx)
    with pytest.raises(ValueError, match=r"knn: expected idx and sqdist of one shape \[N, K\]"):
        union_graph(KnnGraph(knn.idx[None], knn.sqdist[None]))
