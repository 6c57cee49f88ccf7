"""The iterative driver: exact EPR target per unit kind (counted on the sliced model), min-keep, GQA balance,
resume after an injected crash gives the same report, options and errors."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spectra_gpu import accounting, units
from spectra_gpu.driver import PruneConfig, TargetUnreachableError, prune, score_model
from spectra_gpu.finetune import FinetuneConfig
from spectra_gpu.report import atomic_write
from spectra_gpu.run_store import CHECKPOINT

pytestmark = pytest.mark.usefixtures("one_thread")  # exact comparisons of runs, on one thread


def _xy(n, d, classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, classes, generator=g)
    return x, (x @ w).argmax(1)


def mlp_setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 48), nn.ReLU(), nn.Linear(48, 40), nn.ReLU(), nn.Linear(40, 4))
    x, y = _xy(600, 16, 4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    calib = [(x[i:i + 200], y[i:i + 200]) for i in range(0, 400, 200)]
    test = (x[400:], y[400:])

    def loss_fn(m, b):
        return F.cross_entropy(m(b[0]), b[1])

    def evaluate(m):
        return float((m(test[0]).argmax(1) == test[1]).float().mean())

    def train_batches(ep):
        p = torch.randperm(400, generator=torch.Generator().manual_seed(ep))
        return [(x[i], y[i]) for i in torch.split(p, 50)]

    return model.eval(), dict(loss_fn=loss_fn, evaluate=evaluate, train_batches=train_batches, metric_name="acc"), calib


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 24, 3, padding=1), nn.BatchNorm2d(24)
        self.fc = nn.Linear(24 * 4 * 4, 3)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc(x.flatten(1))


def _bert():
    from transformers import BertConfig, BertModel

    from spectra_gpu.builtin.tasks import EncoderClassifier

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=32)
    return EncoderClassifier(BertModel(cfg)).eval()


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=60, hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


def _text_batches(n_batches=3, b=8, t=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(1, 60, (b, t), generator=g)
        mask = torch.ones(b, t, dtype=torch.int64)
        mask[: b // 2, t - 3:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _check_target(model, report, cfg, costs_before):
    """Free widths: EPR >= target on the sliced model, overshoot below one removal item (a unit, or a GQA
    block; its cost at the original widths bounds its cost at any later width). Uniform widths: the EPR within
    one step of the target on either side (a step takes round_to units, or one head block, from every layer of
    a class), every layer of a class equally wide, neuron / FFN widths multiples of round_to (or min-keep).
    Always: widths >= min-keep and never growing."""
    p_after = accounting.count_params(model)
    assert p_after == report["params_after"]
    p0 = report["params_before"]
    denom = p0 if cfg.epr_basis == "total" else report["params_prunable_before"]
    epr = (p0 - p_after) / denom
    assert epr == pytest.approx(report["epr"])
    last = report["rounds"][-1]
    if report["uniform_widths"]:
        rt = report["round_to"]
        classes = {}
        for name, w0 in report["widths_before"].items():
            classes.setdefault((report["kinds_by_group"][name], w0), []).append(name)
        step = max(sum(costs_before[n] * (1 if kind == "head" else rt) for n in names)
                   for (kind, _), names in classes.items())
        assert abs(epr - cfg.target) * denom <= step
        for (kind, w0), names in classes.items():
            assert len({report["widths_after"][n] for n in names}) == 1, names
            w = report["widths_after"][names[0]]
            if kind != "head":
                assert w % rt == 0 or w in (w0, report["min_keep"][names[0]])
    else:
        assert epr >= cfg.target
        item = max(costs_before[n] for n in last["removed"])
        assert (epr - cfg.target) * denom < item
    widths_prev = report["rounds"][-2]["widths"] if len(report["rounds"]) > 1 else report["widths_before"]
    for name, w in report["widths_after"].items():
        assert report["min_keep"][name] <= w <= widths_prev[name]


def _unit_costs(model, kinds):
    out = {}
    for g in units.discover_groups(model, kinds):
        block = int(g.kv_heads) if g.kind == "head" and g.unit == "query" else 1
        out[g.name] = block * g.unit_params()
    return out


def test_mlp_neurons_hit_target_exactly():
    model, kw, calib = mlp_setup()
    cfg = PruneConfig(target=0.4, kinds=("neuron",), round_fraction=0.1, finetune=FinetuneConfig(epochs=1))
    costs = _unit_costs(model, cfg.kinds)
    res = prune(model, calib, cfg, **kw)
    rep = res.report
    _check_target(res.model, rep, cfg, costs)
    assert len(rep["rounds"]) >= 2
    assert rep["metric_before"] is not None and rep["metric_after_finetune"] is not None
    assert all(r["seconds_scoring"] >= 0 for r in rep["rounds"])
    # every round removed ceil(10%) of each group's width, except the trimmed last one
    r1 = rep["rounds"][0]
    assert r1["removed"] == {"0": 5, "2": 4}
    # physically smaller: the model runs at the new widths
    assert res.model(torch.randn(3, 16)).shape == (3, 4)


def test_cnn_channels_hit_target():
    torch.manual_seed(0)
    model = TinyCNN().eval()
    x = torch.randn(64, 1, 16, 16)
    y = torch.randint(0, 3, (64,))
    calib = [(x[:32], y[:32]), (x[32:], y[32:])]
    cfg = PruneConfig(target=0.3, kinds=("channel",), round_fraction=0.1, scorer="l1",
                      finetune=FinetuneConfig(epochs=0))
    costs = _unit_costs(model, cfg.kinds)
    res = prune(model, calib, cfg)
    _check_target(res.model, res.report, cfg, costs)
    assert res.report["metric_after_finetune"] is None
    assert res.model(torch.randn(2, 1, 16, 16)).shape == (2, 3)


@pytest.mark.parametrize("uniform", [None, False], ids=["uniform-default", "free-widths"])
@pytest.mark.parametrize("kinds", [("ffn",), ("head",)])
def test_bert_ffn_and_heads_hit_target(kinds, uniform):
    model = _bert()
    calib = _text_batches()
    cfg = PruneConfig(target=0.1 if kinds == ("head",) else 0.2, kinds=kinds, round_fraction=0.1,
                      epr_basis="prunable", finetune=FinetuneConfig(epochs=0), uniform_widths=uniform)
    costs = _unit_costs(model, kinds)
    res = prune(model, calib, cfg, forward=lambda m, b: m(**b))
    _check_target(res.model, res.report, cfg, costs)
    assert res.model(**calib[0]).shape == (8, 2)


def test_llama_gqa_query_heads_removed_in_balanced_blocks():
    model = _llama()
    calib = _text_batches()
    cfg = PruneConfig(target=0.05, kinds=("head",), round_fraction=0.05, finetune=FinetuneConfig(epochs=0))
    costs = _unit_costs(model, cfg.kinds)
    res = prune(model, calib, cfg)
    _check_target(res.model, res.report, cfg, costs)
    for g in units.discover_groups(res.model, ("head",)):
        assert g.unit == "query" and g.size % int(g.kv_heads) == 0 and g.size >= 2
    for rec in res.report["rounds"]:
        for us in rec["removed_units"].values():  # heads 0-2 share KV group 0, heads 3-5 KV group 1
            assert sum(u < 3 for u in us) == sum(u >= 3 for u in us)
    assert res.model(**calib[0]).logits.shape[:2] == (8, 12)


def _strip(rep):
    """The report without wall-clock fields (seconds, and the environment block: its timestamp, command line
    and resumed flag differ between any two runs)."""
    r = json.loads(json.dumps(rep, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
    for k in list(r):
        if k.startswith("seconds") or k == "environment":
            r.pop(k)
    for rec in r["rounds"]:
        for k in [k for k in rec if k.startswith("seconds")]:
            rec.pop(k)
    for h in r["finetune_history"]:
        h.pop("seconds")
    return r


class Crash(RuntimeError):
    pass


@pytest.mark.parametrize("event,at", [("round_end", 2), ("round_start", 3), ("finetune_epoch", 1)])
def test_resume_after_injected_crash_gives_same_report(tmp_path, event, at):
    model, kw, calib = mlp_setup()
    cfg = PruneConfig(target=0.45, kinds=("neuron",), round_fraction=0.1, scorer="spectral",
                      finetune=FinetuneConfig(epochs=2))
    ref = prune(copy.deepcopy(model), calib, cfg, out_dir=tmp_path / "ref", **kw)

    def crash(name, info):
        if name == event and info.get("round", info.get("epoch")) == at:
            raise Crash(name)

    with pytest.raises(Crash):
        prune(copy.deepcopy(model), calib, cfg, out_dir=tmp_path / "run", callback=crash, **kw)
    assert (tmp_path / "run" / CHECKPOINT).exists()
    assert not (tmp_path / "run" / "report.json").exists()
    assert not list((tmp_path / "run").glob(".*.tmp"))
    seen = []
    res = prune(copy.deepcopy(model), calib, cfg, out_dir=tmp_path / "run", resume=True,
                callback=lambda n, i: seen.append((n, i.get("round", i.get("epoch")))), **kw)
    assert _strip(res.report) == _strip(ref.report)
    on_disk = json.loads((tmp_path / "run" / "report.json").read_text())
    assert _strip(on_disk) == _strip(ref.report)
    for a, b in zip(res.model.state_dict().values(), ref.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # it really resumed: the rounds before the crash were not redone
    rounds_done = [i for n, i in seen if n == "round_start"]
    if event == "finetune_epoch":
        assert rounds_done == [] and ("finetune_epoch", 1) not in seen
    else:
        assert rounds_done and min(rounds_done) == 3
    for f in ("report.md", "metric_vs_epr.png", "widths.png", "scores_by_layer.png", "eigenvalues.png"):
        assert (tmp_path / "run" / f).stat().st_size > 0


def test_resume_refuses_a_different_config_and_fresh_run_refuses_existing_dir(tmp_path):
    model, kw, calib = mlp_setup()
    cfg = PruneConfig(target=0.2, kinds=("neuron",), round_fraction=0.1, finetune=FinetuneConfig(epochs=0))
    prune(copy.deepcopy(model), calib, cfg, out_dir=tmp_path, **kw)
    with pytest.raises(ValueError, match="already holds a run"):
        prune(copy.deepcopy(model), calib, cfg, out_dir=tmp_path, **kw)
    # names each differing field with its two values (round_fraction differs too)
    with pytest.raises(ValueError, match=r"different configuration \(round_fraction: 0.1 then, 0.05 now, target: "
                                         r"0.2 then, 0.3 now\)"):
        prune(copy.deepcopy(model), calib, PruneConfig(target=0.3, kinds=("neuron",),
                                                       finetune=FinetuneConfig(epochs=0)),
              out_dir=tmp_path, resume=True, **kw)


@pytest.mark.parametrize("opts", [dict(scorer="taylor"), dict(scorer="wanda_sp", one_per_neighbourhood=True),
                                  dict(scorer="spectral", one_per_neighbourhood=True, allocation="global"),
                                  dict(scorer="random", allocation="global")])
def test_scorers_and_selection_options_reach_the_target(opts):
    model, kw, calib = mlp_setup()
    cfg = PruneConfig(target=0.3, kinds=("neuron",), round_fraction=0.1, finetune=FinetuneConfig(epochs=0), **opts)
    costs = _unit_costs(model, cfg.kinds)
    res = prune(model, calib, cfg, **kw)
    _check_target(res.model, res.report, cfg, costs)


def test_same_seed_same_removals_and_random_seed_matters():
    model, kw, calib = mlp_setup()
    runs = []
    for seed in (0, 0, 1):
        cfg = PruneConfig(target=0.2, kinds=("neuron",), scorer="random", seed=seed, round_fraction=0.1,
                          finetune=FinetuneConfig(epochs=0), track_metric=False)
        runs.append(prune(copy.deepcopy(model), calib, cfg, **kw).report["rounds"][0]["removed_units"])
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_spectral_removes_dead_units_first():
    model, kw, calib = mlp_setup()
    with torch.no_grad():  # kill 3 hidden units of layer 0: zero incoming weights, very negative bias
        model[0].weight[[5, 9, 11]] = 0
        model[0].bias[[5, 9, 11]] = -10.0
    cfg = PruneConfig(target=0.3, kinds=("neuron",), round_fraction=0.1, finetune=FinetuneConfig(epochs=0))
    rep = prune(model, calib, cfg, **kw).report
    assert len(rep["rounds"]) > 1  # round 1 was not trimmed
    assert rep["rounds"][0]["dead_units"]["0"] == 3
    assert {5, 9, 11} <= set(rep["rounds"][0]["removed_units"]["0"])


def test_unreachable_target_fails_fast():
    model, kw, calib = mlp_setup()
    with pytest.raises(TargetUnreachableError, match="out of reach"):
        prune(model, calib, PruneConfig(target=0.95, kinds=("neuron",)), **kw)


def test_config_and_input_errors():
    with pytest.raises(ValueError, match="target"):
        PruneConfig(target=1.0)
    with pytest.raises(ValueError, match="target"):
        PruneConfig(target=0)
    with pytest.raises(ValueError, match="scorer"):
        PruneConfig(scorer="nope")
    with pytest.raises(ValueError, match="kinds"):
        PruneConfig(kinds=("layers",))
    with pytest.raises(ValueError, match="round_fraction"):
        PruneConfig(round_fraction=0)
    model, kw, calib = mlp_setup()
    with pytest.raises(ValueError, match="calib"):
        prune(model, [], PruneConfig())
    with pytest.raises(ValueError, match="needs gradients"):
        prune(model, calib, PruneConfig(scorer="taylor"))
    with pytest.raises(TypeError, match="nn.Module"):
        prune("model", calib, PruneConfig())


def test_score_model_scores_every_group():
    model, kw, calib = mlp_setup()
    outs, summary = score_model(model, calib, scorer="flap", kinds=("neuron",))
    assert set(outs) == {"0", "2"} and outs["0"].scores.shape == (48,)
    assert summary["groups"]["2"]["n"] == 40 and summary["seconds_scoring"] >= 0


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    p = tmp_path / "f.json"
    p.write_text("old")

    def boom(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(p, boom)
    assert p.read_text() == "old"
    assert [q.name for q in tmp_path.iterdir()] == ["f.json"]


def test_head_schedule_follows_uniform_rate_in_whole_blocks():
    from spectra_gpu.rounds import head_counts

    w = {"gqa": 9, "mha": 12}
    removed_at = {"gqa": [], "mha": []}
    for rnd in range(14):
        c = head_counts(w, {"gqa": 9, "mha": 12}, {"gqa": 3, "mha": 1}, 0.05, rnd)
        for g, q in c.items():
            if q:
                removed_at[g].append((rnd, q))
            w[g] -= q
        for g, kv in (("gqa", 3), ("mha", 1)):  # the nearest whole block to the uniform 5% schedule
            assert abs(w[g] - {"gqa": 9, "mha": 12}[g] * 0.95 ** (rnd + 1)) <= kv / 2
    assert removed_at["gqa"] == [(3, 3), (13, 3)]  # one head from each of the 3 KV groups at a time
    assert all(q == 1 for _, q in removed_at["mha"])


def test_finetune_steps_cap_schedule_and_resume_equivalence():
    from spectra_gpu.finetune import finetune

    model, kw, _ = mlp_setup()
    cfg = FinetuneConfig(optimizer="sgd", lr=0.05, epochs=3, steps=20)  # 8 batches per epoch -> 3 epochs, 20 steps
    a = copy.deepcopy(model)
    hist = finetune(a, kw["train_batches"], kw["loss_fn"], cfg, seed=1)
    assert [h["steps"] for h in hist] == [8, 16, 20]
    states, weights = [], []
    b = copy.deepcopy(model)

    def keep(st):
        states.append(copy.deepcopy(st))
        weights.append(copy.deepcopy(b.state_dict()))

    finetune(b, kw["train_batches"], kw["loss_fn"], cfg, seed=1, on_epoch_end=keep)
    assert states[-1]["scheduler"]["last_epoch"] == 20  # cosine over exactly the 20 steps
    c = copy.deepcopy(model)
    c.load_state_dict(weights[0])  # resume from the epoch-1 checkpoint: its weights and optimiser state
    hist_c = finetune(c, kw["train_batches"], kw["loss_fn"], cfg, seed=1, state=states[0])
    assert [h["steps"] for h in hist_c] == [8, 16, 20]
    for p, q in zip(a.parameters(), c.parameters(), strict=True):
        assert torch.equal(p, q)


def test_finetune_config_errors_and_zero_epochs():
    from spectra_gpu.finetune import finetune

    for bad, match in ((dict(optimizer="lion"), "optimizer"), (dict(lr=0), "lr"), (dict(epochs=-1), "epochs"),
                       (dict(steps=0), "steps"), (dict(schedule="step"), "schedule")):
        with pytest.raises(ValueError, match=match):
            FinetuneConfig(**bad)
    model, kw, _ = mlp_setup()
    before = copy.deepcopy(model.state_dict())
    assert finetune(model, kw["train_batches"], kw["loss_fn"], FinetuneConfig(epochs=0)) == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="non-empty"):
        finetune(model, lambda ep: [], kw["loss_fn"], FinetuneConfig())


def test_recalibrate_bn_matches_batch_statistics_and_keeps_parameters():
    from spectra_gpu.rounds import recalibrate_bn

    torch.manual_seed(0)
    model = TinyCNN().eval()
    x = torch.randn(32, 1, 16, 16) * 3 + 1
    params = {k: v.clone() for k, v in model.named_parameters()}
    assert recalibrate_bn(model, [(x, None)]) == 2
    with torch.no_grad():
        z = model.conv1(x)
    torch.testing.assert_close(model.bn1.running_mean, z.mean((0, 2, 3)))
    torch.testing.assert_close(model.bn1.running_var, z.transpose(0, 1).flatten(1).var(1))  # unbiased, as BN
    assert not model.training and model.bn1.momentum == 0.1
    assert all(torch.equal(params[k], v) for k, v in model.named_parameters())


def test_recalibrate_bn_option_in_the_driver():
    torch.manual_seed(0)
    model = TinyCNN().eval()
    x = torch.randn(64, 1, 16, 16)
    calib = [(x[:32], None), (x[32:], None)]
    before = model.bn2.running_var.clone()
    cfg = PruneConfig(target=0.2, kinds=("channel",), round_fraction=0.1, scorer="l2", recalibrate_bn=True,
                      finetune=FinetuneConfig(epochs=0))
    res = prune(model, calib, cfg)
    assert res.report["config"]["recalibrate_bn"] is True
    assert res.model.bn2.running_var.shape[0] == res.report["widths_after"]["conv2"]
    assert not torch.equal(res.model.bn2.running_var, before[: res.model.bn2.running_var.shape[0]])


def test_hybrid_rank_gets_the_spectral_options_with_the_head_cap():
    from spectra_gpu.rounds import scorer_options

    cfg = PruneConfig(scorer="hybrid_rank", scorer_options={"k": 8, "num_eigs": 16})
    assert scorer_options(cfg, "ffn") == {"k": 8, "num_eigs": 16}
    assert scorer_options(cfg, "head") == {"k": 3, "num_eigs": 16}
    assert scorer_options(PruneConfig(scorer="wanda_sp", scorer_options={"k": 8}), "ffn") == {}


def test_magnitude_baselines_capture_moments_only_unless_neighbours_are_needed():
    from spectra_gpu.rounds import stats_mode

    assert stats_mode("wanda_sp", False) == "moments" and stats_mode("random", False) == "moments"
    assert stats_mode("wanda_sp", True) == "exact"  # one-per-neighbourhood needs the kNN graph
    assert stats_mode("spectral", False) == "exact" and stats_mode("hybrid_rank", False) == "exact"
    # a user-registered scorer is never taken for a built-in baseline, whenever it was registered
    from spectra_gpu.scorers import SCORERS, register_scorer

    register_scorer("user_spectral_twin", SCORERS["spectral"])
    try:
        assert stats_mode("user_spectral_twin", False) == "exact"
    finally:
        del SCORERS["user_spectral_twin"]


def test_hf_layers_get_uniform_widths_by_default_and_a_standard_folder(tmp_path):
    from spectra_gpu import io

    model = _llama()
    calib = _text_batches()
    cfg = PruneConfig(target=0.15, kinds=("ffn", "head"), round_fraction=0.1, finetune=FinetuneConfig(epochs=0))
    costs = _unit_costs(model, cfg.kinds)
    res = prune(model, calib, cfg, out_dir=tmp_path / "run")
    rep = res.report
    assert rep["uniform_widths"] is True and rep["round_to"] == 8
    _check_target(res.model, rep, cfg, costs)
    ffn = {w for g, w in rep["widths_after"].items() if rep["kinds_by_group"][g] == "ffn"}
    assert len(ffn) == 1 and ffn.pop() % 8 == 0
    for rec in rep["rounds"]:  # every round keeps the layers equal, not only the last
        assert len({w for g, w in rec["widths"].items() if rep["kinds_by_group"][g] == "ffn"}) == 1
        assert len({w for g, w in rec["widths"].items() if rep["kinds_by_group"][g] == "head"}) == 1
    assert "nearest the target" in rep["epr_statement"]
    assert rep["saved_model"]["standard"] is True and io.is_standard(tmp_path / "run" / "model")
    assert "AutoModelForCausalLM.from_pretrained" in rep["saved_model"]["loader"]


def test_free_widths_stay_available_for_hf_layers():
    model = _llama()
    calib = _text_batches()
    for opts in (dict(uniform_widths=False), dict(allocation="global")):
        cfg = PruneConfig(target=0.15, kinds=("ffn", "head"), round_fraction=0.1,
                          finetune=FinetuneConfig(epochs=0), **opts)
        costs = _unit_costs(model, cfg.kinds)
        res = prune(copy.deepcopy(model), calib, cfg)
        assert res.report["uniform_widths"] is False and res.report["round_to"] == 1
        _check_target(res.model, res.report, cfg, costs)  # at the target, overshoot below one unit


def test_plain_models_keep_free_widths_unless_asked():
    model, kw, calib = mlp_setup()
    cfg = PruneConfig(target=0.4, kinds=("neuron",), round_fraction=0.1, scorer="l1",
                      finetune=FinetuneConfig(epochs=0), uniform_widths=True, round_to=4)
    costs = _unit_costs(model, cfg.kinds)
    res = prune(copy.deepcopy(model), calib, cfg, **kw)
    rep = res.report
    assert rep["uniform_widths"] is True and rep["round_to"] == 4
    _check_target(res.model, rep, cfg, costs)  # 48- and 40-wide layers: two classes, each a multiple of 4
    assert all(w % 4 == 0 for w in rep["widths_after"].values())
    assert prune(copy.deepcopy(model), calib, PruneConfig(target=0.4, kinds=("neuron",), scorer="l1",
                                                          finetune=FinetuneConfig(epochs=0)),
                 **kw).report["uniform_widths"] is False


def test_uniform_width_options_are_validated():
    with pytest.raises(ValueError, match="global"):
        PruneConfig(uniform_widths=True, allocation="global")
    with pytest.raises(ValueError, match="round_to"):
        PruneConfig(round_to=0)
    with pytest.raises(TypeError, match="uniform_widths"):
        PruneConfig(uniform_widths="yes")
