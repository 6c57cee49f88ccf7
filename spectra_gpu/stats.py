"""Streaming statistics of pre/post-activation signals, for calibration sets too large to hold.

``SignalStats.update(pre, post)`` takes [N units, m samples] batches. In ``exact`` mode it keeps, per side,
the Gram matrix of the signals shifted by a per-unit reference (the first batch's mean, to avoid the
cancellation of E[z^2] - E[z]^2 with outlier-heavy LLM activations), their sums and sums of squares, plus the
non-zero count of post: exactly what z-scored / centred / raw Euclidean distances need, so scoring the stats
equals scoring the concatenated signals. Batches are multiplied in their own precision (fp32 by default:
fast) and accumulated in fp64; ``precision="fp64"`` multiplies in fp64 too. The Gram is accumulated by row
blocks of its upper triangle (half the products of ``x @ x.T``), and ``gram()`` reads it out by row blocks in
place, so neither allocates an N x N temporary beyond its result.

In ``sketch`` mode (large N, where an N x N Gram per side is too big) it keeps Z S and A S for one seeded
Gaussian S [M, sketch_dim] drawn batch by batch (the same rows for both sides), plus the column sums of S;
standardisation is applied afterwards by linearity, so the sketch is of the z-scored rows (docs/algorithm.md
section 5). A probe of ``probe`` random units keeps its exact Gram rows, so diagnostics report recall@k of
the sketched kNN against the exact one.

In ``moments`` mode it keeps only the per-unit sums, sums of squares, non-zero counts and absolute sums:
O(N) memory and no matrix product, all that magnitude criteria (Wanda-sp, FLAP, activation statistics)
need. ``spectra_gpu.score`` refuses it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ._validation import as_signal, check_finite, check_pair

MODES = ("exact", "sketch", "moments")


class _Side:
    def __init__(self, n: int, device: torch.device, mode: str, sketch_dim: int, probe: torch.Tensor | None):
        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, dtype=torch.float64, device=device)

        self.shift: torch.Tensor | None = None
        self.s1 = zeros(n)  # sum of shifted signals
        self.s2 = zeros(n)  # sum of squared shifted signals
        self.gram = zeros(n, n) if mode == "exact" else None  # shifted Gram
        self.sk = zeros(n, sketch_dim) if mode == "sketch" else None  # shifted signals @ S
        self.probe = probe
        self.pgram = zeros(len(probe), n) if probe is not None else None

    def update(self, x: torch.Tensor, s: torch.Tensor | None, mm_dtype: torch.dtype) -> None:
        if self.shift is None:  # representable in the product dtype, so the subtraction below uses it exactly
            self.shift = x.mean(dim=1, dtype=torch.float64).to(mm_dtype).double()
        wide = torch.promote_types(x.dtype, mm_dtype)  # fp32 inputs with fp32 products: no copy
        xm = (x.to(wide) - self.shift.to(wide)[:, None]).to(mm_dtype)
        f64 = torch.float64
        self.s1 += xm.sum(dim=1, dtype=f64)  # sums of exactly the values the products see
        self.s2 += (xm * xm).sum(dim=1, dtype=f64)
        if self.gram is not None:
            _add_gram(self.gram, xm)
        if self.sk is not None and s is not None:
            _add_product(self.sk, xm, s)
        if self.pgram is not None and self.probe is not None:
            self.pgram += xm[self.probe] @ xm.T


_BLOCK_BYTES = 128 * 2**20  # bound on one row block's product (the only temporary of the accumulations)


def _row_step(rows: int, cols: int, itemsize: int) -> int:
    return max(1, min(rows, _BLOCK_BYTES // max(1, cols * itemsize)))


def _add_gram(acc: torch.Tensor, x: torch.Tensor) -> None:
    """acc += x @ x.T for acc [N, N] (fp64) and x [N, m], by row blocks of the upper triangle mirrored into the
    lower one: half the products of the full matmul, and no N x N temporary (each block's product is promoted
    into the accumulator in place). A mirrored entry (j, i) is the dot product of entry (i, j)."""
    n = x.shape[0]
    step = _row_step(n, n, x.element_size())
    for s in range(0, n, step):
        e = min(n, s + step)
        p = x[s:e] @ x[s:].T  # rows s:e against rows s: (diagonal block included)
        acc[s:e, s:] += p
        acc[e:, s:e] += p[:, e - s:].T


def _add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b by row blocks of a, without a temporary the size of acc."""
    step = _row_step(a.shape[0], b.shape[1], a.element_size())
    for s in range(0, a.shape[0], step):
        acc[s:s + step] += a[s:s + step] @ b


