"""Closed-form compensation (spectra_gpu.compensate): the refit equals the explicit damped least-squares solution
on the stacked calibration samples (torch.linalg.lstsq), lowers the consumer-output error against plain
removal (the error the statistics predict is the one a forward measures), folds a constant unit exactly, works
on MLPs, CNNs (conv and flattened consumers) and Llama FFN / query heads, and lowers SmolLM2's held-out
perplexity at 25 % of every FFN layer removed at random (slow)."""

from __future__ import annotations

import copy

import _arch_models as am
import pytest
import torch
from torch import nn

from spectra_gpu import discover_groups, masked
from spectra_gpu.compensate import (
    apply_refits,
    capture_grams,
    compensate,
    compensate_sequential,
    compensation,
    dense_removals,
    refit,
)
from spectra_gpu.surgery import remove_units


def _random_removals(groups, frac: float, seed: int) -> dict[str, list[int]]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for g in groups:
        if g.unit == "query":  # one head from every KV group
            r, kv = g.n_rep, g.kv_heads
            out[g.name] = [j * r + int(torch.randint(r, (1,), generator=gen)) for j in range(kv)]
        else:
            q = max(1, int(frac * g.size))
            out[g.name] = sorted(torch.randperm(g.size, generator=gen)[:q].tolist())
    return out


def _consumer_inputs(model, groups, group, removed, batches, forward):
    """[M, D] stacked inputs of ``group``'s consumer on ``batches`` when every OTHER group's removals are masked
    (upstream ones change this input; downstream ones cannot), padding tokens dropped; Conv2d: unfolded
    patches. Independent of compensate's capture (masking.masked + one plain hook)."""
    rows = []

    def pre(_m, inp):
        x = inp[0].detach()
        c = group.consumer
        if isinstance(c, nn.Conv2d):
            p = torch.nn.functional.unfold(x, c.kernel_size, dilation=c.dilation, padding=c.padding, stride=c.stride)
            rows.append(p.transpose(1, 2).reshape(-1, p.shape[1]))
        elif x.dim() == 3 and current["mask"] is not None:
            rows.append(x[current["mask"].bool()])
        else:
            rows.append(x.reshape(-1, x.shape[-1]))

    current = {"mask": None}
    masks = {}
    for g in groups:
        if g is not group and removed.get(g.name):
            keep = torch.ones(g.size, dtype=torch.bool)
            keep[removed[g.name]] = False
            masks[g.name] = keep
    h = group.consumer.register_forward_pre_hook(pre)
    try:
        with torch.no_grad(), masked(model, masks, groups):
            for b in batches:
                current["mask"] = b.get("attention_mask") if isinstance(b, dict) else None
                forward(model, b)
    finally:
        h.remove()
    return torch.cat(rows).double()


def _explicit_refit(group, x: torch.Tensor, removed, damping: float = 0.01):
    """(W'_K, b') from torch.linalg.lstsq on the stacked samples: ridge rows sqrt(lam) I pull toward the dense
    kept columns; the bias column is not damped."""
    w = group.consumer.weight.detach().double().reshape(group.consumer.weight.shape[0], -1)
    b = group.consumer.bias
    width = w.shape[1] // group.size
    keep = torch.ones(group.size, dtype=torch.bool)
    keep[removed] = False
    kc = keep.repeat_interleave(width)
    xk, xr = x[:, kc], x[:, ~kc]
    lam = damping * float((x * x).sum(0).mean())
    target = xr @ w[:, ~kc].T  # what the removed columns contributed
    nk = xk.shape[1]
    design = torch.cat([xk, torch.ones(len(x), 1, dtype=x.dtype)], 1) if b is not None else xk
    ridge = torch.zeros(nk, design.shape[1], dtype=x.dtype)
    ridge[:, :nk] = lam**0.5 * torch.eye(nk, dtype=x.dtype)
    a = torch.cat([design, ridge])
    y = torch.cat([target, torch.zeros(nk, target.shape[1], dtype=x.dtype)])
    sol = torch.linalg.lstsq(a, y, driver="gelsd").solution.T  # [out, nk (+1)]
    new_w = w[:, kc] + sol[:, :nk]
    new_b = b.detach().double() + sol[:, nk] if b is not None else None
    return new_w, new_b


