"""The ``knn_graph`` op in Triton: fused exact kNN over the rows of several layers at once, pairwise squared
distances + running top-k. Contract and reference: ``spectra_gpu.ops.knn_graph.knn_graph_torch``.

Design (one program = BLOCK_M query rows of one layer and one of SPLITS column ranges; grid = (split, row block,
layer), split fastest):
- Column tiles of BLOCK_N rows stream past the query block; each tile's inner products come from tl.dot over
  BLOCK_D-wide slices of the feature axis (fp32 accumulation for fp16/bf16/fp32 inputs). The distance tile
  |x_i|^2 + |x_j|^2 - 2 x_i.x_j lives in registers only: the N x N matrix is never written.
- Selection works on packed int64 keys (fp32 distance bits << 32 | column). Non-negative floats order like
  their bit patterns, so key order is distance order with ties broken by the lower column index, the same rule
  as the torch reference. Each row keeps an unsorted running best of k keys and its worst key (the threshold).
  A tile is merged by min(k, most candidates below threshold in any row) replace-the-worst rounds; after the
  first few tiles most tiles need zero or one round, so selection costs about one compare per distance
  while the dot costs D multiply-adds. A bitonic tl.topk per tile would cost log^2(BLOCK_N) compare-swaps per
  element and is 10-100x slower in the interpreter.
- Why splits: with D ~ 16k a query strip (BLOCK_M x D) cannot stay on chip, so it is re-read once per column
  tile: N^2 D / BLOCK_N elements of traffic, an intensity of only BLOCK_N FLOP/byte (bf16) against the ~263 of
  an H100. The SPLITS programs of one row block launch together and share that strip through L2; each ends with
  its sorted k keys, and a torch topk over the SPLITS x k keys of a row merges them (exact: keys are unique).
Per-layer row counts differ through ``lengths``: rows and columns at or past a layer's length are masked
(padded rows get index -1 and distance +inf). fp32 inputs use tl.dot's "tf32x3" mode on sm80+ (three TF32
tensor-core products, about fp32 accuracy at ~2x the SIMT rate) and exact "ieee" elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ..ops.knn_graph import KnnGraph, layer_lengths
from ._utils import INTERPRET, alloc, check_int, check_tensor, configs, next_pow2

# shape legend: B layers, N units (graph nodes, padded to N_MAX), D features (samples), K neighbours
K_MAX = 128  # the running best lives in registers: BLOCK_M x next_pow2(K) int64 per program
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_EMPTY = 0x7FFFFFFFFFFFFFFF  # key of "no neighbour yet": larger than every real key


@triton.jit
def _row_sqnorm_kernel(x_ptr, len_ptr, out_ptr, N_MAX, D, stride_xb, stride_xn, stride_xd,
                       BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[b, i] = sum_d x[b, i, d]^2 in fp32 (0 for padded rows)."""
    b = tl.program_id(1).to(tl.int64)
    n_b = tl.load(len_ptr + b)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = rows < n_b
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(x_ptr + b * stride_xb + rows[:, None].to(tl.int64) * stride_xn + dd[None, :] * stride_xd,
                    mask=ok[:, None] & (dd[None, :] < D), other=0.0).to(tl.float32)
        acc += tl.sum(x * x, axis=1)
    tl.store(out_ptr + b * N_MAX + rows, acc, mask=rows < N_MAX)


