"""The ``union_graph`` op's data type and torch reference: the undirected union of kNN lists, plus the
connectivity repair (a minimum spanning tree over the components) that the scores need.

The validated, dispatched entry point is ``spectra_gpu.backends.union_graph``; the Triton implementation is
``spectra_gpu.kernels.union_graph.union_graph_triton``, with the same contract and the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import warn_numerical
from .knn_graph import KnnGraph, SqDist


@dataclass(frozen=True)
class Graph:
    """Undirected weighted graph on n nodes; each edge stored once with row < col (COO, sorted)."""

    n: int
    row: torch.Tensor  # [E] int64
    col: torch.Tensor  # [E] int64
    weight: torch.Tensor  # [E] float64
    sqdist: torch.Tensor  # [E] float64 squared distance of each edge's endpoints
    repairs: dict[str, int] = field(default_factory=dict)

    @property
    def num_edges(self) -> int:
        return int(self.row.numel())

    def degree(self) -> torch.Tensor:
        deg = torch.zeros(self.n, dtype=torch.float64, device=self.row.device)
        deg.index_add_(0, self.row, self.weight).index_add_(0, self.col, self.weight)
        return deg

    def edge_count(self) -> torch.Tensor:
        """Number of incident edges per node (the unweighted degree)."""
        one = torch.ones_like(self.weight)
        cnt = torch.zeros(self.n, dtype=torch.float64, device=self.row.device)
        return cnt.index_add_(0, self.row, one).index_add_(0, self.col, one)

    def neighbors(self) -> list[torch.Tensor]:
        """Adjacency lists (CPU), for redundancy-aware selection."""
        r, c = self.row.cpu(), self.col.cpu()
        both_r, both_c = torch.cat([r, c]), torch.cat([c, r])
        order = torch.argsort(both_r * self.n + both_c)
        both_r, both_c = both_r[order], both_c[order]
        counts = torch.bincount(both_r, minlength=self.n).tolist()
        return list(torch.split(both_c, counts))


def edge_bandwidth(sqdist: torch.Tensor) -> float:
    """sigma^2 of the weights exp(-d^2 / sigma^2): the median squared edge length (scale-free, unlike SPADE's
    exp(-d^2)); 1.0, with a NumericalWarning, when that median is 0 (most edges join duplicate points)."""
    sigma2 = float(torch.median(sqdist))
    if sigma2 > 0:
        return sigma2
    warn_numerical("edge weights: the median squared edge length is 0 (most edges join duplicate points); "
                   "bandwidth sigma^2 = 1 used")
    return 1.0


def union_graph_torch(knn: KnnGraph, *, weighted: bool = False) -> Graph:
    """Reference union graph of kNN lists [N, K]: i~j if j is among i's k nearest or i among j's, the pair's
    squared distance the smaller of its two directed ones. Unit weights, or exp(-d^2/sigma^2) with sigma^2 from
    :func:`edge_bandwidth`."""
    n, k = knn.idx.shape
    src = torch.arange(n, device=knn.idx.device).repeat_interleave(k)
    dst = knn.idx.reshape(-1)
    d2 = knn.sqdist.reshape(-1)
    lo, hi = torch.minimum(src, dst), torch.maximum(src, dst)
    key = lo * n + hi
    ukey, inv = torch.unique(key, return_inverse=True)
    # the same pair seen from both ends has the same distance up to rounding: keep the smaller
    ud2 = torch.full((ukey.numel(),), float("inf"), dtype=torch.float64, device=key.device)
    ud2.scatter_reduce_(0, inv, d2, reduce="amin")
    w = torch.exp(-ud2 / edge_bandwidth(ud2)) if weighted else torch.ones_like(ud2)
    return Graph(n, ukey // n, ukey % n, w, ud2)


def components(g: Graph) -> tuple[int, torch.Tensor]:
    """(number of connected components, label per node in 0..c-1 numbered by each component's lowest node).

    Min-label propagation along the edges with pointer jumping, in torch on the graph's device: a few
    passes over the E edges for kNN graphs (small diameter), and no scipy import (0.3 s) on the hot path."""
    lab = torch.arange(g.n, device=g.row.device)
    while True:
        m = torch.minimum(lab[g.row], lab[g.col])
        new = lab.scatter_reduce(0, g.row, m, "amin").scatter_reduce_(0, g.col, m, "amin")
        new = new[new]  # pointer jumping: follow each node's label to that label's own label
        if torch.equal(new, lab):
            break
        lab = new
    roots, labels = torch.unique(lab, return_inverse=True)
    return int(roots.numel()), labels


def connect(g: Graph, dist: SqDist, *, weighted: bool = False, name: str = "graph") -> Graph:
    """``g`` made connected: its components joined by the minimum spanning tree of the component graph whose
    edge weights are the shortest inter-component distances in ``dist`` (kNN u MST, restricted to the missing
    edges). A repaired graph records ``repairs = {"components_before", "edges_added"}`` and the repair issues a
    NumericalWarning naming ``name``; a connected ``g`` is returned as is.

    Costs one more blocked pass over the distances, only when ``g`` is disconnected.
    """
    ncomp, labels = components(g)
    if ncomp == 1:
        return g
    best = torch.full((ncomp, ncomp), float("inf"), dtype=torch.float64)
    arg = torch.zeros((ncomp, ncomp, 2), dtype=torch.int64)
    step = dist.step()
    for s in range(0, dist.n, step):
        e = min(dist.n, s + step)
        sq = dist.block(s, e).double()
        for c in range(ncomp):  # nearest member of component c for each row in the block
            cols = (labels == c).nonzero().flatten()
            v, j = sq[:, cols].min(dim=1)
            rl = labels[s:e]
            for rc in torch.unique(rl).tolist():
                if rc == c:
                    continue
                m = (rl == rc).nonzero().flatten()
                bi = int(torch.argmin(v[m]))
                val = float(v[m][bi])
                if val < best[rc, c]:
                    best[rc, c] = best[c, rc] = val
                    arg[rc, c] = arg[c, rc] = torch.tensor([s + int(m[bi]), int(cols[j[m[bi]]])])
    # Kruskal on the component graph
    parent = list(range(ncomp))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    iu = torch.triu_indices(ncomp, ncomp, 1)
    order = torch.argsort(best[iu[0], iu[1]])
    add_r, add_c, add_d = [], [], []
    for t in order.tolist():
        a, b = int(iu[0, t]), int(iu[1, t])
        ra, rb = find(a), find(b)
        if ra == rb or not np.isfinite(float(best[a, b])):
            continue
        parent[ra] = rb
        p, q = arg[a, b].tolist()
        add_r.append(min(p, q))
        add_c.append(max(p, q))
        add_d.append(float(best[a, b]))
    dev = g.row.device
    ar, ac = torch.tensor(add_r, device=dev), torch.tensor(add_c, device=dev)
    ad = torch.tensor(add_d, dtype=torch.float64, device=dev)
    aw = torch.exp(-ad / edge_bandwidth(g.sqdist)) if weighted else torch.ones_like(ad)
    warn_numerical(f"{name} had {ncomp} components; added {len(add_r)} minimum-spanning-tree edges to connect it")
    order2 = torch.argsort(torch.cat([g.row, ar]) * g.n + torch.cat([g.col, ac]))
    return Graph(g.n, torch.cat([g.row, ar])[order2], torch.cat([g.col, ac])[order2],
                 torch.cat([g.weight, aw])[order2], torch.cat([g.sqdist, ad])[order2],
                 {"components_before": ncomp, "edges_added": len(add_r)})
