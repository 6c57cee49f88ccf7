"""The ``graph_laplacian`` op's data types and torch references: combinatorial Laplacians L = D - W.

Normalised Laplacians are deliberately absent: with D^-1/2 the two sides' null vectors differ and the pencil
(L_X, L_Y) gets an infinite eigenvalue (docs/algorithm.md, section 2). The validated, dispatched entry point is
``spectra_gpu.backends.graph_laplacian``; the Triton implementations are in ``spectra_gpu.kernels.graph_laplacian``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .knn_graph import KnnGraph, layer_lengths
from .union_graph import Graph, union_graph_torch


def sparse_csr(crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, n: int) -> torch.Tensor:
    """An n x n torch sparse CSR tensor from its arrays (torch's "sparse CSR support is in beta" warning muted:
    the CSR matmul used here is stable)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, val, (n, n))


def graph_laplacian_torch(g: Graph, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Reference combinatorial Laplacian L = D - W of ``g`` as a sparse CSR tensor (diagonal included; sorted,
    unique columns per row)."""
    n, dev = g.n, g.row.device
    ar = torch.arange(n, device=dev)
    rows = torch.cat([g.row, g.col, ar])
    cols = torch.cat([g.col, g.row, ar])
    vals = torch.cat([-g.weight, -g.weight, g.degree()]).to(dtype)
    order = torch.argsort(rows * n + cols)  # edges are unique, so no coalescing is needed
    crow = torch.zeros(n + 1, dtype=torch.int64, device=dev)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=n), 0)
    return sparse_csr(crow, cols[order], vals[order], n)


def graph_laplacian_dense(g: Graph, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The combinatorial Laplacian of ``g`` as a dense [N, N] tensor (torch only: the dense eigen-solver's input)."""
    w = torch.zeros(g.n, g.n, dtype=dtype, device=g.row.device)
    w[g.row, g.col] = g.weight.to(dtype)
    w[g.col, g.row] = g.weight.to(dtype)
    return torch.diag(w.sum(dim=1)) - w


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
        return sparse_csr(self.rowptr[r0:r1 + 1] - e0, self.col[e0:e1], self.val[e0:e1], r1 - r0)


def graph_laplacian_batched_torch(knn: KnnGraph, lengths: Sequence[int] | torch.Tensor | None = None, *,
                                  weighted: bool = False) -> list[torch.Tensor]:
    """Reference of the batched Triton assembly: the Laplacians of the union graphs of B layers' kNN lists
    (``knn`` [N, K] or [B, N, K], layer b's first ``lengths[b]`` rows), one CSR per layer, equal to
    ``LaplacianBatch.layer(b)`` of ``graph_laplacian_batched_triton``."""
    i3 = knn.idx.unsqueeze(0) if knn.idx.dim() == 2 else knn.idx
    d3 = knn.sqdist.unsqueeze(0) if knn.sqdist.dim() == 2 else knn.sqdist
    lens = layer_lengths(lengths, i3.shape[0], i3.shape[1])
    return [graph_laplacian_torch(union_graph_torch(KnnGraph(i3[b, :n], d3[b, :n].double()), weighted=weighted))
            for b, n in enumerate(lens)]
