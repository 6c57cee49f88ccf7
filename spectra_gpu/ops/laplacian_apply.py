"""The ``laplacian_apply`` op's torch reference: X -> (L + shift 1 1^T) X for a sparse CSR Laplacian L.

LOBPCG's operators in the score are A = L_X and B = L_Y + (dbar/N) 1 1^T; the rank-one term is never formed.
The validated, dispatched entry points are ``spectra_gpu.backends.laplacian_apply`` and its bound form
``laplacian_operator``; the Triton implementation (rank-one term fused into the SpMM) is
``spectra_gpu.kernels.laplacian_apply.laplacian_apply_triton``.
"""

from __future__ import annotations

import torch


def laplacian_apply_torch(lap: torch.Tensor, x: torch.Tensor, shift: float = 0.0) -> torch.Tensor:
    """Reference (L + shift 1 1^T) X for a sparse (or dense) L [N, N] and dense X [N, C]."""
    if shift == 0.0:
        return lap @ x
    return lap @ x + shift * x.sum(dim=0, keepdim=True)
