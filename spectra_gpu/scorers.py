"""Per-unit importance scorers behind one interface, so the driver and the experiments swap them by name.

Every scorer maps a :class:`ScoreContext` (one group of units at its current width: calibration statistics,
incoming/outgoing weights, optional Taylor terms) to a :class:`ScoreOutput` whose ``scores`` are higher = keep.
Formulas are docs/algorithm.md section 9; everything comes from :class:`SignalStats` + weights + taylor, so
every criterion sees the same calibration data and is recomputed every round by the driver (fairness rules).

Statistics from ``SignalStats`` (post side = activation a_i over the M calibration samples):
  mean_i, std_i = stats.mean_std("post"), ||a_i||_2^2 = M (std_i^2 + mean_i^2), zero fraction = 1 - nnz_i / M,
  mean |a_i| = abs_sum_post_i / M.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .ops.knn_graph import SqDist, knn_from_sqdist
from .scoring.spectral import _dead_mask, score
from .selection import percentile_ranks
from .stats import SignalStats


@dataclass
class ScoreContext:
    """Everything a scorer may use for one group, at its current width N.

    stats: pre/post statistics over the calibration set (alive and dead units). in_weight: [N, fan_in] incoming
    weights (a row or a flattened conv filter per unit). out_weight: [N, fan_out] outgoing weights, one row per
    unit (W_out[:, i] of the consumer). taylor: [N] |mean a*dL/da| if captured. seed: for random and solver
    starts. options: scorer kwargs (spectral: those of ``spectra_gpu.score``; any scorer: ``neighbors=True``
    and ``k`` to also return the z-scored input-side kNN lists for redundancy-aware selection).
    """

    stats: SignalStats
    in_weight: torch.Tensor
    out_weight: torch.Tensor
    taylor: torch.Tensor | None = None
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.stats, SignalStats):
            raise TypeError(f"stats: expected a SignalStats, got {type(self.stats).__name__}")
        n = self.stats.n
        for name in ("in_weight", "out_weight"):
            w = getattr(self, name)
            if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.shape[0] != n:
                got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
                raise ValueError(f"{name}: expected a tensor [N={n}, fan], got {got}")
        if self.taylor is not None and (not isinstance(self.taylor, torch.Tensor) or self.taylor.shape != (n,)):
            got = tuple(self.taylor.shape) if isinstance(self.taylor, torch.Tensor) else type(self.taylor).__name__
            raise ValueError(f"taylor: expected a tensor [N={n}] or None, got {got}")
        if not isinstance(self.options, dict):
            raise TypeError(f"options: expected a dict, got {type(self.options).__name__}")

    @property
    def n(self) -> int:
        return self.stats.n


@dataclass
class ScoreOutput:
    """scores [N] float64 (higher = keep; -inf = prune first); neighbors [N, k] int64 input-graph kNN lists in
    unit indices (-1 rows for units left out of the graph) or None; extra: eigenvalues, diagnostics."""

    scores: torch.Tensor
    neighbors: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)


Scorer = Callable[[ScoreContext], ScoreOutput]
_NEIGHBOR_KEYS = ("neighbors", "k")


def input_knn(stats: SignalStats, k: int = 10) -> torch.Tensor:
    """z-scored input-side (pre) kNN lists [N, k] in unit indices, the graph the spectral score builds: dead
    units (same filter as ``score``) get -1 rows and are nobody's neighbour."""
    _, std_pre = stats.mean_std("pre")
    _, std_post = stats.mean_std("post")
    alive = ~_dead_mask(std_pre, std_post, stats.nnz_post, stats.m)
    units = alive.nonzero().flatten()
    out = torch.full((stats.n, max(0, min(k, len(units) - 1))), -1, dtype=torch.int64)
    if len(units) < 2:
        return out
    if stats.mode == "exact":
        d = SqDist(gram=stats.gram("pre", "zscore", alive))
    else:
        d = SqDist(x=stats.sketch("pre", "zscore", alive))
    knn = knn_from_sqdist(d, out.shape[1])
    out[units.cpu()] = units.cpu()[knn.idx.cpu()]
    return out


