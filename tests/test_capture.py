"""Capture through the streaming accumulator equals statistics of the full signals computed independently;
padding tokens are not samples; bounds and errors."""

from __future__ import annotations

import gc
import weakref

import _arch_models as am
import pytest
import torch
import torch.nn.functional as F

from spectra_gpu import SignalStats, capture, capture_taylor, declare_group, discover_groups, masked


def _same_stats(got: SignalStats, z: torch.Tensor, a: torch.Tensor, rtol: float = 1e-5) -> None:
    """got vs exact statistics of the full [N, M] signals."""
    assert got.m == z.shape[1]
    alive = torch.ones(z.shape[0], dtype=torch.bool)
    z, a = z.double(), a.double()
    for side, x in (("pre", z), ("post", a)):
        scale = float((x * x).sum(1).max())
        torch.testing.assert_close(got.gram(side, "raw", alive), x @ x.T, rtol=rtol, atol=rtol * scale)
        mu, sd = got.mean_std(side)
        torch.testing.assert_close(mu, x.mean(1), rtol=rtol, atol=1e-6)
        torch.testing.assert_close(sd, x.std(1, unbiased=False), rtol=rtol, atol=1e-6)


def test_mlp_capture_equals_full_signals():
    m = am.mlp()
    xs = [torch.randn(7, 8) for _ in range(3)]
    st = capture(m, discover_groups(m), xs, progress=False)
    x = torch.cat(xs)
    with torch.no_grad():
        z0 = m[1](m[0](x))
        a0 = F.relu(z0)
        z1 = m[4](a0)
        a1 = F.gelu(z1)
    _same_stats(st["0"], z0.T, a0.T)
    _same_stats(st["4"], z1.T, a1.T)


def test_conv_capture_all_positions_and_subsampled():
    m = am.cnn()
    x = torch.randn(5, 1, 8, 8)
    st = capture(m, discover_groups(m), [x], positions_per_image=None, progress=False)
    with torch.no_grad():
        z = m.b1(m.c1(x))
    zr = z.permute(1, 0, 2, 3).reshape(8, -1)  # [C, B*H*W]
    _same_stats(st["c1"], zr, F.relu(zr))
    # subsampled: M = images x positions, and Z and A come from the same positions (identity activation)
    g = declare_group(m, "channel", "c1", "c2", norm="b1", act=lambda t: t)
    sub = capture(m, [g], [x, x], positions_per_image=5, progress=False)["c1"]
    assert sub.m == 2 * 5 * 5
    alive = torch.ones(8, dtype=torch.bool)
    torch.testing.assert_close(sub.gram("pre", "raw", alive), sub.gram("post", "raw", alive))


def test_padding_tokens_are_not_samples():
    m = am.bert()
    batch = am.token_batch(pad_last=3)
    gs = discover_groups(m)
    padded = capture(m, gs, [batch], progress=False)
    singles = []
    for i in range(3):
        n = int(batch["attention_mask"][i].sum())
        singles.append({k: v[i:i + 1, :n] for k, v in batch.items()})
    unpadded = capture(m, gs, singles, progress=False)
    tokens = int(batch["attention_mask"].sum())
    alive48 = torch.ones(48, dtype=torch.bool)
    assert padded["encoder.layer.1.ffn"].m == tokens == unpadded["encoder.layer.1.ffn"].m
    for side in ("pre", "post"):
        torch.testing.assert_close(padded["encoder.layer.1.ffn"].gram(side, "zscore", alive48),
                                   unpadded["encoder.layer.1.ffn"].gram(side, "zscore", alive48), rtol=1e-4, atol=1e-3)
    assert padded["encoder.layer.0.attn"].m == tokens * 32  # heads: tokens x d_model coordinates


def test_swiglu_capture_equals_gate_and_down_input():
    m = am.llama()
    batch = am.token_batch()
    g = discover_groups(m, kinds="ffn")[1]
    seen = []
    mlp = m.model.layers[1].mlp
    h = mlp.register_forward_pre_hook(lambda _m, inp: seen.append(inp[0].detach()))
    try:
        st = capture(m, [g], [batch], progress=False)[g.name]
    finally:
        h.remove()
    x = seen[0][batch["attention_mask"].bool()]
    with torch.no_grad():
        z = mlp.gate_proj(x)
        a = F.silu(z) * mlp.up_proj(x)
    _same_stats(st, z.T, a.T)


