"""One pruning round (docs/algorithm.md section 7), as separately callable steps that :func:`prune_round`
composes:

1. :func:`capture_and_score` (= :func:`capture_signals` + :func:`score_groups`): capture the calibration
   signals of the *current* (already shrunk) model and score every group with the chosen scorer (seeded per
   round and group; same calibration data for every scorer). ``score_model`` is this step alone.
2. :func:`select_steps`: per group the q = ceil(r x width) lowest-scoring units (uniform r, or a global
   allocation by within-layer percentile; attention heads follow the uniform schedule of their original
   width, see :func:`head_counts`) under min-keep, the duplicate-pair rule and optionally
   one-per-neighbourhood, interleaved across groups in score order.
3. :func:`trim_steps`: when the whole round would overshoot the target, the shortest prefix of those
   removals that reaches it, counted exactly on module shapes (``accounting.params_after_removal``), so the
   EPR lands on the target with an overshoot below one unit's parameters. With uniform widths
   (``PruneConfig.uniform_for``: every layer of a uniform class keeps the same width, neuron / FFN widths
   multiples of ``round_to``) a step takes units from every layer of a class at once, and the round stops at
   the step boundary whose count is nearest the target (on either side of it).
4. :func:`apply_removals`: physical removal (``surgery.remove_units``), then optionally BatchNorm
   recalibration.

No parameter is updated by a round. Groups are :class:`~spectra_gpu.units.UnitGroup` objects holding module
references, and surgery replaces tensors inside the same modules, so the groups passed in stay valid (their
widths are read from the modules) after the removals.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import accounting, faults, surgery
from ._progress import enabled as _progress_on
from ._progress import progress
from .capture import capture, capture_taylor, default_forward
from .config import HEAD_K, PruneConfig, TargetUnreachableError
from .scorers import BUILTIN_BASELINES, NEEDS_TAYLOR, SPECTRAL_SCORERS, ScoreContext, ScoreOutput, run_scorer
from .selection import round_counts, select_units
from .stats import SignalStats
from .units import UnitGroup

ForwardFn = Callable[[nn.Module, Any], Any]
LossFn = Callable[[nn.Module, Any], torch.Tensor]
Removal = tuple[str, list[int]]  # (group name, unit indices removed together: one unit, or one GQA block)


# ---- fixed per run ---------------------------------------------------------------------------------------
def min_keep(kind: str, original_width: int, cfg: PruneConfig, round_to: int = 1) -> int:
    """max(k + 2, min_keep_fraction of the original width) for neurons/channels/FFN neurons (the kNN graph
    needs k + 1 nodes and a margin), rounded up to a multiple of ``round_to`` (uniform widths; at most the
    original width); >= 1 head per layer."""
    frac = math.ceil(cfg.min_keep_fraction * original_width)
    if kind == "head":
        return max(1, frac)
    keep = max(cfg.k + 2, frac)
    return min(original_width, math.ceil(keep / round_to) * round_to)


def uniform_class(group: UnitGroup) -> str:
    """The key of the groups whose widths a uniform-width run keeps equal: kind, unit and original width
    (every FFN layer of a transformer, every layer's query heads, ...)."""
    return f"{group.kind}:{group.unit}:{int(group.size)}"


@dataclass(frozen=True)
class Baseline:
    """What every round of a run measures against, fixed before the first round: each group's original
    width, kind and min-keep, the EPR basis (parameter counts before pruning), and for uniform-width runs
    (``PruneConfig.uniform_for``) each group's uniform class (``uniform_class``; empty: widths are free) and
    the multiple neuron / channel / FFN widths are rounded to (``round_to``; 1 when widths are free)."""

    widths: dict[str, int]
    kinds: dict[str, str]
    min_keep: dict[str, int]
    epr: accounting.EprBasis
    classes: dict[str, str] = field(default_factory=dict)
    round_to: int = 1

    @property
    def uniform(self) -> bool:
        return bool(self.classes)

    @classmethod
    def of(cls, model: nn.Module, groups: Sequence[UnitGroup], cfg: PruneConfig) -> Baseline:
        """The baseline of the unpruned ``model`` with its ``groups``."""
        uniform = cfg.uniform_for(g.arch for g in groups)
        rt = cfg.round_to if uniform else 1
        return cls(widths={g.name: int(g.size) for g in groups}, kinds={g.name: g.kind for g in groups},
                   min_keep={g.name: min_keep(g.kind, int(g.size), cfg, rt) for g in groups},
                   epr=accounting.EprBasis(accounting.count_params(model), accounting.prunable_params(model, groups),
                                           cfg.epr_basis),
                   classes={g.name: uniform_class(g) for g in groups} if uniform else {}, round_to=rt)


def floor_width(group: UnitGroup, keep: int) -> int:
    """The narrowest width the rounds can reach: min-keep, but a group is only scored while it has >= 3 units
    (signal statistics need 3), so one round from 3 leaves 2; GQA query heads keep one per KV group."""
    if group.kind == "head" and group.unit == "query":
        kv = int(group.kv_heads)  # type: ignore[arg-type]
        return max(kv, keep) if kv >= 2 else max(2, keep)
    return min(group.size, max(keep, 2))


def params_at_floor(model: nn.Module, groups: Sequence[UnitGroup], keep: Mapping[str, int]) -> int:
    """Parameters left when every group is cut as far as the rounds can take it (counted, not sliced)."""
    removed: dict[str, int] = {}
    for g in groups:
        floor = floor_width(g, keep[g.name])
        if floor >= g.size:
            continue
        if g.kind == "head" and g.unit == "query":  # the same number of heads from every KV group
            r, per = int(g.n_rep), floor // int(g.kv_heads)  # type: ignore[arg-type]
            removed[g.name] = sum(1 for u in range(g.size) if u % r >= per)
        else:
            removed[g.name] = g.size - floor
    return accounting.params_after_removal(model, groups, removed)


# ---- step 1: capture and score ---------------------------------------------------------------------------
def stats_mode(scorer: str, neighbors: bool) -> str:
    """Statistics the scorer needs: per-unit moments only for built-in magnitude baselines without kNN lists
    (no N x N Gram per group), else exact."""
    return "moments" if scorer in BUILTIN_BASELINES and not neighbors else "exact"


def scorer_options(cfg: PruneConfig, kind: str, width: int | None = None) -> dict[str, Any]:
    """The options a scorer gets for a group of ``width`` units (None: not capped): spectral and hybrid_rank all
    of them (heads: k <= min(HEAD_K, width - 1); an int num_eigs at most width - 1, as groups narrow over the
    rounds; ``check_scorer_options`` refuses values the unpruned groups cannot take); built-in
    baselines only the kNN request of one-per-neighbourhood (their formulas take none); registered scorers
    all, plus that request."""
    opts = dict(cfg.scorer_options)
    k = int(opts.get("k", HEAD_K if kind == "head" else 10))
    if cfg.scorer in SPECTRAL_SCORERS:
        if kind == "head":
            opts["k"] = min(k, HEAD_K) if width is None else min(k, HEAD_K, width - 1)
        if width is not None and isinstance(opts.get("num_eigs"), int):
            opts["num_eigs"] = min(opts["num_eigs"], width - 1)
        return opts
    if cfg.scorer in BUILTIN_BASELINES:
        opts = {}
    if cfg.one_per_neighbourhood:
        opts.update(neighbors=True, k=k)
    return opts


def check_scorer_options(cfg: PruneConfig, groups: Sequence[UnitGroup]) -> None:
    """Refuse, before any work, a spectral ``k`` / int ``num_eigs`` of ``cfg.scorer_options`` that is not
    below the width of the narrowest neuron / channel / FFN group scored (head groups, a few units each, use
    ``scorer_options``' caps)."""
    if cfg.scorer not in SPECTRAL_SCORERS:
        return
    scored = [g for g in groups if g.kind != "head" and int(g.size) >= 3]
    if not scored:
        return
    narrow = min(scored, key=lambda g: int(g.size))
    n = int(narrow.size)
    for key, what in (("k", "neighbours"), ("num_eigs", "eigenpairs")):
        v = cfg.scorer_options.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v >= n:
            raise ValueError(f"{key}: expected fewer {what} than the narrowest group's units ({key} < {n}, the "
                             f"units of {narrow.name!r}), got {key}={v}")


def round_seed(cfg: PruneConfig, round_index: int, group_index: int) -> int:
    """The scorer seed of one group in one round (0-based indices)."""
    return (cfg.seed * 1_000_003 + round_index * 10_007 + group_index) % (2**31 - 1)


@dataclass
class GroupScores:
    """The output of :func:`capture_and_score`: {group name: ScoreOutput} in group order, and timings."""

    outputs: dict[str, ScoreOutput]
    seconds_capture: float
    seconds_scorer: float
    seconds_per_group: dict[str, float]


@dataclass
class Signals:
    """What the scorers read from the calibration data: {group: SignalStats}, and {group: Taylor terms} when
    the scorer needs gradients (else empty)."""

    stats: dict[str, SignalStats]
    taylor: dict[str, torch.Tensor]


def capture_signals(model: nn.Module, groups: Sequence[UnitGroup], calib: Sequence[Any], cfg: PruneConfig, *,
                    forward: ForwardFn | None = None, loss_fn: LossFn | None = None) -> Signals:
    """The statistics ``cfg.scorer`` needs for ``groups`` (``stats_mode``), captured on ``calib`` with the
    model in eval mode (left so), plus the Taylor terms when the scorer needs them (then ``loss_fn`` is
    required)."""
    if cfg.scorer in NEEDS_TAYLOR and loss_fn is None:
        raise ValueError(f"scorer {cfg.scorer!r} needs gradients: pass loss_fn(model, batch) -> loss")
    groups = list(groups)
    model.eval()
    if not groups:
        return Signals({}, {})
    mode = stats_mode(cfg.scorer, cfg.one_per_neighbourhood)
    stats = dict(capture(model, groups, calib, forward=forward, mode=mode, progress=_progress_on()))
    taylor = (dict(capture_taylor(model, groups, calib, loss_fn, progress=_progress_on()))  # type: ignore[arg-type]
              if cfg.scorer in NEEDS_TAYLOR else {})
    return Signals(stats, taylor)


def score_groups(groups: Sequence[UnitGroup], signals: Signals, cfg: PruneConfig, *, round_index: int = 0,
                 group_offset: int = 0, desc: str | None = None) -> tuple[dict[str, ScoreOutput], dict[str, float]]:
    """({group: ScoreOutput}, {group: seconds}) of ``cfg.scorer`` on each group's signals at its current
    weights. Group i of the list is the (group_offset + i)-th group of round ``round_index`` and is seeded
    with ``round_seed(cfg, round_index, group_offset + i)`` (a caller scoring a model block by block passes
    the offset of the block's first group, so the seeds equal those of the whole-model round)."""
    outs: dict[str, ScoreOutput] = {}
    per: dict[str, float] = {}
    for gi, g in enumerate(progress(list(groups), desc=desc or f"round {round_index + 1}: scoring")):
        t = time.perf_counter()
        ctx = ScoreContext(signals.stats[g.name], g.in_weight().detach(), g.out_weight().detach(),
                           signals.taylor.get(g.name), round_seed(cfg, round_index, group_offset + gi),
                           scorer_options(cfg, g.kind, int(g.size)))
        outs[g.name] = run_scorer(cfg.scorer, ctx)
        per[g.name] = time.perf_counter() - t
        faults.point("score")
    return outs, per


def capture_and_score(model: nn.Module, groups: Sequence[UnitGroup], calib: Sequence[Any], cfg: PruneConfig, *,
                      round_index: int = 0, forward: ForwardFn | None = None, loss_fn: LossFn | None = None,
                      desc: str | None = None) -> GroupScores:
    """:func:`capture_signals` then :func:`score_groups` for all ``groups`` of one round: the first step of
    every round, and all of ``score_model``."""
    t = time.perf_counter()
    signals = capture_signals(model, groups, calib, cfg, forward=forward, loss_fn=loss_fn)
    t_cap = time.perf_counter() - t
    faults.point("capture")
    t = time.perf_counter()
    outs, per = score_groups(groups, signals, cfg, round_index=round_index, desc=desc)
    return GroupScores(outs, t_cap, time.perf_counter() - t, per)


# (model, groups, calib, cfg, *, round_index, forward, loss_fn) -> GroupScores: what capture_and_score does
CaptureStep = Callable[..., GroupScores]


# ---- step 2: select --------------------------------------------------------------------------------------
def head_counts(widths: dict[str, int], original: dict[str, int], kv: dict[str, int], fraction: float,
                rnd: int) -> dict[str, int]:
    """Heads to remove in round ``rnd`` (0-based): round(width - N0 (1-r)^(rnd+1)) units in whole blocks of
    ``kv`` (1 for MHA), i.e. heads follow the uniform schedule of their original width N0 rather than
    ceil(r N) of their current width, which would take a large share of a dozen heads every round (and, for
    GQA, one head from every KV group at once)."""
    out = {}
    for g, w in widths.items():
        want = w - original[g] * (1.0 - fraction) ** (rnd + 1)
        out[g] = max(0, int(math.floor(want / kv[g] + 0.5))) * kv[g]
    return out


def _blocks(group: UnitGroup, out: ScoreOutput, q: int, cfg: PruneConfig, keep: int) -> list[list[int]]:
    """One group's removals, lowest score first, as blocks removed together: single units, or for
    grouped-query attention one query head from every KV group (HF attention needs equal groups), the j-th
    block holding each KV group's j-th lowest head (q is rounded up to whole blocks)."""
    s = out.scores
    if group.kind == "head" and group.unit == "query":
        kv, r = int(group.kv_heads), int(group.n_rep)  # type: ignore[arg-type]
        per = min(math.ceil(q / kv), r - 1, (group.size - keep) // kv)
        if per <= 0:
            return []
        cols = [(torch.argsort(s[j * r:(j + 1) * r], stable=True)[:per] + j * r).tolist() for j in range(kv)]
        return [[cols[j][i] for j in range(kv)] for i in range(per)]
    dup = out.extra.get("diagnostics", {}).get("duplicates", ())
    idx = select_units(s, q, neighbors=out.neighbors, one_per_neighbourhood=cfg.one_per_neighbourhood,
                       min_keep=keep, duplicates=dup)
    order = torch.sort(s[idx], stable=True).indices
    return [[int(u)] for u in idx[order]]


def _interleave(chosen: dict[str, list[list[int]]]) -> list[Removal]:
    """One sequence of the round's removals: group g's j-th lowest block at position (j + 1) / q_g, so every
    prefix keeps the groups' shares of the round (uniform allocation stays uniform when trimmed)."""
    keyed = [((j + 1) / len(bs), gi, j, g, b) for gi, (g, bs) in enumerate(chosen.items()) for j, b in enumerate(bs)]
    keyed.sort(key=lambda t: t[:3])
    return [(g, b) for *_, g, b in keyed]


Step = list[Removal]  # removals applied together: any prefix of a round's steps is a valid partial round


def _round_down(width: int, keep: int, round_to: int) -> int:
    """The largest multiple of ``round_to`` <= ``width``, but not below ``keep`` (which is such a multiple
    or the original width)."""
    return max(min(keep, width), (width // round_to) * round_to)


def _equal_counts(groups: Sequence[UnitGroup], counts: dict[str, int], baseline: Baseline,
                  widths: Mapping[str, int] | None = None) -> dict[str, int]:
    """Uniform widths: per uniform class the smallest count of its groups (their widths are equal, so
    normally all counts are), then, for neurons / channels / FFN neurons, raised so the width left is a
    multiple of ``baseline.round_to`` (never below min-keep). ``widths``: the groups' widths (default: now)."""
    out = dict(counts)
    by_class: dict[str, list[UnitGroup]] = {}
    for g in groups:
        by_class.setdefault(baseline.classes[g.name], []).append(g)
    for members in by_class.values():
        q = min(counts[g.name] for g in members)
        g0 = members[0]
        if g0.kind != "head" and q > 0:
            w = int(widths[g0.name]) if widths is not None else int(g0.size)
            q = w - _round_down(w - q, baseline.min_keep[g0.name], baseline.round_to)
        out.update(dict.fromkeys((g.name for g in members), q))
    return out


def _uniform_steps(groups: Sequence[UnitGroup], chosen: dict[str, list[list[int]]],
                   baseline: Baseline) -> list[Step]:
    """Uniform widths: each class's blocks cut to the count every member reached (and to a width that is a
    multiple of ``round_to``), then grouped into steps that take the same blocks-worth from every member of
    one class (neurons: down to the next multiple of ``round_to``; heads: one block), interleaved across
    classes by position (j + 1) / steps_c, so every prefix of steps leaves each class uniform."""
    by_class: dict[str, list[UnitGroup]] = {}
    for g in groups:
        by_class.setdefault(baseline.classes[g.name], []).append(g)
    keyed = []
    for ci, members in enumerate(by_class.values()):
        n = min(len(chosen.get(g.name, [])) for g in members)
        w = int(members[0].size)
        rt = baseline.round_to if members[0].kind != "head" else 1
        if rt > 1 and n > 0:
            n = w - _round_down(w - n, baseline.min_keep[members[0].name], rt)
        sizes: list[int] = []
        cur, end = w, w - n
        while cur > end:
            nxt = max(end, ((cur - 1) // rt) * rt)
            sizes.append(cur - nxt)
            cur = nxt
        start = 0
        for j, size in enumerate(sizes):
            step = [(g.name, b) for g in members for b in chosen[g.name][start:start + size]]
            keyed.append(((j + 1) / len(sizes), ci, j, step))
            start += size
    keyed.sort(key=lambda t: t[:3])
    return [step for *_, step in keyed]


def select_steps(groups: Sequence[UnitGroup], outputs: Mapping[str, ScoreOutput], cfg: PruneConfig,
                 baseline: Baseline, round_index: int) -> list[Step]:
    """This round's removals of the scored ``groups`` (their ``outputs``) as steps, in the order a trimmed
    round applies them; empty when no group can lose another unit (min-keep). Free widths: one removal per
    step, interleaved across groups in score order. Uniform widths (``baseline.uniform``): every group of a
    uniform class loses the same number of units per round (and per step), its lowest-scoring ones, and
    neuron / channel / FFN widths stay multiples of ``baseline.round_to``."""
    counts = round_counts({g: o.scores for g, o in outputs.items()}, cfg.round_fraction, allocation=cfg.allocation,
                          min_keep={g: baseline.min_keep[g] for g in outputs})
    heads = [g for g in groups if g.kind == "head"]
    hc = head_counts({g.name: int(g.size) for g in heads}, baseline.widths,
                     {g.name: int(g.kv_heads) if g.unit == "query" else 1 for g in heads},  # type: ignore[arg-type]
                     cfg.round_fraction, round_index)
    if any(counts[g] for g in counts if g not in hc) or any(hc.values()):
        counts.update(hc)  # else only heads are left and the schedule says wait: fall back to ceil(r N)
    if baseline.uniform:
        counts = _equal_counts(groups, counts, baseline)
    chosen = {g.name: _blocks(g, outputs[g.name], counts[g.name], cfg, baseline.min_keep[g.name]) for g in groups}
    if baseline.uniform:
        return [s for s in _uniform_steps(groups, chosen, baseline) if s]
    return [[r] for r in _interleave({g: bs for g, bs in chosen.items() if bs})]


def select_removals(groups: Sequence[UnitGroup], outputs: Mapping[str, ScoreOutput], cfg: PruneConfig,
                    baseline: Baseline, round_index: int) -> list[Removal]:
    """The removals of :func:`select_steps`, flattened in step order."""
    return [r for step in select_steps(groups, outputs, cfg, baseline, round_index) for r in step]


def planned_rounds(model: nn.Module, groups: Sequence[UnitGroup], cfg: PruneConfig, baseline: Baseline,
                   round_index: int) -> int:
    """How many rounds, from round ``round_index`` (0-based) on, the run still needs: the rounds simulated on
    widths alone (each round's counts as :func:`select_steps` plans them, parameters counted exactly on
    module shapes), for progress totals. Exact unless the duplicate-pair rule or a 'global' allocation (whose
    counts depend on the scores) changes a round's counts; at least 1 while the target is not reached."""
    budget = baseline.epr.budget(cfg.target)
    removed = dict.fromkeys((g.name for g in groups), 0)
    p = accounting.count_params(model)
    n = 0
    while p > budget and round_index + n < cfg.max_rounds:
        widths = {g.name: int(g.size) - removed[g.name] for g in groups}
        live = [g for g in groups if widths[g.name] > baseline.min_keep[g.name] and widths[g.name] >= 3]
        if not live:
            break
        counts = round_counts({g.name: torch.zeros(widths[g.name]) for g in live}, cfg.round_fraction,
                              allocation=cfg.allocation, min_keep={g.name: baseline.min_keep[g.name] for g in live})
        heads = [g for g in live if g.kind == "head"]
        kv = {g.name: int(g.kv_heads) if g.unit == "query" else 1 for g in heads}  # type: ignore[arg-type]
        hc = head_counts({g.name: widths[g.name] for g in heads}, baseline.widths, kv, cfg.round_fraction,
                         round_index + n)
        if any(counts[g] for g in counts if g not in hc) or any(hc.values()):
            counts.update(hc)
        for g in heads:  # whole blocks, never below min-keep
            room = (widths[g.name] - baseline.min_keep[g.name]) // kv[g.name] * kv[g.name]
            counts[g.name] = min(math.ceil(counts[g.name] / kv[g.name]) * kv[g.name], max(room, 0))
        if baseline.uniform:
            counts = _equal_counts(live, counts, baseline, widths)
        if not any(counts.values()):
            break
        for name, q in counts.items():
            removed[name] += q
        p = accounting.params_after_removal(model, groups, removed)
        n += 1
    return max(n, 1) if p > budget else n


# ---- step 3: trim ----------------------------------------------------------------------------------------
def _counts(removals: Sequence[Removal]) -> dict[str, int]:
    out: dict[str, int] = {}
    for g, b in removals:
        out[g] = out.get(g, 0) + len(b)
    return out


def trim_steps(model: nn.Module, groups: Sequence[UnitGroup], steps: list[Step], budget: int, *,
               nearest_to: float | None = None, min_steps: int = 0) -> list[Step]:
    """``steps`` if applying them all leaves more than ``budget`` parameters, else their shortest prefix that
    leaves at most ``budget``; with ``nearest_to`` (the real-valued parameter count of the target), the
    prefix one step shorter instead when it lands nearer to it and keeps at least ``min_steps`` steps
    (uniform widths: a step removes units from every layer, so the count nearest the target may sit above the
    budget). The summed per-unit costs at
    current widths over-count (a weight between two layers shrinking in the same round is counted twice), so
    the prefix they call enough is only a lower bound for the exact count that decides."""
    p_now = accounting.count_params(model)
    cost = {g.name: int(g.unit_params()) for g in groups}
    est = torch.tensor([float(sum(cost[g] * len(b) for g, b in step)) for step in steps], dtype=torch.float64)
    if p_now - float(est.sum()) > budget:
        return steps
    need = p_now - budget
    est = est.cumsum(0)
    lo = int(torch.searchsorted(est, torch.tensor([float(need)], dtype=torch.float64))[0]) + 1
    lo = min(max(lo, 1), len(steps))

    def after(n: int) -> int:
        return accounting.params_after_removal(model, groups, _counts([r for step in steps[:n] for r in step]))

    if after(lo) <= budget:
        hi = lo
    else:
        hi = len(steps)  # the full round reaches the budget (checked above)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if after(mid) <= budget:
                hi = mid
            else:
                lo = mid
    if nearest_to is not None and hi - 1 >= min_steps and abs(after(hi - 1) - nearest_to) < abs(after(hi) - nearest_to):
        hi -= 1
    return steps[:hi]


def trim_to_budget(model: nn.Module, groups: Sequence[UnitGroup], removals: list[Removal],
                   budget: int) -> list[Removal]:
    """``removals`` if applying them all leaves more than ``budget`` parameters, else their shortest prefix
    that leaves at most ``budget`` (:func:`trim_steps` with one removal per step)."""
    return [r for step in trim_steps(model, groups, [[r] for r in removals], budget) for r in step]


# ---- step 4: remove --------------------------------------------------------------------------------------
def apply_removals(model: nn.Module, groups: Sequence[UnitGroup], removals: Mapping[str, Sequence[int]]
                   | Sequence[Removal]) -> dict[str, list[int]]:
    """Physically remove the units (indices into each group's current width) from ``model``, group by group
    in ``groups`` order; returns {group: sorted indices removed}. Accepts removals as a sequence of
    (group, block) or as {group: indices}."""
    by_group: dict[str, list[int]] = {}
    items = removals.items() if isinstance(removals, Mapping) else removals
    for name, block in items:
        by_group.setdefault(name, []).extend(int(u) for u in block)
    names = {g.name for g in groups}
    unknown = sorted(set(by_group) - names)
    if unknown:
        raise ValueError(f"removals: expected groups among {sorted(names)}, got unknown {unknown}")
    for g in groups:
        if by_group.get(g.name):
            surgery.remove_units(model, g, torch.tensor(sorted(by_group[g.name]), dtype=torch.int64))
    return {name: sorted(us) for name, us in by_group.items()}


def recalibrate_bn(model: nn.Module, batches: Sequence[Any], forward: ForwardFn | None = None) -> int:
    """Reset and re-estimate the running mean/var of every BatchNorm from ``batches`` (cumulative average,
    other modules in eval mode, no gradients); returns how many BatchNorms were recalibrated."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    fwd = forward or default_forward
    was_training = model.training
    momenta = [m.momentum for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        with torch.no_grad():
            for b in batches:
                fwd(model, b)
    finally:
        for m, mom in zip(bns, momenta, strict=True):
            m.momentum = mom
        model.train(was_training)
    return len(bns)


# ---- the round -------------------------------------------------------------------------------------------
_RECORD_FIELDS = ("round", "params", "epr", "removed", "removed_units", "widths", "seconds_capture",
                  "seconds_scoring", "lambda_1", "dead_units")


@dataclass
class RoundRecord:
    """What one round did. round: 1-based. params / epr: after the round. removed: {group: units removed};
    removed_units: {group: sorted indices into the group's width at the start of the round} (replaying them
    on the unpruned model rebuilds its structure); widths: every group's width after the round;
    seconds_capture, seconds_scoring (capture + scorer); lambda_1: the dominant eigenvalue per group
    (spectral scorers); dead_units: -inf scores per group; metric: set by the caller when it tracks one;
    trimmed: the round applied only a prefix of its removals because the rest would pass the target (the last
    round of a run). ``outputs`` (the scores) and ``seconds_scorer`` are not part of the serialised record."""

    round: int
    params: int
    epr: float
    removed: dict[str, int]
    removed_units: dict[str, list[int]]
    widths: dict[str, int]
    seconds_capture: float
    seconds_scoring: float
    lambda_1: dict[str, float]
    dead_units: dict[str, int]
    metric: float | None = None
    has_metric: bool = False
    trimmed: bool = False
    seconds_scorer: float = field(default=0.0, compare=False)
    outputs: dict[str, ScoreOutput] = field(default_factory=dict, repr=False, compare=False)

    def set_metric(self, value: float | None) -> None:
        self.metric, self.has_metric = value, True

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in _RECORD_FIELDS}
        d["trimmed"] = self.trimmed
        if self.has_metric:
            d["metric"] = self.metric
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RoundRecord:
        missing = [k for k in _RECORD_FIELDS if k not in d]
        if missing:
            raise ValueError(f"round record: missing fields {missing}")
        return cls(**{k: d[k] for k in _RECORD_FIELDS}, metric=d.get("metric"), has_metric="metric" in d,
                   trimmed=bool(d.get("trimmed", False)))


def scorable(groups: Sequence[UnitGroup], baseline: Baseline) -> list[UnitGroup]:
    """The groups a round scores: wider than their min-keep and with >= 3 units."""
    return [g for g in groups if g.size > baseline.min_keep[g.name] and g.size >= 3]


def prune_round(model: nn.Module, groups: Sequence[UnitGroup], cfg: PruneConfig, *, calib: Sequence[Any],
                baseline: Baseline, round_index: int, forward: ForwardFn | None = None,
                loss_fn: LossFn | None = None, capture_step: CaptureStep = capture_and_score) -> RoundRecord:
    """Round ``round_index`` (0-based) on ``model``, whose prunable groups are ``groups``: capture and score
    the scorable groups (``capture_step``, with the signature and result of :func:`capture_and_score`, which
    is the default; the driver passes the layer-sequential or the distributed step), select, trim to the
    target's budget (uniform widths: to the achievable count nearest the target, which may remove nothing,
    except in round 0: a run removes something), remove (in place), recalibrate BatchNorm if
    ``cfg.recalibrate_bn``. Raises TargetUnreachableError when no group can lose
    another unit."""
    epr = baseline.epr
    p_now = accounting.count_params(model)
    budget = epr.budget(cfg.target)
    live = scorable(groups, baseline)
    sc = capture_step(model, live, calib, cfg, round_index=round_index, forward=forward, loss_fn=loss_fn)
    steps = select_steps(live, sc.outputs, cfg, baseline, round_index)
    if not steps:
        raise TargetUnreachableError(f"round {round_index + 1}: no group can lose another unit (min-keep) at EPR "
                                     f"{epr(p_now):.4f} < target {cfg.target}")
    kept = trim_steps(model, live, steps, budget, nearest_to=epr.params_at(cfg.target) if baseline.uniform else None,
                      min_steps=1 if round_index == 0 else 0)
    removed_units = apply_removals(model, live, [r for step in kept for r in step])
    if cfg.recalibrate_bn and removed_units:
        recalibrate_bn(model, calib, forward)
    p = accounting.count_params(model)
    outs = sc.outputs
    return RoundRecord(
        round=round_index + 1, params=p, epr=epr(p), removed={g: len(us) for g, us in removed_units.items()},
        removed_units=removed_units, widths={g.name: int(g.size) for g in groups},
        seconds_capture=sc.seconds_capture, seconds_scoring=sc.seconds_capture + sc.seconds_scorer,
        lambda_1={g: float(o.extra["eigenvalues"][0]) for g, o in outs.items()
                  if o.extra.get("eigenvalues") is not None and len(o.extra["eigenvalues"])},
        dead_units={g: int((o.scores == -math.inf).sum()) for g, o in outs.items()},
        trimmed=len(kept) < len(steps), seconds_scorer=sc.seconds_scorer, outputs=outs)


__all__ = ["Baseline", "CaptureStep", "GroupScores", "Removal", "RoundRecord", "Signals", "Step", "apply_removals",
           "capture_and_score", "capture_signals", "floor_width", "head_counts", "min_keep", "params_at_floor",
           "planned_rounds", "prune_round", "recalibrate_bn", "round_seed", "scorable", "score_groups",
           "scorer_options", "select_removals", "select_steps", "stats_mode", "trim_steps", "trim_to_budget",
           "uniform_class"]
