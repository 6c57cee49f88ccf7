"""spectra_gpu: find and remove structurally redundant units by spectral graph analysis of hidden states."""

from ._version import __version__
from .accounting import count_params, epr, flops
from .backends import graph_laplacian, knn_graph, lobpcg
from .capture import capture, capture_taylor
from .driver import PruneConfig, PruneResult, prune, score_model
from .errors import BackendUnavailableError, ConvergenceWarning, NotPSDError, NumericalWarning, SpectraError
from .finetune import FinetuneConfig, finetune
from .io import load_pruned, save_pruned
from .masking import masked
from .ops import Graph, KnnGraph, LobpcgResult, generalized_eigh_dense
from .scorers import SCORERS, ScoreContext, ScoreOutput, register_scorer
from .scoring import ScoreResult, score
from .selection import select_units
from .stats import SignalStats
from .surgery import remove_units
from .units import UnitGroup, declare_group, discover_groups

__all__ = [
    "BackendUnavailableError", "ConvergenceWarning", "Graph", "KnnGraph", "LobpcgResult", "NotPSDError",
    "NumericalWarning", "ScoreResult", "SignalStats", "SpectraError", "__version__", "generalized_eigh_dense",
    "graph_laplacian", "knn_graph", "lobpcg", "score",
]
__all__ += ["UnitGroup", "capture", "capture_taylor", "count_params", "declare_group", "discover_groups", "epr",
            "flops", "load_pruned", "masked", "remove_units", "save_pruned"]
__all__ += ["FinetuneConfig", "PruneConfig", "PruneResult", "SCORERS", "ScoreContext", "ScoreOutput", "finetune",
            "prune", "register_scorer", "score_model", "select_units"]
