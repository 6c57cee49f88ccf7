"""Adapters for other pruning frontends: Torch-Pruning (real torch-pruning package) and torch.nn.utils.prune.

Oracles are independent: signals collected with plain forward hooks and scored with ``sg.score``, the
pruned model's surviving weights compared with the original rows, and masking compared with physical removal.
Residual streams, every scorer and iterative pruning: tests/test_integrations_streams.py.
"""

from __future__ import annotations

import copy
import importlib
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import spectra_gpu as sg
from spectra_gpu.integrations import channel_scores, normalize, prune_channels, spectral_channel_scores
from spectra_gpu.integrations.nn_prune import ChannelScores, importance_scores

tp = pytest.importorskip("torch_pruning")
from spectra_gpu.integrations.torch_pruning import SpectraImportance, SpectralImportance  # noqa: E402

EXACT = dict(precision="fp64", positions_per_image=None)  # score the very signals an oracle collects


pytestmark = pytest.mark.usefixtures("one_thread")  # the adapters' exact comparisons, on one thread


class CNN(nn.Module):
    """conv-BN-ReLU(inplace)-pool, conv-F.relu-pool, fc-relu, fc (logits): three scorable layers, one not."""

    def __init__(self, c1: int = 8, c2: int = 12, h: int = 24) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c1)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.fc1 = nn.Linear(c2 * 9, h)
        self.fc2 = nn.Linear(h, 10)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # a BN that matters, negative gammas included
            self.bn1.running_mean.copy_(torch.rand(c1, generator=g) - 0.5)
            self.bn1.running_var.copy_(torch.rand(c1, generator=g) + 0.5)
            self.bn1.weight.copy_(torch.rand(c1, generator=g) * 3 - 1.5)
            self.bn1.bias.copy_(torch.rand(c1, generator=g) * 0.6 - 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.act1(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def _images(n: int = 2, b: int = 32, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 1, 12, 12, generator=g) for _ in range(n)]


def _cnn_oracle(model: CNN, batches: list[torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Pre/post signals [C, samples] of conv1 (post-BN), conv2 and fc1 with plain hooks, in eval mode."""
    got: dict[str, list[torch.Tensor]] = {k: [] for k in ("bn1", "act1", "conv2", "fc1")}

    def keep(key):
        return lambda m, i, o: got[key].append(o.detach().clone())

    hs = [model.bn1.register_forward_hook(keep("bn1")), model.act1.register_forward_hook(keep("act1")),
          model.conv2.register_forward_hook(keep("conv2")), model.fc1.register_forward_hook(keep("fc1"))]
    model.eval()
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in hs:
        h.remove()

    def conv_rows(ts):
        return torch.cat([t.movedim(1, 0).reshape(t.shape[1], -1) for t in ts], dim=1).double()

    def lin_rows(ts):
        return torch.cat([t.T for t in ts], dim=1).double()

    conv2 = conv_rows(got["conv2"])
    fc1 = lin_rows(got["fc1"])
    return {"conv1": (conv_rows(got["bn1"]), conv_rows(got["act1"])), "conv2": (conv2, torch.relu(conv2)),
            "fc1": (fc1, torch.relu(fc1))}


class Recording(SpectralImportance):
    """Keeps what the pruner saw: {root module: importance vector} for groups rooted at output channels,
    {(root module, "in"): vector} for groups rooted at input channels (attention heads)."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.seen: dict[object, torch.Tensor | None] = {}

    def __call__(self, group, **kwargs):
        out = super().__call__(group, **kwargs)
        dep = group[0].dep
        key = dep.target.module if dep.handler.__name__ == "prune_out_channels" else (dep.target.module, "in")
        self.seen[key] = out
        return out


# ---- calibration: the units and signals of spectra_gpu.units / capture ---------------------------------------
def _group(imp: SpectraImportance, name: str):
    return next(g for g in imp.groups if g.name == name)


def test_calibration_finds_layers_followed_by_an_activation():
    model = CNN()
    imp = SpectralImportance().calibrate(model, _images())
    assert SpectralImportance is SpectraImportance
    assert {g.name: g.kind for g in imp.groups} == {"conv1": "channel", "conv2": "channel", "fc1": "neuron"}
    assert _group(imp, "conv1").norm is model.bn1  # fc2 = logits: no unit group
    assert imp.calibration.stats["fc1"].m == 64
    assert imp.calibration.stats["conv2"].m == 64 * 36  # batch x the default 64 positions (36 exist)
    assert model.training  # mode restored


@pytest.mark.parametrize("layer", ["conv1", "conv2", "fc1"])
def test_calibrated_scores_equal_sg_score_on_hooked_signals(layer):
    model = CNN()
    batches = _images()
    imp = SpectralImportance(**EXACT).calibrate(model, batches)
    pre, post = _cnn_oracle(model, batches)[layer]
    want = sg.score(pre, post).scores
    got = imp.scores(_group(imp, layer)).scores
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)


def test_sample_cap_keeps_the_same_positions_for_pre_and_post():
    model = CNN()
    imp = SpectralImportance(positions_per_image=10).calibrate(model, _images())
    stats = imp.calibration.stats["conv1"]
    assert stats.m == 64 * 10
    # post = relu(pre) sample by sample iff the positions are shared: relu zeroes exactly the negative pre values
    mu_pre, _ = stats.mean_std("pre")
    mu_post, _ = stats.mean_std("post")
    assert bool((mu_post >= mu_pre - 1e-9).all())
    assert int(stats.nnz_post.sum()) < 640 * 8  # some zeros: post is an activation output


def test_in_place_residual_before_the_activation_is_a_stream_not_a_unit():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.head = nn.Linear(4, 6)
            self.out = nn.Linear(6, 2)

        def forward(self, x):
            out = self.bn(self.conv(x))
            out += x  # ResNet: the ReLU sees conv + identity, not a per-channel function of the conv
            return self.out(F.relu(self.head(F.relu(out).mean((2, 3)))))

    model = Block()
    x = torch.randn(8, 4, 6, 6)
    imp = Recording(**EXACT).calibrate(model, [x])
    assert [g.name for g in imp.groups] == ["head"]
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x[:1])
    got = imp(dg.get_pruning_group(model.conv, tp.prune_conv_out_channels, idxs=list(range(4))))
    (stream,) = imp.stream_groups()
    assert stream.writers == (model.conv, model.bn) and stream.readers == (model.head,)
    assert imp.calibration.stream_source(stream) == "pairs"
    # Z = the BN output before the in-place add; A = what head reads: relu(bn + x) pooled; Z pooled the same way
    model.eval()
    with torch.no_grad():
        w = model.bn(model.conv(x))
        z, a = w.mean((2, 3)), F.relu(w + x).mean((2, 3))
    torch.testing.assert_close(got, normalize(sg.score(z.T.double(), a.T.double()).scores, "rank"))


def test_dict_batches_drop_padding_tokens():
    transformers = pytest.importorskip("transformers")
    model = transformers.BertModel(transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48))
    ids = torch.randint(0, 50, (3, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, 6:] = 0
    mask[2, 3:] = 0
    imp = SpectralImportance().calibrate(model, [{"input_ids": ids, "attention_mask": mask}])
    assert imp.calibration.stats["encoder.layer.0.ffn"].m == int(mask.sum())
    assert imp.calibration.stats["encoder.layer.0.attn"].m == int(mask.sum()) * 32  # tokens x d_model writes


# ---- Torch-Pruning ---------------------------------------------------------------------------------------
def test_base_pruner_prunes_cnn_to_ratio_with_the_scores_of_sg_score():
    model = CNN()
    batches = _images()
    signals = _cnn_oracle(model, batches)
    w1 = model.conv1.weight.detach().clone()
    imp = Recording(**EXACT).calibrate(model, batches)
    pruner = tp.pruner.BasePruner(model, batches[0][:1], importance=imp, pruning_ratio=0.5,
                                  ignored_layers=[model.fc2])
    pruner.step()

    want = normalize(sg.score(*signals["conv1"]).scores, "rank")
    torch.testing.assert_close(imp.seen[model.conv1], want)
    keep = torch.argsort(want, descending=True)[:4].sort().values  # TP prunes the lowest half
    torch.testing.assert_close(model.conv1.weight, w1[keep])
    assert (model.conv1.out_channels, model.conv2.out_channels, model.fc1.out_features) == (4, 6, 12)
    assert model.fc2.out_features == 10
    assert model(batches[0]).shape == (32, 10)


def test_global_pruning_removes_the_requested_total():
    model = CNN(c1=8, c2=16, h=40)
    batches = _images()
    before = model.conv1.out_channels + model.conv2.out_channels + model.fc1.out_features
    for normalizer in ("rank", "zscore"):
        m = copy.deepcopy(model)
        imp = SpectralImportance(normalizer=normalizer).calibrate(m, batches)
        tp.pruner.BasePruner(m, batches[0][:1], importance=imp, pruning_ratio=0.5, global_pruning=True,
                             ignored_layers=[m.fc2]).step()
        widths = (m.conv1.out_channels, m.conv2.out_channels, m.fc1.out_features)
        assert sum(widths) == before // 2, (normalizer, widths)
        assert min(widths) >= 1
        assert m(batches[0]).shape == (32, 10)


def test_iterative_steps_recalibrate_on_the_current_shapes():
    model = CNN(c1=8, c2=16, h=40)
    batches = _images()
    imp = SpectralImportance().calibrate(model, batches)  # once: the batches are kept
    pruner = tp.pruner.BasePruner(model, batches[0][:1], importance=imp, pruning_ratio=0.5, iterative_steps=2,
                                  ignored_layers=[model.fc2])
    widths = []
    for _ in range(2):
        pruner.step()
        widths.append((model.conv1.out_channels, model.conv2.out_channels, model.fc1.out_features))
    assert widths == [(6, 12, 30), (4, 8, 20)]
    assert imp.calibration.captures == 2  # the second step captured again on the 6/12/30 model
    assert imp.calibration.stats["fc1"].n == 30
    assert model(batches[0]).shape == (32, 10)


def test_group_with_no_activation_after_it_is_scored_as_a_stream():
    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(64, 6)
    imp = SpectralImportance(**EXACT).calibrate(model, [x])
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 6))
    got = imp(dg.get_pruning_group(model[0], tp.prune_linear_out_channels, idxs=list(range(8))))
    (stream,) = imp.stream_groups()
    # model[1] reads model[0]'s output unchanged: no write/read pair, so Z = A = the read
    assert imp.calibration.stream_source(stream) == "reads"
    with torch.no_grad():
        h = model[0](x).T.double()
    torch.testing.assert_close(got, normalize(sg.score(h, h).scores, "rank"))
    assert imp(dg.get_pruning_group(model[1], tp.prune_linear_out_channels, idxs=list(range(8)))) is not None
    tp.pruner.BasePruner(model, torch.randn(1, 6), importance=imp, pruning_ratio=0.5,
                         ignored_layers=[model[3]]).step()
    assert (model[0].out_features, model[1].out_features) == (4, 4)  # both groups pruned


