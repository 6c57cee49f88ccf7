"""Capture every group's pre/post-activation signals in one pass over calibration batches, straight into
streaming ``SignalStats`` (memory = the statistics, never an activation dump), and first-order Taylor
importances.

Samples per kind (docs/algorithm.md section 6):
- neuron: one per input row; ffn: one per non-padding token (``attention_mask`` of dict batches);
- channel: ``positions_per_image`` seeded random spatial positions of each image (same positions for Z
  and A), bounding M for large feature maps: the default 64 gives M = 6.4e4 for 1000 calibration images,
  inside the spec's 1e4-1e5 (section 5);
- head: Z_h = the head's residual write with attention replaced by the identity, V_h W_O^h (V includes its
  bias: since softmax rows sum to 1 the bias term enters both Z_h and A_h identically); A_h = its actual
  write, ctx_h W_O^h. Each non-padding token contributes its d_model write coordinates, so M = tokens x
  d_model (e.g. 2048 tokens x 576 = 1.2 M for SmolLM2). No subsampling or sketch is needed: the head Gram is
  N x N with N = 9-12 (12 x 12 x 1.2 M flops), so head groups always use exact statistics and the writes are
  formed in chunks of tokens of at most 4 M floats per side. A KV-group unit's write is the sum of its
  query heads' writes.
``max_samples`` bounds each group's samples in inputs/tokens/positions (head groups: tokens).
- stream (``units.StreamGroup``, :func:`capture_streams`): each write into the residual stream (a writer
  module's output) paired with the next read (a reader module's input), sample for sample: the same images
  and seeded positions, the same non-padding tokens; a read after global pooling pairs with the spatial
  mean of the write.

Cost (1 CPU thread): MiniLM, 64 snippets (1679 tokens), all 12 groups: 6.2 s against a 1.3 s plain forward,
mostly the exact 1536 x 1536 FFN Grams (N^2 M flops per side, the floor of exact statistics); SmolLM2,
8 x 128 tokens, all 60 groups: 18 s against 3.6 s.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence, Sized
from typing import Any

import torch
from torch import Tensor, nn

from .stats import SignalStats
from .units import StreamGroup, UnitGroup, group_by_name

ForwardFn = Callable[[nn.Module, Any], Any]
_HEAD_CHUNK_ELEMS = 1 << 22  # floats per head-write chunk (16 MiB in fp32)


def default_forward(model: nn.Module, batch: Any) -> Any:
    """model(**batch) for dicts (Hugging Face), model(batch[0]) for (inputs, labels) tuples/lists, else
    model(batch)."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def _token_mask(batch: Any) -> Tensor | None:
    if isinstance(batch, dict) and batch.get("attention_mask") is not None:
        return torch.as_tensor(batch["attention_mask"]).bool()
    return None


class _Rows:
    """Turns activations into [m samples, N units] rows: token masks for [B, T, N] tensors (and for [B * T, N]
    ones whose tokens a model flattened), seeded spatial subsampling for [B, C, H, W] ones."""

    def __init__(self, positions_per_image: int | None, seed: int):
        self.keep: Tensor | None = None
        self.ppi = positions_per_image
        self.gen = torch.Generator().manual_seed(seed)

    def positions(self, b: int, hw: int) -> Tensor | None:
        if self.ppi is None or self.ppi >= hw:
            return None
        return torch.rand(b, hw, generator=self.gen).argsort(dim=1)[:, : self.ppi]

    def __call__(self, t: Tensor, pos: Tensor | None = None) -> Tensor:
        if t.dim() == 4:  # [B, C, H, W] -> [B * P, C]
            b, c = t.shape[:2]
            flat = t.reshape(b, c, -1)
            if pos is not None:
                flat = flat.gather(2, pos.to(t.device)[:, None, :].expand(b, c, pos.shape[1]))
            return flat.transpose(1, 2).reshape(-1, c)
        if t.dim() >= 3 and self.keep is not None and tuple(t.shape[:-1]) == tuple(self.keep.shape):
            return t[self.keep.to(t.device)]
        if t.dim() == 2 and self.keep is not None and t.shape[0] == self.keep.numel():
            return t[self.keep.flatten().to(t.device)]  # tokens already flattened (OPT's FFN): [B * T, N]
        return t.reshape(-1, t.shape[-1])


