"""Calibration shared by the pruning-framework adapters: find each layer's units, stream their signals, score.

Which units, and which signals (algorithm.md section 6), found by tracing one forward pass at a time:

* ``"out"`` units = output channels of an ``nn.Linear`` / ``nn.Conv*d``. Pre-activation Z = the layer's
  output, or the output of the BatchNorm applied to it directly (post-BN: a negative gamma flips signs).
  Post-activation A = the output of the first elementwise activation applied to Z itself (``F.relu``,
  ``torch.tanh``, ``x.sigmoid()``, an ``nn.ReLU``/``nn.GELU`` module, a ``transformers.activations`` module,
  ...). If that activation's output is then multiplied elementwise by a tensor of the same shape (SwiGLU/GeGLU:
  ``act(gate(x)) * up(x)``), A = the product, the input of ``down_proj``. A layer whose output reaches no
  activation directly (residual streams, q/k/v projections, logits, ``x += identity`` before the ReLU) has
  no ``"out"`` units: adapters return None for its groups.
* ``"attn"`` units = input channels of the Linear that consumes an attention output (``o_proj``): channel
  ``h * head_dim + j`` is dim j of head h. Z = the value states fed to attention (``softmax(QK^T) @ V`` or
  ``scaled_dot_product_attention(q, k, v)``; KV heads repeated for GQA), A = the attention output, both over
  tokens: the attention mixing plays the activation. The layout ``o_in = A.transpose(1, 2).reshape(B, T, -1)``
  is checked on every batch.

Tracing uses forward hooks plus a ``TorchFunctionMode`` that sees every torch call, with tensors matched by
identity and their version counter (an in-place change in between breaks the match). Samples: rows of a
Linear output (batch x tokens), batch x positions for convolutions, batch x tokens for attention; a token
mask (e.g. ``attention_mask``) drops padding; at most ``max_samples_per_batch`` random columns per batch,
the same columns for Z and A, are kept. Signals stream into one :class:`SignalStats` per unit set.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .._validation import check_choice
from ..scoring.spectral import DIRECTIONS, PREPROCESS, ScoreResult, score
from ..stats import SignalStats

NORMALIZERS = ("rank", "zscore", "max")
KINDS = ("out", "attn")
ACTIVATIONS = frozenset(
    "relu relu6 gelu silu sigmoid tanh leaky_relu elu selu celu hardswish hardsigmoid hardtanh mish softplus "
    "softsign logsigmoid rrelu".split())
_MULS = frozenset({"mul", "mul_", "__mul__", "__rmul__", "__imul__"})
_MATMULS = frozenset({"matmul", "__matmul__", "bmm"})
_SDPA = "scaled_dot_product_attention"
_SHAPE_OPS = frozenset({"transpose", "permute", "reshape", "view", "contiguous", "flatten", "swapaxes",
                        "movedim"})
# torch.nn.modules.activation classes that are not elementwise activations
_NOT_ACTIVATIONS = frozenset({"Softmax", "Softmin", "LogSoftmax", "Softmax2d", "MultiheadAttention", "GLU",
                              "Threshold", "PReLU"})
_ROOTS = (nn.Linear, nn.modules.conv._ConvNd)
_NONE = object()


def _fname(func: Any) -> str:
    return getattr(func, "__name__", "")


def _version(t: torch.Tensor) -> int | None:
    try:
        return int(t._version)
    except RuntimeError:  # inference-mode tensors have no version counter
        return None


def _is_activation_module(m: nn.Module) -> bool:
    mod = type(m).__module__
    return (mod.startswith("torch.nn.modules.activation") or mod.startswith("transformers.activations")) \
        and type(m).__name__ not in _NOT_ACTIVATIONS


def _is_activation(name: str) -> bool:
    return name.rstrip("_") in ACTIVATIONS


@dataclass
class Unit:
    """One scorable set of units of a module: its signal statistics and how they were found."""

    module: nn.Module
    name: str
    kind: str  # "out" | "attn"
    stats: SignalStats
    width: int  # the module's width (out or in channels) when calibrated
    norm: nn.Module | None = None  # the BatchNorm between the layer and its activation ("out" only)
    activation: str = ""  # e.g. "relu", "silu*mul", "attention"
    batches: int = 0


@dataclass
class _Entry:
    """A tracked pre-activation tensor of one forward pass."""

    module: nn.Module
    ref: weakref.ReferenceType[torch.Tensor]
    version: int | None
    norm: nn.Module | None = None
    pre: torch.Tensor | None = None  # [N, m] sampled copy
    post: torch.Tensor | None = None
    cols: torch.Tensor | None = None
    activation: str = ""

    def matches(self, t: torch.Tensor) -> bool:
        return self.ref() is t and (self.version is None or _version(t) == self.version)


@dataclass
class _AttnEntry:
    """A candidate attention output [B, H, T, d] and its value states [B, H_kv, T, d]. Strong references (the
    producing op's result is often freed before o_proj runs), dropped when consumed or at the end of the pass."""

    value: torch.Tensor | None
    out: torch.Tensor | None
    out_version: int | None
    tail: list[weakref.ReferenceType[torch.Tensor]] = field(default_factory=list)


def _rows(t: torch.Tensor, kind: str, conv: bool, mask: torch.Tensor | None) -> torch.Tensor:
    """[N units, S samples] view of an activation tensor (a token mask drops padding)."""
    if mask is not None:
        mask = mask.to(device=t.device, dtype=torch.bool)
    if kind == "attn":  # [B, H, T, d] -> units (h, j), samples (b, t)
        b, h, tt, d = t.shape
        x = t.permute(1, 3, 0, 2)
        if mask is not None and tuple(mask.shape) == (b, tt):
            return x[..., mask].reshape(h * d, -1)
        return x.reshape(h * d, b * tt)
    if conv:  # [B, C, *spatial]
        return t.movedim(1, 0).reshape(t.shape[1], -1)
    n = t.shape[-1]
    if mask is not None and t.dim() >= 2 and tuple(mask.shape) == tuple(t.shape[:-1]):
        return t[mask].T
    return t.reshape(-1, n).T


class _Tracer(TorchFunctionMode):
    """Sees every torch call of a forward pass; forwards activation, gating and attention ops to the session."""

    def __init__(self, session: _Session) -> None:
        super().__init__()
        self.s = session

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        s = self.s
        name = _fname(func)
        if s.busy or not args or not isinstance(args[0], torch.Tensor):
            return func(*args, **kwargs)
        x = args[0]
        if _is_activation(name):
            entry = s.live.get(id(x))
            if entry is not None and entry.matches(x):
                s.before_activation(entry, x)
                out = func(*args, **kwargs)
                s.after_activation(entry, out, name)
                return out
        elif name in _MULS:
            entry = s.glu_operands(args)
            if entry is not None:
                out = func(*args, **kwargs)
                s.after_gate(entry, out)
                return out
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            if name in _MATMULS and len(args) >= 2 and isinstance(args[1], torch.Tensor):
                s.attention_candidate(args[1], out)
            elif name == _SDPA:
                value = args[2] if len(args) >= 3 else kwargs.get("value")
                if isinstance(value, torch.Tensor):
                    s.attention_candidate(value, out)
            elif name in _SHAPE_OPS:
                s.attention_shape_op(x, out)
        return out


class _Session:
    """Hooks + tracer on one model for the duration of a calibration context."""

    def __init__(self, cal: SpectralCalibrator, model: nn.Module) -> None:
        self.cal = cal
        self.model = model
        self.busy = False
        self.live: dict[int, _Entry] = {}
        self.acts: dict[int, tuple[_Entry, weakref.ReferenceType[torch.Tensor], int | None]] = {}
        self.attn: dict[int, _AttnEntry] = {}
        self.done: list[_Entry] = []
        self.names = {m: n for n, m in model.named_modules()}
        self.handles: list[Any] = []

    # ---- hooks -----------------------------------------------------------------------------------------
    def install(self) -> None:
        for m in self.model.modules():
            if isinstance(m, _ROOTS):
                self.handles.append(m.register_forward_hook(self._root_hook))
            if isinstance(m, nn.Linear):
                self.handles.append(m.register_forward_pre_hook(self._linear_pre_hook))
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                self.handles.append(m.register_forward_hook(self._norm_hook))
            if _is_activation_module(m):
                self.handles.append(m.register_forward_pre_hook(self._act_pre_hook))
                self.handles.append(m.register_forward_hook(self._act_hook))
        self.handles.append(self.model.register_forward_pre_hook(lambda *_: self.reset()))
        self.handles.append(self.model.register_forward_hook(lambda *_: self.flush()))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _root_hook(self, m: nn.Module, inp: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor) and out.dim() >= 2:
            self.live[id(out)] = _Entry(m, weakref.ref(out), _version(out))

    def _norm_hook(self, m: nn.Module, inp: Any, out: Any) -> None:
        x = inp[0] if inp else None
        if not isinstance(x, torch.Tensor) or not isinstance(out, torch.Tensor):
            return
        entry = self.live.get(id(x))
        if entry is not None and entry.matches(x) and entry.norm is None and entry.pre is None:
            self.live[id(out)] = _Entry(entry.module, weakref.ref(out), _version(out), norm=m)

    def _act_pre_hook(self, m: nn.Module, inp: Any) -> None:
        x = inp[0] if inp else None
        if isinstance(x, torch.Tensor):
            entry = self.live.get(id(x))
            if entry is not None and entry.matches(x):
                self.before_activation(entry, x)

    def _act_hook(self, m: nn.Module, inp: Any, out: Any) -> None:
        x = inp[0] if inp else None
        if not isinstance(x, torch.Tensor) or not isinstance(out, torch.Tensor):
            return
        entry = self.live.get(id(x))
        if entry is not None and entry.ref() is x and entry.cols is not None:
            self.after_activation(entry, out, type(m).__name__)

    def _linear_pre_hook(self, m: nn.Module, inp: Any) -> None:
        x = inp[0] if inp else None
        if not isinstance(x, torch.Tensor):
            return
        att = self.attn.pop(id(x), None)
        if att is None or att.tail[-1]() is not x or att.out is None or att.value is None:
            return
        o4, v = att.out, att.value
        att.out = att.value = None
        if att.out_version is not None and _version(o4) != att.out_version:
            return
        self.busy = True
        try:
            b, h, tt, d = o4.shape
            if x.shape[:-1] != (b, tt) or x.shape[-1] != h * d or not torch.equal(
                    x.reshape(b, tt, h, d), o4.transpose(1, 2)):
                self.cal._warn_once(m, f"{self.names.get(m, type(m).__name__)}: input is not the attention output "
                                       "in (token, head, dim) layout; its heads are not scored")
                return
            if v.shape[1] != h:  # GQA: query head h reads KV head h // (H / H_kv)
                v = v.repeat_interleave(h // v.shape[1], dim=1)
            pre = _rows(v, "attn", False, self.cal.token_mask)
            post = _rows(o4, "attn", False, self.cal.token_mask)
            cols = self.cal._columns(pre.shape[1])
            self.cal._update(m, "attn", self.names.get(m, ""), pre[:, cols], post[:, cols], None, "attention",
                             m.in_features)
        finally:
            self.busy = False

    # ---- called by the tracer ----------------------------------------------------------------------------
    def before_activation(self, entry: _Entry, x: torch.Tensor) -> None:
        if entry.cols is not None:
            return
        self.busy = True
        try:
            conv = isinstance(entry.module, nn.modules.conv._ConvNd)
            rows = _rows(x, "out", conv, self.cal.token_mask)
            entry.cols = self.cal._columns(rows.shape[1])
            entry.pre = rows[:, entry.cols].detach().clone()
        finally:
            self.busy = False

    def after_activation(self, entry: _Entry, out: Any, name: str) -> None:
        if entry.post is not None or not isinstance(out, torch.Tensor):
            return
        x = entry.ref()
        if x is not None and out is not x and out.shape != x.shape:
            return  # not elementwise
        self._set_post(entry, out)
        entry.activation = name
        self.acts[id(out)] = (entry, weakref.ref(out), _version(out))
        self.done.append(entry)

    def glu_operands(self, args: tuple[Any, ...]) -> _Entry | None:
        """The entry whose activation output is one factor of an elementwise product of equal shapes."""
        if len(args) < 2 or not all(isinstance(a, torch.Tensor) for a in args[:2]) or args[0].shape != args[1].shape:
            return None
        for t in args[:2]:
            hit = self.acts.get(id(t))
            if hit is not None and hit[1]() is t and (hit[2] is None or _version(t) == hit[2]):
                return hit[0]
        return None

    def after_gate(self, entry: _Entry, out: torch.Tensor) -> None:
        if entry.activation.endswith("*mul"):
            return
        self._set_post(entry, out)
        entry.activation += "*mul"

    def _set_post(self, entry: _Entry, out: torch.Tensor) -> None:
        self.busy = True
        try:
            conv = isinstance(entry.module, nn.modules.conv._ConvNd)
            entry.post = _rows(out, "out", conv, self.cal.token_mask)[:, entry.cols].detach().clone()
        finally:
            self.busy = False

    def attention_candidate(self, value: torch.Tensor, out: torch.Tensor) -> None:
        if value.dim() == 4 and out.dim() == 4 and value.shape[-1] == out.shape[-1] \
                and out.shape[1] % value.shape[1] == 0 and value.shape[2] == out.shape[2]:
            self.attn[id(out)] = _AttnEntry(value, out, _version(out), [weakref.ref(out)])

    def attention_shape_op(self, x: torch.Tensor, out: torch.Tensor) -> None:
        att = self.attn.get(id(x))
        if att is not None and att.tail[-1]() is x:
            att.tail.append(weakref.ref(out))
            self.attn[id(out)] = att

    # ---- per forward -------------------------------------------------------------------------------------
    def reset(self) -> None:
        self.live.clear()
        self.acts.clear()
        self.attn.clear()
        self.done.clear()

    def flush(self) -> None:
        self.busy = True
        try:
            for e in self.done:
                if e.pre is not None and e.post is not None:
                    m = e.module
                    width = m.out_channels if isinstance(m, nn.modules.conv._ConvNd) else m.out_features
                    self.cal._update(m, "out", self.names.get(m, ""), e.pre, e.post, e.norm, e.activation, width)
        finally:
            self.busy = False
            self.reset()


class SpectralCalibrator:
    """Streams calibration signals of every scorable unit set of a model and scores them on demand.

    Score options are those of :func:`spectra_gpu.score`; ``normalizer`` maps a layer's scores to a scale that
    is comparable across layers (see :meth:`importance`). ``stats_mode``/``precision``/``sketch_dim`` configure
    the :class:`SignalStats`; ``max_samples_per_batch`` caps the columns kept per batch (None = all).
    """

    def __init__(self, *, k: int = 10, num_eigs: int | str = 32, direction: str = "fwd",
                 preprocess: str = "zscore", normalizer: str | None = "rank", stats_mode: str = "exact",
                 precision: str = "fp32", sketch_dim: int = 4096, max_samples_per_batch: int | None = 4096,
                 seed: int = 0, backend: str | None = None) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k: expected an int >= 1, got {k!r}")
        if num_eigs != "full" and (isinstance(num_eigs, bool) or not isinstance(num_eigs, int) or num_eigs < 1):
            raise ValueError(f"num_eigs: expected an int >= 1 or 'full', got {num_eigs!r}")
        check_choice(direction, "direction", DIRECTIONS)
        check_choice(preprocess, "preprocess", PREPROCESS)
        if normalizer is not None:
            check_choice(normalizer, "normalizer", NORMALIZERS)
        check_choice(stats_mode, "stats_mode", ("exact", "sketch"))
        check_choice(precision, "precision", ("fp32", "fp64"))
        if max_samples_per_batch is not None and (isinstance(max_samples_per_batch, bool) or not isinstance(
                max_samples_per_batch, int) or max_samples_per_batch < 2):
            raise ValueError(f"max_samples_per_batch: expected None or an int >= 2, got {max_samples_per_batch!r}")
        self.score_options: dict[str, Any] = dict(k=k, num_eigs=num_eigs, direction=direction,
                                                  preprocess=preprocess, backend=backend, seed=seed)
        self.normalizer = normalizer
        self.stats_options: dict[str, Any] = dict(mode=stats_mode, precision=precision, sketch_dim=sketch_dim,
                                                  seed=seed)
        self.max_samples_per_batch = max_samples_per_batch
        self.units: dict[tuple[nn.Module, str], Unit] = {}
        self.token_mask: torch.Tensor | None = None
        self._session: _Session | None = None
        self._results: dict[tuple[nn.Module, str], ScoreResult | None] = {}
        self._gen = torch.Generator().manual_seed(seed)
        self._warned: set[Any] = set()

    # ---- calibration -----------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget all signals and scores (call before re-calibrating a pruned model)."""
        self.units.clear()
        self._results.clear()
        self._gen.manual_seed(self.stats_options["seed"])

    @contextlib.contextmanager
    def calibration(self, model: nn.Module) -> Iterator[SpectralCalibrator]:
        """Every ``model(...)`` call inside the block feeds the statistics (eval mode, no grad).

        Earlier signals are discarded. Set ``.token_mask`` ([batch, tokens] bool) before a call to drop padding.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        self.reset()
        session = self._session = _Session(self, model)
        session.reset()
        modes = {m: m.training for m in model.modules()}
        model.eval()
        session.install()
        try:
            with torch.no_grad(), _Tracer(session):
                yield self
            session.flush()
        finally:
            session.remove()
            self._session = None
            for m, t in modes.items():
                m.training = t
            self.token_mask = None
        if not self.units:
            warnings.warn("spectra_gpu calibration: no scorable units were seen (no Linear/Conv output reached an "
                          "activation, and no attention output reached a Linear); was the model called inside "
                          "the block?", UserWarning, stacklevel=3)

    def calibrate(self, model: nn.Module, batches: Iterable[Any],
                  forward_fn: Callable[[nn.Module, Any], Any] | None = None) -> SpectralCalibrator:
        """Run ``model`` on every batch (tensor -> model(x), tuple/list -> model(*x), mapping -> model(**x),
        or ``forward_fn(model, batch)``). A mapping's ``attention_mask`` drops padding tokens."""
        if isinstance(batches, (torch.Tensor, Mapping)):
            raise TypeError(f"batches: expected an iterable of batches, got one {type(batches).__name__}; "
                            "wrap it in a list")
        it = iter(batches)
        first = next(it, _NONE)
        if first is _NONE:
            raise ValueError("batches: expected at least one calibration batch, got none")
        with self.calibration(model):
            for batch in itertools.chain([first], it):
                mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
                self.token_mask = mask.bool() if isinstance(mask, torch.Tensor) else None
                if forward_fn is not None:
                    forward_fn(model, batch)
                elif isinstance(batch, torch.Tensor):
                    model(batch)
                elif isinstance(batch, Mapping):
                    model(**batch)
                elif isinstance(batch, (tuple, list)):
                    model(*batch)
                else:
                    raise TypeError(f"batches: expected tensors, tuples/lists or mappings (or pass forward_fn), "
                                    f"got a {type(batch).__name__}")
                if self._session is not None:  # forward_fn may bypass the top-level module's hooks
                    self._session.flush()
        return self

    def _columns(self, s: int) -> torch.Tensor:
        m = self.max_samples_per_batch
        if m is None or s <= m:
            return torch.arange(s)
        return torch.randperm(s, generator=self._gen)[:m].sort().values

    def _update(self, module: nn.Module, kind: str, name: str, pre: torch.Tensor, post: torch.Tensor,
                norm: nn.Module | None, activation: str, width: int) -> None:
        n = pre.shape[0]
        if n < 3 or pre.shape[1] == 0:
            return
        key = (module, kind)
        unit = self.units.get(key)
        if unit is None:
            stats = SignalStats(n, device=pre.device, **self.stats_options)
            unit = self.units[key] = Unit(module, name, kind, stats, width, norm, activation)
        if unit.stats.n != n:
            return
        unit.stats.update(pre, post)
        unit.batches += 1

    # ---- scores ------------------------------------------------------------------------------------------
    def unit(self, module: nn.Module, kind: str = "out") -> Unit | None:
        check_choice(kind, "kind", KINDS)
        return self.units.get((module, kind))

    def result(self, module: nn.Module, kind: str = "out") -> ScoreResult | None:
        """Raw :func:`spectra_gpu.score` result of a unit set (cached), or None if it has no signals."""
        unit = self.unit(module, kind)
        if unit is None:
            return None
        now = _width(module, kind)
        if now != unit.width:
            raise ValueError(f"{unit.name or type(module).__name__}: expected {unit.width} "
                             f"{'output' if kind == 'out' else 'input'} channels as calibrated, got {now}; the "
                             "model changed after calibration: calibrate again after each pruning step")
        key = (module, kind)
        if key not in self._results:
            if unit.stats.m < 2:
                self._results[key] = None
            else:
                try:
                    self._results[key] = score(unit.stats, **self.score_options)
                except ValueError as e:  # e.g. fewer than 3 alive units: nothing to rank
                    self._warn_once(key, f"{unit.name}: not scored ({e})")
                    self._results[key] = None
        return self._results[key]

    def importance(self, module: nn.Module, kind: str = "out") -> torch.Tensor | None:
        """Per-unit importance on the cross-layer scale of ``normalizer`` (float64, lower = prune first).

        'rank' (default): within-layer percentile (r + 0.5) / N_alive of the alive units, plus 1e-6 x the raw
        score to break cross-layer ties (same-percentile units of two layers would otherwise tie at a global
        threshold and over-prune). Scale-free: global pruning then removes about the same fraction from every
        layer, the uniform allocation of algorithm.md section 7. 'zscore': (s - mean) / std over alive units
        (layers whose scores have a long low tail lose more). 'max': the engine's max-normalised scores.
        None: the raw scores, dead units -inf. For the other three, dead units get (lowest alive value - 1):
        pruned first, finite so means over heads and channel groups stay finite; exact ties are broken toward
        the lower index (see :func:`normalize`).
        """
        res = self.result(module, kind)
        if res is None:
            return None
        return normalize(res.scores, self.normalizer)

    def _warn_once(self, key: Any, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"spectra_gpu: {msg}", UserWarning, stacklevel=3)


def _width(module: nn.Module, kind: str) -> int:
    if kind == "attn":
        return int(module.in_features)
    return int(module.out_channels if isinstance(module, nn.modules.conv._ConvNd) else module.out_features)


def normalize(scores: torch.Tensor, normalizer: str | None) -> torch.Tensor:
    """Map one layer's engine scores (higher = keep, dead = -inf) to a cross-layer scale; see importance().

    Ties are broken toward the lower unit index by a term below 1e-9 that keeps every other order: TP prunes
    every unit at its threshold (``imp <= thres``), so exact ties (common in small layers, whose kNN graph is
    complete) would otherwise prune more than requested.
    """
    s = scores.detach().double().cpu()
    if normalizer is None:
        return s
    alive = torch.isfinite(s)
    a = s[alive]
    if normalizer == "rank":
        r = torch.empty_like(a)
        r[torch.argsort(a, stable=True)] = torch.arange(a.numel(), dtype=torch.float64)
        v = (r + 0.5) / a.numel() + 1e-6 * a  # 1e-6 x raw score: separates equal percentiles of two layers
    elif normalizer == "zscore":
        sd = a.std(correction=0)
        v = (a - a.mean()) / (sd if sd > 0 else 1.0)
    elif normalizer == "max":
        v = a
    else:
        raise ValueError(f"normalizer: expected one of {NORMALIZERS} or None, got {normalizer!r}")
    out = torch.empty_like(s)
    out[alive] = v
    out[~alive] = (float(v.min()) if v.numel() else 0.0) - 1.0
    n = s.numel()
    pos = torch.empty_like(s)
    pos[torch.argsort(out, stable=True)] = torch.arange(n, dtype=torch.float64)
    return out + 1e-9 * (pos + 0.5) / n


__all__ = ["KINDS", "NORMALIZERS", "SpectralCalibrator", "Unit", "normalize"]
