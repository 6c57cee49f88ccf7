"""Smoke runs of the evidence experiments (research/experiments) on the product API: one built-in task, one
seed, tiny budgets, so the experiment code cannot rot. Checks the JSON contract and the invariants an
experiment must keep (fractions hit exactly, the dense model untouched, masking = surgery), not numbers."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

EXP = Path(__file__).resolve().parents[1] / "research" / "experiments"
sys.path.insert(0, str(EXP))

import common  # noqa: E402
import exp_ablation  # noqa: E402
import exp_removal  # noqa: E402

import spectra_gpu as sg  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def mlp() -> common.Setup:
    return common.load_setup("mlp", 0)


def test_removal_smoke(tmp_path: Path) -> None:
    out = tmp_path / "removal.json"
    res = exp_removal.main(["--setup", "mlp", "--smoke", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["runs"] and len(saved["runs"]) == len(res["runs"]) == 3 * 2  # 3 methods x 2 modes
    assert saved["machine"]["code"] == common.CODE  # the results page tells ported runs by this mark
    for run in saved["runs"]:
        assert [p["fraction"] for p in run["points"]] == [0.25, 0.5, 0.75]
        for p in run["points"]:
            assert 0.0 <= p["metric"] <= 1.0 and np.isfinite(p["loss"])
        if run["mode"] == "iter10_nbh":  # rounds of 26 of 256 units, each checkpoint (64/128/192) hit exactly:
            assert run["rounds"] == 9  # 26 + 26 + 12 per 64-unit leg
    assert saved["models"]["0"]["dense"]["metric"] > 0.5


def test_removal_leaves_dense_untouched_and_masking_equals_surgery(mlp: common.Setup) -> None:
    dense = mlp.evaluate(mlp.dense)
    names = list(mlp.names)
    one = common.run_removal(mlp, names, "wanda_sp", [0.5])  # one-shot: sg.masked on the dense model
    it = common.run_removal(mlp, names, "spectral", [0.25, 0.5], round_frac=0.1, one_per_nbh=True)
    assert mlp.evaluate(mlp.dense) == dense
    assert [int(g.size) for g in mlp.groups(mlp.dense)] == [256, 256]
    assert it["rounds"] == 6 and [p["fraction"] for p in it["points"]] == [0.25, 0.5]
    # the same removal done by surgery on a copy gives the masked metric
    outs = common.score_groups(mlp, mlp.dense, mlp.groups(mlp.dense), "wanda_sp", 0)
    m = copy.deepcopy(mlp.dense)
    for g in mlp.groups(m):
        sg.remove_units(m, g, torch.sort(outs[g.name].scores, stable=True).indices[:128])
    assert [int(g.size) for g in mlp.groups(m)] == [128, 128]
    assert mlp.evaluate(m)["metric"] == pytest.approx(one["points"][0]["metric"], abs=1e-12)
    assert mlp.evaluate(m)["loss"] == pytest.approx(one["points"][0]["loss"], rel=1e-6)


def test_setup_rejects_unknown_names(mlp: common.Setup) -> None:
    with pytest.raises(ValueError, match="setup: expected one of"):
        common.load_setup("resnet", 0)
    with pytest.raises(ValueError, match="method: expected one of"):
        common.method_options("spectral_k7", "neuron")
    assert common.method_options("spectral", "head") == ("spectral", {"k": common.HEAD_K})
    assert common.method_options("spectral", "head", width=3) == ("spectral", {"k": 2})  # k < N for 3 heads
    assert common.method_options("wanda_sp", "neuron", neighbors=True) == ("wanda_sp", {"k": 10, "neighbors": True})


def test_ablation_smoke(tmp_path: Path) -> None:
    out = tmp_path / "ablation.json"
    res = exp_ablation.main(["--setup", "mlp", "--smoke", "--out", str(out)])
    assert len(res["ablated_units"]) == 24 and res["group"] == "layers.0"
    gt = res["ground_truth"]
    # the full-set loss change is the mean of the two halves (450 eval images: equal halves)
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


def test_head_removal_smoke() -> None:
    """run_removal on the head groups of a tiny random BERT (no download): per layer round(f x H) heads go,
    one-shot (masking) and iterative (one head per layer per round, surgery) both evaluate every fraction and
    leave the dense encoder whole."""
    transformers = pytest.importorskip("transformers")
    import types

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32)
    enc = transformers.BertModel(cfg).eval()
    head = torch.nn.Linear(32, 2)
    ids = torch.randint(1, 50, (6, 10))
    calib = [{"input_ids": ids[i:i + 3], "attention_mask": torch.ones(3, 10, dtype=torch.long),
              "labels": torch.tensor([0, 1, 0])} for i in (0, 3)]

    def forward(m, b):
        return head(m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state.mean(1))

    def loss_fn(m, b):
        return torch.nn.functional.cross_entropy(forward(m, b), b["labels"])

    task = types.SimpleNamespace(calib=calib, forward=forward, loss_fn=loss_fn, recalibrate_bn=False)
    names = [g.name for g in sg.discover_groups(enc, ("head",))]
    st = common.Setup("tiny_heads", task, enc, ("head",), names, names[0], calib)  # type: ignore[arg-type]
    for method in ("spectral", "taylor", "hybrid_rank", "random"):
        for rf in (None, common.HEAD_ROUND):
            r = common.run_removal(st, names, method, [0.25, 0.5], round_frac=rf, seed=1)
            assert [p["fraction"] for p in r["points"]] == [0.25, 0.5]
            assert all(np.isfinite(p["loss"]) for p in r["points"])
            assert r["rounds"] == (1 if rf is None else 2)  # 4 heads per layer: 1, then 2 removed
    assert sum(int(g.size) for g in st.groups(enc)) == 8  # the dense encoder is never touched
    with pytest.raises(ValueError, match="no head version"):
        common.method_options("hybrid", "head")


@pytest.mark.slow
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
    assert make_report.ported(saved) and "after FT at EPR 30%" in make_report.headline(saved)


@pytest.mark.slow
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


def test_llm_table_lists_every_cell_with_where_it_ran_and_what_is_left(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The LLM table (research/README.md section 7) is built from the cells' reports alone: a row per
    criterion and target (a recovery cell that pruned other units than its row gets a line of its own), each
    cell's commit and machine, and the runner's cells that have no JSON yet."""
    import exp_llm_table
    import make_report

    def report(cell: str, platform: str, cpu: dict[str, str] | None, after_prune: float = 256.3) -> dict:
        args = exp_llm_table.CELLS[cell]
        rec = "--recovery" in args
        return {"metric_before": 43.79, "scorer": args[args.index("--scorer") + 1], "epr": 0.2, "epr_prunable": 0.25,
                "rounds": [{}] * 6, "metric_after_prune": after_prune, "metric_after_compensation": 127.2,
                "metric_after_finetune": 53.1 if rec else None, "seconds_total": 600.0,
                "config": {"target": 0.2, "seed": 0, "one_per_neighbourhood": False},
                "environment": {"git": {"commit": ("a" if rec else "b") * 40, "dirty": False},
                                "platform": platform, "timestamp_utc": f"2026-12-0{1 + rec}T00:00:00+00:00",
                                **({"cpu": cpu} if cpu else {})}}

    folder = tmp_path / "llm_table"
    folder.mkdir()
    (folder / "wanda_sp-t20.json").write_text(json.dumps(report("wanda_sp-t20", "Linux-A", None)))
    (folder / "wanda_sp-t20-lora.json").write_text(json.dumps(report("wanda_sp-t20-lora", "Linux-B",
                                                                     {"model": "CPU X", "capability": "AVX2"})))
    (folder / "wanda_sp-t20-ce.json").write_text(json.dumps(report("wanda_sp-t20-ce", "Linux-B", None, 256.6)))
    monkeypatch.setattr(make_report, "EVIDENCE", tmp_path)
    page = make_report.llm_table("llm_table")
    assert "| `wanda_sp-t20` | wanda_sp | 0.200 / 0.250 | 6 | 256.3 | 127.2 | - | - | 53.1 | 10 / 10 |" in page
    assert "| `wanda_sp-t20-ce` | wanda_sp | 0.200 / 0.250 | 6 | 256.6 | 127.2 | 53.1 | - | - | 10 |" in page
    where = page.split("Where each cell ran")[1].split("\n\n")[1].splitlines()
    assert where[0] == f"- {'b' * 7} on Linux-A, CPU not recorded: `wanda_sp-t20`"  # the earliest first
    assert sorted(where[1:]) == [f"- {'a' * 7} on Linux-B, CPU X (AVX2): `wanda_sp-t20-lora`",
                                 f"- {'a' * 7} on Linux-B, CPU not recorded: `wanda_sp-t20-ce`"]
    left = page.split("not run yet (`exp_llm_table.py CELL` runs one): ")[1]
    assert left.count("`") == 2 * (len(exp_llm_table.CELLS) - 3) and "`wanda_sp-t20-kd`" in left
    assert "`wanda_sp-t20`" not in left and "`wanda_sp-t20-lora`" not in left
