"""graph_laplacian_triton (from a Graph's edge list) and graph_laplacian_batched_triton (B layers' kNN lists at
once) vs the torch references graph_laplacian_torch / graph_laplacian_batched_torch (checked against dense D - W
and known spectra in tests/ops)."""

import kernel_fixtures  # skips this module without triton
import pytest
import torch

from spectra_gpu.errors import NumericalWarning
from spectra_gpu.kernels import graph_laplacian as kl
from spectra_gpu.ops.graph_laplacian import graph_laplacian_batched_torch, graph_laplacian_dense, graph_laplacian_torch
from spectra_gpu.ops.knn_graph import KnnGraph, SqDist, knn_graph_torch
from spectra_gpu.ops.union_graph import connect, union_graph_torch

device, poison = kernel_fixtures.device, kernel_fixtures.poison  # CPU-interpreter/CUDA device; poisoned outputs
SENTINEL = kernel_fixtures.SENTINEL




@pytest.mark.parametrize("lengths", [None, [50, 21, 34]])
@pytest.mark.parametrize("weighted", [False, True])
def test_graph_laplacian_batched_triton(device, lengths, weighted):
    b = 1 if lengths is None else len(lengths)
    x = torch.randn(b, 50, 7)
    knn = knn_graph_torch(x, 4, lengths)
    knn = KnnGraph(knn.idx.to(device), knn.sqdist.float().to(device))  # any float dtype; the kNN kernel's is fp32
    lb = kl.graph_laplacian_batched_triton(knn, lengths, weighted=weighted)
    assert not torch.isnan(lb.degree).any()
    ref = graph_laplacian_batched_torch(knn, lengths, weighted=weighted)
    for layer in range(b):
        lap = lb.layer(layer)
        kernel_fixtures.assert_csr_equal(lap, ref[layer])
        dense = lap.to_dense().cpu()
        torch.testing.assert_close(dense, dense.T, rtol=0, atol=0)
        torch.testing.assert_close(dense.sum(1), torch.zeros(dense.shape[0], dtype=torch.float64), rtol=0,
                                   atol=1e-12)
        r0, r1 = int(lb.row_offsets[layer]), int(lb.row_offsets[layer + 1])
        torch.testing.assert_close(lb.degree[r0:r1].cpu(), torch.diagonal(dense), rtol=0, atol=1e-12)


@pytest.mark.parametrize("weighted", [False, True])
def test_graph_laplacian_triton_with_repair_edges(device, weighted):
    """A kNN graph of two far-apart clusters plus its minimum-spanning-tree repair edge, vs graph_laplacian_torch."""
    g = torch.Generator().manual_seed(2)
    x = torch.cat([torch.randn(20, 5, generator=g), torch.randn(17, 5, generator=g) + 40.0])
    knn = knn_graph_torch(x, 3)
    with pytest.warns(NumericalWarning, match="2 components"):
        gr = connect(union_graph_torch(knn, weighted=weighted), SqDist(x.double()), weighted=weighted)
    assert gr.repairs["edges_added"] == 1
    gr = type(gr)(gr.n, gr.row.to(device), gr.col.to(device), gr.weight.to(device), gr.sqdist.to(device))
    lap = kl.graph_laplacian_triton(gr)
    kernel_fixtures.assert_csr_equal(lap, graph_laplacian_torch(gr))
    torch.testing.assert_close(lap.to_dense(), graph_laplacian_dense(gr), rtol=0, atol=1e-12)


def test_graph_laplacian_kernels_validate_inputs(device):
    _, knn = kernel_fixtures.knn_lists(12, 3, 2, device)
    bad = knn.idx[None].clone()
    bad[0, 3, 1] = 12
    with pytest.raises(ValueError, match="neighbour ids"):
        kl.graph_laplacian_batched_triton(KnnGraph(bad, knn.sqdist[None]))
    with pytest.raises(ValueError, match="lengths"):
        kl.graph_laplacian_batched_triton(KnnGraph(knn.idx[None], knn.sqdist[None]), [2])
    with pytest.raises(TypeError, match="float64"):
        kl.graph_laplacian_triton(union_graph_torch(knn), torch.float32)
