
import numpy as np
import pytest
import torch
from _oracle import oracle_score
from conftest import relu_layer
from scipy.stats import spearmanr

import spectra_gpu as sg


@pytest.mark.parametrize("direction", ["fwd", "rev"])
def test_score_matches_independent_oracle(direction):
    pre, post = relu_layer(120, 400, seed=1)
    res = sg.score(pre, post, direction=direction)
    want, lam = oracle_score(pre.numpy(), post.numpy(), k=10, s=32, direction=direction)
    np.testing.assert_allclose(res.scores.numpy(), want, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(res.eigenvalues.numpy(), lam, rtol=1e-8)


def test_lobpcg_path_agrees_with_dense_path():
    pre, post = relu_layer(600, 300, seed=2)
    dense = sg.score(pre, post, solver="dense")
    it = sg.score(pre, post, solver="lobpcg")
    assert it.diagnostics["solver"]["name"] == "lobpcg" and it.diagnostics["solver"]["converged"]
    assert it.diagnostics["residual_max"] < 1e-6
    torch.testing.assert_close(it.eigenvalues, dense.eigenvalues, rtol=1e-6, atol=0)
    # eigenvectors of clustered spectra are only defined up to rotation inside a cluster; scores sum over the
    # whole top-s span, so they agree unless the span itself cuts through a cluster
    assert spearmanr(it.scores.numpy(), dense.scores.numpy())[0] > 0.999


def test_scores_shape_range_and_defaults():
    pre, post = relu_layer(80, 200)
    res = sg.score(pre, post)
    assert res.scores.shape == (80,) and res.scores.dtype == torch.float64
    assert float(res.scores.max()) == 1.0 and float(res.scores.min()) >= 0
    assert res.eigenvalues.shape == (32,)
    assert bool((res.eigenvalues[:-1] >= res.eigenvalues[1:]).all())
    d = res.diagnostics
    assert d["k"] == 10 and d["num_eigs"] == 32 and d["preprocess"] == "zscore" and d["direction"] == "fwd"
    assert set(d["timings"]) >= {"graph_input", "graph_output", "eigensolve_and_scores", "total"}
    assert res.neighbors.shape == (80, 10)


def test_permutation_invariance():
    pre, post = relu_layer(90, 250, seed=4)
    perm = torch.randperm(90)
    a = sg.score(pre, post)
    b = sg.score(pre[perm], post[perm])
    torch.testing.assert_close(b.scores, a.scores[perm], rtol=1e-6, atol=1e-9)


def test_deterministic_for_fixed_seed():
    pre, post = relu_layer(700, 200, seed=5)
    a = sg.score(pre, post, solver="lobpcg", seed=3)
    b = sg.score(pre, post, solver="lobpcg", seed=3)
    assert torch.equal(a.scores, b.scores)


def test_dead_units_get_minus_inf_and_leave_the_graphs():
    pre, post = relu_layer(60, 300, seed=6)
    pre[[3, 17]] = -5.0 - 0.01 * torch.rand(2, 300, dtype=torch.float64)  # always negative -> ReLU dead
    post = torch.relu(pre)
    pre[40] = 2.0  # constant unit
    post[40] = 2.0
    res = sg.score(pre, post)
    assert res.diagnostics["dead_units"] == [3, 17, 40]
    assert torch.isinf(res.scores[[3, 17, 40]]).all() and bool((res.scores[[3, 17, 40]] < 0).all())
    assert not res.alive[[3, 17, 40]].any() and int(res.alive.sum()) == 57
    alive = res.alive
    ref = sg.score(pre[alive], post[alive])
    torch.testing.assert_close(res.scores[alive], ref.scores)
    assert not bool(torch.isin(res.neighbors[alive], torch.tensor([3, 17, 40])).any())


def test_duplicate_units_are_reported():
    pre, post = relu_layer(50, 300, seed=7)
    pre[10], post[10] = pre[20], post[20]
    res = sg.score(pre, post)
    assert (10, 20) in res.diagnostics["duplicates"]
    assert torch.isfinite(res.scores).all()


def test_disconnected_graph_is_repaired_and_reported():
    g = torch.Generator().manual_seed(8)
    base = [torch.randn(1, 400, generator=g, dtype=torch.float64) for _ in range(2)]
    pre = torch.cat([b + 0.05 * torch.randn(25, 400, generator=g, dtype=torch.float64) for b in base])
    post = torch.tanh(pre)
    with pytest.warns(sg.NumericalWarning, match="components"):
        res = sg.score(pre, post, k=5)
    con = res.diagnostics["connectivity"]
    assert con["input"]["components_before"] == 2 and con["input"]["edges_added"] == 1
    assert torch.isfinite(res.scores).all() and res.diagnostics["residual_max"] < 1e-6
    assert float(res.eigenvalues[0]) < 1e4  # no spurious 1/eps eigenvalue


def test_streaming_exact_equals_in_memory():
    pre, post = relu_layer(70, 600, seed=9)
    st = sg.SignalStats(70, precision="fp64")
    for s in range(0, 600, 128):
        st.update(pre[:, s:s + 128], post[:, s:s + 128])
    assert st.m == 600
    for prep in ("zscore", "center", "raw"):
        a = sg.score(pre, post, preprocess=prep)
        b = sg.score(st, preprocess=prep)
        torch.testing.assert_close(b.scores, a.scores, rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(b.eigenvalues, a.eigenvalues)


def test_streaming_fp32_batches_close_to_exact():
    pre, post = relu_layer(70, 600, seed=9)
    st = sg.SignalStats(70)  # fp32 batch products, fp64 accumulation
    for s in range(0, 600, 100):
        st.update(pre[:, s:s + 100].float(), post[:, s:s + 100].float())
    a, b = sg.score(pre, post), sg.score(st)
    assert spearmanr(a.scores.numpy(), b.scores.numpy())[0] > 0.99


def test_streaming_shift_survives_large_offsets():
    pre, post = relu_layer(50, 400, seed=10)
    pre, post = pre + 1e4, post + 1e4  # E[x^2] - E[x]^2 would cancel catastrophically without the shift
    st = sg.SignalStats(50, precision="fp64").update(pre[:, :200], post[:, :200]).update(pre[:, 200:], post[:, 200:])
    torch.testing.assert_close(sg.score(st).scores, sg.score(pre, post).scores, rtol=1e-6, atol=1e-8)
    # fp32 inputs, fp64 products: the shift is applied in fp64, so the moments are exact to fp64 rounding
    p32, q32 = pre.float(), post.float()
    st = sg.SignalStats(50, precision="fp64").update(p32[:, :200], q32[:, :200]).update(p32[:, 200:], q32[:, 200:])
    mean, std = st.mean_std("pre")
    x = p32.double()
    torch.testing.assert_close(mean, x.mean(1), rtol=1e-13, atol=0)
    torch.testing.assert_close(std, x.std(1, correction=0), rtol=1e-9, atol=0)


def test_sketch_reports_recall_that_grows_with_sketch_dim():
    pre, post = relu_layer(300, 3000, d=48, seed=11)
    recalls = []
    for dim in (256, 2048):
        st = sg.SignalStats(300, mode="sketch", sketch_dim=dim, probe=100, seed=0)
        for s in range(0, 3000, 500):
            st.update(pre[:, s:s + 500], post[:, s:s + 500])
        res = sg.score(st)
        recalls.append(res.diagnostics["sketch_recall_at_k"])
        assert torch.isfinite(res.scores).all()
        assert st.nbytes() < 2 * 300 * dim * 8 + 2 * 100 * 300 * 8 + 4 * 300 * 8 + 1
    assert recalls[0]["pre"] < recalls[1]["pre"] and recalls[0]["post"] < recalls[1]["post"]
    assert recalls[1]["pre"] > 0.75 and recalls[1]["post"] > 0.75


def test_sketch_recall_is_exact_recall():
    # the reported recall is the fraction of exact neighbours of the probe rows the sketched graph kept
    pre, post = relu_layer(120, 400, seed=13)
    st = sg.SignalStats(120, mode="sketch", sketch_dim=64, probe=120, seed=1).update(pre, post)
    res = sg.score(st, dead_filter=False)
    exact = sg.knn_graph((pre - pre.mean(1, keepdim=True)) / pre.std(1, correction=0, keepdim=True), 10)
    z = st.sketch("pre", "zscore", torch.ones(120, dtype=torch.bool))
    approx = sg.knn_graph(z, 10)
    want = float((approx.idx[:, :, None] == exact.idx[:, None, :]).any(2).float().mean())
    assert abs(res.diagnostics["sketch_recall_at_k"]["pre"] - want) < 1e-6


def test_sym_full_weighted_and_options_run():
    pre, post = relu_layer(100, 300, seed=12)
    sym = sg.score(pre, post, direction="sym")
    assert float(sym.scores.max()) == 1.0 and "reverse" in sym.diagnostics
    full = sg.score(pre, post, num_eigs="full")
    assert full.eigenvalues.numel() == 0 and torch.isfinite(full.scores).all()
    # 'full' is the s -> N-1 limit of the eigen-sum
    allmodes = sg.score(pre, post, num_eigs=99)
    torch.testing.assert_close(full.scores, allmodes.scores, rtol=1e-6, atol=1e-9)
    w = sg.score(pre, post, weighted=True)
    assert torch.isfinite(w.scores).all()
    for prep in ("center", "raw"):
        assert torch.isfinite(sg.score(pre, post, preprocess=prep).scores).all()


def test_numpy_and_half_inputs():
    pre, post = relu_layer(40, 100)
    a = sg.score(pre.numpy(), post.numpy())
    b = sg.score(pre, post)
    torch.testing.assert_close(a.scores, b.scores)
    h = sg.score(pre.half(), post.half())
    assert h.scores.shape == (40,)


def test_small_n_caps_k_and_s():
    pre, post = relu_layer(5, 50)
    res = sg.score(pre, post)
    assert res.diagnostics["k"] == 4 and res.diagnostics["num_eigs"] == 4


@pytest.mark.parametrize("call,exc,match", [
    (lambda p, q: sg.score(p, q[:, :-1]), ValueError, "same shape"),
    (lambda p, q: sg.score(p[:2], q[:2]), ValueError, "at least 3 units"),
    (lambda p, q: sg.score(p[:, :1], q[:, :1]), ValueError, "at least 2 samples"),
    (lambda p, q: sg.score(p, q, num_eigs=0), ValueError, "num_eigs >= 1"),
    (lambda p, q: sg.score(p, q, num_eigs="all"), ValueError, "'full'"),
    (lambda p, q: sg.score(p, q, k=0), ValueError, "k: expected"),
    (lambda p, q: sg.score(p, q, direction="up"), ValueError, "direction"),
    (lambda p, q: sg.score(p, q, preprocess="norm"), ValueError, "preprocess"),
    (lambda p, q: sg.score(p.long(), q.long()), TypeError, "float"),
    (lambda p, q: sg.score(p[0], q[0]), ValueError, "2-D"),
    (lambda p, q: sg.score([[1.0]], q), TypeError, "torch.Tensor or numpy"),
    (lambda p, q: sg.score(p, None), ValueError, "post-activation"),
    (lambda p, q: sg.score(p, q, backend="nope"), sg.BackendUnavailableError, "unknown backend"),
])
def test_bad_input(call, exc, match):
    pre, post = relu_layer(20, 50)
    with pytest.raises(exc, match=match):
        call(pre, post)


def test_nan_input_rejected():
    pre, post = relu_layer(20, 50)
    post[3, 7] = float("nan")
    with pytest.raises(ValueError, match="post: expected finite"):
        sg.score(pre, post)


def test_stats_bad_input():
    st = sg.SignalStats(10)
    with pytest.raises(ValueError, match="expected 10 units"):
        st.update(torch.randn(9, 5), torch.randn(9, 5))
    with pytest.raises(ValueError, match="no samples yet"):
        sg.score(st)
    with pytest.raises(ValueError, match="mode"):
        sg.SignalStats(10, mode="fast")


def test_stats_keep_mean_abs_and_nonzero_counts():
    pre, post = relu_layer(30, 200, seed=14)
    post = post - 0.1  # signed, so |a| != a
    st = sg.SignalStats(30).update(pre[:, :70], post[:, :70]).update(pre[:, 70:], post[:, 70:])
    torch.testing.assert_close(st.abs_sum_post / st.m, post.abs().mean(1))
    torch.testing.assert_close(st.nnz_post, (post != 0).sum(1).double())
    mu, sd = st.mean_std("post")
    torch.testing.assert_close(mu, post.mean(1))
    torch.testing.assert_close(sd, post.std(1, correction=0))


def _hub_graph(n: int, hubs: int, k: int, seed: int):
    """Every non-hub node linked to k random hubs: nearly bipartite, so J^(1/2) B J^(1/2) has eigenvalues
    above 2 (normalised-Laplacian top ~2 plus the rank-one term) -- kNN hubness on high-dimensional data."""
    from spectra_gpu.ops.union_graph import Graph

    g = torch.Generator().manual_seed(seed)
    src = torch.arange(hubs, n).repeat_interleave(k)
    dst = torch.stack([torch.randperm(hubs, generator=g)[:k] for _ in range(n - hubs)]).reshape(-1)
    row, col = torch.minimum(src, dst), torch.maximum(src, dst)
    order = torch.argsort(row * n + col)
    e = row.numel()
    return Graph(n, row[order], col[order], torch.ones(e, dtype=torch.float64), torch.ones(e, dtype=torch.float64))


def test_lobpcg_preconditioner_stays_spd_when_the_undamped_one_is_indefinite():
    from spectra_gpu.backends import laplacian_operator
    from spectra_gpu.ops.graph_laplacian import graph_laplacian_dense, graph_laplacian_torch
    from spectra_gpu.scoring.spectral import _damping, _solve

    n = 900
    gy = _hub_graph(n, 30, 10, seed=0)
    gx = _hub_graph(n, 45, 10, seed=1)
    deg = gy.degree()
    c = float(deg.mean()) / n
    b = graph_laplacian_dense(gy) + c
    jac = 1.0 / (deg + c)
    mu = torch.linalg.eigvalsh(jac.sqrt()[:, None] * b * jac.sqrt()[None, :])
    assert float(mu[-1]) > 2.0  # the undamped 2J - JBJ is indefinite here
    with pytest.warns(sg.NumericalWarning, match="preconditioner 2J - JBJ would be indefinite"):
        w = _damping(laplacian_operator(graph_laplacian_torch(gy), c), jac[:, None], c, seed=0)
    assert w * float(mu[-1]) < 2.0  # the damped one is SPD
    diag_l: dict = {}
    diag_d: dict = {}
    with pytest.warns(sg.NumericalWarning, match="damped to 2J - w JBJ"):
        lam_l, u_l = _solve(gx, gy, 16, "lobpcg", 1e-8, 500, 0, diag_l)
    lam_d, _ = _solve(gx, gy, 16, "dense", 1e-8, 500, 0, diag_d)
    assert diag_l["solver"]["converged"], diag_l
    torch.testing.assert_close(lam_l, lam_d, rtol=1e-6, atol=0)


def test_moments_mode_keeps_no_gram_and_score_refuses_it():
    pre, post = relu_layer(40, 300, seed=3)
    ex = sg.SignalStats(40, precision="fp64").update(pre, post)
    mo = sg.SignalStats(40, mode="moments", precision="fp64").update(pre, post)
    assert mo.pre.gram is None and mo.pre.sk is None and mo.nbytes() < ex.nbytes() / 10
    for side in ("pre", "post"):
        for a, b in zip(mo.mean_std(side), ex.mean_std(side), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mo.nnz_post, ex.nnz_post)
    with pytest.raises(ValueError, match="mode 'moments'"):
        sg.score(mo)


def test_k_or_num_eigs_at_or_above_n_raises_instead_of_clamping():
    pre, post = relu_layer(5, 50)
    with pytest.raises(ValueError, match=r"k: expected fewer neighbours than the layer's N=5 units \(1 <= k < 5\), "
                                         r"got k=5"):
        sg.score(pre, post, k=5)
    with pytest.raises(ValueError, match="got k=100000"):
        sg.score(pre, post, k=100000)
    with pytest.raises(ValueError, match=r"num_eigs: expected fewer eigenpairs than the layer's N=5 units "
                                         r"\(1 <= num_eigs < 5\) or 'full', got num_eigs=5"):
        sg.score(pre, post, num_eigs=5)
    st = sg.SignalStats(5)
    st.update(pre, post)
    with pytest.raises(ValueError, match="got num_eigs=10000"):
        sg.score(st, num_eigs=10000)
    with pytest.raises(ValueError, match="got k=5"):
        sg.score(st, k=5)


def test_explicit_k_and_num_eigs_in_range_give_the_results_of_the_defaults_bit_for_bit():
    pre, post = relu_layer(5, 50)
    a, b = sg.score(pre, post), sg.score(pre, post, k=4, num_eigs=4)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.eigenvalues, b.eigenvalues)
    pre, post = relu_layer(40, 80, seed=3)
    a, b = sg.score(pre, post), sg.score(pre, post, k=10, num_eigs=32)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.neighbors, b.neighbors)
    assert a.diagnostics["k"] == 10 and a.diagnostics["num_eigs"] == 32