def test_llm_pruner_kwargs_and_bad_values():
    model = CNN()
    imp = SpectralImportance().calibrate(model, _images())
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 1, 12, 12))
    group = dg.get_pruning_group(model.fc1, tp.prune_linear_out_channels, idxs=list(range(24)))
    base = imp(group)
    tiled = imp(group, ch_groups=2, consecutive_groups=4)
    torch.testing.assert_close(tiled, base.view(2, -1).mean(0).repeat(2))
    torch.testing.assert_close(imp(group, consecutive_groups=4, some_future_kwarg=True), base)
    with pytest.raises(ValueError, match="ch_groups: expected a positive int dividing the root's 24"):
        imp(group, ch_groups=5)


def test_missing_calibration_is_an_error_and_a_changed_model_is_captured_again():
    model = CNN()
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 1, 12, 12))
    group = dg.get_pruning_group(model.fc1, tp.prune_linear_out_channels, idxs=list(range(24)))
    with pytest.raises(RuntimeError, match="imp.calibrate"):
        SpectralImportance()(group)
    imp = SpectralImportance(**EXACT).calibrate(model, _images())
    assert imp.calibration.captures == 1
    dg.get_pruning_group(model.fc1, tp.prune_linear_out_channels, idxs=[0, 1]).prune()
    group = dg.get_pruning_group(model.fc1, tp.prune_linear_out_channels, idxs=list(range(22)))
    got = imp(group)
    assert imp.calibration.captures == 2 and got.shape == (22,)
    torch.testing.assert_close(got, normalize(sg.score(*_cnn_oracle(model, _images())["fc1"]).scores, "rank"))


