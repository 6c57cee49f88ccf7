"""Shared machinery of the evidence experiments (issue 3): hook points, calibration, every scoring method,
selection rules and the cumulative-removal driver. Kept in one module so that switching to the product's
own scorers/selection/driver, when they land, is a change in one place.

A prunable group of N units is a :class:`Units` module placed where the layer's activation is: it sees the
pre-activation Z and the post-activation A, multiplies A by a 0/1 mask (masking a unit's output equals
removing it physically: the consumer's bias stays) and, when asked, records Z and A as [N, M] signals.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

import spectra_gpu as sg
from spectra_gpu.driver import HEAD_K  # per-layer head graphs: k = min(3, H - 1), as the driver does
from spectra_gpu.scorers import (NEEDS_TAYLOR, SCORERS, SPECTRAL_SCORERS, ScoreContext, ScoreOutput, Scorer,
                                 register_scorer, run_scorer)
from spectra_gpu.selection import percentile_ranks, select_units

ROOT = Path(__file__).resolve().parents[2]
EVIDENCE = ROOT / "research" / "results"
CACHE = EVIDENCE / "cache"


def setup_threads() -> None:
    """One thread per experiment: the machine's 2 cores are shared by several jobs."""
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# ---------------------------------------------------------------------------------------------- hook points
class Units(nn.Module):
    """Activation + unit mask + optional capture of (pre, post) signals for one prunable group.

    ``channel_dim`` is the axis of the units in the activation tensor (1 for [B, C, H, W], -1 otherwise).
    ``forward(z)`` applies ``act``; ``forward(z, a)`` takes a post-activation computed by the caller (SwiGLU).
    """

    def __init__(self, act: nn.Module | Callable[[torch.Tensor], torch.Tensor], n: int, channel_dim: int = -1):
        super().__init__()
        self.act = act
        self.n = n
        self.channel_dim = channel_dim
        self.register_buffer("mask", torch.ones(n))
        self.recorder: Recorder | None = None

    def forward(self, z: torch.Tensor, a: torch.Tensor | None = None) -> torch.Tensor:
        if a is None:
            a = self.act(z)
        shape = [1] * a.dim()
        shape[self.channel_dim] = self.n
        a = a * self.mask.view(shape)
        if self.recorder is not None:
            self.recorder.add(self, z, a)
        return a


def _rows(x: torch.Tensor, channel_dim: int, keep: torch.Tensor | None, per_image: int,
          gen: torch.Generator) -> torch.Tensor:
    """[..., N, ...] -> [N, samples]: conv maps sample `per_image` positions per image; token tensors keep
    the positions in `keep` (non-padding tokens)."""
    if x.dim() == 4:  # [B, C, H, W]
        b, c, h, w = x.shape
        flat = x.permute(0, 2, 3, 1).reshape(b, h * w, c)
        if per_image and per_image < h * w:
            idx = torch.stack([torch.randperm(h * w, generator=gen)[:per_image] for _ in range(b)])
            flat = torch.gather(flat, 1, idx[:, :, None].expand(-1, -1, c))
        return flat.reshape(-1, c).T
    if x.dim() == 3:  # [B, T, N]
        if keep is not None:
            return x[keep].T
        return x.reshape(-1, x.shape[-1]).T
    return x.T


