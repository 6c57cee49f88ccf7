"""Any registered scorer (``sg.SCORERS``) as ``torch.nn.utils.prune`` masks: structured masks, no extra dependency.

    scores = channel_scores(model, batches)                   # calibrate once, score every discovered group
    scores = channel_scores(model, batches, "wanda_sp")       # any scorer; "taylor" needs loss_fn=
    prune_channels(scores, amount=0.3)                        # ln_structured masks, lowest scores first
    # or, per module, with any torch.nn.utils.prune method that takes importance_scores=:
    s = scores["fc1"]
    prune.ln_structured(s.module, "weight", 0.3, n=1, dim=s.dim, importance_scores=importance_scores(s))

Units and signals are those of ``spectra_gpu.units`` / ``spectra_gpu.capture`` (the groups ``discover_groups``
finds), scored through :class:`~spectra_gpu.integrations.calibration.Calibration`. Neuron, channel and FFN
groups mask their producer's output rows (``dim=0``; also the bias, a BatchNorm between producer and
activation, and SwiGLU's up_proj rows); head groups mask their out-projection's input columns (``dim=1``:
each of a head's ``head_dim`` columns carries the head's score). Masks do not shrink tensors (use the
Torch-Pruning adapter for that); ``prune.remove(module, "weight")`` bakes them in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

from ..scorers import ScoreOutput
from .calibration import Calibration


@dataclass(frozen=True)
class ChannelScores:
    """Scores of one group's units on one module. dim: the weight dim they index (0 = output rows,
    1 = out-projection input columns of heads).

    scores: [N] float64 per slice along ``dim``, on the calibration's cross-group scale, lower = prune
    first. norm: the BatchNorm between the layer and its activation, masked together with it. result: the
    scorer's raw output per unit. co_producers: modules whose output rows are masked together with
    ``module``'s (SwiGLU's up_proj).
    """

    name: str
    module: nn.Linear | nn.Conv2d
    dim: int
    scores: torch.Tensor
    norm: nn.modules.batchnorm._BatchNorm | None
    result: ScoreOutput | None
    co_producers: tuple[nn.Linear | nn.Conv2d, ...] = ()


def channel_scores(model: nn.Module, batches: Iterable[Any], scorer: str = "spectral", *,
                   forward_fn: Callable[[nn.Module, Any], Any] | None = None,
                   loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
                   **options: Any) -> dict[str, ChannelScores]:
    """Calibrate on ``batches`` and score every discovered group with ``scorer``, keyed by group name.
    ``options`` are those of :class:`~spectra_gpu.integrations.calibration.Calibration` (normalizer, capture
    options, the spectral scorers' ``sg.score`` options)."""
    cal = Calibration(scorer, loss_fn=loss_fn, **options).calibrate(model, batches, forward_fn)
    out: dict[str, ChannelScores] = {}
    for g in cal.groups:
        imp = cal.importance(g)
        res = cal.scores(g)
        if g.kind == "head":
            out[g.name] = ChannelScores(g.name, g.consumer, 1, imp.repeat_interleave(g.cols_per_unit), None, res)
        else:
            out[g.name] = ChannelScores(g.name, g.producers[0], 0, imp, g.norm, res, tuple(g.producers[1:]))
    return out


def spectral_channel_scores(model: nn.Module, batches: Iterable[Any], *,
                            forward_fn: Callable[[nn.Module, Any], Any] | None = None,
                            **options: Any) -> dict[str, ChannelScores]:
    """:func:`channel_scores` with the spectral scorer."""
    return channel_scores(model, batches, "spectral", forward_fn=forward_fn, **options)


def importance_scores(scores: ChannelScores, name: str = "weight") -> torch.Tensor:
    """A tensor shaped like ``module.<name>`` for ``prune.*_structured(..., importance_scores=)``.

    Every slice along ``scores.dim`` holds the unit's rank (1 = lowest score), so any L_n norm of a slice
    orders units exactly as the scores do, whatever their sign.
    """
    param = getattr(scores.module, name, None)
    if not isinstance(param, torch.Tensor):
        raise ValueError(f"{scores.name}: expected a tensor attribute {name!r}, got {type(param).__name__}")
    n = scores.scores.numel()
    if param.dim() <= scores.dim or param.shape[scores.dim] != n:
        raise ValueError(f"{scores.name}.{name}: expected {n} slices along dim {scores.dim} (one per scored "
                         f"unit), got shape {tuple(param.shape)}")
    rank = torch.empty(n, dtype=param.dtype, device=param.device)
    rank[torch.argsort(scores.scores, stable=True).to(param.device)] = torch.arange(
        1, n + 1, dtype=param.dtype, device=param.device)
    shape = [1] * param.dim()
    shape[scores.dim] = n
    return rank.view(shape).expand_as(param).clone()


def _tensor(m: nn.Module, name: str) -> torch.Tensor | None:
    """``m.<name>`` if it is a tensor (a parameter, or the masked tensor ``prune`` leaves), else None."""
    t = getattr(m, name, None)
    return t if isinstance(t, torch.Tensor) else None


def prune_channels(scores: Mapping[str, ChannelScores] | Iterable[ChannelScores], amount: float | int,
                   *, n: int | float = 1) -> dict[str, torch.Tensor]:
    """Mask the lowest-scoring units of every module with ``prune.ln_structured`` (``amount``: fraction in
    [0, 1] or a count, per module, as torch defines it).

    For output channels the bias and the following BatchNorm's weight and bias are masked too, so a masked
    channel's pre-activation is exactly 0 and its output act(0), which is 0 for ReLU/GELU/SiLU/tanh: the same
    function as removing the unit. Returns {name: bool keep-mask over units}.
    """
    items = list(scores.values()) if isinstance(scores, Mapping) else list(scores)
    kept: dict[str, torch.Tensor] = {}
    for s in items:
        if not isinstance(s, ChannelScores):
            raise TypeError(f"scores: expected ChannelScores (from channel_scores), got {type(s).__name__}")
        m = s.module
        prune.ln_structured(m, "weight", amount=amount, n=n, dim=s.dim, importance_scores=importance_scores(s))
        mask = m.get_buffer("weight_mask")
        keep = mask.transpose(0, s.dim).reshape(mask.shape[s.dim], -1).any(dim=1)
        if s.dim == 0:
            if (bias := _tensor(m, "bias")) is not None:
                prune.custom_from_mask(m, "bias", keep.to(bias.dtype))
            for c in s.co_producers:
                prune.custom_from_mask(c, "weight", keep.view(-1, *[1] * (c.weight.dim() - 1)).expand_as(
                    c.weight).to(c.weight.dtype))
                if (bias := _tensor(c, "bias")) is not None:
                    prune.custom_from_mask(c, "bias", keep.to(bias.dtype))
            if s.norm is not None and (weight := _tensor(s.norm, "weight")) is not None:
                prune.custom_from_mask(s.norm, "weight", keep.to(weight.dtype))
                if (bias := _tensor(s.norm, "bias")) is not None:  # BatchNorm(bias=False) has a weight only
                    prune.custom_from_mask(s.norm, "bias", keep.to(bias.dtype))
        kept[s.name] = keep
    return kept


__all__ = ["ChannelScores", "channel_scores", "importance_scores", "prune_channels", "spectral_channel_scores"]
