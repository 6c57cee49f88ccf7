"""The torch backend: the reference implementations, on CPU or CUDA tensors. Always available."""

from __future__ import annotations

from typing import Any

from ..ops.knn import knn_torch
from ..ops.laplacian import laplacian_csr, laplacian_operator, union_graph
from ..ops.lobpcg import lobpcg
from .registry import Backend, register


def _supports(op: str, *args: Any) -> tuple[bool, str]:
    return True, ""


register(Backend(name="torch", priority=100, is_available=lambda: (True, ""),
                 ops={"knn_graph": knn_torch, "union_graph": union_graph, "graph_laplacian": laplacian_csr,
                      "laplacian_apply": laplacian_operator, "lobpcg": lobpcg}, supports=_supports))
