"""The ``laplacian_apply`` op in Triton: (L + shift 1 1^T) X for a sparse CSR L, the rank-one term (shift x column
sums, one torch.sum) fused into the epilogue: LOBPCG's B operator B = L_Y + (dbar/N) 1 1^T in one pass over L.
A block of BLOCK_R rows walks its rows' entries in lockstep, gathering BLOCK_C-wide slices of X rows (the
sliced-ELL view of a CSR matrix, built on the fly). Contract and reference:
``spectra_gpu.ops.laplacian_apply.laplacian_apply_torch``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import INTERPRET, alloc, check_device, check_tensor, next_pow2

# shape legend: N nodes, C columns of the LOBPCG block
_ROWS = 32 if INTERPRET else 64  # rows per program, walking their entries in lockstep


@triton.jit
def _laplacian_apply_kernel(rowptr_ptr, col_ptr, val_ptr, x_ptr, rank1_ptr, y_ptr, R, C,
                            stride_xr, stride_xc, stride_yr, stride_yc,
                            HAS_SHIFT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    r_ok = rows < R
    c_ok = cols < C
    s = tl.load(rowptr_ptr + rows, mask=r_ok, other=0)
    ln = tl.load(rowptr_ptr + rows + 1, mask=r_ok, other=0) - s
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=y_ptr.dtype.element_ty)
    for t in range(0, tl.max(ln, axis=0)):
        live = t < ln
        j = tl.load(col_ptr + s + t, mask=live, other=0)
        v = tl.load(val_ptr + s + t, mask=live, other=0.0)
        xj = tl.load(x_ptr + j[:, None] * stride_xr + cols[None, :] * stride_xc, mask=live[:, None] & c_ok[None, :],
                     other=0.0)
        acc += v[:, None] * xj
    if HAS_SHIFT:  # rank1 = shift * column sums of X, one value per column
        acc += tl.load(rank1_ptr + cols, mask=c_ok, other=0.0)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_yr + cols[None, :] * stride_yc, acc, mask=r_ok[:, None] & c_ok[None, :])


def laplacian_apply_triton(lap: torch.Tensor, x: torch.Tensor, shift: float = 0.0) -> torch.Tensor:
    """(L + shift 1 1^T) X for a sparse CSR L [N, N] and dense X [N, C] (float32/float64, any strides)."""
    if not isinstance(lap, torch.Tensor) or lap.layout != torch.sparse_csr or lap.dim() != 2 \
            or lap.shape[0] != lap.shape[1]:
        raise ValueError(f"lap: expected a square sparse CSR tensor, got {getattr(lap, 'layout', type(lap))} "
                         f"{tuple(getattr(lap, 'shape', ()))}")
    check_device(lap, "lap")
    check_tensor(x, "x", (2,), (torch.float32, torch.float64))
    n, c = x.shape
    if n != lap.shape[0] or lap.dtype != x.dtype or lap.device != x.device:
        raise ValueError(f"x: expected [{lap.shape[0]}, C] {lap.dtype} on {lap.device}, got {tuple(x.shape)} "
                         f"{x.dtype} on {x.device}")
    y = alloc([n, c], x.dtype, x.device)
    if c == 0:
        return y
    has_shift = float(shift) != 0.0
    # shift * colsum(X) in torch, the reference's own expression bit for bit (a Python float kernel argument
    # would be compiled as fp32 on a GPU)
    rank1 = shift * x.sum(dim=0) if has_shift else y
    block_c = min(64, next_pow2(c))
    grid = (triton.cdiv(n, _ROWS), triton.cdiv(c, block_c))
    _laplacian_apply_kernel[grid](lap.crow_indices(), lap.col_indices(), lap.values(), x, rank1, y, n, c,
                                  *x.stride(), *y.stride(), HAS_SHIFT=has_shift, BLOCK_R=_ROWS, BLOCK_C=block_c)
    return y

