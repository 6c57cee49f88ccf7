"""Per-unit importance scores."""
from .spectral import ScoreResult, score

__all__ = ["ScoreResult", "score"]
