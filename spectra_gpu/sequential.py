"""Layer-sequential calibration and scoring of Hugging Face transformer models (decoders like Llama, encoders
like BERT): the capture-and-score step of a round (``rounds.capture_and_score``) one block at a time, so the
statistics of only one block are ever held (docs/algorithm.md section 7).

The sweep (:func:`capture_and_score_sequential`):

1. the calibration batches run through the model up to the first block, where a forward pre-hook records the
   block's inputs (hidden states, and the arguments the model hands every block: attention mask, position ids
   and rotary embeddings; any cache is dropped) and stops the forward;
2. for each block that holds groups: the block is brought to the compute device (from CPU memory, or read
   from the safetensors shards of a model built on the meta device, :class:`ShardedWeights`), its groups'
   ``SignalStats`` are captured by ``capture.capture`` on the block replaying the recorded inputs (so units
   and signals are the ones the whole-model capture defines), the groups are scored with the round's seeds
   and options (``rounds.score_groups`` with the group's index in the round), the statistics are freed, and
   the block's outputs replace its inputs as the next block's inputs (one forward per batch and block: the
   capture forward is also the pass-through);
3. blocks after the last one holding a group are not run.

A block's computation is the same as inside the whole model, so the statistics and the scores equal those
of the whole-model capture up to floating-point summation order. Peak memory = the prefix modules (e.g. the
token embeddings) + one block + the hidden states of all calibration tokens (one copy: ``hidden_store``
"device", "cpu" or "disk", a memory-mapped file) + one block's statistics; the result reports the peak RSS
and, on CUDA, the peak allocated device memory.

Gradient scorers (Taylor) are refused: the gradient of the model's loss at a block flows back through every
later block, so it cannot be captured one block at a time.
"""

from __future__ import annotations

import json
import resource
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from ._progress import enabled as _progress_on
from ._progress import progress
from .capture import capture, default_forward
from .compensate import DAMPING, Refit, apply_refits, compensation
from .config import HIDDEN_STORES, PruneConfig
from .families import repeated_blocks
from .rounds import GroupScores, Signals, score_groups, stats_mode
from .scorers import NEEDS_TAYLOR, ScoreOutput
from .stats import SignalStats
from .units import UnitGroup

ForwardFn = Callable[[nn.Module, Any], Any]
# (block, its groups, replay batches, replay forward, stats mode, capture seed) -> {group: SignalStats} of the
# groups this process scores (a data-parallel capture reduces the statistics to each group's owner)
BlockCapture = Callable[[nn.Module, Sequence[UnitGroup], Sequence[dict[str, Any]], ForwardFn, str, int],
                        dict[str, SignalStats]]