def _mlp_data(n: int = 4, batch: int = 32, d: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, d, generator=g, dtype=torch.float64) for _ in range(n)]


def _llama64():
    return am.llama().double()


def _token_batches(n: int = 3):
    return [am.token_batch(b=3, t=9, seed=s) for s in range(n)]


def _hf_forward(m, b):
    return m(**b)


def _plain_forward(m, x):
    return m(x)


CASES = {
    "mlp": (lambda: am.mlp().double(), _mlp_data, _plain_forward),
    "cnn": (lambda: am.cnn().double(), lambda: [torch.randn(16, 1, 8, 8, dtype=torch.float64) for _ in range(3)],
            _plain_forward),
    "llama": (_llama64, _token_batches, _hf_forward),
    "bert": (lambda: am.bert().double(), _token_batches, _hf_forward),
}


@pytest.mark.parametrize("case", list(CASES))
def test_refit_equals_explicit_least_squares(case):
    build, data, fwd = CASES[case]
    model, batches = build(), data()
    groups = discover_groups(model)
    removed = _random_removals(groups, 0.3, seed=1)
    refits = compensation(model, groups, removed, batches, forward=fwd, precision="fp64")
    assert set(refits) == {g.name for g in groups}
    kinds = set()
    for g in groups:
        x = _consumer_inputs(model, groups, g, removed, batches, fwd)
        want_w, want_b = _explicit_refit(g, x, removed[g.name])
        got_w = refits[g.name].weight.reshape(want_w.shape[0], -1)
        assert torch.allclose(got_w, want_w, rtol=1e-6, atol=1e-8), (g.name, (got_w - want_w).abs().max())
        if want_b is None:
            assert refits[g.name].bias is None
        else:
            assert torch.allclose(refits[g.name].bias, want_b, rtol=1e-6, atol=1e-8), g.name
        kinds.add((g.kind, type(g.consumer).__name__))
    expected = {"mlp": {("neuron", "Linear")}, "cnn": {("channel", "Conv2d"), ("channel", "Linear")},
                "llama": {("ffn", "Linear"), ("head", "Linear")}, "bert": {("ffn", "Linear"), ("head", "Linear")}}[case]
    assert kinds == expected


