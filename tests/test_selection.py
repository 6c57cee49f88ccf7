"""select_units / round_counts against brute-force oracles and hand cases."""

import math

import pytest
import torch

from spectra_gpu.selection import percentile_ranks, round_counts, select_units


def test_lowest_q_with_ties_to_lower_index():
    s = torch.tensor([0.5, 0.1, 0.1, 0.9, -math.inf, 0.3])
    assert select_units(s, 3).tolist() == [1, 2, 4]
    assert select_units(s, 2).tolist() == [1, 4]  # dead first, then the lower index of the tie


def test_random_scores_match_sort_oracle():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        n = int(torch.randint(2, 50, (1,), generator=g))
        s = torch.rand(n, generator=g, dtype=torch.float64)
        q = int(torch.randint(0, n + 1, (1,), generator=g))
        expect = sorted(torch.argsort(s)[: min(q, n - 1)].tolist())
        assert select_units(s, q).tolist() == expect


def test_min_keep_caps_the_count():
    s = torch.arange(10, dtype=torch.float64)
    assert select_units(s, 9, min_keep=4).tolist() == [0, 1, 2, 3, 4, 5]
    assert select_units(s, 5, min_keep=10).numel() == 0


def test_duplicate_pair_never_both_in_one_round():
    s = torch.tensor([0.0, 0.01, 0.5, 0.6, 0.7])
    out = select_units(s, 2, duplicates=[(1, 0)])
    assert out.tolist() == [0, 2]
    # hard rule: fewer than q when nothing else is allowed
    assert select_units(torch.tensor([0.0, 0.1, 0.2]), 2, duplicates=[(0, 1), (0, 2)], min_keep=0).tolist() == [0]


def test_one_per_neighbourhood_skips_neighbours_of_chosen():
    s = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    nb = torch.tensor([[1, 2], [0, 2], [1, 3], [2, 4], [3, 5], [4, 3]])
    # 0 chosen -> 1, 2 blocked; 3 chosen -> 2, 4 blocked; 5 chosen
    assert select_units(s, 3, neighbors=nb, one_per_neighbourhood=True).tolist() == [0, 3, 5]
    # not enough unblocked units: the blocked ones fill up in score order
    assert select_units(s, 4, neighbors=nb, one_per_neighbourhood=True).tolist() == [0, 1, 3, 5]
    # dead rows (-1) block nothing
    nb2 = torch.full((6, 2), -1)
    assert select_units(s, 3, neighbors=nb2, one_per_neighbourhood=True).tolist() == [0, 1, 2]


def test_bad_inputs():
    s = torch.zeros(4)
    with pytest.raises(ValueError, match="1-D"):
        select_units(torch.zeros(2, 2), 1)
    with pytest.raises(ValueError, match="NaN"):
        select_units(torch.tensor([0.0, math.nan]), 1)
    with pytest.raises(TypeError, match="float"):
        select_units(torch.arange(4), 1)
    with pytest.raises(ValueError, match="q"):
        select_units(s, -1)
    with pytest.raises(ValueError, match="neighbors"):
        select_units(s, 1, one_per_neighbourhood=True)
    with pytest.raises(ValueError, match="duplicates"):
        select_units(s, 1, duplicates=[(0, 7)])
    with pytest.raises(ValueError, match="allocation"):
        round_counts({"a": s}, 0.1, allocation="greedy")
    with pytest.raises(ValueError, match="fraction"):
        round_counts({"a": s}, 1.5)


def test_round_counts_uniform_and_global():
    a = torch.arange(20, dtype=torch.float64)
    b = torch.arange(40, dtype=torch.float64)
    assert round_counts({"a": a, "b": b}, 0.05) == {"a": 1, "b": 2}
    assert round_counts({"a": a, "b": b}, 0.5, min_keep={"a": 15}) == {"a": 5, "b": 20}
    # global: same total; within-layer percentiles interleave, so an even split here
    assert round_counts({"a": a, "b": b}, 0.1, allocation="global") == {"a": 2, "b": 4}
    # dead units anywhere go first in global allocation, then the lowest percentile (a's 0th)
    b2 = b.clone()
    b2[:5] = -math.inf
    assert round_counts({"a": a, "b": b2}, 0.1, allocation="global") == {"a": 1, "b": 5}


def test_percentile_ranks():
    r = percentile_ranks(torch.tensor([3.0, 1.0, -math.inf, 2.0]))
    assert r.tolist() == [0.75, 0.25, -1.0, 0.5]
