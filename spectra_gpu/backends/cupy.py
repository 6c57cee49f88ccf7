"""CuPy backend: the eigen-solver only, cupyx.scipy.sparse.linalg.lobpcg over DLPack-shared operators.

Chosen automatically for LOBPCG on CUDA tensors when CuPy sees a GPU (it sorts before triton and torch);
kNN graphs and Laplacians stay with the triton/torch backends, so ``backend="cupy"`` names only this op.
cupy-cuda12x imports on machines without a GPU but every array op raises; availability is probed once and
a failure is a reason string, never an import error.

The wrapper is written against an array module pair (xp, sparse.linalg): cupy/cupyx here, numpy/scipy in the
CPU tests, whose lobpcg cupyx ports. Operators stay torch callables (CSR matmul or the Triton SpMM); each
product crosses by DLPack without copies. The start block, its checks and the convergence test are those of
the torch reference ``spectra_gpu.ops.lobpcg.lobpcg_torch``.
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from types import ModuleType
from typing import Any

import torch

from ..errors import ConvergenceWarning, warn_numerical
from ..ops.lobpcg import LobpcgResult, Operator, as_matmul, opnorm_estimate, relative_residuals, start_block
from .base import Backend


@functools.cache
def _available() -> tuple[bool, str]:
    if importlib.util.find_spec("cupy") is None:
        return False, "cupy is not installed (pip install 'spectra_gpu[cupy]')"
    try:
        import cupy

        if not cupy.is_available():
            return False, "cupy found no usable CUDA device (cupy.is_available() is False)"
        import cupyx.scipy.sparse.linalg  # noqa: F401  (raises ImportError without the CUDA libraries)
    except Exception as e:  # driver/runtime mismatch, missing libraries: a reason, not a crash
        return False, f"cupy is installed but unusable: {type(e).__name__}: {e}"
    return True, ""


def _supports(op: str, *args: Any) -> tuple[bool, str]:
    if op != "lobpcg":
        return False, "the cupy backend implements only the eigen-solver ('lobpcg')"
    a = args[0] if args else None
    if not isinstance(a, torch.Tensor) or a.device.type != "cuda":
        where = a.device if isinstance(a, torch.Tensor) else type(a).__name__
        return False, f"operator on {where}: the CuPy LOBPCG needs CUDA tensors"
    return True, ""


def lobpcg_xp(xp: ModuleType, splinalg: ModuleType, a: Operator, k: int, b: Operator | None = None, *,
              m: Operator | None = None, x0: torch.Tensor | None = None, n: int | None = None,
              block: int | None = None, largest: bool = True, tol: float = 1e-6, maxiter: int = 500, seed: int = 0,
              dtype: torch.dtype = torch.float64, device: torch.device | str | None = None,
              warn: bool = True) -> LobpcgResult:
    """lobpcg_torch's contract (same arguments, same result type, same relative-residual test) solved by
    ``splinalg.lobpcg`` (cupyx's or scipy's). Its stopping rule is an absolute residual norm; it gets
    tol x |A| / sqrt|B| (norms estimated from the start block), and convergence is judged afterwards by the
    relative residual, so ``converged`` means the same as on the torch path."""
    amul, bmul, mmul = as_matmul(a), as_matmul(b), as_matmul(m)
    if amul is None:
        raise ValueError("lobpcg: expected an operator a, got None")
    x = start_block(a, k, x0=x0, n=n, block=block, seed=seed, dtype=dtype, device=device)
    n, device = x.shape[0], x.device

    def bop(v: torch.Tensor) -> torch.Tensor:
        return v if bmul is None else bmul(v)

    def linop(mul: Any) -> Any:
        def mm(v: Any) -> Any:
            y = mul(torch.from_dlpack(v.reshape(n, -1)))
            return xp.from_dlpack(y.contiguous()).reshape(v.shape)

        return splinalg.LinearOperator((n, n), matvec=mm, matmat=mm, dtype=xp.dtype(str(dtype).split(".")[1]))

    anorm, bnorm = opnorm_estimate(amul(x), x), opnorm_estimate(bop(x), x)
    tol_abs = tol * anorm / max(bnorm, torch.finfo(dtype).tiny) ** 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # its own "not reaching the tolerance": ours follows
        out = splinalg.lobpcg(linop(amul), xp.from_dlpack(x), B=None if bmul is None else linop(bmul),
                              M=None if mmul is None else linop(mmul), tol=tol_abs, maxiter=maxiter,
                              largest=largest, retResidualNormsHistory=True)
    lam_xp, vec_xp = out[0], out[1]
    iterations = len(out[2]) if len(out) > 2 else 0  # the small-problem dense path returns no history
    lam = torch.from_dlpack(xp.ascontiguousarray(lam_xp)).to(device=device, dtype=dtype)
    vec = torch.from_dlpack(xp.ascontiguousarray(vec_xp)).to(device=device, dtype=dtype)
    order = torch.argsort(lam, descending=largest)[:k]
    lam, vec = lam[order], vec[:, order]
    ax, bx = amul(vec), bop(vec)
    anorm, bnorm = max(anorm, opnorm_estimate(ax, vec)), max(bnorm, opnorm_estimate(bx, vec))
    res = relative_residuals(ax, bx, lam, vec, anorm, bnorm)
    converged = bool((res < tol).all())
    if not converged and warn:
        warn_numerical(f"lobpcg ({xp.__name__}): {k} eigenpairs not converged after {maxiter} iterations (max "
                       f"relative residual {float(res.max()):.2e} > tol {tol:.1e}); best iterate returned",
                       ConvergenceWarning)
    return LobpcgResult(lam, vec, res, iterations, converged)


def lobpcg_cupy(a: Operator, k: int, b: Operator | None = None, **kwargs: Any) -> LobpcgResult:
    """lobpcg_torch's contract solved by cupyx.scipy.sparse.linalg.lobpcg (CUDA tensors in and out)."""
    import cupy
    import cupyx.scipy.sparse.linalg as splinalg

    return lobpcg_xp(cupy, splinalg, a, k, b, **kwargs)


BACKEND = Backend(name="cupy", priority=5, is_available=_available, ops={"lobpcg": lobpcg_cupy},
                  supports=_supports)
