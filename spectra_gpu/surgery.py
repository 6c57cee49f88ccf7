"""Physical removal of units: slice every weight attached to them so the model is genuinely smaller and
runs with its normal forward (docs/algorithm.md section 7).

Per unit: the producer rows and biases (both SwiGLU projections), the BatchNorm affine parameters and
running statistics, the consumer's input columns/channels; for heads the q/k/v rows and the out-projection
column block, plus the attention module's head-count attributes named in the family table (families.py:
BERT ``num_attention_heads``/``all_head_size``, Llama ``num_key_value_groups``, GPT-2 ``num_heads``/
``split_size``, Phi-3 ``num_key_value_heads`` and ``config.num_attention_heads``, on the module's own
``families.LayerConfig`` view of the shared config, ...; RoPE and Qwen3/Gemma-3 q_norm/k_norm act per head_dim,
so they are untouched). Fused projections (GPT-2 ``c_attn``, Phi-3 ``gate_up_proj`` and ``qkv_proj``) lose the
matching rows of every part at once; GPT-2 ``Conv1D`` weights ([in, out]) are sliced on the transposed axes. The
consumer bias stays, so removal equals masking (``masking.masked``). New ``nn.Parameter`` objects replace the old
ones: build optimizers after surgery.

GQA constraint: Hugging Face attention expects num_heads % num_kv_heads == 0 with query heads of a KV group
contiguous, so query-head removal ("query" units) must take the same number of heads from every KV group
(``UnitGroup.balanced`` picks such sets). Removing a whole KV group ("kv" units) drops its k/v rows and its
query heads. Static KV caches sized from ``config.num_key_value_heads`` do not fit pruned KV widths; the
default dynamic cache used by ``generate`` does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .families import LinearView, base_of, is_conv1d, out_width, set_head_counts
from .units import UnitGroup


def _param(old: Tensor, new: Tensor) -> nn.Parameter:
    return nn.Parameter(new.detach().clone(), requires_grad=old.requires_grad)


def _base_rows(mod: Any, keep: Tensor) -> None:
    """Keep output rows ``keep`` of a real Linear / Conv2d / Conv1D (weight and bias)."""
    w = mod.weight
    k = keep.to(w.device)
    mod.weight = _param(w, w[:, k] if is_conv1d(mod) else w[k])
    if mod.bias is not None:
        mod.bias = _param(mod.bias, mod.bias[keep.to(mod.bias.device)])
    if is_conv1d(mod):
        mod.nf = int(mod.weight.shape[1])
    elif isinstance(mod, nn.Linear):
        mod.out_features = int(mod.weight.shape[0])
    elif isinstance(mod, nn.Conv2d):
        mod.out_channels = int(mod.weight.shape[0])


def _rows(*edits: tuple[nn.Module, Tensor]) -> None:
    """Keep output rows ``keep`` of each (module, keep) pair, where a module may be a LinearView on part of a
    fused projection: every part's rows are translated to the base before any base is sliced, so several parts
    of one base are cut in one go."""
    plan: dict[int, tuple[nn.Module, Tensor]] = {}
    for mod, keep in edits:
        base = base_of(mod)
        if id(base) not in plan:
            plan[id(base)] = (base, torch.ones(out_width(base) if isinstance(mod, LinearView)
                                               else int(base.weight.shape[0]), dtype=torch.bool))  # type: ignore[index]
        mask = plan[id(base)][1]
        rows = mod.rows if isinstance(mod, LinearView) else slice(0, mask.numel())
        mask[rows] = False
        mask[rows.start + keep.cpu()] = True
    for base, mask in plan.values():
        _base_rows(base, mask.nonzero().flatten())


def _cols(mod: nn.Module, keep: Tensor) -> None:
    """Keep input columns (Linear, Conv1D: weight rows) / channels (Conv2d) ``keep``."""
    m: Any = base_of(mod)
    k = keep.to(m.weight.device)
    if is_conv1d(m):
        m.weight = _param(m.weight, m.weight[k])
        m.nx = int(m.weight.shape[0])
        return
    m.weight = _param(m.weight, m.weight[:, k])
    if isinstance(m, nn.Linear):
        m.in_features = int(m.weight.shape[1])
    elif isinstance(m, nn.Conv2d):
        m.in_channels = int(m.weight.shape[1]) * m.groups


def _norm(bn: nn.modules.batchnorm._BatchNorm, keep: Tensor) -> None:
    for name in ("weight", "bias"):
        p = getattr(bn, name, None)
        if p is not None:
            setattr(bn, name, _param(p, p[keep.to(p.device)]))
    for name in ("running_mean", "running_var"):
        b = getattr(bn, name, None)
        if b is not None:
            bn._buffers[name] = b[keep.to(b.device)].clone()
    bn.num_features = int(keep.numel())


def _blocks(keep_units: Tensor, width: int) -> Tensor:
    """Column indices of the kept units when each unit owns ``width`` contiguous columns."""
    return (keep_units[:, None] * width + torch.arange(width)[None, :]).flatten()


def check_indices(group: UnitGroup, idx: Any) -> Tensor:
    """Validate units to remove: a 1-D int sequence of distinct indices in [0, size) that leaves at least
    one unit (and, for GQA query heads, takes equally many heads from every KV group); an empty sequence
    is no removal."""
    if not isinstance(group, UnitGroup):
        raise TypeError(f"group: expected a UnitGroup, got {type(group).__name__}")
    t = torch.as_tensor(idx)
    if t.numel() == 0 and t.dim() == 1:  # [] reads as float32
        t = t.long()
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex() or t.dim() > 1:
        raise TypeError(f"idx: expected a 1-D sequence of int unit indices, got {t.dtype} of shape {tuple(t.shape)}")
    t = t.flatten().long().cpu()
    n = group.size
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
        raise ValueError(f"idx: expected unit indices in [0, {n}) for group {group.name!r}, got "
                         f"[{int(t.min())}, {int(t.max())}]")
    if t.unique().numel() != t.numel():
        raise ValueError(f"idx: expected distinct unit indices for group {group.name!r}, got duplicates")
    if t.numel() >= n:
        what = "the last head" if group.kind == "head" else "every unit"
        raise ValueError(f"remove_units: refusing to remove {what} of group {group.name!r} ({n} units): keep at "
                         f"least one (remove the whole layer/block instead)")
    if group.unit == "query" and t.numel():
        r, kv = group.n_rep, group.kv_heads
        counts = torch.bincount(t // r, minlength=int(kv or 0))
        if bool((counts != counts[0]).any()):
            raise ValueError(
                f"idx: GQA group {group.name!r} has {kv} KV groups of {r} query heads; query-head removal must take "
                f"the same number of heads from every KV group (got {counts.tolist()} per group). Use "
                f"group.balanced(scores, n) to pick such a set, or discover_groups(..., gqa='kv') to remove whole "
                f"KV groups")
    return torch.sort(t).values


def remove_units(model: nn.Module, group: UnitGroup, idx: Any) -> Tensor:
    """Physically remove units ``idx`` of ``group`` from ``model`` in place; returns the kept original
    indices. ``model`` is the module the group was discovered on (checked)."""
    t = check_indices(group, idx)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not any(m is base_of(group.consumer) for m in model.modules()):
        raise ValueError(f"group {group.name!r} does not belong to this model (its consumer is not a submodule)")
    n = group.size
    mask = torch.ones(n, dtype=torch.bool)
    mask[t] = False
    keep = mask.nonzero().flatten()
    if t.numel() == 0:
        return keep
    if group.kind == "head":
        _remove_heads(group, keep)
        return keep
    cols = _consumer_cols(group, keep, n)
    _rows(*((p, keep) for p in group.producers))
    if group.norm is not None:
        _norm(group.norm, keep)
    _cols(group.consumer, cols)
    set_ffn_width(model, group)
    return keep


def set_ffn_width(model: nn.Module, group: UnitGroup) -> None:
    """Write a family FFN's width attributes (the family table's ``width_attrs``, e.g. Llama MLP
    ``intermediate_size``) on the module holding the consumer, from the group's current size."""
    attrs = getattr(group.roles, "width_attrs", ())
    if group.kind != "ffn" or not attrs:
        return
    owner = _owner(model, group)
    for a in attrs:
        if isinstance(getattr(owner, a, None), int):
            setattr(owner, a, int(group.size))