class Recorder:
    """Collects each group's signals during calibration forwards; optional retain_grad for Taylor."""

    def __init__(self, groups: dict[str, Units], taylor: bool = False, per_image: int = 16, seed: int = 0):
        self.groups = groups
        self.taylor = taylor
        self.per_image = per_image
        self.gen = torch.Generator().manual_seed(seed)
        self.keep: torch.Tensor | None = None  # token mask of the current batch ([B, T] bool)
        self.pre: dict[str, list[torch.Tensor]] = {g: [] for g in groups}
        self.post: dict[str, list[torch.Tensor]] = {g: [] for g in groups}
        self.live: dict[str, torch.Tensor] = {}
        self.taylor_acc: dict[str, torch.Tensor] = {g: torch.zeros(u.n, dtype=torch.float64)
                                                    for g, u in groups.items()}
        self.taylor_count = 0
        self.signed: set[str] = set()
        self._names = {id(u): g for g, u in groups.items()}

    def __enter__(self) -> Recorder:
        for u in self.groups.values():
            u.recorder = self
        return self

    def __exit__(self, *exc: Any) -> None:
        for u in self.groups.values():
            u.recorder = None

    def add(self, unit: Units, z: torch.Tensor, a: torch.Tensor) -> None:
        g = self._names[id(unit)]
        state = self.gen.get_state()
        self.pre[g].append(_rows(z.detach(), unit.channel_dim, self.keep, self.per_image, self.gen).float())
        self.gen.set_state(state)  # the same positions for pre and post
        self.post[g].append(_rows(a.detach(), unit.channel_dim, self.keep, self.per_image, self.gen).float())
        if self.taylor and a.requires_grad:
            a.retain_grad()
            self.live[g] = a

    def after_backward(self) -> None:
        """Taylor-FO |mean_m a*g| per unit (conv: spatial sum per image, abs, batch mean)."""
        for g, a in self.live.items():
            grad = a.grad
            if grad is None:
                continue
            prod = (a * grad).detach().double()
            if prod.dim() == 4:  # per image: spatial sum, then abs
                per = prod.sum(dim=(2, 3)).abs().sum(dim=0)
            elif prod.dim() == 3:  # per sequence: token sum, then abs
                per = prod.sum(dim=1).abs().sum(dim=0)
            else:  # MLP: signed sum over all samples, abs at the end (taylor())
                self.signed.add(g)
                per = prod.sum(dim=0)
            self.taylor_acc[g] += per
        self.taylor_count += 1
        self.live = {}

    def taylor_scores(self, g: str) -> torch.Tensor:
        t = self.taylor_acc[g] / max(1, self.taylor_count)
        return t.abs() if g in self.signed else t

    def signals(self, g: str) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat(self.pre[g], dim=1), torch.cat(self.post[g], dim=1)


# ---------------------------------------------------------------------------------------------- setups
@dataclass
class Setup:
    """A trained model with its prunable groups and the callables an experiment needs.

    calibrate(recorder): forwards the calibration set (and backward for Taylor when recorder.taylor).
    evaluate() -> dict with the main metric under key 'metric' (higher = better, e.g. accuracy or -ppl),
      plus 'loss'. per_sample_loss() -> [n_eval] float64 losses, log_probs() -> [n_eval, C] (ablation).
    in_weight[g]() -> [N, fan_in] rows; out_weight[g]() -> [d_out, N] columns (current weights).
    """

    name: str
    model: nn.Module
    groups: dict[str, Units]
    calibrate: Callable[[Recorder], None]
    evaluate: Callable[[], dict[str, float]]
    in_weight: dict[str, Callable[[], torch.Tensor]]
    out_weight: dict[str, Callable[[], torch.Tensor]]
    per_sample_loss: Callable[[], torch.Tensor] | None = None
    log_probs: Callable[[], torch.Tensor] | None = None
    metric_name: str = "accuracy"
    params: Callable[[dict[str, int]], int] | None = None  # parameter count at the given widths
    info: dict[str, Any] = field(default_factory=dict)

    def reset(self) -> None:
        for u in self.groups.values():
            u.mask.fill_(1.0)

    def alive(self, g: str) -> torch.Tensor:
        return self.groups[g].mask.bool()


# ---------------------------------------------------------------------------------------------- scoring
# Every method is computed by the product's scorers (spectra_gpu.scorers) and selected by its round
# selection (spectra_gpu.selection); only the experimental hybrids are defined here, registered by name.
@dataclass
class Ctx:
    """One group's alive units: the product's ScoreContext plus the raw signals (kept for the ablation
    analysis, which correlates scores with measured effects)."""

    score: ScoreContext
    pre: torch.Tensor  # [n, M]
    post: torch.Tensor  # [n, M]


def _hybrid(spectral_opts: dict[str, Any]) -> Scorer:
    """Spectral participation x Wanda-sp output magnitude ||W_out[:,i]||_1 ||a_i||_2: structure says which units
    are interchangeable, magnitude how much each one carries (the rank version is the product's
    ``hybrid_rank``)."""

    def run(ctx: ScoreContext) -> ScoreOutput:
        opts = dict(ctx.options)
        ctx.options = {**spectral_opts, **({"neighbors": True} if opts.get("neighbors") else {})}
        try:
            spec = SCORERS["spectral"](ctx)
            ctx.options = {}
            mag = SCORERS["wanda_sp"](ctx).scores
        finally:
            ctx.options = opts
        s = spec.scores * mag
        s[spec.scores == -math.inf] = -math.inf  # dead units (magnitude 0 would give NaN)
        return ScoreOutput(s, spec.neighbors, spec.extra)

    return run


