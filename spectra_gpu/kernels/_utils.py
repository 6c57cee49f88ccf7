"""Shared launcher helpers: interpreter detection, launch configs, output allocation, input checks.

Importing this module imports triton; the backends import spectra_gpu.kernels lazily, so a machine without
triton never gets here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import triton

# Triton's @jit reads TRITON_INTERPRET when a kernel is defined, so the mode is fixed at import time too.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Tests set POISON so every output buffer starts as NaN (floats) or a sentinel (ints): an element a kernel
# forgot to write then fails the comparison with the reference instead of passing by luck.
POISON = False


def alloc(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised output buffer (poisoned when POISON is set)."""
    if not POISON:
        return torch.empty(tuple(shape), dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min
    return torch.full(tuple(shape), fill, dtype=dtype, device=device)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def configs(gpu: list[triton.Config], interp: triton.Config) -> list[triton.Config]:
    """Autotune candidates: several on a GPU, exactly one in the interpreter (two or more fail there)."""
    return [interp] if INTERPRET else gpu


def check_device(t: torch.Tensor, name: str) -> None:
    """Triton kernels need CUDA tensors; CPU tensors only run under TRITON_INTERPRET=1."""
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and INTERPRET:
        return
    raise ValueError(f"{name}: expected a CUDA tensor (CPU tensors only with TRITON_INTERPRET=1 set before "
                     f"spectra_gpu.kernels is imported), got a tensor on {t.device}")


def check_tensor(t: object, name: str, ndims: tuple[int, ...], dtypes: tuple[torch.dtype, ...]) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() not in ndims:
        raise ValueError(f"{name}: expected {' or '.join(f'{d}-D' for d in ndims)}, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    check_device(t, name)
    return t


def check_int(v: object, name: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"{name}: expected an int in [{lo}, {hi}], got {v!r}")
    return v
