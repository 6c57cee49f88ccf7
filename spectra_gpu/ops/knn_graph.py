"""The ``knn_graph`` op's data type and torch reference: exact Euclidean k-nearest-neighbour lists of the rows.

The reference is blocked: a row block of squared distances ``|x_i|^2 + |x_j|^2 - 2 x_i.x_j`` comes from
one matmul, ``topk`` keeps the k smallest, and the N x N matrix is never held. Its cost is that of one Gram
product X X^T, the floor for exact kNN. Ties are broken by the lower index (rows with any tie among their k+1
nearest are re-ranked with a stable sort), so the graph is deterministic.

The validated, dispatched entry point is ``spectra_gpu.backends.knn_graph``; the Triton implementation is
``spectra_gpu.kernels.knn_graph.knn_graph_triton``, with the same contract.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# shape legend: B layers, N units (graph nodes), D features (samples), K neighbours
_BLOCK_BYTES = 64 * 2**20  # one row block of distances: bounded memory, large enough for a fast matmul


@dataclass(frozen=True)
class KnnGraph:
    """k nearest neighbours of every node, nearest first, ties to the lower index. idx [N, K] int64 and sqdist
    [N, K] float64 (squared Euclidean distances). A batch of B layers holds [B, N, K]; rows at or past a layer's
    length are padding (index -1, distance +inf)."""

    idx: torch.Tensor
    sqdist: torch.Tensor

    @property
    def k(self) -> int:
        return int(self.idx.shape[-1])


class SqDist:
    """Row blocks of the squared Euclidean distance matrix of a point set, from its rows or its Gram matrix."""

    def __init__(self, x: torch.Tensor | None = None, *, gram: torch.Tensor | None = None) -> None:
        if (x is None) == (gram is None):
            raise ValueError("SqDist: give exactly one of x or gram")
        self.x: torch.Tensor | None
        self.gram: torch.Tensor | None
        if x is not None:
            if x.dtype in (torch.float16, torch.bfloat16):
                x = x.float()
            self.x, self.gram, self.sqn = x, None, (x * x).sum(dim=1)
            ref = x
        else:
            assert gram is not None
            self.x, self.gram, self.sqn = None, gram, torch.diagonal(gram).clone()
            ref = gram
        self.n = int(ref.shape[0])
        self.device = ref.device
        self.itemsize = ref.element_size()

    def block(self, s: int, e: int) -> torch.Tensor:
        """Squared distances of rows s:e to all rows, [e-s, N], clamped at 0."""
        if self.x is not None:
            g = self.x[s:e] @ self.x.T
        else:
            assert self.gram is not None
            g = self.gram[s:e]
        return (self.sqn[s:e, None] + self.sqn[None, :]).sub_(g, alpha=2.0).clamp_min_(0.0)

    def step(self) -> int:
        return max(1, min(self.n, _BLOCK_BYTES // max(1, self.n * self.itemsize)))


def _topk_rows(sq: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k smallest per row of a distance block ``sq`` [b, N] (self already +inf), ties to the lower index."""
    kk = min(k + 1, sq.shape[1])
    vals, idx = torch.topk(sq, kk, dim=1, largest=False, sorted=True)
    tied = (vals[:, 1:] == vals[:, :-1]).any(dim=1) if kk > 1 else torch.zeros_like(vals[:, 0], dtype=torch.bool)
    vals, idx = vals[:, :k], idx[:, :k]
    if bool(tied.any()):
        t = tied.nonzero().flatten()
        sv, si = torch.sort(sq[t], dim=1, stable=True)
        vals[t], idx[t] = sv[:, :k], si[:, :k]
    return vals, idx


def knn_from_sqdist(d: SqDist, k: int) -> KnnGraph:
    """Exact kNN by row blocks of the distance matrix (any SqDist; the path for a precomputed Gram)."""
    idx_out = torch.empty(d.n, k, dtype=torch.int64, device=d.device)
    d_out = torch.empty(d.n, k, dtype=torch.float64, device=d.device)
    step = d.step()
    for s in range(0, d.n, step):
        e = min(d.n, s + step)
        sq = d.block(s, e)
        r = torch.arange(e - s, device=d.device)
        sq[r, r + s] = float("inf")
        v, i = _topk_rows(sq, k)
        idx_out[s:e], d_out[s:e] = i, v.double()
    return KnnGraph(idx_out, d_out)


