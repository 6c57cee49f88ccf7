"""The torch backend: the references of spectra_gpu.ops, on CPU or CUDA tensors. Always available."""

from __future__ import annotations

from typing import Any

from ..ops.graph_laplacian import graph_laplacian_torch
from ..ops.knn_graph import knn_graph_torch
from ..ops.laplacian_apply import laplacian_apply_torch
from ..ops.lobpcg import lobpcg_torch
from ..ops.union_graph import union_graph_torch
from .base import Backend


def _supports(op: str, *args: Any) -> tuple[bool, str]:
    return True, ""


BACKEND = Backend(name="torch", priority=100, is_available=lambda: (True, ""),
                  ops={"knn_graph": knn_graph_torch, "union_graph": union_graph_torch,
                       "graph_laplacian": graph_laplacian_torch, "laplacian_apply": laplacian_apply_torch,
                       "lobpcg": lobpcg_torch},
                  supports=_supports)
