"""Laplacian assembly from kNN lists and the Laplacian-apply (SpMM) operator for LOBPCG, as Triton kernels.

Assembly works on a directed graph given as adjacency lists (CSR: rowptr_d, col_d, one float payload per
edge): kNN lists are the case rowptr_d = arange * k; a Graph's upper-triangle edge list is another. Several
layers are one block-diagonal graph with global node ids. Steps, each a kernel (prefix sums are torch.cumsum):
1. _union_count: for every directed edge i->j, scan j's list for i (k compares for kNN lists). Mutual pairs
   keep the smaller payload (the same pair seen from both ends, as in the torch union_graph); for a
   one-sided edge j gains an in-edge (integer atomic add, so the count is deterministic).
2. _union_scatter: row i of the union = diagonal + i's own list + its one-sided in-edges. Own entries go to
   fixed slots; in-edges claim slots with an atomic cursor (arbitrary order, fixed by step 3).
3. _row_sort: each entry's final slot is its rank by column within the row (O(row length^2) compares;
   rows of kNN graphs are short), so the CSR has sorted, unique columns and is bitwise deterministic.
4. _laplacian_values: weights from the payloads (unit, exp(-d^2/sigma^2), or the payload itself), L = D - W
   with the degree on the diagonal (summed in column order).
_csr_spmm computes (L + shift 1 1^T) X with the rank-one term (shift x column sums, one torch.sum) fused into
the epilogue: LOBPCG's B operator B = L_Y + (dbar/N) 1 1^T in one pass over L. A block of BLOCK_R rows walks
its rows' entries in lockstep, gathering BLOCK_C-wide slices of X rows (the sliced-ELL view of a CSR matrix,
built on the fly).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..ops.knn import KnnGraph
from ..ops.laplacian import Graph, laplacian_csr, laplacian_operator, union_graph
from ._utils import INTERPRET, alloc, check_device, check_tensor, next_pow2

# shape legend: B layers, N nodes of one layer, R nodes of all layers, K neighbours, E directed edges,
# NNZ stored entries of the union CSR (diagonal included), C columns of the LOBPCG block
UNIT, EXP, GIVEN = 0, 1, 2  # how _laplacian_values turns an entry's payload into its weight
_BLOCK_E = 64 if INTERPRET else 256
_BLOCK_ROW = 32  # per-row kernels: kNN union rows hold ~1.2k + 1 entries (13 at k = 10); longer rows loop
_SPMM_ROWS = 32 if INTERPRET else 64  # rows per SpMM program, walking their entries in lockstep


@triton.jit
def _union_count_kernel(src_ptr, col_ptr, pay_ptr, rowptr_d_ptr, mutual_ptr, upay_ptr, cnt_ptr, E,
                        CHECK_MUTUAL: tl.constexpr, BLOCK_E: tl.constexpr):
    e = tl.program_id(0).to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)
    ok = e < E
    i = tl.load(src_ptr + e, mask=ok, other=0)
    j = tl.load(col_ptr + e, mask=ok, other=0)
    p = tl.load(pay_ptr + e, mask=ok, other=0.0)
    mutual = tl.zeros([BLOCK_E], dtype=tl.int1)
    if CHECK_MUTUAL:
        s = tl.load(rowptr_d_ptr + j, mask=ok, other=0)
        ln = tl.load(rowptr_d_ptr + j + 1, mask=ok, other=0) - s
        for t in range(0, tl.max(ln, axis=0)):
            live = ok & (t < ln)
            hit = live & (tl.load(col_ptr + s + t, mask=live, other=-1) == i)
            back = tl.load(pay_ptr + s + t, mask=hit, other=float("inf"))
            p = tl.where(hit, tl.minimum(p, back), p)
            mutual = mutual | hit
    tl.store(mutual_ptr + e, mutual.to(tl.int8), mask=ok)
    tl.store(upay_ptr + e, p, mask=ok)
    tl.atomic_add(cnt_ptr + j, 1, mask=ok & ~mutual)


@triton.jit
def _union_scatter_kernel(src_ptr, col_ptr, rowptr_d_ptr, mutual_ptr, upay_ptr, rowptr_ptr, cursor_ptr,
                          ucol_ptr, upay_u_ptr, E, BLOCK_E: tl.constexpr):
    e = tl.program_id(0).to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)
    ok = e < E
    i = tl.load(src_ptr + e, mask=ok, other=0)
    j = tl.load(col_ptr + e, mask=ok, other=0)
    p = tl.load(upay_ptr + e, mask=ok, other=0.0)
    own = tl.load(rowptr_ptr + i, mask=ok, other=0) + 1 + (e - tl.load(rowptr_d_ptr + i, mask=ok, other=0))
    tl.store(ucol_ptr + own, j, mask=ok)
    tl.store(upay_u_ptr + own, p, mask=ok)
    one_sided = ok & (tl.load(mutual_ptr + e, mask=ok, other=1) == 0)
    slot = tl.atomic_add(cursor_ptr + j, 1, mask=one_sided)
    outdeg_j = tl.load(rowptr_d_ptr + j + 1, mask=one_sided, other=0) - tl.load(rowptr_d_ptr + j, mask=one_sided,
                                                                                   other=0)
    pos = tl.load(rowptr_ptr + j, mask=one_sided, other=0) + 1 + outdeg_j + slot
    tl.store(ucol_ptr + pos, i, mask=one_sided)
    tl.store(upay_u_ptr + pos, p, mask=one_sided)


@triton.jit
def _row_sort_kernel(rowptr_ptr, ucol_ptr, upay_u_ptr, col_ptr, pay_ptr, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    s = tl.load(rowptr_ptr + r)
    ln = tl.load(rowptr_ptr + r + 1) - s - 1  # off-diagonal entries, stored unsorted at s+1 .. s+ln
    diag_rank = tl.zeros([BLOCK], dtype=tl.int64)
    for a0 in range(0, ln, BLOCK):
        ea = a0 + tl.arange(0, BLOCK)
        ok_a = ea < ln
        ca = tl.load(ucol_ptr + s + 1 + ea, mask=ok_a, other=0)
        pa = tl.load(upay_u_ptr + s + 1 + ea, mask=ok_a, other=0.0)
        rank = (ca > r).to(tl.int64)  # the diagonal precedes larger columns
        for b0 in range(0, ln, BLOCK):
            eb = b0 + tl.arange(0, BLOCK)
            cb = tl.load(ucol_ptr + s + 1 + eb, mask=eb < ln, other=0x7FFFFFFFFFFFFFFF)
            rank += tl.sum((cb[None, :] < ca[:, None]).to(tl.int64), axis=1)
        tl.store(col_ptr + s + rank, ca, mask=ok_a)
        tl.store(pay_ptr + s + rank, pa, mask=ok_a)
        diag_rank += (ok_a & (ca < r)).to(tl.int64)
    d = s + tl.sum(diag_rank, axis=0)
    tl.store(col_ptr + d, r)
    tl.store(pay_ptr + d, 0.0)


@triton.jit
def _laplacian_values_kernel(rowptr_ptr, col_ptr, pay_ptr, sigma2_ptr, val_ptr, deg_ptr,
                             MODE: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    s = tl.load(rowptr_ptr + r)
    ln = tl.load(rowptr_ptr + r + 1) - s
    deg = tl.zeros([BLOCK], dtype=tl.float64)
    dpos = tl.zeros([BLOCK], dtype=tl.int64)
    for a0 in range(0, ln, BLOCK):
        ea = a0 + tl.arange(0, BLOCK)
        ok = ea < ln
        c = tl.load(col_ptr + s + ea, mask=ok, other=-1)
        p = tl.load(pay_ptr + s + ea, mask=ok, other=0.0)
        if MODE == 0:
            w = tl.full([BLOCK], 1.0, dtype=tl.float64)
        elif MODE == 1:
            w = tl.exp(-p / tl.load(sigma2_ptr + r))
        else:
            w = p
        off = ok & (c != r)
        w = tl.where(off, w, 0.0)
        tl.store(val_ptr + s + ea, -w, mask=off)
        deg += w
        dpos += tl.where(c == r, ea, 0)
    deg_r = tl.sum(deg, axis=0)
    tl.store(val_ptr + s + tl.sum(dpos, axis=0), deg_r)
    tl.store(deg_ptr + r, deg_r)


@triton.jit
def _csr_spmm_kernel(rowptr_ptr, col_ptr, val_ptr, x_ptr, rank1_ptr, y_ptr, R, C,
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


@dataclass(frozen=True)
class UnionCsr:
    """Union-symmetrised graph on R nodes: sorted unique columns per row, diagonal included (payload 0).

    payload[e]: the min of the directed payloads of the entry's pair (squared distance for kNN lists)."""

    rowptr: torch.Tensor  # [R+1] int64
    col: torch.Tensor  # [NNZ] int64
    payload: torch.Tensor  # [NNZ] float64

    def rows(self) -> torch.Tensor:
        """The row of every entry [NNZ]."""
        n = self.rowptr.numel() - 1
        return torch.repeat_interleave(torch.arange(n, device=self.col.device), self.rowptr.diff())


