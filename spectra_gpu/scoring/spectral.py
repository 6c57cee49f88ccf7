"""Spectral structural importance of one layer's units (docs/algorithm.md, section 4).

pre/post signals -> dead-unit filter -> per-unit preprocessing -> exact kNN graphs of both sides (MST-repaired
if disconnected) -> combinatorial Laplacians -> dominant generalized eigenpairs of L_X u = lam B u with
B = L_Y + (dbar/N) 1 1^T -> edge scores |U^T (e_p - e_q)|^2 on input-graph edges -> node score = mean over
the node's input-graph edges / layer max. Higher = keep; dead units = -inf.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .._validation import as_signal, check_choice, check_finite, check_pair, check_sizes
from ..backends import graph_laplacian, knn_graph, laplacian_operator, lobpcg, union_graph
from ..errors import ConvergenceWarning, warn_numerical
from ..ops.graph_laplacian import graph_laplacian_dense
from ..ops.knn_graph import KnnGraph, SqDist, knn_from_sqdist
from ..ops.lobpcg import generalized_eigh_dense
from ..ops.union_graph import Graph, connect
from ..stats import SignalStats, recall_at_k

DIRECTIONS = ("fwd", "rev", "sym")
PREPROCESS = ("zscore", "center", "raw")
SOLVERS = ("auto", "dense", "lobpcg")
DEAD_STD_RATIO = 1e-3  # std(post) < 1e-3 x median std  -> dead
DEAD_NONZERO_FRAC = 1e-3  # non-zero on < 0.1% of samples -> dead
# dense generalized eigh up to here, LOBPCG beyond. Measured (2 cores, M=2048 ReLU layer, s=32): eigen stage
# dense / LOBPCG = 0.04 / 0.12 s at N=512, 0.11 / 0.16 s at 768, 0.28 / 0.22 s at 1024, 0.98 / 0.29 s at 1536
DENSE_MAX_N = 800
DEFAULT_K = 10  # neighbours per unit when k is not given (capped at N_alive - 1)
DEFAULT_NUM_EIGS = 32  # eigenpairs when num_eigs is not given (capped at N_alive - 1)


@dataclass(frozen=True)
class ScoreResult:
    """Per-unit spectral importance of one layer.

    scores: [N] float64, higher = keep, max-normalised over alive units, dead units = -inf.
    eigenvalues: the s dominant generalized eigenvalues, descending (fwd pencil; empty for num_eigs='full').
    alive: [N] bool. neighbors: [N, k] int64 input-graph kNN lists in original unit indices (-1 for dead).
    diagnostics: residuals, dead units, connectivity repairs, duplicates, per-stage timings, solver info.
    """

    scores: torch.Tensor
    eigenvalues: torch.Tensor
    alive: torch.Tensor
    neighbors: torch.Tensor
    diagnostics: dict[str, Any] = field(default_factory=dict)


class _Side:
    """One side's point set in preprocessed space, as a squared-distance oracle (rows or Gram)."""

    def __init__(self, dist: SqDist, rows: torch.Tensor | None):
        self.dist, self.rows = dist, rows


