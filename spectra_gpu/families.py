"""The transformer families unit discovery, surgery and saving know, described once: module paths to unit roles.

Each family names, relative to the module that holds them, the FFN producer(s), activation and consumer, and
the attention q / k / v / out projections (a fused projection is split into row parts: equal ones,
``"c_attn#2/3"`` = the third third of ``c_attn``'s output rows; or a lead part and equal others,
``"qkv_proj#1/3:o_proj"`` = the second of three parts of ``qkv_proj``, the first as wide as ``o_proj``'s input,
the other two sharing the remaining rows: Phi-3's q | k | v with fewer KV heads), the attention attributes that
hold head counts (written back by surgery and by ``load_pruned``; ``"config.<field>"``: a field of the module's
config, which a pruned module then owns, see ``LayerConfig``), and the config fields that describe the widths
(used by ``io.save_pruned`` to write a standard ``config.json``). A model whose ``config.model_type`` is listed
(the types tested) is matched against its own family's layouts only; any other model against every layout, by
structure, so a copy of a listed layout under another name (an ELECTRA, a renamed Llama) is found too.

| family | model types | FFN producers -> consumer | attention q, k, v -> out | head-count attributes |
| --- | --- | --- | --- | --- |
| llama | Llama, Mistral, Qwen2/3, Gemma 1-3 | gate_proj + up_proj -> down_proj | q/k/v_proj -> o_proj (GQA) | n_rep |
| phi3 | Phi-3 | gate_up_proj (halves) -> down_proj | qkv_proj (q, k, v) -> o_proj (GQA) | num_key_value_*, config.* |
| gpt2 | GPT-2 | c_fc -> c_proj (Conv1D) | c_attn (fused thirds) -> c_proj | num_heads, split_size |
| opt | OPT | fc1 -> fc2 (on the layer) | q/k/v_proj -> out_proj | num_heads |
| bert | BERT, RoBERTa | intermediate.dense -> output.dense | self.query/key/value -> output.dense | heads |
| distilbert | DistilBERT | ffn.lin1 -> ffn.lin2 | q_lin, k_lin, v_lin -> out_lin | n_heads |
| vit | ViT | mlp.fc1 -> mlp.fc2 | q/k/v_proj -> o_proj | num_attention_heads |

Weights of a GPT-2 ``Conv1D`` are stored transposed ([in, out]); a fused projection holds several roles' rows.
Both are presented to the rest of the package as ``LinearView`` objects: an ``nn.Linear``-shaped window on some
output rows of a real module (``weight`` [rows, in] is a view of the real tensor, forward hooks see only those
output columns, pre-hooks see the real module's input). Views are not submodules of the model; the module they
look into is ``view.base``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn


def is_conv1d(m: Any) -> bool:
    """A transformers ``Conv1D`` (GPT-2): a Linear whose weight is stored [in, out], width in ``nf``."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and isinstance(getattr(m, "weight", None), Tensor) \
        and m.weight.dim() == 2


def out_width(m: nn.Module) -> int:
    """Output features of a Linear or Conv1D."""
    return int(m.weight.shape[1] if is_conv1d(m) else m.weight.shape[0])  # type: ignore[index]


def in_width(m: nn.Module) -> int:
    """Input features of a Linear or Conv1D."""
    return int(m.weight.shape[0] if is_conv1d(m) else m.weight.shape[1])  # type: ignore[index]


