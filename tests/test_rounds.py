"""The round's pieces: the analytic parameter count of a removal equals the count of the sliced model (also
when two groups edit one module), groups stay valid after removals, EPR in one place, prune_round composes
capture_and_score and select/trim/remove, and score_model is the same capture-and-score step."""

import copy

import pytest
import torch
from torch import nn

from spectra_gpu import accounting, rounds, surgery, units
from spectra_gpu.config import PruneConfig
from spectra_gpu.driver import score_model
from spectra_gpu.finetune import FinetuneConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # exact comparisons of runs, on one thread


def _mlp():
    torch.manual_seed(0)  # layer 2 is the consumer of group "0" and the producer of group "2"
    return nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 3))


def _cnn():
    from test_driver import TinyCNN

    torch.manual_seed(0)
    return TinyCNN().eval()


def _llama():
    from test_driver import _llama

    return _llama()


def _bert():
    from test_driver import _bert

    return _bert()


def _sliced_count(model, removal):
    """count_params after removing ``removal`` {group: indices} from a copy, by surgery."""
    m = copy.deepcopy(model)
    for g in units.discover_groups(m):
        if removal.get(g.name):
            surgery.remove_units(m, g, torch.tensor(removal[g.name]))
    return accounting.count_params(m)


def _removals(groups, seed):
    """A random legal removal per group (GQA query heads: the same number from every KV group)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for g in groups:
        if g.kind == "head" and g.unit == "query":
            kv, r = int(g.kv_heads), int(g.n_rep)
            per = int(torch.randint(0, r, (1,), generator=gen))
            out[g.name] = sorted(j * r + int(u) for j in range(kv) for u in torch.randperm(r, generator=gen)[:per])
        else:
            n = int(torch.randint(0, g.size, (1,), generator=gen))
            out[g.name] = sorted(torch.randperm(g.size, generator=gen)[:n].tolist())
    return out


@pytest.mark.parametrize("build", [_mlp, _cnn, _llama, _bert], ids=["mlp-shared-layer", "cnn-bn-flatten",
                                                                    "llama-gqa-heads-ffn", "bert-heads-ffn"])
def test_analytic_count_equals_sliced_model(build):
    model = build()
    groups = units.discover_groups(model)
    if build is _mlp:  # the shared module: consumer of one group, producer of the next
        assert groups[0].consumer is groups[1].producers[0]
    if build is _llama:
        assert {g.kind for g in groups} == {"ffn", "head"}
    for seed in range(3):
        rem = _removals(groups, seed)
        analytic = accounting.params_after_removal(model, groups, {g: len(v) for g, v in rem.items()})
        assert analytic == _sliced_count(model, rem)
    # per-unit cost sums over-count exactly where two groups share a module
    if build is _mlp:
        counts = {"0": 5, "2": 4}
        summed = accounting.count_params(model) - sum(g.unit_params() * counts[g.name] for g in groups)
        assert summed < accounting.params_after_removal(model, groups, counts)


def test_analytic_count_on_llama_kv_units():
    model = _llama()
    groups = units.discover_groups(model, gqa="kv")
    assert any(g.unit == "kv" for g in groups)
    for seed in range(3):
        rem = {}
        gen = torch.Generator().manual_seed(seed)
        for g in groups:
            n = int(torch.randint(0, g.size, (1,), generator=gen))
            rem[g.name] = sorted(torch.randperm(g.size, generator=gen)[:n].tolist())
        m = copy.deepcopy(model)
        for g in units.discover_groups(m, gqa="kv"):
            if rem[g.name]:
                surgery.remove_units(m, g, torch.tensor(rem[g.name]))
        assert accounting.params_after_removal(model, groups, {g: len(v) for g, v in rem.items()}) == \
            accounting.count_params(m)


def test_params_after_removal_rejects_bad_counts():
    model = _mlp()
    groups = units.discover_groups(model)
    with pytest.raises(ValueError, match="removed"):
        accounting.params_after_removal(model, groups, {"0": 21})


def test_groups_stay_valid_after_removal():
    for build in (_mlp, _llama):
        model = build()
        groups = units.discover_groups(model)
        rem = _removals(groups, 3)
        rounds.apply_removals(model, groups, rem)
        again = units.discover_groups(model)
        assert [g.name for g in again] == [g.name for g in groups]
        for old, new in zip(groups, again, strict=True):
            assert old.size == new.size and old.cols_per_unit == new.cols_per_unit
            assert torch.equal(old.in_weight(), new.in_weight()) and torch.equal(old.out_weight(), new.out_weight())
            assert old.unit_params() == new.unit_params()


def test_epr_basis_is_the_one_definition():
    basis = accounting.EprBasis(1000, 400, "prunable")
    assert basis(800) == pytest.approx(0.5) and basis.total(800) == pytest.approx(0.2)
    assert basis.budget(0.5) == 800 and basis(basis.budget(0.3)) >= 0.3 > basis(basis.budget(0.3) + 1)
    model = _mlp()
    p0 = accounting.count_params(model)
    groups = units.discover_groups(model)
    rounds.apply_removals(model, groups, {"0": [0, 1, 2]})
    e = accounting.epr(p0, model)
    assert e.total == pytest.approx((p0 - accounting.count_params(model)) / p0)
    assert e.prunable == pytest.approx((p0 - e.params_after) / e.prunable_before)


def test_prune_round_composes_the_steps():
    from test_driver import mlp_setup

    model, kw, calib = mlp_setup()
    cfg = PruneConfig(target=0.4, kinds=("neuron",), round_fraction=0.1, finetune=FinetuneConfig(epochs=0))
    groups = units.discover_groups(model, cfg.kinds)
    base = rounds.Baseline.of(model, groups, cfg)
    by_hand = copy.deepcopy(model)
    hand_groups = units.discover_groups(by_hand, cfg.kinds)
    rec = rounds.prune_round(model, groups, cfg, calib=calib, baseline=base, round_index=0)
    sc = rounds.capture_and_score(by_hand, hand_groups, calib, cfg)
    sel = rounds.select_removals(hand_groups, sc.outputs, cfg, base, 0)
    done = rounds.apply_removals(by_hand, hand_groups, rounds.trim_to_budget(by_hand, hand_groups, sel,
                                                                             base.epr.budget(cfg.target)))
    assert done == rec.removed_units and rec.removed == {"0": 5, "2": 4}
    assert rec.widths == {"0": 43, "2": 36} and rec.params == accounting.count_params(model)
    for g in groups:
        assert torch.equal(sc.outputs[g.name].scores, rec.outputs[g.name].scores)
    d = rec.to_dict()
    assert "metric" not in d and "outputs" not in d
    assert rounds.RoundRecord.from_dict(d).to_dict() == d
    rec.set_metric(None)
    assert rounds.RoundRecord.from_dict(rec.to_dict()).has_metric


def test_score_model_is_the_rounds_capture_and_score():
    from test_driver import mlp_setup

    model, _, calib = mlp_setup()
    outs, summary = score_model(model, calib, scorer="spectral", kinds=("neuron",), seed=3)
    cfg = PruneConfig(kinds=("neuron",), seed=3)
    sc = rounds.capture_and_score(model, units.discover_groups(model, ("neuron",)), calib, cfg)
    assert list(outs) == list(sc.outputs)
    for g in outs:
        assert torch.equal(outs[g].scores, sc.outputs[g].scores)
    assert summary["groups"]["0"]["lambda_1"] == float(sc.outputs["0"].extra["eigenvalues"][0])


def test_trim_lands_within_one_unit_of_the_budget():
    model = _mlp()
    groups = units.discover_groups(model)
    seq = [(g.name, [u]) for u in range(8) for g in groups]
    p0 = accounting.count_params(model)
    budget = p0 - 300
    cut = rounds.trim_to_budget(model, groups, seq, budget)
    counts = {}
    for g, b in cut:
        counts[g] = counts.get(g, 0) + len(b)
    assert accounting.params_after_removal(model, groups, counts) <= budget
    counts[cut[-1][0]] -= 1
    assert accounting.params_after_removal(model, groups, counts) > budget
    assert rounds.trim_to_budget(model, groups, seq, 0) == seq  # the whole round does not reach it


def test_scoring_block_by_block_with_offsets_equals_the_whole_round():
    from test_driver import mlp_setup

    model, _, calib = mlp_setup()
    cfg = PruneConfig(kinds=("neuron",), scorer="random", seed=5)
    groups = units.discover_groups(model, ("neuron",))
    whole = rounds.capture_and_score(model, groups, calib, cfg, round_index=2)
    for i, g in enumerate(groups):  # one "block" per group, signals captured for that block alone
        sig = rounds.capture_signals(model, [g], calib, cfg)
        outs, _ = rounds.score_groups([g], sig, cfg, round_index=2, group_offset=i)
        assert torch.equal(outs[g.name].scores, whole.outputs[g.name].scores)
    outs, _ = rounds.score_groups(groups[1:], rounds.capture_signals(model, groups[1:], calib, cfg), cfg,
                                  round_index=2)
    assert not torch.equal(outs[groups[1].name].scores, whole.outputs[groups[1].name].scores)  # offset matters


def test_nearest_trim_picks_the_step_boundary_closest_to_the_target():
    model = _mlp()
    groups = units.discover_groups(model)
    steps = [[(g.name, [u]) for g in groups] for u in range(8)]  # each step: one unit from every group
    p0 = accounting.count_params(model)
    counts = [accounting.params_after_removal(model, groups, {g.name: n for g in groups}) for n in range(9)]
    step = counts[2] - counts[3]
    for frac, want in ((0.3, 2), (0.7, 3)):  # the target 30% / 70% of the way from 2 steps to 3
        target = counts[2] - frac * step
        cut = rounds.trim_steps(model, groups, steps, int(target), nearest_to=target)
        assert len(cut) == want
        assert len(rounds.trim_steps(model, groups, steps, int(target))) == 3  # without: reach the budget
    assert rounds.trim_steps(model, groups, steps, p0 - 1, nearest_to=p0 - 0.4, min_steps=1) == steps[:1]
    assert rounds.trim_steps(model, groups, steps, p0 - 1, nearest_to=p0 - 0.4) == []