def _centered(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x - row mean, row std): two passes (no E[x^2] - E[x]^2 cancellation), three times faster than
    torch.std_mean on CPU; the centred copy is reused by the preprocessing."""
    xc = x - x.mean(dim=1, keepdim=True)
    return xc, torch.linalg.vector_norm(xc, dim=1) / math.sqrt(x.shape[1])


def _preprocess(x: torch.Tensor, xc: torch.Tensor, std: torch.Tensor, mode: str) -> torch.Tensor:
    """phi(x) from x, its centred copy (overwritten for 'zscore') and its row std."""
    if mode == "raw":
        return x
    if mode == "center":
        return xc
    return xc.mul_((1.0 / std.clamp_min(torch.finfo(x.dtype).tiny))[:, None])


def _dead_mask(std_pre: torch.Tensor, std_post: torch.Tensor, nnz_post: torch.Tensor, m: int) -> torch.Tensor:
    """Dead/constant units: post std below 1e-3 x median (also pre, which would make the z-score undefined),
    or post non-zero on fewer than 0.1% of samples."""
    dead = std_post < DEAD_STD_RATIO * torch.median(std_post)
    dead |= std_pre < DEAD_STD_RATIO * torch.median(std_pre)
    dead |= std_post <= 0
    dead |= std_pre <= 0
    dead |= nnz_post < DEAD_NONZERO_FRAC * m
    return dead


def _build_graph(side: _Side, k: int, weighted: bool, backend: str | None, name: str,
                 diag: dict[str, Any]) -> tuple[Graph, KnnGraph]:
    knn = knn_graph(side.rows, k, backend=backend) if side.rows is not None else knn_from_sqdist(side.dist, k)
    g = connect(union_graph(knn, weighted=weighted, backend=backend), side.dist, weighted=weighted,
                name=f"spectra_gpu.score: {name} graph")
    diag["connectivity"][name] = dict(g.repairs) if g.repairs else {"components_before": 1, "edges_added": 0}
    return g, knn


def _solve(gx: Graph, gy: Graph, s: int, solver: str, tol: float, maxiter: int, seed: int,
           diag: dict[str, Any], backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-s pairs of L_X u = lam B u, B = L_Y + (dbar/N) 1 1^T, B-orthonormal u."""
    n = gx.n
    deg_y = gy.degree()
    c = float(deg_y.mean()) / n
    use_dense = solver == "dense" or (solver == "auto" and (n <= DENSE_MAX_N or 3 * (s + max(4, s // 4)) > n))
    if use_dense:
        lx = graph_laplacian_dense(gx)
        b = graph_laplacian_dense(gy) + c
        res = generalized_eigh_dense(lx, b, s)
        diag["solver"] = {"name": "dense", "iterations": 0, "converged": True}
    else:
        lx = graph_laplacian(gx, backend=backend)
        ly = graph_laplacian(gy, backend=backend)
        amul = laplacian_operator(lx, backend=backend)
        bmul = laplacian_operator(ly, c, backend=backend)  # (L_Y + c 1 1^T) v

        jac = (1.0 / (deg_y + c))[:, None]
        w = _damping(bmul, jac, c, seed)

        def prec(r: torch.Tensor) -> torch.Tensor:
            # two terms of the Neumann series of B^-1 around its diagonal, damped to stay SPD: 2J - w J B J
            z = r * jac
            return 2 * z - w * (jac * bmul(z))

        res = lobpcg(amul, s, bmul, m=prec, n=n, tol=tol, maxiter=maxiter, seed=seed, device=lx.device, warn=False,
                     backend=backend)
        diag["solver"] = {"name": "lobpcg", "iterations": res.iterations, "converged": res.converged}
        if not res.converged:
            warn_numerical(f"spectra_gpu.score: LOBPCG did not converge in {maxiter} iterations (max relative "
                           f"residual {float(res.residuals.max()):.2e} > {tol:.1e}); scores use the best iterate",
                           ConvergenceWarning)
    diag["residual_max"] = float(res.residuals.max())
    return res.eigenvalues, res.eigenvectors


def _damping(bmul: Callable[[torch.Tensor], torch.Tensor], jac: torch.Tensor, c: float, seed: int) -> float:
    """w for the preconditioner 2J - w J B J, J = diag(B)^-1. With M = J^(1/2) B J^(1/2) it is
    J^(1/2) (2I - w M) J^(1/2): SPD iff w mu_max(M) < 2, and best (condition of the preconditioned pencil
    halved against Jacobi) at w = 1 / mu_max. mu_max <= 2 + c sum(J) (L_Y <= 2 D_Y <= 2 J^-1, plus the rank-one
    term), so w = 1 / max(mu_est, bound / 1.9), mu_est from 20 power steps, is always SPD. The undamped
    2J - JBJ (w = 1) is indefinite when mu_max > 2 (hub-dominated, nearly bipartite kNN graphs), where LOBPCG
    without the damping can fail to converge; a NumericalWarning says so when mu_est >= 2 proves it."""
    bound = 2.0 + c * float(jac.sum())
    sj = jac.sqrt()
    v = torch.randn(jac.shape[0], 1, generator=torch.Generator().manual_seed(seed), dtype=jac.dtype)
    v = v.to(jac.device)
    mu = 0.0
    for _ in range(20):
        mv = sj * bmul(sj * v)
        mu = float((v * mv).sum() / (v * v).sum())
        v = mv / mv.norm()
    w = 1.0 / max(mu, bound / 1.9)
    if mu >= 2.0:
        warn_numerical(f"spectra_gpu.score: the Neumann preconditioner 2J - JBJ would be indefinite (top eigenvalue "
                       f"of J^1/2 B J^1/2 >= {mu:.3g} >= 2); damped to 2J - w JBJ with w = {w:.3g}")
    return w


def _effective_resistance(gx: Graph, gy: Graph, diag: dict[str, Any]) -> torch.Tensor:
    """Edge score of the 'full' variant: R_eff in G_Y between G_X neighbours, e^T L_Y^+ e (dense)."""
    n = gy.n
    b = graph_laplacian_dense(gy) + float(gy.degree().mean()) / n
    binv = torch.cholesky_inverse(torch.linalg.cholesky(b))
    d = torch.diagonal(binv)
    diag["solver"] = {"name": "dense-pinv", "iterations": 0, "converged": True}
    return d[gx.row] + d[gx.col] - 2 * binv[gx.row, gx.col]


def _node_scores(g: Graph, edge: torch.Tensor) -> torch.Tensor:
    tot = torch.zeros(g.n, dtype=torch.float64, device=edge.device)
    tot.index_add_(0, g.row, edge).index_add_(0, g.col, edge)
    node = tot / g.edge_count()
    mx = node.max()
    return node / mx if mx > 0 else node


def _direction_scores(gin: Graph, gout: Graph, s: int | str, solver: str, tol: float, maxiter: int, seed: int,
                      diag: dict[str, Any], backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    if s == "full":
        if gin.n > 8192:
            raise ValueError(f"num_eigs='full' uses a dense N x N inverse; expected N <= 8192, got {gin.n}")
        edge = _effective_resistance(gin, gout, diag)
        lam = torch.empty(0, dtype=torch.float64)
    else:
        assert isinstance(s, int)
        lam, u = _solve(gin, gout, s, solver, tol, maxiter, seed, diag, backend)
        edge = (u[gin.row] - u[gin.col]).pow(2).sum(dim=1)
        u2 = u * u
        pr = (u2.sum(dim=0) ** 2) / (u2 * u2).sum(dim=0).clamp_min(1e-300) / gin.n
        diag["participation_ratio_mean"] = float(pr.mean())
    return _node_scores(gin, edge), lam


def _duplicates(kx: KnnGraph, ky: KnnGraph, units: torch.Tensor, dtype: torch.dtype) -> list[tuple[int, int]]:
    """Pairs that are (numerically) identical on both sides: d^2 below a precision-aware fraction of the
    median kNN d^2 that the computing dtype resolves: 100 eps, at least 1e-16 (docs/algorithm.md section 5)."""
    rel = max(1e-16, 100 * torch.finfo(dtype).eps)
    out: set[tuple[int, int]] = set()

    def pairs(knn: KnnGraph) -> set[tuple[int, int]]:
        thr = rel * float(torch.median(knn.sqdist))
        hit = (knn.sqdist <= thr).nonzero()
        return {(min(int(i), int(knn.idx[i, j])), max(int(i), int(knn.idx[i, j]))) for i, j in hit.tolist()}

    out = pairs(kx) & pairs(ky)
    return sorted((int(units[a]), int(units[b])) for a, b in out)


def score(pre: Any, post: Any = None, *, k: int | None = None, num_eigs: int | str | None = None,
          direction: str = "fwd",
          preprocess: str = "zscore", backend: str | None = None, weighted: bool = False,
          dead_filter: bool = True, solver: str = "auto", tol: float = 1e-6, maxiter: int = 1000,
          seed: int = 0) -> ScoreResult:
    """Spectral structural importance of the N units of one layer.

    pre, post: [N units, M samples] pre- and post-activation signals (torch tensors or numpy arrays;
      float32/float64; float16/bfloat16 are upcast to float32), or ``pre`` a :class:`SignalStats` that
      accumulated them (then ``post`` is omitted).
    k: neighbours per unit, 1 <= k < N (default min(10, N_alive - 1)). num_eigs: eigenpairs s,
      1 <= s < N (default min(32, N_alive - 1)), or 'full' for the effective-resistance limit. A k or s
      outside these ranges raises ValueError; one in range is capped at N_alive - 1 when the dead-unit filter
      leaves fewer units. direction: 'fwd' (L_Y^+ L_X, SPADE), 'rev' (swapped) or
      'sym' (fwd/max + rev/max). preprocess: 'zscore' (default: correlation distance), 'center', 'raw'.
    weighted: exp(-d^2/sigma^2) edge weights instead of unit weights. solver: 'auto' (dense for
      N <= 800, LOBPCG above), 'dense' or 'lobpcg'. backend: 'torch' or 'triton' for the kNN, graph,
      Laplacian, SpMM and LOBPCG ops, else SPECTRA_GPU_BACKEND, else automatic (which also picks the CuPy
      LOBPCG for CUDA tensors when CuPy sees a GPU).
    """
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    check_choice(direction, "direction", DIRECTIONS)
    check_choice(preprocess, "preprocess", PREPROCESS)
    check_choice(solver, "solver", SOLVERS)
    diag: dict[str, Any] = {"connectivity": {}, "timings": timings}

    stats = pre if isinstance(pre, SignalStats) else None
    if stats is not None:
        if post is not None:
            raise ValueError("score: give either (pre, post) tensors or one SignalStats, not both")
        if stats.mode == "moments":
            raise ValueError("score: expected SignalStats in mode 'exact' or 'sketch' (distances need Gram "
                             "matrices or sketches), got mode 'moments'")
        n, m = stats.n, stats.m
        _, std_pre = stats.mean_std("pre")  # raises first if no batch was added
        _, std_post = stats.mean_std("post")
        check_sizes(n, m, None, DEFAULT_NUM_EIGS if num_eigs is None else num_eigs)
        nnz_post = stats.nnz_post
        device = stats.device
    else:
        if post is None:
            raise ValueError("score: expected post-activation signals [N, M] as the second argument, got None")
        pre, post = as_signal(pre, "pre"), as_signal(post, "post")
        check_pair(pre, post)
        n, m = pre.shape
        check_sizes(n, m, None, DEFAULT_NUM_EIGS if num_eigs is None else num_eigs)
        check_finite(pre, "pre")
        check_finite(post, "post")
        if pre.dtype != post.dtype:
            pre, post = pre.double(), post.double()
        device = pre.device
        cen_pre, std_pre = _centered(pre)
        cen_post, std_post = _centered(post)
        nnz_post = (post != 0).sum(dim=1, dtype=torch.int32)  # int64 sums of bools are 2x slower
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"k: expected an int >= 1, got {k!r}")
    if k is not None and k >= n:
        raise ValueError(f"k: expected fewer neighbours than the layer's N={n} units (1 <= k < {n}), got k={k}")
    if isinstance(num_eigs, int) and not isinstance(num_eigs, bool) and num_eigs >= n:
        raise ValueError(f"num_eigs: expected fewer eigenpairs than the layer's N={n} units (1 <= num_eigs < {n}) "
                         f"or 'full', got num_eigs={num_eigs}")
    if isinstance(tol, bool) or not tol > 0:
        raise ValueError(f"tol: expected a positive float, got {tol!r}")

    dead = _dead_mask(std_pre, std_post, nnz_post, m) if dead_filter else torch.zeros(n, dtype=torch.bool,
                                                                                         device=device)
    alive = ~dead
    units = alive.nonzero().flatten()
    na = int(units.numel())
    diag["dead_units"] = dead.nonzero().flatten().tolist()
    if na < 3:
        raise ValueError(f"expected at least 3 alive units after the dead-unit filter, got {na} of {n} "
                         "(pass dead_filter=False to score constant units too)")
    k_eff = min(DEFAULT_K if k is None else k, na - 1)
    s_eff: int | str = num_eigs if num_eigs == "full" else min(
        DEFAULT_NUM_EIGS if num_eigs is None else int(num_eigs), na - 1)
    diag.update(k=k_eff, num_eigs=s_eff, n_units=n, n_alive=na, n_samples=m, direction=direction,
                preprocess=preprocess, weighted=weighted)
    timings["validate"] = time.perf_counter() - t_start

    def side(i: int) -> _Side:
        """The preprocessed signals (or their Gram / sketch) of side i (0: pre, 1: post)."""
        if stats is None:
            x, xc, sd = ((pre, cen_pre, std_pre), (post, cen_post, std_post))[i]
            rows = _preprocess(x, xc, sd, preprocess)
            rows = rows[units] if na < n else rows
            return _Side(SqDist(rows), rows)
        if stats.mode == "exact":
            return _Side(SqDist(gram=stats.gram(("pre", "post")[i], preprocess, alive)), None)
        return _Side(SqDist(x=stats.sketch(("pre", "post")[i], preprocess, alive)), None)

    # one side's preprocessed Gram / signals at a time: each is freed once its graph is built
    timings["preprocess"] = 0.0
    built = []
    for i, name in enumerate(("input", "output")):
        t = time.perf_counter()
        sd_i = side(i)
        timings["preprocess"] += time.perf_counter() - t
        t = time.perf_counter()
        built.append(_build_graph(sd_i, k_eff, weighted, backend, name, diag))
        timings[f"graph_{name}"] = time.perf_counter() - t
        if i == 0:
            x_dtype = sd_i.dist.x.dtype if sd_i.dist.x is not None else torch.float64
        del sd_i
    if stats is None:
        del cen_pre, cen_post
    (gx, kx), (gy, ky) = built
    diag["edges"] = {"input": gx.num_edges, "output": gy.num_edges}
    diag["duplicates"] = _duplicates(kx, ky, units, x_dtype)
    if stats is not None and stats.mode == "sketch" and stats.probe_idx is not None:
        diag["sketch_recall_at_k"] = _sketch_recall(stats, preprocess, alive, kx, ky, k_eff)

    t = time.perf_counter()
    if direction in ("fwd", "sym"):
        node, lam = _direction_scores(gx, gy, s_eff, solver, tol, maxiter, seed, diag, backend)
    if direction in ("rev", "sym"):
        rdiag: dict[str, Any] = {}
        rnode, rlam = _direction_scores(gy, gx, s_eff, solver, tol, maxiter, seed, rdiag, backend)
        diag["reverse"] = rdiag
        if direction == "rev":
            node, lam = rnode, rlam
        else:
            node = node + rnode
            node = node / node.max()
    timings["eigensolve_and_scores"] = time.perf_counter() - t

    scores = torch.full((n,), -math.inf, dtype=torch.float64, device=device)
    scores[units] = node.to(device)
    alive_scores = node
    diag["frac_near_zero"] = float((alive_scores < 1e-3).double().mean())
    if lam.numel():
        diag["lambda_1"] = float(lam[0])
    neighbors = torch.full((n, k_eff), -1, dtype=torch.int64, device=device)
    in_knn = kx if direction != "rev" else ky
    neighbors[units] = units[in_knn.idx.to(device)]
    timings["total"] = time.perf_counter() - t_start
    return ScoreResult(scores, lam.to(device), alive, neighbors, diag)


def _sketch_recall(stats: SignalStats, preprocess: str, alive: torch.Tensor, kx: KnnGraph, ky: KnnGraph,
                   k: int) -> dict[str, float]:
    out = {}
    for sd, knn in (("pre", kx), ("post", ky)):
        pos, g = stats.probe_gram(sd, preprocess, alive)
        if pos.numel() == 0:
            continue
        # exact squared norms of the phi rows: zscore -> M, center -> M var, raw -> M (var + mean^2)
        mu, std = stats.mean_std(sd)
        mu, std = mu[alive], std[alive]
        m = stats.m
        diag_all = {"zscore": torch.full_like(mu, float(m)), "center": m * std * std,
                    "raw": m * (std * std + mu * mu)}[preprocess]
        d2 = diag_all[pos][:, None] + diag_all[None, :] - 2 * g
        d2[torch.arange(len(pos)), pos] = math.inf
        exact = torch.topk(d2, k, dim=1, largest=False).indices
        out[sd] = recall_at_k(knn.idx[pos].cpu(), exact.cpu())
    return out


__all__ = ["ScoreResult", "score"]
