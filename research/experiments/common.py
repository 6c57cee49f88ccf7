"""Shared machinery of the evidence experiments, on the product API only.

Every experiment runs a built-in task (``spectra_gpu.builtin.tasks.load_task``: model, split, calibration
batches, loss, metric, seeds), finds its unit groups with ``sg.discover_groups``, captures signals with
``sg.capture`` / ``sg.capture_taylor``, scores with the product's scorers (``spectra_gpu.scorers.run_scorer``;
spectral variants are scorer options), selects with ``sg.select_units``, and removes units either by
``sg.masked`` (one-shot curves, single-unit ablation: zeroing a unit's slice of the consumer input is what
removal computes, the consumer's bias stays) or by ``sg.remove_units`` on a copy (iterative rounds, and any
task whose BatchNorms the driver recalibrates). Nothing here captures, masks or splits data on its own.

Research-only scorers (not product scorers, registered here under their experiment names): ``hybrid``,
``hybrid_full``, ``spectral_top_first``, ``hybrid_taylor_rank``; each is a thin composition of product scorers.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import spectra_gpu as sg
from spectra_gpu.builtin import zoo
from spectra_gpu.builtin.tasks import Task, accuracy, load_task
from spectra_gpu.config import HEAD_K
from spectra_gpu.scorers import NEEDS_TAYLOR, SCORERS, SPECTRAL_SCORERS, ScoreContext, ScoreOutput, Scorer, run_scorer
from spectra_gpu.selection import percentile_ranks

ROOT = Path(__file__).resolve().parents[2]
EVIDENCE = ROOT / "research" / "results"
CODE = "product API (research/experiments/common.py on spectra_gpu)"  # marks JSONs written by the ported code


def setup_threads() -> None:
    """One thread per experiment: the machine's cores are shared by several jobs."""
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# ---------------------------------------------------------------------------------------------- setups
# experiment setup -> (built-in task, unit kinds, the 'layer1' scope's group)
SETUPS: dict[str, tuple[str, tuple[str, ...] | None, str | None]] = {
    "mlp": ("digits-mlp", ("neuron",), "layers.0"),
    "cnn": ("mnist-cnn", None, "conv1"),  # None: the task's kinds (conv channels + fc1 neurons)
    "minilm": ("minilm-rt", ("ffn",), "encoder.encoder.layer.3.ffn"),
    "minilm_heads": ("minilm-rt", ("head",), None),
    "smollm2": ("smollm2-text", ("ffn",), None),
}


@dataclass
class Setup:
    """A built-in task with the groups an experiment prunes.

    dense: the task's trained model (never modified in place by the helpers below). names: the group names in
    discovery order. eval_batches: the task's held-out batches, rebuilt from ``spectra_gpu.builtin.zoo`` and
    checked against ``task.evaluate`` at load (classification tasks; None for language modelling).
    """

    name: str
    task: Task
    dense: nn.Module
    kinds: tuple[str, ...]
    names: list[str]
    single: str
    eval_batches: list[Any] | None
    info: dict[str, Any] = field(default_factory=dict)

    def groups(self, model: nn.Module, names: Sequence[str] | None = None) -> list[sg.UnitGroup]:
        """The groups ``names`` (default all) of ``model`` as it is now (re-discovered: shapes change)."""
        by = {g.name: g for g in sg.discover_groups(model, self.kinds)}
        return [by[n] for n in (names if names is not None else self.names)]

    def log_probs(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """([n_eval, C] float64 log-probabilities, [n_eval] labels) on the held-out split."""
        if self.eval_batches is None:
            raise ValueError(f"setup {self.name}: per-sample outputs need a classification task, got "
                             f"{self.task.model_name}")
        lps, ys = [], []
        with torch.no_grad():
            for b in self.eval_batches:
                lps.append(F.log_softmax(self.task.forward(model, b).double(), dim=-1))
                ys.append(b["labels"] if isinstance(b, dict) else b[1])
        return torch.cat(lps), torch.cat(ys)

    def per_sample_loss(self, model: nn.Module) -> torch.Tensor:
        lp, y = self.log_probs(model)
        return -lp[torch.arange(len(y)), y]

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """{'metric': higher = better (accuracy, or -perplexity), 'loss': mean held-out loss}."""
        if self.eval_batches is None:
            ppl = float(self.task.evaluate(model))
            return {"metric": -ppl, "loss": math.log(ppl)}
        lp, y = self.log_probs(model)
        return {"metric": float((lp.argmax(1) == y).double().mean()),
                "loss": float(-lp[torch.arange(len(y)), y].mean())}


def _eval_batches(task: Task) -> list[Any] | None:
    """The task's held-out batches as documented in spectra_gpu.builtin.tasks (same split, standardisation,
    tokenisation); load_setup checks them against task.evaluate."""
    if task.data_name == "digits":
        s = zoo.digits()
        mu, sd = s.x_train.mean(0, keepdim=True), s.x_train.std(0, keepdim=True).clamp_min(0.05)
        x, y = (s.x_test - mu) / sd, s.y_test
    elif task.data_name == "mnist5k":
        s = zoo.mnist5k()
        x, y = (s.x_test - 0.1307) / 0.3081, s.y_test
    elif task.data_name == "rotten-tomatoes":
        t = zoo.rotten_tomatoes()
        texts, labels, tok = t.test_texts[:1000], t.y_test[:1000], task.extra["tokenizer"]
        out = []
        for i in range(0, len(texts), 64):
            enc = tok(list(texts[i:i + 64]), padding=True, truncation=True, max_length=64, return_tensors="pt")
            out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                        "labels": labels[i:i + 64]})
        return out
    else:
        return None
    return [(x[i:i + 256], y[i:i + 256]) for i in range(0, len(x), 256)]


