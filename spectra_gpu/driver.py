"""Iterative pruning to an exact effective-parameter-reduction target, one recovery fine-tune, resumable.

Each round (algorithm.md section 7): capture the calibration signals of the *current* (already shrunk) model,
score every group with the chosen scorer (recomputed every round, same calibration data for every scorer),
pick per group the q = ceil(r x width) lowest-scoring units (uniform r, or a global allocation by
within-layer percentile; attention heads follow the uniform schedule of their original width, see
``head_counts``) under min-keep, the duplicate-pair rule and optionally one-per-neighbourhood,
physically remove them, record. No parameter is updated between rounds. The last round is trimmed so the
EPR lands on the target with an overshoot below one unit's parameters: the candidate removals of the round
are interleaved across groups in score order and the shortest prefix that reaches the target is found by
counting the parameters of the sliced model (a copy), never by summing per-unit costs.

Then one recovery fine-tune; the metric is evaluated before pruning, after pruning and after fine-tune.
With ``out_dir`` the run checkpoints after every round and every fine-tune epoch into one file written
atomically (checkpoint.pt), so a run killed at any point resumes from its last completed round or epoch and
ends with the same report (seeded scorers, deterministic data order; only the timings differ). At the end it
writes report.json/report.md/plots (``report.write_report``) and the pruned model (DIR/model via
``io.save_pruned``, plus DIR/model.pt for plain modules).

Per-round records in the report: round, params, epr, removed {group: count}, removed_units {group: indices
into the group's width at the start of that round}, widths after the round, seconds_capture,
seconds_scoring (capture + scorer), lambda_1 per group (spectral), dead_units per group, metric (if tracked).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import accounting, surgery
from . import io as _io
from . import units as _units
from ._progress import enabled as _progress_on
from ._progress import progress
from .capture import capture as _capture_fn
from .capture import capture_taylor as _capture_taylor_fn
from .capture import default_forward as _default_forward
from .finetune import FinetuneConfig, finetune
from .report import score_summary, torch_save, write_json, write_report
from .scorers import (BUILTIN_BASELINES, NEEDS_TAYLOR, SPECTRAL_SCORERS, ScoreContext, ScoreOutput,
                      get_scorer, run_scorer)
from .selection import ALLOCATIONS, round_counts, select_units

CHECKPOINT = "checkpoint.pt"
KINDS = _units.KINDS  # neuron (MLP), channel (conv), ffn (transformer FFN neuron), head
EPR_BASES = ("total", "prunable")
HEAD_K = 3  # per-layer head graphs are tiny (12-32 nodes): k = min(3, H - 1), algorithm.md section 6


@dataclass(frozen=True)
class PruneConfig:
    """What to prune and how. target: effective parameter reduction in (0, 1) on ``epr_basis`` ('total'
    parameters, or only the 'prunable' modules: embeddings, LM head and classifier excluded).
    round_fraction: share of each group's current width removed per round. min_keep_fraction: of the original
    width; neurons/channels/FFN neurons keep max(k + 2, that), heads max(1, that). scorer_options: kwargs of
    the scorer (spectral: those of ``spectra_gpu.score``). recalibrate_bn: after every round re-estimate
    BatchNorm running statistics on the calibration batches (buffers only, no parameter update; "adaptive BN",
    EagleEye 2020): removing upstream channels shifts a BN's inputs, and its stale statistics alone took an
    MNIST CNN from 0.98 to 0.10-0.32 accuracy at 50% EPR for spectral and random alike."""

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
        if isinstance(self.max_rounds, bool) or not isinstance(self.max_rounds, int) or self.max_rounds < 1:
            raise ValueError(f"max_rounds: expected an int >= 1, got {self.max_rounds!r}")
        if not isinstance(self.finetune, FinetuneConfig):
            raise TypeError(f"finetune: expected a FinetuneConfig, got {type(self.finetune).__name__}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kinds"] = list(self.kinds)
        return d

    @property
    def k(self) -> int:
        return int(self.scorer_options.get("k", 10))


@dataclass
class PruneResult:
    """The pruned (and fine-tuned) model and its report (the content of report.json)."""

    model: nn.Module
    report: dict[str, Any]


class TargetUnreachableError(ValueError):
    """The target EPR cannot be reached without going below a group's min-keep."""


