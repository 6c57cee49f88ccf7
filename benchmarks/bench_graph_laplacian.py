"""graph_laplacian: L = D - W as CSR from a Graph's edge list (the registered op: Triton vs the torch reference),
and the batched assembly of a 32-layer model's Laplacians straight from their kNN lists (Llama-7B has 32 MLP
layers): one Triton pipeline (union + degrees + CSR) vs union_graph_torch + graph_laplacian_torch per layer.

On a CUDA machine: python -m pytest benchmarks/bench_graph_laplacian.py -k "small or llama7b" \
    --benchmark-json benchmarks/results/<gpu>_<date>_<sha>.json
"""

from __future__ import annotations

import pytest
import torch
from _bench import K, knn_lists, skip_unless_runnable, timed

from spectra_gpu.ops.graph_laplacian import graph_laplacian_batched_torch, graph_laplacian_torch
from spectra_gpu.ops.knn_graph import KnnGraph
from spectra_gpu.ops.union_graph import union_graph_torch

# GPU benchmarks (`-m cuda` selects them); on a CPU only the torch reference at the small shapes runs, once
pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("name", ["small", "llama7b", "llama3_8b"])
@pytest.mark.parametrize("provider", ["triton", "torch"])
def test_graph_laplacian(benchmark, name, provider):
    skip_unless_runnable(provider, name)
    lists = knn_lists(name, 1)
    g = union_graph_torch(KnnGraph(lists.idx[0], lists.sqdist[0]))
    if provider == "triton":
        from spectra_gpu.kernels.graph_laplacian import graph_laplacian_triton as fn

        got, want = fn(g), graph_laplacian_torch(g)  # the same CSR, once, outside the timing
        assert torch.equal(got.col_indices(), want.col_indices())
        torch.testing.assert_close(got.values(), want.values(), rtol=0, atol=1e-12)
    else:
        fn = graph_laplacian_torch
    benchmark.group = f"graph_laplacian-{name}-N{g.n}-E{g.num_edges}"
    timed(benchmark, lambda: fn(g), rounds=5)


@pytest.mark.parametrize("name", ["small", "llama7b"])
@pytest.mark.parametrize("provider", ["triton", "torch"])
def test_graph_laplacian_batched(benchmark, name, provider):
    """Union symmetrisation + degrees + CSR for 32 layers' kNN lists at once."""
    skip_unless_runnable(provider, name)
    knn = knn_lists(name, 32)
    if provider == "triton":
        from spectra_gpu.kernels.graph_laplacian import graph_laplacian_batched_triton as fn
    else:
        fn = graph_laplacian_batched_torch
    benchmark.group = f"graph_laplacian-batched-{name}-B32-N{knn.idx.shape[1]}-K{K}"
    timed(benchmark, lambda: fn(knn), rounds=3)