def _baseline(fn: Callable[[ScoreContext], torch.Tensor]) -> Scorer:
    """Wrap a formula: float64 CPU scores, NaN-checked, plus kNN lists when options ask for them."""

    def run(ctx: ScoreContext) -> ScoreOutput:
        unknown = set(ctx.options) - set(_NEIGHBOR_KEYS)
        if unknown:
            raise ValueError(f"options: {fn.__name__} takes only {_NEIGHBOR_KEYS}, got {sorted(unknown)}")
        s = fn(ctx).detach().to("cpu", torch.float64)
        if bool(torch.isnan(s).any()):
            raise ValueError(f"scorer {fn.__name__}: produced NaN scores (check the inputs for NaN)")
        nb = input_knn(ctx.stats, int(ctx.options.get("k", 10))) if ctx.options.get("neighbors") else None
        return ScoreOutput(s, nb, {})

    run.__name__ = run.__qualname__ = fn.__name__
    run.__doc__ = fn.__doc__
    return run


def _post_moments(ctx: ScoreContext) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = ctx.stats.mean_std("post")
    return mean.cpu(), std.cpu()


def random_scores(ctx: ScoreContext) -> torch.Tensor:
    """Uniform draw from a generator seeded by ``ctx.seed`` (the driver varies it by round and group)."""
    return torch.rand(ctx.n, generator=torch.Generator().manual_seed(int(ctx.seed)), dtype=torch.float64)


def weight_l1(ctx: ScoreContext) -> torch.Tensor:
    """||w_i||_1 of the incoming weights (Li et al. 2017)."""
    return ctx.in_weight.detach().double().abs().sum(dim=1)


def weight_l2(ctx: ScoreContext) -> torch.Tensor:
    """||w_i||_2 of the incoming weights."""
    return ctx.in_weight.detach().double().norm(dim=1)


def activation_mean(ctx: ScoreContext) -> torch.Tensor:
    """(1/M) sum_m |a_im| (exact for signed activations too: SignalStats keeps sum |a|)."""
    return ctx.stats.abs_sum_post.cpu() / ctx.stats.m


def activation_variance(ctx: ScoreContext) -> torch.Tensor:
    """Var_m(a_im) (population variance over the calibration samples)."""
    _, std = _post_moments(ctx)
    return std * std


def apoz(ctx: ScoreContext) -> torch.Tensor:
    """Average percentage of zeros (Hu et al. 2016), negated: prune the highest zero fraction first."""
    return -(1.0 - ctx.stats.nnz_post.cpu() / ctx.stats.m)


def taylor_fo(ctx: ScoreContext) -> torch.Tensor:
    """|(1/M) sum_m a_im g_im| (Molchanov et al. 2017), as captured by ``capture_taylor``."""
    if ctx.taylor is None:
        raise ValueError("scorer 'taylor': expected ctx.taylor [N] (capture it with capture_taylor), got None")
    return ctx.taylor.detach().double().abs()


def act_l2(ctx: ScoreContext) -> torch.Tensor:
    """||a_i||_2 over the calibration samples = sqrt(M (std^2 + mean^2))."""
    mean, std = _post_moments(ctx)
    return (ctx.stats.m * (std * std + mean * mean)).sqrt()


def wanda_sp(ctx: ScoreContext) -> torch.Tensor:
    """Structured Wanda as defined in FLAP: ||W_out[:, i]||_1 * ||a_i||_2."""
    return ctx.out_weight.detach().double().abs().sum(dim=1).cpu() * act_l2(ctx)


def flap(ctx: ScoreContext) -> torch.Tensor:
    """FLAP fluctuation (no bias compensation): Var_m(a_i) * ||W_out[:, i]||_2^2."""
    return activation_variance(ctx) * ctx.out_weight.detach().double().pow(2).sum(dim=1).cpu()


