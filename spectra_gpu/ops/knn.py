"""Exact k-nearest-neighbour graphs over units (rows), Euclidean.

The torch reference is blocked: a row block of squared distances ``|x_i|^2 + |x_j|^2 - 2 x_i.x_j`` comes from
one matmul, ``topk`` keeps the k smallest, and the N x N matrix is never held. Its cost is that of one Gram
product X X^T, the floor for exact kNN. Ties are broken by the lower index (rows with any tie among their k+1
nearest are re-ranked with a stable sort), so the graph is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._validation import check_finite

# shape legend: N units (graph nodes), D features (samples), K neighbours
_BLOCK_BYTES = 64 * 2**20  # one row block of distances: bounded memory, large enough for a fast matmul


@dataclass(frozen=True)
class KnnGraph:
    """k nearest neighbours of every node, nearest first. idx [N, K] int64; sqdist [N, K] float64."""

    idx: torch.Tensor
    sqdist: torch.Tensor

    @property
    def k(self) -> int:
        return int(self.idx.shape[1])


class SqDist:
    """Row blocks of the squared Euclidean distance matrix of a point set, from its rows or its Gram matrix."""

    def __init__(self, x: torch.Tensor | None = None, *, gram: torch.Tensor | None = None) -> None:
        if (x is None) == (gram is None):
            raise ValueError("SqDist: give exactly one of x or gram")
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
        g = self.x[s:e] @ self.x.T if self.x is not None else self.gram[s:e]  # type: ignore[index]
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


def knn_torch(x: torch.Tensor, k: int) -> KnnGraph:
    """Reference exact kNN of the rows of ``x`` [N, D], blocked matmul + topk (fp16/bf16 computed in fp32)."""
    return knn_from_sqdist(SqDist(x), k)


def knn_graph(x: torch.Tensor, k: int, *, backend: str | None = None) -> KnnGraph:
    """Exact Euclidean kNN of the rows of ``x`` [N, D]; validated here, dispatched to a backend."""
    from ..backends import select

    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x: expected a 2-D tensor [N, D], got {getattr(x, 'shape', type(x).__name__)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"x: expected a float tensor, got {x.dtype}")
    n = x.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < n:
        raise ValueError(f"k: expected an int with 1 <= k < N={n}, got {k!r}")
    check_finite(x, "x")
    return select("knn_graph", x, k, backend=backend)(x, k)  # type: ignore[no-any-return]
