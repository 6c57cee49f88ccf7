"""Backends and the public ops that dispatch to them: explicit argument > SPECTRA_GPU_BACKEND > automatic (torch,
the reference, is the floor)."""

from .base import Backend
from .dispatch import graph_laplacian, knn_graph, laplacian_apply, laplacian_operator, lobpcg, union_graph
from .registry import REGISTRY, available_backends, register, select

__all__ = ["REGISTRY", "Backend", "available_backends", "graph_laplacian", "knn_graph", "laplacian_apply",
           "laplacian_operator", "lobpcg", "register", "select", "union_graph"]
