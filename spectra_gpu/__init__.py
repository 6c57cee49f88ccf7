"""spectra_gpu: find and remove structurally redundant units by spectral graph analysis of hidden states."""

from ._version import __version__
from .errors import BackendUnavailableError, ConvergenceWarning, NotPSDError, NumericalWarning, SpectraError
from .ops import Graph, KnnGraph, LobpcgResult, generalized_eigh_dense, graph_laplacian, knn_graph, lobpcg
from .scoring import ScoreResult, score
from .stats import SignalStats

__all__ = [
    "BackendUnavailableError", "ConvergenceWarning", "Graph", "KnnGraph", "LobpcgResult", "NotPSDError",
    "NumericalWarning", "ScoreResult", "SignalStats", "SpectraError", "__version__", "generalized_eigh_dense",
    "graph_laplacian", "knn_graph", "lobpcg", "score",
]
