"""Each baseline scorer against its formula on a hand-computed case; the spectral scorer against sg.score."""

import math

import pytest
import torch

import spectra_gpu as sg
from spectra_gpu.scorers import SCORERS, ScoreContext, ScoreOutput, get_scorer, input_knn, register_scorer, run_scorer

# 4 units x 4 samples of post-activations (ReLU-like, non-negative) and pre-activations.
POST = torch.tensor([[0.0, 2.0, 0.0, 2.0],   # mean 1, var 1, zeros 1/2, ||a||_2 = sqrt(8)
                     [1.0, 1.0, 1.0, 5.0],   # mean 2, var 3, zeros 0,   ||a||_2 = sqrt(28)
                     [0.0, 0.0, 0.0, 4.0],   # mean 1, var 3, zeros 3/4, ||a||_2 = 4
                     [3.0, 3.0, 1.0, 1.0]],  # mean 2, var 1, zeros 0,   ||a||_2 = sqrt(20)
                    dtype=torch.float64)
PRE = POST - torch.tensor([[1.0, 0.0, 2.0, 0.0], [0, 0, 0, 0], [3.0, 1.0, 2.0, 0.0], [0, 0, 0, 0]])
W_IN = torch.tensor([[1.0, -2.0], [0.5, 0.5], [-3.0, 0.0], [0.0, 0.1]], dtype=torch.float64)
W_OUT = torch.tensor([[1.0, 1.0, -1.0], [2.0, 0.0, 0.0], [0.0, -0.5, 0.5], [3.0, 4.0, 0.0]])


def ctx(**kw):
    st = sg.SignalStats(4, precision="fp64").update(PRE[:, :2], POST[:, :2]).update(PRE[:, 2:], POST[:, 2:])
    return ScoreContext(st, W_IN, W_OUT, **kw)


def t(*v):
    return torch.tensor(v, dtype=torch.float64)


HAND = {
    "l1": t(3.0, 1.0, 3.0, 0.1),
    "l2": t(math.sqrt(5), math.sqrt(0.5), 3.0, 0.1),
    "act_mean": t(1.0, 2.0, 1.0, 2.0),
    "act_var": t(1.0, 3.0, 3.0, 1.0),
    "apoz": t(-0.5, 0.0, -0.75, 0.0),
    # ||W_out[:, i]||_1 * ||a_i||_2
    "wanda_sp": t(3 * math.sqrt(8), 2 * math.sqrt(28), 1.0 * 4, 7 * math.sqrt(20)),
    # Var(a_i) * ||W_out[:, i]||_2^2
    "flap": t(1 * 3.0, 3 * 4.0, 3 * 0.5, 1 * 25.0),
}


@pytest.mark.parametrize("name", sorted(HAND))
def test_baseline_matches_hand_computed_formula(name):
    out = run_scorer(name, ctx())
    assert isinstance(out, ScoreOutput) and out.neighbors is None
    assert out.scores.dtype == torch.float64
    torch.testing.assert_close(out.scores, HAND[name], rtol=1e-12, atol=1e-12)


def test_activation_mean_uses_abs_for_signed_activations():
    post = torch.tensor([[-1.0, 1.0, -3.0, 3.0], [1.0, 1.0, 1.0, 1.0], [0.5, -0.5, 2.0, 0.0]], dtype=torch.float64)
    st = sg.SignalStats(3, precision="fp64").update(post * 2 + 1, post)
    c = ScoreContext(st, torch.ones(3, 1), torch.ones(3, 1))
    torch.testing.assert_close(run_scorer("act_mean", c).scores, t(2.0, 1.0, 0.75))


