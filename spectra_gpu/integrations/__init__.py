"""Spectral scores for other pruning frontends.

* :class:`SpectralImportance` (``spectra_gpu.integrations.torch_pruning``): a ``tp.importance.Importance`` for
  Torch-Pruning pruners (and LLM-Pruner's vendored copy). Needs the ``prune`` extra:
  ``pip install 'spectra_gpu[prune]'``; it is imported lazily, so the rest works without it.
* :mod:`spectra_gpu.integrations.nn_prune`: ``torch.nn.utils.prune`` masks, no extra dependency.
"""

from __future__ import annotations

from typing import Any

from ._calibrate import SpectralCalibrator, normalize
from .nn_prune import ChannelScores, importance_scores, prune_channels, spectral_channel_scores


def __getattr__(name: str) -> Any:
    if name == "SpectralImportance":
        from .torch_pruning import SpectralImportance

        return SpectralImportance
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ChannelScores", "SpectralCalibrator", "SpectralImportance", "importance_scores", "normalize",
           "prune_channels", "spectral_channel_scores"]
