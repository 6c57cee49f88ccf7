"""Any scorer of ``sg.SCORERS`` as a Torch-Pruning importance: ``BasePruner(..., importance=SpectraImportance())``.

    imp = SpectraImportance().calibrate(model, calibration_batches)            # spectral (the default)
    imp = SpectraImportance("wanda_sp").calibrate(model, calibration_batches)  # any registered scorer
    imp = SpectraImportance("taylor", loss_fn=loss).calibrate(model, batches)   # gradient scorers: a loss
    tp.pruner.BasePruner(model, example_inputs, importance=imp, pruning_ratio=0.5, ...).step()

``SpectralImportance`` is the same class (the spectral-default name it was published under).

A Torch-Pruning group is a set of members ``(dep, idxs)``: a module, a handler (``prune_out_channels`` or
``prune_in_channels``) and the channels it removes, mapped onto the group's root channels by ``root_idxs``.
The importance returns one score per root channel, lower = pruned first (contract read from torch_pruning
1.6 ``pruner/importance.py`` and ``pruner/algorithms/base_pruner.py``). Each group is translated to units of
``spectra_gpu.units`` and scored by ``spectra_gpu.scorers`` on signals of ``spectra_gpu.capture`` (the
shared :class:`~spectra_gpu.integrations.calibration.Calibration`):

* discovered units: a member that is a producer (or BatchNorm, or consumer input) of a group
  ``discover_groups`` finds (neuron, channel, FFN neuron) gets that unit's score per channel; attention
  q/k/v outputs and out-projection inputs get their head's score on each of the head's channels (GQA: a
  KV channel gets the mean of its query heads), so TP's ``imp.view(num_heads, -1).mean(1)`` is the head
  score. Members mapped this way are averaged per root channel;
* every other group (residual streams: a ResNet stage's conv2/BN2 + shortcut channels; the hidden size of
  BERT or Llama; plain layers with no activation after them) is a residual-stream group
  (``units.StreamGroup``): writers = the members pruned by output channels over their full width
  (Linear, Conv2d, Embedding, BatchNorm, LayerNorm/RMSNorm), readers = the members pruned by input channels
  (Linear, Conv2d). Signals: Z = what a writer adds to the stream (a conv/BN output before the add, an
  attention or FFN output projection, an embedding), A = the stream as the next reader takes it in (after
  the add, the activation or the LayerNorm), sample for sample. So every group gets a score and the same
  ``pruning_ratio`` removes the same parameters as Torch-Pruning's own importances;
* groups of fewer than 3 channels get None (Torch-Pruning then skips them). Dimensions inside a head are not
  units (``prune_head_dims=True`` sees every dim of a head with the head's score: ties, lower index first).

``ch_groups`` (grouped conv, LLM-Pruner's vendored pruner): with ``ch_groups > 1`` the mean over channel
groups is returned tiled ``ch_groups`` times; ``consecutive_groups`` passes unchanged. Cross-group scale:
``normalizer='rank'`` (default, within-group percentile: ``global_pruning=True`` then removes about the same
fraction everywhere), 'zscore', 'max' or None (raw scores).

Iterative pruning: the calibration batches are kept, and when the model's parameter shapes changed since
the last capture (a ``pruner.step()`` of ``iterative_steps > 1``), the next request captures again on the
current shapes. After fine-tuning (same shapes) call ``calibrate`` again to score the new weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

try:
    import torch_pruning as tp
except ImportError as e:  # pragma: no cover - exercised by a test that hides the package
    raise ImportError("spectra_gpu.integrations.torch_pruning needs Torch-Pruning, which is not installed; "
                      "install the extra: pip install 'spectra_gpu[prune]' (torch-pruning>=1.6)") from e

from ..scorers import ScoreOutput
from ..units import StreamGroup, UnitGroup, channel_width
from .calibration import Calibration, Group

_SIDE_OF_HANDLER = {"prune_out_channels": "out", "prune_in_channels": "in"}


def unit_channel_scores(g: UnitGroup, module: nn.Module, side: str, unit_scores: torch.Tensor) -> torch.Tensor | None:
    """Per-channel scores of ``module``'s output ("out") or input ("in") channels from the group's per-unit
    scores, or None if the module's channels on that side are not the group's units."""
    if g.kind == "head":
        hd, r = g.head_dim, g.n_rep
        if (side == "out" and module is g.q) or (side == "in" and module is g.consumer):
            return unit_scores.repeat_interleave(hd * r if g.unit == "kv" else hd)
        if side == "out" and (module is g.k or module is g.v):
            per_kv = unit_scores.view(-1, r).mean(1) if g.unit == "query" else unit_scores
            return per_kv.repeat_interleave(hd)
        return None
    if side == "out" and (any(module is p for p in g.producers) or module is g.norm):
        return unit_scores
    if side == "in" and module is g.consumer:
        return unit_scores.repeat_interleave(g.cols_per_unit)
    return None


class SpectraImportance(tp.importance.Importance):
    """Torch-Pruning importance from any registered scorer (module docstring: how groups become units).

    scorer: a name of ``sg.SCORERS`` ('spectral' by default; 'wanda_sp', 'l1', 'taylor', ...). loss_fn
    (model, batch) -> scalar loss: needed by gradient scorers. normalizer: 'rank', 'zscore', 'max' or None.
    Capture options (``max_samples``, ``positions_per_image``, ``stats_mode``, ``sketch_dim``, ``precision``,
    ``seed``, ``gqa``) go to :class:`~spectra_gpu.integrations.calibration.Calibration`; the remaining keyword
    arguments are the spectral scorers' ``sg.score`` options (``k``, ``num_eigs``, ``direction``, ...).
    """

    def __init__(self, scorer: str = "spectral", *, normalizer: str | None = "rank",
                 loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None, max_samples: int | None = None,
                 positions_per_image: int | None = 64, stats_mode: str = "exact", sketch_dim: int = 4096,
                 precision: str = "fp32", seed: int = 0, gqa: str = "query", **options: Any) -> None:
        self.calibration = Calibration(scorer, normalizer=normalizer, loss_fn=loss_fn, max_samples=max_samples,
                                       positions_per_image=positions_per_image, stats_mode=stats_mode,
                                       sketch_dim=sketch_dim, precision=precision, seed=seed, gqa=gqa, **options)

    # ---- calibration -----------------------------------------------------------------------------------
    def calibrate(self, model: nn.Module, batches: Iterable[Any],
                  forward_fn: Callable[[nn.Module, Any], Any] | None = None,
                  loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None) -> SpectraImportance:
        """Keep ``batches`` and capture the model's signals on them (see Calibration.calibrate). Returns self."""
        self.calibration.calibrate(model, batches, forward_fn, loss_fn)
        return self

    @property
    def groups(self) -> list[UnitGroup]:
        """The discovered unit groups of the last capture."""
        return self.calibration.groups

    def scores(self, g: Group) -> ScoreOutput:
        """The scorer's raw output for one group (cached until the next capture)."""
        return self.calibration.scores(g)

    # ---- the Importance contract -------------------------------------------------------------------------
    def _discovered(self) -> dict[tuple[int, str], UnitGroup]:
        out: dict[tuple[int, str], UnitGroup] = {}
        for g in self.calibration.groups:
            mods = [(g.q, "out"), (g.k, "out"), (g.v, "out")] if g.kind == "head" else \
                [*((p, "out") for p in g.producers), (g.norm, "out")]
            for m, side in [*mods, (g.consumer, "in")]:
                if m is not None:
                    out.setdefault((id(m), side), g)
        return out

    def _stream_members(self, group: Any, n_root: int) -> tuple[list[nn.Module], list[nn.Module]]:
        writers: list[nn.Module] = []
        readers: list[nn.Module] = []
        for item in group:
            dep, idxs = item
            side = _SIDE_OF_HANDLER.get(getattr(dep.handler, "__name__", ""))
            m = dep.target.module
            root = getattr(item, "root_idxs", None)
            if side is None or not isinstance(m, nn.Module) or root is None:
                continue
            width = channel_width(m, side)
            if width is None or width % n_root or len(idxs) != width:
                continue  # the stream's channels are all of a member's channels (or blocks of a flattened read)
            per = width // n_root
            if side == "out" and per != 1:
                continue
            if any(r is None or int(r) != int(i) // per for i, r in zip(idxs, root, strict=False)):
                continue
            bucket = writers if side == "out" else readers
            if all(m is not x for x in bucket):
                bucket.append(m)
        return writers, readers

    @torch.no_grad()
    def __call__(self, group: Any, ch_groups: int = 1, consecutive_groups: int = 1,
                 **kwargs: Any) -> torch.Tensor | None:
        cal = self.calibration
        if cal.model is None:
            raise RuntimeError("SpectraImportance: no calibration signals; call imp.calibrate(model, batches) "
                               "before pruner.step()")
        cal.refresh()
        n_root = len(group[0].idxs)
        for name, v in (("ch_groups", ch_groups), ("consecutive_groups", consecutive_groups)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1 or n_root % v:
                raise ValueError(f"{name}: expected a positive int dividing the root's {n_root} channels, "
                                 f"got {v!r}")
        if n_root < 3:
            return None
        found = self._discovered()
        acc = torch.zeros(n_root, dtype=torch.float64)
        cnt = torch.zeros(n_root, dtype=torch.float64)
        for item in group:
            dep, idxs = item
            side = _SIDE_OF_HANDLER.get(getattr(dep.handler, "__name__", ""))
            module = dep.target.module
            g = found.get((id(module), side)) if side is not None else None
            if g is None or len(idxs) == 0:
                continue
            per_channel = unit_channel_scores(g, module, side, cal.importance(g))  # type: ignore[arg-type]
            root_idxs = getattr(item, "root_idxs", None)
            if root_idxs is None and len(idxs) == n_root:  # older TP copies (LLM-Pruner) have no root_idxs
                root_idxs = list(range(n_root))
            if per_channel is None or root_idxs is None or any(r is None for r in root_idxs):
                continue
            acc.index_add_(0, torch.as_tensor(list(root_idxs)), per_channel[list(idxs)].double())
            cnt.index_add_(0, torch.as_tensor(list(root_idxs)), torch.ones(len(idxs), dtype=torch.float64))
        if bool((cnt > 0).all()):
            out = acc / cnt
        else:
            writers, readers = self._stream_members(group, n_root)
            if not writers and not readers:
                return None
            stream = cal.stream(writers, readers, name=_member_name(cal.model, (writers or readers)[0]))
            out = cal.importance(stream)
        if ch_groups > 1:
            out = out.view(ch_groups, -1).mean(0).repeat(ch_groups)
        return out

    def stream_groups(self) -> list[StreamGroup]:
        """The residual-stream groups scored so far (since the last capture)."""
        return self.calibration.streams


def _member_name(model: nn.Module | None, m: nn.Module) -> str:
    for name, x in (model.named_modules() if model is not None else ()):
        if x is m:
            return f"stream:{name}"
    return f"stream:{type(m).__name__}"


SpectralImportance = SpectraImportance  # the spectral-default name the adapter was published under

__all__ = ["SpectraImportance", "SpectralImportance", "unit_channel_scores"]
