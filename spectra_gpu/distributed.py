"""Data-parallel calibration and sharded scoring on ``torch.distributed`` (launched by ``torchrun``; gloo on
CPU, NCCL on GPU), for the capture-and-score step of a round, whole-model or layer-sequential
(docs/algorithm.md section 7).

- Calibration: rank r of W captures the batches r, r + W, r + 2W, ... of the calibration list (a disjoint
  share). Exact and moments statistics are additive once every rank accumulates around the same per-unit
  shift; ``SignalStats`` takes its shift from the first batch it sees, so every rank r > 0 also captures
  batch 0 first (so its shift is batch 0's, as in one process) and then subtracts batch 0's contribution,
  captured once more on its own (the same products on the same inputs: the difference is exact up to fp64
  rounding). Any remaining difference in shifts (e.g. non-deterministic device kernels) is re-expressed
  around rank 0's shift in fp64 (Gram_0 = Gram_r + d S_r^T + S_r d^T + m d d^T, d = shift_r - shift_0).
- Scoring: group i of the round belongs to rank i mod W; each tensor of its statistics is summed onto that
  rank (``reduce``), which scores it with the round's seed and options; the scores are then gathered so every
  rank holds every group's ScoreOutput and takes identical pruning decisions.

The result does not depend on W beyond floating-point summation order. Refused: sketch statistics (each
process draws its own Gaussian rows: rank-independent sketches need rows seeded per global batch) and conv
channel groups (their spatial positions are drawn per batch from one generator per process).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ._progress import enabled as _progress_on
from .capture import capture
from .config import PruneConfig
from .rounds import GroupScores, Signals, capture_and_score, score_groups, stats_mode
from .scorers import NEEDS_TAYLOR, ScoreOutput
from .sequential import capture_and_score_sequential, replay_batches
from .stats import SignalStats
from .units import UnitGroup

ForwardFn = Callable[[nn.Module, Any], Any]


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(backend: str | None = None) -> bool:
    """Initialise the default process group from torchrun's environment (WORLD_SIZE > 1), once: NCCL with
    the local rank's GPU when CUDA is available, else gloo (or ``backend``). Returns whether more than one
    process takes part."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend or ("nccl" if cuda else "gloo"))
    return dist.get_world_size() > 1


def share(calib: Sequence[Any], rank: int, size: int) -> list[Any]:
    """The calibration batches rank ``rank`` of ``size`` captures: rank, rank + size, ... ; ranks > 0 get
    batch 0 first (their statistics' shift batch, whose contribution they subtract again)."""
    mine = [calib[i] for i in range(rank, len(calib), size)]
    return mine if rank == 0 else [calib[0], *mine]


# ---- statistics across ranks ---------------------------------------------------------------------------------
def _sides(s: SignalStats) -> tuple[Any, Any]:
    return s.pre, s.post


def _check_mode(s: SignalStats, name: str) -> None:
    if s.mode == "sketch":
        raise ValueError(f"group {name!r}: distributed calibration needs mode 'exact' or 'moments', got 'sketch' "
                         "(each process would draw its own sketch rows)")


def subtract(total: SignalStats, part: SignalStats) -> None:
    """Remove ``part``'s batches from ``total`` in place; both must accumulate around the same shift (the
    part's batches were ``total``'s first batches)."""
    for a, b in zip(_sides(total), _sides(part), strict=True):
        if a.shift is None or b.shift is None or not torch.equal(a.shift, b.shift):
            raise ValueError("subtract: expected statistics accumulated around the same shift")
        for attr in ("s1", "s2", "gram", "sk", "pgram"):
            x, y = getattr(a, attr), getattr(b, attr)
            if x is not None:
                x -= y
    total.nnz_post -= part.nnz_post
    total.abs_sum_post -= part.abs_sum_post
    total.m -= part.m