SPECTRAL_DEFAULT: dict[str, Any] = dict(k=10, num_eigs=32, direction="fwd", preprocess="zscore")
register_scorer("hybrid", _hybrid(SPECTRAL_DEFAULT))
register_scorer("hybrid_full", _hybrid({**SPECTRAL_DEFAULT, "num_eigs": "full"}))
# hybrid_rank is a product scorer (spectra_gpu.scorers.hybrid_rank)


def _top_first(ctx: ScoreContext) -> ScoreOutput:
    """The default spectral score negated (prune the highest first): the sanity gate of algorithm.md 8.3;
    if this hurts less than bottom-first, the ordering carries no usable signal."""
    out = SCORERS["spectral"](ctx)
    s = -out.scores
    s[out.scores == -math.inf] = -math.inf  # dead units still go first
    return ScoreOutput(s, out.neighbors, out.extra)


register_scorer("spectral_top_first", _top_first)


def _taylor_rank(ctx: ScoreContext) -> ScoreOutput:
    """Percentile rank of the spectral score x percentile rank of Taylor-FO: does the spectral structure add
    information to the best first-order criterion?"""
    spec = SCORERS["spectral"](ctx)
    tay = SCORERS["taylor"](ScoreContext(ctx.stats, ctx.in_weight, ctx.out_weight, ctx.taylor, ctx.seed)).scores
    n = len(tay)
    s = (percentile_ranks(spec.scores) + 1.0 / n) * (percentile_ranks(tay) + 1.0 / n)
    s[spec.scores == -math.inf] = -math.inf
    return ScoreOutput(s, spec.neighbors, spec.extra)


register_scorer("hybrid_taylor_rank", _taylor_rank, needs_taylor=True)

# experiment name -> (registered scorer, options); the spectral names encode the change from the default
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "spectral": ("spectral", {}),
    "spectral_s2": ("spectral", {"num_eigs": 2}),
    "spectral_s8": ("spectral", {"num_eigs": 8}),
    "spectral_s128": ("spectral", {"num_eigs": 128}),
    "spectral_full": ("spectral", {"num_eigs": "full"}),
    "spectral_rev": ("spectral", {"direction": "rev"}),
    "spectral_sym": ("spectral", {"direction": "sym"}),
    "spectral_k5": ("spectral", {"k": 5}),
    "spectral_k20": ("spectral", {"k": 20}),
    "spectral_raw": ("spectral", {"preprocess": "raw"}),
    "spectral_full_rev": ("spectral", {"num_eigs": "full", "direction": "rev"}),
    "spectral_top_first": ("spectral_top_first", {}),
    "hybrid": ("hybrid", {}),
    "hybrid_full": ("hybrid_full", {}),
    "hybrid_rank": ("hybrid_rank", {}),
    "hybrid_taylor_rank": ("hybrid_taylor_rank", {}),
    "wanda_sp": ("wanda_sp", {}),
    "flap": ("flap", {}),
    "act_var": ("act_var", {}),
    "act_mean": ("act_mean", {}),
    "apoz": ("apoz", {}),
    "weight_l1": ("l1", {}),
    "weight_l2": ("l2", {}),
    "taylor": ("taylor", {}),
    "random": ("random", {}),
}
SPECTRAL_METHODS = [m for m in METHODS if m.startswith(("spectral", "hybrid"))]


def score_method(method: str, ctx: Ctx, seed: int = 0, neighbors: bool = False) -> ScoreOutput:
    """Scores (higher = keep) of one method on one group; with ``neighbors`` also the input-graph kNN lists
    (the spectral engine's own graph, or the same z-scored k=10 input graph for every other method)."""
    if method not in METHODS:
        raise ValueError(f"method: expected one of {sorted(METHODS)}, got {method!r}")
    name, opts = METHODS[method]
    sc = ctx.score
    sc.seed = seed
    sc.options = {**opts, **({"neighbors": True} if neighbors else {})}
    try:
        return run_scorer(name, sc)
    finally:
        sc.options = {}


