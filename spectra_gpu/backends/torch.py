"""The torch backend: the reference implementations, on CPU or CUDA tensors. Always available."""

from __future__ import annotations

from typing import Any

from ..ops.knn import knn_torch
from .registry import Backend, register


def _supports(op: str, *args: Any) -> tuple[bool, str]:
    return True, ""


register(Backend(name="torch", priority=100, is_available=lambda: (True, ""),
                 ops={"knn_graph": knn_torch}, supports=_supports))