def reshift(s: SignalStats, shifts: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Re-express ``s``'s sums around new per-unit shifts (pre, post), in place, in fp64:
    x - s_new = (x - s_old) + d with d = s_old - s_new; a no-op when the shifts are equal."""
    for sd, new in zip(_sides(s), shifts, strict=True):
        assert sd.shift is not None
        d = sd.shift - new.to(sd.shift)
        if not bool(d.any()):
            continue
        m, s1 = s.m, sd.s1.clone()
        sd.s2 += 2 * d * s1 + m * d * d
        sd.s1 += m * d
        if sd.gram is not None:
            sd.gram += d[:, None] * s1[None, :] + s1[:, None] * d[None, :] + m * d[:, None] * d[None, :]
        if sd.pgram is not None and sd.probe is not None:
            dp, sp = d[sd.probe], s1[sd.probe]
            sd.pgram += dp[:, None] * s1[None, :] + sp[:, None] * d[None, :] + m * dp[:, None] * d[None, :]
        if sd.sk is not None:
            raise ValueError("reshift: sketch statistics cannot be re-expressed around another shift")
        sd.shift = new.to(sd.shift).clone()


def reduce_to_owners(stats: dict[str, SignalStats], owners: dict[str, int],
                     shift_part: dict[str, SignalStats] | None = None) -> dict[str, SignalStats]:
    """Sum every rank's statistics of each group onto the group's owner rank (collective: every rank calls
    it with the same group names in the same order); returns the summed statistics of the groups this rank
    owns. ``shift_part``: this rank's capture of the shift batch alone, subtracted first (ranks > 0)."""
    rank, _ = world()
    out: dict[str, SignalStats] = {}
    for name, s in stats.items():
        _check_mode(s, name)
        if shift_part is not None:
            subtract(s, shift_part[name])
        shifts = []
        for sd in _sides(s):
            assert sd.shift is not None
            sh = sd.shift.clone()
            dist.broadcast(sh, src=0)
            shifts.append(sh)
        reshift(s, (shifts[0], shifts[1]))
        m = torch.tensor([float(s.m)], dtype=torch.float64, device=s.nnz_post.device)
        tensors = [m, s.nnz_post, s.abs_sum_post]
        for sd in _sides(s):
            tensors += [t for t in (sd.s1, sd.s2, sd.gram, sd.pgram) if t is not None]
        for t in tensors:
            dist.reduce(t, dst=owners[name], op=dist.ReduceOp.SUM)
        if owners[name] == rank:
            s.m = int(round(float(m.item())))
            out[name] = s
    return out


def _gather_outputs(outs: dict[str, ScoreOutput], per: dict[str, float],
                    order: Sequence[str]) -> tuple[dict[str, ScoreOutput], dict[str, float]]:
    _, size = world()
    got: list[Any] = [None] * size
    dist.all_gather_object(got, (outs, per))
    all_outs: dict[str, ScoreOutput] = {}
    all_per: dict[str, float] = {}
    for o, p in got:
        all_outs.update(o)
        all_per.update(p)
    return {g: all_outs[g] for g in order}, {g: all_per[g] for g in order}


# ---- the step ------------------------------------------------------------------------------------------------
def capture_and_score_distributed(model: nn.Module, groups: Sequence[UnitGroup], calib: Sequence[Any],
                                  cfg: PruneConfig, *, round_index: int = 0, forward: ForwardFn | None = None,
                                  loss_fn: Any = None, desc: str | None = None, sequential: bool = False,
                                  **sequential_options: Any) -> GroupScores:
    """``rounds.capture_and_score`` (or, with ``sequential``, ``sequential.capture_and_score_sequential`` with
    ``sequential_options``) across the ranks of the default process group (module docstring): every rank
    passes the same model, groups and full calibration list and gets every group's ScoreOutput. Without an
    initialised process group of more than one rank it is the one-process step. Timings are this rank's."""
    rank, size = world()
    if size == 1:
        if sequential:
            return capture_and_score_sequential(model, groups, calib, cfg, round_index=round_index, forward=forward,
                                                loss_fn=loss_fn, desc=desc, **sequential_options)
        return capture_and_score(model, groups, calib, cfg, round_index=round_index, forward=forward,
                                 loss_fn=loss_fn, desc=desc)
    if cfg.scorer in NEEDS_TAYLOR:
        raise ValueError(f"scorer {cfg.scorer!r}: distributed calibration sums signal statistics only; gradient "
                         "scorers run in one process")
    calib = list(calib)
    if not calib:
        raise ValueError("calib: expected at least one calibration batch, got none")
    groups = list(groups)
    conv = [g.name for g in groups if g.kind == "channel"]
    if conv:
        raise ValueError(f"groups {conv}: distributed calibration does not take conv channel groups (their spatial "
                         "positions are drawn per process); calibrate them in one process")
    owners = {g.name: i % size for i, g in enumerate(groups)}
    local = share(calib, rank, size)
    mode = sequential_options.get("mode") or stats_mode(cfg.scorer, cfg.one_per_neighbourhood)
    if mode == "sketch":
        raise ValueError("mode: distributed calibration needs 'exact' or 'moments' statistics, got 'sketch'")
    show = _progress_on() and rank == 0
    if sequential:
        def grab(block: nn.Module, gs: Sequence[UnitGroup], batches: Sequence[dict[str, Any]], fwd: ForwardFn,
                 mode: str, seed: int) -> dict[str, SignalStats]:
            part = None
            if rank != 0:  # the shift batch alone, read before the sweep overwrites its slot
                first = replay_batches(1, [batches[0].get("attention_mask")], write=False)
                part = dict(capture(block, gs, first, forward=fwd, mode=mode, seed=seed, progress=False))
            stats = dict(capture(block, gs, batches, forward=fwd, mode=mode, seed=seed, progress=show))
            return reduce_to_owners(stats, {g.name: owners[g.name] for g in gs}, part)

        res: GroupScores = capture_and_score_sequential(model, groups, local, cfg, round_index=round_index,
                                                        forward=forward, desc=desc, block_capture=grab,
                                                        **sequential_options)
    else:
        model.eval()
        t = time.perf_counter()
        part = (dict(capture(model, groups, local[:1], forward=forward, mode=mode, progress=False))
                if rank != 0 else None)
        stats = dict(capture(model, groups, local, forward=forward, mode=mode, progress=show))
        mine = reduce_to_owners(stats, owners, part)
        t_cap = time.perf_counter() - t
        t = time.perf_counter()
        outs: dict[str, ScoreOutput] = {}
        per: dict[str, float] = {}
        for gi, g in enumerate(groups):
            if g.name in mine:
                o, sec = score_groups([g], Signals({g.name: mine.pop(g.name)}, {}), cfg, round_index=round_index,
                                      group_offset=gi, desc=desc)
                outs.update(o)
                per.update(sec)
        res = GroupScores(outs, t_cap, time.perf_counter() - t, per)
    outs_all, per_all = _gather_outputs(res.outputs, res.seconds_per_group, [g.name for g in groups])
    return dataclasses.replace(res, outputs=outs_all, seconds_per_group=per_all)


__all__ = ["capture_and_score_distributed", "init_from_env", "reduce_to_owners", "reshift", "share", "subtract",
           "world"]
