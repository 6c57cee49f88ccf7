"""Public ops: each validates at the boundary and dispatches to a backend; the torch version is the reference."""
from .knn import KnnGraph, knn_graph
from .laplacian import Graph, graph_laplacian, union_graph
from .lobpcg import LobpcgResult, generalized_eigh_dense, lobpcg

__all__ = ["Graph", "KnnGraph", "LobpcgResult", "generalized_eigh_dense", "graph_laplacian", "knn_graph",
           "lobpcg", "union_graph"]
