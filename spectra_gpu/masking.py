"""Masking: zero the outputs of some units without touching any weight.

A unit's output reaches the rest of the network only through its slice of the consumer's input (its
column(s) of a Linear, its channel of a Conv2d, its head_dim block of the attention out-projection), so
zeroing that slice is exactly what physical removal computes: the consumer's bias stays in both. Masking
is what surgery is tested against, and what an iterative loop can use to try removals without slicing.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from .units import UnitGroup, discover_groups, group_by_name


def _keep_tensor(g: UnitGroup, keep: Any) -> Tensor:
    k = torch.as_tensor(keep)
    if k.dtype != torch.bool or k.dim() != 1 or k.numel() != g.size:
        raise ValueError(f"masks[{g.name!r}]: expected a 1-D bool keep-mask of {g.size} units, got "
                         f"{k.dtype} {tuple(k.shape)}")
    return k


def _hook(g: UnitGroup, keep: Tensor) -> Any:
    cols = keep.repeat_interleave(g.cols_per_unit)

    def pre(_m: nn.Module, inp: tuple[Any, ...]) -> tuple[Any, ...]:
        x = inp[0]
        if x.dim() == 4 and isinstance(g.consumer, nn.Conv2d):
            x = x * cols.to(device=x.device, dtype=x.dtype)[None, :, None, None]
        else:
            x = x * cols.to(device=x.device, dtype=x.dtype)
        return (x, *inp[1:])

    return g.consumer.register_forward_pre_hook(pre)


@contextmanager
def masked(model: nn.Module, masks: Mapping[str | UnitGroup, Any],
           groups: Sequence[UnitGroup] | None = None) -> Iterator[nn.Module]:
    """Within the block, units whose keep entry is False output zero. ``masks`` maps group names (or
    UnitGroup objects) to [N] bool keep-masks; names are looked up in ``groups`` (default: discovered)."""
    by_name = group_by_name(groups) if groups is not None else None
    handles = []
    try:
        for key, keep in masks.items():
            if isinstance(key, UnitGroup):
                g = key
            else:
                if by_name is None:
                    by_name = group_by_name(discover_groups(model))
                if key not in by_name:
                    raise ValueError(f"masks: no group named {key!r}; known groups: {sorted(by_name)}")
                g = by_name[key]
            handles.append(_hook(g, _keep_tensor(g, keep)))
        yield model
    finally:
        for h in handles:
            h.remove()
