"""The calibration both pruning-frontend adapters share: units from ``spectra_gpu.units``, signals from
``spectra_gpu.capture``, scores from a registered scorer of ``spectra_gpu.scorers`` (``sg.SCORERS``).

* Units: the groups ``discover_groups`` finds (kinds neuron, channel, ffn, head), plus residual-stream
  channel groups (``units.StreamGroup``, kind stream) that a frontend declares from its own coupling
  (Torch-Pruning's dependency groups: a ResNet stage's conv2/BN2 + shortcut channels, BERT's or Llama's
  hidden size). Stream signals: Z = what a writer module adds to the stream, A = the stream as the next
  reader module takes it in (see ``units.StreamGroup``).
* Calibration keeps the batches: when the model's parameter shapes change (a pruning step), the next
  request captures again on the current shapes, so iterative pruning needs no call in between. After
  fine-tuning (same shapes, new weights) call ``calibrate`` again yourself.
* Scores: ``run_scorer(scorer, ScoreContext(stats, in_weight, out_weight, taylor))``, higher = keep, then
  ``normalize`` to a cross-layer scale. Scorers that need gradients (``taylor``) need ``loss_fn``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .._validation import check_choice
from ..capture import ForwardFn, _check_positions, capture, capture_stream_taylor, capture_streams, capture_taylor
from ..scorers import NEEDS_TAYLOR, SPECTRAL_SCORERS, ScoreContext, ScoreOutput, get_scorer, run_scorer
from ..stats import SignalStats
from ..units import GQA_MODES, StreamGroup, UnitGroup, discover_groups

NORMALIZERS = ("rank", "zscore", "max")
SPECTRAL_OPTIONS = ("k", "num_eigs", "direction", "preprocess", "backend", "weighted", "dead_filter", "solver",
                    "tol", "maxiter")
LossFn = Callable[[nn.Module, Any], torch.Tensor]
Group = UnitGroup | StreamGroup


def normalize(scores: torch.Tensor, normalizer: str | None) -> torch.Tensor:
    """Map one group's scores (higher = keep, dead = -inf) to a scale comparable across groups.

    'rank' (default): within-group percentile (r + 0.5) / N_alive of the alive units, plus 1e-6 x the raw
    score to break cross-group ties (same-percentile units of two groups would otherwise tie at a global
    threshold and over-prune); global pruning then removes about the same fraction from every group.
    'zscore': (s - mean) / std over alive units. 'max': the scores as they are. None: the raw scores, dead
    units -inf. For the other three, dead units get (lowest alive value - 1): pruned first, finite so means
    over heads and channel groups stay finite. Exact ties are broken toward the lower unit index by a term
    below 1e-9 that keeps every other order: Torch-Pruning prunes every unit at its threshold
    (``imp <= thres``), so ties would otherwise prune more than requested.
    """
    s = scores.detach().double().cpu()
    if normalizer is None:
        return s
    alive = torch.isfinite(s)
    a = s[alive]
    if normalizer == "rank":
        r = torch.empty_like(a)
        r[torch.argsort(a, stable=True)] = torch.arange(a.numel(), dtype=torch.float64)
        v = (r + 0.5) / a.numel() + 1e-6 * a
    elif normalizer == "zscore":
        sd = a.std(correction=0)
        v = (a - a.mean()) / (sd if sd > 0 else 1.0)
    elif normalizer == "max":
        v = a
    else:
        raise ValueError(f"normalizer: expected one of {NORMALIZERS} or None, got {normalizer!r}")
    out = torch.empty_like(s)
    out[alive] = v
    out[~alive] = (float(v.min()) if v.numel() else 0.0) - 1.0
    n = s.numel()
    pos = torch.empty_like(s)
    pos[torch.argsort(out, stable=True)] = torch.arange(n, dtype=torch.float64)
    return out + 1e-9 * (pos + 0.5) / n


def _shapes(model: nn.Module) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple((name, tuple(p.shape)) for name, p in model.named_parameters())


class Calibration:
    """Calibration signals of one model and the scores of one scorer on them.

    scorer: a name of ``sg.SCORERS``. options: the spectral scorers' ``sg.score`` keyword arguments
    (``k``, ``num_eigs``, ``direction``, ``preprocess``, ``backend``, ...); the formula baselines take none.
    normalizer: see :func:`normalize`. loss_fn(model, batch) -> scalar loss: needed by gradient scorers
    (``taylor``). Capture options go to :func:`spectra_gpu.capture.capture`: ``max_samples`` per group,
    ``positions_per_image`` (None = every position), ``stats_mode`` ('exact' or 'sketch'), ``sketch_dim``,
    ``precision`` ('fp32' or 'fp64' products), ``seed``; ``gqa`` goes to ``discover_groups``.
    """

    def __init__(self, scorer: str = "spectral", *, normalizer: str | None = "rank", loss_fn: LossFn | None = None,
                 max_samples: int | None = None, positions_per_image: int | None = 64, stats_mode: str = "exact",
                 sketch_dim: int = 4096, precision: str = "fp32", seed: int = 0, gqa: str = "query",
                 progress: bool = False, **options: Any) -> None:
        get_scorer(scorer)
        if normalizer is not None:
            check_choice(normalizer, "normalizer", NORMALIZERS)
        check_choice(stats_mode, "stats_mode", ("exact", "sketch"))
        check_choice(precision, "precision", ("fp32", "fp64"))
        check_choice(gqa, "gqa", GQA_MODES)
        _check_positions(positions_per_image)
        if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int)
                                        or max_samples < 1):
            raise ValueError(f"max_samples: expected a positive int or None, got {max_samples!r}")
        if scorer in SPECTRAL_SCORERS:
            bad = sorted(set(options) - set(SPECTRAL_OPTIONS))
            if bad:
                raise ValueError(f"options: scorer {scorer!r} takes {SPECTRAL_OPTIONS}, got {bad}")
            k = options.get("k", 10)
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ValueError(f"k: expected an int >= 1, got {k!r}")
            ne = options.get("num_eigs", 32)
            if ne != "full" and (isinstance(ne, bool) or not isinstance(ne, int) or ne < 1):
                raise ValueError(f"num_eigs: expected an int >= 1 or 'full', got {ne!r}")
        elif options:
            raise ValueError(f"options: scorer {scorer!r} takes no options (only the spectral scorers "
                             f"{SPECTRAL_SCORERS} do), got {sorted(options)}")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn: expected a callable (model, batch) -> scalar loss, got {type(loss_fn).__name__}")
        self.scorer, self.normalizer, self.options, self.loss_fn = scorer, normalizer, dict(options), loss_fn
        self.capture_options: dict[str, Any] = dict(
            max_samples=max_samples, positions_per_image=positions_per_image, mode=stats_mode,
            sketch_dim=sketch_dim, precision=precision, seed=seed, progress=progress)
        self.seed, self.gqa, self.progress = seed, gqa, progress
        self.model: nn.Module | None = None
        self.batches: list[Any] = []
        self.forward: ForwardFn | None = None
        self.groups: list[UnitGroup] = []
        self.stats: dict[str, SignalStats] = {}
        self.taylor: dict[str, torch.Tensor] = {}
        self.captures = 0  # how many times signals were captured (calibrate + automatic recaptures)
        self._shapes: tuple[Any, ...] = ()
        self._streams: dict[tuple[tuple[int, ...], tuple[int, ...]], StreamGroup] = {}
        self._stream_stats: dict[str, tuple[SignalStats, str]] = {}
        self._scores: dict[int, ScoreOutput] = {}

    @property
    def needs_taylor(self) -> bool:
        return self.scorer in NEEDS_TAYLOR

    # ---- calibration -------------------------------------------------------------------------------------
    def calibrate(self, model: nn.Module, batches: Iterable[Any], forward: ForwardFn | None = None,
                  loss_fn: LossFn | None = None) -> Calibration:
        """Keep ``batches`` (model inputs: tensors, (inputs, labels) pairs or Hugging Face dicts whose
        ``attention_mask`` drops padding) and capture every discovered group's signals on them. ``forward``
        (model, batch) replaces ``capture.default_forward``; ``loss_fn`` replaces the constructor's."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if isinstance(batches, (torch.Tensor, Mapping)) or not isinstance(batches, Iterable):
            raise TypeError(f"batches: expected an iterable of batches, got one {type(batches).__name__}; "
                            "wrap it in a list")
        kept = list(batches)
        if not kept:
            raise ValueError("batches: expected at least one calibration batch, got none")
        if forward is not None and not callable(forward):
            raise TypeError(f"forward: expected a callable (model, batch) or None, got {type(forward).__name__}")
        if loss_fn is not None:
            if not callable(loss_fn):
                raise TypeError(f"loss_fn: expected a callable (model, batch) -> scalar loss, got "
                                f"{type(loss_fn).__name__}")
            self.loss_fn = loss_fn
        if self.needs_taylor and self.loss_fn is None:
            raise ValueError(f"loss_fn: scorer {self.scorer!r} needs gradients; pass loss_fn(model, batch) -> scalar "
                             "loss to the constructor or to calibrate")
        self.model, self.batches, self.forward = model, kept, forward
        self._capture()
        return self

    def _capture(self) -> None:
        model = self.model
        assert model is not None
        try:
            groups = discover_groups(model, gqa=self.gqa)
        except ValueError:  # no group of a known pattern: only declared streams will be scored
            groups = []
        self.groups = [g for g in groups if g.size >= 3]
        self.stats = capture(model, self.groups, self.batches, forward=self.forward, **self.capture_options) \
            if self.groups else {}
        self.taylor = {}
        if self.needs_taylor and self.groups:
            assert self.loss_fn is not None
            self.taylor = capture_taylor(model, self.groups, self.batches, self.loss_fn,
                                         max_samples=self.capture_options["max_samples"], progress=self.progress)
        self._streams.clear()
        self._stream_stats.clear()
        self._scores.clear()
        self._shapes = _shapes(model)
        self.captures += 1

    def refresh(self) -> bool:
        """Capture again on the kept batches if the model's parameter shapes changed since the last capture
        (True then). RuntimeError before any calibration."""
        if self.model is None:
            raise RuntimeError("no calibration signals: call calibrate(model, batches) first")
        if _shapes(self.model) == self._shapes:
            return False
        self._capture()
        return True

    def stream(self, writers: Iterable[nn.Module], readers: Iterable[nn.Module], name: str = "") -> StreamGroup:
        """The residual-stream group of these writer and reader modules, its signals captured on the kept
        batches on first use (one pass per stream; kept until the next capture)."""
        w, r = tuple(writers), tuple(readers)
        key = (tuple(id(m) for m in w), tuple(id(m) for m in r))
        s = self._streams.get(key)
        if s is not None:
            return s
        assert self.model is not None
        name = name or "stream"
        if name in self._stream_stats:
            name = f"{name}#{len(self._streams)}"
        s = StreamGroup(name, w, r)
        self._stream_stats[s.name] = capture_streams(self.model, [s], self.batches, forward=self.forward,
                                                     **self.capture_options)[s.name]
        if self.needs_taylor:
            assert self.loss_fn is not None
            self.taylor[s.name] = capture_stream_taylor(self.model, [s], self.batches, self.loss_fn,
                                                        progress=self.progress)[s.name]
        self._streams[key] = s
        return s

    @property
    def streams(self) -> list[StreamGroup]:
        """The residual-stream groups declared since the last capture."""
        return list(self._streams.values())

    def signals(self, g: Group) -> SignalStats:
        """The captured statistics of a group (a discovered one, or a stream from :meth:`stream`)."""
        if isinstance(g, StreamGroup):
            return self._stream_stats[g.name][0]
        return self.stats[g.name]

    def stream_source(self, g: StreamGroup) -> str:
        """Where a stream's samples came from: 'pairs' (write, next read), else 'reads' or 'writes' alone."""
        return self._stream_stats[g.name][1]

    # ---- scores ------------------------------------------------------------------------------------------
    def scores(self, g: Group) -> ScoreOutput:
        """The scorer's output for one group at its current width (cached until the next capture)."""
        out = self._scores.get(id(g))
        if out is None:
            ctx = ScoreContext(self.signals(g), g.in_weight().detach(), g.out_weight().detach(),
                               self.taylor.get(g.name), seed=self.seed, options=dict(self.options))
            out = self._scores[id(g)] = run_scorer(self.scorer, ctx)
        return out

    def importance(self, g: Group) -> torch.Tensor:
        """[N] float64 per-unit importance on the ``normalizer`` scale (lower = prune first)."""
        return normalize(self.scores(g).scores, self.normalizer)


__all__ = ["Calibration", "NORMALIZERS", "normalize"]
