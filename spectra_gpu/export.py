"""Export pruned Llama-style decoders to GGUF (llama.cpp's file format), with the ``gguf`` package's writer.

``export_gguf(model_or_dir, out_path, dtype="f16")`` takes a ``LlamaForCausalLM`` (pruned or not) or a folder
written by ``spectra_gpu.save_pruned`` and writes one GGUF file: architecture ``llama`` metadata (context
length, widths, head counts, explicit key/value length and RoPE dimension = ``head_dim``, RoPE base, RMSNorm
epsilon), every tensor under llama.cpp's names (q/k rows permuted as llama.cpp's converter does; the output
matrix omitted when tied to the embeddings), matrices in f16 or f32 and norms in f32, and, when a byte-level
BPE tokenizer is given or saved beside the model, the tokenizer (``tokenizer.ggml.*``).

Widths uniform across layers are written as numbers, so any GGUF reader (llama.cpp, transformers'
``from_pretrained(dir, gguf_file=...)``) loads the file. Per-layer FFN widths and head counts are written as
per-layer arrays, which the format and llama.cpp allow; transformers' GGUF loader reads only numbers, so such
files are for llama.cpp. What the format cannot hold (a head size that differs across layers, attention or MLP
biases, RoPE scaling) raises a ValueError saying so.

``add_export_parser`` / ``run_export`` are the ``spectra export DIR --gguf OUT.gguf [--dtype f16|f32]`` command.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

DTYPES = ("f16", "f32")


def _require_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise ImportError("export_gguf needs the package 'gguf', which is not installed: pip install gguf") from None
    return gguf


def _load(model_or_dir: nn.Module | str | os.PathLike[str], tokenizer: Any) -> tuple[nn.Module, Any]:
    if isinstance(model_or_dir, nn.Module):
        return model_or_dir, tokenizer
    if not isinstance(model_or_dir, (str, os.PathLike)):
        raise TypeError(f"model_or_dir: expected a torch.nn.Module or a directory written by save_pruned, got "
                        f"{type(model_or_dir).__name__}")
    from .io import load_pruned, load_tokenizer

    d = Path(model_or_dir)
    model = load_pruned(d)
    if tokenizer is None and any((d / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        tokenizer = load_tokenizer(d)
    return model, tokenizer


def _llama_layers(model: nn.Module) -> tuple[Any, list[Any]]:
    """The config and decoder layers of a Llama-style decoder, or a ValueError naming what does not fit."""
    cfg: Any = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    inner = getattr(model, "model", None)
    if model_type != "llama" or inner is None or not hasattr(model, "lm_head"):
        raise ValueError(f"export_gguf: expected a Llama-style decoder (LlamaForCausalLM, config.model_type 'llama'), "
                         f"got {type(model).__name__} with model_type {model_type!r}")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise ValueError("export_gguf: attention/MLP biases are not part of GGUF's llama architecture; got "
                         f"attention_bias={cfg.attention_bias}, mlp_bias={getattr(cfg, 'mlp_bias', False)}")
    rope = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"export_gguf: only plain RoPE is exported, got rope scaling {rope}")
    return cfg, list(inner.layers)


def _rope_theta(cfg: Any) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", None))
    if theta is None:
        raise ValueError("export_gguf: the config has no rope_theta")
    return float(theta)


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order: within each head, the two rotary halves interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _scalar_or_array(values: list[int]) -> int | list[int]:
    return values[0] if len(set(values)) == 1 else values


def _tokenizer_metadata(writer: Any, tokenizer: Any, vocab_size: int, pre: str) -> None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"export_gguf: expected a fast (tokenizers-backed) tokenizer, got {type(tokenizer).__name__}")
    spec = json.loads(backend.to_str())
    bpe = spec.get("model", {})
    if bpe.get("type") != "BPE":
        raise ValueError(f"export_gguf: only byte-level BPE tokenizers are exported, got {bpe.get('type')!r}")
    vocab = {**bpe["vocab"], **{t["content"]: t["id"] for t in spec.get("added_tokens", [])}}
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    if len(vocab) > vocab_size or max(vocab.values()) >= vocab_size:
        raise ValueError(f"export_gguf: the tokenizer has {len(vocab)} tokens but the model's vocabulary is "
                         f"{vocab_size}")
    by_id = {i: t for t, i in vocab.items()}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [3 if i in special else 1 if i in by_id else 5 for i in range(vocab_size)]  # control / normal / unused
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for what in ("bos", "eos", "pad", "unk"):
        tid = getattr(tokenizer, f"{what}_token_id", None)
        if tid is not None:
            getattr(writer, f"add_{what}_token_id")(int(tid))


def export_gguf(model_or_dir: nn.Module | str | os.PathLike[str], out_path: str | os.PathLike[str],
                dtype: str = "f16", tokenizer: Any = None, tokenizer_pre: str = "default") -> Path:
    """Write a Llama-style decoder (a model, or a folder written by ``save_pruned``) to the GGUF file
    ``out_path`` (written to a temporary sibling, then moved into place); returns its path. ``dtype``: "f16"
    or "f32" for the matrices (norms stay f32). ``tokenizer`` (default: the one saved in the folder) adds the
    vocabulary; ``tokenizer_pre`` names llama.cpp's pre-tokenizer. Module docstring: what is written."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {DTYPES}, got {dtype!r}")
    gguf = _require_gguf()
    model, tokenizer = _load(model_or_dir, tokenizer)
    cfg, layers = _llama_layers(model)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    n_ff = [int(layer.mlp.gate_proj.out_features) for layer in layers]
    n_head = [int(layer.self_attn.q_proj.out_features) // head_dim for layer in layers]
    n_kv = [int(layer.self_attn.k_proj.out_features) // head_dim for layer in layers]
    dims = {int(layer.self_attn.head_dim) for layer in layers}
    if dims != {head_dim}:
        raise ValueError(f"export_gguf: GGUF holds one head size for all layers, got {sorted(dims)}")
    sd = model.state_dict()
    lm: Any = model
    tied = lm.lm_head.weight is lm.model.embed_tokens.weight
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, len(layers))
    float_type = np.float16 if dtype == "f16" else np.float32

    out = Path(out_path).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        writer.add_name(str(getattr(cfg, "_name_or_path", "") or "pruned-llama").rstrip("/").rpartition("/")[2])
        writer.add_context_length(int(cfg.max_position_embeddings))
        writer.add_embedding_length(int(cfg.hidden_size))
        writer.add_block_count(len(layers))
        writer.add_feed_forward_length(_scalar_or_array(n_ff))
        writer.add_head_count(_scalar_or_array(n_head))
        writer.add_head_count_kv(_scalar_or_array(n_kv))
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(_rope_theta(cfg))
        writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
        writer.add_vocab_size(int(cfg.vocab_size))
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
        if tokenizer is not None:
            _tokenizer_metadata(writer, tokenizer, int(cfg.vocab_size), tokenizer_pre)
        for key, t in sd.items():
            if tied and key == "lm_head.weight":
                continue
            name = name_map.get_name(key, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise ValueError(f"export_gguf: tensor {key!r} has no GGUF name in the llama architecture")
            w = t.detach().to(torch.float32).cpu().numpy()
            if key.endswith("self_attn.q_proj.weight") or key.endswith("self_attn.k_proj.weight"):
                layer = int(key.split(".")[2])
                w = _permute(w, n_head[layer] if ".q_proj." in key else n_kv[layer])
            writer.add_tensor(name, np.ascontiguousarray(w.astype(float_type if w.ndim > 1 else np.float32)))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def add_export_parser(subparsers: Any) -> argparse.ArgumentParser:
    """The ``export`` subcommand on an argparse subparsers object (handler: ``run_export``)."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "export", help="convert a saved pruned model (DIR/model or a run directory) to another format")
    p.add_argument("dir", help="a folder written by save_pruned, or a run directory holding model/")
    p.add_argument("--gguf", required=True, metavar="OUT.gguf", help="write a GGUF file (Llama-style decoders)")
    p.add_argument("--dtype", choices=DTYPES, default="f16", help="matrix precision in the file (default: f16)")
    p.set_defaults(func=run_export)
    return p


def run_export(args: argparse.Namespace) -> int:
    """Handler of ``spectra export``: returns the exit code."""
    src = Path(args.dir)
    if not (src / "spectra.json").is_file() and (src / "model" / "spectra.json").is_file():
        src = src / "model"  # a run directory
    out = export_gguf(src, args.gguf, dtype=args.dtype)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.dtype})")
    return 0
