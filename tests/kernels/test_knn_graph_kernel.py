"""knn_graph_triton (fused distance + running top-k kernel) vs its torch reference knn_graph_torch (itself checked
against a numpy brute force in tests/ops): weird shapes, ties, ragged batches, dtypes, strides, poisoned outputs."""

import kernel_fixtures  # skips this module without triton
import numpy as np
import pytest
import torch

from spectra_gpu.kernels import _utils
from spectra_gpu.kernels.knn_graph import K_MAX, knn_graph_triton
from spectra_gpu.ops.knn_graph import knn_graph_torch

device, poison = kernel_fixtures.device, kernel_fixtures.poison  # CPU-interpreter/CUDA device; poisoned outputs
SENTINEL = kernel_fixtures.SENTINEL


def kernel_lists(x, k, lengths=None, splits=None):
    g = knn_graph_triton(x, k, lengths, splits=splits)
    return g.idx, g.sqdist


def reference_lists(x, k, lengths=None):
    g = knn_graph_torch(x, k, lengths)
    return g.idx, g.sqdist


def _assert_written(idx, dist):
    assert not torch.isnan(dist).any(), "a distance was never written (NaN poison survived)"
    assert not (idx == SENTINEL).any(), "an index was never written (sentinel poison survived)"


def _check_close(x, k, lengths=None, splits=None):
    """Distances match the reference; indices match except where the reference has a near-tie."""
    idx, dist = kernel_lists(x, k, lengths, splits)
    _assert_written(idx, dist)
    ri, rd = reference_lists(x, k, lengths)
    scale = float(rd[torch.isfinite(rd)].max())
    torch.testing.assert_close(dist, rd, rtol=1e-4, atol=1e-5 * scale)
    # the returned distances are the distances of the returned indices (recomputed in fp64)
    x3 = (x if x.dim() == 3 else x[None]).double().cpu()
    i3 = (idx if idx.dim() == 3 else idx[None]).cpu()
    d3 = (dist if dist.dim() == 3 else dist[None]).double().cpu()
    for b in range(x3.shape[0]):
        n = x3.shape[1] if lengths is None else int(lengths[b])
        rec = ((x3[b, :n, None, :] - x3[b, i3[b, :n]]) ** 2).sum(-1)
        np.testing.assert_allclose(d3[b, :n], rec, rtol=1e-3, atol=1e-4 * scale)
    diff = (idx != ri).any(dim=-1)
    if bool(diff.any()):  # only acceptable on rows whose k+1 nearest hold a near-tie
        full = reference_lists(x, min(k + 1, (min(lengths) if lengths else x.shape[-2]) - 1), lengths)[1]
        gaps = (full[..., 1:] - full[..., :-1]).abs().min(dim=-1).values
        assert bool((gaps[diff] < 1e-4 * scale).all()), f"index mismatch on {int(diff.sum())} tie-free rows"
    return idx, dist


@pytest.mark.parametrize("n,d,k", [
    (37, 20, 5),   # N not a multiple of the 32-row tile
    (64, 16, 63),  # k = N - 1: every other row is a neighbour
    (33, 3, 1),    # k = 1
    (45, 1, 4),    # D = 1
    (2, 5, 1),     # the smallest layer
])
def test_knn_graph_triton_matches_reference(device, n, d, k):
    x = torch.randn(n, d, device=device)
    idx, dist = _check_close(x, k)
    assert idx.shape == dist.shape == (n, k) and idx.dtype == torch.int64 and dist.dtype == torch.float64
    assert torch.equal(dist, dist.float().double()), "distances are the kernel's fp32 values"
    assert bool((idx != torch.arange(n, device=device)[:, None]).all()), "a row listed itself"
    assert bool((dist[:, 1:] >= dist[:, :-1]).all()), "neighbours not sorted nearest first"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_knn_graph_triton_half_precision_accumulates_in_fp32(device, dtype):
    x = torch.randn(40, 70, device=device).to(dtype)  # D spans three 32-wide slices
    _check_close(x, 6)