def _consumer_cols(group: UnitGroup, keep: Tensor, n_before: int) -> Tensor:
    if isinstance(group.consumer, nn.Conv2d):
        return keep
    width = int(group.consumer.weight.shape[1]) // n_before
    return _blocks(keep, width)


def _owner(model: nn.Module, group: UnitGroup) -> nn.Module:
    """The module holding the group's consumer as a direct child (Llama: the MLP)."""
    consumer = base_of(group.consumer)
    for m in model.modules():
        if any(c is consumer for c in m.children()):
            return m
    return model


def _remove_heads(g: UnitGroup, keep: Tensor) -> None:
    assert g.attn is not None and g.q is not None and g.k is not None and g.v is not None
    hd, r = g.head_dim, g.n_rep
    if g.unit == "head":  # MHA: every head owns its q, k, v rows
        rows = _blocks(keep, hd)
        _rows((g.q, rows), (g.k, rows), (g.v, rows))
        _cols(g.consumer, rows)
    elif g.unit == "kv":
        kv_rows = _blocks(keep, hd)
        q_rows = _blocks(keep, r * hd)
        _rows((g.q, q_rows), (g.k, kv_rows), (g.v, kv_rows))
        _cols(g.consumer, q_rows)
    else:  # "query": equal counts per KV group (checked), so the kept heads stay grouped and contiguous
        q_rows = _blocks(keep, hd)
        _rows((g.q, q_rows))
        _cols(g.consumer, q_rows)
    set_heads(g)


def set_heads(g: UnitGroup) -> None:
    """Write the attention module's head-count attributes (family table) from the group's q / k shapes."""
    assert g.attn is not None and g.q is not None and g.k is not None
    if g.roles is None:
        return
    hd = g.head_dim
    set_head_counts(g.roles, g.attn, int(g.q.out_features) // hd, int(g.k.out_features) // hd, hd)