def union_csr(rowptr_d: torch.Tensor, col_d: torch.Tensor, payload_d: torch.Tensor, *,
              check_mutual: bool = True) -> UnionCsr:
    """Union symmetrisation of a directed graph given as adjacency lists (no list may repeat a node).

    check_mutual=False asserts that no edge has its reverse in the input (an upper-triangle edge list) and
    skips the reverse lookups.
    """
    check_tensor(rowptr_d, "rowptr_d", (1,), (torch.int64,))
    check_tensor(col_d, "col_d", (1,), (torch.int64,))
    check_tensor(payload_d, "payload_d", (1,), (torch.float64,))
    n, e = rowptr_d.numel() - 1, col_d.numel()
    if n < 1 or payload_d.numel() != e:
        raise ValueError(f"expected rowptr_d [R+1] with R >= 1 and col_d, payload_d of one length, got "
                         f"{rowptr_d.numel()}, {e}, {payload_d.numel()}")
    dev = col_d.device
    if e and (int(rowptr_d[0]) != 0 or int(rowptr_d[-1]) != e or bool((rowptr_d.diff() < 0).any())
              or int(col_d.min()) < 0 or int(col_d.max()) >= n):
        raise ValueError(f"expected rowptr_d non-decreasing from 0 to E={e} and node ids in [0, {n})")
    rowptr_d, col_d, payload_d = rowptr_d.contiguous(), col_d.contiguous(), payload_d.contiguous()
    src = torch.repeat_interleave(torch.arange(n, device=dev), rowptr_d.diff())
    mutual = alloc([e], torch.int8, dev)
    upay = alloc([e], torch.float64, dev)
    cnt = torch.zeros(n, dtype=torch.int64, device=dev)  # atomic accumulators start at zero, never poisoned
    grid = (max(1, triton.cdiv(e, _BLOCK_E)),)
    if e:
        _union_count_kernel[grid](src, col_d, payload_d, rowptr_d, mutual, upay, cnt, e, CHECK_MUTUAL=check_mutual,
                                  BLOCK_E=_BLOCK_E)
    rowptr = torch.zeros(n + 1, dtype=torch.int64, device=dev)
    rowptr[1:] = torch.cumsum(rowptr_d.diff() + cnt + 1, 0)
    nnz = int(rowptr[-1])
    ucol = alloc([nnz], torch.int64, dev)
    upay_u = alloc([nnz], torch.float64, dev)
    cursor = torch.zeros(n, dtype=torch.int64, device=dev)
    if e:
        _union_scatter_kernel[grid](src, col_d, rowptr_d, mutual, upay, rowptr, cursor, ucol, upay_u, e,
                                    BLOCK_E=_BLOCK_E)
    col = alloc([nnz], torch.int64, dev)
    pay = alloc([nnz], torch.float64, dev)
    _row_sort_kernel[(n,)](rowptr, ucol, upay_u, col, pay, BLOCK=_BLOCK_ROW)
    return UnionCsr(rowptr, col, pay)