@triton.autotune(
    configs=configs(
        [triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_D": 32}, num_warps=4, num_stages=3),
         triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_D": 64}, num_warps=8, num_stages=3),
         triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_D": 32}, num_warps=8, num_stages=3),
         triton.Config({"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_D": 64}, num_warps=4, num_stages=4)],
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_D": 32})),
    key=["N_MAX", "D", "K_PAD", "SPLITS", "DOT_PRECISION"],
)
@triton.jit
def _knn_topk_kernel(x_ptr, sqn_ptr, len_ptr, key_ptr, N_MAX, D, K, SPLITS,
                     stride_xb, stride_xn, stride_xd,
                     K_PAD: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Sorted k smallest keys of rows (block pid 1, layer pid 2) over column split pid 0 -> key[b, row, split]."""
    EMPTY: tl.constexpr = 0x7FFFFFFFFFFFFFFF
    split = tl.program_id(0)
    b = tl.program_id(2).to(tl.int64)
    n_b = tl.load(len_ptr + b)
    row0 = tl.program_id(1) * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < n_b
    x_b = x_ptr + b * stride_xb
    sqn_b = sqn_ptr + b * N_MAX
    sqn_q = tl.load(sqn_b + rows, mask=row_ok, other=0.0)
    kk = tl.arange(0, K_PAD)
    # slots >= K are padding: -1 is below every key, so they are never the worst and never replaced
    best = tl.where(kk[None, :] < K, EMPTY, -1) + tl.zeros([BLOCK_M, K_PAD], dtype=tl.int64)
    thr = tl.max(best, axis=1)
    span = tl.cdiv(tl.cdiv(n_b, SPLITS), BLOCK_N) * BLOCK_N
    lo = split * span
    hi = tl.where(row0 < n_b, tl.minimum(lo + span, n_b), lo)  # blocks wholly past the layer do no work
    for j0 in range(lo, hi, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        col_ok = cols < hi
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            d_ok = dd < D
            a = tl.load(x_b + rows[:, None].to(tl.int64) * stride_xn + dd[None, :] * stride_xd,
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            c = tl.load(x_b + cols[None, :].to(tl.int64) * stride_xn + dd[:, None] * stride_xd,
                        mask=col_ok[None, :] & d_ok[:, None], other=0.0)
            if UPCAST:  # bf16 tl.dot is wrong in the interpreter; on a GPU bf16 stays on the tensor cores
                a = a.to(tl.float32)
                c = c.to(tl.float32)
            acc = tl.dot(a, c, acc, input_precision=DOT_PRECISION)
        sqn_c = tl.load(sqn_b + cols, mask=col_ok, other=0.0)
        d2 = sqn_q[:, None] + sqn_c[None, :] - 2.0 * acc
        d2 = tl.where(d2 > 0.0, d2, 0.0)  # also maps -0.0 to +0.0, whose bits sort first
        key = (d2.to(tl.int32, bitcast=True).to(tl.int64) << 32) | cols[None, :].to(tl.int64)
        key = tl.where(col_ok[None, :] & (cols[None, :] != rows[:, None]), key, EMPTY)
        cnt = tl.sum((key < thr[:, None]).to(tl.int32), axis=1)
        rounds = tl.minimum(tl.max(cnt, axis=0), K)
        for _r in range(0, rounds):
            m = tl.min(key, axis=1)
            worst = tl.argmax(best, axis=1)
            take = m < thr
            best = tl.where((kk[None, :] == worst[:, None]) & take[:, None], m[:, None], best)
            key = tl.where(key == m[:, None], EMPTY, key)
            thr = tl.max(best, axis=1)
    best = tl.where(row_ok[:, None] & (kk[None, :] < K), best, EMPTY)  # padded rows: no neighbours
    out = ((b * N_MAX + rows.to(tl.int64)) * SPLITS + split) * K
    for t in range(0, K):  # k min-extractions: the list leaves sorted, nearest first
        m = tl.min(best, axis=1)
        best = tl.where(best == m[:, None], EMPTY, best)
        tl.store(key_ptr + out + t, m, mask=rows < N_MAX)


def _dot_precision(x: torch.Tensor) -> str | None:
    if x.dtype != torch.float32:
        return None  # fp16/bf16 operands: tensor cores, fp32 accumulation
    if INTERPRET or x.device.type != "cuda" or torch.cuda.get_device_capability(x.device)[0] < 8:
        return "ieee"
    return "tf32x3"


def unpack_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, fp32 squared distance) of packed keys; anything that is not a real key (the empty marker, or a
    negative value from memory a kernel never wrote) becomes index -1 and distance +inf."""
    valid = (keys >= 0) & (keys != _EMPTY)
    idx = torch.where(valid, keys & 0xFFFFFFFF, -1)
    dist = (keys >> 32).to(torch.int32).view(torch.float32)
    return idx, torch.where(valid, dist, float("inf"))


def knn_graph_triton(x: torch.Tensor, k: int, lengths: Sequence[int] | torch.Tensor | None = None, *,
                     splits: int | None = None) -> KnnGraph:
    """Exact k nearest neighbours of every row, per layer, nearest first, ties to the lower index.

    x: [N, D] or [B, N, D] (fp16/bf16/fp32, any strides); layer b uses its first ``lengths[b]`` rows
    (default all N). Returns a KnnGraph of idx [.., N, k] int64 (layer-local, -1 on padded rows) and squared
    distances [.., N, k] float64 holding the kernel's fp32 values (+inf on padded rows). splits: programs sharing
    one row block's columns (default: 1 in the interpreter, up to 8 on a GPU so the query strip is read from L2,
    see the module docstring).
    """
    check_tensor(x, "x", (2, 3), _DTYPES)
    squeeze = x.dim() == 2
    x3 = x.unsqueeze(0) if squeeze else x
    b, n_max, d = x3.shape
    if d < 1 or n_max >= 2**31:
        raise ValueError(f"x: expected 1 <= D and N < 2^31 rows, got shape {tuple(x.shape)}")
    if b > 65535 or n_max > 65535 * 32:
        raise ValueError(f"x: expected at most 65535 layers and 2M rows (grid limits), got shape {tuple(x.shape)}")
    lens = torch.tensor(layer_lengths(lengths, b, n_max), dtype=torch.int32, device=x.device)
    n_min = int(lens.min())
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < n_min:
        raise ValueError(f"k: expected an int with 1 <= k < smallest layer N={n_min}, got {k!r}")
    check_int(k, "k", 1, K_MAX)
    if not bool(torch.isfinite(x3).all()):
        raise ValueError("x: expected finite values, got NaN/Inf entries")
    if splits is None:
        splits = 1 if INTERPRET else max(1, min(8, n_max // 1024))
    check_int(splits, "splits", 1, max(1, n_max))
    sqn = alloc([b, n_max], torch.float32, x.device)
    _row_sqnorm_kernel[(triton.cdiv(n_max, 32), b)](x3, lens, sqn, n_max, d, *x3.stride(), BLOCK_R=32,
                                                    BLOCK_D=min(128, next_pow2(d)))
    keys = alloc([b, n_max, splits, k], torch.int64, x.device)

    def grid(meta: dict[str, int]) -> tuple[int, int, int]:
        return splits, triton.cdiv(n_max, meta["BLOCK_M"]), b

    _knn_topk_kernel[grid](x3, sqn, lens, keys, n_max, d, k, splits, *x3.stride(), K_PAD=next_pow2(k),
                           UPCAST=INTERPRET and x.dtype == torch.bfloat16, DOT_PRECISION=_dot_precision(x))
    keys = keys.view(b, n_max, splits * k)
    if splits > 1:  # merge the per-split sorted lists; keys are unique, so ties still go to the lower index
        keys = torch.topk(keys, k, dim=2, largest=False, sorted=True).values
    idx, dist = unpack_keys(keys)
    return KnnGraph(idx[0], dist[0].double()) if squeeze else KnnGraph(idx, dist.double())
