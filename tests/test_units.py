"""Unit-group discovery, declaration, per-unit weights and costs, and the errors that say what to declare."""

from __future__ import annotations

import _arch_models as am
import pytest
import torch
from torch import nn

from spectra_gpu import declare_group, discover_groups


def _names(groups):
    return [(g.name, g.kind, g.size) for g in groups]


def test_discover_mlp_sequential_and_functional():
    assert _names(discover_groups(am.mlp())) == [("0", "neuron", 16), ("4", "neuron", 12)]
    gs = discover_groups(am.FunctionalMLP())
    assert _names(gs) == [("fc1", "neuron", 10), ("fc2", "neuron", 9)]
    z = torch.randn(4, 10)
    torch.testing.assert_close(gs[0].act(z), torch.nn.functional.leaky_relu(z, 0.2))


def test_discover_cnn_through_pool_and_flatten():
    gs = discover_groups(am.cnn())
    assert _names(gs) == [("c1", "channel", 8), ("c2", "channel", 6)]
    assert gs[0].norm is not None and gs[1].cols_per_unit == 16  # 4 x 4 flattened positions per channel


def test_discover_resnet_only_block_internal_channels():
    gs = discover_groups(am.resnet())
    # BasicBlock conv1, Bottleneck conv1/conv2; never the stem, conv2 of a BasicBlock, conv3 or downsample
    assert [g.name for g in gs] == ["layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "layer2.0.conv2"]
    assert all(g.kind == "channel" for g in gs)


def test_discover_bert_and_llama():
    b = discover_groups(am.bert())
    assert _names(b) == [("encoder.layer.0.ffn", "ffn", 48), ("encoder.layer.0.attn", "head", 4),
                         ("encoder.layer.1.ffn", "ffn", 48), ("encoder.layer.1.attn", "head", 4)]
    lq = discover_groups(am.llama(), kinds=["head"])
    assert _names(lq) == [("model.layers.0.attn", "head", 6), ("model.layers.1.attn", "head", 6)]
    assert {g.unit for g in lq} == {"query"} and lq[0].n_rep == 3 and lq[0].kv_heads == 2
    lk = discover_groups(am.llama(), kinds="head", gqa="kv")
    assert [(g.unit, g.size) for g in lk] == [("kv", 2), ("kv", 2)]
    assert _names(discover_groups(am.llama(), kinds="ffn")) == [("model.layers.0.ffn", "ffn", 40),
                                                               ("model.layers.1.ffn", "ffn", 40)]
    # one query head per KV group: query and KV units coincide, so the group uses KV units
    assert {g.unit for g in discover_groups(am.llama(kv=6), kinds="head")} == {"kv"}


def test_in_out_weights_match_module_slices():
    m = am.mlp()
    g = discover_groups(m)[0]
    torch.testing.assert_close(g.in_weight(), m[0].weight)
    torch.testing.assert_close(g.out_weight(), m[4].weight.T)
    c = am.cnn()
    g1, g2 = discover_groups(c)
    assert g1.in_weight().shape == (8, 9)
    torch.testing.assert_close(g1.out_weight()[3], c.c2.weight[:, 3].flatten())
    torch.testing.assert_close(g2.out_weight()[2], c.fc.weight[:, 32:48].flatten())
    lm = am.llama()
    f, h = discover_groups(lm, kinds="ffn")[0], discover_groups(lm, kinds="head")[0]
    mlp = lm.model.layers[0].mlp
    torch.testing.assert_close(f.in_weight()[5], torch.cat([mlp.gate_proj.weight[5], mlp.up_proj.weight[5]]))
    torch.testing.assert_close(f.out_weight()[5], mlp.down_proj.weight[:, 5])
    att = lm.model.layers[0].self_attn
    # query head 4 belongs to KV group 1 (3 query heads per group)
    want = torch.cat([att.q_proj.weight[32:40].flatten(), att.k_proj.weight[8:16].flatten(),
                      att.v_proj.weight[8:16].flatten()])
    torch.testing.assert_close(h.in_weight()[4], want)
    torch.testing.assert_close(h.out_weight()[4], att.o_proj.weight[:, 32:40].flatten())


def test_unit_params_match_the_spec_table():
    d, hd = 32, 8
    b = discover_groups(am.bert())
    assert b[0].unit_params() == d + 1 + d  # BERT FFN neuron: n_in + 1 + n_out
    assert b[1].unit_params() == 4 * d * hd + 3 * hd  # BERT head: 4 d d_h + 3 d_h
    lf, lh = discover_groups(am.llama(), kinds="ffn")[0], discover_groups(am.llama(), kinds="head")[0]
    assert lf.unit_params() == 3 * 48  # LLaMA FFN neuron: 3 d
    assert lh.unit_params() == 2 * 48 * 8  # GQA query head: its q rows and o columns
    assert discover_groups(am.llama(), kinds="head", gqa="kv")[0].unit_params() == (3 + 2 + 3) * 48 * 8
    g = discover_groups(am.mlp())[0]
    assert g.unit_params() == 8 + 1 + 12 + 2  # n_{l-1} + 1 + n_{l+1} + 2 (BN)
    c1 = discover_groups(am.cnn())[0]
    assert c1.unit_params() == 1 * 9 + 1 + 2 + 6 * 9  # C_in k k + 1 + 2 (BN) + C'_out k' k'


def test_balanced_takes_equal_counts_per_kv_group():
    g = discover_groups(am.llama(), kinds="head")[0]
    scores = torch.tensor([5.0, 1.0, 3.0, 0.5, 4.0, 2.0])
    assert g.balanced(scores, 2).tolist() == [1, 3]
    assert g.balanced(scores, 3).tolist() == [1, 3]  # rounded down to a multiple of 2 KV groups
    assert g.balanced(scores, 100).tolist() == [1, 2, 3, 5]  # never a whole KV group
    with pytest.raises(ValueError, match="expected 6 values"):
        g.balanced(torch.zeros(5), 2)


def test_declare_group_and_its_errors():
    m = am.FunctionalMLP()
    g = declare_group(m, "neuron", "fc1", "fc2", act=torch.relu, name="mine")
    assert (g.name, g.size, g.cols_per_unit) == ("mine", 10, 1)
    with pytest.raises(ValueError, match="has no submodule 'fc9'"):
        declare_group(m, "neuron", "fc9", "fc2")
    with pytest.raises(ValueError, match="expected 10 input"):
        declare_group(m, "neuron", "fc1", "fc3")
    with pytest.raises(ValueError, match="kind: expected"):
        declare_group(m, "head", "fc1", "fc2")
    with pytest.raises(ValueError, match="not a submodule"):
        declare_group(m, "neuron", nn.Linear(6, 10), "fc2")


def test_unrecognised_architecture_says_what_to_declare():
    class Rnn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.out = nn.GRU(4, 8, batch_first=True), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.rnn(x)[0][:, -1])

    with pytest.raises(ValueError, match=r"found no prunable unit groups in Rnn.*declare_group"):
        discover_groups(Rnn())
    with pytest.raises(ValueError, match="kinds: expected"):
        discover_groups(am.mlp(), kinds=["neurons"])
    with pytest.raises(TypeError, match="torch.nn.Module"):
        discover_groups("model")  # type: ignore[arg-type]


