"""Parameter and FLOP accounting of pruned models (docs/algorithm.md section 7), and the one definition of
the effective parameter reduction (EPR).

Counts are exact parameter counts of the sliced model, never sums of per-unit costs (a unit's cost depends on
its neighbours' current widths: a weight between two layers that both shrink loses rows and columns).
``count_params`` reads the tensors the model holds; ``params_after_removal`` gives the same number for a
removal that has not happened yet, from module shapes alone (no copy, no slicing). Tied parameters (e.g.
Llama's embedding / LM head) count once. The prunable basis divides by the parameters of the prunable modules
only (producers, norms, consumers, q/k/v/o of the groups; no embeddings, LM head or classifier).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .capture import default_forward
from .families import base_of, is_conv1d
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


def _edits(group: UnitGroup, n: int) -> Iterator[tuple[nn.Module, int, int]]:
    """(module, output rows removed, input columns removed) for removing ``n`` units of ``group`` at its
    current widths: exactly the slices ``surgery.remove_units`` takes."""
    if group.kind == "head":
        assert group.q is not None and group.k is not None and group.v is not None
        hd = group.head_dim
        if group.unit == "head":  # MHA: the head's q, k, v rows and its out-projection columns
            yield from ((m, n * hd, 0) for m in (group.q, group.k, group.v))
            yield group.consumer, 0, n * hd
        elif group.unit == "kv":  # a KV group: its k/v rows and all its query heads
            q_rows = n * group.n_rep * hd
            yield from ((group.k, n * hd, 0), (group.v, n * hd, 0), (group.q, q_rows, 0))
            yield group.consumer, 0, q_rows
        else:  # GQA query heads
            yield from ((group.q, n * hd, 0), (group.consumer, 0, n * hd))
        return
    yield from ((p, n, 0) for p in group.producers)
    if group.norm is not None:
        yield group.norm, n, 0
    yield group.consumer, 0, n * group.cols_per_unit


def params_after_removal(model: nn.Module, groups: Sequence[UnitGroup], removed: Mapping[str, int]) -> int:
    """``count_params(model)`` after removing ``removed[g.name]`` units of each group ``g`` (at the groups'
    current widths), computed from module shapes without touching the model: per edited module, its weight
    keeps (rows - removed rows) x (columns - removed columns) x kernel and its bias (rows - removed rows), with
    the rows and columns summed over every group that edits the module (a layer that is one group's consumer
    and the next group's producer loses both). Equals the count of the sliced model exactly."""
    cut: dict[int, list[Any]] = {}  # id(real module) -> [module, rows removed, columns removed]
    for g in groups:
        n = int(removed.get(g.name, 0))
        if n < 0 or n > g.size:
            raise ValueError(f"removed[{g.name!r}]: expected a count in [0, {g.size}], got {n}")
        if n == 0:
            continue
        for view, rows, cols in _edits(g, n):
            m = base_of(view)  # fused parts and Conv1D views edit their real module
            entry = cut.setdefault(id(m), [m, 0, 0])
            entry[1] += rows
            entry[2] += cols
    saved = 0
    seen: set[int] = set()
    for m, rows, cols in cut.values():
        for name in ("weight", "bias"):
            p = m._parameters.get(name)
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            shape = list(p.shape)
            out_axis = 1 if is_conv1d(m) and name == "weight" else 0  # Conv1D weights are [in, out]
            shape[out_axis] -= rows
            if len(shape) > 1:
                shape[1 - out_axis] -= cols
            saved += p.numel() - math.prod(shape)
    return count_params(model) - saved


@dataclass(frozen=True)
class EprBasis:
    """The effective parameter reduction of a run: (P0 - P) / P0 on the 'total' basis, (P0 - P) / P0_prunable
    on the 'prunable' basis, with P0 / P0_prunable the counts before pruning. Every other EPR in the package
    (``epr``, the driver's rounds, the report) is computed here."""

    params_before: int
    prunable_before: int
    basis: str = "total"

    @property
    def denominator(self) -> int:
        return self.params_before if self.basis == "total" else self.prunable_before

    def total(self, params: int) -> float:
        return (self.params_before - params) / self.params_before

    def prunable(self, params: int) -> float:
        return (self.params_before - params) / self.prunable_before if self.prunable_before else 0.0

    def __call__(self, params: int) -> float:
        """EPR at ``params`` parameters on the configured basis."""
        return self.total(params) if self.basis == "total" else self.prunable(params)

    def params_at(self, target: float) -> float:
        """The (real-valued) parameter count whose EPR is exactly ``target``."""
        return self.params_before - target * self.denominator

    def budget(self, target: float) -> int:
        """Largest parameter count whose EPR is >= ``target``."""
        return self.params_before - math.ceil(target * self.denominator - 1e-9)


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
    p_after = prunable_params(model, groups)
    p_before = p_after + params_before - after
    basis = EprBasis(params_before, p_before)
    return EprResult(basis.total(after), basis.prunable(after), params_before, after, p_before, p_after)


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
