"""The ``graph_laplacian`` op in Triton: L = D - W assembled on the union CSR of
spectra_gpu.kernels.union_graph, from a Graph's edge list (the registered op) or, batched, from B layers' kNN
lists at once (one block-diagonal CSR). _laplacian_values turns each entry's payload into its weight (unit,
exp(-d^2/sigma^2), or the payload itself) and puts the degree on the diagonal (summed in column order).
Contract and reference: ``spectra_gpu.ops.graph_laplacian.graph_laplacian_torch`` (and
``graph_laplacian_batched_torch``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ..ops.graph_laplacian import LaplacianBatch, sparse_csr
from ..ops.knn_graph import KnnGraph
from ..ops.union_graph import Graph, edge_bandwidth
from ._utils import alloc, check_device, check_tensor
from .union_graph import BLOCK_ROW, UnionCsr, union_csr

# shape legend: B layers, N nodes of one layer, R nodes of all layers, K neighbours, NNZ stored CSR entries
UNIT, EXP, GIVEN = 0, 1, 2  # how _laplacian_values turns an entry's payload into its weight


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
    _laplacian_values_kernel[(n,)](u.rowptr, u.col, u.payload, s2, val, deg, MODE=mode, BLOCK=BLOCK_ROW)
    return val, deg


def graph_laplacian_triton(g: Graph, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """graph_laplacian_torch(g) assembled by the kernels from the Graph's edge list (sparse CSR)."""
    if dtype != torch.float64:
        raise TypeError(f"dtype: the Triton Laplacian assembles in float64, got {dtype}")
    dev = g.row.device
    rowptr_d = torch.zeros(g.n + 1, dtype=torch.int64, device=dev)
    rowptr_d[1:] = torch.cumsum(torch.bincount(g.row, minlength=g.n), 0)
    order = torch.argsort(g.row, stable=True)  # Graph edges are sorted by (row, col) already; cheap if so
    u = union_csr(rowptr_d, g.col[order].contiguous(), g.weight[order].double().contiguous(), check_mutual=False)
    val, _ = laplacian_values(u, GIVEN)
    return sparse_csr(u.rowptr, u.col, val, g.n)


def graph_laplacian_batched_triton(knn: KnnGraph, lengths: Sequence[int] | torch.Tensor | None = None, *,
                                   weighted: bool = False) -> LaplacianBatch:
    """Laplacians L = D - W of the union graphs of B layers' kNN lists, in one block-diagonal CSR.

    knn: idx [N, K] or [B, N, K] int64 layer-local neighbour ids, sqdist the matching squared distances (any
    float dtype); layer b uses its first ``lengths[b]`` rows. weighted: exp(-d^2/sigma^2) weights with sigma^2
    the layer's median union-edge d^2 (as union_graph_torch), else unit weights.
    """
    if not isinstance(knn, KnnGraph):
        raise TypeError(f"knn: expected a KnnGraph, got {type(knn).__name__}")
    idx, sqdist = knn.idx, knn.sqdist
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
            sig[layer] = edge_bandwidth(u.payload[upper & (layer_of_row[rows] == layer)])
        val, deg = laplacian_values(u, EXP, sig[layer_of_row].contiguous())
    else:
        val, deg = laplacian_values(u, UNIT)
    col_local = u.col - offsets.to(idx.device)[layer_of_row[rows]]
    return LaplacianBatch(u.rowptr, col_local, val, deg, offsets)