def load_setup(setup: str, seed: int = 0) -> Setup:
    """The experiment setup ``setup`` (a key of SETUPS) on the built-in task loaded at ``seed`` (its trained
    model and data order for that seed)."""
    if setup not in SETUPS:
        raise ValueError(f"setup: expected one of {sorted(SETUPS)}, got {setup!r}")
    task_name, kinds, single = SETUPS[setup]
    t = time.perf_counter()
    task = load_task(task_name, seed=seed)
    kinds = kinds or task.kinds
    dense = task.model.eval()
    names = [g.name for g in sg.discover_groups(dense, kinds)]
    evb = _eval_batches(task)
    if evb is not None:
        mine, theirs = accuracy(dense, evb), float(task.evaluate(dense))
        if abs(mine - theirs) > 1e-12:
            raise RuntimeError(f"{setup}: rebuilt held-out batches give accuracy {mine}, the task {theirs}")
    st = Setup(setup, task, dense, tuple(kinds), names, single or names[0], evb)
    dense_eval = st.evaluate(dense)
    st.info = {"task": task_name, "task_seed": seed, "kinds": list(kinds), "groups": names,
               "widths": {g.name: int(g.size) for g in st.groups(dense)}, "task_info": task.info,
               "n_calib_batches": len(task.calib), "dense": dense_eval,
               "seconds_setup": time.perf_counter() - t}
    return st


# ---------------------------------------------------------------------------------------------- scoring
def _hybrid(spectral_opts: dict[str, Any]) -> Scorer:
    """Research-only: spectral participation x Wanda-sp output magnitude ||W_out[:,i]||_1 ||a_i||_2 (the rank
    version is the product's ``hybrid_rank``)."""

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


def _top_first(ctx: ScoreContext) -> ScoreOutput:
    """Research-only control: the default spectral score negated (prune the highest first); if this hurts
    less than bottom-first, the ordering carries no usable signal."""
    out = SCORERS["spectral"](ctx)
    s = -out.scores
    s[out.scores == -math.inf] = -math.inf  # dead units still go first
    return ScoreOutput(s, out.neighbors, out.extra)


def _taylor_rank(ctx: ScoreContext) -> ScoreOutput:
    """Research-only: percentile rank of the spectral score x percentile rank of Taylor-FO."""
    spec = SCORERS["spectral"](ctx)
    tay = SCORERS["taylor"](ScoreContext(ctx.stats, ctx.in_weight, ctx.out_weight, ctx.taylor, ctx.seed)).scores
    n = len(tay)
    s = (percentile_ranks(spec.scores) + 1.0 / n) * (percentile_ranks(tay) + 1.0 / n)
    s[spec.scores == -math.inf] = -math.inf
    return ScoreOutput(s, spec.neighbors, spec.extra)


