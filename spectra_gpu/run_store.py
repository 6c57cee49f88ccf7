"""A pruning run's directory: creation and validation, checkpoints, resume, and the outputs of a finished
run, apart from the round logic (``rounds``) and the phases (``driver``).

Layout of DIR: ``checkpoint.safetensors`` while the run is in progress (kept after success only with
``keep_checkpoints``), then the pruned model (DIR/model via ``io.save_pruned``: safetensors + JSON, no
pickle) and ``report.json`` / ``report.md`` / plots (``report.write_report``); report.json's ``saved_model``
says whether DIR/model is a standard Hugging Face folder and which loader it needs (``io.loader_hint``).

A checkpoint is one safetensors file, replaced atomically: the typed :class:`RunState` as JSON in its
metadata, the model's ``state_dict`` and the fine-tune's optimiser state as tensors. Nothing is unpickled on
resume. The model's structure is not stored: the caller rebuilds it by re-applying the recorded per-round
removals to the freshly constructed model (rounds never update parameters, so that is exact), then loads
the saved state_dict (:func:`load_model_state`).

During a LoRA fine-tune (``FinetuneConfig.lora_rank``) the model is wrapped by adapters; its tensors are
stored under the plain model's names all the same (``finetune.plain_state_dict``: the frozen base weights,
loading strictly into the rebuilt plain model), and the adapter tensors travel in the fine-tune state (its
``"adapters"`` entry, stored as tensors like the optimiser's), which the fine-tune loads strictly after
re-wrapping the model. So the format is the same with and without LoRA.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from . import accounting, faults
from . import io as _io
from .finetune import plain_state_dict
from .report import atomic_replace, load_report, write_report
from .rounds import Baseline, RoundRecord

CHECKPOINT = "checkpoint.safetensors"
LEGACY_CHECKPOINT = "checkpoint.pt"  # pickled checkpoints of earlier versions: never loaded
FORMAT = "spectra-run-checkpoint"
FORMAT_VERSION = 3  # 3: the compensate phase and its fields
PHASES = ("prune", "compensate", "finetune", "done")


@dataclass
class RunState:
    """Everything a run has established so far, enough to resume it and to write its report.

    config: ``PruneConfig.to_dict()`` of the run. widths_before / kinds_by_group / min_keep: per group of the
    unpruned model. params_before / params_prunable_before: the EPR denominators. uniform_classes / round_to:
    the uniform-width classes and width multiple of the run (``rounds.Baseline``; empty / 1: free widths).
    phase: 'prune' (rounds to go), 'compensate' (rounds done, consumers not yet refit), 'finetune' (pruning and
    compensation done), 'done' (``report`` set). rounds: one record per completed round. compensation: per
    group, the refit's ``Refit.summary()`` (empty: not compensated); metric_after_compensation: the metric
    after it. numerical_repairs: {kind of repair: count} of the numerical warnings so far
    (``errors.counted_repairs``). finetune_state: the fine-tune's resume point ({epoch, step, optimizer, scheduler,
    history}; a LoRA fine-tune's also adapters) while it runs.
    """

    config: dict[str, Any]
    widths_before: dict[str, int]
    kinds_by_group: dict[str, str]
    min_keep: dict[str, int]
    params_before: int
    params_prunable_before: int
    uniform_classes: dict[str, str] = field(default_factory=dict)
    round_to: int = 1
    flops_before: float | None = None
    metric_before: float | None = None
    phase: str = "prune"
    rounds: list[RoundRecord] = field(default_factory=list)
    seconds_prior: float = 0.0
    seconds_scoring: float = 0.0
    seconds_capture: float = 0.0
    seconds_scorer: float = 0.0
    score_distributions: dict[str, Any] = field(default_factory=dict)
    eigenvalues: dict[str, list[float]] = field(default_factory=dict)
    params_after: int | None = None
    metric_after_prune: float | None = None
    compensation: dict[str, Any] = field(default_factory=dict)
    metric_after_compensation: float | None = None
    numerical_repairs: dict[str, int] = field(default_factory=dict)
    finetune_state: dict[str, Any] | None = None
    finetune_history: list[dict[str, Any]] = field(default_factory=list)
    metric_after_finetune: float | None = None
    report: dict[str, Any] | None = None

    @classmethod
    def start(cls, config: dict[str, Any], baseline: Baseline) -> RunState:
        return cls(config=config, widths_before=dict(baseline.widths), kinds_by_group=dict(baseline.kinds),
                   min_keep=dict(baseline.min_keep), params_before=baseline.epr.params_before,
                   params_prunable_before=baseline.epr.prunable_before, uniform_classes=dict(baseline.classes),
                   round_to=baseline.round_to)

    def baseline(self, epr_basis: str) -> Baseline:
        return Baseline(self.widths_before, self.kinds_by_group, self.min_keep,
                        accounting.EprBasis(self.params_before, self.params_prunable_before, epr_basis),
                        classes=dict(self.uniform_classes), round_to=self.round_to)

    def to_json(self) -> dict[str, Any]:
        """The state without ``finetune_state`` (which holds tensors), as JSON-able values."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "finetune_state"}
        d["rounds"] = [r.to_dict() for r in self.rounds]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any], finetune_state: dict[str, Any] | None) -> RunState:
        names = {f.name for f in fields(cls)} - {"finetune_state"}
        if not isinstance(d, dict) or set(d) != names:
            got = sorted(d) if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"expected the run-state fields {sorted(names)}, got {got}")
        if d["phase"] not in PHASES:
            raise ValueError(f"expected a phase in {PHASES}, got {d['phase']!r}")
        return cls(**{**d, "rounds": [RoundRecord.from_dict(r) for r in d["rounds"]]},
                   finetune_state=finetune_state)


