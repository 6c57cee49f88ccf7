"""Physical removal equals masking for every unit kind, parameter counts follow the per-unit accounting of
docs/algorithm.md section 7, GQA stays consistent, generate works, bad removals are refused; EPR and FLOPs."""

from __future__ import annotations

import copy

import _arch_models as am
import pytest
import torch
from torch import nn

from spectra_gpu import count_params, discover_groups, epr, flops, masked, remove_units
from spectra_gpu.accounting import prunable_params


def _hf_out(m, b):
    out = m(**b)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _plain_out(m, x):
    return m(x)


CASES = {
    "mlp": (am.mlp, lambda: torch.randn(5, 8), _plain_out, "query"),
    "functional": (am.FunctionalMLP, lambda: torch.randn(5, 6), _plain_out, "query"),
    "cnn": (am.cnn, lambda: torch.randn(3, 1, 8, 8), _plain_out, "query"),
    "resnet": (am.resnet, lambda: torch.randn(2, 3, 8, 8), _plain_out, "query"),
    "bert": (am.bert, am.token_batch, _hf_out, "query"),
    "llama-query": (am.llama, am.token_batch, _hf_out, "query"),
    "llama-kv": (lambda: am.llama(kv=3), am.token_batch, _hf_out, "kv"),
}


def _pick(g, seed):
    n = g.size
    gen = torch.Generator().manual_seed(seed)
    if g.unit == "query":
        return g.balanced(torch.rand(n, generator=gen), n // 2)
    return torch.randperm(n, generator=gen)[: max(1, n // 2)]


@pytest.mark.parametrize("case", sorted(CASES))
def test_removal_equals_masking_and_counts(case):
    build, make_input, out, gqa = CASES[case]
    model = build()
    x = make_input()
    groups = discover_groups(model, gqa=gqa)
    assert groups
    masks, pruned = {}, copy.deepcopy(model)
    before = count_params(pruned)
    expected_removed = 0
    for i, g in enumerate(discover_groups(pruned, gqa=gqa)):
        idx = _pick(g, i)
        keep = torch.ones(g.size, dtype=torch.bool)
        keep[idx] = False
        masks[g.name] = keep
        expected_removed += g.unit_params() * len(idx)
        kept = remove_units(pruned, g, idx)
        assert kept.tolist() == keep.nonzero().flatten().tolist()
        assert g.size == int(keep.sum())
    with torch.no_grad():
        with masked(model, masks, groups):
            want = out(model, x)
        got = out(pruned, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert before - count_params(pruned) == expected_removed  # costs taken at the widths current at removal


def test_param_delta_equals_per_unit_cost_one_group_at_a_time():
    for build, gqa in ((am.mlp, "query"), (am.cnn, "query"), (am.bert, "query"), (am.llama, "query"),
                       (lambda: am.llama(kv=3), "kv")):
        m = build()
        for g in discover_groups(m, gqa=gqa):
            p0, cost = count_params(m), g.unit_params()
            idx = _pick(g, 0)
            remove_units(m, g, idx)
            assert p0 - count_params(m) == cost * len(idx), g.name


def test_bert_head_and_ffn_costs_are_the_spec_numbers():
    m = am.bert()
    ffn, attn = discover_groups(m)[:2]
    p0 = count_params(m)
    remove_units(m, attn, [1, 2])
    assert p0 - count_params(m) == 2 * (4 * 32 * 8 + 3 * 8)
    assert m.encoder.layer[0].attention.self.num_attention_heads == 2
    p1 = count_params(m)
    remove_units(m, ffn, torch.arange(10))
    assert p1 - count_params(m) == 10 * (32 + 1 + 32)


def test_gqa_query_heads_stay_uniform_and_generate_matches_masked():
    m = am.llama()
    g = discover_groups(m, kinds="head")[0]
    ids = am.token_batch(b=1, pad_last=0)["input_ids"]
    keep = torch.tensor([True, False, True, True, True, False])  # one head from each KV group
    with torch.no_grad(), masked(m, {g: keep}):
        want = m.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    pruned = copy.deepcopy(m)
    pg = discover_groups(pruned, kinds="head")[0]
    remove_units(pruned, pg, [1, 5])
    att = pruned.model.layers[0].self_attn
    assert att.num_key_value_groups == 2 and att.q_proj.out_features == 4 * 8 and att.k_proj.out_features == 2 * 8
    assert att.o_proj.in_features == 4 * 8
    with torch.no_grad():
        got = pruned.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    assert got.tolist() == want.tolist()


def test_gqa_kv_group_removal():
    m = am.llama(kv=3)
    g = discover_groups(m, kinds="head", gqa="kv")[1]
    remove_units(m, g, [1])
    att = m.model.layers[1].self_attn
    assert (att.k_proj.out_features, att.q_proj.out_features, att.num_key_value_groups) == (16, 32, 2)
    out = m.generate(input_ids=am.token_batch(b=1, pad_last=0)["input_ids"], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 10)


def test_bad_removals_are_refused():
    m = am.llama()
    g = discover_groups(m, kinds="head")[0]
    with pytest.raises(ValueError, match="same number of heads from every KV group"):
        remove_units(m, g, [0, 1])
    with pytest.raises(ValueError, match="refusing to remove the last head"):
        remove_units(m, g, range(6))
    f = discover_groups(m, kinds="ffn")[0]
    with pytest.raises(ValueError, match="refusing to remove every unit"):
        remove_units(m, f, range(40))
    with pytest.raises(ValueError, match=r"in \[0, 40\)"):
        remove_units(m, f, [40])
    with pytest.raises(ValueError, match="distinct"):
        remove_units(m, f, [3, 3])
    with pytest.raises(TypeError, match="int unit indices"):
        remove_units(m, f, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="does not belong"):
        remove_units(am.llama(), f, [1])
    kv = discover_groups(am.llama(kv=3), kinds="head", gqa="kv")[0]
    with pytest.raises(ValueError, match="last head"):
        remove_units(am.llama(kv=3), kv, [0, 1, 2])
    assert f.size == 40  # nothing was touched by refused calls


def test_an_empty_removal_changes_nothing():
    m = am.llama()
    f = discover_groups(m, kinds="ffn")[0]
    before = {k: v.clone() for k, v in m.state_dict().items()}
    remove_units(m, f, [])
    assert f.size == 40 and all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_epr_counts_the_sliced_model():
    m = am.llama()
    p0 = count_params(m)
    pr0 = prunable_params(m)
    emb = m.model.embed_tokens.weight.numel()  # tied with lm_head: counted once
    assert p0 == sum(p.numel() for p in set(m.parameters())) and m.lm_head.weight is m.model.embed_tokens.weight
    assert pr0 == p0 - emb - sum(p.numel() for n, p in m.named_parameters() if "norm" in n)
    f = discover_groups(m, kinds="ffn")[0]
    remove_units(m, f, range(20))
    r = epr(p0, m)
    removed = 20 * 3 * 48
    assert (r.params_before - r.params_after) == removed
    assert r.total == pytest.approx(removed / p0) and r.prunable == pytest.approx(removed / pr0)
    with pytest.raises(ValueError, match="params_before"):
        epr(10, m)


def test_flops_per_sample_match_the_analytic_count():
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    assert flops(m, torch.randn(5, 8)) == 2 * (8 * 16 + 16 * 4)
    remove_units(m, discover_groups(m)[0], range(6))
    assert flops(m, torch.randn(5, 8)) == 2 * (8 * 10 + 10 * 4)
    b = am.bert()
    f0 = flops(b, am.token_batch(pad_last=0))
    remove_units(b, discover_groups(b)[0], range(24))
    assert f0 - flops(b, am.token_batch(pad_last=0)) == pytest.approx(2 * 24 * 2 * 32)  # per token