def _tiny_bert(seed: int = 0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48)
    return transformers.BertModel(cfg).eval()


def _head_writes(v: torch.Tensor, ctx: torch.Tensor, w_o: torch.Tensor, n_heads: int) -> tuple[torch.Tensor, ...]:
    """[H, tokens * d_model] residual writes of every head: Z_h = V_h W_O^h (attention replaced by the
    identity), A_h = ctx_h W_O^h (the actual write), from value states and out-projection inputs."""
    hd = w_o.shape[1] // n_heads
    v, ctx = v.reshape(-1, n_heads, hd).double(), ctx.reshape(-1, n_heads, hd).double()
    w = w_o.detach().double().reshape(w_o.shape[0], n_heads, hd)
    z = torch.einsum("mhk,dhk->hmd", v, w).reshape(n_heads, -1)
    a = torch.einsum("mhk,dhk->hmd", ctx, w).reshape(n_heads, -1)
    return z, a


def _bert_head_oracle(model, ids) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer-0 head writes from the value output and the out-projection input, with plain hooks."""
    att = model.encoder.layer[0].attention
    got = {}
    hs = [att.self.value.register_forward_hook(lambda m, i, o: got.__setitem__("v", o.detach().clone())),
          att.output.dense.register_forward_pre_hook(lambda m, i: got.__setitem__("o", i[0].detach().clone()))]
    with torch.no_grad():
        model(ids)
    for h in hs:
        h.remove()
    return _head_writes(got["v"], got["o"], att.output.dense.weight, 4)


def test_base_pruner_prunes_bert_heads_ffn_and_hidden_size_and_it_still_runs():
    model = _tiny_bert()
    ids = torch.randint(0, 60, (16, 12), generator=torch.Generator().manual_seed(0))
    pre, post = _bert_head_oracle(model, ids)
    layer0 = model.encoder.layer[0]
    wv = layer0.attention.self.value.weight.detach().clone()
    imp = Recording(**EXACT).calibrate(model, [ids])
    num_heads = {}
    for m in model.modules():
        if hasattr(m, "query"):
            num_heads.update({m.query: 4, m.key: 4, m.value: 4})
    pruner = tp.pruner.BasePruner(model, ids[:1], importance=imp, num_heads=num_heads, prune_num_heads=True,
                                  prune_head_dims=False, head_pruning_ratio=0.5, pruning_ratio=0.5,
                                  ignored_layers=[model.pooler])
    pruner.step()

    head_imp = normalize(sg.score(pre, post).scores, "rank")
    torch.testing.assert_close(imp.seen[(layer0.attention.output.dense, "in")], head_imp.repeat_interleave(8),
                               rtol=0, atol=1e-8)
    kept = torch.argsort(head_imp, descending=True)[:2].sort().values  # TP's imp.view(heads, -1).mean(1)
    rows = torch.cat([torch.arange(h * 8, h * 8 + 8) for h in kept.tolist()])
    assert None not in imp.seen.values()  # every group scored: heads, FFN neurons and the hidden size
    (hidden,) = imp.stream_groups()
    assert imp.calibration.stream_source(hidden) == "pairs"
    assert model.embeddings.word_embeddings in hidden.writers and layer0.attention.self.value in hidden.readers
    hidden_imp = next(v for k, v in imp.seen.items() if any(k is m for m in hidden.writers))
    cols = torch.argsort(hidden_imp, descending=True)[:16].sort().values
    torch.testing.assert_close(layer0.attention.self.value.weight, wv[rows][:, cols])

    for layer in model.encoder.layer:
        sa = layer.attention.self
        assert sa.query.out_features == sa.key.out_features == sa.value.out_features == 16
        assert layer.intermediate.dense.out_features == 24
        assert layer.output.dense.out_features == 16
        sa.num_attention_heads, sa.attention_head_size, sa.all_head_size = 2, 8, 16  # TP leaves these to us
    assert model(ids).last_hidden_state.shape == (16, 12, 16)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_gqa_llama_signals_match_hooks(impl):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=60, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=40)
    model = transformers.LlamaModel(cfg).eval()
    model.set_attn_implementation(impl)
    ids = torch.randint(0, 60, (4, 16), generator=torch.Generator().manual_seed(0))
    layer = model.layers[0]
    got = {}
    hs = [layer.self_attn.v_proj.register_forward_hook(lambda m, i, o: got.__setitem__("v", o.clone())),
          layer.self_attn.o_proj.register_forward_pre_hook(lambda m, i: got.__setitem__("o", i[0].clone())),
          layer.mlp.gate_proj.register_forward_hook(lambda m, i, o: got.__setitem__("g", o.clone())),
          layer.mlp.down_proj.register_forward_pre_hook(lambda m, i: got.__setitem__("h", i[0].clone()))]
    with torch.no_grad():
        model(ids)
    for h in hs:
        h.remove()
    v = got["v"].view(4, 16, 2, 8).repeat_interleave(2, dim=2)  # query head h reads KV head h // 2
    zh, ah = _head_writes(v, got["o"], layer.self_attn.o_proj.weight, 4)
    rows = {"v": zh, "o": ah, "g": got["g"].reshape(64, -1).T.double(), "h": got["h"].reshape(64, -1).T.double()}
    imp = SpectralImportance(**EXACT).calibrate(model, [ids])
    ffn, attn = _group(imp, "layers.0.ffn"), _group(imp, "layers.0.attn")
    assert ffn.producers == (layer.mlp.gate_proj, layer.mlp.up_proj) and ffn.act is None  # A = silu(G) * U
    assert attn.unit == "query"
    for g, pre, post in ((attn, "v", "o"), (ffn, "g", "h")):
        stats = imp.calibration.stats[g.name]
        for side in ("pre", "post"):
            mu, sd = stats.mean_std(side)
            x = rows[pre if side == "pre" else post]
            torch.testing.assert_close(mu, x.mean(1))
            torch.testing.assert_close(sd, x.std(1, correction=0))
            xs = x - x.mean(1, keepdim=True)
            torch.testing.assert_close(stats.gram(side, "center", torch.ones(len(x), dtype=torch.bool)), xs @ xs.T)
    want = sg.score(rows["g"], rows["h"]).scores
    torch.testing.assert_close(imp.scores(ffn).scores, want, rtol=1e-7, atol=1e-9)
    # KV channels get the mean of their query heads; q channels and o_proj inputs their own head's score
    from spectra_gpu.integrations.torch_pruning import unit_channel_scores

    heads = imp.calibration.importance(attn)
    torch.testing.assert_close(unit_channel_scores(attn, layer.self_attn.k_proj, "out", heads),
                               heads.view(2, 2).mean(1).repeat_interleave(8))
    torch.testing.assert_close(unit_channel_scores(attn, layer.self_attn.o_proj, "in", heads),
                               heads.repeat_interleave(8))


def test_missing_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_pruning", None)
    monkeypatch.delitem(sys.modules, "spectra_gpu.integrations.torch_pruning")
    with pytest.raises(ImportError, match=r"pip install 'spectra_gpu\[prune\]'"):
        importlib.import_module("spectra_gpu.integrations.torch_pruning")
    import spectra_gpu.integrations as integ

    with pytest.raises(ImportError, match=r"spectra_gpu\[prune\]"):
        integ.SpectralImportance  # noqa: B018
    monkeypatch.undo()
    assert importlib.import_module("spectra_gpu.integrations.torch_pruning").SpectralImportance


# ---- normalisation ---------------------------------------------------------------------------------------
def test_normalize_scales():
    s = torch.tensor([0.2, -torch.inf, 1.0, 0.5, 0.5, -torch.inf], dtype=torch.float64)
    r = normalize(s, "rank")
    assert torch.isfinite(r).all()
    assert r[0] < r[3] <= r[4] < r[2] and float(r[[1, 5]].max()) < float(r[[0, 2, 3, 4]].min())
    assert float(r[[0, 2, 3, 4]].min()) > 0 and float(r.max()) < 1.001
    z = normalize(s, "zscore")
    assert abs(float(z[[0, 2, 3, 4]].mean())) < 1e-6 and float(z[1]) < float(z[[0, 2, 3, 4]].min())
    assert torch.isneginf(normalize(s, None)[1])
    torch.testing.assert_close(normalize(s, "max")[[0, 2]], torch.tensor([0.2, 1.0], dtype=torch.float64),
                               atol=1e-8, rtol=0)
    ties = normalize(torch.tensor([0.5, 0.5, -torch.inf, -torch.inf, 0.5]), "zscore")
    assert ties.unique().numel() == 5 and ties[0] < ties[1] < ties[4] and ties[2] < ties[3] < ties[0]
    with pytest.raises(ValueError, match="normalizer: expected one of"):
        SpectralImportance(normalizer="lamp")


def test_constructor_and_calibrate_validation():
    with pytest.raises(ValueError, match="k: expected an int >= 1, got 0"):
        SpectralImportance(k=0)
    with pytest.raises(ValueError, match="positions_per_image"):
        SpectralImportance(positions_per_image=0)
    with pytest.raises(ValueError, match="scorer: expected one of"):
        SpectraImportance("lamp")
    with pytest.raises(ValueError, match="scorer 'l1' takes no options"):
        SpectraImportance("l1", k=5)
    imp = SpectralImportance()
    with pytest.raises(TypeError, match="expected an iterable of batches, got one Tensor"):
        imp.calibrate(CNN(), torch.randn(2, 1, 12, 12))
    with pytest.raises(ValueError, match="at least one calibration batch"):
        imp.calibrate(CNN(), [])
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        imp.calibrate("cnn", [torch.randn(2, 1, 12, 12)])


# ---- torch.nn.utils.prune --------------------------------------------------------------------------------
def test_nn_prune_masks_equal_physical_removal():
    model = CNN()
    batches = _images()
    scores = spectral_channel_scores(model, batches, **EXACT)
    assert set(scores) == {"conv1", "conv2", "fc1"}
    signals = _cnn_oracle(model, batches)
    torch.testing.assert_close(scores["conv1"].scores, normalize(sg.score(*signals["conv1"]).scores, "rank"))
    reference = copy.deepcopy(model).eval()

    kept = prune_channels(scores, amount=0.5)
    for name, s in scores.items():
        want = torch.zeros_like(kept[name])
        want[torch.argsort(s.scores, descending=True)[: (len(want) + 1) // 2]] = True
        assert torch.equal(kept[name], want), name

    dg = tp.DependencyGraph().build_dependency(reference, example_inputs=batches[0][:1])
    for name in ("conv1", "conv2"):
        drop = (~kept[name]).nonzero().flatten().tolist()
        dg.get_pruning_group(getattr(reference, name), tp.prune_conv_out_channels, idxs=drop).prune()
    drop = (~kept["fc1"]).nonzero().flatten().tolist()
    dg.get_pruning_group(reference.fc1, tp.prune_linear_out_channels, idxs=drop).prune()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(batches[0]), reference(batches[0]), rtol=1e-5, atol=1e-5)


def test_importance_scores_shape_and_order():
    lin = nn.Linear(5, 4)
    s = ChannelScores("lin", lin, 0, torch.tensor([0.3, -2.0, 0.9, 0.1]), None, None)
    imp = importance_scores(s)
    assert imp.shape == lin.weight.shape
    torch.testing.assert_close(imp[:, 0], torch.tensor([3.0, 1.0, 4.0, 2.0]))
    torch.testing.assert_close(importance_scores(s, "bias"), torch.tensor([3.0, 1.0, 4.0, 2.0]))
    with pytest.raises(ValueError, match=r"expected 4 slices along dim 1 .* got shape \(4, 5\)"):
        importance_scores(ChannelScores("lin", lin, 1, torch.zeros(4), None, None))


def test_nn_prune_heads_mask_whole_heads_and_swiglu_masks_gate_and_up():
    transformers = pytest.importorskip("transformers")
    bert = _tiny_bert()
    ids = torch.randint(0, 60, (8, 12), generator=torch.Generator().manual_seed(0))
    scores = channel_scores(bert, [ids], "wanda_sp")
    s = scores["encoder.layer.0.attn"]
    assert s.dim == 1 and s.module is bert.encoder.layer[0].attention.output.dense and s.scores.shape == (32,)
    kept = prune_channels([s], amount=0.5)["encoder.layer.0.attn"].view(4, 8)
    assert bool((kept.all(1) | ~kept.any(1)).all()) and int(kept.all(1).sum()) == 2  # two whole heads kept
    head = s.result.scores  # per head: the lowest two are masked
    assert set(torch.argsort(head)[:2].tolist()) == set((~kept.all(1)).nonzero().flatten().tolist())

    torch.manual_seed(0)
    llama = transformers.LlamaModel(transformers.LlamaConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=40)).eval()
    ffn = channel_scores(llama, [ids], "act_mean")["layers.0.ffn"]
    mlp = llama.layers[0].mlp
    assert ffn.module is mlp.gate_proj and ffn.co_producers == (mlp.up_proj,)
    keep = prune_channels([ffn], amount=0.25)["layers.0.ffn"]
    assert int((~keep).sum()) == 10
    assert bool((mlp.up_proj.weight[~keep] == 0).all()) and bool((mlp.up_proj.weight[keep] != 0).any())
    assert bool((mlp.gate_proj.weight[~keep] == 0).all())
