"""laplacian_apply: the torch reference against the dense operator, the bound operator form, and the public
op's boundary checks."""

import pytest
import torch

from spectra_gpu.backends import laplacian_apply, laplacian_operator
from spectra_gpu.ops.graph_laplacian import graph_laplacian_dense, graph_laplacian_torch
from spectra_gpu.ops.knn_graph import knn_graph_torch
from spectra_gpu.ops.laplacian_apply import laplacian_apply_torch
from spectra_gpu.ops.union_graph import union_graph_torch


def _laplacian(n=40, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    graph = union_graph_torch(knn_graph_torch(torch.randn(n, 5, generator=g, dtype=torch.float64), k))
    return graph_laplacian_torch(graph), graph_laplacian_dense(graph)


@pytest.mark.parametrize("shift", [0.0, 0.37])
@pytest.mark.parametrize("c", [1, 7])
def test_reference_matches_dense_operator(shift, c):
    lap, dense = _laplacian()
    x = torch.randn(c, 40, dtype=torch.float64).T  # non-contiguous [40, c]
    want = (dense + shift) @ x
    torch.testing.assert_close(laplacian_apply_torch(lap, x, shift), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(laplacian_apply(lap, x, shift), want, rtol=1e-12, atol=1e-12)
    assert torch.equal(laplacian_operator(lap, shift)(x), laplacian_apply_torch(lap, x, shift))


def test_constant_vector_is_in_the_null_space_only_without_shift():
    lap, _ = _laplacian()
    one = torch.ones(40, 1, dtype=torch.float64)
    torch.testing.assert_close(laplacian_apply_torch(lap, one), torch.zeros(40, 1, dtype=torch.float64), rtol=0,
                               atol=1e-12)
    torch.testing.assert_close(laplacian_apply_torch(lap, one, 0.5), torch.full((40, 1), 20.0, dtype=torch.float64))


def test_public_op_checks_input():
    lap, _ = _laplacian()
    with pytest.raises(ValueError, match=r"lap: expected a square 2-D tensor \[N, N\]"):
        laplacian_apply(torch.zeros(3, 4), torch.zeros(3, 1))
    with pytest.raises(ValueError, match=r"x: expected a 2-D tensor \[40, C\]"):
        laplacian_apply(lap, torch.zeros(39, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="lap: expected a square"):
        laplacian_operator(torch.zeros(5))
