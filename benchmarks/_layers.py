"""Synthetic but realistic layer signals for the timing benchmarks (the quality experiments use real models)."""

import torch


def relu_layer(n: int, m: int, d_in: int = 4096, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """pre/post [n units, m samples] of a ReLU layer y = relu(W x + b) with Gaussian inputs (fp32)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(d_in, m, generator=g)
    w = torch.randn(n, d_in, generator=g) / d_in**0.5
    pre = w @ x + 0.3 * torch.randn(n, 1, generator=g)
    return pre, torch.relu(pre)
