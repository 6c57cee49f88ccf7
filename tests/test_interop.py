"""Uniformly pruned Hugging Face models saved by ``save_pruned`` load with plain transformers in a process that
never imports spectra_gpu: ``from_pretrained`` rebuilds them, their logits equal the pruned model's (fp32,
1e-5), ``pipeline`` runs and ``save_pretrained`` round-trips. Llama (SmolLM2), BERT (MiniLM) and a tiny
Gemma-3 text model (GeGLU, head_dim != hidden / heads, one KV head)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from spectra_gpu import discover_groups, remove_units, save_pruned
from spectra_gpu.io import is_standard, loader_hint

# Runs in a fresh interpreter: importing spectra_gpu there raises, and the script checks it was never imported.
_CHILD = textwrap.dedent('''
    import importlib.abc, json, sys

    class _NoSpectra(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "spectra_gpu" or name.startswith("spectra_gpu."):
                raise ImportError("this process must not import spectra_gpu")
            return None

    sys.meta_path.insert(0, _NoSpectra())
    import torch
    import transformers
    from safetensors.torch import load_file, save_file

    folder, io_dir, auto, task = sys.argv[1:5]
    cls = getattr(transformers, auto)
    inputs = load_file(f"{io_dir}/inputs.safetensors")
    model = cls.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(**inputs)
    key = "logits" if hasattr(out, "logits") else "last_hidden_state"
    result = {"out": getattr(out, key).contiguous()}
    model.save_pretrained(f"{io_dir}/resaved")
    again = cls.from_pretrained(f"{io_dir}/resaved", dtype=torch.float32).eval()
    with torch.no_grad():
        result["resaved"] = getattr(again(**inputs), key).contiguous()
    save_file(result, f"{io_dir}/outputs.safetensors")
    pipe = transformers.pipeline(task, model=folder, dtype=torch.float32)
    if task == "text-generation":
        got = pipe("The king", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    else:
        got = str(torch.tensor(pipe("The king")).shape)
    assert not any(m == "spectra_gpu" or m.startswith("spectra_gpu.") for m in sys.modules)
    print(json.dumps({"pipeline": got, "config": type(model.config).__name__}))
''')


def _load_elsewhere(folder: Path, inputs: dict[str, torch.Tensor], auto: str, task: str, tmp: Path) -> dict:
    """Load ``folder`` with ``transformers.<auto>`` in a subprocess without spectra_gpu; its outputs on
    ``inputs`` (and after save_pretrained + from_pretrained) and its pipeline's answer."""
    io_dir = tmp / "child"
    io_dir.mkdir()
    save_file({k: v.contiguous() for k, v in inputs.items()}, str(io_dir / "inputs.safetensors"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(folder), str(io_dir), auto, task], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**load_file(str(io_dir / "outputs.safetensors")), **info}


def _check_same(child: dict, want: torch.Tensor) -> float:
    diff = float((child["out"] - want).abs().max())
    torch.testing.assert_close(child["out"], want, rtol=0, atol=1e-5)
    torch.testing.assert_close(child["resaved"], child["out"], rtol=0, atol=0)
    return diff


def _norm_scores(g) -> torch.Tensor:
    """A deterministic per-unit score (producer row norms) so the removed units differ across layers."""
    w = g.q.weight if g.kind == "head" else g.producers[0].weight
    return w.detach().double().reshape(g.size, -1).norm(dim=1)


def _prune_uniform(model: torch.nn.Module, ffn_remove: int, heads_remove: int) -> None:
    """Remove the ``ffn_remove`` lowest-norm FFN neurons and ``heads_remove`` query heads (equally many per KV
    group) from every layer."""
    for g in discover_groups(model):
        s = _norm_scores(g)
        if g.kind == "ffn" and ffn_remove:
            remove_units(model, g, torch.argsort(s)[:ffn_remove])
        elif g.kind == "head" and heads_remove:
            idx = g.balanced(s, heads_remove) if g.unit == "query" else torch.argsort(s)[:heads_remove]
            remove_units(model, g, idx)


def _word_tokenizer(vocab_size: int):
    """A whitespace word-level fast tokenizer over ``vocab_size`` tokens (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<bos>", "<unk>", "The", "king"] + [f"w{i}" for i in range(vocab_size - 6)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>")


def tiny_gemma3():
    """Gemma-3 text model: GeGLU FFN, head_dim 24 != hidden 64 / 4 heads, one KV head, sliding + global layers."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(7)
    cfg = Gemma3TextConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=24, max_position_embeddings=128,
                           sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                           hidden_activation="gelu_pytorch_tanh", pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return Gemma3ForCausalLM(cfg).eval()


