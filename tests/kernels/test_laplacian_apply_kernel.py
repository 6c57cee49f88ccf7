"""laplacian_apply_triton (CSR SpMM with the fused rank-one term) vs the torch reference laplacian_apply_torch and
the dense operator."""

import kernel_fixtures  # skips this module without triton
import pytest
import torch

from spectra_gpu.kernels import laplacian_apply as ka
from spectra_gpu.ops.graph_laplacian import graph_laplacian_torch
from spectra_gpu.ops.laplacian_apply import laplacian_apply_torch
from spectra_gpu.ops.union_graph import union_graph_torch

device, poison = kernel_fixtures.device, kernel_fixtures.poison  # CPU-interpreter/CUDA device; poisoned outputs
SENTINEL = kernel_fixtures.SENTINEL



@pytest.mark.parametrize("c", [1, 13, 70])  # 70: two 64-wide column tiles
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shift", [0.0, 0.37])
def test_laplacian_apply_triton_matches_torch(device, c, dtype, shift):
    _, knn = kernel_fixtures.knn_lists(45, 6, 5, device)
    lap = graph_laplacian_torch(union_graph_torch(knn), dtype)
    x = torch.randn(c, 45, dtype=dtype, device=device).T  # non-contiguous [45, c]
    y = ka.laplacian_apply_triton(lap, x, shift)
    assert not torch.isnan(y).any()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(y, laplacian_apply_torch(lap, x, shift), rtol=tol, atol=tol)
    dense = lap.to_dense() + shift  # independent check: the dense operator
    torch.testing.assert_close(y, dense @ x, rtol=tol, atol=tol * 10)


def test_laplacian_apply_triton_validates_inputs(device):
    _, knn = kernel_fixtures.knn_lists(12, 3, 2, device)
    lap = graph_laplacian_torch(union_graph_torch(knn))
    with pytest.raises(ValueError, match="sparse CSR"):
        ka.laplacian_apply_triton(lap.to_dense(), torch.zeros(12, 2, dtype=torch.float64, device=device))
    with pytest.raises(ValueError, match=r"expected \[12, C\]"):
        ka.laplacian_apply_triton(lap, torch.zeros(11, 2, dtype=torch.float64, device=device))
    with pytest.raises(ValueError, match=r"expected \[12, C\]"):
        ka.laplacian_apply_triton(lap, torch.zeros(12, 2, dtype=torch.float32, device=device))