def _consumer_outputs(model, groups, batches, fwd):
    """{group: [M, out] consumer outputs} over the batches (padding tokens included; same for both models)."""
    outs = {g.name: [] for g in groups}
    hs = [g.consumer.register_forward_hook(lambda _m, _i, o, n=g.name: outs[n].append(o.detach().flatten(0, -2)
                                                                                    if o.dim() == 3 else o.detach()))
          for g in groups]
    try:
        with torch.no_grad():
            for b in batches:
                fwd(model, b)
    finally:
        for h in hs:
            h.remove()
    return {k: torch.cat(v) for k, v in outs.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_compensation_reduces_consumer_error_as_predicted(case):
    """Plain removal vs compensation, measured by a forward of each pruned model against the dense consumer on
    the very input each pruned consumer receives (so errors do not compound): the refit's error is below plain
    removal's, and both equal what the statistics predicted."""
    build, data, fwd = CASES[case]
    dense, batches = build(), data()
    if case in ("llama", "bert"):  # no padding here, so the forward's outputs are exactly the statistics' samples
        batches = [am.token_batch(b=3, t=9, pad_last=0, seed=s) for s in range(3)]
    groups = discover_groups(dense)
    removed = _random_removals(groups, 0.3, seed=2)
    for g in groups[1:]:  # only the first group: the dense consumer's input is then the same in every model
        removed.pop(g.name)
    g0 = groups[0]
    plain = copy.deepcopy(dense)
    pg = discover_groups(plain)
    remove_units(plain, pg[0], removed[g0.name])
    comp = copy.deepcopy(dense)
    cg = discover_groups(comp)
    refits = compensate(comp, cg, removed, batches, forward=fwd, precision="fp64")
    ref = _consumer_outputs(dense, groups, batches, fwd)[g0.name]
    err_plain = float(((_consumer_outputs(plain, pg, batches, fwd)[g0.name] - ref) ** 2).sum() / (ref**2).sum())
    err_comp = float(((_consumer_outputs(comp, cg, batches, fwd)[g0.name] - ref) ** 2).sum() / (ref**2).sum())
    rf = refits[g0.name]
    assert err_comp < err_plain
    assert err_plain == pytest.approx(rf.error_removed, rel=1e-6)
    assert err_comp == pytest.approx(rf.error_refit, rel=1e-6)


def test_constant_unit_is_folded_exactly():
    """A unit constant on the calibration set (zero incoming weights, positive bias, then ReLU) removed alone:
    the compensated model's output equals the dense one, and the refit reports it folded."""
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 4)).double().eval()
    with torch.no_grad():
        model[0].weight[3] = 0.0
        model[0].bias[3] = 0.7
    x = _mlp_data(d=6)
    dense = copy.deepcopy(model)
    groups = discover_groups(model)
    refits = compensate(model, groups, {groups[0].name: [3]}, x)
    assert refits[groups[0].name].folded == 1
    assert refits[groups[0].name].error_refit < 1e-20 < refits[groups[0].name].error_removed
    with torch.no_grad():
        for b in x:
            assert torch.allclose(model(b), dense(b), rtol=0, atol=1e-12)
    plain = copy.deepcopy(dense)
    remove_units(plain, discover_groups(plain)[0], [3])
    assert not torch.allclose(plain(x[0]), dense(x[0]), atol=1e-3)  # plain removal does change the output


def test_dead_units_fold_and_leave_the_kept_columns():
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 4)).double().eval()
    with torch.no_grad():
        model[0].weight[[1, 5]] = 0.0
        model[0].bias[[1, 5]] = -1.0  # dead after the ReLU
    x = _mlp_data(d=6)
    g = discover_groups(model)[0]
    stats = capture_grams(model, [g], {g.name: [1, 5]}, x)[g.name]
    rf = refit(g, stats, [1, 5])
    assert rf.folded == 2 and rf.error_removed == 0.0 and rf.error_refit == 0.0
    w = model[2].weight.detach()
    assert torch.allclose(rf.weight, w[:, [0, 2, 3, 4, 6, 7, 8, 9]]) and torch.allclose(rf.bias, model[2].bias)


def test_apply_refits_on_a_separately_pruned_model():
    """The driver's use: statistics on the dense copy, refits written into the model the rounds pruned (whose
    middle Linear also lost rows as the next group's producer), which then equals compensate() in place."""
    dense = am.mlp().double()
    batches = _mlp_data()
    groups = discover_groups(dense)
    removed = _random_removals(groups, 0.25, seed=3)
    refits = compensation(dense, groups, removed, batches)
    pruned = copy.deepcopy(dense)
    pg = discover_groups(pruned)
    for g in pg:
        remove_units(pruned, g, removed[g.name])
    apply_refits(pg, refits, removed)
    inplace = copy.deepcopy(dense)
    compensate(inplace, discover_groups(inplace), removed, batches)
    with torch.no_grad():
        assert torch.allclose(pruned(batches[0]), inplace(batches[0]), atol=1e-12)
    with pytest.raises(ValueError, match="output rows"):
        other = copy.deepcopy(dense)
        og = discover_groups(other)
        for g in og:
            remove_units(other, g, removed[g.name])
        apply_refits(og, refits)  # the middle Linear's rows cannot be matched without the removals