class _GroupCapture:
    def __init__(self, g: UnitGroup, rows: _Rows, max_samples: int | None, mode: str, sketch_dim: int, seed: int,
                 precision: str = "fp32"):
        if g.size < 3:
            raise ValueError(f"group {g.name!r}: expected at least 3 units to capture signals for, got {g.size}")
        self.g, self.rows, self.cap = g, rows, max_samples
        exact = g.kind == "head"
        self.stats = SignalStats(g.size, mode="exact" if exact else mode, sketch_dim=sketch_dim, seed=seed,
                                 precision=precision, device=g.consumer.weight.device)
        self.count = 0
        self.pending: Tensor | None = None
        self.pos: Tensor | None = None

    @property
    def full(self) -> bool:
        return self.cap is not None and self.count >= self.cap

    def _take(self, x: Tensor) -> Tensor:
        return x if self.cap is None else x[: max(self.cap - self.count, 0)]

    def _feed(self, z: Tensor, a: Tensor, samples: int) -> None:
        if samples == 0:
            return
        self.stats.update(z.T.float(), a.T.float())
        self.count += samples

    # hooks ---------------------------------------------------------------------------------------------------
    def on_z(self, _m: nn.Module, _inp: Any, out: Tensor) -> None:
        if self.full:
            return
        out = out.detach()
        if self.g.kind == "head":
            self.pending = self._take(self.rows(out))
            return
        self.pos = self.rows.positions(out.shape[0], out[0, 0].numel()) if out.dim() == 4 else None
        z = self._take(self.rows(out, self.pos))
        if self.g.act is None:
            self.pending = z
        else:
            self._feed(z, self.g.act(z.clone()), z.shape[0])

    def on_consumer(self, _m: nn.Module, inp: tuple[Any, ...]) -> None:
        if self.full or self.pending is None:
            return
        x = inp[0].detach()
        z, self.pending = self.pending, None
        if self.g.kind == "head":
            self._heads(z, self._take(self.rows(x)))
            return
        a = self._take(self.rows(x, self.pos))
        self._feed(z, a, z.shape[0])

    def _heads(self, v: Tensor, ctx: Tensor) -> None:
        g = self.g
        hd, r = g.head_dim, g.n_rep
        d = g.consumer.weight.shape[0]
        w = g.consumer.weight.detach().reshape(d, -1, hd)  # [d, H, hd]
        h = w.shape[1]
        m = min(v.shape[0], ctx.shape[0])
        step = max(1, _HEAD_CHUNK_ELEMS // (h * d))
        for s in range(0, m, step):
            vq = v[s:s + step].reshape(-1, h // r, hd).repeat_interleave(r, dim=1)  # [m, H, hd]
            cq = ctx[s:s + step].reshape(-1, h, hd)
            z = torch.einsum("mhk,dhk->hmd", vq.to(w.dtype), w)
            a = torch.einsum("mhk,dhk->hmd", cq.to(w.dtype), w)
            if g.unit == "kv":
                z = z.reshape(h // r, r, *z.shape[1:]).sum(1)
                a = a.reshape(h // r, r, *a.shape[1:]).sum(1)
            n = z.shape[0]
            self.stats.update(z.reshape(n, -1).float(), a.reshape(n, -1).float())
            self.count += vq.shape[0]

    def register(self) -> list[Any]:
        g = self.g
        if g.kind == "head":
            assert g.v is not None
            src: nn.Module = g.v
        else:
            src = g.norm if g.norm is not None else g.producers[0]
        hs = [src.register_forward_hook(self.on_z)]
        if g.kind == "head" or g.act is None:
            hs.append(g.consumer.register_forward_pre_hook(self.on_consumer))
        return hs


def _check(model: nn.Module, groups: Sequence[UnitGroup], max_samples: int | None) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not all(isinstance(g, UnitGroup) for g in groups):
        raise TypeError("groups: expected a sequence of UnitGroup (from discover_groups / declare_group)")
    group_by_name(groups)
    if max_samples is not None and (not isinstance(max_samples, int) or max_samples < 1):
        raise ValueError(f"max_samples: expected a positive int or None, got {max_samples!r}")


def _check_positions(positions_per_image: int | None) -> None:
    if positions_per_image is not None and (not isinstance(positions_per_image, int) or positions_per_image < 1):
        raise ValueError(f"positions_per_image: expected a positive int or None (all), got {positions_per_image!r}")


def _bar(batches: Iterable[Any], show: bool, desc: str) -> Iterable[Any]:
    if not show:
        return batches
    from tqdm.auto import tqdm

    total = len(batches) if isinstance(batches, Sized) else None
    return tqdm(batches, desc=desc, total=total, leave=False, dynamic_ncols=True)


def hooked_pass(model: nn.Module, handles: Sequence[Any], batches: Iterable[Any], forward: ForwardFn | None,
                rows: _Rows, *, desc: str, progress: bool, before_batch: Callable[[], None] | None = None,
                full: Callable[[], bool] | None = None) -> None:
    """One no-grad pass over ``batches`` in eval mode for hooks that are already registered: for each batch,
    ``rows.keep`` is set to its token mask and ``before_batch()`` runs, then ``forward(model, batch)``; the
    pass stops early once ``full()`` is true. Afterwards (also on error) every handle is removed and the
    training flag restored."""
    fwd = forward or default_forward
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in _bar(batches, progress, desc):
                rows.keep = _token_mask(batch)
                if before_batch is not None:
                    before_batch()
                fwd(model, batch)
                if full is not None and full():
                    break
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def capture(model: nn.Module, groups: Sequence[UnitGroup], batches: Iterable[Any], *,
            forward: ForwardFn | None = None, max_samples: int | None = None, positions_per_image: int | None = 64,
            mode: str = "exact", sketch_dim: int = 4096, seed: int = 0,
            progress: bool = True, precision: str = "fp32") -> dict[str, SignalStats]:
    """{group name: SignalStats} of every group's (Z, A) over ``batches`` in one no-grad pass (eval mode;
    the training flag is restored). ``batches`` yields model inputs: a tensor, an (inputs, labels) pair or a
    Hugging Face dict whose ``attention_mask`` drops padding tokens. Stops early once every group holds
    ``max_samples``. ``mode``/``sketch_dim``/``seed``/``precision`` go to SignalStats (head groups are always
    exact)."""
    _check(model, groups, max_samples)
    _check_positions(positions_per_image)
    rows = _Rows(positions_per_image, seed)
    caps = [_GroupCapture(g, rows, max_samples, mode, sketch_dim, seed + i, precision) for i, g in enumerate(groups)]
    hooked_pass(model, [h for c in caps for h in c.register()], batches, forward, rows, desc="capture",
                progress=progress, full=lambda: all(c.full for c in caps))
    for c in caps:
        if c.count == 0:
            raise ValueError(f"capture: group {c.g.name!r} received no samples; its modules "
                             f"{c.g.paths} were not called by the forward pass (or every token was padding)")
    return {c.g.name: c.stats for c in caps}


class _TaylorCapture:
    """Accumulates sum_samples(a * dL/da) per unit at the consumer input (zeroing that slice removes the
    unit, so -a * dL/da is the first-order change of the loss on removal)."""

    def __init__(self, g: UnitGroup, rows: _Rows):
        self.g, self.rows = g, rows
        self.total = torch.zeros(g.size, dtype=torch.float64)
        self.count = 0

    def pre(self, _m: nn.Module, inp: tuple[Any, ...]) -> tuple[Any, ...] | None:
        x = inp[0]
        replaced = not x.requires_grad
        if replaced:
            x = x.detach().requires_grad_(True)
        keep, value = self.rows.keep, x.detach()
        # the hook must not hold x itself: x -> its hook -> x is a cycle through autograd that the garbage
        # collector cannot see, and it kept every batch's whole graph alive (about 400 MB per MiniLM capture)
        x.register_hook(lambda grad: self._acc(value, grad, keep))
        return (x, *inp[1:]) if replaced else None

    def _acc(self, x: Tensor, grad: Tensor, keep: Tensor | None) -> None:
        g, n = self.g, self.g.size
        p = (x * grad).double()
        if p.dim() == 4:  # conv consumer: spatial mean, abs per image, summed over the batch
            self.total += p.mean(dim=(2, 3)).abs().sum(0).cpu()
            self.count += p.shape[0]
            return
        per = p.reshape(*p.shape[:-1], n, g.cols_per_unit)
        if g.kind == "channel":  # conv -> flatten -> Linear: the channel's spatial mean, abs per image
            v = per.mean(-1).abs().reshape(-1, n)
        else:
            v = per.sum(-1)
            if keep is not None and v.dim() >= 3 and tuple(v.shape[:-1]) == tuple(keep.shape):
                v = v[keep.to(v.device)]
            v = v.reshape(-1, n)
        self.total += v.sum(0).cpu()
        self.count += v.shape[0]

    def result(self) -> Tensor:
        if self.count == 0:
            raise ValueError(f"capture_taylor: group {self.g.name!r} received no gradients; its consumer "
                             f"{self.g.paths.get('consumer')} did not take part in the loss")
        mean = self.total / self.count
        return mean if self.g.kind == "channel" else mean.abs()


def gradient_pass(model: nn.Module, handles: Sequence[Any], batches: Iterable[Any],
                  loss_fn: Callable[[nn.Module, Any], Tensor], rows: _Rows, *, desc: str, progress: bool,
                  before_batch: Callable[[], None] | None = None, full: Callable[[], bool] | None = None) -> None:
    """``hooked_pass`` with gradients: for each batch ``rows.keep`` is set, ``before_batch()`` runs, then
    ``loss_fn(model, batch)`` (checked to be a scalar tensor) and its backward; stops once ``full()`` is true.
    Eval mode (dropout off); afterwards (also on error) every handle is removed, parameter gradients are
    cleared and the training flag restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            for batch in _bar(batches, progress, desc):
                rows.keep = _token_mask(batch)
                if before_batch is not None:
                    before_batch()
                loss = loss_fn(model, batch)
                if not isinstance(loss, Tensor) or loss.numel() != 1:
                    raise TypeError(f"loss_fn: expected a scalar tensor, got {type(loss).__name__} "
                                    f"{tuple(getattr(loss, 'shape', ()))}")
                loss.backward()
                if full is not None and full():
                    break
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)


def capture_taylor(model: nn.Module, groups: Sequence[UnitGroup], batches: Iterable[Any],
                   loss_fn: Callable[[nn.Module, Any], Tensor], *, max_samples: int | None = None,
                   progress: bool = True) -> dict[str, Tensor]:
    """{group name: [N] float64} first-order Taylor importance |mean over samples of a * dL/da| per unit
    (conv channels: mean over images of |spatial mean of a * dL/da|), a taken at the consumer input (for a
    head: its context block, summed over head_dim). ``loss_fn(model, batch)`` runs the forward and returns a
    scalar loss; dict batches' ``attention_mask`` drops padding tokens. Eval mode (dropout off); parameter
    gradients are cleared afterwards. Stops after ``max_samples`` samples per group (whole batches)."""
    _check(model, groups, max_samples)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn: expected a callable (model, batch) -> scalar loss, got {type(loss_fn).__name__}")
    rows = _Rows(None, 0)
    caps = [_TaylorCapture(g, rows) for g in groups]
    gradient_pass(model, [c.g.consumer.register_forward_pre_hook(c.pre) for c in caps], batches, loss_fn, rows,
                  desc="taylor", progress=progress,
                  full=lambda: max_samples is not None and all(c.count >= max_samples for c in caps))
    return {c.g.name: c.result() for c in caps}


# ---- residual-stream channels (units.StreamGroup) ------------------------------------------------------------
def _channels_last(t: Tensor, n: int) -> tuple[str, Tensor] | None:
    """("spatial", [B, N, S]) for [B, N, H, W] maps and [B, N * S] flattened ones, ("rows", [..., N]) for
    [B, N] / [B, T, N] tensors, or None when no dimension holds the N channels where a stream keeps them."""
    if t.dim() == 4 and t.shape[1] == n:
        return "spatial", t.reshape(t.shape[0], n, -1)
    if t.dim() >= 2 and t.shape[-1] == n:
        return "rows", t
    if t.dim() == 2 and t.shape[1] % n == 0:
        return "spatial", t.reshape(t.shape[0], n, -1)
    return None


def _stream_device(s: StreamGroup) -> torch.device:
    """The device of the stream's first writer (or, with none, first reader): its weight's, or its buffers' for
    a norm without affine parameters."""
    for m in (*s.writers, *s.readers):
        for t in (getattr(m, "weight", None), *m.buffers()):
            if isinstance(t, Tensor):
                return t.device
    return torch.device("cpu")


class _StreamCapture:
    """Pairs each write of a stream with the next read (units.StreamGroup) and streams the pairs into
    SignalStats; keeps the reads (Z = A = read) and the writes alone as the fallbacks."""

    def __init__(self, s: StreamGroup, rows: _Rows, max_samples: int | None, mode: str, sketch_dim: int, seed: int,
                 precision: str):
        n = s.size
        if n < 3:
            raise ValueError(f"stream {s.name!r}: expected at least 3 channels to capture signals for, got {n}")
        self.s, self.rows, self.cap, self.n = s, rows, max_samples, n
        dev = _stream_device(s)

        def stats(i: int) -> SignalStats:
            return SignalStats(n, mode=mode, sketch_dim=sketch_dim, seed=seed + i, precision=precision, device=dev)

        self.pairs, self.reads, self.writes = stats(0), stats(1), stats(2)
        self.counts = {"pairs": 0, "reads": 0, "writes": 0}
        self.pending: list[tuple[Tensor, Tensor]] = []  # (the write as the model produced it, a copy)
        self.last_read: Tensor | None = None

    @property
    def full(self) -> bool:
        return self.cap is not None and self.counts["pairs"] >= self.cap

    def reset(self) -> None:
        self.pending.clear()
        self.last_read = None

    def _feed(self, key: str, z: Tensor, a: Tensor) -> None:
        if self.cap is not None:
            left = max(self.cap - self.counts[key], 0)
            z, a = z[:left], a[:left]
        if z.shape[0] == 0:
            return
        getattr(self, key).update(z.T.float(), a.T.float())
        self.counts[key] += int(z.shape[0])

    def _samples(self, t: Tensor) -> Tensor | None:
        """[m, N] samples of one tensor on its own (spatial positions subsampled, padding dropped)."""
        lay = _channels_last(t, self.n)
        if lay is None:
            return None
        kind, x = lay
        if kind == "spatial":
            return self.rows(x.unsqueeze(-1), self.rows.positions(x.shape[0], x.shape[2]))
        return self.rows(x)

    def _pair(self, z: Tensor, a: Tensor) -> tuple[Tensor, Tensor] | None:
        lz, la = _channels_last(z, self.n), _channels_last(a, self.n)
        if lz is None or la is None:
            return None
        (kz, z), (ka, a) = lz, la
        if kz == "spatial" and ka == "rows" and a.dim() == 2:  # read after global pooling
            z, kz = z.mean(2), "rows"
        if kz != ka or z.shape != a.shape:
            return None
        if kz == "spatial":
            pos = self.rows.positions(z.shape[0], z.shape[2])
            return self.rows(z.unsqueeze(-1), pos), self.rows(a.unsqueeze(-1), pos)
        return self.rows(z), self.rows(a)

    # hooks ---------------------------------------------------------------------------------------------------
    def on_write(self, _m: nn.Module, inp: Any, out: Any) -> None:
        if not isinstance(out, Tensor) or self.full:
            return
        x = inp[0] if isinstance(inp, tuple) and inp else None
        # a writer fed by another writer's output (conv -> BN) replaces that write: one write per stream entry
        self.pending = [(src, z) for src, z in self.pending if src is not x]
        self.pending.append((out, out.detach().clone()))  # a copy: the add and activation may run in place
        w = self._samples(out.detach())
        if w is not None and self.counts["pairs"] == 0:
            self._feed("writes", w, w)

    def on_read(self, _m: nn.Module, inp: tuple[Any, ...]) -> None:
        if not inp or not isinstance(inp[0], Tensor) or self.full:
            return
        a = inp[0].detach()
        last = self.last_read
        if last is not None and a.data_ptr() == last.data_ptr() and a.shape == last.shape:
            return  # the same stream tensor read by a second module (q, k, v; conv1 and the downsample)
        self.last_read = a
        if self.counts["pairs"] == 0:
            r = self._samples(a)
            if r is not None:
                self._feed("reads", r, r)
        pending, self.pending = self.pending, []
        for _, z in pending:
            if z.shape == a.shape and torch.equal(z, a):
                continue  # the read itself (a LayerNorm's output read as it is): not a write into the stream
            got = self._pair(z, a)
            if got is not None:
                self._feed("pairs", *got)

    def register(self) -> list[Any]:
        hs = [m.register_forward_hook(self.on_write) for m in self.s.writers]
        hs += [m.register_forward_pre_hook(self.on_read) for m in self.s.readers]
        return hs

    def result(self) -> tuple[SignalStats, str]:
        for key in ("pairs", "reads", "writes"):
            if self.counts[key] > 0:
                return getattr(self, key), key
        raise ValueError(f"capture_streams: stream {self.s.name!r} received no samples; its modules "
                         f"{self.s.paths or [type(m).__name__ for m in self.s.modules()]} were not called by the "
                         "forward pass, or their tensors hold the channels in no dimension a stream uses")


def capture_streams(model: nn.Module, streams: Sequence[StreamGroup], batches: Iterable[Any], *,
                    forward: ForwardFn | None = None, max_samples: int | None = None,
                    positions_per_image: int | None = 64, mode: str = "exact", sketch_dim: int = 4096,
                    seed: int = 0, progress: bool = True,
                    precision: str = "fp32") -> dict[str, tuple[SignalStats, str]]:
    """{stream name: (SignalStats, source)} of every residual-stream group's (Z, A) over ``batches`` in one
    no-grad pass (eval mode, flag restored), with the signals of units.StreamGroup: each write paired with
    the next read (source "pairs"); when no pair lined up, Z = A = the reads ("reads") or the writes
    ("writes"). Samples as in :func:`capture` (``positions_per_image`` seeded positions per image, shared by
    Z and A; padding tokens of dict batches dropped; ``max_samples`` bounds the pairs per stream)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not all(isinstance(s, StreamGroup) for s in streams):
        raise TypeError("streams: expected a sequence of StreamGroup")
    names = [s.name for s in streams]
    if len(set(names)) != len(names):
        raise ValueError(f"streams: expected unique names, got {names}")
    if max_samples is not None and (not isinstance(max_samples, int) or max_samples < 1):
        raise ValueError(f"max_samples: expected a positive int or None, got {max_samples!r}")
    _check_positions(positions_per_image)
    rows = _Rows(positions_per_image, seed)
    caps = [_StreamCapture(s, rows, max_samples, mode, sketch_dim, seed + 3 * i, precision)
            for i, s in enumerate(streams)]

    def reset() -> None:
        for c in caps:
            c.reset()

    try:
        hooked_pass(model, [h for c in caps for h in c.register()], batches, forward, rows, desc="capture streams",
                    progress=progress, before_batch=reset, full=lambda: all(c.full for c in caps))
    finally:
        reset()
    return {c.s.name: c.result() for c in caps}


class _StreamTaylor:
    """sum over reads and samples of a * dL/da per channel, a = a reader's input (each read gets its own alias
    so the gradient is the one through that reader)."""

    def __init__(self, s: StreamGroup, rows: _Rows):
        self.s, self.rows, self.n = s, rows, s.size
        self.total = torch.zeros(self.n, dtype=torch.float64)
        self.count = 0
        self.counted = False

    def pre(self, _m: nn.Module, inp: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if not inp or not isinstance(inp[0], Tensor) or _channels_last(inp[0], self.n) is None:
            return None
        x = inp[0]
        alias = x.view_as(x) if x.requires_grad else x.detach().requires_grad_(True)
        value, keep = x.detach(), self.rows.keep
        if not self.counted:  # samples counted once per forward: images, or non-padding tokens
            lay = _channels_last(value, self.n)
            assert lay is not None
            rows = lay[1] if lay[0] == "rows" else lay[1][..., 0]
            if keep is not None and rows.dim() == 3 and tuple(rows.shape[:2]) == tuple(keep.shape):
                self.count += int(keep.sum())
            else:
                self.count += int(rows.reshape(-1, self.n).shape[0])
            self.counted = True
        # the hook holds the values, not x itself (x -> its hook -> x would keep every batch's graph alive)
        alias.register_hook(lambda grad: self._acc(value, grad, keep))
        return (alias, *inp[1:])

    def _acc(self, x: Tensor, grad: Tensor, keep: Tensor | None) -> None:
        lay = _channels_last((x * grad).double(), self.n)
        assert lay is not None
        kind, p = lay
        if kind == "spatial":
            v = p.mean(2)
        else:
            v = p
            if keep is not None and v.dim() == 3 and tuple(v.shape[:2]) == tuple(keep.shape):
                v = v[keep.to(v.device)]
        self.total += v.reshape(-1, self.n).sum(0).cpu()

    def result(self) -> Tensor:
        if self.count == 0:
            raise ValueError(f"capture_stream_taylor: stream {self.s.name!r} received no gradients; its readers "
                             "did not take part in the loss")
        return (self.total / self.count).abs()


def capture_stream_taylor(model: nn.Module, streams: Sequence[StreamGroup], batches: Iterable[Any],
                          loss_fn: Callable[[nn.Module, Any], Tensor], *,
                          progress: bool = True) -> dict[str, Tensor]:
    """{stream name: [N] float64} first-order Taylor importance of each stream channel:
    |sum over the stream's reads of a * dL/da| averaged over samples (images, or non-padding tokens), a =
    the channel as each reader takes it in (a conv read: spatial mean per image), i.e. the first-order change
    of the loss when the channel is zeroed at every read. ``loss_fn(model, batch)`` returns a scalar loss;
    eval mode; parameter gradients are cleared afterwards."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn: expected a callable (model, batch) -> scalar loss, got {type(loss_fn).__name__}")
    rows = _Rows(None, 0)
    caps = [_StreamTaylor(s, rows) for s in streams]

    def uncount() -> None:
        for c in caps:
            c.counted = False

    gradient_pass(model, [m.register_forward_pre_hook(c.pre) for c in caps for m in c.s.readers], batches,
                  loss_fn, rows, desc="taylor streams", progress=progress, before_batch=uncount)
    return {c.s.name: c.result() for c in caps}
