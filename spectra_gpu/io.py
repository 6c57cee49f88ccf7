"""Save and reload pruned models with one call each, without pickling any class.

A saved directory holds ``model.safetensors`` (the sliced tensors; tied/shared tensors stored once),
``spectra.json`` (format marker, model class, every group's kind and width: per-layer FFN widths, query
and KV heads) and, for Hugging Face models, ``config.json`` with the same record under ``spectra_pruned``,
``generation_config.json`` and the tokenizer files when one is given.

Loading builds the unpruned architecture (Hugging Face: the transformers class named in the record, from
``config.json``, without random initialisation; plain ``nn.Module``: the caller passes a fresh instance,
e.g. ``load_pruned(d, model=Net())``, because the class is not pickled), reshapes every Linear / Conv2d /
BatchNorm / LayerNorm / Embedding whose saved tensors are smaller, recomputes attention head counts from the
q/k/v shapes, loads the tensors, and checks the widths against the record. The directory is written to a
temporary sibling and moved into place, so a crash never leaves a half-written model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .units import UnitGroup, discover_groups

FORMAT_VERSION = 1
_RECORD = "spectra.json"
_WEIGHTS = "model.safetensors"


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


def save_pruned(model: nn.Module, directory: str | os.PathLike[str], tokenizer: Any = None) -> Path:
    """Write ``model`` (pruned or not) to ``directory`` (replaced atomically); returns the path."""
    from safetensors.torch import save_model

    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    dest = Path(directory).resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    hf = _is_hf(model)
    record = {"version": FORMAT_VERSION, "format": "hf" if hf else "torch",
              "class": f"{type(model).__module__}.{type(model).__qualname__}", "class_name": type(model).__name__,
              "groups": widths(model)}
    if hf:  # the attention kernel changes float rounding: reload with the one the model ran with
        record["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        save_model(model, str(tmp / _WEIGHTS), metadata={"format": "pt"})
        (tmp / _RECORD).write_text(json.dumps(record, indent=1))
        if hf:
            cfg = model.config.to_dict()
            cfg["spectra_pruned"] = record
            cfg["architectures"] = [type(model).__name__]
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
            gen = getattr(model, "generation_config", None)
            if gen is not None:
                gen.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        _replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _read_record(d: Path) -> dict[str, Any]:
    path = d / _RECORD
    if not path.exists():
        raise FileNotFoundError(f"load_pruned: expected {path} (a directory written by spectra_gpu.save_pruned)")
    rec = json.loads(path.read_text())
    if rec.get("version") != FORMAT_VERSION:
        raise ValueError(f"load_pruned: expected format version {FORMAT_VERSION}, got {rec.get('version')!r}")
    return dict(rec)


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
        from transformers.modeling_utils import no_init_weights  # type: ignore[no-redef,attr-defined]
    config = AutoConfig.from_pretrained(str(d))
    if rec.get("attn_implementation"):
        config._attn_implementation = rec["attn_implementation"]
    with no_init_weights():
        return cls(config)  # type: ignore[no-any-return]


def _sync(mod: nn.Module, path: str) -> None:
    """Make a module's size attributes match its (reshaped) tensors."""
    if isinstance(mod, nn.Linear):
        mod.out_features, mod.in_features = (int(s) for s in mod.weight.shape)
    elif isinstance(mod, nn.Conv2d):
        mod.out_channels = int(mod.weight.shape[0])
        mod.in_channels = int(mod.weight.shape[1]) * mod.groups
    elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
        ref = mod.weight if mod.weight is not None else mod.running_mean
        mod.num_features = int(ref.shape[0])  # type: ignore[union-attr]
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
    """Head counts follow the q/k shapes (BERT num_attention_heads/all_head_size, Llama n_rep)."""
    for g in _groups(model):
        if g.kind != "head" or g.attn is None or g.q is None or g.k is None:
            continue
        hd = g.head_dim
        heads = g.q.out_features // hd
        if g.arch == "bert":
            g.attn.num_attention_heads = heads
            g.attn.all_head_size = heads * hd
        elif g.arch == "llama":
            g.attn.num_key_value_groups = heads // (g.k.out_features // hd)
    for m in model.modules():
        if hasattr(m, "gate_proj") and hasattr(m, "intermediate_size") and isinstance(m.gate_proj, nn.Linear):
            m.intermediate_size = m.gate_proj.out_features


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
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # so tied names alias one parameter before the (deduplicated) tensors load
    sd = load_file(str(d / _WEIGHTS))
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
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    _fix_heads(model)
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