class LinearView(nn.Linear):
    """An ``nn.Linear``-shaped view of output rows ``part`` of ``parts`` parts of ``base`` (an nn.Linear or a
    transformers Conv1D); parts=1 is the whole module. The parts are equal, or, with ``lead`` (a Linear / Conv1D),
    part 0 is as wide as ``lead``'s input and parts 1.. share the remaining rows equally (Phi-3 ``qkv_proj``: the
    queries are as wide as ``o_proj``'s input, keys and values split the rest). Widths follow the modules' current
    shapes. ``weight`` is [rows, in] (a view: in-place writes reach the base), ``bias`` the rows' bias; forward
    hooks registered here see only this part's output columns, forward pre-hooks the base's input. Calling the
    view computes this part's output. Not a submodule (neither is ``lead``)."""

    base: Any  # the real module (kept in __dict__: not a submodule)
    part: int
    parts: int
    lead: Any  # the module whose input width is part 0's width, or None (equal parts)

    def __init__(self, base: nn.Module, part: int = 0, parts: int = 1, lead: nn.Module | None = None):
        nn.Module.__init__(self)
        for what, m in (("base", base), ("lead", lead)):
            if (m is not None or what == "base") and not (isinstance(m, nn.Linear) or is_conv1d(m)):
                raise TypeError(f"LinearView: expected an nn.Linear or Conv1D {what}, got {type(m).__name__}")
        if not 0 <= part < parts:
            raise ValueError(f"LinearView: expected part in [0, {parts}), got {part}")
        self.__dict__.update(base=base, part=part, parts=parts, lead=lead)
        self.widths()  # the shapes split as described (else ValueError)

    def widths(self) -> tuple[int, ...]:
        """Every part's row count, from the base's (and lead's) current shapes."""
        total, n = out_width(self.base), self.parts
        if self.lead is None:
            if total % n:
                raise ValueError(f"LinearView: expected a width divisible by {n}, got {total}")
            return (total // n,) * n
        first = in_width(self.lead)
        rest = total - first
        if n < 2 or rest < 0 or rest % (n - 1):
            raise ValueError(f"LinearView: expected {total} rows = the lead's input width {first} + {n - 1} equal "
                             f"parts, got {rest} rows left for them")
        return (first, *(rest // (n - 1),) * (n - 1))

    @property
    def rows(self) -> slice:
        """This part's output rows of the base (from the current widths)."""
        w = self.widths()
        start = sum(w[: self.part])
        return slice(start, start + w[self.part])

    @property
    def weight(self) -> Tensor:
        w = self.base.weight.T if is_conv1d(self.base) else self.base.weight
        return w[self.rows]

    @weight.setter
    def weight(self, _value: Tensor) -> None:
        raise AttributeError("LinearView.weight is a view; slice its base with spectra_gpu.surgery")

    @property  # type: ignore[override]
    def bias(self) -> Tensor | None:
        b = self.base.bias
        return None if b is None else b[self.rows]

    @bias.setter
    def bias(self, _value: Tensor | None) -> None:
        raise AttributeError("LinearView.bias is a view; slice its base with spectra_gpu.surgery")

    @property
    def in_features(self) -> int:
        return in_width(self.base)

    @in_features.setter
    def in_features(self, _value: int) -> None:
        raise AttributeError("LinearView.in_features follows its base")

    @property
    def out_features(self) -> int:
        return self.widths()[self.part]

    @out_features.setter
    def out_features(self, _value: int) -> None:
        raise AttributeError("LinearView.out_features follows its base")

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.weight, self.bias)

    def register_forward_hook(self, hook: Callable[..., Any], *, prepend: bool = False, with_kwargs: bool = False,
                              always_call: bool = False) -> Any:
        rows = self.rows

        def sliced(_m: nn.Module, *rest: Any) -> Any:
            *front, out = rest
            return hook(self, *front, out[..., rows])

        return self.base.register_forward_hook(sliced, prepend=prepend, with_kwargs=with_kwargs,
                                               always_call=always_call)

    def register_forward_pre_hook(self, hook: Callable[..., Any], *, prepend: bool = False,
                                  with_kwargs: bool = False) -> Any:
        return self.base.register_forward_pre_hook(lambda _m, *rest: hook(self, *rest), prepend=prepend,
                                                   with_kwargs=with_kwargs)

    def extra_repr(self) -> str:
        return f"{type(self.base).__name__} rows {self.rows.start}:{self.rows.stop}, in_features={self.in_features}"


def repeated_blocks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """(path, list) of every ``nn.ModuleList`` in ``model`` of at least two modules of one class (a transformer's
    layers, an MLP's hidden layers), in ``named_modules`` order: what layer-sequential capture walks and LoRA
    adapts."""
    return [(p, m) for p, m in model.named_modules()
            if isinstance(m, nn.ModuleList) and len(m) >= 2 and len({type(b) for b in m}) == 1]


def base_of(m: nn.Module) -> nn.Module:
    """The real module behind a LinearView (else ``m``)."""
    return m.base if isinstance(m, LinearView) else m


@dataclass(frozen=True)
class FfnRoles:
    """Paths, relative to the matched module, of an FFN's producers (first = Z; ``"name#i/n"`` = part i of n
    equal row parts of a fused projection), its consumer and its activation module (None: A is read at the
    consumer input, as for gated FFNs). ``on_layer``: the matched module is the layer (BERT, OPT), else the
    layer's MLP; the group is named "<layer>.ffn" either way. ``width_attrs``: attributes of the consumer's
    parent that hold the width (set after surgery when present)."""

    producers: tuple[str, ...]
    consumer: str
    act: str | None
    width_attrs: tuple[str, ...] = ()
    on_layer: bool = False  # the matched module is the transformer layer itself (not its MLP)


@dataclass(frozen=True)
class AttnRoles:
    """Paths, relative to the matched module, of q, k, v (fused parts as in FfnRoles, or ``"name#i/n:lead"``:
    part 0 as wide as ``lead``'s input, the others equal) and the out-projection; ``core``: the module holding
    ``head_dim_attr`` and the head-count attributes (``count_attrs``: attribute -> "heads" | "kv_heads" |
    "groups" | "width" (= heads * head_dim), written when present; a dotted ``"config.field"`` is a field of an
    object the module shares with other layers, so a module whose count changes gets its own ``LayerConfig``
    view of it first). ``gqa``: whether k/v may have fewer heads than q. ``refuse_attr``: an attribute that,
    when truthy, means the layout differs (GPT-2 cross-attention)."""

    q: str
    k: str
    v: str
    o: str
    core: str = ""
    head_dim_attr: str = "head_dim"
    count_attrs: tuple[tuple[str, str], ...] = ()
    gqa: bool = False
    refuse_attr: str = ""


@dataclass(frozen=True)
class ConfigFields:
    """Config fields describing the widths (``None``: the config cannot state it; head_dim None = derived as
    hidden_size / num_attention_heads)."""

    ffn: str | None = "intermediate_size"
    heads: str | None = "num_attention_heads"
    kv_heads: str | None = None
    head_dim: str | None = None


@dataclass(frozen=True)
class Family:
    """One transformer family (module docstring). ``missing``: the one line saying what is not covered."""

    name: str
    model_types: tuple[str, ...]
    ffn: tuple[FfnRoles, ...]
    attn: tuple[AttnRoles, ...]
    config: ConfigFields = field(default_factory=ConfigFields)
    missing: str = ""


# Phi3Attention.forward reads the query width from self.config.num_attention_heads (shared by every layer),
# the key/value widths from self.num_key_value_heads, num_key_value_groups for repeat_kv / GQA, and head_dim.
_PHI3_COUNTS = (("num_key_value_groups", "groups"), ("num_key_value_heads", "kv_heads"),
                ("config.num_attention_heads", "heads"), ("config.num_key_value_heads", "kv_heads"))
_LLAMA_COUNTS = (("num_key_value_groups", "groups"), ("num_heads", "heads"), ("num_key_value_heads", "kv_heads"),
                 ("num_attention_heads", "heads"))

FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text"),
           ffn=(FfnRoles(("gate_proj", "up_proj"), "down_proj", None, ("intermediate_size",)),),
           attn=(AttnRoles("q_proj", "k_proj", "v_proj", "o_proj", count_attrs=_LLAMA_COUNTS, gqa=True),),
           config=ConfigFields("intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim")),
    Family("phi3", ("phi3",),
           ffn=(FfnRoles(("gate_up_proj#0/2", "gate_up_proj#1/2"), "down_proj", None),),
           attn=(AttnRoles("qkv_proj#0/3:o_proj", "qkv_proj#1/3:o_proj", "qkv_proj#2/3:o_proj", "o_proj",
                           count_attrs=_PHI3_COUNTS, gqa=True),),
           config=ConfigFields("intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim")),
    Family("gpt2", ("gpt2",),
           ffn=(FfnRoles(("c_fc",), "c_proj", "act"),),
           attn=(AttnRoles("c_attn#0/3", "c_attn#1/3", "c_attn#2/3", "c_proj",
                           count_attrs=(("num_heads", "heads"), ("split_size", "width")),
                           refuse_attr="is_cross_attention"),),
           config=ConfigFields("n_inner", "num_attention_heads")),
    Family("opt", ("opt",),
           ffn=(FfnRoles(("fc1",), "fc2", "activation_fn", on_layer=True),),
           attn=(AttnRoles("q_proj", "k_proj", "v_proj", "out_proj", count_attrs=(("num_heads", "heads"),)),),
           config=ConfigFields("ffn_dim", "num_attention_heads")),
    Family("bert", ("bert", "roberta", "xlm-roberta"),
           ffn=(FfnRoles(("intermediate.dense",), "output.dense", "intermediate.intermediate_act_fn", on_layer=True),),
           attn=(AttnRoles("self.query", "self.key", "self.value", "output.dense", core="self",
                           head_dim_attr="attention_head_size",
                           count_attrs=(("num_attention_heads", "heads"), ("all_head_size", "width"))),),
           config=ConfigFields("intermediate_size", "num_attention_heads")),
    Family("distilbert", ("distilbert",),
           ffn=(FfnRoles(("lin1",), "lin2", "activation"),),
           attn=(AttnRoles("q_lin", "k_lin", "v_lin", "out_lin", head_dim_attr="attention_head_size",
                           count_attrs=(("n_heads", "heads"),)),),
           config=ConfigFields("hidden_dim", "num_attention_heads")),
    Family("vit", ("vit",),
           ffn=(FfnRoles(("fc1",), "fc2", "activation_fn"),),
           attn=(AttnRoles("q_proj", "k_proj", "v_proj", "o_proj", count_attrs=(("num_attention_heads", "heads"),)),),
           config=ConfigFields("intermediate_size", "num_attention_heads", None, "head_dim")),
)

