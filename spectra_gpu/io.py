"""Save and reload pruned models with one call each, without pickling any class.

A saved directory holds ``model.safetensors`` (the sliced tensors; tied/shared tensors stored once),
``spectra.json`` (format marker, model class, every group's kind and width: per-layer FFN widths, query
and KV heads; whether the folder is standard), for Hugging Face models ``config.json`` and
``generation_config.json``, and the tokenizer files when one is given.

Standard folders: when a Hugging Face model's pruned widths are uniform across layers (one FFN width, one
query-head and one KV-head count in every layer), ``config.json``'s own fields (``intermediate_size``,
``num_attention_heads``, ``num_key_value_heads``, an explicit ``head_dim``, on the text config of multimodal
configs) are rewritten to describe the pruned model, and the rewrite is verified by reading it back as
``from_pretrained`` would (the config class's validators run), building the class from it on the meta device and
comparing every tensor shape. Such a folder loads with plain
``transformers.AutoModel*.from_pretrained`` / ``pipeline`` in a process that never imports spectra_gpu.
Otherwise (widths differ across layers, or the architecture cannot express the pruned shapes, e.g. BERT,
whose head size is ``hidden_size / num_attention_heads``) ``config.json`` keeps the unpruned architecture plus
the width record under ``spectra_pruned`` and only ``load_pruned`` rebuilds it; ``is_standard`` and
``loader_hint`` tell which (spectra.json keeps the reason).

Loading builds the architecture (Hugging Face: the transformers class named in the record, from
``config.json``, without random initialisation; plain ``nn.Module``: the caller passes a fresh instance,
e.g. ``load_pruned(d, model=Net())``, because the class is not pickled), reshapes every Linear / Conv2d /
BatchNorm / LayerNorm / Embedding whose saved tensors are smaller, recomputes attention head counts from the
q/k/v shapes, loads the tensors, and checks the widths against the record. A folder written by
``save_pretrained`` of a model that ``load_pruned`` rebuilt loads again (the record then comes from
``config.json``). The directory is written to a temporary sibling and moved into place, so a crash never
leaves a half-written model.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .families import family, is_causal_lm, is_conv1d
from .surgery import set_ffn_width, set_heads
from .units import UnitGroup, discover_groups

FORMAT_VERSION = 1
_RECORD = "spectra.json"
_WEIGHTS = "model.safetensors"


def _config(model: nn.Module) -> Any:
    """A Hugging Face model's config (untyped: transformers is not analysed)."""
    return model.config


def _tie(model: nn.Module) -> None:
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()


def _is_hf(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model.config, "to_dict") and hasattr(model, "save_pretrained")


def _groups(model: nn.Module) -> list[UnitGroup]:
    try:
        return discover_groups(model)
    except ValueError:  # nothing discoverable (hand-declared groups): shapes alone describe the model
        return []