# ---- tensors inside JSON ---------------------------------------------------------------------------------
def _encode(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """``obj`` as JSON with every tensor moved to ``tensors`` under a fresh key (a {"__tensor__": key}
    placeholder stays), tuples and non-string dict keys kept by tagging (an optimiser state dict has int
    keys and tuple betas)."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and "__tensor__" not in obj:
            return {k: _encode(v, prefix, tensors) for k, v in obj.items()}
        return {"__items__": [[_encode(k, prefix, tensors), _encode(v, prefix, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, prefix, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, prefix, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint: cannot store a {type(obj).__name__} (expected tensors, numbers, strings, "
                    f"lists, tuples, dicts)")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if set(obj) == {"__tensor__"}:
        return tensors[obj["__tensor__"]]
    if set(obj) == {"__tuple__"}:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if set(obj) == {"__items__"}:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _model_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The model's state_dict (under the plain model's names: ``finetune.plain_state_dict``) as separate CPU
    tensors (safetensors stores no shared memory) and {alias: stored name} for entries that are the same
    tensor (tied weights), stored once."""
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[tuple[Any, ...], str] = {}
    for name, t in plain_state_dict(model).items():  # the plain names, also while LoRA wraps the model
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()),
               t.dtype)
        if t.numel() and key in first:
            aliases[name] = first[key]
            continue
        first[key] = name
        out[name] = t.detach().cpu().contiguous().clone()
    return out, aliases


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a checkpoint's model tensors into ``model`` (strict: the model must have the checkpoint's
    structure, i.e. the recorded removals re-applied)."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError("resume: the checkpoint's tensors do not fit the model passed in (was it built with the "
                         f"same architecture as the run's?): {' '.join(str(e).split())[:400]}") from None


# ---- the directory ---------------------------------------------------------------------------------------
def _missing_root(out: Path) -> Path | None:
    """The outermost directory of ``out`` (itself or an ancestor) that does not exist yet, or None."""
    root = None
    for d in (out, *out.parents):
        if d.exists():
            break
        root = d
    return root


