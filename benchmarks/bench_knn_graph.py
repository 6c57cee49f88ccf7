"""knn_graph: the fused Triton kernel against the torch reference, blocked cdist + topk, and the bare Gram
product (the practical floor), on z-scored synthetic layer rows; and one ragged multi-layer launch against a loop
of the reference. Correctness (recall against the reference) is asserted once per shape before timing.

On a CUDA machine (TRITON_INTERPRET unset; README.md in this folder has the roofline these numbers meet):
  python -m pytest benchmarks/bench_knn_graph.py -k "small or llama7b" \
      --benchmark-json benchmarks/results/<gpu>_<date>_<sha>.json
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch
from _bench import DEVICE, SHAPES, K, layer_rows, median_seconds, skip_unless_runnable, timed

from spectra_gpu.ops.knn_graph import knn_graph_torch

# GPU benchmarks (`-m cuda` selects them); on a CPU only the torch reference at the small shapes runs, once
pytestmark = pytest.mark.cuda


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
    def triton(x: torch.Tensor) -> torch.Tensor:
        from spectra_gpu.kernels.knn_graph import knn_graph_triton

        return knn_graph_triton(x, K).idx

    return {
        "triton": triton,
        "torch": lambda x: knn_graph_torch(x, K).idx,  # the reference: upper-triangle blocked Gram + topk, fp32
        "cdist": lambda x: knn_cdist(x, K),
        "gram-floor": lambda x: x @ x.T,  # cuBLAS in the input dtype: no selection, no distances
    }


def recall(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a[:, :, None] == b[:, None, :]).any(-1).float().mean())


@functools.cache
def _rows(name: str, dtype: torch.dtype) -> torch.Tensor:
    n, d, _ = SHAPES[name]
    return layer_rows(n, d, dtype)


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("provider", ["triton", "torch", "cdist", "gram-floor"])
def test_knn_graph(benchmark, name, dtype, provider):
    skip_unless_runnable(provider, name)
    if DEVICE == "cpu" and dtype == torch.bfloat16 and provider == "gram-floor":
        pytest.skip("bf16 matmul on the CPU is not the Gram floor of anything this library runs")
    n, d, _ = SHAPES[name]
    x = _rows(name, dtype)
    fn = knn_providers()[provider]
    if provider in ("triton", "cdist"):  # correctness once, outside the timing
        assert recall(fn(x)[:2048], knn_providers()["torch"](x)[:2048]) > 0.99
    benchmark.group = f"knn_graph-{name}-N{n}-D{d}-K{K}-{str(dtype)[6:]}"
    timed(benchmark, lambda: fn(x), rounds=3 if name == "small" else 2)
    t = median_seconds(benchmark)
    if t:
        benchmark.extra_info["tflops_full_gram"] = 2 * n * n * d / t / 1e12  # the README's roofline count


@pytest.mark.parametrize("name", ["small", "llama7b"])
@pytest.mark.parametrize("provider", ["triton", "torch"])
def test_knn_graph_batched_ragged(benchmark, name, provider):
    """B layers with different N in one launch vs a loop of the torch reference."""
    skip_unless_runnable(provider, name)
    n, d, b = SHAPES[name]
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    x = torch.stack([layer_rows(n, d, dtype, seed=i) for i in range(b)])
    lengths = [n - 97 * i for i in range(b)]
    if provider == "triton":
        from spectra_gpu.kernels.knn_graph import knn_graph_triton as fn
    else:
        fn = knn_graph_torch
    benchmark.group = f"knn_graph-batched-{name}-B{b}-N{n}-D{d}"
    timed(benchmark, lambda: fn(x, K, lengths), rounds=2)
