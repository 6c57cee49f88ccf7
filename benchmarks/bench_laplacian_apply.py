"""laplacian_apply: (L_Y + c 1 1^T) X, LOBPCG's B operator, X [N, 40] fp64: the Triton SpMM with the fused
rank-one term against the torch reference (CSR matmul + broadcast add). Agreement is asserted before timing.

On a CUDA machine: python -m pytest benchmarks/bench_laplacian_apply.py --benchmark-json benchmarks/results/<file>.json
"""

from __future__ import annotations

import pytest
import torch
from _bench import DEVICE, LOBPCG_BLOCK, K, knn_lists, median_seconds, skip_unless_runnable, timed

from spectra_gpu.ops.graph_laplacian import graph_laplacian_torch
from spectra_gpu.ops.knn_graph import KnnGraph
from spectra_gpu.ops.laplacian_apply import laplacian_apply_torch
from spectra_gpu.ops.union_graph import union_graph_torch

# GPU benchmarks (`-m cuda` selects them); on a CPU only the torch reference at the small shapes runs, once
pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("name", ["small", "llama7b", "llama3_8b"])
@pytest.mark.parametrize("provider", ["triton", "torch"])
def test_laplacian_apply(benchmark, name, provider):
    skip_unless_runnable(provider, name)
    lists = knn_lists(name, 1)
    lap = graph_laplacian_torch(union_graph_torch(KnnGraph(lists.idx[0], lists.sqdist[0])))
    n = lap.shape[0]
    x = torch.randn(n, LOBPCG_BLOCK, dtype=torch.float64, device=DEVICE)
    c = 1.5 * K / n
    if provider == "triton":
        from spectra_gpu.kernels.laplacian_apply import laplacian_apply_triton as fn
    else:
        fn = laplacian_apply_torch
    torch.testing.assert_close(fn(lap, x, c), laplacian_apply_torch(lap, x, c), rtol=1e-12, atol=1e-12)
    nnz = lap.values().numel()
    benchmark.group = f"laplacian_apply-{name}-N{n}-nnz{nnz}-C{LOBPCG_BLOCK}"
    timed(benchmark, lambda: fn(lap, x, c), rounds=20)
    t = median_seconds(benchmark)
    if t:  # bytes if every gathered X row came from DRAM: an upper bound on traffic
        benchmark.extra_info["gbps_upper"] = (nnz * 16 + nnz * LOBPCG_BLOCK * 8 + n * LOBPCG_BLOCK * 8) / t / 1e9
