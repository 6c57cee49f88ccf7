"""save_pruned -> load_pruned gives the same outputs and widths, for Hugging Face and plain models."""

from __future__ import annotations

import json

import _arch_models as am
import pytest
import torch

from spectra_gpu import count_params, discover_groups, load_pruned, remove_units, save_pruned
from spectra_gpu.io import is_standard, loader_hint


def _prune_some(m, gqa="query"):
    for i, g in enumerate(discover_groups(m, gqa=gqa)):
        n = g.size
        idx = g.balanced(torch.arange(n, 0, -1).double(), n // 2) if g.unit == "query" else [i % n]
        remove_units(m, g, idx)


@pytest.mark.parametrize("build,gqa", [(am.bert, "query"), (am.llama, "query"), (lambda: am.llama(kv=3), "kv")])
def test_hf_roundtrip_same_outputs_and_widths(tmp_path, build, gqa):
    m = build()
    _prune_some(m, gqa)
    d = save_pruned(m, tmp_path / "pruned")
    cfg = json.loads((d / "config.json").read_text())
    rec = json.loads((d / "spectra.json").read_text())["groups"]
    # uniform Llama widths: standard config fields; BERT's config cannot describe removed heads: the record
    standard = build is not am.bert
    assert is_standard(d) is standard and ("spectra_pruned" in cfg) is not standard
    if standard:
        assert (cfg["intermediate_size"], cfg["num_attention_heads"], cfg["head_dim"]) == \
            (discover_groups(m, kinds="ffn")[0].size, m.model.layers[0].self_attn.q_proj.out_features // 8, 8)
        assert "standard Hugging Face folder" in loader_hint(d) and "AutoModelForCausalLM" in loader_hint(d)
    else:
        assert cfg["spectra_pruned"]["groups"] == rec and "hidden_size / num_attention_heads" in loader_hint(d)
    field = "kv_heads" if gqa == "kv" else "size"  # head groups record query heads (size) and KV heads
    assert {k: v.get(field, v["size"]) for k, v in rec.items()} == {g.name: g.size for g in discover_groups(m, gqa=gqa)}
    r = load_pruned(d)
    assert type(r) is type(m) and not r.training and count_params(r) == count_params(m)
    batch = am.token_batch()
    with torch.no_grad():
        a, b = m(**batch), r(**batch)
    key = "logits" if hasattr(a, "logits") else "last_hidden_state"
    torch.testing.assert_close(getattr(b, key), getattr(a, key), rtol=0, atol=0)
    if hasattr(m, "generate"):
        ids = batch["input_ids"][1:]
        assert r.generate(input_ids=ids, max_new_tokens=4, do_sample=False).tolist() == \
            m.generate(input_ids=ids, max_new_tokens=4, do_sample=False).tolist()
        assert r.lm_head.weight is r.model.embed_tokens.weight  # tying survives


def test_llama_heads_record_query_and_kv_counts(tmp_path):
    m = am.llama(kv=3)
    remove_units(m, discover_groups(m, kinds="head", gqa="kv")[0], [2])  # 3 -> 2 KV groups of 2
    remove_units(m, discover_groups(m, kinds="head")[0], [1, 3])  # 4 -> 2 query heads, 1 per group
    rec = json.loads((save_pruned(m, tmp_path / "x") / "spectra.json").read_text())["groups"]
    assert rec["model.layers.0.attn"] == {"kind": "head", "size": 2, "heads": 2, "kv_heads": 2}
    r = load_pruned(tmp_path / "x")
    assert r.model.layers[0].self_attn.num_key_value_groups == 1
    ids = am.token_batch(pad_last=0)["input_ids"]
    torch.testing.assert_close(r(input_ids=ids).logits, m(input_ids=ids).logits, rtol=0, atol=0)


def test_non_uniform_widths_keep_the_record_and_save_pretrained_roundtrips(tmp_path):
    m = am.llama()
    ffn = discover_groups(m, kinds="ffn")
    remove_units(m, ffn[0], [0, 1, 2])  # layer 0 keeps 37 FFN neurons, layer 1 keeps 39
    remove_units(m, ffn[1], [5])
    d = save_pruned(m, tmp_path / "p")
    cfg = json.loads((d / "config.json").read_text())
    assert not is_standard(d) and cfg["intermediate_size"] == 40 and cfg["spectra_pruned"]["standard"] is False
    assert "FFN widths differ across layers (37..39)" in loader_hint(d) and "load_pruned" in loader_hint(d)
    r = load_pruned(d)
    r.save_pretrained(tmp_path / "again")  # the record travels on the config, so load_pruned reads it back
    back = load_pruned(tmp_path / "again")
    ids = am.token_batch(pad_last=0)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, m(input_ids=ids).logits, rtol=0, atol=0)


def test_standard_folder_loads_with_plain_from_pretrained_and_save_pretrained_roundtrips(tmp_path):
    from transformers import AutoModelForCausalLM

    m = am.llama(kv=3)
    for g in discover_groups(m):
        remove_units(m, g, [0, 1] if g.kind == "ffn" else g.balanced(torch.arange(g.size, 0, -1).double(), 3))
    d = save_pruned(m, tmp_path / "s")
    ids = am.token_batch(pad_last=0)["input_ids"]
    for src in (d, tmp_path / "again"):
        r = AutoModelForCausalLM.from_pretrained(src)
        assert r.config.num_attention_heads == 3 and r.config.num_key_value_heads == 3
        assert not hasattr(r.config, "spectra_pruned")
        with torch.no_grad():
            torch.testing.assert_close(r(input_ids=ids).logits, m(input_ids=ids).logits, rtol=1e-6, atol=1e-6)
        r.save_pretrained(tmp_path / "again")
    assert is_standard(d) and count_params(load_pruned(d)) == count_params(m)


@pytest.mark.parametrize("build", [am.cnn, am.resnet, am.mlp])
def test_plain_module_roundtrip_needs_a_fresh_instance(tmp_path, build):
    m = build()
    _prune_some(m)
    d = save_pruned(m, tmp_path / "p")
    assert not (d / "config.json").exists()
    with pytest.raises(ValueError, match="pass model="):
        load_pruned(d)
    r = load_pruned(d, model=build())
    x = torch.randn(3, 1, 8, 8) if build is am.cnn else torch.randn(3, 3, 8, 8) if build is am.resnet \
        else torch.randn(3, 8)
    torch.testing.assert_close(r(x), m(x), rtol=0, atol=0)
    assert [g.size for g in discover_groups(r)] == [g.size for g in discover_groups(m)]


def test_overwrite_is_atomic_and_clean(tmp_path):
    m = am.mlp()
    d = save_pruned(m, tmp_path / "m")
    (d / "stale.txt").write_text("old")
    remove_units(m, discover_groups(m)[0], [0])
    save_pruned(m, d)
    assert not (d / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary siblings left
    assert load_pruned(d, model=am.mlp())[0].out_features == 15


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="spectra.json"):
        load_pruned(tmp_path)
    d = save_pruned(am.cnn(), tmp_path / "c")
    with pytest.raises(ValueError, match="no module"):
        load_pruned(d, model=am.mlp())