def _merge(bv: torch.Tensor, bi: torch.Tensor, v: torch.Tensor, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    kk = bv.shape[1]
    cv, ci = torch.cat([bv, v], 1), torch.cat([bi, i], 1)
    mv, mpos = torch.topk(cv, kk, dim=1, largest=False, sorted=True)
    return mv, torch.gather(ci, 1, mpos)


def knn_symmetric(d: SqDist, k: int, block: int = 2048) -> KnnGraph:
    """Exact kNN from the rows of a point set computing only the upper block triangle of X X^T.

    Distances are symmetric, so each off-diagonal tile (I, J) updates the running top-(k+1) of the rows of I
    and, through its transpose, of the rows of J: about half the flops of the full Gram product, which is the
    cost floor of the row-block method. Rows whose top-(k+1) holds a tie are re-ranked exactly (stable sort of
    the full row) so ties still go to the lower index.
    """
    assert d.x is not None
    x, sqn, n = d.x, d.sqn, d.n
    kk = min(k + 1, n - 1)
    bv = torch.full((n, kk), float("inf"), dtype=x.dtype, device=x.device)
    bi = torch.full((n, kk), -1, dtype=torch.int64, device=x.device)
    starts = list(range(0, n, block))
    for a, s0 in enumerate(starts):
        e0 = min(n, s0 + block)
        for s1 in starts[a:]:
            e1 = min(n, s1 + block)
            sq = (sqn[s0:e0, None] + sqn[None, s1:e1]).sub_(x[s0:e0] @ x[s1:e1].T, alpha=2.0).clamp_min_(0.0)
            if s0 == s1:
                r = torch.arange(e0 - s0, device=x.device)
                sq[r, r] = float("inf")
            t = min(kk, e1 - s1)
            v, i = torch.topk(sq, t, dim=1, largest=False, sorted=True)
            bv[s0:e0], bi[s0:e0] = _merge(bv[s0:e0], bi[s0:e0], v, i + s1)
            if s0 != s1:
                t = min(kk, e0 - s0)
                # topk along contiguous rows of the transposed copy: 1.2x faster than along dim 0
                v, i = torch.topk(sq.T.contiguous(), t, dim=1, largest=False, sorted=True)
                bv[s1:e1], bi[s1:e1] = _merge(bv[s1:e1], bi[s1:e1], v, i + s0)
    tied = (bv[:, 1:] == bv[:, :-1]).any(dim=1) if kk > 1 else torch.zeros(n, dtype=torch.bool, device=x.device)
    rows = tied.nonzero().flatten()
    for c in torch.split(rows, max(1, d.step())):
        sq = (sqn[c, None] + sqn[None, :]).sub_(x[c] @ x.T, alpha=2.0).clamp_min_(0.0)
        sq[torch.arange(len(c), device=x.device), c] = float("inf")
        sv, si = torch.sort(sq, dim=1, stable=True)
        bv[c], bi[c] = sv[:, :kk], si[:, :kk]
    return KnnGraph(bi[:, :k].contiguous(), bv[:, :k].double())


def layer_lengths(lengths: Sequence[int] | torch.Tensor | None, b: int, n_max: int) -> list[int]:
    """Row counts of B layers padded to n_max rows (all n_max when ``lengths`` is None), each in [2, n_max]."""
    if lengths is None:
        return [n_max] * b
    lens = torch.as_tensor(lengths).to("cpu")
    if lens.dim() != 1 or lens.numel() != b or lens.dtype.is_floating_point or lens.dtype == torch.bool:
        raise ValueError(f"lengths: expected {b} integer row counts (one per layer), got {lengths!r}")
    if int(lens.min()) < 2 or int(lens.max()) > n_max:
        raise ValueError(f"lengths: expected every row count in [2, N={n_max}], got {lens.tolist()}")
    return [int(v) for v in lens.tolist()]


def knn_graph_torch(x: torch.Tensor, k: int, lengths: Sequence[int] | torch.Tensor | None = None) -> KnnGraph:
    """Reference exact kNN of the rows of ``x`` [N, D] (blocked upper-triangle matmul + topk; fp16/bf16 computed in
    fp32), or of each layer of ``x`` [B, N, D] whose first ``lengths[b]`` rows are real (default all N)."""
    if x.dim() == 2 and lengths is None:
        return knn_symmetric(SqDist(x), k)
    squeeze = x.dim() == 2
    x3 = x.unsqueeze(0) if squeeze else x
    b, n_max, _ = x3.shape
    idx = torch.full((b, n_max, k), -1, dtype=torch.int64, device=x.device)
    sqdist = torch.full((b, n_max, k), float("inf"), dtype=torch.float64, device=x.device)
    for i, n in enumerate(layer_lengths(lengths, b, n_max)):
        g = knn_symmetric(SqDist(x3[i, :n]), k)
        idx[i, :n], sqdist[i, :n] = g.idx, g.sqdist
    return KnnGraph(idx[0], sqdist[0]) if squeeze else KnnGraph(idx, sqdist)