def prepare_run_dir(out: Path, resume: bool, *, resumable: bool = True) -> Path | None:
    """Create the run directory (clear OSError if impossible) and check what it holds: an existing run is
    refused unless ``resume``, and ``resume`` is refused where there is no run to continue. ``resumable``:
    whether the command can resume at all (``spectra score`` cannot, so its refusal does not suggest
    --resume). Returns the outermost directory this call created (``out`` or an ancestor), None if ``out``
    existed; a refusal leaves nothing created behind."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"out: expected a directory, got an existing file {str(out)!r}")
    if resume and not out.exists():
        raise ValueError(f"nothing to resume in {str(out)!r}: the directory does not exist; run without --resume "
                         "to start a new run")
    created = _missing_root(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"out: cannot create {str(out)!r} ({e.strerror})") from None
    try:
        _check_run_dir(out, resume, resumable)
    except BaseException:
        if created is not None:
            remove_empty_dirs(out, created)
        raise
    return created


def _check_run_dir(out: Path, resume: bool, resumable: bool) -> None:
    probe = out / ".spectra_write_test"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OSError(f"out: cannot write to {str(out)!r} ({e.strerror})") from None
    if (out / LEGACY_CHECKPOINT).exists():
        raise ValueError(f"out: {str(out)!r} holds a pickled checkpoint of an earlier spectra_gpu version "
                         f"({LEGACY_CHECKPOINT}), which is never loaded (unpickling runs code); delete it and "
                         "rerun without --resume, or choose another directory")
    has_run = (out / CHECKPOINT).exists() or (out / "report.json").exists()
    if resume and not has_run:
        raise ValueError(f"nothing to resume in {str(out)!r}: it holds no {CHECKPOINT} and no report.json; run "
                         "without --resume to start a new run")
    if not resume and has_run:
        how = "pass resume=True (--resume) to continue it, or choose" if resumable else "choose"
        raise ValueError(f"out: {str(out)!r} already holds a run; {how} another directory")


def remove_empty_dirs(out: Path, root: Path | None) -> None:
    """Remove ``out`` and its ancestors up to ``root`` (inclusive; what ``prepare_run_dir`` created) while they
    are empty; nothing when ``root`` is None (the directory existed before)."""
    if root is None:
        return
    for d in (out, *out.parents):
        try:
            d.rmdir()
        except OSError:  # not empty (someone else's files), or gone
            return
        if d == root:
            return


def _is_leftover(p: Path) -> bool:
    """A temp file of ``report.atomic_replace`` (``.<name>.<random>.tmp``) or a temp folder of
    ``io.save_pruned`` (``.model.<random>``, ``.model.old.<random>``) left by a killed process."""
    name = p.name
    if p.is_dir():
        return name.startswith(".model.")
    return name.startswith(".") and name.endswith(".tmp")


@dataclass
class Checkpoint:
    """A loaded checkpoint: the run state and the model's tensors (aliases of tied weights restored)."""

    state: RunState
    model_state: dict[str, torch.Tensor]