# k and num_eigs left to sg.score's defaults, min(10, N - 1) and min(32, N - 1): explicit values >= N raise
SPECTRAL_DEFAULT: dict[str, Any] = dict(direction="fwd", preprocess="zscore")
RESEARCH_SCORERS: dict[str, tuple[Scorer, bool]] = {  # name -> (scorer, needs Taylor terms)
    "hybrid": (_hybrid(SPECTRAL_DEFAULT), False),
    "hybrid_full": (_hybrid({**SPECTRAL_DEFAULT, "num_eigs": "full"}), False),
    "spectral_top_first": (_top_first, False),
    "hybrid_taylor_rank": (_taylor_rank, True),
}
for _name, (_fn, _tay) in RESEARCH_SCORERS.items():
    if _name not in SCORERS:
        sg.register_scorer(_name, _fn, needs_taylor=_tay)

# experiment method name -> (scorer name, scorer options); spectral names encode the change from the default
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


def method_options(method: str, kind: str, neighbors: bool = False,
                   width: int | None = None) -> tuple[str, dict[str, Any]]:
    """(scorer, options) of ``method`` on a group of ``kind`` and ``width`` units: spectral scorers get
    k <= min(HEAD_K, width - 1) on head groups (as the driver does); ``neighbors`` asks any scorer for its
    input-graph kNN lists (k = 10, heads HEAD_K, below the width)."""
    if method not in METHODS:
        raise ValueError(f"method: expected one of {sorted(METHODS)}, got {method!r}")
    name, opts = METHODS[method]
    opts = dict(opts)
    if kind == "head":
        if name not in SPECTRAL_SCORERS and name in RESEARCH_SCORERS:
            raise ValueError(f"method {method!r}: no head version (use spectral, hybrid_rank or a baseline)")
        if name in SPECTRAL_SCORERS:
            opts["k"] = min(int(opts.get("k", HEAD_K)), HEAD_K)
    if neighbors:
        opts.setdefault("k", HEAD_K if kind == "head" else 10)
        opts["neighbors"] = True
    if kind == "head" and width is not None and "k" in opts:
        opts["k"] = min(int(opts["k"]), width - 1)  # sg.score refuses k >= N
    return name, opts


def capture(setup: Setup, model: nn.Module, groups: Sequence[sg.UnitGroup], taylor: bool,
            batches: Sequence[Any] | None = None) -> tuple[dict[str, sg.SignalStats], dict[str, torch.Tensor]]:
    """({group: SignalStats}, {group: Taylor terms} or {}) of ``model`` on the task's calibration batches."""
    task = setup.task
    batches = task.calib if batches is None else batches
    stats = sg.capture(model, list(groups), batches, forward=task.forward, progress=False)
    tay = sg.capture_taylor(model, list(groups), batches, task.loss_fn, progress=False) if taylor else {}
    return stats, tay


def score(method: str, g: sg.UnitGroup, stats: sg.SignalStats, taylor: torch.Tensor | None, seed: int,
          neighbors: bool = False) -> ScoreOutput:
    """One method's scores (higher = keep) on one group, by the product's scorer."""
    name, opts = method_options(method, g.kind, neighbors, int(g.size))
    ctx = ScoreContext(stats, g.in_weight().detach(), g.out_weight().detach(), taylor, seed, opts)
    return run_scorer(name, ctx)


def needs_taylor(method: str) -> bool:
    return METHODS[method][0] in NEEDS_TAYLOR


def score_groups(setup: Setup, model: nn.Module, groups: Sequence[sg.UnitGroup], method: str, seed: int,
                 neighbors: bool = False) -> dict[str, ScoreOutput]:
    """Capture ``model`` and score every group of ``groups`` (seed of group i: seed * 100003 + i)."""
    stats, tay = capture(setup, model, groups, needs_taylor(method))
    return {g.name: score(method, g, stats[g.name], tay.get(g.name), seed * 100003 + gi, neighbors)
            for gi, g in enumerate(groups)}


# ---------------------------------------------------------------------------------------------- removal
def _recalibrate(setup: Setup, model: nn.Module) -> None:
    """Re-estimate BatchNorm statistics of a pruned model in place where the task's driver does so (after
    every round, on the calibration batches)."""
    if setup.task.recalibrate_bn:
        from spectra_gpu.driver import recalibrate_bn

        recalibrate_bn(model, setup.task.calib, setup.task.forward)


