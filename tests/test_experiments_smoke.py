"""Smoke runs of the evidence experiments (benchmarks/experiments): one setup, one seed, tiny budget, so the
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
