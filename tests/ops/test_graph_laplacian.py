"""graph_laplacian: the torch reference (CSR and dense) against known spectra and D - W, and the public op's
boundary checks."""

import math

import pytest
import torch

import spectra_gpu as sg
from spectra_gpu.backends import graph_laplacian
from spectra_gpu.errors import BackendUnavailableError
from spectra_gpu.ops.graph_laplacian import graph_laplacian_batched_torch, graph_laplacian_dense, graph_laplacian_torch
from spectra_gpu.ops.knn_graph import KnnGraph, knn_graph_torch
from spectra_gpu.ops.union_graph import Graph, union_graph_torch


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
    g = union_graph_torch(knn_graph_torch(x, 4), weighted=True)
    ld = graph_laplacian_dense(g)
    torch.testing.assert_close(graph_laplacian_torch(g).to_dense(), ld)
    torch.testing.assert_close(ld.sum(1), torch.zeros(60, dtype=torch.float64))
    assert torch.equal(ld, ld.T)


def test_public_op_dense_and_dtype():
    g = union_graph_torch(knn_graph_torch(torch.randn(30, 4, dtype=torch.float64), 3))
    assert torch.equal(sg.graph_laplacian(g, dense=True), graph_laplacian_dense(g))
    lap = graph_laplacian(g, dtype=torch.float32, backend="torch")
    assert lap.layout == torch.sparse_csr and lap.dtype == torch.float32
    torch.testing.assert_close(lap.to_dense(), graph_laplacian_dense(g, torch.float32))


def test_batched_reference_is_one_csr_per_layer():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 30, 5, generator=g, dtype=torch.float64)
    knn = knn_graph_torch(x, 4, [30, 17])
    laps = graph_laplacian_batched_torch(knn, [30, 17], weighted=True)
    assert [lap.shape for lap in laps] == [(30, 30), (17, 17)]
    want = graph_laplacian_torch(union_graph_torch(knn_graph_torch(x[1, :17], 4), weighted=True))
    assert torch.equal(laps[1].to_dense(), want.to_dense())


@pytest.mark.parametrize("call,exc,match", [
    (lambda g: sg.graph_laplacian("graph"), TypeError, "g: expected a Graph, got str"),
    (lambda g: sg.graph_laplacian(g, dtype=torch.int64), TypeError, "floating torch.dtype"),
    (lambda g: sg.graph_laplacian(g, dense=True, backend="triton"), BackendUnavailableError,
     "dense=True is built by the torch reference only"),
    (lambda g: sg.graph_laplacian(g, backend="nope"), BackendUnavailableError, "unknown backend 'nope'"),
])
def test_graph_laplacian_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call(path_graph(4))


def test_knn_graph_type_is_reused_for_batches():
    assert KnnGraph(torch.zeros(2, 5, 3, dtype=torch.int64), torch.zeros(2, 5, 3)).k == 3