# ---- the other engineers' modules, behind a few calls ----------------------------------------------------
GroupsFn = Callable[[nn.Module], Sequence[Any]]


def _discover(model: nn.Module, cfg: PruneConfig, groups_fn: GroupsFn | None) -> list[Any]:
    gs = list(groups_fn(model) if groups_fn is not None else _units.discover_groups(model, cfg.kinds))
    gs = [g for g in gs if g.kind in cfg.kinds]
    names = [g.name for g in gs]
    if len(set(names)) != len(names):
        raise ValueError(f"groups: expected unique group names, got {names}")
    return gs


def _count(model: nn.Module) -> int:
    return int(accounting.count_params(model))


def _prunable_params(model: nn.Module, groups: Sequence[Any]) -> int:
    return int(accounting.prunable_params(model, groups))


ForwardFn = Callable[[nn.Module, Any], Any]


def _stats_mode(scorer: str, neighbors: bool) -> str:
    """Magnitude baselines without kNN lists need only per-unit moments: no N x N Gram per group (capture of
    SmolLM2's 30 FFN layers on its 2048 calibration tokens, one thread: 8.5 s instead of 16 s; the plain
    forward pass alone takes 5 s)."""
    return "moments" if scorer in BUILTIN_BASELINES and not neighbors else "exact"


def _capture_stats(model: nn.Module, groups: Sequence[Any], calib: Sequence[Any],
                   forward: ForwardFn | None, mode: str = "exact") -> dict[str, Any]:
    return dict(_capture_fn(model, list(groups), calib, forward=forward, mode=mode, progress=_progress_on()))


def _capture_taylor(model: nn.Module, groups: Sequence[Any], calib: Sequence[Any],
                    loss_fn: Callable[[nn.Module, Any], torch.Tensor]) -> dict[str, torch.Tensor]:
    return dict(_capture_taylor_fn(model, list(groups), calib, loss_fn, progress=_progress_on()))


def recalibrate_bn(model: nn.Module, batches: Sequence[Any], forward: ForwardFn | None = None) -> int:
    """Reset and re-estimate the running mean/var of every BatchNorm from ``batches`` (cumulative average,
    other modules in eval mode, no gradients); returns how many BatchNorms were recalibrated."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    fwd = forward or _default_forward
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


def _remove(model: nn.Module, group: Any, idx: torch.Tensor) -> None:
    if idx.numel():
        surgery.remove_units(model, group, idx)


# ---- helpers ---------------------------------------------------------------------------------------------
def min_keep(kind: str, original_width: int, cfg: PruneConfig) -> int:
    """max(k + 2, 5% of the original width) for neurons/channels/FFN neurons (the kNN graph needs k + 1
    nodes and a margin), >= 1 head per layer."""
    frac = math.ceil(cfg.min_keep_fraction * original_width)
    if kind == "head":
        return max(1, frac)
    return min(original_width, max(cfg.k + 2, frac))


def _scorer_options(cfg: PruneConfig, kind: str) -> dict[str, Any]:
    """The options a scorer gets: spectral and hybrid_rank all of them (heads: k <= 3); built-in baselines only
    the kNN request of one-per-neighbourhood (their formulas take none); registered scorers all, plus that
    request."""
    opts = dict(cfg.scorer_options)
    k = int(opts.get("k", HEAD_K if kind == "head" else 10))
    if cfg.scorer in SPECTRAL_SCORERS:
        if kind == "head":
            opts["k"] = min(k, HEAD_K)
        return opts
    if cfg.scorer in BUILTIN_BASELINES:
        opts = {}
    if cfg.one_per_neighbourhood:
        opts.update(neighbors=True, k=k)
    return opts


def _seed(cfg: PruneConfig, rnd: int, gi: int) -> int:
    return (cfg.seed * 1_000_003 + rnd * 10_007 + gi) % (2**31 - 1)


def head_counts(widths: dict[str, int], original: dict[str, int], kv: dict[str, int], fraction: float,
                rnd: int) -> dict[str, int]:
    """Heads to remove this round: a group of a dozen heads under q = ceil(r N) would lose 8% (12 heads) or,
    for GQA with 3 KV groups, 33% per round (one head from every KV group) while FFN groups lose r = 5%. So
    heads follow the uniform schedule of their original width instead: remove round(width - N0 (1-r)^(t+1))
    units, in whole blocks of kv (1 for MHA); e.g. 9 GQA heads (3 KV groups) lose 3 heads in round 4
    (9 x 0.95^4 = 7.3 is nearer to 6 than to 9), not in round 1."""
    out = {}
    for g, w in widths.items():
        want = w - original[g] * (1.0 - fraction) ** (rnd + 1)
        out[g] = max(0, int(math.floor(want / kv[g] + 0.5))) * kv[g]
    return out


def _blocks(group: Any, out: ScoreOutput, q: int, cfg: PruneConfig, keep: int) -> list[list[int]]:
    """This round's removals of one group, lowest score first, as blocks removed together: single units, or
    for grouped-query attention one query head from every KV group (HF attention needs equal groups), the
    j-th block holding each KV group's j-th lowest head (q is rounded up to whole blocks)."""
    s = out.scores
    if group.kind == "head" and group.unit == "query":
        kv, r = int(group.kv_heads), int(group.n_rep)
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