@pytest.mark.parametrize("arch,gqa,kv", [("bert", "query", 0), ("llama", "query", 2), ("llama", "kv", 3)])
def test_head_signals_equal_masked_residual_writes(arch, gqa, kv):
    """A_h = the out-projection output with only unit h kept, minus the bias; Z_h = the out-projection of V
    (the unit's KV-group values, in its query slots): computed through the modules, not capture's einsum."""
    m = am.bert() if arch == "bert" else am.llama(kv=kv)
    batch = am.token_batch()
    g = discover_groups(m, kinds="head", gqa=gqa)[1]
    assert g.unit == {"bert": "head", "query": "query", "kv": "kv"}["bert" if arch == "bert" else gqa]
    keep_tok = batch["attention_mask"].bool()
    n, hd = g.size, g.head_dim
    r = (g.consumer.in_features // hd) // (g.v.out_features // hd)  # query heads per KV head, from the shapes
    bias = g.consumer.bias if g.consumer.bias is not None else 0.0
    outs, vals = [], []
    ho = g.consumer.register_forward_hook(lambda _m, _i, o: outs.append(o.detach()))
    hv = g.v.register_forward_hook(lambda _m, _i, o: vals.append(o.detach()))
    with torch.no_grad():
        try:
            for u in range(n):
                keep = torch.zeros(n, dtype=torch.bool)
                keep[u] = True
                with masked(m, {g: keep}):
                    m(**batch)
        finally:
            ho.remove()
            hv.remove()
        a = torch.stack([(o - bias)[keep_tok] for o in outs]).reshape(n, -1)
        v = vals[0][keep_tok]  # [T, KV * hd]
        zs = []
        for u in range(n):
            ctx = torch.zeros(v.shape[0], g.consumer.in_features)
            heads = range(u * r, (u + 1) * r) if g.unit == "kv" else [u]
            for h in heads:
                kvh = h // r
                ctx[:, h * hd:(h + 1) * hd] = v[:, kvh * hd:(kvh + 1) * hd]
            zs.append(g.consumer(ctx) - bias)
        z = torch.stack(zs).reshape(n, -1)
    st = capture(m, [g], [batch], progress=False)[g.name]
    assert st.mode == "exact"
    _same_stats(st, z, a, rtol=1e-4)


def test_max_samples_stops_early_and_truncates():
    m = am.mlp()
    calls = []

    def fwd(model, x):
        calls.append(1)
        return model(x)

    st = capture(m, discover_groups(m), [torch.randn(4, 8) for _ in range(10)], forward=fwd, max_samples=10,
                 progress=False)
    assert st["0"].m == 10 and st["4"].m == 10 and len(calls) == 3


def test_sketch_mode_for_units_exact_for_heads():
    m = am.bert()
    st = capture(m, discover_groups(m), [am.token_batch()], mode="sketch", sketch_dim=64, progress=False)
    assert st["encoder.layer.0.ffn"].mode == "sketch" and st["encoder.layer.0.attn"].mode == "exact"


def test_capture_errors():
    m = am.llama()
    kv = discover_groups(m, kinds="head", gqa="kv")  # 2 units
    with pytest.raises(ValueError, match="at least 3 units"):
        capture(m, kv, [am.token_batch()], progress=False)
    mlp = am.mlp()
    other = am.FunctionalMLP()
    g = declare_group(other, "neuron", "fc1", "fc2", act=torch.relu)
    with pytest.raises(ValueError, match="received no samples"):
        capture(mlp, [g], [torch.randn(3, 8)], progress=False)
    with pytest.raises(ValueError, match="max_samples"):
        capture(mlp, discover_groups(mlp), [torch.randn(3, 8)], max_samples=0, progress=False)


def test_taylor_equals_autograd_oracle():
    m = am.cnn()
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    got = capture_taylor(m, discover_groups(m), [(x, y)], lambda mod, b: F.cross_entropy(mod(b[0]), b[1]),
                         progress=False)
    assert all(p.grad is None for p in m.parameters())  # gradients cleared
    h1 = F.max_pool2d(F.relu(m.b1(m.c1(x))), 2)
    h1.retain_grad()
    h2 = torch.relu(m.b2(m.c2(h1)))
    f = torch.flatten(h2, 1)
    f.retain_grad()
    F.cross_entropy(m.fc(f), y).backward()
    want1 = (h1 * h1.grad).mean(dim=(2, 3)).abs().mean(0)
    want2 = (f * f.grad).reshape(6, 6, 16).mean(-1).abs().mean(0)
    torch.testing.assert_close(got["c1"], want1.double().detach(), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(got["c2"], want2.double().detach(), rtol=1e-5, atol=1e-9)


def test_taylor_frees_every_batch_graph():
    """The gradient hook must not keep the consumer input (and through it the batch's autograd graph) alive:
    a hook closure holding that tensor leaked ~400 MB per capture on MiniLM and OOM-killed SmolLM2 runs."""
    m = am.cnn()
    inputs = []
    h = m.fc.register_forward_pre_hook(lambda _m, inp: inputs.append(weakref.ref(inp[0])))
    try:
        capture_taylor(m, discover_groups(m), [(torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,)))] * 3,
                       lambda mod, b: F.cross_entropy(mod(b[0]), b[1]), progress=False)
    finally:
        h.remove()
    gc.collect()
    assert len(inputs) == 3 and all(r() is None for r in inputs)


