"""The ops layer: for each op ``<stem>`` (knn_graph, union_graph, graph_laplacian, laplacian_apply, lobpcg) the
data types and the torch reference ``<stem>_torch`` in ``ops/<stem>.py``. Nothing here dispatches: the validated
entry points that pick a backend are in ``spectra_gpu.backends`` (one place, above this layer)."""

from .graph_laplacian import LaplacianBatch, graph_laplacian_dense
from .knn_graph import KnnGraph
from .lobpcg import LobpcgResult, generalized_eigh_dense
from .union_graph import Graph

__all__ = ["Graph", "KnnGraph", "LaplacianBatch", "LobpcgResult", "generalized_eigh_dense", "graph_laplacian_dense"]