# ---- where the blocks are --------------------------------------------------------------------------------
def find_blocks(model: nn.Module, groups: Sequence[UnitGroup] = (),
                path: str | None = None) -> tuple[str, nn.ModuleList]:
    """(path, ModuleList) of the model's repeated blocks: ``path`` if given (e.g. "model.layers"), else found
    by structure: the ``nn.ModuleList`` of at least two modules of one class that holds the most of the
    ``groups``' modules, ties (and no groups) broken by parameter count. Raises ValueError when there is none
    (not a transformer-like stack)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if path is not None:
        try:
            m = model.get_submodule(path)
        except AttributeError as e:
            raise ValueError(f"blocks: expected a submodule path of {type(model).__name__}, got {path!r}") from e
        if not isinstance(m, nn.ModuleList) or len(m) == 0:
            raise ValueError(f"blocks: expected {path!r} to be a non-empty nn.ModuleList, got {type(m).__name__}")
        return path, m
    wanted = {id(m) for g in groups for m in g.modules()}
    best: tuple[int, int, str, nn.ModuleList] | None = None
    for p, m in repeated_blocks(model):
        held = sum(1 for sub in m.modules() if id(sub) in wanted)
        size = sum(t.numel() for t in m.parameters())
        if best is None or (held, size) > best[:2]:
            best = (held, size, p, m)
    if best is None:
        raise ValueError(f"blocks: found no nn.ModuleList of repeated blocks in {type(model).__name__}; "
                         "layer-sequential calibration needs a transformer-like stack (pass blocks='path')")
    return best[2], best[3]


def _block_of_groups(blocks: nn.ModuleList, groups: Sequence[UnitGroup]) -> list[int]:
    owner = {id(sub): i for i, b in enumerate(blocks) for sub in b.modules()}
    out: list[int] = []
    for g in groups:
        ids = {owner.get(id(m)) for m in g.modules()}
        block = ids.pop() if len(ids) == 1 else None
        if block is None:
            raise ValueError(f"group {g.name!r}: expected all its modules inside one block of the stack, got "
                             f"modules {g.paths} outside or across blocks; use the whole-model capture")
        out.append(block)
    return out


def supports(model: nn.Module, groups: Sequence[UnitGroup]) -> bool:
    """Whether ``groups`` can be captured layer-sequentially on ``model``: it has a block stack
    (:func:`find_blocks`) and every group lies inside one block of it."""
    try:
        _block_of_groups(find_blocks(model, groups)[1], groups)
    except ValueError:
        return False
    return True


# ---- lazily loaded weights -------------------------------------------------------------------------------
class ShardedWeights:
    """Tensors of a Hugging Face model folder's safetensors files (``model.safetensors`` or the shards named
    by ``model.safetensors.index.json``), read one tensor at a time: :meth:`load` fills a module's meta
    tensors (a model built under ``accelerate.init_empty_weights()`` or ``torch.device("meta")``) in the
    dtype the module declares; :meth:`release` puts them back on the meta device. A name missing from the
    files is looked up without / with the model's ``base_model_prefix`` (e.g. "bert.")."""

    def __init__(self, folder: str | Path, base_model_prefix: str = ""):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        single = self.folder / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {k: self.folder / v for k, v in weight_map.items()}
        elif single.is_file():
            from safetensors import safe_open

            with safe_open(str(single), framework="pt") as f:
                self.files = {k: single for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        else:
            raise FileNotFoundError(f"weights: expected {index.name} or {single.name} in {self.folder}")
        self.prefix = base_model_prefix

    def _key(self, name: str) -> str:
        p = f"{self.prefix}." if self.prefix else ""
        for k in (name, name[len(p):] if p and name.startswith(p) else None, p + name if p else None):
            if k is not None and k in self.files:
                return k
        raise KeyError(f"weights: {name!r} is not in the safetensors files of {self.folder}")

    def tensor(self, name: str) -> Tensor:
        """One stored tensor by its module path (e.g. "model.layers.0.mlp.down_proj.weight")."""
        from safetensors import safe_open

        key = self._key(name)
        with safe_open(str(self.files[key]), framework="pt") as f:
            return f.get_tensor(key)

    def load(self, module: nn.Module, prefix: str, device: torch.device, recurse: bool = True) -> int:
        """Fill ``module``'s meta parameters and buffers (module path ``prefix``) from the files, on
        ``device``; returns how many tensors were read."""
        n = 0
        for mod_path, mod in (module.named_modules() if recurse else [("", module)]):
            where = ".".join(p for p in (prefix, mod_path) if p)
            for store, name, t, is_param in _tensors(mod):
                if not t.is_meta:
                    continue
                value = self.tensor(f"{where}.{name}" if where else name).to(device=device, dtype=t.dtype)
                if value.shape != t.shape:
                    raise ValueError(f"weights: {where}.{name}: expected shape {tuple(t.shape)}, got "
                                     f"{tuple(value.shape)} in {self.folder}")
                _put(store, name, value, is_param)
                n += 1
        return n

    @staticmethod
    def release(module: nn.Module, recurse: bool = True) -> None:
        """Put ``module``'s parameters and buffers back on the meta device (their memory is freed)."""
        for mod in (module.modules() if recurse else [module]):
            for store, name, t, is_param in _tensors(mod):
                if not t.is_meta:
                    _put(store, name, torch.empty_like(t, device="meta"), is_param)


def _tensors(mod: nn.Module) -> list[tuple[dict[str, Any], str, Tensor, bool]]:
    """(store, name, tensor, is a parameter) of a module's own parameters and buffers."""
    out = []
    for store, is_param in ((mod._parameters, True), (mod._buffers, False)):
        out += [(cast(dict[str, Any], store), n, t, is_param) for n, t in store.items() if t is not None]
    return out


def _put(store: dict[str, Any], name: str, value: Tensor, is_param: bool) -> None:
    store[name] = nn.Parameter(value, requires_grad=False) if is_param else value


def _relocate(store: dict[str, Any], name: str, t: Tensor, is_param: bool, device: torch.device) -> None:
    """Move a real tensor to ``device``; a parameter keeps its identity (``.data`` is swapped), so weights
    tied to it elsewhere (e.g. an LM head) stay tied."""
    if is_param:
        t.data = t.data.to(device)
    else:
        store[name] = t.to(device)


def _is_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in module.parameters()) or any(t.is_meta for t in module.buffers())


