"""The real packaged models (spectra_gpu.builtin.zoo): MiniLM (BERT) and SmolLM2-135M (Llama, GQA 9/3).
Masking == physical removal, exact parameter accounting, capture with padding, generate, save/reload."""

from __future__ import annotations

import copy

import pytest
import torch

from spectra_gpu import capture, count_params, discover_groups, load_pruned, masked, remove_units, save_pruned, score
from spectra_gpu.builtin import zoo
from spectra_gpu.io import is_standard, load_tokenizer, loader_hint


@pytest.fixture(scope="module")
def minilm():
    torch.set_num_threads(1)
    return zoo.load_minilm(fresh=False)


@pytest.fixture(scope="module")
def sentences():
    return zoo.rotten_tomatoes().test_texts[:4]


def _keep(n, idx):
    k = torch.ones(n, dtype=torch.bool)
    k[torch.as_tensor(idx)] = False
    return k


def test_minilm_removal_equals_masking_and_roundtrip(minilm, sentences, tmp_path):
    model, tok = minilm
    batch = dict(tok(sentences, padding=True, return_tensors="pt"))
    assert int((batch["attention_mask"] == 0).sum()) > 0  # the batch really has padding
    groups = discover_groups(model)
    assert [(g.kind, g.size) for g in groups[:2]] == [("ffn", 1536), ("head", 12)] and len(groups) == 12
    plan = {"encoder.layer.1.ffn": torch.arange(0, 1536, 3), "encoder.layer.4.ffn": torch.arange(700),
            "encoder.layer.0.attn": [0, 5, 6, 11], "encoder.layer.3.attn": list(range(11))}
    by = {g.name: g for g in groups}
    masks = {name: _keep(by[name].size, idx) for name, idx in plan.items()}
    pruned = copy.deepcopy(model)
    p0 = count_params(pruned)
    for g in discover_groups(pruned):
        if g.name in plan:
            remove_units(pruned, g, plan[g.name])
    with torch.no_grad():
        with masked(model, masks, groups):
            want = model(**batch).last_hidden_state
        got = pruned(**batch).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    n_ffn, n_heads = 512 + 700, 4 + 11
    assert p0 - count_params(pruned) == n_ffn * (384 + 1 + 384) + n_heads * (4 * 384 * 32 + 3 * 32)
    d = save_pruned(pruned, tmp_path / "minilm", tokenizer=tok)
    assert not is_standard(d) and "FFN widths differ across layers" in loader_hint(d)  # only 2 of 6 layers pruned
    back = load_pruned(d)
    with torch.no_grad():
        torch.testing.assert_close(back(**batch).last_hidden_state, got, rtol=0, atol=0)
    assert load_tokenizer(d)(sentences[0])["input_ids"] == tok(sentences[0])["input_ids"]


def test_minilm_capture_and_score(minilm, sentences):
    model, tok = minilm
    batch = dict(tok(sentences, padding=True, return_tensors="pt"))
    groups = [g for g in discover_groups(model) if g.name.startswith("encoder.layer.2.")]
    stats = capture(model, groups, [batch], progress=False)
    tokens = int(batch["attention_mask"].sum())
    assert stats["encoder.layer.2.ffn"].m == tokens and stats["encoder.layer.2.attn"].m == tokens * 384
    res = score(stats["encoder.layer.2.attn"], k=3, num_eigs=4)
    assert res.scores.shape == (12,) and res.alive.all()


@pytest.fixture(scope="module")
def smollm2():
    torch.set_num_threads(1)
    model, tok = zoo.load_smollm2(fresh=False)
    return model, tok


@pytest.mark.slow
def test_smollm2_removal_equals_masking_generate_and_roundtrip(smollm2, tmp_path):
    model, tok = smollm2
    assert count_params(model) == 134_515_008
    tok.padding_side = "right"
    batch = dict(tok(["The king is dead, long live", "To be or not"], padding=True, return_tensors="pt"))
    q = {g.name: g for g in discover_groups(model, kinds="head")}
    kv = {g.name: g for g in discover_groups(model, kinds="head", gqa="kv")}
    ffn = {g.name: g for g in discover_groups(model, kinds="ffn")}
    assert len(q) == len(ffn) == 30 and q["model.layers.5.attn"].size == 9 and kv["model.layers.7.attn"].size == 3
    heads5 = q["model.layers.5.attn"].balanced(torch.arange(9.0), 3)  # the first head of each KV group
    assert heads5.tolist() == [0, 3, 6]
    masks = {ffn["model.layers.3.ffn"]: _keep(1536, torch.arange(1, 1536, 2)),
             q["model.layers.5.attn"]: _keep(9, heads5),
             kv["model.layers.7.attn"]: _keep(3, [1])}
    pruned = copy.deepcopy(model)
    p0 = count_params(pruned)
    remove_units(pruned, discover_groups(pruned, kinds="ffn")[3], torch.arange(1, 1536, 2))
    remove_units(pruned, discover_groups(pruned, kinds="head")[5], heads5)
    remove_units(pruned, discover_groups(pruned, kinds="head", gqa="kv")[7], [1])
    d, hd = 576, 64
    assert p0 - count_params(pruned) == 768 * 3 * d + 3 * 2 * d * hd + (3 + 2 + 3) * d * hd
    att5, att7 = pruned.model.layers[5].self_attn, pruned.model.layers[7].self_attn
    assert (att5.num_key_value_groups, att5.q_proj.out_features, att5.k_proj.out_features) == (2, 6 * hd, 3 * hd)
    assert (att7.num_key_value_groups, att7.q_proj.out_features, att7.k_proj.out_features) == (3, 6 * hd, 2 * hd)
    with torch.no_grad():
        with masked(model, masks):
            want = model(**batch).logits
        got = pruned(**batch).logits
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-4, atol=1e-4)
    ids = tok("Hamlet, Prince of", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        with masked(model, masks):
            g_want = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
        g_got = pruned.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    assert g_got.tolist() == g_want.tolist()
    out = save_pruned(pruned, tmp_path / "smol", tokenizer=tok)
    assert not is_standard(out) and "spectra_gpu.load_pruned" in loader_hint(out)  # widths differ across layers
    back = load_pruned(out)
    with torch.no_grad():
        torch.testing.assert_close(back(**batch).logits, got, rtol=0, atol=0)
    assert back.lm_head.weight is back.model.embed_tokens.weight


@pytest.mark.slow
def test_smollm2_capture_heads_and_ffn(smollm2):
    model, tok = smollm2
    tok.padding_side = "right"
    batch = dict(tok(["Something is rotten in the state of Denmark.", "Words"], padding=True, return_tensors="pt"))
    groups = [g for g in discover_groups(model) if g.name.startswith("model.layers.20.")]
    stats = capture(model, groups, [batch], progress=False)
    tokens = int(batch["attention_mask"].sum())
    assert stats["model.layers.20.ffn"].m == tokens and stats["model.layers.20.attn"].m == tokens * 576
    assert stats["model.layers.20.attn"].n == 9