class SignalStats:
    """Accumulate [N, m] batches of (pre, post) signals; pass the object to ``spectra_gpu.score``."""

    def __init__(self, n_units: int, *, mode: str = "exact", sketch_dim: int = 4096, probe: int = 256,
                 seed: int = 0, precision: str = "fp32", device: torch.device | str | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        if precision not in ("fp32", "fp64"):
            raise ValueError(f"precision: expected 'fp32' or 'fp64', got {precision!r}")
        if not isinstance(n_units, int) or n_units < 3:
            raise ValueError(f"n_units: expected an int >= 3, got {n_units!r}")
        if mode == "sketch" and (not isinstance(sketch_dim, int) or sketch_dim < 2):
            raise ValueError(f"sketch_dim: expected an int >= 2, got {sketch_dim!r}")
        self.n = n_units
        self.mode = mode
        self.sketch_dim = sketch_dim
        self.seed = seed
        self.mm_dtype = torch.float32 if precision == "fp32" else torch.float64
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.m = 0
        self.nnz_post = torch.zeros(n_units, dtype=torch.float64, device=self.device)
        self.abs_sum_post = torch.zeros(n_units, dtype=torch.float64, device=self.device)  # for mean |a|
        probe_idx = None
        if mode == "sketch" and probe > 0:
            g = torch.Generator().manual_seed(seed + 1)
            probe_idx = torch.randperm(n_units, generator=g)[: min(probe, n_units)].sort().values.to(self.device)
        self.probe_idx = probe_idx
        self.pre = _Side(n_units, self.device, mode, sketch_dim, probe_idx)
        self.post = _Side(n_units, self.device, mode, sketch_dim, probe_idx)
        self.s_colsum = torch.zeros(sketch_dim, dtype=torch.float64, device=self.device) if mode == "sketch" else None
        self._gen = torch.Generator().manual_seed(seed)

    def update(self, pre: Any, post: Any) -> SignalStats:
        """Add a batch: pre and post are [N units, m samples] (tensors or numpy arrays)."""
        pre, post = as_signal(pre, "pre"), as_signal(post, "post")
        check_pair(pre, post)
        if pre.shape[0] != self.n:
            raise ValueError(f"pre/post: expected {self.n} units (rows), got {pre.shape[0]}")
        check_finite(pre, "pre")
        check_finite(post, "post")
        pre, post = pre.to(self.device), post.to(self.device)
        s = None
        if self.mode == "sketch":
            s = torch.randn(pre.shape[1], self.sketch_dim, generator=self._gen, dtype=self.mm_dtype)
            s = s.to(self.device).mul_(1.0 / math.sqrt(self.sketch_dim))
            self.s_colsum += s.sum(dim=0, dtype=torch.float64)  # type: ignore[operator]
        self.pre.update(pre, s, self.mm_dtype)
        self.post.update(post, s, self.mm_dtype)
        self.nnz_post += (post != 0).sum(dim=1)
        self.abs_sum_post += post.abs().sum(dim=1, dtype=torch.float64)
        self.m += int(pre.shape[1])
        return self

    # ---- what scoring needs -------------------------------------------------------------------------
    def mean_std(self, side: str) -> tuple[torch.Tensor, torch.Tensor]:
        sd = self._side(side)
        assert sd.shift is not None
        mu_s = sd.s1 / self.m
        var = (sd.s2 / self.m - mu_s * mu_s).clamp_min(0.0)
        return sd.shift + mu_s, var.sqrt()

    def _side(self, side: str) -> _Side:
        if self.m == 0:
            raise ValueError("SignalStats: no samples yet; call update(pre, post) with at least one batch")
        return self.pre if side == "pre" else self.post

    def _affine(self, side: str, preprocess: str, alive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(offset c, scale d) so that phi(x) = (x_shifted - c) * d on the alive units."""
        sd = self._side(side)
        assert sd.shift is not None
        mu_s = sd.s1 / self.m
        if preprocess == "raw":
            c = -sd.shift  # undo the shift: raw = shifted + shift
            d = torch.ones_like(mu_s)
        else:
            c = mu_s
            d = torch.ones_like(mu_s)
            if preprocess == "zscore":
                _, std = self.mean_std(side)
                d = 1.0 / std.clamp_min(torch.finfo(torch.float64).tiny)
        return c[alive], d[alive]

    def gram(self, side: str, preprocess: str, alive: torch.Tensor) -> torch.Tensor:
        """Exact Gram of phi(signals) over the alive units (exact mode)."""
        sd = self._side(side)
        if sd.gram is None:
            raise ValueError("SignalStats.gram needs mode='exact'")
        c, d = self._affine(side, preprocess, alive)
        idx = alive.nonzero().flatten()
        everyone = int(idx.numel()) == self.n
        g = sd.gram.clone() if everyone else torch.empty(len(idx), len(idx), dtype=sd.gram.dtype, device=self.device)
        s1 = sd.s1[alive]
        mc = self.m * c
        # sum_t (x_it - c_i)(x_jt - c_j) = G_ij - c_i s1_j - s1_i c_j + M c_i c_j, then scaled by d_i d_j: in
        # place by row blocks (the same operations, in the same order, as the whole-matrix expression), so the
        # only N x N allocation is the result
        step = _row_step(len(idx), len(idx), g.element_size())
        for s in range(0, len(idx), step):
            e = min(len(idx), s + step)
            blk = g[s:e]
            if not everyone:
                blk.copy_(sd.gram[idx[s:e]][:, idx])
            blk.sub_(c[s:e, None] * s1[None, :]).sub_(s1[s:e, None] * c[None, :]).add_(mc[s:e, None] * c[None, :])
            blk.mul_(d[s:e, None]).mul_(d[None, :])
        return g

    def sketch(self, side: str, preprocess: str, alive: torch.Tensor) -> torch.Tensor:
        """phi(signals) @ S over the alive units (sketch mode) [N_alive, sketch_dim]."""
        sd = self._side(side)
        if sd.sk is None or self.s_colsum is None:
            raise ValueError("SignalStats.sketch needs mode='sketch'")
        c, d = self._affine(side, preprocess, alive)
        out = sd.sk[alive]  # a copy: the blocks below work in place on it
        step = _row_step(out.shape[0], out.shape[1], out.element_size())
        for s in range(0, out.shape[0], step):
            blk = out[s:s + step]
            blk.sub_(c[s:s + step, None] * self.s_colsum[None, :]).mul_(d[s:s + step, None])
        return out

    def probe_gram(self, side: str, preprocess: str, alive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(probe rows among alive units as positions, their exact phi-Gram rows against alive units)."""
        sd = self._side(side)
        assert sd.pgram is not None and self.probe_idx is not None
        pos = torch.full((self.n,), -1, dtype=torch.int64, device=self.device)
        pos[alive.nonzero().flatten()] = torch.arange(int(alive.sum()), device=self.device)
        keep = alive[self.probe_idx]
        rows = self.probe_idx[keep]
        c, d = self._affine(side, preprocess, alive)
        cfull = torch.zeros(self.n, dtype=torch.float64, device=self.device)
        dfull = torch.zeros_like(cfull)
        cfull[alive], dfull[alive] = c, d
        g = sd.pgram[keep][:, alive]
        s1 = sd.s1
        ci, di = cfull[rows], dfull[rows]
        g = g - ci[:, None] * s1[alive][None, :] - s1[rows][:, None] * c[None, :] + self.m * ci[:, None] * c[None, :]
        return pos[rows], di[:, None] * g * d[None, :]

    def nbytes(self) -> int:
        tot = 0
        for sd in (self.pre, self.post):
            for t in (sd.gram, sd.sk, sd.pgram, sd.s1, sd.s2):
                if t is not None:
                    tot += t.numel() * t.element_size()
        return tot

    def __repr__(self) -> str:
        return f"SignalStats(n_units={self.n}, samples={self.m}, mode={self.mode!r}, {self.nbytes() / 2**20:.1f} MiB)"


def recall_at_k(approx_idx: np.ndarray | torch.Tensor, exact_idx: np.ndarray | torch.Tensor) -> float:
    """Mean fraction of the exact k nearest neighbours found by the approximate kNN (rows aligned)."""
    a = torch.as_tensor(approx_idx)
    e = torch.as_tensor(exact_idx)
    hits = (a[:, :, None] == e[:, None, :]).any(dim=2).float().mean()
    return float(hits)
