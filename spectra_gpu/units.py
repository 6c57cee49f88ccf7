"""Prunable unit groups: which weights belong to one neuron, channel, FFN neuron or attention head
(docs/algorithm.md section 6), found automatically or declared by hand.

A group is a set of N units that are removed together with everything attached to them:

| kind | producer rows (+ bias) | norm | consumer input slice | signals Z, A |
| --- | --- | --- | --- | --- |
| neuron | Linear | BatchNorm1d | Linear columns | BN (or Linear) out, act(Z) |
| channel | Conv2d filters | BatchNorm2d | Conv2d in-channels, or H*W flattened Linear columns | same, per position |
| ffn (BERT, GPT-2, OPT) | intermediate.dense, c_fc, fc1 | - | output.dense, c_proj, fc2 columns | out, act(Z) |
| ffn (gated: Llama, Phi-3) | gate_proj + up_proj (Phi-3: gate_up_proj halves) | - | down_proj columns | gate, down in |
| head | q/k/v rows of the head | - | out-projection columns | residual writes (capture.py) |
| stream | writers' output channels | LayerNorm/BatchNorm channels | readers' input channels | a write, the next read |

Every unit is a contiguous slice of the consumer's input (``cols_per_unit`` columns / channels): zeroing that
slice is what ``masked`` does and what physical removal must equal.

Discovery: transformer layers are matched against the family table in ``families.py`` (one entry per family:
Llama-like, Phi-3, GPT-2, OPT, BERT-like, DistilBERT, ViT; module paths to unit roles), by structure, so copies
of a listed layout under another name work too. A model whose ``config.model_type`` is listed is matched
against its own family only. A family part that is not covered (its ``missing``) is said once in a warning; a
model with nothing discoverable gets one error line naming the detected family and a ``declare_group`` example.
Plain MLPs/CNNs/ResNets are found on a ``torch.fx`` trace:
Linear|Conv2d -> (BatchNorm) -> activation -> (dropout | pooling | flatten) -> Linear|Conv2d, with every
intermediate value used once, so residual-stream channels (summed with a skip connection) are never units
and only ResNet block-internal channels (BasicBlock conv1, Bottleneck conv1/conv2) are found.

Residual-stream channels (``StreamGroup``, kind "stream": a ResNet stage's conv2/BN2 + shortcut channels, the
hidden size of BERT or Llama) are never discovered, since the stream is summed with a skip connection; a frontend
that knows the coupling (the Torch-Pruning adapter) declares them. Z = what a writer module adds to the stream,
A = the stream as the next reader module takes it in (after the add, the activation or the LayerNorm).

Grouped-query attention (llama-like families): ``gqa="query"`` makes each query head a unit; removals must take the same
number of heads from every KV group (HF attention needs uniform groups), see ``UnitGroup.balanced``.
``gqa="kv"`` makes each KV group (its k/v rows and all its query heads) one unit. With one query head per
KV group the two coincide and the group uses KV units.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .families import (
    FAMILIES,
    AttnRoles,
    Family,
    FfnRoles,
    LinearView,
    attr_at,
    base_of,
    coverage_line,
    declare_example,
    family_of,
    head_dim_of,
    is_conv1d,
    resolve,
)

KINDS = ("neuron", "channel", "ffn", "head")
GQA_MODES = ("query", "kv")

_ACT_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.SELU, nn.CELU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.PReLU,
)
_ACT_FUNCS = {F.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.elu, F.selu, F.celu, F.mish, F.hardswish,
              F.hardsigmoid, F.hardtanh, F.softplus, torch.relu, torch.tanh, torch.sigmoid, F.tanh, F.sigmoid}
_ACT_METHODS = {"relu", "tanh", "sigmoid"}
_PASS_MODULES: tuple[type[nn.Module], ...] = (
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.Identity, nn.MaxPool2d, nn.AvgPool2d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
)
_PASS_FUNCS = {F.dropout, F.dropout2d, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}


@dataclass(eq=False)
class UnitGroup:
    """N prunable units and the modules their weights live in (see the module docstring).

    ``producers`` are sliced by output rows (the first one's output is Z unless ``norm`` is set), ``norm``
    by features, ``consumer`` by input columns (``cols_per_unit`` per unit). Head groups also carry
    ``attn`` (the attention module, whose head counts surgery updates) and ``q, k, v``.
    ``act`` maps Z to A; when None, A is the consumer's input (SwiGLU: SiLU(gate) * up).
    """

    name: str
    kind: str
    producers: tuple[nn.Linear | nn.Conv2d, ...]
    consumer: nn.Linear | nn.Conv2d
    norm: nn.modules.batchnorm._BatchNorm | None = None
    act: Callable[[Tensor], Tensor] | None = None
    arch: str = "plain"  # "plain", or the name of the transformer family (families.py) the group was found in
    unit: str = "unit"  # "unit"; heads: "head" (MHA), "query" or "kv" (GQA)
    attn: Any = None  # a Hugging Face attention module (its head-count attributes are edited by surgery)
    q: nn.Linear | None = None
    k: nn.Linear | None = None
    v: nn.Linear | None = None
    paths: dict[str, str] = field(default_factory=dict)
    roles: Any = None  # the families.FfnRoles / AttnRoles the group was matched with (None: plain or declared)

    # ---- widths, recomputed from the modules on every call ----------------------------------------------
    @property
    def head_dim(self) -> int:
        if self.attn is None:
            raise ValueError(f"group {self.name!r}: head_dim is defined for head groups only, got kind {self.kind!r}")
        hd = head_dim_of(self.roles, self.attn)
        if hd is None:
            raise ValueError(f"group {self.name!r}: its attention module has no positive int "
                             f"{self.roles.head_dim_attr!r}")
        return hd

    @property
    def n_rep(self) -> int:
        """Query heads per KV group, from the q / k shapes (1 without grouped-query attention)."""
        if self.kind != "head":
            return 1
        assert self.q is not None and self.k is not None
        return int(self.q.out_features) // int(self.k.out_features)

    @property
    def size(self) -> int:
        """Current number of units."""
        if self.kind == "head":
            assert self.q is not None and self.k is not None
            rows = self.k.out_features if self.unit == "kv" else self.q.out_features
            return rows // self.head_dim
        return int(self.producers[0].weight.shape[0])

    @property
    def cols_per_unit(self) -> int:
        """Consumer input columns (Linear) or channels (Conv2d) per unit."""
        if self.kind == "head":
            return self.head_dim * (self.n_rep if self.unit == "kv" else 1)
        return int(self.consumer.weight.shape[1]) // self.size

    @property
    def kv_heads(self) -> int | None:
        """KV heads of a family with grouped-query attention (llama-like); None for other groups."""
        if self.kind != "head" or not getattr(self.roles, "gqa", False):
            return None
        assert self.k is not None
        return self.k.out_features // self.head_dim

    def modules(self) -> list[nn.Module]:
        """Every module this group's surgery edits (for prunable-parameter accounting); the real modules behind
        fused / Conv1D views (families.LinearView)."""
        mods = [base_of(m) for m in (*self.producers, self.consumer, self.norm, self.q, self.k, self.v)
                if m is not None]
        seen: dict[int, nn.Module] = {}
        for m in mods:
            seen.setdefault(id(m), m)
        return list(seen.values())

    # ---- per-unit weights -------------------------------------------------------------------------------
    def _q_rows(self, u: int) -> slice:
        hd = self.head_dim
        if self.unit == "kv":
            r = self.n_rep
            return slice(u * r * hd, (u + 1) * r * hd)
        return slice(u * hd, (u + 1) * hd)

    def _kv_index(self, u: int) -> int:
        return u if self.unit in ("kv", "head") else u // self.n_rep

    def in_weight(self) -> Tensor:
        """[N, fan_in]: each unit's incoming weights, flattened (conv filters; SwiGLU gate and up rows
        concatenated; heads: the head's q rows then its KV group's k and v rows). Biases excluded."""
        if self.kind == "head":
            assert self.q is not None and self.k is not None and self.v is not None
            hd = self.head_dim
            rows = []
            for u in range(self.size):
                g = self._kv_index(u)
                kv = slice(g * hd, (g + 1) * hd)
                rows.append(torch.cat([self.q.weight[self._q_rows(u)].flatten(), self.k.weight[kv].flatten(),
                                       self.v.weight[kv].flatten()]))
            return torch.stack(rows)
        return torch.cat([p.weight.reshape(p.weight.shape[0], -1) for p in self.producers], dim=1)

    def out_weight(self) -> Tensor:
        """[N, fan_out * cols_per_unit]: each unit's outgoing weights (its consumer columns; a conv consumer's
        [C_out, kh, kw] slice; a head's out-projection column block), flattened per unit."""
        w = self.consumer.weight
        n, c = self.size, self.cols_per_unit
        if isinstance(self.consumer, nn.Conv2d):  # [C_out, C_in, kh, kw]; one channel per unit
            return w.transpose(0, 1).reshape(n, -1)
        return w.reshape(w.shape[0], n, c).permute(1, 0, 2).reshape(n, -1)

    def unit_params(self) -> int:
        """Parameters removed with one unit at the current widths (docs/algorithm.md section 7)."""
        n = self.size
        if self.kind == "head":
            assert self.q is not None and self.k is not None and self.v is not None
            hd = self.head_dim
            d = self.q.in_features
            qb = int(self.q.bias is not None)
            if self.unit == "query":
                return hd * d + hd * qb + d * hd
            kvb = int(self.k.bias is not None)
            nq = self.n_rep  # "kv": the group's query heads; "head" (MHA): 1
            return nq * (hd * d + hd * qb) + 2 * (hd * d + hd * kvb) + nq * d * hd
        total = sum(p.weight.numel() // n + (1 if getattr(p, "bias", None) is not None else 0) for p in self.producers)
        if self.norm is not None and getattr(self.norm, "weight", None) is not None:
            total += 2
        return total + self.consumer.weight.numel() // n

    def balanced(self, scores: Tensor, n_remove: int) -> Tensor:
        """Indices of ``n_remove`` lowest-score units that surgery accepts: for GQA query-head groups, the
        same number from every KV group (n_remove is rounded down to a multiple of the KV-head count, each
        KV group dropping its lowest-scoring heads); otherwise simply the n_remove lowest. At least one unit
        (one query head per KV group) is always kept."""
        s = torch.as_tensor(scores, dtype=torch.float64).flatten().cpu()
        if s.numel() != self.size:
            raise ValueError(f"scores: expected {self.size} values for group {self.name!r}, got {s.numel()}")
        if isinstance(n_remove, bool) or not isinstance(n_remove, int) or n_remove < 0:
            raise ValueError(f"n_remove: expected a non-negative int, got {n_remove!r}")
        if self.unit != "query":
            return torch.sort(torch.argsort(s, stable=True)[: min(n_remove, self.size - 1)]).values
        kv, r = self.kv_heads, self.n_rep
        assert kv is not None
        per = min(n_remove // kv, r - 1)
        idx = [g * r + torch.argsort(s[g * r:(g + 1) * r], stable=True)[:per] for g in range(kv)]
        return torch.sort(torch.cat(idx)).values

    def __repr__(self) -> str:
        return f"UnitGroup(name={self.name!r}, kind={self.kind!r}, size={self.size}, unit={self.unit!r})"


# ---- discovery ----------------------------------------------------------------------------------------------
def _ffn_group(path: str, m: nn.Module, fam: Family, roles: FfnRoles) -> UnitGroup | None:
    """The FFN group of ``roles`` at module ``m`` (``path``), or None when ``m`` does not have that layout."""
    prods = [resolve(m, p) for p in roles.producers]
    cons = resolve(m, roles.consumer)
    act = attr_at(m, roles.act) if roles.act is not None else None
    if cons is None or any(p is None for p in prods) or (roles.act is not None and not callable(act)):
        return None
    producers = tuple(cast(nn.Linear, p) for p in prods)
    n = producers[0].out_features
    if any(p.out_features != n for p in producers) or cast(nn.Linear, cons).in_features != n:
        return None
    layer = path if roles.on_layer else _parent(path)
    p = f"{path}." if path else ""
    return UnitGroup(f"{layer}.ffn" if layer else "ffn", "ffn", producers, cast(nn.Linear, cons), act=act,
                     arch=fam.name, roles=roles,
                     paths={"producer": p + roles.producers[0].partition("#")[0], "consumer": p + roles.consumer})


def _attn_group(path: str, m: nn.Module, fam: Family, roles: AttnRoles, gqa: str) -> UnitGroup | None:
    """The head group of ``roles`` at attention module ``m`` (``path``), or None when ``m`` does not have that
    layout (or its shapes do not split into whole heads)."""
    q, k, v, o = (resolve(m, r) for r in (roles.q, roles.k, roles.v, roles.o))
    core = attr_at(m, roles.core)
    if q is None or k is None or v is None or o is None or not isinstance(core, nn.Module):
        return None
    if roles.refuse_attr and getattr(core, roles.refuse_attr, False):
        return None
    hd = head_dim_of(roles, core)
    nq, nk = cast(nn.Linear, q).out_features, cast(nn.Linear, k).out_features
    if hd is None or nq % hd or nk % hd or nk == 0 or nq % nk or cast(nn.Linear, v).out_features != nk \
            or cast(nn.Linear, o).in_features != nq or (nq != nk and not roles.gqa):
        return None
    n_rep = nq // nk
    unit = ("kv" if (gqa == "kv" or n_rep == 1) else "query") if roles.gqa else "head"
    layer = _parent(path)
    p = f"{path}." if path else ""
    cpath = f"{p}{roles.core}" if roles.core else path
    return UnitGroup(f"{layer}.attn" if layer else "attn", "head", (), cast(nn.Linear, o), arch=fam.name, unit=unit,
                     attn=core, q=cast(nn.Linear, q), k=cast(nn.Linear, k), v=cast(nn.Linear, v), roles=roles,
                     paths={"attn": cpath, "consumer": p + roles.o.partition("#")[0]})


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def _structured_groups(model: nn.Module, gqa: str) -> tuple[list[UnitGroup], list[Family]]:
    """Groups of the family table's layouts (families.py), in module order, and the families that matched.
    A model whose config.model_type is listed is matched against its own family only; others against all."""
    own = family_of(model)
    fams = (own,) if own is not None else FAMILIES
    out: list[UnitGroup] = []
    seen: list[Family] = []
    for path, m in model.named_modules():
        for fam in fams:
            g = next((g for r in fam.ffn if (g := _ffn_group(path, m, fam, r)) is not None), None)
            g = g or next((g for r in fam.attn if (g := _attn_group(path, m, fam, r, gqa)) is not None), None)
            if g is not None:
                out.append(g)
                if fam not in seen:
                    seen.append(fam)
                break
    return out, seen


def _const(a: Any) -> bool:
    return not isinstance(a, torch.fx.Node) and not (isinstance(a, (tuple, list)) and any(
        isinstance(x, torch.fx.Node) for x in a))


def _act_of(node: torch.fx.Node, mods: dict[str, nn.Module]) -> Callable[[Tensor], Tensor] | None:
    """The node's activation as a callable Z -> A, or None if the node is not an elementwise activation."""
    rest, kw = node.args[1:], dict(node.kwargs)
    if not all(_const(a) for a in (*rest, *kw.values())):
        return None
    kw.pop("inplace", None)
    if node.op == "call_module" and isinstance(mods[str(node.target)], _ACT_MODULES):
        mod = mods[str(node.target)]
        # a per-channel PReLU carries one parameter per unit, which surgery does not slice
        return None if isinstance(mod, nn.PReLU) and mod.weight.numel() != 1 else mod
    if node.op == "call_function" and node.target in _ACT_FUNCS:
        fn = node.target
        return lambda z: fn(z, *rest, **kw)
    if node.op == "call_method" and node.target in _ACT_METHODS:
        name = str(node.target)
        return lambda z: getattr(z, name)(*rest, **kw)
    return None


def _flatten_op(node: torch.fx.Node, mods: dict[str, nn.Module]) -> bool:
    """x.flatten(1), torch.flatten(x, 1), nn.Flatten(), x.view(B, -1), x.reshape(B, -1)."""
    if node.op == "call_module":
        m = mods[str(node.target)]
        return isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    from_dim1 = isinstance(start, int) and start == 1
    if node.op == "call_function" and node.target is torch.flatten:
        return from_dim1 and len(node.args) <= 2
    if node.op == "call_method" and node.target == "flatten":
        return from_dim1 and len(node.args) <= 2
    if node.op == "call_method" and node.target in ("view", "reshape"):
        return len(node.args) == 3 and isinstance(node.args[2], int) and node.args[2] == -1
    return False


def _passthrough(node: torch.fx.Node, mods: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(mods[str(node.target)], _PASS_MODULES)
    if node.op == "call_function":
        return node.target in _PASS_FUNCS
    return node.op == "call_method" and node.target == "contiguous"


def _fx_groups(model: nn.Module) -> tuple[list[UnitGroup], str | None]:
    """Groups found on a torch.fx trace, and the trace error (if the model does not trace)."""
    try:
        graph = torch.fx.Tracer().trace(model)
    except Exception as e:  # any tracing failure just means "no fx discovery" for this model
        return [], f"{type(e).__name__}: {e}"
    mods = dict(model.named_modules())
    calls = Counter(str(n.target) for n in graph.nodes if n.op == "call_module")

    def module(node: torch.fx.Node) -> nn.Module | None:
        return mods[str(node.target)] if node.op == "call_module" and calls[str(node.target)] == 1 else None

    def single_user(node: torch.fx.Node) -> torch.fx.Node | None:
        if len(node.users) != 1:
            return None
        nxt = next(iter(node.users))
        return nxt if nxt.args and nxt.args[0] is node else None

    out: list[UnitGroup] = []
    for node in graph.nodes:
        prod = module(node)
        if not (isinstance(prod, nn.Linear) or (isinstance(prod, nn.Conv2d) and prod.groups == 1)):
            continue
        is_lin = isinstance(prod, nn.Linear)
        is_conv = not is_lin
        n_units = prod.weight.shape[0]
        cur = node
        norm: nn.modules.batchnorm._BatchNorm | None = None
        nxt = single_user(cur)
        bn_type = nn.BatchNorm1d if is_lin else nn.BatchNorm2d
        bn = module(nxt) if nxt is not None else None
        if nxt is not None and isinstance(bn, bn_type):
            cur, norm = nxt, bn
            nxt = single_user(cur)
        if nxt is None or (act := _act_of(nxt, mods)) is None:
            continue
        cur = nxt
        flattened = False
        consumer: nn.Linear | nn.Conv2d | None = None
        while (nxt := single_user(cur)) is not None:
            cons = module(nxt)
            if isinstance(cons, nn.Linear) and (
                    (not flattened and is_lin and cons.in_features == n_units)
                    or (flattened and cons.in_features % n_units == 0)):
                consumer = cons
                break
            if isinstance(cons, nn.Conv2d) and is_conv and not flattened and cons.groups == 1 \
                    and cons.in_channels == n_units:
                consumer = cons
                break
            if is_conv and not flattened and _flatten_op(nxt, mods):
                flattened = True
            elif not _passthrough(nxt, mods):
                break
            cur = nxt
        if consumer is None or nxt is None:
            continue
        cpath = str(nxt.target)
        kind = "neuron" if is_lin else "channel"
        out.append(UnitGroup(str(node.target), kind, (prod,), consumer, norm=norm,
                             act=act, paths={"producer": str(node.target), "consumer": cpath}))
    return out, None


def discover_groups(model: nn.Module, kinds: Iterable[str] | str | None = None, *,
                    gqa: str = "query") -> list[UnitGroup]:
    """Every prunable unit group of ``model`` found automatically (module docstring), in module order,
    optionally restricted to ``kinds`` (subset of "neuron", "channel", "ffn", "head")."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    want = _check_kinds(kinds)
    if gqa not in GQA_MODES:
        raise ValueError(f"gqa: expected one of {GQA_MODES}, got {gqa!r}")
    groups, fams = _structured_groups(model, gqa)
    taken = {id(base_of(m)) for g in groups for m in g.modules()}
    fx, err = _fx_groups(model)
    groups += [g for g in fx if id(g.producers[0]) not in taken]
    if not groups:
        hint = f"; torch.fx could not trace it ({err.splitlines()[0][:160]})" if err else ""
        raise ValueError(
            f"discover_groups: found no prunable unit groups in {type(model).__name__}: {coverage_line(model)}"
            f"{hint}. Auto-discovery knows Linear->(BatchNorm1d)->activation->Linear, "
            "Conv2d->(BatchNorm2d)->activation->Conv2d (ResNet blocks included) and the transformer families "
            f"{', '.join(f.name for f in FAMILIES)}. Declare groups by hand, e.g. {declare_example(model)}")
    if "head" in want:
        for fam in fams:
            if fam.missing and not fam.attn:
                _warn_once(f"discover_groups: {type(model).__name__}: {coverage_line(model)}; its other units are "
                           f"pruned")
    return [g for g in groups if g.kind in want]


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    """A UserWarning once per process per message (discovery runs many times in one run)."""
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, UserWarning, stacklevel=3)


def _check_kinds(kinds: Iterable[str] | str | None) -> tuple[str, ...]:
    if kinds is None:
        return KINDS
    ks = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    bad = [k for k in ks if k not in KINDS]
    if bad or not ks:
        raise ValueError(f"kinds: expected a non-empty subset of {KINDS}, got {kinds!r}")
    return ks


def _resolve(model: nn.Module, ref: object, what: str) -> tuple[nn.Module, str]:
    if isinstance(ref, nn.Module):
        for p, m in model.named_modules():
            if m is ref:
                return m, p
        raise ValueError(f"{what}: the module given is not a submodule of {type(model).__name__}")
    if not isinstance(ref, str):
        raise TypeError(f"{what}: expected a module path (str) or an nn.Module, got {type(ref).__name__}")
    try:
        return model.get_submodule(ref), ref
    except AttributeError:
        names = [p for p, _ in model.named_modules() if p]
        close = [p for p in names if ref.split(".")[-1] in p][:8] or names[:8]
        raise ValueError(f"{what}: {type(model).__name__} has no submodule {ref!r}; some that exist: {close}") from None


def declare_group(model: nn.Module, kind: str, producer: str | nn.Module | Sequence[str | nn.Module],
                  consumer: str | nn.Module, *, norm: str | nn.Module | None = None,
                  act: Callable[[Tensor], Tensor] | None = None, name: str | None = None) -> UnitGroup:
    """A group the discovery does not find: ``producer`` (a Linear/Conv2d path or module; a list for
    co-producers sliced together, the first giving Z) feeds ``norm`` (optional BatchNorm), then ``act``,
    then ``consumer`` (Linear/Conv2d) whose input columns/channels are the units' outputs.

    act=None means A is read at the consumer's input (gated units such as SwiGLU, or when the activation is
    not elementwise on Z). A transformers Conv1D (GPT-2 style, weight [in, out]) is accepted as producer or
    consumer (wrapped in a families.LinearView). Heads are found by discovery only (the attention layouts of
    families.py).
    """
    if kind not in ("neuron", "channel", "ffn"):
        raise ValueError(f"kind: expected 'neuron', 'channel' or 'ffn' for a declared group (heads are found by "
                         f"discover_groups on the attention layouts of the family table), got {kind!r}")
    refs = list(producer) if isinstance(producer, (list, tuple)) else [producer]
    if not refs:
        raise ValueError("producer: expected at least one module")
    prods = [_resolve(model, r, "producer") for r in refs]
    cons, cpath = _resolve(model, consumer, "consumer")
    nrm = _resolve(model, norm, "norm") if norm is not None else None
    prods = [(LinearView(m) if is_conv1d(m) else m, p) for m, p in prods]  # GPT-2 Conv1D: a Linear-shaped view
    if is_conv1d(cons):
        cons = LinearView(cons)
    producers: list[nn.Linear | nn.Conv2d] = []
    for m, p in prods:
        if not isinstance(m, (nn.Linear, nn.Conv2d)) or (isinstance(m, nn.Conv2d) and m.groups != 1):
            raise TypeError(f"producer {p!r}: expected nn.Linear or nn.Conv2d (groups=1), got {type(m).__name__}")
        producers.append(m)
    if not isinstance(cons, (nn.Linear, nn.Conv2d)) or (isinstance(cons, nn.Conv2d) and cons.groups != 1):
        raise TypeError(f"consumer {cpath!r}: expected nn.Linear or nn.Conv2d (groups=1), got {type(cons).__name__}")
    n = producers[0].weight.shape[0]
    if any(m.weight.shape[0] != n for m in producers):
        raise ValueError(f"producer: co-producers must have the same output width, got "
                         f"{[m.weight.shape[0] for m in producers]}")
    fan = cons.weight.shape[1]
    if fan % n != 0 or (isinstance(cons, nn.Conv2d) and fan != n):
        raise ValueError(f"consumer {cpath!r}: expected {n} input channels/columns (or a multiple for a flattened "
                         f"conv output), got {fan}")
    bn: nn.modules.batchnorm._BatchNorm | None = None
    if nrm is not None:
        nm, npath = nrm
        if not isinstance(nm, nn.modules.batchnorm._BatchNorm) or nm.num_features != n:
            raise ValueError(f"norm {npath!r}: expected a BatchNorm over {n} features, got {nm}")
        bn = nm
    if act is not None and not callable(act):
        raise TypeError(f"act: expected a callable Z -> A or None, got {type(act).__name__}")
    paths = {"producer": prods[0][1], "consumer": cpath}
    return UnitGroup(name or prods[0][1], kind, tuple(producers), cons, norm=bn, act=act, paths=paths)


# ---- residual-stream channels -------------------------------------------------------------------------------
STREAM_KIND = "stream"


def channel_width(m: nn.Module, side: str) -> int | None:
    """A module's channel count on the written ("out") or read ("in") side, or None if it has none (PReLU's
    per-channel slope is an activation parameter, not a channel of a stream)."""
    if isinstance(m, nn.PReLU):
        return None
    if side == "in":
        if isinstance(m, nn.Linear):
            return int(m.in_features)
        if isinstance(m, nn.Conv2d) and m.groups == 1:
            return int(m.in_channels)
        return None
    if isinstance(m, nn.Linear):
        return int(m.out_features)
    if isinstance(m, nn.Conv2d) and m.groups == 1:
        return int(m.out_channels)
    if isinstance(m, nn.Embedding):
        return int(m.embedding_dim)
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return int(m.num_features)
    w = getattr(m, "weight", None)  # LayerNorm, RMSNorm-like modules: one weight per channel
    return int(w.numel()) if isinstance(w, Tensor) and w.dim() == 1 else None


@dataclass(eq=False)
class StreamGroup:
    """N channels of a residual stream or hidden size: every module that writes the stream and every module
    that reads it, pruned together (a ResNet stage's conv2/BN2 + shortcut channels, BERT's or Llama's hidden
    size). ``discover_groups`` never returns these (the stream is summed with a skip connection); a pruning
    frontend that knows the coupling (Torch-Pruning's dependency groups) declares them.

    Signals (captured by ``capture.capture_streams``): each unit is one channel of the stream.
    Z = what a writer adds to the stream (the output of a writer module: a conv or its BatchNorm before the
    add, an attention or FFN output projection, an embedding); A = the stream as the next reader takes it in
    (the input of the next reader module: after the add, the activation or the LayerNorm). Every write is
    paired with the first read that follows it in the forward pass, sample for sample (the same images and
    spatial positions, the same non-padding tokens; a read after global pooling pairs with the spatial mean
    of the write). A writer fed by another writer's output (conv -> BN) replaces that write; a write that is
    the read itself (a LayerNorm's output) is no pair; writes whose samples do not line up with the next read
    (a max-pool in between) are left out. If no pair lines up over the whole calibration, Z = A = the reads
    (or, with no reader, the writes).

    writers: modules whose output channels are the units (Linear, Conv2d with groups=1, Embedding, BatchNorm,
    LayerNorm-like); readers: Linear / Conv2d (groups=1) whose input channels, or contiguous blocks of input
    columns of a flattened conv output, are the units.
    """

    name: str
    writers: tuple[nn.Module, ...]
    readers: tuple[nn.Module, ...]
    paths: dict[str, str] = field(default_factory=dict)
    kind: str = STREAM_KIND

    def __post_init__(self) -> None:
        if not self.writers and not self.readers:
            raise ValueError(f"stream {self.name!r}: expected at least one writer or reader module, got none")
        n = self.size
        for m in self.writers:
            w = channel_width(m, "out")
            if w != n:
                raise ValueError(f"stream {self.name!r}: writer {type(m).__name__} expected {n} output channels, "
                                 f"got {w}")
        for m in self.readers:
            w = channel_width(m, "in")
            if w is None or w % n or (isinstance(m, nn.Conv2d) and w != n):
                raise ValueError(f"stream {self.name!r}: reader {type(m).__name__} expected {n} input channels "
                                 f"(or a multiple for a flattened conv output), got {w}")

    @property
    def size(self) -> int:
        """Current number of channels."""
        if self.writers:
            w = channel_width(self.writers[0], "out")
            if w is None:
                raise ValueError(f"stream {self.name!r}: writer {type(self.writers[0]).__name__} has no channel "
                                 "width (expected Linear, Conv2d, Embedding or a norm with a weight vector)")
            return w
        w = channel_width(self.readers[0], "in")
        if w is None:
            raise ValueError(f"stream {self.name!r}: reader {type(self.readers[0]).__name__} has no input width "
                             "(expected Linear or Conv2d)")
        return w

    def in_weight(self) -> Tensor:
        """[N, fan_in]: every writer's weights per channel, flattened and concatenated (Linear rows, conv
        filters, embedding columns, norm scale and shift; nothing from a norm without affine parameters). Biases
        excluded; zeros [N, 0] with no writer."""
        n = self.size
        parts = [torch.zeros(n, 0)]
        for m in self.writers:
            weight = getattr(m, "weight", None)
            if not isinstance(weight, Tensor):  # BatchNorm(affine=False): no weights
                continue
            w = weight.detach()
            if isinstance(m, nn.Embedding):
                parts.append(w.T)
            elif isinstance(m, (nn.Linear, nn.Conv2d)):
                parts.append(w.reshape(n, -1))
            else:
                parts.append(w.reshape(n, 1))
                b = getattr(m, "bias", None)
                if isinstance(b, Tensor):
                    parts.append(b.detach().reshape(n, 1))
        dev = parts[-1].device
        return torch.cat([p.to(dev, torch.float32) for p in parts], dim=1)

    def out_weight(self) -> Tensor:
        """[N, fan_out]: every reader's input columns per channel (a conv reader's [C_out, kh, kw] slice, a
        flattened reader's block of columns), flattened and concatenated; zeros [N, 0] with no reader."""
        n = self.size
        parts = [torch.zeros(n, 0)]
        for m in self.readers:
            assert isinstance(m, (nn.Linear, nn.Conv2d))  # checked by __post_init__ (channel_width "in")
            w = m.weight.detach()
            if isinstance(m, nn.Conv2d):
                parts.append(w.transpose(0, 1).reshape(n, -1))
            else:
                parts.append(w.reshape(w.shape[0], n, -1).permute(1, 0, 2).reshape(n, -1))
        dev = parts[-1].device
        return torch.cat([p.to(dev, torch.float32) for p in parts], dim=1)

    def modules(self) -> list[nn.Module]:
        """Every module whose channels this group covers."""
        seen: dict[int, nn.Module] = {}
        for m in (*self.writers, *self.readers):
            seen.setdefault(id(m), m)
        return list(seen.values())

    def __repr__(self) -> str:
        return (f"StreamGroup(name={self.name!r}, size={self.size}, writers={len(self.writers)}, "
                f"readers={len(self.readers)})")


def group_by_name(groups: Sequence[UnitGroup]) -> dict[str, UnitGroup]:
    out: dict[str, UnitGroup] = {}
    for g in groups:
        if g.name in out:
            raise ValueError(f"groups: expected unique names, got {g.name!r} twice")
        out[g.name] = g
    return out


__all__ = ["GQA_MODES", "KINDS", "STREAM_KIND", "StreamGroup", "UnitGroup", "channel_width", "declare_group",
           "discover_groups", "group_by_name"]
