"""Spectral scores for ``torch.nn.utils.prune``: structured masks with no extra dependency.

    scores = spectral_channel_scores(model, batches)          # calibrate once, score every scorable layer
    prune_channels(scores, amount=0.3)                        # ln_structured masks, lowest scores first
    # or, per module, with any torch.nn.utils.prune method that takes importance_scores=:
    s = scores["fc1"]
    prune.ln_structured(s.module, "weight", 0.3, n=1, dim=s.dim, importance_scores=importance_scores(s))

Units and signals are those of :mod:`spectra_gpu.integrations._calibrate`: output channels of a Linear/Conv
whose output reaches an activation (``dim=0``), and input channels of an attention output projection
(``dim=1``: dim j of head h is channel ``h * head_dim + j``). Masks do not shrink tensors (use the
Torch-Pruning adapter for that); ``prune.remove(module, "weight")`` bakes them in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

from ..scoring.spectral import ScoreResult
from ._calibrate import SpectralCalibrator


@dataclass(frozen=True)
class ChannelScores:
    """Scores of one module's units. dim: the weight dim they index (0 = outputs, 1 = attention-output inputs).

    scores: [N] float64 on the calibrator's cross-layer scale, lower = prune first. norm: the BatchNorm between
    the layer and its activation, masked together with it. result: the raw :func:`spectra_gpu.score` output.
    """

    name: str
    module: nn.Module
    dim: int
    scores: torch.Tensor
    norm: nn.Module | None
    result: ScoreResult


def spectral_channel_scores(model: nn.Module, batches: Iterable[Any], *,
                            forward_fn: Callable[[nn.Module, Any], Any] | None = None,
                            **options: Any) -> dict[str, ChannelScores]:
    """Calibrate on ``batches`` and score every scorable unit set, keyed by module name (attention-output
    inputs get the suffix ``":heads"``). ``options`` are those of :class:`SpectralCalibrator`."""
    cal = SpectralCalibrator(**options).calibrate(model, batches, forward_fn)
    out: dict[str, ChannelScores] = {}
    for (module, kind), unit in cal.units.items():
        res = cal.result(module, kind)
        imp = cal.importance(module, kind)
        if res is None or imp is None:
            continue
        key = unit.name if kind == "out" else f"{unit.name}:heads"
        out[key] = ChannelScores(unit.name, module, 0 if kind == "out" else 1, imp, unit.norm, res)
    return out


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
            raise TypeError(f"scores: expected ChannelScores (from spectral_channel_scores), got {type(s).__name__}")
        m = s.module
        prune.ln_structured(m, "weight", amount=amount, n=n, dim=s.dim, importance_scores=importance_scores(s))
        mask = m.weight_mask
        keep = mask.transpose(0, s.dim).reshape(mask.shape[s.dim], -1).any(dim=1)
        if s.dim == 0:
            if getattr(m, "bias", None) is not None:
                prune.custom_from_mask(m, "bias", keep.to(m.bias.dtype))
            if s.norm is not None and getattr(s.norm, "weight", None) is not None:
                prune.custom_from_mask(s.norm, "weight", keep.to(s.norm.weight.dtype))
                prune.custom_from_mask(s.norm, "bias", keep.to(s.norm.bias.dtype))
        kept[s.name if s.dim == 0 else f"{s.name}:heads"] = keep
    return kept


__all__ = ["ChannelScores", "importance_scores", "prune_channels", "spectral_channel_scores"]
