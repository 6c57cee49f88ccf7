"""The ``lobpcg`` op's result type and torch reference, and the dense solver: generalized symmetric eigen-solvers
for A u = lam B u (A symmetric PSD, B SPD).

- ``generalized_eigh_dense``: Cholesky B = R R^T, eigh(R^-1 A R^-T), u = R^-T w. Exact; for small N and the
  test oracle path (torch only, not dispatched).
- ``lobpcg_torch``: block LOBPCG (Knyazev 2001) written once in torch over matmul callables, so a sparse CSR matrix,
  a dense matrix or a kernel-backed operator all plug in. Every Rayleigh-Ritz step B-orthonormalises the whole
  basis [X, W, P] through an eigen-decomposition of its Gram matrix, dropping directions below a relative
  threshold (the robust 'ortho' variant; the 'basic' one breaks on rank-deficient bases). Residuals are
  checked every iteration; on running out of iterations it warns (ConvergenceWarning) and returns the best
  iterate with ``converged=False``. Never silent.

The validated, dispatched entry point is ``spectra_gpu.backends.lobpcg``; ``spectra_gpu.backends.cupy.lobpcg_cupy``
solves the same contract with cupyx.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..errors import ConvergenceWarning, NotPSDError, warn_numerical

Operator = torch.Tensor | Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LobpcgResult:
    eigenvalues: torch.Tensor  # [k], descending when largest=True
    eigenvectors: torch.Tensor  # [N, k], B-orthonormal
    residuals: torch.Tensor  # [k], |A u - lam B u| / ((|A| + |lam| |B|) |u|), norms estimated
    iterations: int
    converged: bool


def as_matmul(op: Operator | None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """X -> op @ X for a matrix ``op``; a callable as is; None stays None."""
    if op is None or callable(op) and not isinstance(op, torch.Tensor):
        return op
    mat = op

    def mm(x: torch.Tensor) -> torch.Tensor:
        return mat @ x

    return mm


def relative_residuals(ax: torch.Tensor, bx: torch.Tensor, lam: torch.Tensor, x: torch.Tensor | None = None,
                       anorm: float | None = None, bnorm: float | None = None) -> torch.Tensor:
    """|A x - lam B x| / ((|A| + |lam| |B|) |x|) when norm estimates are given, else / (|A x| + |lam| |B x|)."""
    r = ax - bx * lam
    if x is not None and anorm is not None and bnorm is not None:
        den = (anorm + lam.abs() * bnorm) * x.norm(dim=0)
    else:
        den = ax.norm(dim=0) + lam.abs() * bx.norm(dim=0)
    return r.norm(dim=0) / den.clamp_min(torch.finfo(ax.dtype).tiny)


def opnorm_estimate(ax: torch.Tensor, x: torch.Tensor) -> float:
    """A lower estimate of |A| from the columns seen: max |A x| / |x|."""
    return float((ax.norm(dim=0) / x.norm(dim=0).clamp_min(torch.finfo(x.dtype).tiny)).max())


def cholesky_jitter(b: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor of SPD ``b``. On failure a growing multiple of mean(diag) is added to the diagonal
    (jitter ladder 1e-12 .. 1e-6), with a NumericalWarning naming the jitter used; NotPSDError past the ladder."""
    scale = float(torch.diagonal(b).abs().mean()) or 1.0
    for jitter in (0.0, 1e-12, 1e-10, 1e-8, 1e-6):
        bj = b if jitter == 0 else b + jitter * scale * torch.eye(b.shape[0], dtype=b.dtype, device=b.device)
        r, info = torch.linalg.cholesky_ex(bj)
        if int(info) == 0:
            if jitter:
                warn_numerical(f"Cholesky of B: not positive definite in {b.dtype}; added {jitter:g} x mean diag "
                               f"{scale:.3g} to the diagonal")
            return r
    raise NotPSDError(f"B is not positive definite (Cholesky failed even with jitter 1e-6 x mean diag {scale:.3g})")


