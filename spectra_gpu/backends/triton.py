"""Triton backend: the kernels of spectra_gpu.kernels, imported on first use.

Runs CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 (Triton's CPU interpreter). The interpreter is a
test vehicle, orders of magnitude slower than torch, so under it the backend is never chosen automatically
(its priority sorts after torch's), only on explicit request. The eigen-solver is the torch reference
``lobpcg_torch`` running over the kernel-built operators (Laplacian CSR + fused SpMM).

Each op ``<stem>`` maps to ``<stem>_triton`` below, which imports ``spectra_gpu.kernels.<stem>`` when first
called (so a machine without triton or a GPU never imports it) and runs its ``<stem>_triton``.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Sequence
from typing import Any

import torch

from ..ops.knn_graph import KnnGraph
from ..ops.lobpcg import lobpcg_torch
from ..ops.union_graph import Graph
from .base import Backend

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
        from ..kernels import graph_laplacian, knn_graph, laplacian_apply, union_graph  # noqa: F401  (defines
        # the kernels; compiles nothing)
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
        from ..kernels.knn_graph import K_MAX

        if t.dtype not in _FLOATS_KNN:
            return False, f"{t.dtype} input: the Triton kNN computes in fp32 (fp16/bf16/fp32); torch keeps {t.dtype}"
        if len(args) > 1 and isinstance(args[1], int) and args[1] > K_MAX:
            return False, f"k={args[1]} > {K_MAX}: the running top-k lives in registers"
    if op in ("laplacian_apply", "lobpcg") and isinstance(t, torch.Tensor) and t.dtype not in (torch.float32,
                                                                                                 torch.float64):
        return False, f"{t.dtype} operator: the SpMM kernel runs float32/float64"
    return True, ""


def knn_graph_triton(x: torch.Tensor, k: int, lengths: Sequence[int] | torch.Tensor | None = None, *,
                     splits: int | None = None) -> KnnGraph:
    from ..kernels import knn_graph

    return knn_graph.knn_graph_triton(x, k, lengths, splits=splits)


def union_graph_triton(knn: KnnGraph, *, weighted: bool = False) -> Graph:
    from ..kernels import union_graph

    return union_graph.union_graph_triton(knn, weighted=weighted)


def graph_laplacian_triton(g: Graph, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    from ..kernels import graph_laplacian

    return graph_laplacian.graph_laplacian_triton(g, dtype)


def laplacian_apply_triton(lap: torch.Tensor, x: torch.Tensor, shift: float = 0.0) -> torch.Tensor:
    from ..kernels import laplacian_apply

    return laplacian_apply.laplacian_apply_triton(lap, x, shift)


BACKEND = Backend(
    name="triton",
    priority=1000 if INTERPRET else 10,
    is_available=_available,
    ops={"knn_graph": knn_graph_triton, "union_graph": union_graph_triton, "graph_laplacian": graph_laplacian_triton,
         "laplacian_apply": laplacian_apply_triton, "lobpcg": lobpcg_torch},
    supports=_supports,
)