def calibrate(setup: Setup, groups: Iterable[str], taylor: bool, seed: int = 0) -> dict[str, Ctx]:
    """Forward the calibration set through the masked model and build each group's Ctx over alive units."""
    groups = list(groups)
    rec = Recorder({g: setup.groups[g] for g in groups}, taylor=taylor, seed=seed)
    with rec:
        setup.calibrate(rec)
    out = {}
    for g in groups:
        alive = setup.alive(g)
        pre, post = rec.signals(g)
        pre, post = pre[alive], post[alive]
        stats = sg.SignalStats(int(alive.sum()), mode="exact").update(pre, post)
        tay = rec.taylor_scores(g)[alive] if taylor else None
        sc = ScoreContext(stats, setup.in_weight[g]().detach()[alive],
                          setup.out_weight[g]().detach()[:, alive].T.contiguous(), tay, seed)
        out[g] = Ctx(sc, pre, post)
    return out


def run_removal(setup: Setup, groups: list[str], method: str, fractions: list[float],
                round_frac: float | None = None, one_per_nbh: bool = False, seed: int = 0,
                keep_masks: bool = False) -> dict[str, Any]:
    """Cumulative removal without fine-tune: remove the lowest-scoring fraction f of every group in
    ``groups`` (uniform per group), for each f in ``fractions`` along one trajectory.

    round_frac None = one-shot (score once on the dense model, remove bottom-f). Otherwise rounds of
    round_frac x original width with rescoring of the survivors on the masked model after every round (no
    weight update), optionally with the one-per-neighbourhood rule (select_units) inside each round.
    keep_masks leaves the model pruned at the last fraction (for the recovery fine-tune).
    """
    setup.reset()
    n0 = {g: setup.groups[g].n for g in groups}
    taylor = METHODS[method][0] in NEEDS_TAYLOR
    points = []
    t_score = 0.0
    n_rounds = 0
    fr = sorted(fractions)
    if round_frac is None:
        ctxs = calibrate(setup, groups, taylor, seed)
        t = time.perf_counter()
        order = {g: torch.sort(score_method(method, ctxs[g], seed).scores, stable=True).indices for g in groups}
        t_score += time.perf_counter() - t
        n_rounds = 1
        for f in fr:
            setup.reset()
            for g in groups:
                setup.groups[g].mask[order[g][:int(round(f * n0[g]))]] = 0.0
            points.append({"fraction": f, **setup.evaluate()})
    else:
        for f in fr:
            target = {g: int(round(f * n0[g])) for g in groups}
            while True:
                removed = {g: n0[g] - int(setup.alive(g).sum()) for g in groups}
                todo = [g for g in groups if removed[g] < target[g]]
                if not todo:
                    break
                ctxs = calibrate(setup, todo, taylor, seed + n_rounds)
                n_rounds += 1
                for gi, g in enumerate(todo):
                    t = time.perf_counter()
                    out = score_method(method, ctxs[g], seed * 100003 + n_rounds * 101 + gi, neighbors=one_per_nbh)
                    q = min(max(1, int(round(round_frac * n0[g]))), target[g] - removed[g])
                    pick = select_units(out.scores, q, neighbors=out.neighbors, one_per_neighbourhood=one_per_nbh)
                    t_score += time.perf_counter() - t
                    setup.groups[g].mask[setup.alive(g).nonzero().flatten()[pick]] = 0.0
            points.append({"fraction": f, **setup.evaluate()})
    if not keep_masks:
        setup.reset()
    return {"method": method, "round_frac": round_frac, "one_per_nbh": one_per_nbh, "seed": seed,
            "groups": groups, "points": points, "score_seconds": t_score, "rounds": n_rounds}