def generalized_eigh_dense(a: torch.Tensor, b: torch.Tensor, k: int, *, largest: bool = True) -> LobpcgResult:
    """The k extreme eigenpairs of the dense pencil (a, b), B-orthonormal vectors."""
    r = cholesky_jitter(b)
    c = torch.linalg.solve_triangular(r, a, upper=False)
    c = torch.linalg.solve_triangular(r, c.T, upper=False)
    c = (c + c.T) / 2
    lam, w = torch.linalg.eigh(c)
    sel = torch.arange(lam.numel() - 1, lam.numel() - 1 - k, -1) if largest else torch.arange(k)
    lam, w = lam[sel], w[:, sel]
    u = torch.linalg.solve_triangular(r.T, w, upper=True)
    res = relative_residuals(a @ u, b @ u, lam)
    return LobpcgResult(lam, u, res, 0, True)


@contextmanager
def _one_thread(t: torch.Tensor) -> Iterator[None]:
    """Small dense LAPACK calls (the Rayleigh-Ritz eigh of a few hundred columns) on one CPU thread: MKL's
    threaded eigh is slower there (120 x 120: 3.2 ms on 2 threads vs 1.4 ms on 1, with OMP_WAIT_POLICY=PASSIVE
    while another job held a core) and 100-500x slower under that contention with the default active wait
    (OpenMP threads spin at every barrier)."""
    n = torch.get_num_threads()
    if t.device.type != "cpu" or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _small_eigh(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with _one_thread(h):
        return torch.linalg.eigh((h + h.T) / 2)


def _b_orthonormal_basis(s: torch.Tensor, bs: torch.Tensor, drop: float) -> torch.Tensor:
    """Coefficients C with (S C)^T B (S C) = I, spanning the numerically independent part of span(S).

    One pass through the Gram matrix's eigen-decomposition loses orthonormality in proportion to its
    condition number (near convergence P and W are almost dependent: cond 1e6 leaves (S C)^T B (S C) off
    the identity by ~1e-4, and LOBPCG then drifts away from converged pairs instead of refining them), so an
    ill-conditioned first pass is repeated on the computed basis (the 'twice is enough' rule of CholQR2)."""
    c, cond = _gram_coefficients(s.T @ bs, drop)
    if cond > 1e4:
        c2, _ = _gram_coefficients((s @ c).T @ (bs @ c), drop)
        c = c @ c2
    return c


def _gram_coefficients(g: torch.Tensor, drop: float) -> tuple[torch.Tensor, float]:
    d = torch.diagonal(g).clamp_min(torch.finfo(g.dtype).tiny).rsqrt()
    g = d[:, None] * g * d[None, :]  # scale to unit diagonal before the eigen-decomposition
    e, v = _small_eigh(g)
    keep = e > drop * e[-1]
    return d[:, None] * v[:, keep] * e[keep].rsqrt()[None, :], float((e[-1] / e[keep][0]).sqrt())


def solve_device(a: Operator, x0: torch.Tensor | None, device: torch.device | str | None) -> torch.device:
    """The device a LOBPCG solve runs on: ``device``, else x0's, else a's when a is a tensor, else the CPU."""
    if device is None:
        device = x0.device if x0 is not None else (a.device if isinstance(a, torch.Tensor) else "cpu")
    return torch.device(device)


def start_block(a: Operator, k: int, *, x0: torch.Tensor | None, n: int | None, block: int | None, seed: int,
                dtype: torch.dtype, device: torch.device | str | None) -> torch.Tensor:
    """The checked start block X [N, block] of every LOBPCG implementation: seeded Gaussian columns (drawn on
    the CPU, so a seed gives the same block on every device), the first ones replaced by ``x0``'s.

    N comes from ``n``, else x0, else a (when a matrix); block defaults to k + max(4, k // 4), capped at N."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"lobpcg: k: expected an int, got {type(k).__name__}")
    if n is None:
        if x0 is not None:
            n = x0.shape[0]
        elif isinstance(a, torch.Tensor):
            n = a.shape[0]
        else:
            raise ValueError("lobpcg: give n (or x0) when a is a callable")
    if block is None:
        block = min(n, k + max(4, k // 4))
    if not 1 <= k <= block or 3 * block > n:
        raise ValueError(f"lobpcg: expected 1 <= k <= block and 3*block <= N, got k={k}, block={block}, N={n}; "
                         "use the dense solver for small N")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(n, block, generator=gen, dtype=dtype).to(solve_device(a, x0, device))
    if x0 is not None:
        x[:, : min(block, x0.shape[1])] = x0[:, :block].to(dtype)
    return x


def lobpcg_torch(a: Operator, k: int, b: Operator | None = None, *, m: Operator | None = None,
                 x0: torch.Tensor | None = None, n: int | None = None, block: int | None = None,
                 largest: bool = True, tol: float = 1e-6, maxiter: int = 500, seed: int = 0,
                 dtype: torch.dtype = torch.float64, device: torch.device | str | None = None,
                 warn: bool = True) -> LobpcgResult:
    """Reference: the k extreme eigenpairs of A u = lam B u by block LOBPCG.

    a, b, m: matrices (dense or sparse) or callables X -> op @ X. m is the preconditioner (an approximation of
    B^-1 or of (A - sigma B)^-1 works best for the largest pairs). ``block`` >= k vectors are iterated
    (extra "guard" vectors speed up clustered spectra); only the first k must meet ``tol``, a relative
    residual |A u - lam B u| / ((|A| + |lam| |B|) |u|) with |A|, |B| estimated from the products seen (the
    backward-error measure of scipy/Knyazev; it stays meaningful for eigenvalues near zero). ``warn``: issue
    the ConvergenceWarning on running out of iterations (a caller that reports it itself passes False).
    """
    amul, bmul, mmul = as_matmul(a), as_matmul(b), as_matmul(m)
    if amul is None:
        raise ValueError("lobpcg: expected an operator a, got None")
    x = start_block(a, k, x0=x0, n=n, block=block, seed=seed, dtype=dtype, device=device)
    n, block = x.shape

    def bop(v: torch.Tensor) -> torch.Tensor:
        return v if bmul is None else bmul(v)

    drop = 1e3 * torch.finfo(dtype).eps
    c = _b_orthonormal_basis(x, bop(x), drop)
    x = x @ c
    ax, bx = amul(x), bop(x)
    h = x.T @ ax
    lam, z = _small_eigh(h)
    order = torch.argsort(lam, descending=largest)[:block]
    x, ax, bx, lam = x @ z[:, order], ax @ z[:, order], bx @ z[:, order], lam[order]
    p = ap = bp = None
    anorm, bnorm = opnorm_estimate(ax, x), opnorm_estimate(bx, x)
    res = relative_residuals(ax, bx, lam, x, anorm, bnorm)
    it = 0
    for it in range(1, maxiter + 1):
        if bool((res[:k] < tol).all()):
            break
        active = res > tol
        r = ax[:, active] - bx[:, active] * lam[active]
        w = mmul(r) if mmul is not None else r
        w = w - x @ (bx.T @ w)  # B-orthogonalise against X (X is B-orthonormal)
        aw, bw = amul(w), bop(w)
        anorm, bnorm = max(anorm, opnorm_estimate(aw, w)), max(bnorm, opnorm_estimate(bw, w))
        parts_s, parts_a, parts_b = [x, w], [ax, aw], [bx, bw]
        if p is not None:
            parts_s.append(p)
            parts_a.append(ap)  # type: ignore[arg-type]
            parts_b.append(bp)  # type: ignore[arg-type]
        s, as_, bs = torch.cat(parts_s, 1), torch.cat(parts_a, 1), torch.cat(parts_b, 1)
        c = _b_orthonormal_basis(s, bs, drop)
        h = c.T @ (s.T @ as_) @ c
        lam_all, z = _small_eigh(h)
        order = torch.argsort(lam_all, descending=largest)[:block]
        cz = c @ z[:, order]
        lam = lam_all[order]
        x_new, ax_new, bx_new = s @ cz, as_ @ cz, bs @ cz
        nb = x.shape[1]
        p, ap, bp = s[:, nb:] @ cz[nb:], as_[:, nb:] @ cz[nb:], bs[:, nb:] @ cz[nb:]
        x, ax, bx = x_new, ax_new, bx_new
        if it % 20 == 0:  # refresh the products to stop drift from accumulating
            ax, bx = amul(x), bop(x)
        res = relative_residuals(ax, bx, lam, x, anorm, bnorm)
    converged = bool((res[:k] < tol).all())
    if not converged and warn:
        warn_numerical(f"lobpcg: {k} eigenpairs not converged after {maxiter} iterations (max relative residual "
                       f"{float(res[:k].max()):.2e} > tol {tol:.1e}); best iterate returned", ConvergenceWarning)
    return LobpcgResult(lam[:k], x[:, :k], res[:k], it, converged)
