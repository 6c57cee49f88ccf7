"""Closed-form compensation of pruned units (docs/algorithm.md section 7): after the last pruning round and
before the recovery fine-tune, every consumer's kept input columns are refit by damped least squares so the
consumer reproduces its dense output on the calibration set.

Per group, with x the consumer's full input (every unit's columns, the removed ones R included; K = the kept
columns), W, b the consumer's dense weight and bias, and the uncentred statistics G = sum_t x_t x_t^T,
s = sum_t x_t, M = the number of samples, the refit solves

    min over W'_K, b'   sum_t ||W x_t + b - W'_K x_{K,t} - b'||^2 + lam ||W'_K - W_K||^2

(the ridge pulls toward the dense kept columns, so a group with nothing removed is unchanged; the bias is not
damped). With d = W'_K - W_K and e = b' - b the normal equations are [d e] H = W_R [G_RK s_R], H =
[[G_KK + lam I, s_K], [s_K^T, M]]: the bias absorbs the removed units' mean contribution. A consumer without a
bias (Llama ``down_proj`` / ``o_proj``) drops the last row and column. lam = ``damping`` x the mean diagonal of
G (default 1 %). Removed units that are constant on the calibration set (dead units: constant zero) are folded
into the bias exactly (e += W_c x_c) and left out of the least squares; without a bias they stay in it.

Units per kind: FFN / MLP neurons: the consumer's ``cols_per_unit`` input columns (``down_proj`` / ``fc2`` /
``output.dense``; a conv -> flatten -> Linear channel owns its H x W block); heads: the out-projection's
``head_dim`` columns of the head's output (the per-head context); conv channels feeding a Conv2d: the
consumer's kh x kw kernel slice of that input channel, fitted on unfolded input patches (zero padding only,
groups=1). Memory: one D x D Gram per group in fp64 (D = units x columns per unit), captured one group after
another is not needed: all groups' Grams are filled in one pass.

Which inputs (exact given that rounds never update parameters): the pruned model is the dense model with the
removed units' consumer columns zeroed, so the statistics are taken on a model that still holds every unit
(the dense model, kept before pruning) with, at every consumer, the statistics recorded first and then the
removed columns zeroed for everything downstream. Each consumer thus sees exactly the input the pruned model
gives it plus the removed units' activations computed from those same inputs, and its target is the dense
consumer applied to that input. Upstream compensation is not seen downstream in the one-pass capture; the
layer-sequential path (:func:`compensate` on one block at a time, replaying the compensated block's outputs
as the next block's inputs, as SparseGPT does) sees it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import surgery
from .capture import _Rows, hooked_pass
from .units import UnitGroup, group_by_name

ForwardFn = Callable[[nn.Module, Any], Any]
DAMPING = 0.01
_CONST_RTOL = 1e-10  # a unit is constant when its variance is below this share of its mean square


@dataclass
class ConsumerGram:
    """Uncentred statistics of one consumer's full input on the calibration set, fp64: gram [D, D] = sum_t
    x_t x_t^T, total [D] = sum_t x_t, count = samples; ``width`` = input columns per unit (D = units x width;
    a Conv2d consumer: kh x kw per input channel)."""

    gram: Tensor
    total: Tensor
    count: int
    width: int


@dataclass
class Refit:
    """A consumer's refit weights on its kept inputs: weight (Linear [out, kept columns], Conv2d [out, kept
    channels, kh, kw]) and bias (None when the consumer has none), in the consumer's dtype and device;
    error_removed / error_refit: squared output error of plain removal / of the refit relative to the dense
    output's squared norm, on the calibration set; folded: removed units constant on the calibration set whose
    contribution went into the bias exactly."""

    weight: Tensor
    bias: Tensor | None
    error_removed: float
    error_refit: float
    folded: int

    def summary(self) -> dict[str, Any]:
        return {"error_removed": self.error_removed, "error_refit": self.error_refit, "folded": self.folded}


# ---- which columns ---------------------------------------------------------------------------------------------
def _consumer_matrix(g: UnitGroup) -> Tensor:
    """The consumer's weight as [out, D] with each unit's columns contiguous (a conv's (C, kh, kw) order)."""
    w = g.consumer.weight.detach()
    return w.reshape(w.shape[0], -1)


def _unit_width(g: UnitGroup) -> int:
    c = g.consumer
    if isinstance(c, nn.Conv2d):
        return int(c.kernel_size[0] * c.kernel_size[1])
    return int(g.cols_per_unit)


def _check_consumer(g: UnitGroup) -> None:
    c = g.consumer
    if isinstance(c, nn.Conv2d):
        if c.groups != 1 or c.padding_mode != "zeros" or isinstance(c.padding, str):
            raise ValueError(f"group {g.name!r}: compensation of a Conv2d consumer needs groups=1 and numeric zero "
                             f"padding, got groups={c.groups}, padding={c.padding!r}, padding_mode={c.padding_mode!r}")
    elif not isinstance(c, nn.Linear):
        raise TypeError(f"group {g.name!r}: expected an nn.Linear or nn.Conv2d consumer, got {type(c).__name__}")


def _columns(units: Tensor, width: int) -> Tensor:
    return (units[:, None] * width + torch.arange(width)[None, :]).flatten()


def check_removed(group: UnitGroup, idx: Any) -> Tensor:
    """Sorted unit indices to remove from ``group`` (validated as surgery validates them; an empty list is
    no removal)."""
    return surgery.check_indices(group, idx)


def dense_removals(widths_before: Mapping[str, int],
                   rounds: Iterable[Mapping[str, Sequence[int]]]) -> dict[str, list[int]]:
    """{group: sorted unit indices into the dense width} removed by a sequence of rounds, each given as
    {group: indices into the group's width at the start of that round} (``RoundRecord.removed_units``)."""
    alive = {g: list(range(int(n))) for g, n in widths_before.items()}
    out: dict[str, list[int]] = {g: [] for g in widths_before}
    for r, rec in enumerate(rounds):
        for g, idx in rec.items():
            if g not in alive:
                raise ValueError(f"rounds[{r}]: expected groups among {sorted(alive)}, got {g!r}")
            cur = alive[g]
            gone = set(int(i) for i in idx)
            if gone and (min(gone) < 0 or max(gone) >= len(cur)):
                raise ValueError(f"rounds[{r}][{g!r}]: expected indices in [0, {len(cur)}), got {sorted(gone)}")
            out[g] += [cur[i] for i in gone]
            alive[g] = [u for i, u in enumerate(cur) if i not in gone]
    return {g: sorted(us) for g, us in out.items() if us}


# ---- capture -----------------------------------------------------------------------------------------------------
class _GramCapture:
    """Pre-hook on one consumer: adds the full input to the statistics, then zeroes the removed units' slice
    for everything downstream (the pruned model's values)."""

    def __init__(self, g: UnitGroup, removed: Tensor, rows: _Rows, mm_dtype: torch.dtype, mask: bool):
        _check_consumer(g)
        self.g, self.rows, self.mm, self.mask = g, rows, mm_dtype, mask
        self.width = _unit_width(g)
        d = int(_consumer_matrix(g).shape[1])
        dev = g.consumer.weight.device
        self.gram = torch.zeros(d, d, dtype=torch.float64, device=dev)
        self.total = torch.zeros(d, dtype=torch.float64, device=dev)
        self.count = 0
        keep = torch.ones(g.size, dtype=torch.bool)
        keep[removed] = False
        self.keep_units = keep
        self.keep_cols = keep.repeat_interleave(int(g.cols_per_unit) if not isinstance(g.consumer, nn.Conv2d) else 1)

    def _samples(self, x: Tensor) -> Tensor:
        c = self.g.consumer
        if isinstance(c, nn.Conv2d):
            pad = c.padding
            assert not isinstance(pad, str)  # refused by _check_consumer
            p = F.unfold(x, c.kernel_size, dilation=c.dilation, padding=pad, stride=c.stride)  # [B, D, L]
            return p.transpose(1, 2).reshape(-1, p.shape[1])
        return self.rows(x)

    def pre(self, _m: nn.Module, inp: tuple[Any, ...]) -> tuple[Any, ...]:
        x = inp[0]
        s = self._samples(x.detach())
        s = s.to(torch.promote_types(s.dtype, self.mm))  # never below the model's own precision
        self.gram += s.T @ s
        self.total += s.sum(0, dtype=torch.float64)
        self.count += int(s.shape[0])
        if not self.mask:
            return inp
        mask = self.keep_cols.to(device=x.device, dtype=x.dtype)
        x = x * (mask[None, :, None, None] if isinstance(self.g.consumer, nn.Conv2d) and x.dim() == 4 else mask)
        return (x, *inp[1:])

    def result(self) -> ConsumerGram:
        if self.count == 0:
            raise ValueError(f"compensation: group {self.g.name!r} received no samples; its consumer "
                             f"{self.g.paths.get('consumer')} was not called by the forward pass")
        return ConsumerGram(self.gram, self.total, self.count, self.width)


def _plan(groups: Sequence[UnitGroup], removed: Mapping[str, Any]) -> list[tuple[UnitGroup, Tensor]]:
    by_name = group_by_name(groups)
    unknown = sorted(set(removed) - set(by_name))
    if unknown:
        raise ValueError(f"removed: expected groups among {sorted(by_name)}, got unknown {unknown}")
    plan = [(g, check_removed(g, removed[g.name])) for g in groups if g.name in removed]
    plan = [(g, r) for g, r in plan if r.numel()]
    consumers = [id(g.consumer) for g, _ in plan]
    if len(set(consumers)) != len(consumers):
        raise ValueError("groups: expected each group to have its own consumer module, got a consumer shared by "
                         "two groups with removals")
    return plan


def capture_grams(model: nn.Module, groups: Sequence[UnitGroup], removed: Mapping[str, Any], batches: Iterable[Any],
                  *, forward: ForwardFn | None = None, precision: str = "fp32", mask: bool = True,
                  progress: bool = False) -> dict[str, ConsumerGram]:
    """{group: ConsumerGram} of every group with removals, in one no-grad pass over ``batches`` (eval mode,
    flag restored) on ``model``, which still holds every unit (the dense model, or one block of it); the
    removed units' slices are zeroed downstream of each consumer (module docstring). removed: {group name:
    unit indices into the group's current width}. Samples: one per input row / non-padding token (dict
    batches' ``attention_mask``); Conv2d consumers: every unfolded patch. precision: the products' dtype
    ("fp32" or "fp64"; never below the model's dtype), accumulated in fp64. mask=False leaves every unit in
    place downstream: the statistics of the dense model's inputs (what a first round's exact SignalStats
    see), which ignore how upstream removals shift each consumer's input."""
    if precision not in ("fp32", "fp64"):
        raise ValueError(f"precision: expected 'fp32' or 'fp64', got {precision!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    plan = _plan(groups, removed)
    rows = _Rows(None, 0)
    mm = torch.float32 if precision == "fp32" else torch.float64
    caps = [_GramCapture(g, r, rows, mm, mask) for g, r in plan]
    hooked_pass(model, [c.g.consumer.register_forward_pre_hook(c.pre) for c in caps], batches, forward, rows,
                desc="compensation", progress=progress)
    return {c.g.name: c.result() for c in caps}


# ---- solve ---------------------------------------------------------------------------------------------------
def _spd_solve(h: Tensor, rhs: Tensor) -> Tensor:
    """X with X h = rhs for a symmetric positive definite h (Cholesky; LU if that fails)."""
    chol, info = torch.linalg.cholesky_ex(h)
    if int(info) == 0:
        return torch.cholesky_solve(rhs.T, chol).T
    return torch.linalg.solve(h, rhs.T).T


def _output_error(a: Tensor, gram: Tensor, total: Tensor, count: int) -> float:
    """sum_t ||a [x_t; 1]||^2 from the statistics, a = [out, D + 1]."""
    aw, ab = a[:, :-1], a[:, -1]
    val = (aw @ gram * aw).sum() + 2.0 * (aw @ total * ab).sum() + count * (ab * ab).sum()
    return float(val.clamp_min(0.0))


def refit(group: UnitGroup, stats: ConsumerGram, removed: Any, *, damping: float = DAMPING) -> Refit:
    """The damped least-squares refit of ``group``'s consumer (module docstring) when units ``removed``
    (indices into its current width; the group's modules still hold every unit) go, from ``stats`` of its
    full input."""
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not damping >= 0:
        raise ValueError(f"damping: expected a number >= 0 (a share of the Gram's mean diagonal), got {damping!r}")
    _check_consumer(group)
    r_units = check_removed(group, removed)
    w = _consumer_matrix(group).double()
    out_dim, d = w.shape
    if stats.gram.shape != (d, d) or stats.width * group.size != d:
        raise ValueError(f"stats: expected a Gram of {d} inputs ({group.size} units x {d // group.size}) for group "
                         f"{group.name!r}, got {tuple(stats.gram.shape)} with width {stats.width}")
    dev = stats.gram.device
    w = w.to(dev)
    b0 = group.consumer.bias
    has_bias = b0 is not None
    b = b0.detach().double().to(dev) if b0 is not None else torch.zeros(out_dim, dtype=torch.float64, device=dev)
    g, s, m, width = stats.gram, stats.total, stats.count, stats.width
    keep_u = torch.ones(group.size, dtype=torch.bool)
    keep_u[r_units] = False
    kept_units = keep_u.nonzero().flatten()
    k_cols, r_cols = _columns(kept_units, width).to(dev), _columns(r_units, width).to(dev)
    mean = s / max(m, 1)
    var = (torch.diagonal(g) / max(m, 1) - mean * mean).clamp_min(0.0)
    const_col = var <= _CONST_RTOL * (torch.diagonal(g) / max(m, 1)).clamp_min(torch.finfo(torch.float64).tiny)
    folded_units = torch.zeros(0, dtype=torch.int64)
    e = torch.zeros(out_dim, dtype=torch.float64, device=dev)
    if has_bias:
        const_unit = const_col.reshape(group.size, width).all(1).cpu()
        folded_units = r_units[const_unit[r_units]]
        fc = _columns(folded_units, width).to(dev)
        e = e + w[:, fc] @ mean[fc]
        ls_units = r_units[~const_unit[r_units]]
    else:
        ls_units = r_units
    ls_cols = _columns(ls_units, width).to(dev)
    lam = float(damping) * float(torch.diagonal(g).mean()) if d else 0.0
    if lam <= 0.0:
        lam = 1e-12 * max(float(torch.diagonal(g).abs().max()), 1.0)
    delta = torch.zeros(out_dim, k_cols.numel(), dtype=torch.float64, device=dev)
    if ls_cols.numel():
        wr = w[:, ls_cols]
        gkk = g[k_cols][:, k_cols] + lam * torch.eye(k_cols.numel(), dtype=torch.float64, device=dev)
        grk = g[ls_cols][:, k_cols]
        if has_bias:
            sk = s[k_cols]
            h = torch.cat([torch.cat([gkk, sk[:, None]], 1),
                           torch.cat([sk[None, :], torch.tensor([[float(m)]], dtype=torch.float64, device=dev)], 1)])
            rhs = wr @ torch.cat([grk, s[ls_cols][:, None]], 1)
            sol = _spd_solve(h, rhs)
            delta, e = sol[:, :-1], e + sol[:, -1]
        else:
            delta = _spd_solve(gkk, wr @ grk)
    # errors on the calibration set, from the statistics: coordinates [x (D); 1]
    a_plain = torch.zeros(out_dim, d + 1, dtype=torch.float64, device=dev)
    a_plain[:, r_cols] = w[:, r_cols]
    a_fit = a_plain.clone()
    a_fit[:, k_cols] = -delta
    a_fit[:, -1] = -e
    dense = torch.cat([w, b[:, None]], 1)
    den = max(_output_error(dense, g, s, m), torch.finfo(torch.float64).tiny)
    new_w = (w[:, k_cols] + delta).to(group.consumer.weight.dtype).to(group.consumer.weight.device)
    if isinstance(group.consumer, nn.Conv2d):
        kh, kw = group.consumer.kernel_size
        new_w = new_w.reshape(out_dim, kept_units.numel(), kh, kw)
    new_b = (b + e).to(b0.dtype).to(b0.device) if b0 is not None else None
    return Refit(new_w, new_b, _output_error(a_plain, g, s, m) / den, _output_error(a_fit, g, s, m) / den,
                 int(folded_units.numel()))


# ---- the steps together ------------------------------------------------------------------------------------------
def compensation(model: nn.Module, groups: Sequence[UnitGroup], removed: Mapping[str, Any], batches: Iterable[Any],
                 *, forward: ForwardFn | None = None, damping: float = DAMPING, precision: str = "fp32",
                 mask: bool = True, progress: bool = False) -> dict[str, Refit]:
    """{group: Refit} for every group of ``groups`` with removals: :func:`capture_grams` on ``model`` (which
    still holds every unit; left unchanged) then :func:`refit` per group, each Gram freed once solved. Write
    the result into the pruned model with :func:`apply_refits`."""
    stats = capture_grams(model, groups, removed, batches, forward=forward, precision=precision, mask=mask,
                          progress=progress)
    by_name = group_by_name(groups)
    out: dict[str, Refit] = {}
    for name in list(stats):
        out[name] = refit(by_name[name], stats.pop(name), removed[name], damping=damping)
    return out


def _kept_rows(name: str, consumer: nn.Module, groups: Sequence[UnitGroup], removed: Mapping[str, Any] | None,
               rows: int) -> Tensor | None:
    """The refit's output rows the pruned consumer keeps: all (None) unless the consumer is also the producer
    of a group that lost units (an MLP's or CNN's middle layer), whose removals are then taken from
    ``removed``."""
    width = int(consumer.weight.shape[0])  # type: ignore[index]
    if width == rows:
        return None
    owner = next((g for g in groups if any(p is consumer for p in g.producers)), None)
    if owner is None or removed is None or owner.name not in removed:
        raise ValueError(f"refits[{name!r}]: the pruned consumer has {width} output rows, "
                         f"the refit {rows}; pass removed= with the removals of the group it produces")
    keep = torch.ones(rows, dtype=torch.bool)
    keep[torch.as_tensor(list(removed[owner.name]), dtype=torch.int64)] = False
    return keep.nonzero().flatten()


def apply_refits(groups: Sequence[UnitGroup], refits: Mapping[str, Refit],
                 removed: Mapping[str, Any] | None = None) -> None:
    """Write each Refit into the consumer of the group of the same name among ``groups`` (of the pruned model,
    whose consumers already have the kept widths), in place, without replacing the parameters. A consumer that
    is also a group's producer and lost output rows itself (an MLP's middle Linear) takes the refit's rows it
    kept, found from ``removed`` (the removals given to :func:`compensation`). Shapes are checked."""
    by_name = group_by_name(groups)
    unknown = sorted(set(refits) - set(by_name))
    if unknown:
        raise ValueError(f"refits: expected groups among {sorted(by_name)}, got unknown {unknown}")
    for name, rf in refits.items():
        c = by_name[name].consumer
        rows = _kept_rows(name, c, groups, removed, int(rf.weight.shape[0]))
        w = rf.weight if rows is None else rf.weight[rows.to(rf.weight.device)]
        bias = rf.bias if rows is None or rf.bias is None else rf.bias[rows.to(rf.bias.device)]
        if tuple(c.weight.shape) != tuple(w.shape):
            raise ValueError(f"refits[{name!r}]: expected the pruned consumer's weight shape {tuple(w.shape)}, "
                             f"got {tuple(c.weight.shape)} (apply to the model with the same removals)")
        if (c.bias is None) != (bias is None):
            raise ValueError(f"refits[{name!r}]: the consumer's bias and the refit's bias must both exist or not")
        with torch.no_grad():
            c.weight.copy_(w)
            if c.bias is not None and bias is not None:
                c.bias.copy_(bias)


def compensate(model: nn.Module, groups: Sequence[UnitGroup], removed: Mapping[str, Any], batches: Iterable[Any],
               *, forward: ForwardFn | None = None, damping: float = DAMPING, precision: str = "fp32",
               progress: bool = False) -> dict[str, Refit]:
    """In place on ``model`` (which holds every unit: a dense copy, or one block of the layer-sequential
    path): :func:`compensation`, then the physical removal of ``removed`` (``surgery.remove_units``), then
    :func:`apply_refits`. Returns the refits."""
    refits = compensation(model, groups, removed, batches, forward=forward, damping=damping, precision=precision,
                          progress=progress)
    for g in groups:
        if g.name in refits:
            surgery.remove_units(model, g, removed[g.name])
    apply_refits(groups, refits, removed)
    return refits


def compensate_sequential(model: nn.Module, groups: Sequence[UnitGroup], removed: Mapping[str, Any],
                          batches: Sequence[Any], *, forward: ForwardFn | None = None, damping: float = DAMPING,
                          precision: str = "fp32", progress: bool = False) -> dict[str, Refit]:
    """:func:`compensate` one group at a time, in ``groups`` order (their order in the forward pass), in place
    on ``model`` (which holds every unit): each group's statistics are captured on the model whose earlier
    groups are already removed and refit, so every consumer is fit on the inputs the compensated model gives
    it. One pass over ``batches`` per group with removals instead of one in all."""
    out: dict[str, Refit] = {}
    for g in groups:
        if g.name in removed and len(removed[g.name]):
            out.update(compensate(model, [g], {g.name: removed[g.name]}, batches, forward=forward, damping=damping,
                                  precision=precision, progress=progress))
    return out


__all__ = ["DAMPING", "ConsumerGram", "Refit", "apply_refits", "capture_grams", "compensate", "compensate_sequential",
           "compensation", "dense_removals", "refit"]