# ---- hidden states -----------------------------------------------------------------------------------------
class _HiddenStore:
    """One tensor per calibration batch, kept on the compute device, in CPU memory, or in memory-mapped
    files in a temporary folder (mapped only while read or written, so they stay out of the RSS)."""

    def __init__(self, where: str, device: torch.device, folder: str | Path | None):
        self.where, self.device = where, device
        self.items: dict[int, Any] = {}
        self.dir = Path(tempfile.mkdtemp(prefix="spectra-hidden-", dir=folder)) if where == "disk" else None

    def put(self, i: int, t: Tensor) -> None:
        t = t.detach()
        if self.where == "device":
            self.items[i] = t.to(self.device)
        elif self.where == "cpu":
            self.items[i] = t.to("cpu", copy=t.device.type == "cpu")
        else:
            assert self.dir is not None
            path = self.dir / f"{i}.bin"
            mm = torch.from_file(str(path), shared=True, size=t.numel(), dtype=t.dtype)
            mm.copy_(t.reshape(-1))
            del mm
            self.items[i] = (path, tuple(t.shape), t.dtype)

    def get(self, i: int) -> Tensor:
        v = self.items[i]
        if self.where != "disk":
            return cast(Tensor, v).to(self.device)
        path, shape, dtype = v
        mm = torch.from_file(str(path), shared=True, size=int(torch.Size(shape).numel()), dtype=dtype)
        return mm.view(shape).to(self.device, copy=True)

    def nbytes(self) -> int:
        tot = 0
        for v in self.items.values():
            if isinstance(v, Tensor):
                tot += v.numel() * v.element_size()
            else:
                tot += int(torch.Size(v[1]).numel()) * torch.empty((), dtype=v[2]).element_size()
        return tot

    def close(self) -> None:
        self.items.clear()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