def laplacian_values(u: UnionCsr, mode: int, sigma2: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Values of L = D - W on the pattern of ``u`` and the degrees [R]. Weights: UNIT (1), EXP
    (exp(-payload / sigma2[row]), sigma2 [R] float64) or GIVEN (the payload is the weight)."""
    if mode not in (UNIT, EXP, GIVEN):
        raise ValueError(f"mode: expected UNIT, EXP or GIVEN, got {mode!r}")
    n = u.rowptr.numel() - 1
    if mode == EXP:
        if sigma2 is None or sigma2.shape != (n,) or sigma2.dtype != torch.float64:
            raise ValueError(f"sigma2: expected a float64 tensor [{n}] for mode EXP, got {sigma2!r}")
        check_device(sigma2, "sigma2")
    s2 = sigma2.contiguous() if sigma2 is not None else u.payload  # unused unless EXP
    val = alloc([u.col.numel()], torch.float64, u.col.device)
    deg = alloc([n], torch.float64, u.col.device)
    _laplacian_values_kernel[(n,)](u.rowptr, u.col, u.payload, s2, val, deg, MODE=mode, BLOCK=_BLOCK_ROW)
    return val, deg


def _sparse_csr(rowptr: torch.Tensor, col: torch.Tensor, val: torch.Tensor, n: int) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(rowptr, col, val, (n, n))


@dataclass(frozen=True)
class LaplacianBatch:
    """Combinatorial Laplacians of B layers as one block-diagonal CSR; columns are layer-local."""

    rowptr: torch.Tensor  # [R+1] int64 over all layers' rows
    col: torch.Tensor  # [NNZ] int64, layer-local
    val: torch.Tensor  # [NNZ] float64
    degree: torch.Tensor  # [R] float64
    row_offsets: torch.Tensor  # [B+1] int64 (CPU): layer b owns rows row_offsets[b] .. row_offsets[b+1]-1

    def layer(self, b: int) -> torch.Tensor:
        """Layer b's Laplacian as a torch sparse CSR tensor [N_b, N_b] (views where possible)."""
        r0, r1 = int(self.row_offsets[b]), int(self.row_offsets[b + 1])
        e0, e1 = int(self.rowptr[r0]), int(self.rowptr[r1])
        return _sparse_csr(self.rowptr[r0:r1 + 1] - e0, self.col[e0:e1], self.val[e0:e1], r1 - r0)


def laplacian_from_knn(idx: torch.Tensor, sqdist: torch.Tensor, lengths: Sequence[int] | torch.Tensor | None = None,
                       *, weighted: bool = False) -> LaplacianBatch:
    """Laplacians L = D - W of the union-symmetrised kNN graphs of B layers.

    idx [N, K] or [B, N, K] int64 layer-local neighbour ids, sqdist the matching squared distances (any float
    dtype); layer b uses its first ``lengths[b]`` rows. weighted: exp(-d^2/sigma^2) weights with sigma^2 the
    layer's median union-edge d^2 (as ops.laplacian.union_graph), else unit weights.
    """
    check_tensor(idx, "idx", (2, 3), (torch.int64,))
    check_tensor(sqdist, "sqdist", (2, 3), (torch.float16, torch.bfloat16, torch.float32, torch.float64))
    if sqdist.shape != idx.shape:
        raise ValueError(f"sqdist: expected the shape of idx {tuple(idx.shape)}, got {tuple(sqdist.shape)}")
    i3 = idx.unsqueeze(0) if idx.dim() == 2 else idx
    d3 = (sqdist.unsqueeze(0) if sqdist.dim() == 2 else sqdist).double()
    b, n_max, k = i3.shape
    lens = torch.full((b,), n_max) if lengths is None else torch.as_tensor(lengths).to("cpu", torch.int64)
    if lens.shape != (b,) or int(lens.min()) <= k or int(lens.max()) > n_max:
        raise ValueError(f"lengths: expected {b} row counts in [K+1={k + 1}, N={n_max}], got {lens.tolist()}")
    valid = torch.arange(n_max, device=idx.device)[None, :] < lens.to(idx.device)[:, None]
    nb = lens.to(idx.device)[:, None, None]
    if bool(((i3 < 0) | (i3 >= nb))[valid].any()):
        raise ValueError("idx: expected neighbour ids in [0, N_b) on every layer's valid rows")
    offsets = torch.zeros(b + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lens, 0)
    col_d = (i3 + offsets[:-1].to(idx.device)[:, None, None])[valid].reshape(-1)
    r = int(offsets[-1])
    rowptr_d = torch.arange(r + 1, device=idx.device, dtype=torch.int64) * k
    u = union_csr(rowptr_d, col_d, d3[valid].reshape(-1).contiguous())
    layer_of_row = torch.repeat_interleave(torch.arange(b, device=idx.device), lens.to(idx.device))
    rows = u.rows()
    if weighted:
        upper = u.col > rows
        sig = torch.empty(b, dtype=torch.float64, device=idx.device)
        for layer in range(b):
            med = float(torch.median(u.payload[upper & (layer_of_row[rows] == layer)]))
            sig[layer] = med if med > 0 else 1.0
        val, deg = laplacian_values(u, EXP, sig[layer_of_row].contiguous())
    else:
        val, deg = laplacian_values(u, UNIT)
    col_local = u.col - offsets.to(idx.device)[layer_of_row[rows]]
    return LaplacianBatch(u.rowptr, col_local, val, deg, offsets)


def laplacian_from_knn_torch(idx: torch.Tensor, sqdist: torch.Tensor,
                             lengths: Sequence[int] | torch.Tensor | None = None, *,
                             weighted: bool = False) -> list[torch.Tensor]:
    """Reference for :func:`laplacian_from_knn`: ops.laplacian.union_graph + laplacian_csr, layer by layer."""
    i3 = idx.unsqueeze(0) if idx.dim() == 2 else idx
    d3 = sqdist.unsqueeze(0) if sqdist.dim() == 2 else sqdist
    lens = [i3.shape[1]] * i3.shape[0] if lengths is None else [int(v) for v in torch.as_tensor(lengths).tolist()]
    return [laplacian_csr(union_graph(KnnGraph(i3[b, :n], d3[b, :n].double()), weighted=weighted))
            for b, n in enumerate(lens)]


def union_graph_triton(knn: KnnGraph, *, weighted: bool = False) -> Graph:
    """ops.laplacian.union_graph with the symmetrisation done by the kernels; same Graph, same numbers."""
    n, k = knn.idx.shape
    dev = knn.idx.device
    u = union_csr(torch.arange(n + 1, device=dev, dtype=torch.int64) * k, knn.idx.reshape(-1).contiguous(),
                  knn.sqdist.reshape(-1).double().contiguous())
    rows = u.rows()
    upper = u.col > rows
    ud2 = u.payload[upper]
    if weighted:
        sigma2 = float(torch.median(ud2))
        w = torch.exp(-ud2 / (sigma2 if sigma2 > 0 else 1.0))
    else:
        w = torch.ones_like(ud2)
    return Graph(n, rows[upper], u.col[upper], w, ud2)


def graph_laplacian_triton(g: Graph, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """ops.laplacian.laplacian_csr(g) assembled by the kernels from the Graph's edge list (sparse CSR)."""
    if dtype != torch.float64:
        raise TypeError(f"dtype: the Triton Laplacian assembles in float64, got {dtype}")
    dev = g.row.device
    rowptr_d = torch.zeros(g.n + 1, dtype=torch.int64, device=dev)
    rowptr_d[1:] = torch.cumsum(torch.bincount(g.row, minlength=g.n), 0)
    order = torch.argsort(g.row, stable=True)  # Graph edges are sorted by (row, col) already; cheap if so
    u = union_csr(rowptr_d, g.col[order].contiguous(), g.weight[order].double().contiguous(), check_mutual=False)
    val, _ = laplacian_values(u, GIVEN)
    return _sparse_csr(u.rowptr, u.col, val, g.n)


def laplacian_apply(lap: torch.Tensor, x: torch.Tensor, shift: float = 0.0) -> torch.Tensor:
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
    grid = (triton.cdiv(n, _SPMM_ROWS), triton.cdiv(c, block_c))
    _csr_spmm_kernel[grid](lap.crow_indices(), lap.col_indices(), lap.values(), x, rank1, y, n, c,
                           *x.stride(), *y.stride(), HAS_SHIFT=has_shift, BLOCK_R=_SPMM_ROWS, BLOCK_C=block_c)
    return y


def laplacian_apply_torch(lap: torch.Tensor, x: torch.Tensor, shift: float = 0.0) -> torch.Tensor:
    """Reference for :func:`laplacian_apply`: the torch operator the scoring engine uses."""
    return laplacian_operator(lap, shift)(x)