class _Epr:
    """EPR on the configured basis: (P0 - P) / P0 with P0 the total, or the prunable-module parameters."""

    def __init__(self, p0_total: int, p0_prunable: int, basis: str):
        self.p0_total, self.basis = p0_total, basis
        self.denom = p0_total if basis == "total" else p0_prunable

    def __call__(self, p: int) -> float:
        return (self.p0_total - p) / self.denom

    def budget(self, target: float) -> int:
        """Largest parameter count whose EPR is >= target."""
        return self.p0_total - math.ceil(target * self.denom - 1e-9)


Item = tuple[str, list[int]]


def _interleave(chosen: dict[str, list[list[int]]]) -> list[Item]:
    """One sequence of this round's removals: group g's j-th lowest block at position (j + 1) / q_g, so every
    prefix keeps the groups' shares of the round (uniform allocation stays uniform when trimmed)."""
    keyed = [((j + 1) / len(bs), gi, j, g, b) for gi, (g, bs) in enumerate(chosen.items()) for j, b in enumerate(bs)]
    keyed.sort(key=lambda t: t[:3])
    return [(g, b) for *_, g, b in keyed]


def _apply_prefix(model: nn.Module, cfg: PruneConfig, groups_fn: GroupsFn | None, seq: Sequence[Item]) -> None:
    byg: dict[str, list[int]] = {}
    for g, b in seq:
        byg.setdefault(g, []).extend(b)
    for g in _discover(model, cfg, groups_fn):
        if g.name in byg:
            _remove(model, g, torch.tensor(sorted(byg[g.name]), dtype=torch.int64))


def _trim(model: nn.Module, cfg: PruneConfig, groups_fn: GroupsFn | None, seq: list[Item],
          cost: dict[str, int], p_now: int, budget: int) -> int:
    """Shortest prefix of ``seq`` whose removal brings the sliced model to <= budget parameters. The summed
    per-unit costs at current widths over-count (a weight between two layers shrinking in the same round is
    counted twice), so the prefix they call enough is a lower bound; the sliced copies decide."""
    need = p_now - budget
    est = torch.tensor([float(cost[g] * len(b)) for g, b in seq], dtype=torch.float64).cumsum(0)
    lo = int(torch.searchsorted(est, torch.tensor([float(need)], dtype=torch.float64))[0]) + 1
    lo = min(max(lo, 1), len(seq))

    def ok(n: int) -> bool:
        m = copy.deepcopy(model)
        _apply_prefix(m, cfg, groups_fn, seq[:n])
        return _count(m) <= budget

    if ok(lo):
        return lo
    hi = len(seq)  # the caller checked that the full round reaches the budget
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi


def _floor_width(group: Any, keep: int) -> int:
    """The narrowest width the rounds can reach: min-keep, but a group is only scored while it has >= 3 units
    (signal statistics need 3), so one round from 3 leaves 2; GQA query heads keep one per KV group."""
    if group.kind == "head" and group.unit == "query":
        kv = int(group.kv_heads)
        return max(kv, keep) if kv >= 2 else max(2, keep)
    return min(group.size, max(keep, 2))


