"""Shared pieces of the per-op benchmarks (bench_<op>.py): device, skip reasons, shapes, inputs, timing.

Every op benchmark times its providers on the same inputs in the same run. The torch reference runs on CUDA when
there is a GPU, else on the CPU at the ``small`` shapes (the larger ones skip with the reason); the Triton and
CuPy providers need a GPU and skip elsewhere with the reason. ``pytest benchmarks -k small --benchmark-disable``
(CI) therefore runs every op's torch provider once on CPU.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable
from typing import Any

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

# name: (N units, D tokens, B layers in the batched runs). llama7b / llama3_8b are the README's roofline cases.
SHAPES = {"small": (2048, 2048, 4), "llama7b": (11008, 16384, 2), "llama3_8b": (14336, 16384, 1)}
K = 10
LOBPCG_BLOCK = 40  # s = 32 eigenpairs + 8 guard vectors, what sg.score iterates


def _triton_reason() -> str:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1: the CPU interpreter is a test vehicle, not a benchmark"
    if not CUDA:
        return "needs a CUDA GPU (torch.cuda.is_available() is False)"
    if importlib.util.find_spec("triton") is None:
        return "needs triton (pip install 'spectra_gpu[cuda]')"
    return ""


TRITON_REASON = _triton_reason()


def skip_unless_runnable(provider: str, shape: str) -> None:
    """Skip (with the reason) a Triton/CuPy provider without a GPU, and any shape but ``small`` on the CPU."""
    if provider == "triton" and TRITON_REASON:
        pytest.skip(TRITON_REASON)
    if provider == "cupy":
        from spectra_gpu.backends import REGISTRY

        ok, why = REGISTRY["cupy"].is_available()
        if not ok:
            pytest.skip(f"cupy backend unavailable: {why}")
    if shape != "small" and not CUDA:
        pytest.skip(f"shape {shape!r} is a GPU case: on the CPU only 'small' runs")


def layer_rows(n: int, d: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """z-scored rows of a synthetic ReLU layer's pre-activations [n, d]: what sg.score hands to the kNN."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(512, d, generator=g, device=DEVICE)
    pre = torch.randn(n, 512, generator=g, device=DEVICE) @ x / 512**0.5
    pre += 0.3 * torch.randn(n, 1, generator=g, device=DEVICE)
    z = pre - pre.mean(1, keepdim=True)
    return (z / z.std(1, correction=0, keepdim=True)).to(dtype)


@functools.cache
def knn_lists(name: str, b: int) -> Any:
    """The kNN lists (a KnnGraph [b, N, K]) of b synthetic layers of shape ``name`` with 256 features."""
    from spectra_gpu.ops.knn_graph import knn_graph_torch

    n = SHAPES[name][0]
    return knn_graph_torch(torch.stack([layer_rows(n, 256, torch.float32, seed=i) for i in range(b)]), K)


def timed(benchmark: Any, fn: Callable[[], object], rounds: int) -> object:
    """Time ``fn`` (synchronising the GPU at the end of each call) and return its last output."""
    def run() -> object:
        out = fn()
        if CUDA:
            torch.cuda.synchronize()
        return out

    return benchmark.pedantic(run, rounds=rounds, warmup_rounds=1)


def median_seconds(benchmark: Any) -> float | None:
    """The benchmark's median time, None when timing is disabled."""
    stats = getattr(benchmark, "stats", None)
    return stats.stats.median if stats is not None else None