# ---------------------------------------------------------------------------------------------- output
def machine_info() -> dict[str, Any]:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=ROOT).stdout.strip()
    except OSError:
        sha = ""
    try:  # uncommitted changes of the product at start (the working tree is shared with other engineers)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "spectra_gpu"], capture_output=True,
                               text=True, cwd=ROOT).stdout.split("\n")
        dirty = [ln[3:] for ln in dirty if ln.strip()]
    except OSError:
        dirty = []
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = names[0] if names else ""
    except OSError:
        pass
    return {"machine": f"{os.cpu_count()}-core CPU ({cpu or platform.machine()}), no GPU",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "git_sha": sha,
            "product_uncommitted": dirty,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def write_json(path: Path | str, obj: Any) -> None:
    """Atomic JSON write (temp file in the same directory, then os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, default=_jsonable)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _jsonable(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------------------------- attention heads


def head_method(method: str) -> tuple[str, dict[str, Any]]:
    """The registered scorer and options of ``method`` on head groups: spectral variants and hybrid_rank with
    k = 3 (as the driver does for heads), every other method unchanged."""
    name, opts = METHODS[method]
    if name in SPECTRAL_SCORERS:
        opts = {**opts, "k": min(int(opts.get("k", HEAD_K)), HEAD_K)}
    elif name.startswith("hybrid") or name == "spectral_top_first":
        raise ValueError(f"method {method!r}: no head version (use spectral, hybrid_rank or a baseline)")
    return name, opts


def _score_heads(hs: Any, model: nn.Module, method: str, seed: int) -> tuple[list[Any], dict[str, torch.Tensor]]:
    """Capture the current model's head signals (and Taylor terms if needed) with the product's capture and
    score every head group; returns (groups, {group: scores})."""
    from spectra_gpu.capture import capture, capture_taylor

    name, opts = head_method(method)
    groups = hs.groups(model)
    stats = capture(model, groups, hs.calib, forward=hs.forward, progress=False)
    tay = (capture_taylor(model, groups, hs.calib, hs.loss_fn, progress=False) if name in NEEDS_TAYLOR
           else {})
    out = {}
    for gi, g in enumerate(groups):
        ctx = ScoreContext(stats[g.name], g.in_weight().detach(), g.out_weight().detach(), tay.get(g.name),
                           seed * 100003 + gi, dict(opts))
        out[g.name] = run_scorer(name, ctx).scores
    return groups, out


def run_head_removal(hs: Any, method: str, fractions: list[float], iterative: bool = False,
                     seed: int = 0) -> dict[str, Any]:
    """Cumulative removal of attention heads without fine-tune: in every layer remove round(f x 12) heads.
    One-shot: score the dense encoder once (signals, and gradients for Taylor, from the calibration set),
    remove the lowest-scoring heads of each layer. Iterative: rounds of one head per layer, every round
    re-capturing the signals on the already sliced encoder and rescoring the survivors (no weight update).
    Removal is the product's surgery on a copy of the dense encoder; the consumer's bias stays."""
    from spectra_gpu.surgery import remove_units

    fr = sorted(fractions)
    points = []
    t_score = 0.0
    n_rounds = 0
    if not iterative:
        t = time.perf_counter()
        groups, scores = _score_heads(hs, hs.dense, method, seed)
        t_score += time.perf_counter() - t
        n_rounds = 1
        order = {g: torch.sort(s, stable=True).indices for g, s in scores.items()}
        for f in fr:
            m = hs.copy()
            for g in hs.groups(m):
                remove_units(m, g, order[g.name][:int(round(f * g.size))])
            points.append({"fraction": f, **hs.evaluate(m)})
    else:
        m = hs.copy()
        n0 = {g.name: int(g.size) for g in hs.groups(m)}
        for f in fr:
            target = {g: int(round(f * n)) for g, n in n0.items()}
            while True:
                todo = {g.name for g in hs.groups(m) if n0[g.name] - int(g.size) < target[g.name]}
                if not todo:
                    break
                t = time.perf_counter()
                groups, scores = _score_heads(hs, m, method, seed * 1000 + n_rounds)
                t_score += time.perf_counter() - t
                n_rounds += 1
                for g in groups:
                    if g.name in todo:
                        remove_units(m, g, torch.sort(scores[g.name], stable=True).indices[:1])
            points.append({"fraction": f, **hs.evaluate(m)})
    return {"method": method, "round_frac": None if not iterative else "1 head/layer", "one_per_nbh": False,
            "seed": seed, "groups": list(hs.info["groups"]), "points": points, "score_seconds": t_score,
            "rounds": n_rounds}
