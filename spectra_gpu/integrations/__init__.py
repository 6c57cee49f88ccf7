"""Scores of any registered scorer (``sg.SCORERS``) for other pruning frontends, on the units of
``spectra_gpu.units`` and the signals of ``spectra_gpu.capture`` (one capture path, shared by the driver).

* :class:`SpectraImportance` (``spectra_gpu.integrations.torch_pruning``; ``SpectralImportance`` is the same
  class): a ``tp.importance.Importance`` for Torch-Pruning pruners (and LLM-Pruner's vendored copy). Needs the
  ``prune`` extra: ``pip install 'spectra_gpu[prune]'``; it is imported lazily, so the rest works without it.
* :mod:`spectra_gpu.integrations.nn_prune`: ``torch.nn.utils.prune`` masks, no extra dependency.
* :class:`Calibration` (``spectra_gpu.integrations.calibration``): the calibration both share.
"""

from __future__ import annotations

from typing import Any

from .calibration import Calibration, normalize
from .nn_prune import ChannelScores, channel_scores, importance_scores, prune_channels, spectral_channel_scores


def __getattr__(name: str) -> Any:
    if name in ("SpectraImportance", "SpectralImportance"):
        import importlib

        return getattr(importlib.import_module(f"{__name__}.torch_pruning"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Calibration", "ChannelScores", "SpectraImportance", "SpectralImportance", "channel_scores",
           "importance_scores", "normalize", "prune_channels", "spectral_channel_scores"]