def test_sequential_fits_each_consumer_on_the_compensated_upstream():
    """compensate_sequential: the second group's refit is the explicit least squares on the inputs of the model
    whose first group is already removed and refit."""
    dense = am.mlp().double()
    batches = _mlp_data()
    removed = _random_removals(discover_groups(dense), 0.25, seed=4)
    seq = copy.deepcopy(dense)
    refits = compensate_sequential(seq, discover_groups(seq), removed, batches)
    first = copy.deepcopy(dense)
    g1, g2 = discover_groups(first)
    compensate(first, [g1], {g1.name: removed[g1.name]}, batches)
    g2 = discover_groups(first)[1]
    x = _consumer_inputs(first, [g2], g2, removed, batches, _plain_forward)
    want_w, want_b = _explicit_refit(g2, x, removed[g2.name])
    assert torch.allclose(refits[g2.name].weight, want_w, rtol=1e-6, atol=1e-8)
    assert torch.allclose(refits[g2.name].bias, want_b, rtol=1e-6, atol=1e-8)
    with torch.no_grad():
        assert seq(batches[0]).shape == dense(batches[0]).shape


def test_dense_removals_composes_rounds():
    # width 6: round 1 removes units 1 and 4 -> alive [0, 2, 3, 5]; round 2 removes positions 0 and 2 -> 0, 3
    assert dense_removals({"a": 6, "b": 3}, [{"a": [1, 4]}, {"a": [0, 2], "b": [2]}]) == {"a": [0, 1, 3, 4],
                                                                                          "b": [2]}
    with pytest.raises(ValueError, match="expected indices"):
        dense_removals({"a": 3}, [{"a": [0, 1]}, {"a": [1]}])
    with pytest.raises(ValueError, match="groups among"):
        dense_removals({"a": 3}, [{"b": [0]}])


def test_bad_input():
    model = am.mlp().double()
    groups = discover_groups(model)
    with pytest.raises(ValueError, match="unknown"):
        compensation(model, groups, {"nope": [0]}, _mlp_data())
    with pytest.raises(ValueError, match="damping"):
        g = groups[0]
        refit(g, capture_grams(model, [g], {g.name: [0]}, _mlp_data())[g.name], [0], damping=-1.0)
    with pytest.raises(ValueError, match="every unit"):
        compensation(model, groups, {groups[0].name: list(range(groups[0].size))}, _mlp_data())
    with pytest.raises(ValueError, match="precision"):
        capture_grams(model, groups, {}, _mlp_data(), precision="fp16")


@pytest.mark.slow
def test_smollm2_random_ffn_removal_compensated_beats_plain():
    """SmolLM2, 25 % of every FFN layer removed at random (seeded), no fine-tune: held-out perplexity of the
    english-text evaluation split is lower with compensation (16 x 128 calibration tokens) than without."""
    from spectra_gpu.builtin import text, zoo

    model, tok = zoo.load_smollm2()
    splits = zoo.english_corpus()
    calib = text.lm_batches(text.token_sequences(tok, splits.calibration[:40], 128)[:16], 8)
    evalb = text.lm_batches(text.token_sequences(tok, splits.evaluation, 128)[:16], 8)
    groups = discover_groups(model, "ffn")
    removed = _random_removals(groups, 0.25, seed=0)
    dense_ppl = text.perplexity(model, evalb)
    refits = compensation(model, groups, removed, calib)
    for g in groups:
        remove_units(model, g, removed[g.name])
    plain_ppl = text.perplexity(model, evalb)
    apply_refits(groups, refits, removed)
    comp_ppl = text.perplexity(model, evalb)
    print(f"SmolLM2 25% random FFN: dense {dense_ppl:.1f}, removed {plain_ppl:.1f}, compensated {comp_ppl:.1f}")
    assert dense_ppl < comp_ppl < plain_ppl
    assert all(rf.error_refit < rf.error_removed for rf in refits.values())
