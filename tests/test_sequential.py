"""Layer-sequential capture + scoring (spectra_gpu.sequential) equals the whole-model step
(rounds.capture_and_score): tiny random Llama / BERT models in the fast loop, the built-in SmolLM2 and MiniLM
(marked slow), lazily loaded blocks, hidden-state stores, and the peak-memory bar measured in subprocesses."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spectra_gpu.config import PruneConfig
from spectra_gpu.rounds import Baseline, apply_removals, capture_and_score, select_removals
from spectra_gpu.scorers import NEEDS_TAYLOR, SCORERS, SPECTRAL_SCORERS
from spectra_gpu.selection import select_units
from spectra_gpu.sequential import ShardedWeights, capture_and_score_sequential, find_blocks, load_empty
from spectra_gpu.units import discover_groups

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]
NO_GRAD_SCORERS = sorted(s for s in SCORERS if s not in NEEDS_TAYLOR)


def tiny_llama(layers: int = 3) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(hidden_size=48, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                                   num_hidden_layers=layers, vocab_size=101, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_bert(layers: int = 3) -> torch.nn.Module:
    cfg = transformers.BertConfig(hidden_size=48, intermediate_size=64, num_attention_heads=4,
                                  num_hidden_layers=layers, vocab_size=101, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


def token_batches(vocab: int, n: int = 2, b: int = 2, t: int = 20, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """n batches of b x t random tokens; the last row of each batch is padded after 3/4 of its tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (b, t), generator=g)
        mask = torch.ones_like(ids)
        mask[-1, (3 * t) // 4:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def assert_same(whole, seq, scorer: str, tol: float = 1e-8) -> None:
    assert list(whole.outputs) == list(seq.outputs)
    for name, a in whole.outputs.items():
        sa, sb = a.scores, seq.outputs[name].scores
        assert torch.equal(torch.isinf(sa), torch.isinf(sb)), name
        fin = torch.isfinite(sa)
        assert torch.allclose(sa[fin], sb[fin], rtol=0, atol=tol), (scorer, name, (sa[fin] - sb[fin]).abs().max())
        q = math.ceil(0.2 * len(sa))
        assert torch.equal(select_units(sa, q), select_units(sb, q)), (scorer, name)


# ---- fast: tiny random models --------------------------------------------------------------------------------
@pytest.mark.parametrize("build", [tiny_llama, tiny_bert], ids=["llama", "bert"])
@pytest.mark.parametrize("scorer", NO_GRAD_SCORERS)
def test_tiny_sequential_equals_whole_model(build, scorer):
    model = build()
    groups = discover_groups(model, ("ffn", "head"))
    calib = token_batches(101)
    cfg = PruneConfig(scorer=scorer, seed=3)
    whole = capture_and_score(model, groups, calib, cfg, round_index=1)
    seq = capture_and_score_sequential(model, groups, calib, cfg, round_index=1)
    assert_same(whole, seq, scorer)
    assert [r["block"] for r in seq.blocks] == [0, 1, 2]


@pytest.mark.parametrize("store", ["device", "cpu", "disk"])
def test_hidden_stores_give_the_same_scores(store, tmp_path):
    model = tiny_llama()
    groups = discover_groups(model, ("ffn", "head"))
    calib = token_batches(101)
    cfg = PruneConfig(scorer="spectral")
    whole = capture_and_score(model, groups, calib, cfg)
    seq = capture_and_score_sequential(model, groups, calib, cfg, hidden_store=store, hidden_dir=tmp_path)
    assert_same(whole, seq, "spectral")
    assert seq.hidden_bytes == 2 * 2 * 20 * 48 * 4  # one fp32 copy of every calibration token's hidden state
    assert list(tmp_path.iterdir()) == []  # the memory-mapped files are removed


def test_iterative_rounds_match():
    """Round 2 scores the model as pruned by round 1, through either path."""
    cfg = PruneConfig(scorer="spectral", target=0.3, round_fraction=0.2, kinds=("ffn", "head"))
    calib = token_batches(101, t=16)
    outs = []
    for sequential in (False, True):
        model = tiny_llama()
        groups = discover_groups(model, cfg.kinds)
        base = Baseline.of(model, groups, cfg)
        step = capture_and_score_sequential if sequential else capture_and_score
        for rnd in range(2):
            sc = step(model, groups, calib, cfg, round_index=rnd)
            if rnd == 0:
                apply_removals(model, groups, select_removals(groups, sc.outputs, cfg, base, rnd))
                groups = discover_groups(model, cfg.kinds)
        outs.append(sc)
    assert all(o.scores.shape[0] < 64 for n, o in outs[0].outputs.items() if n.endswith("ffn"))
    assert_same(outs[0], outs[1], "spectral")


def test_subset_of_groups_keeps_round_seeds():
    """Group i of the round's list is seeded as the i-th whatever block it sits in (random scorer)."""
    model = tiny_llama()
    groups = discover_groups(model, ("ffn",))[1:]
    calib = token_batches(101)
    cfg = PruneConfig(scorer="random", seed=5)
    assert_same(capture_and_score(model, groups, calib, cfg), capture_and_score_sequential(model, groups, calib, cfg),
                "random")


def test_lazy_block_from_shards_equals_eager(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path, max_shard_size="60KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    empty = load_empty(tmp_path)
    path, stack = find_blocks(empty)
    assert path == "model.layers" and all(p.is_meta for p in stack[1].parameters())
    w = ShardedWeights(tmp_path)
    assert w.load(stack[1], f"{path}.1", torch.device("cpu")) > 0
    eager = dict(model.model.layers[1].state_dict())
    lazy = dict(stack[1].state_dict())
    assert eager.keys() == lazy.keys() and all(torch.equal(eager[k], lazy[k]) for k in eager)
    ShardedWeights.release(stack[1])
    assert all(p.is_meta for p in stack[1].parameters())
    # and the whole sweep on the meta model scores like the eager model, leaving the model on meta
    calib = token_batches(101)
    cfg = PruneConfig(scorer="spectral")
    groups = discover_groups(empty, ("ffn", "head"))
    seq = capture_and_score_sequential(empty, groups, calib, cfg, weights=tmp_path)
    assert_same(capture_and_score(model, discover_groups(model, ("ffn", "head")), calib, cfg), seq, "spectral")
    assert all(p.is_meta for p in empty.parameters())


def test_lazy_bert_single_file(tmp_path):
    model = tiny_bert()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    empty = load_empty(tmp_path)
    calib = token_batches(101)
    cfg = PruneConfig(scorer="wanda_sp")
    seq = capture_and_score_sequential(empty, discover_groups(empty, ("ffn", "head")), calib, cfg, weights=tmp_path)
    assert_same(capture_and_score(model, discover_groups(model, ("ffn", "head")), calib, cfg), seq, "wanda_sp")


def test_errors():
    model = tiny_llama()
    groups = discover_groups(model, ("ffn",))
    calib = token_batches(101)
    with pytest.raises(ValueError, match="cannot be captured one block at a time"):
        capture_and_score_sequential(model, groups, calib, PruneConfig(scorer="taylor"))
    with pytest.raises(ValueError, match="hidden_store: expected one of"):
        capture_and_score_sequential(model, groups, calib, PruneConfig(), hidden_store="ram")
    with pytest.raises(ValueError, match="expected 'model.norm' to be a non-empty nn.ModuleList"):
        find_blocks(model, groups, "model.norm")
    with pytest.raises(ValueError, match="found no nn.ModuleList"):
        find_blocks(torch.nn.Sequential(torch.nn.Linear(3, 3)))
    with pytest.raises(ValueError, match="expected at least one calibration batch"):
        capture_and_score_sequential(model, groups, [], PruneConfig())


# ---- slow: the built-in models ------------------------------------------------------------------------------
def _real(name: str):
    from spectra_gpu.builtin import zoo

    try:
        model, _ = zoo.load_smollm2() if name == "smollm2" else zoo.load_minilm()
    except (ImportError, FileNotFoundError) as e:  # the bundled model packages are optional
        pytest.skip(f"{name} not installed: {e}")
    return model


@pytest.fixture(scope="module", params=["smollm2", "minilm"])
def real_model(request):
    model = _real(request.param)
    groups = discover_groups(model, ("ffn", "head"))
    _, stack = find_blocks(model, groups)
    first, last = stack[0], stack[len(stack) - 1]
    inside = {id(m) for b in (first, last) for m in b.modules()}
    # groups of the first and last blocks: the sweep still runs every block between them
    return model, [g for g in groups if id(g.consumer) in inside]


@pytest.mark.slow
def test_builtin_models_sequential_equals_whole_model(real_model):
    model, groups = real_model
    vocab = model.get_input_embeddings().num_embeddings
    calib = token_batches(vocab, n=2, b=2, t=24)
    for scorer in NO_GRAD_SCORERS:
        cfg = PruneConfig(scorer=scorer)
        whole = capture_and_score(model, groups, calib, cfg)
        seq = capture_and_score_sequential(model, groups, calib, cfg)
        assert_same(whole, seq, scorer, tol=1e-8 if scorer in SPECTRAL_SCORERS else 1e-10)


_RSS_SCRIPT = r"""
import json, sys, torch
from spectra_gpu.builtin import zoo
from spectra_gpu.config import PruneConfig
from spectra_gpu.rounds import capture_and_score
from spectra_gpu.sequential import capture_and_score_sequential
from spectra_gpu.units import discover_groups

def rss(key):
    with open("/proc/self/status") as f:
        return int(next(ln for ln in f if ln.startswith(key)).split()[1]) * 1024

model, _ = zoo.load_smollm2(fresh=False)
groups = discover_groups(model, ("ffn",))
g = torch.Generator().manual_seed(0)
calib = [{"input_ids": torch.randint(0, 49152, (2, 32), generator=g),
          "attention_mask": torch.ones(2, 32, dtype=torch.long)} for _ in range(2)]
cfg = PruneConfig(scorer="spectral", kinds=("ffn",))
import ctypes, gc
gc.collect()  # hand the heap freed while loading back to the OS, so neither path hides its growth in it
try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
except (OSError, AttributeError):
    pass
with open("/proc/self/clear_refs", "w") as f:  # reset the peak RSS to the current RSS: the model is loaded
    f.write("5")
start = rss("VmRSS")
step = capture_and_score_sequential if sys.argv[1] == "sequential" else capture_and_score
res = step(model, groups, calib, cfg)
print(json.dumps({"groups": len(res.outputs), "start": start, "peak": rss("VmHWM"),
                  "block_stats": 2 * 1536 * 1536 * 8}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_sequential_peak_rss_below_whole_model():
    _real("smollm2")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SPECTRA_GPU_PROGRESS": "0", "PYTHONPATH": str(ROOT)}
    got = {}
    for path in ("whole", "sequential"):
        done = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, path], capture_output=True, text=True, env=env,
                              timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        got[path] = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["whole"]["groups"] == got["sequential"]["groups"] == 30
    # the whole-model capture holds all 30 blocks' Grams; the sweep holds one block's at a time
    saved = got["whole"]["peak"] - got["sequential"]["peak"]
    assert saved >= 25 * got["whole"]["block_stats"], got


def test_sweep_leaves_the_model_as_it_was():
    """The sweep leaves the eager model's weights and training flag as they were."""
    model = tiny_llama().train()
    before = copy.deepcopy(model.state_dict())
    capture_and_score_sequential(model, discover_groups(model, ("ffn",)), token_batches(101), PruneConfig())
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---- compensation block by block -----------------------------------------------------------------------------
def _pruned_copy(dense: torch.nn.Module, removed: dict[str, list[int]]) -> torch.nn.Module:
    from spectra_gpu.surgery import remove_units
    model = copy.deepcopy(dense)
    by_name = {g.name: g for g in discover_groups(model, ("ffn", "head"))}
    for name, idx in removed.items():
        if idx:
            remove_units(model, by_name[name], idx)
    return model


@pytest.mark.parametrize("build", [tiny_llama, tiny_bert], ids=["llama", "bert"])
def test_compensate_blocks_fits_each_block_on_the_compensated_blocks_before_it(build):
    """compensate_blocks == the explicit order: for block i, the one-pass ``compensation`` of block i's groups
    on a model whose blocks before i are the pruned and already compensated ones and whose blocks from i on are
    dense (so block i sees the compensated upstream); it differs from the one-pass compensation of all groups
    at once, which does not see upstream refits; and ``dense`` is left unchanged."""
    from spectra_gpu.compensate import apply_refits, compensation
    from spectra_gpu.sequential import compensate_blocks
    dense = build()
    calib = token_batches(101, n=3)
    dgroups = discover_groups(dense, ("ffn", "head"))
    gen = torch.Generator().manual_seed(1)
    removed = {g.name: sorted(torch.randperm(g.size, generator=gen)[: g.size // 4 or 1].tolist()) for g in dgroups}
    for g in dgroups:
        if g.kind == "head" and (g.n_rep or 1) > 1:  # GQA: the same number of query heads from every KV group
            removed[g.name] = [j * int(g.n_rep) + j % int(g.n_rep) for j in range(int(g.kv_heads))]
    removed[dgroups[2].name] = []  # a group without removals is left alone
    before = {k: v.clone() for k, v in dense.state_dict().items()}

    got = _pruned_copy(dense, removed)
    refits = compensate_blocks(got, dense, discover_groups(got, ("ffn", "head")), dgroups, removed, calib,
                               precision="fp64", hidden_store="disk")
    assert sorted(refits) == sorted(n for n, r in removed.items() if r)
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items())

    want = _pruned_copy(dense, removed)
    path, stack = find_blocks(want)
    for bi in range(len(stack)):
        hybrid = copy.deepcopy(dense)
        hstack = hybrid.get_submodule(path)
        for j in range(bi):
            hstack[j] = copy.deepcopy(stack[j])
        names = [g.name for g in dgroups if g.name.startswith(f"{path}.{bi}.") and removed[g.name]]
        hgroups = [g for g in discover_groups(hybrid, ("ffn", "head")) if g.name in names]
        rf = compensation(hybrid, hgroups, {n: removed[n] for n in names}, calib, precision="fp64")
        apply_refits([g for g in discover_groups(want, ("ffn", "head")) if g.name in names], rf, removed)
    for (k, a), b in zip(want.state_dict().items(), got.state_dict().values(), strict=True):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7), (k, (a - b).abs().max())

    one_pass = _pruned_copy(dense, removed)
    apply_refits(discover_groups(one_pass, ("ffn", "head")),
                 compensation(dense, dgroups, removed, calib, precision="fp64"), removed)
    last = [k for k in got.state_dict() if k.startswith(f"{path}.{len(stack) - 1}.")]
    assert any(not torch.allclose(got.state_dict()[k], one_pass.state_dict()[k]) for k in last)