def _move(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_move(o, device) for o in obj)
    if isinstance(obj, list):
        return [_move(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    return obj


_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


class _BlockInputsCaught(Exception):
    """Raised by the catcher hook to stop the forward at the first block."""


@contextmanager
def _prefix_on(model: nn.Module, blocks: nn.ModuleList, device: torch.device,
               weights: ShardedWeights | None) -> Iterator[None]:
    """While inside: every module outside the block stack that the forward calls is brought to ``device``
    on its first call (read from ``weights`` when its tensors are on the meta device); on exit moved back
    (or released to meta)."""
    inside = {id(m) for m in blocks.modules()}
    names = {id(m): p for p, m in model.named_modules()}
    moved: list[tuple[nn.Module, dict[str, torch.device], bool]] = []

    def pre(mod: nn.Module, _args: Any) -> None:
        if any(mod is m for m, _, _ in moved):
            return
        lazy = _is_meta(mod) and weights is not None
        before = {n: t.device for _, n, t, _ in _tensors(mod)}
        if lazy:
            assert weights is not None
            weights.load(mod, names[id(mod)], device, recurse=False)
        for store, n, t, is_param in _tensors(mod):
            if not t.is_meta and t.device != device:
                _relocate(store, n, t, is_param, device)
        moved.append((mod, before, lazy))

    handles = [m.register_forward_pre_hook(pre) for m in model.modules()
               if id(m) not in inside and (m._parameters or m._buffers)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for mod, before, lazy in moved:
            if lazy:
                ShardedWeights.release(mod, recurse=False)
                continue
            for store, n, t, is_param in _tensors(mod):
                if n in before and t.device != before[n]:
                    _relocate(store, n, t, is_param, before[n])


def _catch_inputs(model: nn.Module, first: nn.Module, calib: Sequence[Any], forward: ForwardFn,
                  device: torch.device, store: _HiddenStore) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    """Run each batch up to ``first``; store its hidden states; return each batch's other block arguments."""
    caught: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        kw = dict(kwargs)
        if args:
            hidden, rest = args[0], tuple(args[1:])
        else:
            hidden, rest = kw.pop("hidden_states"), ()
        for k in _CACHE_KWARGS:
            if k in kw:
                kw[k] = None
        if "use_cache" in kw:
            kw["use_cache"] = False
        store.put(len(caught), hidden)
        keep = store.device if store.where == "device" else torch.device("cpu")
        caught.append((_move(rest, keep), _move(kw, keep)))
        raise _BlockInputsCaught

    h = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for b in calib:
                try:
                    forward(model, _move(b, device))
                except _BlockInputsCaught:
                    continue
                raise ValueError("blocks: the forward finished without calling the first block; pass blocks='path' "
                                 "naming the stack the model's forward runs")
    finally:
        h.remove()
    return caught


def _token_mask(batch: Any) -> Tensor | None:
    if isinstance(batch, Mapping) and batch.get("attention_mask") is not None:
        m = torch.as_tensor(batch["attention_mask"])
        return m if m.dim() == 2 else None
    return None


# ---- the sweep ---------------------------------------------------------------------------------------------
def peak_memory(device: torch.device | None = None) -> dict[str, int | None]:
    """{"peak_rss_bytes": the process's peak resident set (getrusage), "peak_device_bytes": peak CUDA memory
    allocated on ``device`` (None off CUDA)}."""
    rss = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux
    dev = None
    if device is not None and device.type == "cuda":
        dev = int(torch.cuda.max_memory_allocated(device))
    return {"peak_rss_bytes": rss, "peak_device_bytes": dev}


@dataclass
class SequentialScores(GroupScores):
    """``rounds.GroupScores`` of a layer-sequential sweep, plus per block: its index, groups, seconds to load,
    capture (incl. the pass-through) and score, and its statistics' bytes; the hidden states' bytes, and the
    peak memory (``peak_memory``) at the end of the sweep."""

    blocks: list[dict[str, Any]] = field(default_factory=list)
    hidden_bytes: int = 0
    peak_rss_bytes: int = 0
    peak_device_bytes: int | None = None


def _default_capture(progress_on: bool, sketch_dim: int) -> BlockCapture:
    def run(block: nn.Module, groups: Sequence[UnitGroup], batches: Sequence[dict[str, Any]], forward: ForwardFn,
            mode: str, seed: int) -> dict[str, SignalStats]:
        return dict(capture(block, groups, batches, forward=forward, mode=mode, sketch_dim=sketch_dim, seed=seed,
                            progress=progress_on))
    return run


def replay_batches(n: int, masks: Sequence[Tensor | None], write: bool = True) -> list[dict[str, Any]]:
    """The batches ``capture`` iterates over when it runs one block: slot indices into the stored hidden
    states, the token mask (so padding tokens are dropped as in the whole-model capture), and whether the
    block's outputs replace its inputs (a capture that only re-reads a batch passes write=False)."""
    out = []
    for i in range(n):
        b: dict[str, Any] = {"_slot": i, "_write": write}
        if masks[i] is not None:
            b["attention_mask"] = masks[i]
        out.append(b)
    return out


def _replayer(inputs: Sequence[tuple[tuple[Any, ...], dict[str, Any]]], store: _HiddenStore,
              device: torch.device) -> ForwardFn:
    """forward(block, replay batch): runs ``block`` on the stored hidden states of the batch's slot with the
    batch's other recorded arguments; where the batch says ``_write``, the outputs replace the stored states."""
    def replay(block: nn.Module, b: dict[str, Any]) -> None:
        i = b["_slot"]
        args, kw = inputs[i]
        out = block(store.get(i), *_move(args, device), **_move(kw, device))
        if b["_write"]:
            store.put(i, out[0] if isinstance(out, (tuple, list)) else out)
    return replay


def _pass_through(block: nn.Module, batches: Sequence[dict[str, Any]], replay: ForwardFn) -> None:
    with torch.no_grad():
        for b in batches:
            replay(block, b)


def capture_and_score_sequential(model: nn.Module, groups: Sequence[UnitGroup], calib: Sequence[Any],
                                 cfg: PruneConfig, *, round_index: int = 0, forward: ForwardFn | None = None,
                                 loss_fn: Any = None, desc: str | None = None, blocks: str | None = None,
                                 device: str | torch.device | None = None, hidden_store: str = "cpu",
                                 hidden_dir: str | Path | None = None,
                                 weights: ShardedWeights | str | Path | None = None,
                                 mode: str | None = None, sketch_dim: int = 4096,
                                 block_capture: BlockCapture | None = None) -> SequentialScores:
    """``rounds.capture_and_score`` one block at a time (module docstring): the same {group: ScoreOutput}
    for ``groups`` (the round's groups, in the round's order: group i is seeded as the i-th), plus per-block
    timings and the peak memory.

    calib/forward: as for the whole-model capture (``forward(model, batch)`` runs a batch; the model's own
    forward reaches the first block). blocks: path of the block stack (default: ``find_blocks``). device:
    where blocks run (default: where the model's first real parameter is, else CPU); batches are moved
    there. hidden_store: "device", "cpu" or "disk" (memory-mapped files under ``hidden_dir``, default the
    system temporary folder). weights: a ``ShardedWeights`` or a model folder, for a model built on the meta
    device: each block's tensors are read when it is processed and released after (scoring only: the model
    stays on meta). mode: statistics mode (default ``rounds.stats_mode`` of the scorer, as the whole-model
    capture; "sketch" with ``sketch_dim`` for widths whose exact Grams do not fit). block_capture: replaces
    the capture of one block (``distributed`` sums statistics across ranks there); groups it returns no
    statistics for are not scored here. loss_fn is accepted for the signature of ``capture_and_score`` and not
    used: gradient scorers are refused (module docstring)."""
    if cfg.scorer in NEEDS_TAYLOR:
        raise ValueError(f"scorer {cfg.scorer!r} needs gradients of the model's loss, which cannot be captured one "
                         "block at a time; use the whole-model capture (sequential=False)")
    if hidden_store not in HIDDEN_STORES:
        raise ValueError(f"hidden_store: expected one of {HIDDEN_STORES}, got {hidden_store!r}")
    calib = list(calib)
    if not calib:
        raise ValueError("calib: expected at least one calibration batch, got none")
    groups = list(groups)
    if isinstance(weights, (str, Path)):
        weights = ShardedWeights(weights, getattr(model, "base_model_prefix", ""))
    if weights is not None and not isinstance(weights, ShardedWeights):
        raise TypeError(f"weights: expected a ShardedWeights, a model folder or None, got {type(weights).__name__}")
    path, stack = find_blocks(model, groups, blocks)
    dev = torch.device(device) if device is not None else next(
        (t.device for t in model.parameters() if not t.is_meta), torch.device("cpu"))
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    mode = mode or stats_mode(cfg.scorer, cfg.one_per_neighbourhood)
    fwd = forward or default_forward
    where = _block_of_groups(stack, groups)
    grab = block_capture or _default_capture(_progress_on(), sketch_dim)
    was_training = model.training
    model.eval()
    store = _HiddenStore(hidden_store, dev, hidden_dir)
    outs: dict[str, ScoreOutput] = {}
    per_group: dict[str, float] = {}
    records: list[dict[str, Any]] = []
    t_cap = t_score = 0.0
    try:
        t = time.perf_counter()
        with _prefix_on(model, stack, dev, weights):
            inputs = _catch_inputs(model, stack[0], calib, fwd, dev, store)
        t_cap += time.perf_counter() - t
        masks = [_token_mask(b) for b in calib]
        last = max(where, default=-1)

        replay = _replayer(inputs, store, dev)
        for bi in progress(range(last + 1), desc=desc or f"round {round_index + 1}: blocks"):
            block = stack[bi]
            t = time.perf_counter()
            lazy = weights is not None and _is_meta(block)
            if lazy:
                assert weights is not None
                weights.load(block, f"{path}.{bi}", dev)
            before = next((p.device for p in block.parameters()), dev)
            block.to(dev)
            t_load = time.perf_counter() - t
            mine = [(gi, g) for gi, g in enumerate(groups) if where[gi] == bi]
            t = time.perf_counter()
            batches = replay_batches(len(calib), masks)
            if mine:
                stats = grab(block, [g for _, g in mine], batches, replay, mode, mine[0][0])
            else:
                stats = {}
                _pass_through(block, batches, replay)
            t_c = time.perf_counter() - t
            stats_bytes = sum(s.nbytes() for s in stats.values())
            t = time.perf_counter()
            for gi, g in mine:
                if g.name not in stats:
                    continue
                o, sec = score_groups([g], Signals({g.name: stats.pop(g.name)}, {}), cfg, round_index=round_index,
                                      group_offset=gi, desc=f"block {bi}: scoring")
                outs.update(o)
                per_group.update(sec)
            t_s = time.perf_counter() - t
            del stats
            if lazy:
                ShardedWeights.release(block)
            elif before != dev:
                block.to(before)
            t_cap += t_load + t_c
            t_score += t_s
            records.append({"block": bi, "groups": [g.name for _, g in mine], "seconds_load": t_load,
                            "seconds_capture": t_c, "seconds_scorer": t_s, "stats_bytes": stats_bytes})
        hidden_bytes = store.nbytes()
    finally:
        store.close()
        model.train(was_training)
    peak = peak_memory(dev)
    ordered = {g.name: outs[g.name] for g in groups if g.name in outs}
    return SequentialScores(ordered, t_cap, t_score, {g: per_group[g] for g in ordered}, blocks=records,
                            hidden_bytes=hidden_bytes, peak_rss_bytes=int(peak["peak_rss_bytes"] or 0),
                            peak_device_bytes=peak["peak_device_bytes"])


def compensate_blocks(model: nn.Module, dense: nn.Module, groups: Sequence[UnitGroup],
                      dense_groups: Sequence[UnitGroup], removed: Mapping[str, Sequence[int]], calib: Sequence[Any],
                      *, forward: ForwardFn | None = None, damping: float = DAMPING, precision: str = "fp32",
                      device: str | torch.device | None = None, hidden_store: str = "cpu",
                      hidden_dir: str | Path | None = None) -> dict[str, Refit]:
    """Compensation (``compensate``, docs/algorithm.md section 7) one block at a time, as SparseGPT orders its
    reconstruction: the calibration batches run through the pruned ``model`` up to its first block; then for
    each block holding a pruned group, the same block of ``dense`` (the model before pruning: same structure,
    every unit) replays the pruned model's hidden states while ``compensate.compensation`` records each
    consumer's full input (removed units zeroed downstream) and refits every group of the block, the refits are
    written into ``model``'s block (``compensate.apply_refits``), and the compensated
    block's outputs become the next block's inputs. So each block is fit on the inputs the pruned and
    compensated blocks before it give (within a block the groups are fit together, on the block's pruned but
    not yet compensated values, as the one-pass capture fits all of them), and the consumer Grams of one block
    only are ever held: memory = the prefix modules + one block of each model + the hidden states + one
    block's Grams. ``model`` is changed in place, ``dense`` is left as it was.

    groups / dense_groups: the groups of ``model`` and of ``dense`` (same names); removed: {group name: unit
    indices into the dense width} (``compensate.dense_removals``); groups without removals are left alone.
    forward, device, hidden_store, hidden_dir: as for :func:`capture_and_score_sequential`. Returns {group:
    Refit} of every refit group."""
    if hidden_store not in HIDDEN_STORES:
        raise ValueError(f"hidden_store: expected one of {HIDDEN_STORES}, got {hidden_store!r}")
    calib = list(calib)
    if not calib:
        raise ValueError("calib: expected at least one calibration batch, got none")
    pruned = {g.name: g for g in groups}
    plan = [g for g in dense_groups if len(removed.get(g.name, ())) and g.name in pruned]
    missing = sorted(n for n in removed if len(removed[n]) and n not in {g.name for g in plan})
    if missing:
        raise ValueError(f"removed: expected groups of both models, got {missing} missing from groups or dense_groups")
    if not plan:
        return {}
    _, stack = find_blocks(model, [pruned[g.name] for g in plan])
    _, dstack = find_blocks(dense, plan)
    if len(stack) != len(dstack):
        raise ValueError(f"dense: expected the pruned model's {len(stack)} blocks, got {len(dstack)}")
    dev = torch.device(device) if device is not None else next(
        (t.device for t in model.parameters() if not t.is_meta), torch.device("cpu"))
    where = _block_of_groups(dstack, plan)
    fwd = forward or default_forward
    was_training = model.training
    model.eval()
    store = _HiddenStore(hidden_store, dev, hidden_dir)
    refits: dict[str, Refit] = {}
    try:
        with _prefix_on(model, stack, dev, None):
            inputs = _catch_inputs(model, stack[0], calib, fwd, dev, store)
        masks = [_token_mask(b) for b in calib]
        replay = _replayer(inputs, store, dev)
        for bi in progress(range(max(where) + 1), desc="compensation: blocks"):
            mine = [g for g, w in zip(plan, where, strict=True) if w == bi]
            block = stack[bi]
            before = next((p.device for p in block.parameters()), dev)
            block.to(dev)
            if mine:
                dblock = dstack[bi]
                dbefore = next((p.device for p in dblock.parameters()), dev)
                dblock.to(dev)
                mine_removed = {g.name: removed[g.name] for g in mine}
                got = compensation(dblock, mine, mine_removed, replay_batches(len(calib), masks, write=False),
                                   forward=replay, damping=damping, precision=precision)
                dblock.to(dbefore)
                apply_refits([pruned[n] for n in got], got, mine_removed)
                refits.update(got)
            _pass_through(block, replay_batches(len(calib), masks), replay)
            block.to(before)
    finally:
        store.close()
        model.train(was_training)
    return refits


def load_empty(folder: str | Path, model_class: Any = None, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A Hugging Face model of ``folder``'s config built under ``accelerate.init_empty_weights()`` (parameters
    on the meta device, buffers such as rotary frequencies computed for real), in ``dtype``, eval mode: pass
    it with ``weights=folder`` to :func:`capture_and_score_sequential`. model_class: default
    ``transformers.AutoModelForCausalLM`` for a config with a causal-LM architecture, else ``AutoModel``."""
    from accelerate import init_empty_weights  # type: ignore[import-untyped]
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(folder))
    if model_class is None:
        archs = getattr(config, "architectures", None) or []
        model_class = AutoModelForCausalLM if any(a.endswith("ForCausalLM") for a in archs) else AutoModel
    with init_empty_weights():
        model = model_class.from_config(config, dtype=dtype)
    return cast(nn.Module, model.eval())


__all__ = ["HIDDEN_STORES", "BlockCapture", "SequentialScores", "ShardedWeights", "capture_and_score_sequential",
           "compensate_blocks", "find_blocks", "load_empty", "peak_memory", "replay_batches", "supports"]
