"""SignalStats' blocked accumulation and read-out: the same numbers as the whole-matrix expressions, and no
N x N temporary beyond the result (peak RSS measured in a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spectra_gpu import stats as stats_mod
from spectra_gpu.stats import SignalStats

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(stats_mod, "_BLOCK_BYTES", 7 * 8 * 40)  # a few rows per block, a ragged last block


def _batches(n: int, m: int, parts: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(parts):
        z = torch.randn(n, 4, generator=g) @ torch.randn(4, m, generator=g) + torch.randn(n, m, generator=g) + 3.0
        out.append((z, torch.relu(z)))
    return out


def _whole_matrix_gram(st: SignalStats, side: str, preprocess: str, alive: torch.Tensor) -> torch.Tensor:
    """The read-out as one whole-matrix expression (the reference the blocked one must reproduce bit for bit)."""
    sd = st.pre if side == "pre" else st.post
    c, d = st._affine(side, preprocess, alive)
    g = sd.gram[alive][:, alive]
    s1 = sd.s1[alive]
    g = g - c[:, None] * s1[None, :] - s1[:, None] * c[None, :] + st.m * c[:, None] * c[None, :]
    return d[:, None] * g * d[None, :]


@pytest.mark.parametrize("precision", ["fp32", "fp64"])
def test_blocked_gram_accumulation_equals_the_full_product(small_blocks, precision):
    n, m = 40, 23
    batches = _batches(n, m, 3)
    st = SignalStats(n, precision=precision)
    for z, a in batches:
        st.update(z, a)
    dt = torch.float32 if precision == "fp32" else torch.float64
    for side, k in (("pre", 0), ("post", 1)):
        sd = st.pre if side == "pre" else st.post
        shift = sd.shift
        ref = torch.zeros(n, n, dtype=torch.float64)
        for b in batches:
            xm = (b[k].to(dt) - shift.to(dt)[:, None]).to(dt)
            ref += (xm @ xm.T).double()
        torch.testing.assert_close(sd.gram, ref, rtol=1e-6 if precision == "fp32" else 1e-12, atol=1e-6)


@pytest.mark.parametrize("preprocess", ["zscore", "center", "raw"])
@pytest.mark.parametrize("dead", [(), (0, 7, 8, 39)])
def test_blocked_gram_readout_is_bit_identical_to_the_whole_matrix_expression(small_blocks, preprocess, dead):
    n = 40
    st = SignalStats(n)
    for z, a in _batches(n, 31, 2, seed=1):
        st.update(z, a)
    alive = torch.ones(n, dtype=torch.bool)
    alive[list(dead)] = False
    for side in ("pre", "post"):
        got = st.gram(side, preprocess, alive)
        assert got.shape == (int(alive.sum()),) * 2
        assert torch.equal(got, _whole_matrix_gram(st, side, preprocess, alive))
    before = st.pre.gram.clone()
    st.gram("pre", preprocess, alive)
    assert torch.equal(st.pre.gram, before)  # the read-out never touches the accumulator


@pytest.mark.parametrize("preprocess", ["zscore", "raw"])
def test_blocked_sketch_readout_is_bit_identical_to_the_whole_matrix_expression(small_blocks, preprocess):
    n = 40
    st = SignalStats(n, mode="sketch", sketch_dim=16, probe=5)
    for z, a in _batches(n, 29, 2, seed=2):
        st.update(z, a)
    alive = torch.ones(n, dtype=torch.bool)
    alive[[3, 4]] = False
    c, d = st._affine("post", preprocess, alive)
    ref = d[:, None] * (st.post.sk[alive] - c[:, None] * st.s_colsum[None, :])
    before = st.post.sk.clone()
    assert torch.equal(st.sketch("post", preprocess, alive), ref)
    assert torch.equal(st.post.sk, before)


_PEAK_PROBE = r"""
import ctypes, json, sys, torch
from spectra_gpu import stats as stats_mod

# a fixed mmap threshold: every large buffer is its own mapping, returned on free, so VmHWM sees each temporary
ctypes.CDLL("libc.so.6").mallopt(-3, 2**20)  # M_MMAP_THRESHOLD
from spectra_gpu.stats import SignalStats

def hwm():
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM"))

def rss():
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmRSS"))

def reset():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

stats_mod._BLOCK_BYTES = 2**20
n, m = int(sys.argv[1]), 256
torch.manual_seed(0)
z = torch.randn(n, m) + 1.0
st = SignalStats(n)
st.update(z, torch.relu(z))
out = {}
reset(); base = rss(); st.update(z, torch.relu(z)); out["update"] = hwm() - base
alive = torch.ones(n, dtype=torch.bool)
reset(); base = rss(); g = st.gram("post", "zscore", alive); out["gram_all_alive"] = hwm() - base
del g
alive[::10] = False
reset(); base = rss(); g = st.gram("post", "zscore", alive); out["gram_subset"] = hwm() - base
del g
import spectra_gpu as sg
reset(); base = rss(); sg.score(st, k=10, num_eigs=8, seed=0); out["score"] = hwm() - base
print(json.dumps(out))
"""


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs")
def test_no_n_by_n_temporary_beyond_the_result():
    """Peak memory beyond the statistics while accumulating, reading out a Gram, and scoring."""
    n = 3000
    nn = n * n * 8  # one fp64 N x N matrix: 72 MB
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _PEAK_PROBE, str(n)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    peak = json.loads(done.stdout.strip().splitlines()[-1])
    # the whole-matrix forms held an fp32 product plus its fp64 promotion (1.5 N^2 x 8 B) while accumulating, and
    # two index copies plus three outer products (about 5 N^2 x 8 B) while reading out
    assert peak["update"] < 0.25 * nn, peak
    assert peak["gram_all_alive"] < 1.25 * nn, peak
    assert peak["gram_subset"] < 1.25 * nn, peak
    # scoring from exact statistics builds one side's preprocessed Gram at a time, frees it once its kNN graph is
    # built (the Gram and the distances read from it: about 2 N^2 x 8 B); both sides' Grams at once were 3 N^2
    assert peak["score"] < 2.5 * nn, peak
