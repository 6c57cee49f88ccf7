"""Parameter and FLOP accounting of the sliced model (algorithm.md section 7).

Counts always come from the tensors the model holds after surgery, never from per-unit cost sums (a unit's
cost depends on its neighbours' current widths). Tied parameters (e.g. Llama's embedding / LM head) count
once. EPR_prunable divides by the parameters of the prunable modules only (producers, norms, consumers,
q/k/v/o of the groups; no embeddings, LM head or classifier).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .capture import default_forward
from .units import UnitGroup, discover_groups


def count_params(model: nn.Module) -> int:
    """Number of distinct parameter elements (shared/tied parameters once)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    return sum(p.numel() for p in model.parameters())


def prunable_params(model: nn.Module, groups: Sequence[UnitGroup] | None = None) -> int:
    """Distinct parameter elements of the modules the groups' surgery edits (default: discovered groups)."""
    gs = discover_groups(model) if groups is None else groups
    seen: dict[int, int] = {}
    for g in gs:
        for m in g.modules():
            for p in m.parameters(recurse=False):
                seen[id(p)] = p.numel()
    return sum(seen.values())


@dataclass(frozen=True)
class EprResult:
    """Effective parameter reduction: ``total`` = removed / all parameters before, ``prunable`` = removed /
    prunable-module parameters before."""

    total: float
    prunable: float
    params_before: int
    params_after: int
    prunable_before: int
    prunable_after: int


def epr(params_before: int, model: nn.Module, groups: Sequence[UnitGroup] | None = None) -> EprResult:
    """EPR of the (sliced) ``model`` against the parameter count before pruning. Every removed parameter
    belonged to a prunable module, so prunable_before = prunable_after + removed; ``groups`` must be the
    pruned model's groups (default: discovered), i.e. the same modules that were pruned."""
    if isinstance(params_before, bool) or not isinstance(params_before, int) or params_before <= 0:
        raise ValueError(f"params_before: expected a positive int (count_params of the unpruned model), "
                         f"got {params_before!r}")
    after = count_params(model)
    if after > params_before:
        raise ValueError(f"params_before: expected >= the current {after} parameters, got {params_before}")
    removed = params_before - after
    p_after = prunable_params(model, groups)
    p_before = p_after + removed
    return EprResult(removed / params_before, removed / p_before if p_before else 0.0, params_before, after,
                     p_before, p_after)


def samples_in(batch: Any) -> int:
    """Tokens (dict batches: input_ids/inputs_embeds positions, or attention_mask) or images/rows (the
    leading dim of a tensor, or of the first element of an (inputs, labels) pair)."""
    if isinstance(batch, dict):
        for key in ("input_ids", "attention_mask"):
            if batch.get(key) is not None:
                return int(torch.as_tensor(batch[key]).numel())
        if batch.get("inputs_embeds") is not None:
            return int(batch["inputs_embeds"].shape[:-1].numel())
        raise ValueError(f"example_input: expected a dict with input_ids/attention_mask/inputs_embeds, got keys "
                         f"{sorted(batch)}")
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        raise TypeError(f"example_input: expected a tensor batch, an (inputs, labels) pair or a dict, got "
                        f"{type(x).__name__}")
    return int(x.shape[0])


def flops(model: nn.Module, example_input: Any, *, forward: Callable[[nn.Module, Any], Any] | None = None) -> float:
    """Forward FLOPs per token (dict/text batches) or per image/row, measured with torch's FlopCounterMode
    (2 x MACs of matmuls, convolutions and attention) on one no-grad forward of ``example_input``. Attention
    FLOPs grow with sequence length: pass the sequence length you care about, without padding."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    n = samples_in(example_input)
    fwd = forward or default_forward
    was_training = model.training
    model.eval()
    try:
        from torch.utils.flop_counter import FlopCounterMode  # 0.4 s to import: only when counting

        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            fwd(model, example_input)
    finally:
        model.train(was_training)
    return fc.get_total_flops() / n
