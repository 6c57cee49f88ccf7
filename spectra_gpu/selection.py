"""Which units to remove in one round, given their scores (higher = keep).

``select_units`` picks the q lowest-scoring units of one group, with ties to the lower index, under three
constraints: at least ``min_keep`` units stay; never both ends of a near-duplicate pair in one round (their
shared edge scores ~0, so both look redundant and removing both loses the function: docs/algorithm.md
section 5); optionally at most one unit per input-graph kNN neighbourhood per round (bottom-first removal
otherwise deletes whole clusters of interchangeable units at once).

``round_counts`` turns a per-round fraction into per-group counts: uniform (q = ceil(r N) per group, the spec's
default, since max-normalised scores are not comparable across layers) or global (pool every unit, rank by
within-layer percentile, dead units first, and take the same total).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

ALLOCATIONS = ("uniform", "global")


def _check_scores(scores: torch.Tensor, name: str = "scores") -> torch.Tensor:
    if not isinstance(scores, torch.Tensor) or scores.dim() != 1:
        got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"{name}: expected a 1-D tensor [N], got {got}")
    if not scores.is_floating_point():
        raise TypeError(f"{name}: expected a float tensor, got {scores.dtype}")
    if bool(torch.isnan(scores).any()):
        raise ValueError(f"{name}: expected no NaN, got {int(torch.isnan(scores).sum())}")
    return scores.detach().cpu().double()


def _check_int(v: object, name: str, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")
    return v


def ascending(scores: torch.Tensor) -> torch.Tensor:
    """Unit indices from lowest to highest score; equal scores in index order (deterministic)."""
    return torch.sort(_check_scores(scores), stable=True).indices


def select_units(scores: torch.Tensor, q: int, *, neighbors: torch.Tensor | None = None,
                 one_per_neighbourhood: bool = False, min_keep: int = 1,
                 duplicates: Iterable[tuple[int, int]] = ()) -> torch.Tensor:
    """Indices (sorted, int64) of up to q units to remove this round, lowest score first.

    neighbors: [N, k] input-graph kNN lists (-1 = none), needed when ``one_per_neighbourhood``: a unit listed
    as a neighbour of a unit already chosen this round is skipped; if that leaves fewer than q candidates the
    skipped ones fill up in score order, so the count is met. duplicates: (i, j) pairs of which at most one
    goes per round (a hard rule: it may return fewer than q). At most N - min_keep units are chosen.
    """
    s = _check_scores(scores)
    n = int(s.numel())
    q = _check_int(q, "q", 0)
    min_keep = _check_int(min_keep, "min_keep", 0)
    q = min(q, max(0, n - min_keep))
    if q == 0:
        return torch.empty(0, dtype=torch.int64)
    partner: dict[int, set[int]] = {}
    for pair in duplicates:
        i, j = (int(v) for v in pair)
        if not (0 <= i < n and 0 <= j < n) or i == j:
            raise ValueError(f"duplicates: expected pairs of distinct unit indices in [0, {n}), got {pair!r}")
        partner.setdefault(i, set()).add(j)
        partner.setdefault(j, set()).add(i)
    nb: list[list[int]] | None = None
    if one_per_neighbourhood:
        if not isinstance(neighbors, torch.Tensor) or neighbors.dim() != 2 or neighbors.shape[0] != n:
            got = tuple(neighbors.shape) if isinstance(neighbors, torch.Tensor) else type(neighbors).__name__
            raise ValueError(f"neighbors: expected a [N={n}, k] index tensor with one_per_neighbourhood=True, "
                             f"got {got}")
        nb = neighbors.detach().cpu().tolist()

    chosen: list[int] = []
    taken: set[int] = set()
    blocked: set[int] = set()
    deferred: list[int] = []

    def can_take(u: int) -> bool:
        return not (partner.get(u, set()) & taken)

    for u in ascending(s).tolist():
        if len(chosen) == q:
            break
        if not can_take(u):
            continue
        if nb is not None and u in blocked:
            deferred.append(u)
            continue
        chosen.append(u)
        taken.add(u)
        if nb is not None:
            blocked.update(v for v in nb[u] if v >= 0)
    for u in deferred:
        if len(chosen) == q:
            break
        if can_take(u):
            chosen.append(u)
            taken.add(u)
    return torch.tensor(sorted(chosen), dtype=torch.int64)


def percentile_ranks(scores: torch.Tensor) -> torch.Tensor:
    """Within-group rank of each unit in [0, 1) (lowest score 0, ties by index); -inf (dead) units get -1 so
    a global ranking removes every dead unit first."""
    s = _check_scores(scores)
    n = int(s.numel())
    r = torch.empty(n, dtype=torch.float64)
    r[ascending(s)] = torch.arange(n, dtype=torch.float64) / max(n, 1)
    r[s == -math.inf] = -1.0
    return r


def round_counts(scores: Mapping[str, torch.Tensor], fraction: float, *, allocation: str = "uniform",
                 min_keep: Mapping[str, int] | None = None) -> dict[str, int]:
    """Per-group removal counts for one round.

    uniform: q_g = ceil(fraction * N_g). global: the same total sum_g ceil(fraction * N_g), taken from all
    groups pooled and ordered by within-layer percentile (ties by group order, then rank). Both respect
    min_keep[g] (default 1): q_g <= N_g - min_keep[g].
    """
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation: expected one of {', '.join(map(repr, ALLOCATIONS))}, got {allocation!r}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"fraction: expected a number in (0, 1], got {fraction!r}")
    mk = dict(min_keep or {})
    room = {g: max(0, int(s.numel()) - int(mk.get(g, 1))) for g, s in scores.items()}
    want = {g: min(room[g], math.ceil(fraction * int(s.numel()))) for g, s in scores.items()}
    if allocation == "uniform":
        return want
    total = sum(math.ceil(fraction * int(s.numel())) for s in scores.values())
    pooled: list[tuple[float, int, int, str]] = []
    for gi, (g, s) in enumerate(scores.items()):
        r = percentile_ranks(s)
        order = torch.sort(r, stable=True).indices.tolist()
        pooled.extend((float(r[u]), gi, pos, g) for pos, u in enumerate(order))
    pooled.sort()
    out = dict.fromkeys(scores, 0)
    for _, _, _, g in pooled:
        if total == 0:
            break
        if out[g] < room[g]:
            out[g] += 1
            total -= 1
    return out


__all__ = ["ALLOCATIONS", "ascending", "percentile_ranks", "round_counts", "select_units"]