_BY_NAME = {f.name: f for f in FAMILIES}


def family(name: str) -> Family:
    """The family called ``name`` (a UnitGroup's ``arch``)."""
    if name not in _BY_NAME:
        raise ValueError(f"family: expected one of {sorted(_BY_NAME)}, got {name!r}")
    return _BY_NAME[name]


def model_type(model: nn.Module) -> str | None:
    """``config.model_type`` of a Hugging Face model (its text config's for multimodal ones), else None."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    mt = getattr(cfg, "model_type", None)
    return str(mt) if isinstance(mt, str) and mt else None


def family_of(model: nn.Module) -> Family | None:
    """The family whose model types include the model's ``config.model_type`` (None when unlisted)."""
    mt = model_type(model)
    text = getattr(getattr(model, "config", None), "get_text_config", None)
    mts = {mt}
    if callable(text):
        with contextlib.suppress(Exception):  # a config without a text part
            mts.add(getattr(text(), "model_type", None))
    for f in FAMILIES:
        if any(t in f.model_types for t in mts if t):
            return f
    return None


def _linear_at(root: nn.Module, name: str) -> Any:
    m: Any = root
    for a in name.split("."):
        m = getattr(m, a, None) if isinstance(m, nn.Module) else None
    return m if isinstance(m, nn.Linear) or is_conv1d(m) else None