def run_removal(setup: Setup, names: list[str], method: str, fractions: list[float],
                round_frac: float | None = None, one_per_nbh: bool = False, seed: int = 0) -> dict[str, Any]:
    """Cumulative removal without fine-tune: remove the lowest-scoring round(f x width) units of every group in
    ``names`` (uniform per group), for each f in ``fractions`` along one trajectory; the dense model is left
    untouched.

    round_frac None = one-shot (score the dense model once, remove bottom-f: ``sg.masked``, or surgery on a
    copy when the task recalibrates BatchNorm). Otherwise rounds of round_frac x original width on a copy:
    every round re-captures the already sliced model and rescores the survivors (no weight update), selects
    with ``sg.select_units`` (optionally one unit per input-graph neighbourhood) and removes with
    ``sg.remove_units``. Heads: round_frac > 0 with ``head_rounds`` = one head per layer per round.
    """
    dense = setup.dense
    n0 = {g.name: int(g.size) for g in setup.groups(dense, names)}
    points = []
    t_score = 0.0
    n_rounds = 0
    fr = sorted(fractions)
    if round_frac is None:
        groups = setup.groups(dense, names)
        t = time.perf_counter()
        outs = score_groups(setup, dense, groups, method, seed)
        t_score += time.perf_counter() - t
        n_rounds = 1
        order = {g: torch.sort(o.scores, stable=True).indices for g, o in outs.items()}
        for f in fr:
            drop = {g: order[g][:int(round(f * n0[g]))] for g in names}
            if setup.task.recalibrate_bn:
                m = copy.deepcopy(dense)
                for g in setup.groups(m, names):
                    sg.remove_units(m, g, drop[g.name])
                _recalibrate(setup, m)
                points.append({"fraction": f, **setup.evaluate(m)})
                continue
            masks = {}
            for g in groups:
                keep = torch.ones(n0[g.name], dtype=torch.bool)
                keep[drop[g.name]] = False
                masks[g] = keep
            with sg.masked(dense, masks):
                points.append({"fraction": f, **setup.evaluate(dense)})
    else:
        m = copy.deepcopy(dense)
        for f in fr:
            target = {g: int(round(f * n)) for g, n in n0.items()}
            while True:
                width = {g.name: int(g.size) for g in setup.groups(m, names)}
                todo = [g for g in names if n0[g] - width[g] < target[g]]
                if not todo:
                    break
                t = time.perf_counter()
                outs = score_groups(setup, m, setup.groups(m, todo), method, seed * 1000 + n_rounds,
                                    neighbors=one_per_nbh)
                picks = {}
                for g in todo:
                    step = 1 if round_frac == HEAD_ROUND else max(1, int(round(round_frac * n0[g])))
                    q = min(step, target[g] - (n0[g] - width[g]))
                    picks[g] = sg.select_units(outs[g].scores, q, neighbors=outs[g].neighbors,
                                               one_per_neighbourhood=one_per_nbh)
                t_score += time.perf_counter() - t
                n_rounds += 1
                for g in todo:  # re-discover after each removal: the next group's consumer shapes changed
                    sg.remove_units(m, setup.groups(m, [g])[0], picks[g])
                _recalibrate(setup, m)
            points.append({"fraction": f, **setup.evaluate(m)})
    return {"method": method, "round_frac": round_frac, "one_per_nbh": one_per_nbh, "seed": seed,
            "groups": names, "points": points, "score_seconds": t_score, "rounds": n_rounds}


HEAD_ROUND = -1.0  # round_frac sentinel: one unit (head) per group per round


# ---------------------------------------------------------------------------------------------- output
def machine_info() -> dict[str, Any]:
    product = Path(sg.__file__).resolve().parents[1]  # the checkout whose spectra_gpu ran
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=product).stdout.strip()
    except OSError:
        sha = ""
    try:  # uncommitted changes of the product at start (the working tree may be shared)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "spectra_gpu"], capture_output=True,
                               text=True, cwd=product).stdout.split("\n")
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
            "product_uncommitted": dirty, "code": CODE, "date": time.strftime("%Y-%m-%d %H:%M:%S")}


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
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