class RunStore:
    """The files of one run in ``out`` (see the module docstring); ``resume`` allows an existing run there."""

    def __init__(self, out: str | Path, *, resume: bool = False, keep_checkpoints: bool = False) -> None:
        self.out = Path(out)
        self.keep_checkpoints = bool(keep_checkpoints)
        self.resume = bool(resume)
        self.created = prepare_run_dir(self.out, self.resume)  # what :meth:`discard` may remove
        if self.resume:
            self.remove_leftovers()

    def remove_leftovers(self) -> list[Path]:
        """Remove the temp files and folders a killed process left in the directory (none of them is ever
        read: a write only counts once renamed into place); returns what was removed."""
        gone = [p for p in sorted(self.out.iterdir()) if _is_leftover(p)]
        for p in gone:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        return gone

    def discard(self) -> None:
        """Undo a new run that failed before it got anywhere (before its first round): remove the checkpoint
        and temp files this store wrote, then the directory (and the parents) it created, if nothing else is
        there. A resumed run's files are never touched (they belong to the run being continued)."""
        if self.resume or not self.out.is_dir():
            return
        self.checkpoint_path.unlink(missing_ok=True)
        self.remove_leftovers()
        remove_empty_dirs(self.out, self.created)

    def resume_note(self, state: RunState) -> str:
        """One line saying what a resume continues from, e.g. "resuming DIR: 3 pruning rounds done (EPR 0.2401,
        target 0.3); fine-tune epoch 1/2 done, continuing with epoch 2"."""
        cfg = state.config
        n = len(state.rounds)
        done = f"{n} pruning round{'s' if n != 1 else ''} done"
        if state.rounds:
            done += f" (EPR {state.rounds[-1].epr:.4f}, target {cfg.get('target')})"
        ft = cfg.get("finetune") or {}
        epochs = int(ft.get("epochs", 0))
        if state.phase == "prune":
            nxt = "continuing with round " + str(n + 1) if n else "starting the first round"
        elif state.phase == "compensate":
            nxt = "continuing with the compensation"
        elif state.phase == "finetune":
            e = int(state.finetune_state["epoch"]) if state.finetune_state else 0
            nxt = (f"fine-tune epoch {e}/{epochs} done, continuing with epoch {e + 1}" if e
                   else "starting the fine-tune" if epochs else "writing the outputs")
        else:
            nxt = "the run finished; writing the outputs that are missing"
        return f"resuming {self.out}: {done}; {nxt}"

    @property
    def checkpoint_path(self) -> Path:
        return self.out / CHECKPOINT

    def save_checkpoint(self, state: RunState, model: nn.Module) -> None:
        """Replace the checkpoint atomically with ``state`` and the model's current tensors."""
        tensors, aliases = _model_tensors(model)
        tensors = {f"model.{k}": v for k, v in tensors.items()}
        extra: dict[str, torch.Tensor] = {}
        ft = _encode(state.finetune_state, "finetune.", extra)
        metadata = {"format": FORMAT, "version": str(FORMAT_VERSION),
                    "state": json.dumps(state.to_json(), allow_nan=True), "finetune": json.dumps(ft),
                    "aliases": json.dumps(aliases)}
        atomic_replace(self.checkpoint_path, lambda tmp: save_file({**tensors, **extra}, str(tmp), metadata))

    def load_checkpoint(self) -> Checkpoint | None:
        """The checkpoint in the directory, or None if there is none. A damaged file raises ValueError naming
        it and what to do."""
        path = self.checkpoint_path
        if not path.exists():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT or meta.get("version") != str(FORMAT_VERSION):
                    raise ValueError(f"expected format {FORMAT} version {FORMAT_VERSION}, got "
                                     f"{meta.get('format')!r} version {meta.get('version')!r}")
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
            model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
            for alias, name in json.loads(meta["aliases"]).items():
                model_state[alias] = model_state[name]
            ft = _decode(json.loads(meta["finetune"]), tensors)
            state = RunState.from_json(json.loads(meta["state"]), ft)
        except Exception as e:  # any damage: one line naming the file and the way out
            raise ValueError(f"resume: checkpoint {path} is damaged or not a spectra_gpu checkpoint "
                             f"({type(e).__name__}: {' '.join(str(e).split())[:200]}); delete it and rerun without "
                             "--resume") from None
        return Checkpoint(state, model_state)

    def stored_report(self) -> dict[str, Any] | None:
        """report.json of a finished run in the directory, or None."""
        return load_report(self.out) if (self.out / "report.json").is_file() else None

    def write_outputs(self, model: nn.Module, report: dict[str, Any], *, save_model: bool, plots: bool,
                      tokenizer: Any = None, only_missing: bool = False) -> None:
        """The pruned model (DIR/model), then report.json/report.md/plots; ``only_missing``: only those not yet
        there (finishing a run whose outputs were interrupted). With the model saved, ``report['saved_model']``
        is set (in place) to {path, standard, loader}: whether plain transformers loads DIR/model, and the
        one-line loader hint of ``io.loader_hint`` (naming the folder DIR/model)."""
        if save_model and not (only_missing and self.model_dir.is_dir()):
            _io.save_pruned(model, self.model_dir, tokenizer=tokenizer)
            faults.point("write_model")
        if save_model and self.model_dir.is_dir():  # the hint names DIR/model, so the report is path-independent
            hint = _io.loader_hint(self.model_dir).replace(str(self.model_dir), "DIR/model")
            report["saved_model"] = {"path": self.model_dir.name, "standard": _io.is_standard(self.model_dir),
                                     "loader": hint}
        if not (only_missing and (self.out / "report.md").is_file()):
            write_report(self.out, report, plots=plots)

    @property
    def model_dir(self) -> Path:
        return self.out / "model"

    def finish(self) -> None:
        """The run succeeded: remove the checkpoint unless asked to keep it."""
        if not self.keep_checkpoints:
            self.checkpoint_path.unlink(missing_ok=True)


__all__ = ["CHECKPOINT", "Checkpoint", "RunState", "RunStore", "load_model_state", "prepare_run_dir",
           "remove_empty_dirs"]