def test_taylor_tokens_skip_padding():
    m = am.bert()
    batch = am.token_batch()
    g = discover_groups(m, kinds="ffn")[0]
    got = capture_taylor(m, [g], [batch], lambda mod, b: mod(**b).last_hidden_state.pow(2).mean(), progress=False)
    seen = []

    def pre(_m, inp):
        x = inp[0].detach().requires_grad_(True)
        seen.append(x)
        return (x,)

    h = g.consumer.register_forward_pre_hook(pre)
    try:
        m(**batch).last_hidden_state.pow(2).mean().backward()
    finally:
        h.remove()
        m.zero_grad(set_to_none=True)
    a = seen[0]
    keep = batch["attention_mask"].bool()
    want = (a * a.grad)[keep].mean(0).abs()
    torch.testing.assert_close(got[g.name], want.double().detach(), rtol=1e-5, atol=1e-12)


# ---- residual-stream channels ------------------------------------------------------------------------------
class _Residual(torch.nn.Module):
    """x -> fc_in -> [+ fc_a(relu(.)) ] -> LayerNorm -> fc_out: one stream of 5 channels."""

    def __init__(self):
        super().__init__()
        self.fc_in, self.fc_a = torch.nn.Linear(4, 5), torch.nn.Linear(5, 5)
        self.ln, self.fc_out = torch.nn.LayerNorm(5), torch.nn.Linear(5, 3)

    def forward(self, x):
        h = self.fc_in(x)
        h = h + self.fc_a(torch.relu(h))
        return self.fc_out(self.ln(h))


def test_capture_streams_pairs_each_write_with_the_next_read():
    from spectra_gpu.capture import capture_streams as cs
    from spectra_gpu.units import StreamGroup

    m = _Residual().eval()
    xs = [torch.randn(6, 2, 4) for _ in range(2)]
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [0, 1], [1, 1], [1, 1]])
    s = StreamGroup("s", (m.fc_in, m.fc_a, m.ln), (m.fc_a, m.fc_out))
    batches = [{"x": x, "attention_mask": mask} for x in xs]
    got, source = cs(m, [s], batches, forward=lambda mod, b: mod(b["x"]), progress=False)["s"]
    assert source == "pairs"
    zs, as_ = [], []
    with torch.no_grad():
        for x in xs:
            h0 = m.fc_in(x)
            w = m.fc_a(torch.relu(h0))
            keep = mask.bool()
            # fc_in's write pairs with fc_a's read relu(h0); fc_a's write with fc_out's read (the LayerNorm
            # output); the LayerNorm's own write is that very read: skipped
            zs += [h0[keep], w[keep]]
            as_ += [torch.relu(h0)[keep], m.ln(h0 + w)[keep]]
    _same_stats(got, torch.cat(zs).T, torch.cat(as_).T)
