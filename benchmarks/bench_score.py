"""sg.score end to end vs (a) the reference pipeline scikit-learn exact kNN + scipy eigsh(L_X, M=B) on the
same graphs and (b) the floor of exact kNN: the two fp32 Gram products Z Z^T and A A^T. Same run, same data.

Full run (about 4 minutes on 2 cores):  python -m pytest benchmarks/bench_score.py -k "full" \
    --benchmark-json benchmarks/results/<name>.json
CI smoke (once each, no timing):         python -m pytest benchmarks -k small --benchmark-disable
Peak memory of the full-size score is measured in a fresh subprocess (tests in this file: test_peak_rss_*).
test_score_gpu times the same call on CUDA tensors, kernels (backend='triton') vs torch; it skips without a GPU.
"""

import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from _layers import relu_layer
from scipy.sparse.linalg import eigsh

import spectra_gpu as sg

SHAPES = {"small": (1536, 512), "mid": (1536, 2048), "full": (11008, 2048)}


def _zscore(x: torch.Tensor) -> np.ndarray:
    x = x.double()
    x = x - x.mean(1, keepdim=True)
    return (x / x.std(1, correction=0, keepdim=True)).numpy()


def reference_pipeline(pre: torch.Tensor, post: torch.Tensor, k: int = 10, s: int = 32) -> np.ndarray:
    """What a user would write with scikit-learn + scipy: exact kNN, union graph, L = D - W,
    eigsh(L_X, M=B, which='LA') with B = L_Y + (dbar/N) 1 1^T as an explicit sparse + rank-one -> dense-free
    LinearOperator is not accepted as M by ARPACK's mode 2, so B is given as a sparse matrix plus the
    rank-one term folded into a shift of the constant mode (same pencil on 1-perp)."""
    from sklearn.neighbors import NearestNeighbors

    n = pre.shape[0]
    lap = []
    for x in (pre, post):
        z = _zscore(x)
        nn = NearestNeighbors(n_neighbors=k + 1, algorithm="brute").fit(z)
        idx = nn.kneighbors(z, return_distance=False)[:, 1:]
        rows = np.repeat(np.arange(n), k)
        w = sp.coo_matrix((np.ones(n * k), (rows, idx.ravel())), shape=(n, n)).tocsr()
        w = ((w + w.T) > 0).astype(np.float64)
        lap.append(sp.diags(np.asarray(w.sum(1)).ravel()) - w)
    lx, ly = lap
    c = ly.diagonal().mean() / n
    # B = L_Y + c 11^T is dense; ARPACK needs M as a matrix it can factor: use L_Y + c I, which equals B on
    # the eigenvectors' subspace 1-perp up to the c shift (c = dbar/N is ~1e-3 here) -- the usual user choice
    b = (ly + c * sp.identity(n)).tocsc()
    vals, vecs = eigsh(lx.tocsc(), k=s, M=b, which="LA")
    return vals[::-1]


@pytest.fixture(scope="module", params=list(SHAPES))
def layer(request):
    n, m = SHAPES[request.param]
    return request.param, relu_layer(n, m)


def test_score(benchmark, layer):
    name, (pre, post) = layer
    benchmark.group = f"score-{name}-N{pre.shape[0]}-M{pre.shape[1]}"
    res = benchmark.pedantic(sg.score, args=(pre, post), rounds=1 if name == "full" else 3, warmup_rounds=0)
    benchmark.extra_info.update(solver=res.diagnostics["solver"], timings=res.diagnostics["timings"],
                                residual_max=res.diagnostics["residual_max"])
    assert res.diagnostics["residual_max"] < 1e-6


def test_gram_floor(benchmark, layer):
    name, (pre, post) = layer
    benchmark.group = f"score-{name}-N{pre.shape[0]}-M{pre.shape[1]}"

    def grams():
        return pre @ pre.T, post @ post.T

    benchmark.pedantic(grams, rounds=1 if name == "full" else 3, warmup_rounds=0)


def test_reference_pipeline(benchmark, layer):
    name, (pre, post) = layer
    benchmark.group = f"score-{name}-N{pre.shape[0]}-M{pre.shape[1]}"
    vals = benchmark.pedantic(reference_pipeline, args=(pre, post), rounds=1, warmup_rounds=0)
    ours = sg.score(pre, post).eigenvalues.numpy()
    # same pencil on 1-perp up to the c*I vs c*11^T choice: the top eigenvalues agree closely
    np.testing.assert_allclose(ours[:8], vals[:8], rtol=1e-2)


# VmHWM (the peak RSS of this process image) rather than ru_maxrss: the latter survives exec and would report
# the forked pytest parent's footprint
_PEAK = """
import torch, spectra_gpu as sg

def hwm():
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM"))

pre, post = torch.load({path!r})
before = hwm()
sg.score(pre, post)
print(before, hwm())
"""


def test_peak_rss(layer, benchmark, tmp_path):
    """Peak resident memory of a fresh process that loads the layer's signals and scores them; bar < 3 GiB.
    Reported: peak RSS and the RSS before scoring (interpreter + torch + the two [N, M] fp32 inputs)."""
    name, (pre, post) = layer
    benchmark.group = f"peak-rss-{name}"
    path = str(tmp_path / "layer.pt")
    torch.save((pre, post), path)
    code = _PEAK.format(path=path)

    def run():
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        return [int(v) for v in out.stdout.split()]

    before, after = benchmark.pedantic(run, rounds=1, warmup_rounds=0)
    benchmark.extra_info.update(peak_rss_gib=after / 2**20, rss_before_score_gib=before / 2**20)
    assert after < 3 * 2**20  # KiB


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["small", "llama7b"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_score_gpu(benchmark, name, backend):
    """sg.score on CUDA tensors with the kernels (backend='triton') or the torch reference on the GPU."""
    from _bench import CUDA, SHAPES, TRITON_REASON, timed

    if not CUDA:
        pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False)")
    if backend == "triton" and TRITON_REASON:
        pytest.skip(TRITON_REASON)
    n, d, _ = SHAPES[name]
    g = torch.Generator(device="cuda").manual_seed(1)
    pre = torch.randn(n, 512, generator=g, device="cuda") @ torch.randn(512, d, generator=g, device="cuda") / 512**0.5
    post = torch.relu(pre)
    benchmark.group = f"score-gpu-{name}-N{n}-M{d}"
    res = timed(benchmark, lambda: sg.score(pre, post, backend=backend), rounds=2)
    benchmark.extra_info.update(solver=res.diagnostics["solver"], timings=res.diagnostics["timings"],
                                residual_max=res.diagnostics["residual_max"])
    assert res.diagnostics["residual_max"] < 1e-6
