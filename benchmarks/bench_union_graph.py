"""union_graph: the Triton symmetrisation (union_csr kernels) against the torch reference (unique + scatter_reduce)
on one layer's kNN lists, unit and exp(-d^2/sigma^2) weights. The results must be the same Graph, checked once
per shape before timing.

On a CUDA machine: python -m pytest benchmarks/bench_union_graph.py --benchmark-json benchmarks/results/<file>.json
"""

from __future__ import annotations

import pytest
import torch
from _bench import K, knn_lists, skip_unless_runnable, timed

from spectra_gpu.ops.knn_graph import KnnGraph
from spectra_gpu.ops.union_graph import union_graph_torch

# GPU benchmarks (`-m cuda` selects them); on a CPU only the torch reference at the small shapes runs, once
pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("name", ["small", "llama7b", "llama3_8b"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unit", "exp"])
@pytest.mark.parametrize("provider", ["triton", "torch"])
def test_union_graph(benchmark, name, weighted, provider):
    skip_unless_runnable(provider, name)
    lists = knn_lists(name, 1)
    knn = KnnGraph(lists.idx[0], lists.sqdist[0])
    if provider == "triton":
        from spectra_gpu.kernels.union_graph import union_graph_triton as fn
    else:
        fn = union_graph_torch
    if provider == "triton":  # the same Graph as the reference, once, outside the timing
        got, want = fn(knn, weighted=weighted), union_graph_torch(knn, weighted=weighted)
        assert all(torch.equal(getattr(got, f), getattr(want, f)) for f in ("row", "col", "weight", "sqdist"))
    n = knn.idx.shape[0]
    benchmark.group = f"union_graph-{name}-N{n}-K{K}-{'exp' if weighted else 'unit'}"
    timed(benchmark, lambda: fn(knn, weighted=weighted), rounds=5)
