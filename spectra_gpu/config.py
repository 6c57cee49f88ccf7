"""What a pruning run is asked to do: :class:`PruneConfig` (validated on construction) and the error raised
when its target cannot be reached (docs/algorithm.md section 7)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from . import units as _units
from .compensate import DAMPING
from .finetune import FinetuneConfig
from .scorers import NEEDS_TAYLOR, get_scorer
from .selection import ALLOCATIONS

HIDDEN_STORES = ("device", "cpu", "disk")

KINDS = _units.KINDS  # neuron (MLP), channel (conv), ffn (transformer FFN neuron), head
EPR_BASES = ("total", "prunable")
HEAD_K = 3  # per-layer head graphs are tiny (12-32 nodes): k = min(3, H - 1), docs/algorithm.md section 6


@dataclass(frozen=True)
class PruneConfig:
    """What to prune and how.

    target: effective parameter reduction in (0, 1) on ``epr_basis`` ('total' parameters, or only the
    'prunable' modules: embeddings, LM head and classifier excluded). scorer: a name of ``SCORERS``. kinds:
    unit kinds to prune. round_fraction: share of each group's current width removed per round. allocation:
    'uniform' (the same fraction per group) or 'global' (pooled by within-layer percentile).
    one_per_neighbourhood: at most one unit per input-graph kNN neighbourhood per round. min_keep_fraction: of
    the original width; neurons/channels/FFN neurons keep max(k + 2, that), heads max(1, that).
    scorer_options: kwargs of the scorer (spectral: those of ``spectra_gpu.score``). seed: scorer draws,
    eigen-solver starts and fine-tune dropout. max_rounds: a run that has not reached the target by then
    fails. track_metric: evaluate after every round. recalibrate_bn: after every round re-estimate BatchNorm
    running statistics on the calibration batches (buffers only, no parameter update; "adaptive BN"), since
    removing upstream channels shifts a BatchNorm's inputs. finetune: the one recovery fine-tune.
    uniform_widths: keep every layer's width equal within each uniform class (groups of one kind and unit with
    the same original width: every FFN layer, every attention layer's query / KV heads), so a pruned Hugging
    Face model is described by its standard config; None (default) = on for models made of Hugging Face
    transformer layers with the 'uniform' allocation, off otherwise (plain modules, 'global' allocation).
    round_to: with uniform widths, neuron / channel / FFN widths are multiples of it (default 8, GPU-friendly
    shapes); the EPR then lands on the achievable EPR nearest the target, which may sit on either side of it.
    sequential: capture and score one transformer block at a time (``spectra_gpu.sequential``: the statistics of
    one block held at once; the same scores as the whole-model capture); None (default) = on for models made of
    Hugging Face transformer layers with a scorer that needs no gradients, off otherwise; True with a gradient
    scorer (Taylor) is refused. hidden_store: where the layer-sequential path keeps the calibration hidden
    states: 'device', 'cpu' (default) or 'disk' (memory-mapped files in the system temporary folder).
    compensate: after the last round, refit every pruned group's consumer by damped least squares to
    reproduce the dense model's output on the calibration batches (``spectra_gpu.compensate``; the rounds stay
    free of parameter updates; needs a copy of the dense model while pruning); None (default) = on for models
    made of Hugging Face transformer layers, off otherwise. compensate_damping: the ridge, as a share of the
    mean diagonal of each consumer's input Gram.
    """

    target: float = 0.5
    scorer: str = "spectral"
    kinds: tuple[str, ...] = KINDS
    round_fraction: float = 0.05
    allocation: str = "uniform"
    one_per_neighbourhood: bool = False
    min_keep_fraction: float = 0.05
    epr_basis: str = "total"
    scorer_options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    max_rounds: int = 1000
    track_metric: bool = True
    recalibrate_bn: bool = False
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    uniform_widths: bool | None = None
    round_to: int = 8
    sequential: bool | None = None
    hidden_store: str = "cpu"
    compensate: bool | None = None
    compensate_damping: float = DAMPING

    def __post_init__(self) -> None:
        if isinstance(self.target, bool) or not isinstance(self.target, (int, float)) or not 0 < self.target < 1:
            raise ValueError(f"target: expected an effective parameter reduction in (0, 1), got {self.target!r}")
        get_scorer(self.scorer)
        kinds = (self.kinds,) if isinstance(self.kinds, str) else tuple(self.kinds)
        bad = [k for k in kinds if k not in KINDS]
        if not kinds or bad:
            raise ValueError(f"kinds: expected a non-empty subset of {KINDS}, got {self.kinds!r}")
        object.__setattr__(self, "kinds", kinds)
        if not 0 < self.round_fraction <= 1:
            raise ValueError(f"round_fraction: expected a number in (0, 1], got {self.round_fraction!r}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation: expected one of {ALLOCATIONS}, got {self.allocation!r}")
        if not 0 <= self.min_keep_fraction < 1:
            raise ValueError(f"min_keep_fraction: expected a number in [0, 1), got {self.min_keep_fraction!r}")
        if self.epr_basis not in EPR_BASES:
            raise ValueError(f"epr_basis: expected one of {EPR_BASES}, got {self.epr_basis!r}")
        if not isinstance(self.scorer_options, dict):
            raise TypeError(f"scorer_options: expected a dict, got {type(self.scorer_options).__name__}")
        k = self.scorer_options.get("k", 1)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"scorer_options['k']: expected an int >= 1 (neighbours per unit), got {k!r}")
        s = self.scorer_options.get("num_eigs", 1)
        if s != "full" and (isinstance(s, bool) or not isinstance(s, int) or s < 1):
            raise ValueError(f"scorer_options['num_eigs']: expected an int >= 1 or 'full', got {s!r}")
        if isinstance(self.max_rounds, bool) or not isinstance(self.max_rounds, int) or self.max_rounds < 1:
            raise ValueError(f"max_rounds: expected an int >= 1, got {self.max_rounds!r}")
        if not isinstance(self.finetune, FinetuneConfig):
            raise TypeError(f"finetune: expected a FinetuneConfig, got {type(self.finetune).__name__}")
        if self.uniform_widths is not None and not isinstance(self.uniform_widths, bool):
            raise TypeError(f"uniform_widths: expected True, False or None, got {self.uniform_widths!r}")
        if self.uniform_widths and self.allocation == "global":
            raise ValueError("uniform_widths: the 'global' allocation gives each layer its own width; expected "
                             "allocation='uniform' with uniform_widths=True, got allocation='global'")
        if isinstance(self.round_to, bool) or not isinstance(self.round_to, int) or self.round_to < 1:
            raise ValueError(f"round_to: expected an int >= 1, got {self.round_to!r}")
        for name in ("sequential", "compensate"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, bool):
                raise TypeError(f"{name}: expected True, False or None, got {v!r}")
        if self.sequential and self.scorer in NEEDS_TAYLOR:
            raise ValueError(f"sequential: scorer {self.scorer!r} needs gradients of the model's loss, which cannot "
                             "be captured one block at a time; expected sequential=False or None with it, got True")
        if self.hidden_store not in HIDDEN_STORES:
            raise ValueError(f"hidden_store: expected one of {HIDDEN_STORES}, got {self.hidden_store!r}")
        d = self.compensate_damping
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not d > 0:
            raise ValueError(f"compensate_damping: expected a number > 0, got {d!r}")

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict (what report.json and a checkpoint record); the fine-tune recipe as
        ``FinetuneConfig.to_dict`` writes it (its optional fields only when set)."""
        d = asdict(self)
        d["kinds"] = list(self.kinds)
        d["finetune"] = self.finetune.to_dict()
        return d

    def uniform_for(self, archs: Iterable[str]) -> bool:
        """Whether a run on groups of these ``arch`` values ('plain', 'bert', 'llama', ...) keeps uniform widths:
        ``uniform_widths`` if set, else True for Hugging Face transformer layers under the 'uniform'
        allocation."""
        if self.uniform_widths is not None:
            return self.uniform_widths
        return self.allocation == "uniform" and any(a != "plain" for a in archs)

    def sequential_for(self, archs: Iterable[str]) -> bool:
        """Whether a run on groups of these ``arch`` values captures layer-sequentially: ``sequential`` if set,
        else True for Hugging Face transformer layers with a scorer that needs no gradients."""
        if self.sequential is not None:
            return self.sequential
        return self.scorer not in NEEDS_TAYLOR and any(a != "plain" for a in archs)

    def compensate_for(self, archs: Iterable[str]) -> bool:
        """Whether a run on groups of these ``arch`` values compensates after pruning: ``compensate`` if set,
        else True for Hugging Face transformer layers."""
        if self.compensate is not None:
            return self.compensate
        return any(a != "plain" for a in archs)

    @property
    def k(self) -> int:
        """Neighbours per unit of the spectral graphs (``scorer_options['k']``, default 10)."""
        return int(self.scorer_options.get("k", 10))


class TargetUnreachableError(ValueError):
    """The target EPR cannot be reached without going below a group's min-keep."""


__all__ = ["EPR_BASES", "HEAD_K", "KINDS", "PruneConfig", "TargetUnreachableError"]