def widths(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per discovered group: kind and width (heads: query heads and KV heads)."""
    out: dict[str, dict[str, Any]] = {}
    for g in _groups(model):
        rec: dict[str, Any] = {"kind": g.kind, "size": g.size}
        if g.kind == "head":
            assert g.q is not None
            rec["heads"] = g.q.out_features // g.head_dim
            if g.kv_heads is not None:
                rec["kv_heads"] = g.kv_heads
        out[g.name] = rec
    return out


def _replace_dir(tmp: Path, dest: Path) -> None:
    if dest.exists():
        if not dest.is_dir():
            raise ValueError(f"directory: {dest} exists and is not a directory")
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old.", dir=dest.parent))
        os.replace(dest, old / dest.name)
        os.replace(tmp, dest)
        shutil.rmtree(old)
    else:
        os.replace(tmp, dest)


def _uniform(values: list[int], what: str) -> tuple[int | None, str]:
    distinct = sorted(set(values))
    if len(distinct) > 1:
        return None, f"{what} differ across layers ({distinct[0]}..{distinct[-1]})"
    return (distinct[0] if distinct else None), ""


def _state_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def standard_config(model: nn.Module) -> tuple[Any, str]:
    """``(config, "")``: a copy of a Hugging Face ``model.config`` whose standard width fields describe the
    model's current (pruned) shapes, verified by building ``type(model)`` from it on the meta device; or
    ``(None, reason)`` when widths differ across layers or the architecture's config cannot express them."""
    if not _is_hf(model):
        return None, f"{type(model).__name__} is not a Hugging Face model (no config)"
    groups = _groups(model)
    cfg: Any = copy.deepcopy(_config(model))
    cfg.__dict__.pop("spectra_pruned", None)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    fams = {g.arch for g in groups if g.arch != "plain"}
    if len(fams) > 1:
        return None, f"its layers belong to several families ({sorted(fams)})"
    fields = family(fams.pop()).config if fams else None
    ffn, why = _uniform([g.size for g in groups if g.kind == "ffn" and g.arch != "plain"], "FFN widths")
    if why:
        return None, why
    heads = [g for g in groups if g.kind == "head" and g.q is not None]
    n_q, why = _uniform([g.q.out_features // g.head_dim for g in heads], "query-head counts")  # type: ignore[union-attr]
    if why:
        return None, why
    n_kv, why = _uniform([int(g.kv_heads) for g in heads if g.kv_heads is not None], "KV-head counts")
    if why:
        return None, why
    head_dim, _ = _uniform([g.head_dim for g in heads], "head sizes")
    if fields is not None and fields.head_dim is None and n_q is not None and head_dim is not None \
            and n_q * head_dim != getattr(text, "hidden_size", None):
        return None, (f"{type(model).__name__} derives the head size from hidden_size / num_attention_heads, so its "
                      f"config cannot describe {n_q} heads of size {head_dim}")
    if fields is not None:
        if ffn is not None and fields.ffn is not None:
            setattr(text, fields.ffn, ffn)
        if n_q is not None and fields.heads is not None:
            setattr(text, fields.heads, n_q)
        if n_kv is not None and fields.kv_heads is not None:
            setattr(text, fields.kv_heads, n_kv)
        if head_dim is not None and fields.head_dim is not None:
            setattr(text, fields.head_dim, head_dim)  # explicit: hidden_size / num_attention_heads may differ
    try:  # what from_pretrained does with config.json, validators included (Phi-3 longrope checks its factors
        # against hidden_size / num_attention_heads, so a head-pruned longrope Phi-3 cannot be described)
        reread = type(cfg).from_dict(cfg.to_dict())
    except Exception as e:
        return None, f"{type(cfg).__name__} rejects the rewritten config ({' '.join(str(e).split())[:200]})"
    try:
        with torch.device("meta"):
            probe = type(model)(reread)
    except Exception as e:  # the class rejects the rewritten config (e.g. a divisibility check)
        return None, f"{type(model).__name__} cannot be built from the rewritten config: {e}"
    want, got = _state_shapes(model), _state_shapes(probe)
    bad = [k for k in want if got.get(k) != want[k]]
    if bad or set(got) - set(want):
        k = bad[0] if bad else sorted(set(got) - set(want))[0]
        return None, f"its config cannot describe the pruned shapes: {k} is {want.get(k)} but the config builds " \
                     f"{got.get(k)}"
    return cfg, ""


def save_pruned(model: nn.Module, directory: str | os.PathLike[str], tokenizer: Any = None) -> Path:
    """Write ``model`` (pruned or not) to ``directory`` (replaced atomically); returns the path. Hugging Face
    models with uniform widths get a standard ``config.json`` (module docstring); ``is_standard(path)`` /
    ``loader_hint(path)`` say which loader the folder needs."""
    from safetensors.torch import save_model

    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    dest = Path(directory).resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    hf = _is_hf(model)
    record: dict[str, Any] = {
        "version": FORMAT_VERSION, "format": "hf" if hf else "torch",
        "class": f"{type(model).__module__}.{type(model).__qualname__}", "class_name": type(model).__name__,
        "groups": widths(model)}
    std_cfg, reason = standard_config(model) if hf else (None, "")
    if hf:  # the attention kernel changes float rounding: reload with the one the model ran with
        record["attn_implementation"] = getattr(_config(model), "_attn_implementation", None)
        record["standard"], record["standard_reason"] = std_cfg is not None, reason
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        save_model(model, str(tmp / _WEIGHTS), metadata={"format": "pt"})
        (tmp / _RECORD).write_text(json.dumps(record, indent=1))
        if hf:
            cfg = (std_cfg if std_cfg is not None else _config(model)).to_dict()
            cfg.pop("spectra_pruned", None)
            if std_cfg is None:
                cfg["spectra_pruned"] = record
            cfg["architectures"] = [type(model).__name__]
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
            gen = getattr(model, "generation_config", None)
            if gen is not None:
                gen.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        _user_modes(tmp)
        _replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _damaged(path: Path, e: Exception) -> ValueError:
    """The one-line error for a damaged file of a saved model: which file, what is wrong, what to do."""
    return ValueError(f"load_pruned: {path} is damaged ({type(e).__name__}: {' '.join(str(e).split())[:160]}); "
                      "save the model again (rerun the pruning run into a new directory) or restore the folder")


def _json_file(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise _damaged(path, e) from None


def _user_modes(folder: Path) -> None:
    """Give ``folder`` (made by mkdtemp: 0700) and the files in it the modes the user's umask gives new ones."""
    from .report import current_umask

    mask = current_umask()
    folder.chmod(0o777 & ~mask)
    for p in folder.rglob("*"):
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def _read_record(d: Path) -> dict[str, Any]:
    path = d / _RECORD
    if path.exists():
        rec = _json_file(path)
        if not isinstance(rec, dict):
            raise _damaged(path, TypeError(f"expected a JSON object, got {type(rec).__name__}"))
    elif (d / "config.json").exists() and "spectra_pruned" in (cfg := _json_file(d / "config.json")):
        rec = cfg["spectra_pruned"]  # save_pretrained of a model that load_pruned rebuilt
    else:
        raise FileNotFoundError(f"load_pruned: expected {path} (a directory written by spectra_gpu.save_pruned)")
    if rec.get("version") != FORMAT_VERSION:
        raise ValueError(f"load_pruned: expected format version {FORMAT_VERSION}, got {rec.get('version')!r}")
    return dict(rec)


def is_standard(directory: str | os.PathLike[str]) -> bool:
    """True when ``directory`` (written by ``save_pruned``) loads with plain transformers ``from_pretrained``."""
    return bool(_read_record(Path(directory)).get("standard", False))


_AUTO_SUFFIXES = ("ForCausalLM", "ForMaskedLM", "ForSequenceClassification", "ForTokenClassification",
                  "ForQuestionAnswering", "ForImageClassification")


def loader_hint(directory: str | os.PathLike[str]) -> str:
    """One line saying which loader a folder written by ``save_pruned`` needs, and why."""
    d = Path(directory)
    rec = _read_record(d)
    if rec["format"] != "hf":
        return (f"{d}: a plain torch module ({rec['class_name']}); reload with spectra_gpu.load_pruned({str(d)!r}, "
                f"model=<a fresh {rec['class_name']}>)")
    if rec.get("standard"):
        name = rec["class_name"]
        auto = "AutoModelForCausalLM" if is_causal_lm(name) else next(
            (f"AutoModel{s}" for s in _AUTO_SUFFIXES if name.endswith(s)), "AutoModel")
        return (f"{d}: standard Hugging Face folder; loads without spectra_gpu: "
                f"transformers.{auto}.from_pretrained({str(d)!r})")
    why = rec.get("standard_reason") or "saved before standard configs existed"
    return (f"{d}: not a standard Hugging Face folder ({why}); reload with spectra_gpu.load_pruned({str(d)!r}), "
            f"plain transformers cannot build it")


def _build_hf(d: Path, rec: dict[str, Any]) -> nn.Module:
    import transformers
    from transformers import AutoConfig

    cls = getattr(transformers, rec["class_name"], None)
    if cls is None:
        raise ValueError(f"load_pruned: {rec['class_name']!r} is not a transformers class; pass model=<a fresh "
                         f"instance of the unpruned architecture>")
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    config = AutoConfig.from_pretrained(str(d))
    if rec.get("attn_implementation"):
        config._attn_implementation = rec["attn_implementation"]
    with no_init_weights():
        return cls(config)


def _sync(mod: nn.Module, path: str) -> None:
    """Make a module's size attributes match its (reshaped) tensors."""
    if is_conv1d(mod):  # transformers Conv1D (GPT-2): weight [in, out]
        m: Any = mod
        m.nx, m.nf = (int(s) for s in m.weight.shape)
    elif isinstance(mod, nn.Linear):
        mod.out_features, mod.in_features = (int(s) for s in mod.weight.shape)
    elif isinstance(mod, nn.Conv2d):
        mod.out_channels = int(mod.weight.shape[0])
        mod.in_channels = int(mod.weight.shape[1]) * mod.groups
    elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
        ref = mod.weight if mod.weight is not None else mod.running_mean
        mod.num_features = int(ref.shape[0])
    elif isinstance(mod, nn.LayerNorm):
        mod.normalized_shape = tuple(int(s) for s in mod.weight.shape)
    elif isinstance(mod, nn.Embedding):
        mod.num_embeddings, mod.embedding_dim = (int(s) for s in mod.weight.shape)
    else:
        raise ValueError(f"load_pruned: module {path!r} ({type(mod).__name__}) has differently shaped saved "
                         f"tensors and spectra_gpu does not know how to resize it")


def _fit_shapes(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    resized: dict[str, nn.Module] = {}
    for name, t in sd.items():
        path, _, leaf = name.rpartition(".")
        try:
            mod = model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"load_pruned: saved tensor {name!r} has no module {path!r} in {type(model).__name__}; "
                             f"was the model built with the same architecture?") from None
        cur = mod._parameters.get(leaf) if leaf in mod._parameters else mod._buffers.get(leaf)
        if cur is None or tuple(cur.shape) == tuple(t.shape):
            continue
        new = torch.empty(t.shape, dtype=t.dtype, device=cur.device)
        if leaf in mod._parameters:
            mod._parameters[leaf] = nn.Parameter(new, requires_grad=cur.requires_grad)
        else:
            mod._buffers[leaf] = new
        resized[path] = mod
    for path, mod in resized.items():
        _sync(mod, path)


def _fix_heads(model: nn.Module) -> None:
    """Head counts and FFN width attributes follow the reshaped tensors (the family table's attributes)."""
    for g in _groups(model):
        if g.kind == "head" and g.attn is not None:
            set_heads(g)
        elif g.kind == "ffn":
            set_ffn_width(model, g)


def load_pruned(directory: str | os.PathLike[str], model: nn.Module | None = None) -> nn.Module:
    """Rebuild a model written by ``save_pruned`` (eval mode). Hugging Face models are rebuilt from the
    saved config; plain modules need ``model`` = a fresh instance of their unpruned architecture."""
    from safetensors.torch import load_file

    d = Path(directory)
    rec = _read_record(d)
    if model is None:
        if rec["format"] != "hf":
            raise ValueError(f"load_pruned: {d} holds a plain torch module ({rec['class']}); its class is not "
                             f"pickled, so pass model=<a fresh instance of that class>, e.g. "
                             f"load_pruned(d, model=Net())")
        model = _build_hf(d, rec)
    elif not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module or None, got {type(model).__name__}")
    _tie(model)  # so tied names alias one parameter before the (deduplicated) tensors load
    try:
        sd = load_file(str(d / _WEIGHTS))
    except Exception as e:  # truncated or not safetensors at all
        raise _damaged(d / _WEIGHTS, e) from None
    dtypes = Counter(t.dtype for t in sd.values() if t.is_floating_point())
    if dtypes:
        model.to(dtypes.most_common(1)[0][0])
    _fit_shapes(model, sd)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    shared = _shared_names(model)
    missing = [k for k in missing if k not in shared]
    if missing or unexpected:
        raise ValueError(f"load_pruned: saved tensors do not match {type(model).__name__}: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    _tie(model)
    _fix_heads(model)
    if rec["format"] == "hf" and not rec.get("standard") and hasattr(model, "config"):
        _config(model).spectra_pruned = rec  # so save_pretrained writes a folder load_pruned reads again
    got = widths(model)
    bad = {k: (v, got.get(k)) for k, v in rec["groups"].items() if got.get(k) != v}
    if bad:
        raise ValueError(f"load_pruned: rebuilt widths differ from the record (saved, rebuilt): {bad}")
    return model.eval()


def _shared_names(model: nn.Module) -> set[str]:
    """Names of parameters that alias another (tied) parameter, which safetensors stores once."""
    first: dict[int, str] = {}
    shared: set[str] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            shared.update({name, first[id(p)]})
        else:
            first[id(p)] = name
    return shared | _tied_keys(model)


def _tied_keys(model: nn.Module) -> set[str]:
    tied = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or {}
    return set(tied.keys() if isinstance(tied, dict) else tied)


def load_tokenizer(directory: str | os.PathLike[str]) -> Any:
    """The tokenizer saved beside a Hugging Face model by ``save_pruned(..., tokenizer=...)``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))