@pytest.mark.parametrize("splits", [1, 3])
def test_knn_graph_triton_ties_and_duplicates_exact(device, splits):
    # small integers: every distance is exact in fp32, so ties are real ties and must go to the lower index
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-2, 3, (45, 9), generator=g).float()
    x[10] = x[3]
    x[20] = x[3]  # a triple of identical rows
    x[44] = x[0]
    x = x.to(device)
    idx, dist = kernel_lists(x, 7, splits=splits)  # 3 splits: tied rows 3, 10, 20 and 0, 44 land in different ones
    _assert_written(idx, dist)
    ri, rd = reference_lists(x, 7)
    assert torch.equal(idx, ri) and torch.equal(dist, rd)
    assert idx[3, :2].tolist() == [10, 20] and dist[3, :2].tolist() == [0.0, 0.0]
    assert idx[20, :2].tolist() == [3, 10]


@pytest.mark.parametrize("lengths,splits", [([45], 1), ([45, 12, 30], 1), ([45, 12, 30], 4)])
def test_knn_graph_triton_ragged_batch(device, lengths, splits):
    b = len(lengths)
    g = torch.Generator().manual_seed(4)
    x = torch.randint(-3, 4, (b, 45, 6), generator=g).float()
    for layer, n in enumerate(lengths):
        x[layer, n:] = x[layer, 0]  # padding rows at distance 0 from row 0: picked if the kernel ever read them
    x = x.to(device)
    idx, dist = kernel_lists(x, 5, lengths, splits)  # 4 splits > column tiles of the 12-row layer
    _assert_written(idx, dist)
    ri, rd = reference_lists(x, 5, lengths)
    assert torch.equal(idx, ri) and torch.equal(dist, rd)
    for layer, n in enumerate(lengths):
        assert bool((idx[layer, :n] < n).all())
        assert bool((idx[layer, n:] == -1).all()) and bool(torch.isinf(dist[layer, n:]).all())


@pytest.mark.parametrize("splits", [1, 2])
def test_knn_graph_triton_ragged_batch_random_floats(device, splits):
    x = torch.randn(2, 70, 24, device=device)
    _check_close(x, 3, [70, 17], splits=splits)


@pytest.mark.parametrize("layout", ["sliced", "transposed", "batch-transposed"])
def test_knn_graph_triton_non_contiguous(device, layout):
    if layout == "sliced":
        x = torch.randn(30, 40, device=device)[:, ::2]
    elif layout == "transposed":
        x = torch.randn(16, 30, device=device).T
    else:
        x = torch.randn(20, 2, 26, device=device).permute(1, 2, 0)  # [2, 26, 20], last dim strided
    assert not x.is_contiguous()
    _check_close(x, 4)


def test_knn_graph_triton_poison_is_live():
    _utils.POISON = True  # the autouse fixture already set it; allocation must then be poisoned
    assert torch.isnan(_utils.alloc([3], torch.float32, torch.device("cpu"))).all()
    assert (_utils.alloc([3], torch.int64, torch.device("cpu")) == SENTINEL).all()


def test_knn_graph_triton_validates_inputs(device):
    x = torch.randn(10, 4, device=device)
    with pytest.raises(ValueError, match="k: expected"):
        knn_graph_triton(x, 10)
    with pytest.raises(ValueError, match="k: expected"):
        knn_graph_triton(x, 0)
    with pytest.raises(ValueError, match=r"k: expected an int in \[1, 128\]"):
        knn_graph_triton(torch.randn(K_MAX + 2, 2, device=device), K_MAX + 1)
    with pytest.raises(TypeError, match="dtype"):
        knn_graph_triton(x.double(), 3)
    with pytest.raises(ValueError, match="2-D or 3-D"):
        knn_graph_triton(x[0], 3)
    with pytest.raises(ValueError, match="lengths"):
        knn_graph_triton(x[None], 3, [11])
    with pytest.raises(ValueError, match="smallest layer"):
        knn_graph_triton(torch.randn(2, 10, 4, device=device), 3, [10, 3])
    bad = x.clone()
    bad[2, 1] = float("inf")
    with pytest.raises(ValueError, match="splits"):
        knn_graph_triton(x, 3, splits=0)
    with pytest.raises(ValueError, match="finite"):
        knn_graph_triton(bad, 3)
    with pytest.raises(TypeError, match="torch.Tensor"):
        knn_graph_triton(x.cpu().numpy(), 3)
