"""Smoke runs of the evidence experiments (research/experiments): one setup, one seed, tiny budget, so the
experiment code cannot rot. Checks the JSON contract and invariants an experiment must keep, not numbers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

EXP = Path(__file__).resolve().parents[1] / "benchmarks" / "experiments"
sys.path.insert(0, str(EXP))

pytest.importorskip("mlxtend")

import exp_ablation  # noqa: E402
import exp_finetune  # noqa: E402
import exp_removal  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_removal_smoke(tmp_path: Path) -> None:
    out = tmp_path / "removal.json"
    res = exp_removal.main(["--setup", "mlp", "--smoke", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["runs"] and len(saved["runs"]) == len(res["runs"]) == 3 * 2  # 3 methods x 2 modes
    for run in saved["runs"]:
        assert [p["fraction"] for p in run["points"]] == [0.25, 0.5, 0.75]
        for p in run["points"]:
            assert 0.0 <= p["metric"] <= 1.0 and np.isfinite(p["loss"])
        if run["mode"] == "iter10_nbh":  # rounds of 51 units, each checkpoint (128/256/384) hit exactly:
            assert run["rounds"] == 9  # 51 + 51 + 26 per 128-unit leg
    # masks are restored after every run: the dense metric is unchanged
    assert saved["models"]["0"]["dense"]["metric"] > 0.5


def test_ablation_smoke(tmp_path: Path) -> None:
    out = tmp_path / "ablation.json"
    res = exp_ablation.main(["--setup", "mlp", "--smoke", "--out", str(out)])
    assert len(res["ablated_units"]) == 24
    gt = res["ground_truth"]
    # the full-set loss change is the mean of the two (equal-size) halves
    np.testing.assert_allclose(gt["dloss_all"], (np.array(gt["dloss_A"]) + np.array(gt["dloss_B"])) / 2,
                               rtol=1e-9, atol=1e-12)
    assert min(gt["kl_all"]) >= -1e-12  # KL is non-negative
    for row in res["methods"]:
        for q in (10, 30, 50):
            assert 0.0 <= row[f"bottom{q}_abs_dloss"] <= 1.0
        assert -1.0 <= row["spearman_kl"] <= 1.0


def test_bottom_precision_oracle() -> None:
    s = np.array([0.1, 0.9, 0.2, 0.8, -np.inf, 0.5])
    t = np.array([0.0, 1.0, 5.0, 2.0, 0.1, 3.0])
    # bottom 50% (3 units): score {4, 0, 2}, truth {0, 4, 1} -> overlap {0, 4}
    assert exp_ablation.bottom_precision(s, t, 0.5) == pytest.approx(2 / 3)


def test_finetune_smoke(tmp_path: Path) -> None:
    out = tmp_path / "finetune.json"
    res = exp_finetune.main(["--setup", "mlp", "--smoke", "--out", str(out)])
    assert {r["method"] for r in res["runs"]} == {"spectral", "random"}
    for r in res["runs"]:
        assert r["epr"] >= 0.5 and r["epr"] - 0.5 < 0.01  # target hit within a fraction step
        assert 0.0 <= r["after_ft"]["metric"] <= 1.0
    # EPR accounting against a hand count for the 784-w-w-10 MLP
    import models

    st = exp_removal.load("mlp", 0, smoke=True)
    f, epr = exp_finetune.fraction_for_epr(st, 0.5)
    w = 512 - int(round(f * 512))
    p0 = 784 * 512 + 512 + 512 * 512 + 512 + 512 * 10 + 10
    assert epr == pytest.approx(1 - (784 * w + w + w * w + w + w * 10 + 10) / p0)
    assert isinstance(st.model, models.MLP)


def test_head_removal_smoke() -> None:
    """run_head_removal on a tiny random BERT (no download): per layer round(f x H) heads go, the sliced
    model keeps its attention bookkeeping consistent, one-shot and iterative both evaluate every fraction."""
    transformers = pytest.importorskip("transformers")
    import copy
    import types

    import common

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32)
    enc = transformers.BertModel(cfg).eval()
    ids = torch.randint(1, 50, (6, 10))
    calib = [{"input_ids": ids[:3], "attention_mask": torch.ones(3, 10, dtype=torch.long),
              "labels": torch.tensor([0, 1, 0])},
             {"input_ids": ids[3:], "attention_mask": torch.ones(3, 10, dtype=torch.long),
              "labels": torch.tensor([1, 0, 1])}]
    head = torch.nn.Linear(32, 2)
    seen: list[int] = []

    import llm

    groups, forward = llm.HeadSetup.groups, llm.HeadSetup.forward

    def loss_fn(m, b):
        return torch.nn.functional.cross_entropy(head(forward(m, b).last_hidden_state.mean(1)), b["labels"])

    def evaluate(m):
        seen.append(sum(int(g.size) for g in groups(m)))
        with torch.no_grad():
            return {"metric": 0.5, "loss": float(loss_fn(m, calib[0]))}

    stub = types.SimpleNamespace(dense=enc, copy=lambda: copy.deepcopy(enc), groups=groups, calib=calib,
                                 forward=forward, loss_fn=loss_fn, evaluate=evaluate,
                                 info={"groups": {g.name: int(g.size) for g in groups(enc)}})
    for method in ("spectral", "taylor", "hybrid_rank", "random"):
        for it in (False, True):
            seen.clear()
            r = common.run_head_removal(stub, method, [0.25, 0.5], iterative=it, seed=1)
            assert [p["fraction"] for p in r["points"]] == [0.25, 0.5]
            assert seen == [2 * 3, 2 * 2]  # 4 heads per layer: 1 then 2 removed in each of 2 layers
            assert all(np.isfinite(p["loss"]) for p in r["points"])
            assert r["rounds"] == (2 if it else 1)
    assert sum(int(g.size) for g in groups(enc)) == 8  # the dense encoder is never touched


def test_finetune_driver_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The driver-based fine-tune experiment on the digits MLP task: EPR lands on the target, metrics recorded
    before and after the fine-tune, in the finetune JSON contract make_report reads."""
    import exp_finetune_driver

    monkeypatch.setenv("SPECTRA_GPU_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "ft_driver.json"
    res = exp_finetune_driver.main(["--smoke", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert {r["method"] for r in saved["runs"]} == {"spectral", "random"} == {r["method"] for r in res["runs"]}
    for r in saved["runs"]:
        assert 0.3 <= r["epr"] < 0.31
        assert 0.0 <= r["before_ft"]["metric"] <= 1.0 and 0.0 <= r["after_ft"]["metric"] <= 1.0
        assert r["score_seconds"] > 0 and r["rounds"] >= 1
    import make_report

    assert "spectral" in make_report.finetune_table(saved)


def test_finetune_driver_resume_and_merge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A `spectra prune` report.json made with the same schedule is merged as a run and not rerun; --resume
    keeps the runs in --out; a report made with another schedule is refused."""
    import exp_finetune_driver

    from spectra_gpu import cli

    monkeypatch.setenv("SPECTRA_GPU_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "cli_random"
    assert cli.main(["prune", "--model", "digits-mlp", "--target", "0.3", "--scorer", "random",
                     "--round-fraction", "0.1", "--out", str(run)]) == 0
    rep = json.loads((run / "report.json").read_text())
    out = tmp_path / "ft.json"
    res = exp_finetune_driver.main(["--smoke", "--merge", str(run / "report.json"), "--out", str(out)])
    rows = {r["method"]: r for r in res["runs"]}
    assert set(rows) == {"spectral", "random"}
    assert rows["random"]["seconds_total"] == rep["seconds_total"]  # taken from the report, not rerun
    assert rows["random"]["after_ft"]["metric"] == rep["metric_after_finetune"]
    again = exp_finetune_driver.main(["--smoke", "--resume", "--out", str(out)])
    assert again["runs"] == json.loads(json.dumps(res["runs"]))  # nothing rerun, nothing lost
    opts = tmp_path / "opts.json"  # a run with scorer options is its own method
    opts.write_text(json.dumps({**rep, "config": {**rep["config"], "scorer_options": {"num_eigs": 2}}}))
    merged = exp_finetune_driver.main(["--smoke", "--merge-only", "--resume", "--merge", str(opts), "--out", str(out)])
    assert sorted(r["method"] for r in merged["runs"]) == ["random", "random[num_eigs=2]", "spectral"]
    seed1 = tmp_path / "seed1.json"  # `spectra prune --seed 1` loads the task at seed 1: never mixed with ours
    seed1.write_text(json.dumps({**rep, "config": {**rep["config"], "seed": 1}}))
    exp_finetune_driver.main(["--smoke", "--merge-only", "--resume", "--merge", str(seed1), "--out", str(out)])
    with pytest.raises(SystemExit):
        exp_finetune_driver.main(["--smoke", "--seeds", "1", "--resume", "--out", str(out)])
    rep["config"]["round_fraction"] = 0.05
    other = tmp_path / "other.json"
    other.write_text(json.dumps(rep))
    with pytest.raises(ValueError, match="round_fraction"):
        exp_finetune_driver.main(["--smoke", "--merge-only", "--merge", str(other), "--out", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()