@pytest.mark.slow
def test_tiny_gemma3_uniform_prune_loads_without_spectra(tmp_path):
    model, tok = tiny_gemma3(), _word_tokenizer(64)
    assert model.model.layers[0].mlp.act_fn is not None and model.config.head_dim * 4 != model.config.hidden_size
    _prune_uniform(model, ffn_remove=40, heads_remove=2)
    att = model.model.layers[1].self_attn
    assert (att.q_proj.out_features, att.k_proj.out_features, att.num_key_value_groups) == (48, 24, 2)
    d = save_pruned(model, tmp_path / "gemma", tokenizer=tok)
    cfg = json.loads((d / "config.json").read_text())
    assert is_standard(d) and "spectra_pruned" not in cfg
    assert (cfg["intermediate_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == \
        (56, 2, 1, 24)
    ids = torch.tensor([[2, 4, 5, 9, 17, 33, 8, 12, 40, 3]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
    child = _load_elsewhere(d, {"input_ids": ids}, "AutoModelForCausalLM", "text-generation", tmp_path)
    print(f"gemma3 tiny: max |logits difference| = {_check_same(child, want):.3g}")
    assert child["config"] == "Gemma3TextConfig" and child["pipeline"].startswith("The king")
    assert len(child["pipeline"].split()) > 2


@pytest.mark.slow
def test_minilm_uniform_ffn_prune_loads_without_spectra_and_heads_need_load_pruned(tmp_path):
    from spectra_gpu.builtin import zoo

    model, tok = zoo.load_minilm(fresh=True)
    _prune_uniform(model, ffn_remove=128, heads_remove=0)
    d = save_pruned(model, tmp_path / "minilm", tokenizer=tok)
    cfg = json.loads((d / "config.json").read_text())
    assert is_standard(d) and cfg["intermediate_size"] == 1536 - 128 and cfg["num_attention_heads"] == 12
    batch = dict(tok(["A quiet, moving film.", "Nothing happens for two hours"], padding=True, return_tensors="pt"))
    with torch.no_grad():
        want = model(**batch).last_hidden_state
    child = _load_elsewhere(d, batch, "AutoModel", "feature-extraction", tmp_path)
    print(f"MiniLM: max |hidden-state difference| = {_check_same(child, want):.3g}")
    assert child["pipeline"].endswith(", 384])")
    # transformers' BERT derives the head size from hidden_size / num_attention_heads: removed heads need the record
    _prune_uniform(model, ffn_remove=0, heads_remove=2)
    d2 = save_pruned(model, tmp_path / "minilm_heads")
    assert not is_standard(d2) and "hidden_size / num_attention_heads" in loader_hint(d2)
    assert "spectra_gpu.load_pruned" in loader_hint(d2)


@pytest.mark.slow
def test_smollm2_uniform_prune_loads_without_spectra_and_generates(tmp_path):
    from spectra_gpu.builtin import zoo

    model, tok = zoo.load_smollm2(fresh=True)
    _prune_uniform(model, ffn_remove=64, heads_remove=3)  # 1536 -> 1472 neurons; 9 -> 6 query heads, 3 KV heads
    d = save_pruned(model, tmp_path / "smol", tokenizer=tok)
    cfg = json.loads((d / "config.json").read_text())
    assert is_standard(d) and "spectra_pruned" not in cfg
    assert (cfg["intermediate_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == \
        (1472, 6, 3, 64)
    ids = tok(zoo.english_text().test[:200], return_tensors="pt")["input_ids"][:, :48]
    with torch.no_grad():
        want = model(input_ids=ids).logits
    child = _load_elsewhere(d, {"input_ids": ids}, "AutoModelForCausalLM", "text-generation", tmp_path)
    print(f"SmolLM2: max |logits difference| = {_check_same(child, want):.3g}")
    assert child["pipeline"].startswith("The king") and len(child["pipeline"]) > len("The king")


# ---- GGUF export, read back by transformers' own GGUF loader -------------------------------------------------
def _tiny_llama_uniform():
    import _arch_models as am

    m = am.llama(kv=3)  # 6 query heads in 3 KV groups, head_dim 8 != 48 / 6, FFN 40, tied embeddings
    for g in discover_groups(m):
        remove_units(m, g, torch.argsort(_norm_scores(g))[:8] if g.kind == "ffn" else g.balanced(_norm_scores(g), 3))
    return m


def _gguf_logits(path: Path, ids: torch.Tensor) -> tuple[torch.Tensor, object]:
    from transformers import AutoModelForCausalLM

    r = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        return r(input_ids=ids).logits, r


@pytest.mark.parametrize("dtype,atol", [("f32", 1e-5), ("f16", 2e-3)])
def test_gguf_export_of_a_uniform_llama_reads_back_in_transformers(tmp_path, dtype, atol):
    from spectra_gpu.export import export_gguf

    m = _tiny_llama_uniform()
    d = save_pruned(m, tmp_path / "model")
    out = export_gguf(d, tmp_path / "gguf" / f"tiny.{dtype}.gguf", dtype=dtype)
    ids = torch.tensor([[1, 5, 9, 33, 2, 71, 14, 8, 99, 40, 3, 7]])
    with torch.no_grad():
        want = m(input_ids=ids).logits
    got, r = _gguf_logits(out, ids)
    diff = float((got - want).abs().max())
    print(f"GGUF {dtype} tiny Llama: max |logits difference| = {diff:.3g}")
    assert (r.config.intermediate_size, r.config.num_attention_heads, r.config.num_key_value_heads,
            r.config.head_dim, r.config.tie_word_embeddings) == (32, 3, 3, 8, True)
    torch.testing.assert_close(got, want, rtol=0, atol=atol)
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no temporary file left


def test_gguf_export_of_non_uniform_widths_writes_per_layer_arrays(tmp_path):
    import _arch_models as am
    from gguf import GGUFReader

    from spectra_gpu.export import export_gguf

    m = am.llama(kv=3)
    ffn = discover_groups(m, kinds="ffn")
    remove_units(m, ffn[0], [0, 1, 2])
    heads = discover_groups(m, kinds="head", gqa="kv")
    remove_units(m, heads[1], [0])  # layer 1: 2 KV groups of 2 query heads; layer 0 keeps 3 of 2
    out = export_gguf(m, tmp_path / "n.gguf", dtype="f32")
    reader = GGUFReader(str(out))

    def field(key):
        f = reader.fields[key]
        return [int(f.parts[i][0]) for i in f.data]

    assert field("llama.feed_forward_length") == [37, 40]
    assert field("llama.attention.head_count") == [6, 4] and field("llama.attention.head_count_kv") == [3, 2]
    shapes = {t.name: tuple(int(s) for s in t.shape) for t in reader.tensors}  # GGUF order: (in, out)
    assert shapes["blk.0.ffn_gate.weight"] == (48, 37) and shapes["blk.1.attn_k.weight"] == (48, 16)
    assert "output.weight" not in shapes  # tied to token_embd


def test_gguf_export_errors(tmp_path):
    import _arch_models as am

    from spectra_gpu.export import export_gguf

    with pytest.raises(ValueError, match="Llama-style decoder"):
        export_gguf(am.bert(), tmp_path / "b.gguf")
    with pytest.raises(ValueError, match="dtype: expected one of"):
        export_gguf(am.llama(), tmp_path / "b.gguf", dtype="q4")
    with pytest.raises(TypeError, match="model_or_dir"):
        export_gguf(3, tmp_path / "b.gguf")
    assert not list(tmp_path.iterdir())


def test_export_cli_writes_a_gguf_from_a_run_directory(tmp_path, capsys):
    from spectra_gpu.cli import main

    save_pruned(_tiny_llama_uniform(), tmp_path / "run" / "model")
    assert main(["export", str(tmp_path / "run"), "--gguf", str(tmp_path / "x.gguf"), "--dtype", "f32"]) == 0
    assert (tmp_path / "x.gguf").stat().st_size > 0 and "x.gguf" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "nothing"), "--gguf", str(tmp_path / "y.gguf")]) == 2
    err = capsys.readouterr().err
    assert "spectra export: error:" in err and "spectra.json" in err and "Traceback" not in err
    assert not (tmp_path / "y.gguf").exists()


@pytest.mark.slow
def test_smollm2_gguf_export_reads_back_with_its_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from spectra_gpu.builtin import zoo
    from spectra_gpu.export import export_gguf

    model, tok = zoo.load_smollm2(fresh=True)
    _prune_uniform(model, ffn_remove=64, heads_remove=3)
    d = save_pruned(model, tmp_path / "smol", tokenizer=tok)
    out = export_gguf(d, tmp_path / "gguf" / "smol.gguf", dtype="f32")
    text = zoo.english_text().test[:400]
    ids = tok(text, return_tensors="pt")["input_ids"][:, :64]
    with torch.no_grad():
        want = model(input_ids=ids).logits
    got, r = _gguf_logits(out, ids)
    diff = float((got - want).abs().max())
    print(f"GGUF f32 SmolLM2 (pruned): max |logits difference| on held-out text = {diff:.3g}")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    back = AutoTokenizer.from_pretrained(str(out.parent), gguf_file=out.name)
    assert back(text)["input_ids"] == tok(text)["input_ids"]
    assert r.generate(input_ids=ids[:, :8], max_new_tokens=4, do_sample=False).tolist() == \
        model.generate(input_ids=ids[:, :8], max_new_tokens=4, do_sample=False).tolist()