def spectral(ctx: ScoreContext) -> ScoreOutput:
    """The spectral structural-importance engine (``spectra_gpu.score``) on the group's statistics; options
    are its keyword arguments. Dead units score -inf; neighbors are the engine's input-graph kNN lists."""
    opts = {key: v for key, v in ctx.options.items() if key != "neighbors"}
    opts.setdefault("seed", int(ctx.seed))
    res = score(ctx.stats, **opts)
    return ScoreOutput(res.scores.detach().cpu(), res.neighbors.cpu(),
                       {"eigenvalues": res.eigenvalues.cpu(), "diagnostics": res.diagnostics})


def hybrid_rank(ctx: ScoreContext) -> ScoreOutput:
    """Spectral x magnitude: (rank of the spectral score + 1/N) x (rank of Wanda-sp + 1/N), within-group
    percentile ranks in [0, 1). The graph says which units are interchangeable, the magnitude how much each
    carries. The most robust spectral variant of the evidence runs (research/README.md); dead
    units stay -inf. Options go to the spectral factor."""
    spec = spectral(ctx)
    mag = wanda_sp(ctx)
    n = len(mag)
    s = (percentile_ranks(spec.scores) + 1.0 / n) * (percentile_ranks(mag) + 1.0 / n)
    s[spec.scores == -math.inf] = -math.inf
    return ScoreOutput(s, spec.neighbors, spec.extra)


SCORERS: dict[str, Scorer] = {
    "spectral": spectral,
    "hybrid_rank": hybrid_rank,
    "random": _baseline(random_scores),
    "l1": _baseline(weight_l1),
    "l2": _baseline(weight_l2),
    "act_mean": _baseline(activation_mean),
    "act_var": _baseline(activation_variance),
    "apoz": _baseline(apoz),
    "taylor": _baseline(taylor_fo),
    "wanda_sp": _baseline(wanda_sp),
    "flap": _baseline(flap),
}
NEEDS_TAYLOR: set[str] = {"taylor"}  # scorers whose context must carry ctx.taylor
SPECTRAL_SCORERS = ("spectral", "hybrid_rank")  # take sg.score's options and need exact statistics
# the formula baselines shipped here, fixed at definition (not "everything registered so far"): they take no
# options and need only per-unit moments
BUILTIN_BASELINES = frozenset(SCORERS) - set(SPECTRAL_SCORERS)


def get_scorer(name: str) -> Scorer:
    """The scorer registered under ``name`` (ValueError listing the known names otherwise)."""
    if not isinstance(name, str) or name not in SCORERS:
        raise ValueError(f"scorer: expected one of {', '.join(sorted(SCORERS))}, got {name!r}")
    return SCORERS[name]


def register_scorer(name: str, fn: Scorer, *, needs_taylor: bool = False) -> None:
    """Add a scorer (e.g. an experimental hybrid) so the driver and CLI can use it by name."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name: expected a non-empty str, got {name!r}")
    if not callable(fn):
        raise TypeError(f"fn: expected a callable ScoreContext -> ScoreOutput, got {type(fn).__name__}")
    SCORERS[name] = fn
    if needs_taylor:
        NEEDS_TAYLOR.add(name)


def run_scorer(name: str, ctx: ScoreContext) -> ScoreOutput:
    """Score one group by name and check the output contract (length N, float, no NaN)."""
    out = get_scorer(name)(ctx)
    if not isinstance(out, ScoreOutput):
        raise TypeError(f"scorer {name!r}: expected a ScoreOutput, got {type(out).__name__}")
    if out.scores.shape != (ctx.n,):
        raise ValueError(f"scorer {name!r}: expected scores of shape ({ctx.n},), got {tuple(out.scores.shape)}")
    if bool(torch.isnan(out.scores).any()) or bool((out.scores == math.inf).any()):
        raise ValueError(f"scorer {name!r}: produced NaN or +inf scores")
    return out


__all__ = ["BUILTIN_BASELINES", "NEEDS_TAYLOR", "SCORERS", "SPECTRAL_SCORERS", "ScoreContext", "ScoreOutput",
           "Scorer", "get_scorer", "input_knn", "register_scorer", "run_scorer"]