def test_taylor_is_abs_of_captured_term_and_required():
    out = run_scorer("taylor", ctx(taylor=torch.tensor([0.5, -2.0, 0.0, 1.0])))
    torch.testing.assert_close(out.scores, t(0.5, 2.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="taylor"):
        run_scorer("taylor", ctx())


def test_random_is_seeded_and_uniform():
    a = run_scorer("random", ctx(seed=3)).scores
    b = run_scorer("random", ctx(seed=3)).scores
    c = run_scorer("random", ctx(seed=4)).scores
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert bool(((a >= 0) & (a < 1)).all())


def test_spectral_scorer_equals_engine_on_same_stats():
    from tests.conftest import relu_layer

    pre, post = relu_layer(40, 300, seed=2)
    st = sg.SignalStats(40, precision="fp64").update(pre, post)
    c = ScoreContext(st, torch.randn(40, 8), torch.randn(40, 5), options={"k": 5, "num_eigs": 8})
    out = run_scorer("spectral", c)
    ref = sg.score(pre, post, k=5, num_eigs=8)
    assert torch.corrcoef(torch.stack([out.scores, ref.scores]))[0, 1] > 0.999
    assert torch.equal(out.neighbors, ref.neighbors)
    assert out.extra["eigenvalues"].shape == (8,)
    assert "residual_max" in out.extra["diagnostics"]


def test_hybrid_rank_is_product_of_shifted_percentile_ranks_and_keeps_dead_units_first():
    from tests.conftest import relu_layer

    pre, post = relu_layer(30, 200, seed=7)
    post[4] = 0.0  # dead
    st = sg.SignalStats(30, precision="fp64").update(pre, post)
    w_in, w_out = torch.randn(30, 4, generator=torch.Generator().manual_seed(0)), torch.randn(30, 6)
    out = run_scorer("hybrid_rank", ScoreContext(st, w_in, w_out, options={"k": 5, "num_eigs": 4}))
    spec = sg.score(pre, post, k=5, num_eigs=4).scores
    mag = run_scorer("wanda_sp", ScoreContext(st, w_in, w_out)).scores
    # independent ranks: argsort of argsort (no ties here), dead spectral unit -> -inf
    alive = torch.isfinite(spec)
    r_spec = torch.full((30,), -1.0, dtype=torch.float64)
    r_spec[torch.argsort(spec)] = torch.arange(30, dtype=torch.float64) / 30
    r_spec[~alive] = -1.0
    r_mag = torch.empty(30, dtype=torch.float64)
    r_mag[torch.argsort(mag)] = torch.arange(30, dtype=torch.float64) / 30
    want = (r_spec + 1 / 30) * (r_mag + 1 / 30)
    assert out.scores[4] == -math.inf
    torch.testing.assert_close(out.scores[alive], want[alive])
    assert torch.equal(out.neighbors, sg.score(pre, post, k=5, num_eigs=4).neighbors)


def test_baseline_neighbors_on_request_match_spectral_input_graph():
    from tests.conftest import relu_layer

    pre, post = relu_layer(30, 200, seed=5)
    st = sg.SignalStats(30, precision="fp64").update(pre, post)
    c = ScoreContext(st, torch.randn(30, 4), torch.randn(30, 4), options={"neighbors": True, "k": 6})
    nb = run_scorer("wanda_sp", c).neighbors
    assert torch.equal(nb, sg.score(pre, post, k=6).neighbors)
    assert torch.equal(nb, input_knn(st, 6))


def test_dead_units_get_minus_one_neighbor_rows():
    post = POST.clone()
    st = sg.SignalStats(5, precision="fp64")
    pre5 = torch.cat([PRE, torch.ones(1, 4)])
    post5 = torch.cat([post, torch.zeros(1, 4)])
    st.update(pre5, post5)
    nb = input_knn(st, 2)
    assert nb.shape == (5, 2)
    assert bool((nb[4] == -1).all()) and not bool((nb[:4] == 4).any())


def test_bad_inputs_are_named():
    st = ctx().stats
    with pytest.raises(ValueError, match="in_weight"):
        ScoreContext(st, torch.zeros(3, 2), W_OUT)
    with pytest.raises(ValueError, match="out_weight"):
        ScoreContext(st, W_IN, torch.zeros(4))
    with pytest.raises(TypeError, match="SignalStats"):
        ScoreContext(POST, W_IN, W_OUT)
    with pytest.raises(ValueError, match="taylor"):
        ScoreContext(st, W_IN, W_OUT, taylor=torch.zeros(3))
    with pytest.raises(ValueError, match="expected one of"):
        get_scorer("magic")
    with pytest.raises(ValueError, match="takes only"):
        run_scorer("l1", ctx(options={"num_eigs": 3}))


def test_register_custom_scorer_and_contract_check():
    register_scorer("_test_const", lambda c: ScoreOutput(torch.ones(c.n)))
    try:
        assert torch.equal(run_scorer("_test_const", ctx()).scores, torch.ones(4))
        register_scorer("_test_bad", lambda c: ScoreOutput(torch.ones(c.n + 1)))
        with pytest.raises(ValueError, match="shape"):
            run_scorer("_test_bad", ctx())
    finally:
        SCORERS.pop("_test_const", None)
        SCORERS.pop("_test_bad", None)