def resolve(root: nn.Module, path: str) -> nn.Module | None:
    """The module at ``path`` under ``root`` (``"name#i/n"``: a LinearView of part i of n equal parts;
    ``"name#i/n:lead"``: of n parts, part 0 as wide as the input of ``lead``, also under ``root``), or None when
    a module is absent or not a Linear / Conv1D, or its rows do not split so."""
    name, _, part = path.partition("#")
    m = _linear_at(root, name)
    if m is None:
        return None
    if part:
        spec, _, lead_path = part.partition(":")
        i, n = (int(s) for s in spec.split("/"))
        lead = _linear_at(root, lead_path) if lead_path else None
        if lead_path and lead is None:
            return None
        try:
            return LinearView(m, i, n, lead)
        except ValueError:  # the rows do not split as the layout says: not this layout
            return None
    return LinearView(m) if is_conv1d(m) else m


def attr_at(root: nn.Module, path: str) -> Any:
    """The attribute at dotted ``path`` under ``root`` ("" = root), or None."""
    m: Any = root
    for a in (path.split(".") if path else ()):
        m = getattr(m, a, None)
    return m


class LayerConfig:
    """One attention module's own view of a config its layer shares with every other layer (Phi-3 attention
    reads its query width from ``self.config.num_attention_heads``). The fields named at creation are the
    module's own (initialised from the shared config, then written by surgery); every other attribute is read
    from, and written to, the shared config when accessed, so later changes to the model's config (its
    attention implementation, ``set_attn_implementation``, ``sliding_window``) still reach the module. A shallow
    copy would freeze those. Not a config class: ``to_dict`` and the like are the shared config's."""

    def __init__(self, shared: Any, own: tuple[str, ...]):
        self.__dict__["_shared"] = shared
        for f in own:
            self.__dict__[f] = getattr(shared, f)

    def __getattr__(self, name: str) -> Any:  # only names that are not the module's own
        shared = self.__dict__.get("_shared")
        if shared is None or name.startswith("__"):  # copy / pickle probing a half-built instance
            raise AttributeError(name)
        return getattr(shared, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.__dict__:
            self.__dict__[name] = value
        else:
            setattr(self._shared, name, value)

    def __repr__(self) -> str:
        own = {k: v for k, v in self.__dict__.items() if k != "_shared"}
        return f"LayerConfig({type(self._shared).__name__}, own={own})"


def set_head_counts(roles: AttnRoles, core: nn.Module, heads: int, kv_heads: int, head_dim: int) -> None:
    """Write the attention module's head-count attributes (those it has, as ints) for ``heads`` query heads and
    ``kv_heads`` KV heads. A dotted ``"config.field"`` whose value changes first gives the module its own
    ``LayerConfig`` view of ``core.config`` (owning every dotted field of ``roles``), so other layers keep
    theirs; a module whose counts do not change keeps the shared object."""
    value = {"heads": heads, "kv_heads": kv_heads, "groups": heads // max(kv_heads, 1), "width": heads * head_dim}
    for attr, what in roles.count_attrs:
        holder_name, _, leaf = attr.rpartition(".")
        holder = attr_at(core, holder_name)
        v = int(value[what])
        if holder is None or not _is_int(getattr(holder, leaf, None)) or getattr(holder, leaf) == v:
            continue
        if holder_name and not isinstance(holder, LayerConfig):
            own = tuple(a.rpartition(".")[2] for a, _ in roles.count_attrs if a.rpartition(".")[0] == holder_name)
            holder = LayerConfig(holder, own)
            parent, _, last = holder_name.rpartition(".")
            setattr(attr_at(core, parent), last, holder)
        setattr(holder, leaf, v)


def declare_example(model: nn.Module) -> str:
    """A ``declare_group`` call for this model's first expanding Linear pair (a -> b with a.out == b.in and
    a.out != a.in: an FFN), or a generic one."""
    for path, m in model.named_modules():
        lins = [(n, c) for n, c in m.named_children() if isinstance(c, nn.Linear)]
        for (na, a), (nb, b) in zip(lins, lins[1:], strict=False):
            if a.out_features == b.in_features and a.out_features != a.in_features:
                p = f"{path}." if path else ""
                return (f"spectra_gpu.declare_group(model, 'ffn', producer='{p}{na}', consumer='{p}{nb}', "
                        f"act=torch.relu)")
    return "spectra_gpu.declare_group(model, 'neuron', producer='fc1', consumer='fc2', act=torch.relu)"


def coverage_line(model: nn.Module) -> str:
    """One line: which family was detected and what is not covered."""
    mt = model_type(model)
    fam = family_of(model)
    if fam is None:
        known = ", ".join(f.name for f in FAMILIES)
        what = f"model type {mt!r}" if mt else f"{type(model).__name__} (no Hugging Face config)"
        return (f"detected {what}, which is not in the family table ({known}); its FFN and attention modules "
                f"match none of the known layouts")
    return f"detected family {fam.name!r} (model type {mt!r}); not covered: {fam.missing or 'nothing'}"


def is_causal_lm(architectures: Any) -> bool:
    """Whether a config's ``architectures`` (or one class name) names a causal language model: a class that
    transformers' AutoModelForCausalLM builds (``GPT2LMHeadModel`` and ``LlamaForCausalLM`` alike), or any
    ``*ForCausalLM`` class."""
    names = [architectures] if isinstance(architectures, str) else list(architectures or [])
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as causal
        known = {c for v in causal.values() for c in ((v,) if isinstance(v, str) else v)}
    except ImportError:  # transformers missing or reorganised: the class-name convention alone
        known = set()
    return any(n in known or str(n).endswith("ForCausalLM") for n in names)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def head_dim_of(roles: AttnRoles, core: Any) -> int | None:
    """The attention module's head size (its ``roles.head_dim_attr``), or None when it has no positive int."""
    hd: Any = getattr(core, roles.head_dim_attr, None)
    return int(hd) if _is_int(hd) and hd > 0 else None


__all__ = ["FAMILIES", "AttnRoles", "ConfigFields", "Family", "FfnRoles", "LayerConfig", "LinearView", "attr_at",
           "base_of", "coverage_line", "declare_example", "family", "family_of", "head_dim_of", "in_width",
           "is_causal_lm", "is_conv1d", "out_width", "resolve", "set_head_counts"]
