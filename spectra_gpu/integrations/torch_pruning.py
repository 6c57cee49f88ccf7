"""Spectral scores as a Torch-Pruning importance: ``BasePruner(..., importance=SpectralImportance())``.

Calibrate once (hooks, no gradients), then every pruner asks ``importance(group)`` per dependency group and
gets one score per channel of the group's root, lower = pruned first, or None for groups it cannot score.

How a group is scored (contract read from torch_pruning 1.6.1 ``pruner/importance.py`` and
``algorithms/base_pruner.py``; anchors.md section 1.2):

* every member ``(dep, idxs)`` of the group whose layer was calibrated contributes its normalised per-unit
  scores: output-channel members (``prune_out_channels`` of a Linear/Conv whose output reaches an
  activation) and input-channel members of attention output projections (``prune_in_channels`` of
  ``o_proj``: TP roots attention groups there). They are mapped onto the root with ``root_idxs`` and averaged;
* None when no member has signals (residual-stream / hidden-size groups, q/k/v out-channels alone, layers
  without a following activation, layers not run during calibration) or when some root channel is left
  uncovered; TP then skips the group;
* channel groups and heads: the vector is per root channel in the root's order, so TP's own
  ``imp.view(ch_groups, -1).mean(0)`` (grouped conv, head dims) and ``imp.view(num_heads, -1).mean(1)``
  (whole heads) reduce it correctly. LLM-Pruner's vendored pruner passes ``ch_groups``/``consecutive_groups``
  and keeps only the first ``1/ch_groups`` of the vector, so with ``ch_groups > 1`` the mean over groups is
  returned tiled ``ch_groups`` times; it sums ``consecutive_groups`` blocks itself, so those pass unchanged;
* cross-layer scale (needed by ``global_pruning=True``): ``normalizer='rank'`` (default) = within-layer
  percentile, so global pruning removes about the same fraction of every layer; 'zscore', 'max' or None
  (raw engine scores) are the alternatives. See :meth:`SpectralCalibrator.importance`.

Scores are computed for the widths seen at calibration. After ``pruner.step()`` the model has changed: with
``iterative_steps > 1`` call ``calibrate`` again before each step (a stale layer raises ValueError).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

try:
    import torch_pruning as tp
except ImportError as e:  # pragma: no cover - exercised by a test that hides the package
    raise ImportError("spectra_gpu.integrations.torch_pruning needs Torch-Pruning, which is not installed; "
                      "install the extra: pip install 'spectra_gpu[prune]' (torch-pruning>=1.6)") from e

from ..scoring.spectral import ScoreResult
from ._calibrate import SpectralCalibrator, Unit

_KIND_OF_HANDLER = {"prune_out_channels": "out", "prune_in_channels": "attn"}


class SpectralImportance(tp.importance.Importance):
    """Torch-Pruning importance from spectral structural scores (see the module docstring for the rules).

    Options: ``normalizer`` ('rank', 'zscore', 'max' or None), the :func:`spectra_gpu.score` options ``k``,
    ``num_eigs``, ``direction``, ``preprocess``, ``seed``, ``backend``, and the calibration options
    ``stats_mode`` ('exact' N x N Gram per side, or 'sketch' for very wide layers), ``precision``,
    ``sketch_dim``, ``max_samples_per_batch`` (random columns kept per batch; None = all).
    """

    def __init__(self, *, normalizer: str | None = "rank", k: int = 10, num_eigs: int | str = 32,
                 direction: str = "fwd", preprocess: str = "zscore", stats_mode: str = "exact",
                 precision: str = "fp32", sketch_dim: int = 4096, max_samples_per_batch: int | None = 4096,
                 seed: int = 0, backend: str | None = None) -> None:
        self.calibrator = SpectralCalibrator(
            k=k, num_eigs=num_eigs, direction=direction, preprocess=preprocess, normalizer=normalizer,
            stats_mode=stats_mode, precision=precision, sketch_dim=sketch_dim,
            max_samples_per_batch=max_samples_per_batch, seed=seed, backend=backend)

    # ---- calibration -----------------------------------------------------------------------------------
    def calibrate(self, model: nn.Module, batches: Iterable[Any],
                  forward_fn: Callable[[nn.Module, Any], Any] | None = None) -> SpectralImportance:
        """Run the model on ``batches`` (tensor, tuple/list or mapping each; or ``forward_fn(model, batch)``)
        and keep the signal statistics. Replaces any earlier calibration. Returns self."""
        self.calibrator.calibrate(model, batches, forward_fn)
        return self

    def calibration(self, model: nn.Module) -> AbstractContextManager[SpectralCalibrator]:
        """``with imp.calibration(model): model(x)`` ... : every forward inside the block is calibration."""
        return self.calibrator.calibration(model)

    @property
    def units(self) -> dict[tuple[nn.Module, str], Unit]:
        """Calibrated unit sets, keyed by (module, 'out' | 'attn')."""
        return self.calibrator.units

    def result(self, module: nn.Module, kind: str = "out") -> ScoreResult | None:
        """The raw :func:`spectra_gpu.score` result for a module's units (cached), or None."""
        return self.calibrator.result(module, kind)

    # ---- the Importance contract -------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, group: Any, ch_groups: int = 1, consecutive_groups: int = 1,
                 **kwargs: Any) -> torch.Tensor | None:
        if not self.calibrator.units:
            raise RuntimeError("SpectralImportance: no calibration signals; call imp.calibrate(model, batches) "
                               "or run the model inside `with imp.calibration(model):` before pruner.step()")
        n_root = len(group[0].idxs)
        for name, v in (("ch_groups", ch_groups), ("consecutive_groups", consecutive_groups)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1 or n_root % v:
                raise ValueError(f"{name}: expected a positive int dividing the root's {n_root} channels, "
                                 f"got {v!r}")
        acc = torch.zeros(n_root, dtype=torch.float64)
        cnt = torch.zeros(n_root, dtype=torch.float64)
        for item in group:
            dep, idxs = item
            kind = _KIND_OF_HANDLER.get(getattr(dep.handler, "__name__", ""))
            module = dep.target.module
            if kind is None or not isinstance(module, nn.Module) or len(idxs) == 0:
                continue
            imp = self.calibrator.importance(module, kind)
            if imp is None:
                continue
            root_idxs = getattr(item, "root_idxs", None)
            if root_idxs is None and len(idxs) == n_root:  # older TP copies (LLM-Pruner) have no root_idxs
                root_idxs = list(range(n_root))
            if root_idxs is None or any(r is None for r in root_idxs):
                continue
            acc.index_add_(0, torch.as_tensor(list(root_idxs)), imp[list(idxs)].double())
            cnt.index_add_(0, torch.as_tensor(list(root_idxs)), torch.ones(len(idxs), dtype=torch.float64))
        if bool((cnt == 0).any()):
            return None
        out = acc / cnt
        if ch_groups > 1:
            out = out.view(ch_groups, -1).mean(0).repeat(ch_groups)
        return out


__all__ = ["SpectralImportance"]
