"""GPU benchmarks of the Triton kernels against torch in the same run: kNN (fused kernel vs the torch reference,
cdist + topk, and the bare cuBLAS Gram as the practical floor), Laplacian assembly, SpMM, and the full score.
Everything skips with the reason on a machine without CUDA (and under TRITON_INTERPRET=1).

On a CUDA machine (TRITON_INTERPRET unset; README.md in this folder has the roofline these numbers meet):
  python -m pytest benchmarks/bench_gpu_kernels.py -k "small or llama7b" \
      --benchmark-json benchmarks/results/<gpu>_<date>_<sha>.json
Correctness is asserted once per shape before timing (recall vs the torch reference, operator agreement).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable

import pytest
import torch

import spectra_gpu as sg


def _skip_reason() -> str:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1: the CPU interpreter is a test vehicle, not a benchmark"
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (torch.cuda.is_available() is False)"
    if importlib.util.find_spec("triton") is None:
        return "needs triton (pip install 'spectra_gpu[cuda]')"
    return ""


REASON = _skip_reason()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(bool(REASON), reason=REASON or "-")]

# name: (N units, D tokens, B layers in the batched runs). llama7b / llama3_8b are the README's roofline cases.
SHAPES = {"small": (2048, 2048, 4), "llama7b": (11008, 16384, 2), "llama3_8b": (14336, 16384, 1)}
K = 10
LOBPCG_BLOCK = 40  # s = 32 eigenpairs + 8 guard vectors, what sg.score iterates


def layer_rows(n: int, d: int, dtype: torch.dtype, device: str = "cuda", seed: int = 0) -> torch.Tensor:
    """z-scored rows of a synthetic ReLU layer's pre-activations [n, d]: what sg.score hands to the kNN."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(512, d, generator=g, device=device)
    pre = torch.randn(n, 512, generator=g, device=device) @ x / 512**0.5
    pre += 0.3 * torch.randn(n, 1, generator=g, device=device)
    z = pre - pre.mean(1, keepdim=True)
    return (z / z.std(1, correction=0, keepdim=True)).to(dtype)


def knn_cdist(x: torch.Tensor, k: int, block: int = 4096) -> torch.Tensor:
    """What a user writes with plain torch: blocked cdist + topk (fp32)."""
    xf = x.float()
    out = []
    for s in range(0, xf.shape[0], block):
        d = torch.cdist(xf[s:s + block], xf)
        r = torch.arange(d.shape[0], device=x.device)
        d[r, r + s] = float("inf")
        out.append(torch.topk(d, k, dim=1, largest=False).indices)
    return torch.cat(out)


def knn_providers() -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    from spectra_gpu.kernels.knn import knn_topk
    from spectra_gpu.ops.knn import knn_torch

    return {
        "triton": lambda x: knn_topk(x, K)[0],
        "torch": lambda x: knn_torch(x, K).idx,  # the reference: upper-triangle blocked Gram + topk, fp32
        "cdist": lambda x: knn_cdist(x, K),
        "gram-floor": lambda x: x @ x.T,  # cuBLAS in the input dtype: no selection, no distances
    }


def recall(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a[:, :, None] == b[:, None, :]).any(-1).float().mean())


def _timed(benchmark, fn: Callable[[], object], rounds: int) -> object:
    def run() -> object:
        out = fn()
        torch.cuda.synchronize()
        return out

    return benchmark.pedantic(run, rounds=rounds, warmup_rounds=1)


def _median(benchmark) -> float | None:
    stats = getattr(benchmark, "stats", None)
    return stats.stats.median if stats is not None else None


@functools.cache
def _rows(name: str, dtype: torch.dtype) -> torch.Tensor:
    n, d, _ = SHAPES[name]
    return layer_rows(n, d, dtype)


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("provider", ["triton", "torch", "cdist", "gram-floor"])
def test_knn(benchmark, name, dtype, provider):
    n, d, _ = SHAPES[name]
    x = _rows(name, dtype)
    fn = knn_providers()[provider]
    if provider in ("triton", "cdist"):  # correctness once, outside the timing
        assert recall(fn(x)[:2048], knn_providers()["torch"](x)[:2048]) > 0.99
    benchmark.group = f"knn-{name}-N{n}-D{d}-K{K}-{str(dtype)[6:]}"
    _timed(benchmark, lambda: fn(x), rounds=3 if name == "small" else 2)
    t = _median(benchmark)
    if t:
        benchmark.extra_info["tflops_full_gram"] = 2 * n * n * d / t / 1e12  # the README's roofline count


