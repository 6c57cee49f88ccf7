"""The public ops, the one place that dispatches: each validates its arguments at the boundary (ValueError /
TypeError naming what was expected and what came), picks a backend with :func:`registry.select` and calls that
backend's ``<op>_<backend>``, whose contract is the torch reference's in ``spectra_gpu.ops.<op>``.

``backend``: 'torch', 'triton' or 'cupy' (cupy implements only lobpcg), else ``SPECTRA_GPU_BACKEND``, else
automatic (the fastest backend that supports the call; torch is the floor).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .._validation import check_finite
from ..errors import BackendUnavailableError
from ..ops.graph_laplacian import graph_laplacian_dense
from ..ops.knn_graph import KnnGraph
from ..ops.lobpcg import LobpcgResult, Operator, solve_device
from ..ops.union_graph import Graph
from .registry import select

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def knn_graph(x: torch.Tensor, k: int, *, backend: str | None = None) -> KnnGraph:
    """Exact Euclidean k nearest neighbours of the rows of ``x`` [N, D] (float; fp16/bf16 computed in fp32),
    nearest first, ties to the lower index: idx [N, k] int64, sqdist [N, k] float64."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x: expected a 2-D tensor [N, D], got {getattr(x, 'shape', type(x).__name__)}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"x: expected a float tensor, got {x.dtype}")
    n = x.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < n:
        raise ValueError(f"k: expected an int with 1 <= k < N={n}, got {k!r}")
    check_finite(x, "x")
    return select("knn_graph", x, k, backend=backend)(x, k)


def union_graph(knn: KnnGraph, *, weighted: bool = False, backend: str | None = None) -> Graph:
    """The undirected union of kNN lists [N, K]: i~j if j is among i's k nearest or i among j's, each edge once
    with row < col, sorted. Unit weights, or exp(-d^2/sigma^2) with sigma^2 the median squared edge length."""
    if not isinstance(knn, KnnGraph):
        raise TypeError(f"knn: expected a KnnGraph, got {type(knn).__name__}")
    if knn.idx.dim() != 2 or knn.sqdist.shape != knn.idx.shape:
        raise ValueError(f"knn: expected idx and sqdist of one shape [N, K], got {tuple(knn.idx.shape)} and "
                         f"{tuple(knn.sqdist.shape)}")
    return select("union_graph", knn, backend=backend)(knn, weighted=weighted)


def graph_laplacian(g: Graph, *, dense: bool = False, dtype: torch.dtype = torch.float64,
                    backend: str | None = None) -> torch.Tensor:
    """Combinatorial Laplacian L = D - W of ``g``: a sparse CSR tensor [N, N] (diagonal included), or with
    ``dense=True`` a dense one, which only the torch reference builds."""
    if not isinstance(g, Graph):
        raise TypeError(f"g: expected a Graph, got {type(g).__name__}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
    if dense:
        if backend not in (None, "torch"):
            raise BackendUnavailableError(f"graph_laplacian: backend {backend!r} rejected: dense=True is built by "
                                          "the torch reference only")
        return graph_laplacian_dense(g, dtype)
    return select("graph_laplacian", g, backend=backend)(g, dtype)


def _check_laplacian(lap: torch.Tensor) -> None:
    if not isinstance(lap, torch.Tensor) or lap.dim() != 2 or lap.shape[0] != lap.shape[1]:
        raise ValueError(f"lap: expected a square 2-D tensor [N, N], got {getattr(lap, 'shape', type(lap).__name__)}")


def laplacian_apply(lap: torch.Tensor, x: torch.Tensor, shift: float = 0.0, *,
                    backend: str | None = None) -> torch.Tensor:
    """(L + shift 1 1^T) X for a sparse CSR Laplacian L [N, N] and dense X [N, C] (the rank-one term never
    formed)."""
    _check_laplacian(lap)
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] != lap.shape[0]:
        raise ValueError(f"x: expected a 2-D tensor [{lap.shape[0]}, C], got {getattr(x, 'shape', type(x).__name__)}")
    return select("laplacian_apply", lap, backend=backend)(lap, x, shift)


def laplacian_operator(lap: torch.Tensor, shift: float = 0.0, *,
                       backend: str | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """:func:`laplacian_apply` bound to one L and shift: X -> (L + shift 1 1^T) X, with L validated and the
    backend chosen once (LOBPCG's A and B operators)."""
    _check_laplacian(lap)
    apply = select("laplacian_apply", lap, backend=backend)

    def mm(x: torch.Tensor) -> torch.Tensor:
        return apply(lap, x, shift)

    return mm


def lobpcg(a: Operator, k: int, b: Operator | None = None, *, m: Operator | None = None,
           x0: torch.Tensor | None = None, n: int | None = None, block: int | None = None,
           largest: bool = True, tol: float = 1e-6, maxiter: int = 500, seed: int = 0,
           dtype: torch.dtype = torch.float64, device: torch.device | str | None = None,
           warn: bool = True, backend: str | None = None) -> LobpcgResult:
    """The k extreme eigenpairs of A u = lam B u (A symmetric PSD, B SPD) by block LOBPCG; the arguments and
    the result are those of the torch reference ``spectra_gpu.ops.lobpcg.lobpcg_torch``. The backend is chosen
    for the solve's device and dtype (``device``, else x0's, else a's when a is a matrix, else the CPU)."""
    if a is None or not (isinstance(a, torch.Tensor) or callable(a)):
        raise TypeError(f"a: expected a matrix or a callable X -> A X, got {type(a).__name__}")
    if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not tol > 0:
        raise ValueError(f"tol: expected a positive float, got {tol!r}")
    probe = a if isinstance(a, torch.Tensor) else torch.empty(0, dtype=dtype, device=solve_device(a, x0, device))
    solve = select("lobpcg", probe, backend=backend)
    return solve(a, k, b, m=m, x0=x0, n=n, block=block, largest=largest, tol=tol,
                 maxiter=maxiter, seed=seed, dtype=dtype, device=device, warn=warn)
