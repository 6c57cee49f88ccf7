"""Triton backend: the kernels of spectra_gpu.kernels, imported on first use.

Runs CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 (Triton's CPU interpreter). The interpreter is a
test vehicle, orders of magnitude slower than torch, so under it the backend is never chosen automatically
(its priority sorts after torch's), only on explicit request. The eigen-solver is the torch LOBPCG of
ops.lobpcg running over the kernel-built operators (Laplacian CSR + fused SpMM).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable
from typing import Any

import torch

from ..ops.knn import KnnGraph
from ..ops.laplacian import Graph
from ..ops.lobpcg import lobpcg
from .registry import Backend, register

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_FLOATS_KNN = (torch.float16, torch.bfloat16, torch.float32)


@functools.cache
def _available() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install 'spectra_gpu[cuda]')"
    if not INTERPRET and not torch.cuda.is_available():  # checked first: no triton import (~1 s) for nothing
        return False, ("no CUDA device (torch.cuda.is_available() is False); TRITON_INTERPRET=1 runs the kernels "
                       "on CPU for testing")
    try:
        from ..kernels import knn, laplacian  # noqa: F401  (defines the kernels; compiles nothing)
    except Exception as e:  # a broken or mismatched triton install: report it, never crash the import
        return False, f"importing the Triton kernels failed: {type(e).__name__}: {e}"
    return True, ""


def _device_ok(t: torch.Tensor, what: str) -> tuple[bool, str]:
    if t.device.type == "cuda" or (INTERPRET and t.device.type == "cpu"):
        return True, ""
    return False, f"{what} on {t.device}: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU)"


def _supports(op: str, *args: Any) -> tuple[bool, str]:
    if not args or not isinstance(args[0], (torch.Tensor, KnnGraph, Graph)):
        return False, f"{op}: expected a tensor, KnnGraph or Graph first argument"
    first = args[0]
    t = first.idx if isinstance(first, KnnGraph) else first.row if isinstance(first, Graph) else first
    ok, why = _device_ok(t, "input")
    if not ok:
        return ok, why
    if op == "knn_graph":
        from ..kernels.knn import K_MAX

        if t.dtype not in _FLOATS_KNN:
            return False, f"{t.dtype} input: the Triton kNN computes in fp32 (fp16/bf16/fp32); torch keeps {t.dtype}"
        if len(args) > 1 and isinstance(args[1], int) and args[1] > K_MAX:
            return False, f"k={args[1]} > {K_MAX}: the running top-k lives in registers"
    if op in ("laplacian_apply", "lobpcg") and isinstance(t, torch.Tensor) and t.dtype not in (torch.float32,
                                                                                                 torch.float64):
        return False, f"{t.dtype} operator: the SpMM kernel runs float32/float64"
    return True, ""


def _knn_graph(x: torch.Tensor, k: int) -> KnnGraph:
    from ..kernels.knn import knn_topk

    idx, dist = knn_topk(x, k)
    return KnnGraph(idx, dist.double())


def _union_graph(knn: KnnGraph, *, weighted: bool = False) -> Graph:
    from ..kernels.laplacian import union_graph_triton

    return union_graph_triton(knn, weighted=weighted)


def _graph_laplacian(g: Graph, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    from ..kernels.laplacian import graph_laplacian_triton

    return graph_laplacian_triton(g, dtype)


def _laplacian_apply(lap: torch.Tensor, shift: float = 0.0) -> Callable[[torch.Tensor], torch.Tensor]:
    from ..kernels.laplacian import laplacian_apply

    def mm(v: torch.Tensor) -> torch.Tensor:
        return laplacian_apply(lap, v, shift)

    return mm


register(Backend(
    name="triton",
    priority=1000 if INTERPRET else 10,
    is_available=_available,
    ops={"knn_graph": _knn_graph, "union_graph": _union_graph, "graph_laplacian": _graph_laplacian,
         "laplacian_apply": _laplacian_apply, "lobpcg": lobpcg},
    supports=_supports,
))