@pytest.mark.parametrize("name", ["small", "llama7b"])
@pytest.mark.parametrize("provider", ["triton", "torch"])
def test_knn_batched_ragged(benchmark, name, provider):
    """B layers with different N in one launch vs a loop of the torch reference."""
    from spectra_gpu.kernels.knn import knn_topk, knn_topk_torch

    n, d, b = SHAPES[name]
    x = torch.stack([layer_rows(n, d, torch.bfloat16, seed=i) for i in range(b)])
    lengths = [n - 97 * i for i in range(b)]
    fn = {"triton": knn_topk, "torch": knn_topk_torch}[provider]
    benchmark.group = f"knn-batched-{name}-B{b}-N{n}-D{d}"
    _timed(benchmark, lambda: fn(x, K, lengths), rounds=2)


@functools.cache
def _knn_lists(name: str, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    from spectra_gpu.kernels.knn import knn_topk

    n = SHAPES[name][0]
    x = torch.stack([layer_rows(n, 256, torch.float32, seed=i) for i in range(b)])
    return knn_topk(x, K)


@pytest.mark.parametrize("name", ["small", "llama7b"])
@pytest.mark.parametrize("provider", ["triton", "torch"])
def test_laplacian_from_knn(benchmark, name, provider):
    """Union symmetrisation + degrees + CSR for a 32-layer model's kNN lists (Llama-7B has 32 MLP layers)."""
    from spectra_gpu.kernels.laplacian import laplacian_from_knn, laplacian_from_knn_torch

    idx, dist = _knn_lists(name, 32)
    fn = {"triton": laplacian_from_knn, "torch": laplacian_from_knn_torch}[provider]
    benchmark.group = f"laplacian-{name}-B32-N{idx.shape[1]}-K{K}"
    _timed(benchmark, lambda: fn(idx, dist), rounds=3)


@pytest.mark.parametrize("name", ["small", "llama7b", "llama3_8b"])
@pytest.mark.parametrize("provider", ["triton", "torch"])
def test_spmm(benchmark, name, provider):
    """(L_Y + c 1 1^T) X, LOBPCG's B operator, X [N, 40] fp64."""
    from spectra_gpu.kernels.laplacian import laplacian_apply, laplacian_from_knn
    from spectra_gpu.ops.laplacian import laplacian_operator

    idx, dist = _knn_lists(name, 1)
    lap = laplacian_from_knn(idx, dist).layer(0)
    n = lap.shape[0]
    x = torch.randn(n, LOBPCG_BLOCK, dtype=torch.float64, device="cuda")
    c = 1.5 * K / n
    want = laplacian_operator(lap, c)(x)
    fn = {"triton": lambda: laplacian_apply(lap, x, c), "torch": lambda: laplacian_operator(lap, c)(x)}[provider]
    torch.testing.assert_close(fn(), want, rtol=1e-12, atol=1e-12)
    benchmark.group = f"spmm-{name}-N{n}-nnz{lap.values().numel()}-C{LOBPCG_BLOCK}"
    _timed(benchmark, fn, rounds=20)
    t = _median(benchmark)
    if t:  # bytes if every gathered X row came from DRAM: an upper bound on traffic
        nnz = lap.values().numel()
        benchmark.extra_info["gbps_upper"] = (nnz * 16 + nnz * LOBPCG_BLOCK * 8 + n * LOBPCG_BLOCK * 8) / t / 1e9


@pytest.mark.parametrize("name", ["small", "llama7b"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_score(benchmark, name, backend):
    n, d, _ = SHAPES[name]
    g = torch.Generator(device="cuda").manual_seed(1)
    pre = torch.randn(n, 512, generator=g, device="cuda") @ torch.randn(512, d, generator=g, device="cuda") / 512**0.5
    post = torch.relu(pre)
    benchmark.group = f"score-{name}-N{n}-M{d}"
    res = _timed(benchmark, lambda: sg.score(pre, post, backend=backend), rounds=2)
    benchmark.extra_info.update(solver=res.diagnostics["solver"], timings=res.diagnostics["timings"],
                                residual_max=res.diagnostics["residual_max"])
    assert res.diagnostics["residual_max"] < 1e-6