def test_per_channel_prelu_is_not_a_unit_activation():
    shared = nn.Sequential(nn.Linear(4, 6), nn.PReLU(), nn.Linear(6, 2))
    assert [g.name for g in discover_groups(shared)] == ["0"]
    with pytest.raises(ValueError, match="found no prunable unit groups"):
        discover_groups(nn.Sequential(nn.Linear(4, 6), nn.PReLU(6), nn.Linear(6, 2)))


def test_balanced_never_selects_every_unit():
    g = discover_groups(am.mlp())[1]
    assert len(g.balanced(torch.randn(12), 50)) == 11
    with pytest.raises(ValueError, match="n_remove"):
        g.balanced(torch.randn(12), -1)


# ---- residual-stream channel groups (declared by a frontend, never discovered) ------------------------------
def test_stream_group_widths_weights_and_errors():
    from spectra_gpu.units import StreamGroup

    emb, ln, lin, conv = nn.Embedding(20, 6), nn.LayerNorm(6), nn.Linear(6, 4), nn.Conv2d(3, 6, 3)
    read, flat = nn.Linear(6, 5), nn.Linear(6 * 4, 2)
    s = StreamGroup("h", (emb, ln, conv), (read, flat))
    assert s.size == 6 and s.kind == "stream" and len(s.modules()) == 5
    w_in = s.in_weight()
    assert w_in.shape == (6, 20 + 2 + 27)  # embedding columns, LN scale and shift, conv filters
    torch.testing.assert_close(w_in[:, :20], emb.weight.detach().T)
    torch.testing.assert_close(w_in[:, 20], ln.weight.detach())
    w_out = s.out_weight()
    assert w_out.shape == (6, 5 + 2 * 4)  # a reader's column; a flattened reader's block of 4 columns
    torch.testing.assert_close(w_out[:, :5], read.weight.detach().T)
    torch.testing.assert_close(w_out[1, 5:9], flat.weight.detach()[0, 4:8])
    with pytest.raises(ValueError, match="writer Linear expected 6 output channels, got 4"):
        StreamGroup("h", (emb, lin), ())
    with pytest.raises(ValueError, match="reader Linear expected 6 input channels"):
        StreamGroup("h", (emb,), (nn.Linear(5, 2),))
    with pytest.raises(ValueError, match="at least one writer or reader"):
        StreamGroup("h", (), ())