def _max_reduction(model: nn.Module, cfg: PruneConfig, groups_fn: GroupsFn | None, keep: dict[str, int]) -> int:
    """Parameters left when every group is cut as far as the rounds can take it (sliced copy)."""
    m = copy.deepcopy(model)
    for g in _discover(m, cfg, groups_fn):
        floor = _floor_width(g, keep[g.name])
        if floor >= g.size:
            continue
        if g.kind == "head" and g.unit == "query":
            r, per = int(g.n_rep), floor // int(g.kv_heads)
            idx = torch.tensor([u for u in range(g.size) if u % r >= per], dtype=torch.int64)
        else:
            idx = torch.arange(floor, g.size)
        _remove(m, g, idx)
    return _count(m)


# ---- the run ---------------------------------------------------------------------------------------------
class Pruner:
    """One pruning run; see :func:`prune`."""

    def __init__(self, model: nn.Module, calib: Sequence[Any], cfg: PruneConfig, *,
                 out_dir: str | Path | None = None, resume: bool = False,
                 loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
                 evaluate: Callable[[nn.Module], float] | None = None, metric_name: str = "metric",
                 train_batches: Callable[[int], Iterable[Any]] | None = None, groups: GroupsFn | None = None,
                 forward: ForwardFn | None = None,
                 callback: Callable[[str, dict[str, Any]], None] | None = None,
                 meta: dict[str, Any] | None = None, plots: bool = True, save_model: bool = True,
                 tokenizer: Any = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(cfg, PruneConfig):
            raise TypeError(f"config: expected a PruneConfig, got {type(cfg).__name__}")
        calib = list(calib)
        if not calib:
            raise ValueError("calib: expected at least one calibration batch, got none")
        if cfg.scorer in NEEDS_TAYLOR and loss_fn is None:
            raise ValueError(f"scorer {cfg.scorer!r} needs gradients: pass loss_fn(model, batch) -> loss")
        if cfg.finetune.epochs > 0 and train_batches is not None and loss_fn is None:
            raise ValueError("fine-tune needs loss_fn(model, batch) -> loss next to train_batches")
        self.model, self.calib, self.cfg = model, calib, cfg
        self.loss_fn, self.evaluate, self.metric_name = loss_fn, evaluate, metric_name
        self.train_batches, self.groups_fn, self.callback = train_batches, groups, callback
        self.forward = forward
        self.meta = dict(meta or {})
        self.plots, self.save_model, self.tokenizer = plots, save_model, tokenizer
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.state: dict[str, Any] = {}
        if self.out_dir is not None:
            _prepare_dir(self.out_dir, resume)
            ck = self.out_dir / CHECKPOINT
            if resume and ck.exists():
                self._load(ck)

    # -- checkpointing --
    def _load(self, path: Path) -> None:
        ck = torch.load(path, map_location="cpu", weights_only=False)
        if ck.get("config") != self.cfg.to_dict():
            raise ValueError(f"resume: the run in {self.out_dir} used a different configuration "
                             f"({ck.get('config')}); start a new run directory or pass the same options")
        self.model = ck.pop("model")
        self.state = ck

    def _save(self) -> None:
        if self.out_dir is not None:
            torch_save(self.out_dir / CHECKPOINT, {**self.state, "model": self.model})

    def _write_model(self) -> None:
        """DIR/model: ``io.save_pruned`` (safetensors + widths; HF models reload with ``load_pruned``); plain
        modules also as DIR/model.pt (whole-module torch.save) so ``--model DIR/model.pt`` reloads them."""
        assert self.out_dir is not None
        _io.save_pruned(self.model, self.out_dir / "model", tokenizer=self.tokenizer)
        if not _io._is_hf(self.model):
            torch_save(self.out_dir / "model.pt", self.model)

    def _event(self, name: str, **info: Any) -> None:
        if self.callback is not None:
            self.callback(name, info)

    def _flops(self) -> float | None:
        """Forward FLOPs per sample (image or token) of ``meta['flops_input']``, if given."""
        x = self.meta.get("flops_input")
        return None if x is None else float(accounting.flops(self.model, x, forward=self.forward))

    def _metric(self) -> float | None:
        if self.evaluate is None:
            return None
        self.model.eval()
        with torch.no_grad():
            return float(self.evaluate(self.model))

    # -- phases --
    def run(self) -> PruneResult:
        t0 = time.perf_counter()
        st = self.state
        if st.get("phase") == "done":  # resumed a finished run: (re)write its files, change nothing
            self._write_outputs(st["report"], only_missing=True)
            return PruneResult(self.model, st["report"])
        if not st:
            st.update(config=self.cfg.to_dict(), phase="prune", round=0, rounds=[], seconds_prior=0.0,
                      seconds_scoring=0.0, seconds_capture=0.0, seconds_scorer=0.0, score_distributions={},
                      eigenvalues={}, finetune_state=None)
            self._start()
            self._save()
        elapsed_before = st["seconds_prior"]
        try:
            if st["phase"] == "prune":
                self._prune_rounds(t0, elapsed_before)
            if st["phase"] == "finetune":
                self._finetune(t0, elapsed_before)
        finally:
            st["seconds_prior"] = elapsed_before + time.perf_counter() - t0
        st["phase"] = "done"
        report = self._report()
        st["report"] = report
        self._save()
        self._write_outputs(report)
        self._event("done", report=report)
        return PruneResult(self.model, report)

    def _write_outputs(self, report: dict[str, Any], only_missing: bool = False) -> None:
        if self.out_dir is None:
            return
        if self.save_model and not (only_missing and (self.out_dir / "model").is_dir()):
            self._write_model()
        if not (only_missing and (self.out_dir / "report.md").is_file()):
            write_report(self.out_dir, report, plots=self.plots)

    def _start(self) -> None:
        st, cfg = self.state, self.cfg
        groups = _discover(self.model, cfg, self.groups_fn)
        if not groups:
            raise ValueError(f"model: found no prunable groups of kinds {cfg.kinds}")
        st["widths_before"] = {g.name: int(g.size) for g in groups}
        st["kinds_by_group"] = {g.name: g.kind for g in groups}
        st["min_keep"] = {g.name: min_keep(g.kind, int(g.size), cfg) for g in groups}
        st["params_before"] = _count(self.model)
        st["params_prunable_before"] = _prunable_params(self.model, groups)
        epr = _Epr(st["params_before"], st["params_prunable_before"], cfg.epr_basis)
        floor = _max_reduction(self.model, cfg, self.groups_fn, st["min_keep"])
        if floor > epr.budget(cfg.target):
            raise TargetUnreachableError(
                f"target: EPR {cfg.target} ({cfg.epr_basis} basis) is out of reach: cutting every group to its "
                f"min-keep gives at most {epr(floor):.4f}; lower the target or prune more unit kinds "
                f"(now {list(cfg.kinds)})")
        st["flops_before"] = self._flops()
        st["metric_before"] = self._metric()

    def _prune_rounds(self, t0: float, before: float) -> None:
        st, cfg = self.state, self.cfg
        epr = _Epr(st["params_before"], st["params_prunable_before"], cfg.epr_basis)
        budget = epr.budget(cfg.target)
        bar = progress(range(st["round"], cfg.max_rounds), desc=f"pruning ({cfg.scorer}) to EPR {cfg.target}")
        for rnd in bar:
            p_now = _count(self.model)
            if p_now <= budget:
                break
            self._event("round_start", round=rnd + 1, params=p_now)
            rec = self._round(rnd, p_now, budget, epr)
            st["rounds"].append(rec)
            st["round"] = rnd + 1
            st["seconds_prior"] = before + time.perf_counter() - t0
            self._save()
            self._event("round_end", **rec)
        else:
            if _count(self.model) > budget:
                raise RuntimeError(f"pruning stopped after max_rounds={cfg.max_rounds} rounds at EPR "
                                   f"{epr(_count(self.model)):.4f} < target {cfg.target}")
        st["params_after"] = _count(self.model)
        st["metric_after_prune"] = self._metric()
        st["phase"] = "finetune"
        st["seconds_prior"] = before + time.perf_counter() - t0
        self._save()

    def _round(self, rnd: int, p_now: int, budget: int, epr: _Epr) -> dict[str, Any]:
        st, cfg = self.state, self.cfg
        groups = [g for g in _discover(self.model, cfg, self.groups_fn)
                  if g.size > st["min_keep"][g.name] and g.size >= 3]
        t = time.perf_counter()
        self.model.eval()
        mode = _stats_mode(cfg.scorer, cfg.one_per_neighbourhood)
        stats = _capture_stats(self.model, groups, self.calib, self.forward, mode) if groups else {}
        taylor = (_capture_taylor(self.model, groups, self.calib, self.loss_fn)  # type: ignore[arg-type]
                  if cfg.scorer in NEEDS_TAYLOR and groups else {})
        t_cap = time.perf_counter() - t
        t = time.perf_counter()
        outs: dict[str, ScoreOutput] = {}
        for gi, g in enumerate(progress(groups, desc=f"round {rnd + 1}: scoring")):
            ctx = ScoreContext(stats[g.name], g.in_weight().detach(), g.out_weight().detach(),
                               taylor.get(g.name), _seed(cfg, rnd, gi), _scorer_options(cfg, g.kind))
            outs[g.name] = run_scorer(cfg.scorer, ctx)
        t_score = time.perf_counter() - t
        if rnd == 0:
            st["score_distributions"] = {g: score_summary(o.scores) for g, o in outs.items()}
            st["eigenvalues"] = {g: o.extra["eigenvalues"].tolist() for g, o in outs.items()
                                 if "eigenvalues" in o.extra}
        keep = {g: st["min_keep"][g] for g in outs}
        counts = round_counts({g: o.scores for g, o in outs.items()}, cfg.round_fraction,
                              allocation=cfg.allocation, min_keep=keep)
        heads = [g for g in groups if g.kind == "head"]
        hc = head_counts({g.name: int(g.size) for g in heads}, st["widths_before"],
                         {g.name: int(g.kv_heads) if g.unit == "query" else 1 for g in heads}, cfg.round_fraction, rnd)
        if any(counts[g] for g in counts if g not in hc) or any(hc.values()):
            counts.update(hc)  # else only heads are left and the schedule says wait: fall back to ceil(r N)
        chosen = {g.name: _blocks(g, outs[g.name], counts[g.name], cfg, st["min_keep"][g.name]) for g in groups}
        chosen = {g: bs for g, bs in chosen.items() if bs}
        if not chosen:
            raise TargetUnreachableError(f"round {rnd + 1}: no group can lose another unit (min-keep) at EPR "
                                         f"{epr(p_now):.4f} < target {cfg.target}")
        seq = _interleave(chosen)
        cost = {g.name: int(g.unit_params()) for g in groups}
        if p_now - sum(cost[g] * len(b) for g, b in seq) <= budget:  # the full round might overshoot
            seq = seq[:_trim(self.model, cfg, self.groups_fn, seq, cost, p_now, budget)]
        _apply_prefix(self.model, cfg, self.groups_fn, seq)
        if cfg.recalibrate_bn:
            recalibrate_bn(self.model, self.calib, self.forward)
        removed_units: dict[str, list[int]] = {}
        for g, b in seq:
            removed_units.setdefault(g, []).extend(b)
        p = _count(self.model)
        st["seconds_scoring"] += t_cap + t_score
        st["seconds_capture"] += t_cap
        st["seconds_scorer"] += t_score
        rec: dict[str, Any] = {
            "round": rnd + 1, "params": p, "epr": epr(p),
            "removed": {g: len(us) for g, us in removed_units.items()},
            "removed_units": {g: sorted(us) for g, us in removed_units.items()},
            "widths": {g.name: int(g.size) for g in _discover(self.model, cfg, self.groups_fn)},
            "seconds_capture": t_cap, "seconds_scoring": t_cap + t_score,
            "lambda_1": {g: float(o.extra["eigenvalues"][0]) for g, o in outs.items()
                         if o.extra.get("eigenvalues") is not None and len(o.extra["eigenvalues"])},
            "dead_units": {g: int((o.scores == -math.inf).sum()) for g, o in outs.items()},
        }
        if cfg.track_metric:
            rec["metric"] = self._metric()
        return rec

    def _finetune(self, t0: float, before: float) -> None:
        st, cfg = self.state, self.cfg
        if cfg.finetune.epochs > 0 and self.train_batches is not None:
            def on_epoch(ft: dict[str, Any]) -> None:
                st["finetune_state"] = ft
                st["seconds_prior"] = before + time.perf_counter() - t0
                self._save()
                self._event("finetune_epoch", epoch=ft["epoch"], loss=ft["history"][-1]["loss"])

            hist = finetune(self.model, self.train_batches, self.loss_fn, cfg.finetune,  # type: ignore[arg-type]
                            seed=cfg.seed, state=st["finetune_state"], on_epoch_end=on_epoch)
            st["finetune_history"] = hist
            st["finetune_state"] = None  # the optimiser state (2x the model for Adam) is not needed any more
            st["metric_after_finetune"] = self._metric()
        else:
            st["finetune_history"] = []
            st["metric_after_finetune"] = None
        st["phase"] = "finetune_done"

    def _report(self) -> dict[str, Any]:
        st, cfg = self.state, self.cfg
        epr = _Epr(st["params_before"], st["params_prunable_before"], cfg.epr_basis)
        pa = st["params_after"]
        widths_after = {g.name: int(g.size) for g in _discover(self.model, cfg, self.groups_fn)}
        return {
            **{k: v for k, v in self.meta.items() if k not in ("flops_input",)},
            "model": self.meta.get("model", type(self.model).__name__), "scorer": cfg.scorer,
            "target": cfg.target, "epr_basis": cfg.epr_basis, "epr": epr(pa),
            "epr_total": (st["params_before"] - pa) / st["params_before"],
            "epr_prunable": (st["params_before"] - pa) / max(1, st["params_prunable_before"]),
            "params_before": st["params_before"], "params_after": pa,
            "params_prunable_before": st["params_prunable_before"],
            "flops_before": st.get("flops_before"), "flops_after": self._flops(),
            "metric_name": self.metric_name, "metric_before": st["metric_before"],
            "metric_after_prune": st["metric_after_prune"], "metric_after_finetune": st["metric_after_finetune"],
            "seconds_scoring": st["seconds_scoring"], "seconds_capture": st["seconds_capture"],
            "seconds_scorer": st["seconds_scorer"], "seconds_total": st["seconds_prior"],
            "rounds": st["rounds"], "widths_before": st["widths_before"], "widths_after": widths_after,
            "kinds_by_group": st["kinds_by_group"], "min_keep": st["min_keep"],
            "finetune_history": st.get("finetune_history", []), "score_distributions": st["score_distributions"],
            "eigenvalues": st["eigenvalues"], "calibration_batches": len(self.calib), "config": cfg.to_dict(),
        }




def _prepare_dir(out: Path, resume: bool) -> None:
    """Create the run directory (clear OSError if impossible); refuse to overwrite a run unless resuming."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"out: expected a directory, got an existing file {str(out)!r}")
    out.mkdir(parents=True, exist_ok=True)
    probe = out / ".spectra_write_test"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OSError(f"out: cannot write to {str(out)!r} ({e.strerror})") from None
    if not resume and ((out / CHECKPOINT).exists() or (out / "report.json").exists()):
        raise ValueError(f"out: {str(out)!r} already holds a run; pass resume=True (--resume) to continue it, "
                         "or choose another directory")


def prune(model: nn.Module, calib: Sequence[Any], config: PruneConfig | None = None, **kw: Any) -> PruneResult:
    """Prune ``model`` iteratively to ``config.target`` EPR, then fine-tune once; return the model and report.

    calib: calibration batches (as for ``capture``: tensors, (inputs, labels) pairs or HF dicts; the same
    batches go to ``loss_fn`` for gradient scorers). Keywords: forward(model, batch) (for ``capture``),
    out_dir (checkpoint + report.json/md + plots there), resume, loss_fn(model, batch) -> loss (Taylor
    and fine-tune), evaluate(model) -> float and metric_name, train_batches(epoch) -> batches for the
    fine-tune, groups(model) -> unit groups (default ``units.discover_groups(model, config.kinds)``),
    callback(event, info) on round_start/round_end/finetune_epoch/done, meta (extra report fields, e.g.
    model and data names; ``flops_input`` for FLOP counts), plots, save_model (DIR/model via
    ``io.save_pruned``) with tokenizer.
    """
    return Pruner(model, calib, config or PruneConfig(), **kw).run()


def score_model(model: nn.Module, calib: Sequence[Any], *, scorer: str = "spectral",
                kinds: Sequence[str] = KINDS, options: dict[str, Any] | None = None,
                loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None, groups: GroupsFn | None = None,
                forward: ForwardFn | None = None, seed: int = 0) -> tuple[dict[str, ScoreOutput], dict[str, Any]]:
    """Score every group once (no removal): ({group: ScoreOutput}, summary per group and timings)."""
    cfg = PruneConfig(scorer=scorer, kinds=tuple(kinds), scorer_options=dict(options or {}), seed=seed)
    if scorer in NEEDS_TAYLOR and loss_fn is None:
        raise ValueError(f"scorer {scorer!r} needs gradients: pass loss_fn(model, batch) -> loss")
    gs = [g for g in _discover(model, cfg, groups) if g.size >= 3]
    if not gs:
        raise ValueError(f"model: found no groups of >= 3 units of kinds {list(cfg.kinds)}")
    model.eval()
    t = time.perf_counter()
    stats = _capture_stats(model, gs, list(calib), forward, _stats_mode(scorer, False))
    taylor = _capture_taylor(model, gs, list(calib), loss_fn) if scorer in NEEDS_TAYLOR else {}  # type: ignore[arg-type]
    t_cap = time.perf_counter() - t
    outs: dict[str, ScoreOutput] = {}
    info: dict[str, Any] = {}
    for gi, g in enumerate(progress(gs, desc=f"scoring ({scorer})")):
        t1 = time.perf_counter()
        ctx = ScoreContext(stats[g.name], g.in_weight().detach(), g.out_weight().detach(), taylor.get(g.name),
                           _seed(cfg, 0, gi), _scorer_options(cfg, g.kind))
        o = run_scorer(scorer, ctx)
        outs[g.name] = o
        ev = o.extra.get("eigenvalues")
        info[g.name] = {"kind": g.kind, "n": int(g.size), "dead": int((o.scores == -math.inf).sum()),
                        "lambda_1": float(ev[0]) if ev is not None and len(ev) else None,
                        "seconds": time.perf_counter() - t1}
    return outs, {"groups": info, "seconds_capture": t_cap,
                  "seconds_scoring": t_cap + sum(v["seconds"] for v in info.values())}


def write_scores(out_dir: str | Path, outs: dict[str, ScoreOutput], summary: dict[str, Any],
                 meta: dict[str, Any]) -> dict[str, Any]:
    """Save scores per group (out_dir/scores/<group>.pt) and a score report (report.json/md + plots)."""
    from .report import plot_all, score_markdown, write_text

    out = Path(out_dir)
    _prepare_dir(out, resume=False)
    (out / "scores").mkdir(exist_ok=True)
    for g, o in outs.items():
        torch_save(out / "scores" / f"{_safe(g)}.pt",
                   {"group": g, "scores": o.scores, "neighbors": o.neighbors,
                    "eigenvalues": o.extra.get("eigenvalues")})
    rep = {"kind": "score", **meta, **summary,
           "score_distributions": {g: score_summary(o.scores) for g, o in outs.items()},
           "eigenvalues": {g: o.extra["eigenvalues"].tolist() for g, o in outs.items() if "eigenvalues" in o.extra}}
    write_json(out / "report.json", rep)
    made = plot_all(rep, out)
    write_text(out / "report.md", score_markdown(rep, made))
    return rep


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


__all__ = ["CHECKPOINT", "KINDS", "PruneConfig", "PruneResult", "Pruner", "TargetUnreachableError", "head_counts",
           "min_keep", "prune", "recalibrate_bn", "score_model", "write_scores"]
