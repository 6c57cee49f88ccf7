"""The ``union_graph`` op in Triton: union symmetrisation of a directed graph given as adjacency lists (CSR:
rowptr_d, col_d, one float payload per edge). kNN lists are the case rowptr_d = arange * k; a Graph's
upper-triangle edge list is another (the Laplacian assembly of spectra_gpu.kernels.graph_laplacian reuses it).
Several layers are one block-diagonal graph with global node ids. Contract and reference of the op:
``spectra_gpu.ops.union_graph.union_graph_torch``. Steps, each a kernel (prefix sums are torch.cumsum):
1. _union_count: for every directed edge i->j, scan j's list for i (k compares for kNN lists). Mutual pairs
   keep the smaller payload (the same pair seen from both ends, as in the torch reference); for a
   one-sided edge j gains an in-edge (integer atomic add, so the count is deterministic).
2. _union_scatter: row i of the union = diagonal + i's own list + its one-sided in-edges. Own entries go to
   fixed slots; in-edges claim slots with an atomic cursor (arbitrary order, fixed by step 3).
3. _row_sort: each entry's final slot is its rank by column within the row (O(row length^2) compares;
   rows of kNN graphs are short), so the CSR has sorted, unique columns and is bitwise deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..ops.knn_graph import KnnGraph
from ..ops.union_graph import Graph, edge_bandwidth
from ._utils import INTERPRET, alloc, check_tensor

# shape legend: R nodes of all layers, K neighbours, E directed edges, NNZ stored entries of the union CSR
# (diagonal included)
_BLOCK_E = 64 if INTERPRET else 256
BLOCK_ROW = 32  # per-row kernels: kNN union rows hold ~1.2k + 1 entries (13 at k = 10); longer rows loop


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
    _row_sort_kernel[(n,)](rowptr, ucol, upay_u, col, pay, BLOCK=BLOCK_ROW)
    return UnionCsr(rowptr, col, pay)


def union_graph_triton(knn: KnnGraph, *, weighted: bool = False) -> Graph:
    """union_graph_torch with the symmetrisation done by the kernels; same Graph, same numbers."""
    n, k = knn.idx.shape
    dev = knn.idx.device
    u = union_csr(torch.arange(n + 1, device=dev, dtype=torch.int64) * k, knn.idx.reshape(-1).contiguous(),
                  knn.sqdist.reshape(-1).double().contiguous())
    rows = u.rows()
    upper = u.col > rows
    ud2 = u.payload[upper]
    w = torch.exp(-ud2 / edge_bandwidth(ud2)) if weighted else torch.ones_like(ud2)
    return Graph(n, rows[upper], u.col[upper], w, ud2)

