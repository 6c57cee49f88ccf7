"""Iterative pruning to an exact effective-parameter-reduction target, one recovery fine-tune, resumable
(docs/algorithm.md section 7).

The phases of :func:`prune`: start (discover the groups, fix the baseline: original widths, min-keep, EPR
denominators; fail fast if the target is out of reach; metric before), rounds (``rounds.prune_round`` until
the EPR reaches the target; the groups are re-discovered once after each round's removals; the capture is
layer-sequential and / or spread over the ranks of ``torchrun`` where the config says so, ``capture_step``),
compensation (``compensate``: the consumers of pruned groups refit on the dense model's calibration outputs,
where ``PruneConfig.compensate_for`` says so), one recovery fine-tune (``finetune.finetune``; distillation
from the dense model with ``loss="kd"``; LoRA adapters merged into the weights at its end with ``lora_rank``),
report. The run state is a typed :class:`~spectra_gpu.run_store.RunState`;
with ``out_dir`` it is checkpointed after the start, after every round and every fine-tune epoch
(``run_store.RunStore``), so a run killed at any point resumes from its last completed round or epoch and
ends with the same report (seeded scorers, deterministic data order; only the timings differ). Under
``torchrun`` every rank runs the same run and takes the same decisions; only rank 0 writes files.

Per-round records in the report: see ``rounds.RoundRecord``.
"""

from __future__ import annotations

import copy
import functools
import json
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import accounting, faults
from . import sequential as _sequential
from . import units as _units
from ._progress import Bar
from ._progress import enabled as _progress_on
from .compensate import apply_refits, compensation, dense_removals
from .config import EPR_BASES, HEAD_K, KINDS, PruneConfig, TargetUnreachableError
from .distributed import capture_and_score_distributed, world
from .errors import NumericalWarning, counted_repairs
from .finetune import check_batches_fn, check_lora, finetune, lora_summary
from .report import epr_statement, provenance, score_summary, torch_save, write_json
from .rounds import (
    Baseline,
    CaptureStep,
    RoundRecord,
    apply_removals,
    check_scorer_options,
    head_counts,
    min_keep,
    params_at_floor,
    planned_rounds,
    prune_round,
    recalibrate_bn,
)
from .run_store import CHECKPOINT, RunState, RunStore, load_model_state, prepare_run_dir
from .scorers import NEEDS_TAYLOR, ScoreOutput
from .units import UnitGroup

GroupsFn = Callable[[nn.Module], Sequence[UnitGroup]]
ForwardFn = Callable[[nn.Module, Any], Any]
LossFn = Callable[[nn.Module, Any], torch.Tensor]


@dataclass
class PruneResult:
    """The pruned (and fine-tuned) model and its report (the content of report.json)."""

    model: nn.Module
    report: dict[str, Any]


def discover(model: nn.Module, cfg: PruneConfig, groups_fn: GroupsFn | None = None) -> list[UnitGroup]:
    """The groups of ``cfg.kinds``: ``groups_fn(model)`` if given, else ``units.discover_groups``; names must
    be unique."""
    gs = list(groups_fn(model) if groups_fn is not None else _units.discover_groups(model, cfg.kinds))
    gs = [g for g in gs if g.kind in cfg.kinds]
    names = [g.name for g in gs]
    if len(set(names)) != len(names):
        raise ValueError(f"groups: expected unique group names, got {names}")
    return gs


def capture_step_for(model: nn.Module, groups: Sequence[UnitGroup], cfg: PruneConfig) -> tuple[CaptureStep, bool]:
    """(round step 1 with ``rounds.capture_and_score``'s contract, whether it is layer-sequential) for a run of
    ``cfg`` on ``groups``: layer-sequential where ``PruneConfig.sequential_for`` says so (when left to the
    default, only where the model has a block stack holding every group: ``sequential.supports``), and spread
    over the ranks of the default process group when there are several (``distributed``)."""
    seq = cfg.sequential_for(g.arch for g in groups)
    if seq and cfg.sequential is None:
        seq = _sequential.supports(model, groups)
    if seq:
        return functools.partial(capture_and_score_distributed, sequential=True, hidden_store=cfg.hidden_store), True
    return capture_and_score_distributed, False


def target_on_bases(epr: accounting.EprBasis, target: float) -> dict[str, float]:
    """{"total", "prunable"}: the share of all parameters and of the prunable ones that a ``target`` EPR on
    ``epr``'s basis removes."""
    removed = target * epr.denominator
    return {"total": removed / epr.params_before,
            "prunable": removed / epr.prunable_before if epr.prunable_before else 0.0}


def _json_form(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists), to compare configurations."""
    return json.loads(json.dumps(obj, default=str))


class _Run:
    """One pruning run; see :func:`prune`."""

    def __init__(self, model: nn.Module, calib: Sequence[Any], cfg: PruneConfig, *, forward: ForwardFn | None,
                 out_dir: str | Path | None, resume: bool, loss_fn: LossFn | None,
                 evaluate: Callable[[nn.Module], float] | None, metric_name: str,
                 train_batches: Callable[[int], Iterable[Any]] | None, groups: GroupsFn | None,
                 callback: Callable[[str, dict[str, Any]], None] | None, meta: dict[str, Any] | None, plots: bool,
                 save_model: bool, tokenizer: Any, keep_checkpoints: bool, inplace: bool = True) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(cfg, PruneConfig):
            raise TypeError(f"config: expected a PruneConfig, got {type(cfg).__name__}")
        if isinstance(calib, (torch.Tensor, dict)) or not isinstance(calib, Iterable):
            raise TypeError(f"calib: expected a sequence of batches (tensors, (inputs, labels) pairs or dicts), got "
                            f"a {type(calib).__name__}; split a tensor into batches, e.g. list(x.split(64))")
        calib = list(calib)
        if not calib:
            raise ValueError("calib: expected at least one calibration batch, got none")
        if cfg.scorer in NEEDS_TAYLOR and loss_fn is None:
            raise ValueError(f"scorer {cfg.scorer!r} needs gradients: pass loss_fn(model, batch) -> loss")
        for name, fn in (("loss_fn", loss_fn), ("evaluate", evaluate), ("forward", forward), ("groups", groups),
                         ("callback", callback)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name}: expected a callable or None, got a {type(fn).__name__}")
        if train_batches is not None:
            check_batches_fn(train_batches)
        if cfg.finetune.epochs > 0 and train_batches is not None and loss_fn is None:
            raise ValueError("fine-tune needs loss_fn(model, batch) -> loss next to train_batches")
        if cfg.finetune.epochs > 0 and train_batches is not None:
            check_lora(model, cfg.finetune)  # before any round: peft installed, nn.Linear layers to adapt
        if cfg.finetune.epochs > 0 and train_batches is None:
            warnings.warn(f"no train_batches: the recovery fine-tune (epochs={cfg.finetune.epochs}) is skipped; pass "
                          "train_batches=lambda epoch: batches, or FinetuneConfig(epochs=0) to say so",
                          UserWarning, stacklevel=3)
        if not inplace:
            model = copy.deepcopy(model)
        self.model, self.calib, self.cfg = model, calib, cfg
        self.loss_fn, self.evaluate, self.metric_name = loss_fn, evaluate, metric_name
        self.train_batches, self.groups_fn, self.callback = train_batches, groups, callback
        self.forward = forward
        self.meta = dict(meta or {})
        self.plots, self.save_model, self.tokenizer = plots, save_model, tokenizer
        rank, size = world()
        if resume and size > 1:
            raise ValueError(f"resume: expected one process (resume a run without torchrun), got {size} ranks")
        self.store = (RunStore(out_dir, resume=resume, keep_checkpoints=keep_checkpoints)
                      if out_dir is not None and rank == 0 else None)  # under torchrun only rank 0 writes
        self.state: RunState | None = None
        self.groups: list[UnitGroup] = []
        self.dense: nn.Module | None = None  # a copy of the unpruned model, for compensation and distillation
        # round step 1 and whether it is layer-sequential, chosen with the groups (``_choose_capture``)
        self.capture_step: CaptureStep = capture_and_score_distributed
        self.sequential = False
        self.finished: dict[str, Any] | None = None  # the stored report of a finished run being resumed
        self.resumed = False  # continued from a checkpoint
        if self.store is not None and resume:
            self._resume()

    # -- resume --
    def _check_config(self, stored: Any) -> None:
        old, new = _json_form(stored), _json_form(self.cfg.to_dict())
        if old != new:
            where = self.store.out if self.store is not None else None
            if isinstance(old, dict):
                diff = ", ".join(f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in sorted(set(old) | set(new))
                                 if old.get(k) != new.get(k))
            else:
                diff = f"stored {old!r}"
            raise ValueError(f"resume: the run in {where} used a different configuration ({diff}); start a new run "
                             "directory or pass the same options")

    def _replay(self, widths_before: dict[str, int], rounds: Sequence[dict[str, Any] | RoundRecord],
                phase: str) -> None:
        """Rebuild the run's structure on the freshly constructed model: re-apply each round's removals."""
        self.groups = self._discover()
        got = {g.name: int(g.size) for g in self.groups}
        if got != widths_before:
            raise ValueError(f"resume: expected the model as constructed before pruning (group widths "
                             f"{widths_before}), got {got}")
        self._keep_dense(phase)
        for rec in rounds:
            r = rec.to_dict() if isinstance(rec, RoundRecord) else rec
            apply_removals(self.model, self.groups, r["removed_units"])
            self.groups = self._discover()

    def _resume(self) -> None:
        assert self.store is not None
        ck = self.store.load_checkpoint()
        if ck is not None:
            self._check_config(ck.state.config)
            self._replay(ck.state.widths_before, ck.state.rounds, ck.state.phase)
            load_model_state(self.model, ck.model_state)
            self.state = ck.state
            self.resumed = True
            if self.meta.get("command") is not None or _progress_on():  # the CLI, or a terminal: say so
                print(self.store.resume_note(ck.state), file=sys.stderr)
            return
        rep = self.store.stored_report()
        if rep is None:
            return  # nothing to resume: a new run
        if rep.get("kind") == "score":
            raise ValueError(f"resume: {self.store.out} holds a `spectra score` run, not a pruning run; choose "
                             "another directory")
        self._check_config(rep.get("config"))
        self._replay(rep["widths_before"], rep["rounds"], "done")
        if self.store.model_dir.is_dir():
            from .io import load_pruned

            load_pruned(self.store.model_dir, model=self.model)
        elif rep.get("finetune_history") or self.cfg.recalibrate_bn:
            raise ValueError(f"resume: {self.store.out} holds a finished run whose final weights were not saved "
                             "(no DIR/model, no checkpoint kept); its report is report.json there")
        self.finished = rep

    # -- helpers --
    def _discover(self) -> list[UnitGroup]:
        return discover(self.model, self.cfg, self.groups_fn)

    def _archs(self) -> list[str]:
        return [g.arch for g in self.groups]

    def _compensates(self) -> bool:
        return self.cfg.compensate_for(self._archs())

    def _keep_dense(self, phase: str) -> None:
        """Choose the capture, and copy the model (still unpruned, ``self.groups`` discovered on it) when the
        phases from ``phase`` on need the dense model: compensation, distillation."""
        self._choose_capture()
        needed = ((phase in ("prune", "compensate") and self._compensates())
                  or (phase != "done" and self.cfg.finetune.loss == "kd"))
        if self.dense is None and needed:
            self.dense = copy.deepcopy(self.model).eval()
            for p in self.dense.parameters():
                p.requires_grad_(False)

    def _choose_capture(self) -> None:
        self.capture_step, self.sequential = capture_step_for(self.model, self.groups, self.cfg)

    def _save(self) -> None:
        if self.store is not None and self.state is not None:
            self.store.save_checkpoint(self.state, self.model)

    def _event(self, name: str, **info: Any) -> None:
        if self.callback is not None:
            self.callback(name, info)

    def _flops(self) -> float | None:
        """Forward FLOPs per sample (image or token) of ``meta['flops_input']``, if given."""
        x = self.meta.get("flops_input")
        return None if x is None else float(accounting.flops(self.model, x, forward=self.forward))

    def _metric(self) -> float | None:
        if self.evaluate is None:
            return None
        self.model.eval()
        with torch.no_grad():
            return float(self.evaluate(self.model))

    def _write_outputs(self, report: dict[str, Any], only_missing: bool = False) -> None:
        if self.store is not None:
            self.store.write_outputs(self.model, report, save_model=self.save_model, plots=self.plots,
                                     tokenizer=self.tokenizer, only_missing=only_missing)
            self.store.finish()

    # -- phases --
    def run(self) -> PruneResult:
        if self.finished is not None:  # a finished run: (re)write missing files, change nothing
            self._write_outputs(self.finished, only_missing=True)
            return PruneResult(self.model, self.finished)
        try:
            return self._phases()
        except BaseException:
            if self.store is not None and not self.resumed and (self.state is None or not self.state.rounds):
                self.store.discard()  # a new run that failed before its first round leaves nothing behind
            raise

    def _phases(self) -> PruneResult:
        if self.state is None:
            self.state = self._start()
            self._save()
        st = self.state
        if st.phase == "done":
            assert st.report is not None
            self._write_outputs(st.report, only_missing=True)
            return PruneResult(self.model, st.report)
        t0 = time.perf_counter()
        before = st.seconds_prior
        try:
            with counted_repairs(st.numerical_repairs):  # one summary line per run, counts in the report
                if st.phase == "prune":
                    self._prune_rounds(st, t0, before)
                if st.phase == "compensate":
                    self._compensate(st, t0, before)
                if st.phase == "finetune":
                    self._finetune(st, t0, before)
        finally:
            st.seconds_prior = before + time.perf_counter() - t0
        if st.numerical_repairs:
            warnings.warn(f"{sum(st.numerical_repairs.values())} numerical repairs during the run "
                          f"({len(st.numerical_repairs)} kinds; counts in report.json 'numerical_repairs')",
                          NumericalWarning, stacklevel=4)
        st.phase = "done"
        st.report = self._report(st)
        self._save()  # so a crash while writing the outputs finishes them on resume
        self._write_outputs(st.report)
        self._event("done", report=st.report)
        return PruneResult(self.model, st.report)

    def _start(self) -> RunState:
        cfg = self.cfg
        self.groups = self._discover()
        if not self.groups:
            raise ValueError(f"model: found no prunable groups of kinds {cfg.kinds}")
        check_scorer_options(cfg, self.groups)
        self._keep_dense("prune")
        base = Baseline.of(self.model, self.groups, cfg)
        floor = params_at_floor(self.model, self.groups, base.min_keep)
        if floor > base.epr.budget(cfg.target):
            raise TargetUnreachableError(
                f"target: EPR {cfg.target} ({cfg.epr_basis} basis) is out of reach: cutting every group to its "
                f"min-keep gives at most {base.epr(floor):.4f}; lower the target or prune more unit kinds "
                f"(now {list(cfg.kinds)})")
        bases = target_on_bases(base.epr, cfg.target)
        if max(bases.values()) > 1.5 * min(bases.values()):
            warnings.warn(f"target: EPR {cfg.target} on the {cfg.epr_basis} basis removes {bases['total']:.3f} of all "
                          f"parameters = {bases['prunable']:.3f} of the prunable ones (embeddings, LM head and "
                          f"classifier are {1 - base.epr.prunable_before / base.epr.params_before:.0%} of the model "
                          "and are not pruned); choose --epr-basis to say which you mean", UserWarning, stacklevel=5)
        st = RunState.start(cfg.to_dict(), base)
        st.flops_before = self._flops()
        st.metric_before = self._metric()
        return st

    def _prune_rounds(self, st: RunState, t0: float, before: float) -> None:
        cfg = self.cfg
        base = st.baseline(cfg.epr_basis)
        budget = base.epr.budget(cfg.target)
        done = len(st.rounds)
        bar = Bar(done + planned_rounds(self.model, self.groups, cfg, base, done),
                  desc=f"pruning ({cfg.scorer}) to EPR {cfg.target}", unit="round")
        bar.update(done)
        stopped = bool(st.rounds) and st.rounds[-1].trimmed
        try:
            for rnd in range(done, cfg.max_rounds):
                p_now = accounting.count_params(self.model)
                if p_now <= budget or stopped:
                    break
                self._event("round_start", round=rnd + 1, params=p_now)
                rec = prune_round(self.model, self.groups, cfg, calib=self.calib, baseline=base, round_index=rnd,
                                  forward=self.forward, loss_fn=self.loss_fn, capture_step=self.capture_step)
                if not rec.removed:  # uniform widths: the last round already sits nearest the target
                    break
                self.groups = self._discover()  # the structure changed: discover once
                stopped = rec.trimmed
                if rnd == 0:
                    st.score_distributions = {g: score_summary(o.scores) for g, o in rec.outputs.items()}
                    st.eigenvalues = {g: o.extra["eigenvalues"].tolist() for g, o in rec.outputs.items()
                                      if "eigenvalues" in o.extra}
                st.seconds_scoring += rec.seconds_scoring
                st.seconds_capture += rec.seconds_capture
                st.seconds_scorer += rec.seconds_scorer
                if cfg.track_metric:
                    rec.set_metric(self._metric())
                st.rounds.append(rec)
                st.seconds_prior = before + time.perf_counter() - t0
                self._save()
                faults.point("round")
                self._event("round_end", **rec.to_dict())
                bar.update()
                if not stopped:
                    bar.set_total(rnd + 1 + planned_rounds(self.model, self.groups, cfg, base, rnd + 1))
            else:
                p = accounting.count_params(self.model)
                if p > budget and not stopped:
                    raise RuntimeError(f"pruning stopped after max_rounds={cfg.max_rounds} rounds at EPR "
                                       f"{base.epr(p):.4f} < target {cfg.target}")
            bar.set_total(len(st.rounds))
        finally:
            bar.close()
        st.params_after = accounting.count_params(self.model)
        st.metric_after_prune = self._metric()
        st.phase = "compensate"
        st.seconds_prior = before + time.perf_counter() - t0
        self._save()

    def _compensate(self, st: RunState, t0: float, before: float) -> None:
        """Refit the consumers of every pruned group on the dense model's calibration statistics (the dense
        copy holds every unit), then the metric after it: block by block on the pruned model's hidden states
        when the run's capture is layer-sequential (``sequential.compensate_blocks``), else in one pass
        (``compensate.compensation``)."""
        if self._compensates():
            assert self.dense is not None  # kept at the start / on resume
            removed = dense_removals(st.widths_before, [r.removed_units for r in st.rounds])
            dense_groups = [g for g in discover(self.dense, self.cfg, self.groups_fn) if g.name in removed]
            if self.sequential:
                refits = _sequential.compensate_blocks(
                    self.model, self.dense, self.groups, dense_groups, removed, self.calib, forward=self.forward,
                    damping=self.cfg.compensate_damping, hidden_store=self.cfg.hidden_store)
            else:
                refits = compensation(self.dense, dense_groups, removed, self.calib, forward=self.forward,
                                      damping=self.cfg.compensate_damping, progress=_progress_on())
                apply_refits(self.groups, refits, removed)
            st.compensation = {g: rf.summary() for g, rf in refits.items()}
            st.metric_after_compensation = self._metric()
        if self.cfg.finetune.loss != "kd":
            self.dense = None
        st.phase = "finetune"
        st.seconds_prior = before + time.perf_counter() - t0
        self._save()

    def _finetune(self, st: RunState, t0: float, before: float) -> None:
        cfg = self.cfg
        if cfg.finetune.epochs > 0 and self.train_batches is not None:
            def on_epoch(ft: dict[str, Any]) -> None:
                st.finetune_state = ft
                st.seconds_prior = before + time.perf_counter() - t0
                self._save()
                self._event("finetune_epoch", epoch=ft["epoch"], loss=ft["history"][-1]["loss"])

            assert self.loss_fn is not None  # checked in __init__
            st.finetune_history = finetune(self.model, self.train_batches, self.loss_fn, cfg.finetune,
                                           seed=cfg.seed, state=st.finetune_state, on_epoch_end=on_epoch,
                                           teacher=self.dense)
            st.finetune_state = None  # the optimiser state (2x the model for Adam) is not needed any more
            st.metric_after_finetune = self._metric()
        else:
            st.finetune_history = []
            st.metric_after_finetune = None
        self.dense = None

    def _report(self, st: RunState) -> dict[str, Any]:
        cfg = self.cfg
        base = st.baseline(cfg.epr_basis)
        epr = base.epr
        pa = st.params_after
        assert pa is not None
        device = next((str(p.device) for p in self.model.parameters()), "cpu")
        return {
            **{k: v for k, v in self.meta.items() if k not in ("flops_input", "command")},
            "model": self.meta.get("model", type(self.model).__name__), "scorer": cfg.scorer,
            "target": cfg.target, "epr_basis": cfg.epr_basis, "target_on_bases": target_on_bases(epr, cfg.target),
            "epr": epr(pa),
            "epr_total": epr.total(pa), "epr_prunable": epr.prunable(pa),
            "params_before": st.params_before, "params_after": pa,
            "params_prunable_before": st.params_prunable_before,
            "flops_before": st.flops_before, "flops_after": self._flops(),
            "metric_name": self.metric_name, "metric_before": st.metric_before,
            "metric_after_prune": st.metric_after_prune,
            "metric_after_compensation": st.metric_after_compensation, "compensation": st.compensation,
            "metric_after_finetune": st.metric_after_finetune, "sequential": self.sequential,
            "seconds_scoring": st.seconds_scoring, "seconds_capture": st.seconds_capture,
            "seconds_scorer": st.seconds_scorer, "seconds_total": st.seconds_prior,
            "rounds": [r.to_dict() for r in st.rounds], "widths_before": st.widths_before,
            "widths_after": {g.name: int(g.size) for g in self.groups},
            "kinds_by_group": st.kinds_by_group, "min_keep": st.min_keep,
            "finetune_history": st.finetune_history,
            "finetune_lora": lora_summary(self.model, cfg.finetune) if st.finetune_history else None,
            "score_distributions": st.score_distributions,
            "numerical_repairs": st.numerical_repairs,
            "eigenvalues": st.eigenvalues, "calibration_batches": len(self.calib), "config": cfg.to_dict(),
            "uniform_widths": base.uniform, "round_to": base.round_to,
            "epr_statement": epr_statement(cfg.target, epr(pa), cfg.epr_basis, base.uniform, base.round_to),
            "environment": {**provenance(device=device, command=self.meta.get("command"), resumed=self.resumed),
                            "ranks": world()[1], **_sequential.peak_memory(torch.device(device))},
        }


def prune(model: nn.Module, calib: Sequence[Any], config: PruneConfig | None = None, *,
          forward: ForwardFn | None = None, out_dir: str | Path | None = None, resume: bool = False,
          loss_fn: LossFn | None = None, evaluate: Callable[[nn.Module], float] | None = None,
          metric_name: str = "metric", train_batches: Callable[[int], Iterable[Any]] | None = None,
          groups: GroupsFn | None = None, callback: Callable[[str, dict[str, Any]], None] | None = None,
          meta: dict[str, Any] | None = None, plots: bool = True, save_model: bool = True, tokenizer: Any = None,
          keep_checkpoints: bool = False, inplace: bool = True) -> PruneResult:
    """Prune ``model`` (in place unless ``inplace=False``: then a deep copy is pruned and ``model`` is left as it
    was, at twice the memory), iteratively, to ``config.target`` EPR; fine-tune once; return the model and
    its report (the content of report.json).

    model: the unpruned model (on resume: freshly constructed again, as for the first run; the run's
    structure and weights are restored into it). calib: calibration batches (as for ``capture``: tensors,
    (inputs, labels) pairs or Hugging Face dicts; the same batches go to ``loss_fn`` for gradient scorers and
    to BatchNorm recalibration). config: default ``PruneConfig()``.

    forward(model, batch): how a batch runs (default ``capture.default_forward``). loss_fn(model, batch) ->
    scalar loss: needed by gradient scorers (Taylor) and by the fine-tune. evaluate(model) -> float, named
    ``metric_name``: measured before pruning, after every round (``config.track_metric``), after pruning and
    after the fine-tune. train_batches(epoch) -> the epoch's batches for the fine-tune (none: no fine-tune,
    with a warning when ``config.finetune.epochs > 0``). groups(model) -> unit groups (default
    ``units.discover_groups(model, config.kinds)``), called once at the start and once after each round's
    removals. callback(event, info) on round_start / round_end /
    finetune_epoch / done. meta: extra report fields (e.g. model and data names; ``flops_input``, a batch,
    for FLOP counts before and after).

    Widths: for models made of Hugging Face transformer layers every layer keeps the same number of FFN
    neurons (a multiple of ``config.round_to``) and of query / KV heads (``PruneConfig.uniform_widths``), so
    DIR/model gets a standard config.json; the EPR then lands on the achievable value nearest the target
    (report: ``epr`` beside ``target``, ``epr_statement``). Plain modules, 'global' allocation or
    ``uniform_widths=False``: per-layer widths and an EPR at the target with an overshoot below one unit.

    out_dir: the run directory (``run_store``): checkpoints while running (removed after success unless
    ``keep_checkpoints``), then, with ``save_model``, the pruned model (DIR/model via ``io.save_pruned`` with
    ``tokenizer``; report.json's ``saved_model`` names its loader) and report.json (with ``environment``:
    package versions, git commit, device, threads, timestamp, command line) / report.md / plots (``plots``).
    An existing run there is refused unless ``resume``: then an interrupted run continues from its last
    checkpoint, and a finished one returns its stored report (the model rebuilt from the recorded removals
    and the saved weights).

    Raises TargetUnreachableError before any round when min-keep makes the target unreachable, ValueError /
    TypeError on bad arguments.
    """
    return _Run(model, calib, config or PruneConfig(), forward=forward, out_dir=out_dir, resume=resume,
                loss_fn=loss_fn, evaluate=evaluate, metric_name=metric_name, train_batches=train_batches,
                groups=groups, callback=callback, meta=meta, plots=plots, save_model=save_model,
                tokenizer=tokenizer, keep_checkpoints=keep_checkpoints, inplace=inplace).run()


def score_model(model: nn.Module, calib: Sequence[Any], *, scorer: str = "spectral",
                kinds: Sequence[str] = KINDS, options: dict[str, Any] | None = None,
                loss_fn: LossFn | None = None, groups: GroupsFn | None = None,
                forward: ForwardFn | None = None, seed: int = 0, sequential: bool | None = None,
                hidden_store: str = "cpu") -> tuple[dict[str, ScoreOutput], dict[str, Any]]:
    """Score every group of >= 3 units once, as the first round of a run would (its capture step:
    ``capture_step_for``; ``sequential`` and ``hidden_store`` as in ``PruneConfig``), without removing
    anything: ({group: ScoreOutput}, {"groups": {group: kind, n, dead, lambda_1, seconds}, "seconds_capture",
    "seconds_scoring", "sequential", "ranks"}). Under torchrun every rank gets every group's scores."""
    cfg = PruneConfig(scorer=scorer, kinds=tuple(kinds), scorer_options=dict(options or {}), seed=seed,
                      sequential=sequential, hidden_store=hidden_store)
    if scorer in NEEDS_TAYLOR and loss_fn is None:
        raise ValueError(f"scorer {scorer!r} needs gradients: pass loss_fn(model, batch) -> loss")
    gs = [g for g in discover(model, cfg, groups) if g.size >= 3]
    if not gs:
        raise ValueError(f"model: found no groups of >= 3 units of kinds {list(cfg.kinds)}")
    check_scorer_options(cfg, gs)
    step, seq = capture_step_for(model, gs, cfg)
    sc = step(model, gs, list(calib), cfg, forward=forward, loss_fn=loss_fn, desc=f"scoring ({scorer})")
    info: dict[str, Any] = {}
    for g in gs:
        o = sc.outputs[g.name]
        ev = o.extra.get("eigenvalues")
        info[g.name] = {"kind": g.kind, "n": int(g.size), "dead": int((o.scores == -float("inf")).sum()),
                        "lambda_1": float(ev[0]) if ev is not None and len(ev) else None,
                        "seconds": sc.seconds_per_group[g.name]}
    return sc.outputs, {"groups": info, "seconds_capture": sc.seconds_capture,
                        "seconds_scoring": sc.seconds_capture + sum(v["seconds"] for v in info.values()),
                        "sequential": seq, "ranks": world()[1]}


def write_scores(out_dir: str | Path, outs: dict[str, ScoreOutput], summary: dict[str, Any],
                 meta: dict[str, Any]) -> dict[str, Any]:
    """Save scores per group (out_dir/scores/<group>.pt) and a score report (report.json/md + plots)."""
    from .report import plot_report, score_markdown, write_text

    out = Path(out_dir)
    prepare_run_dir(out, resume=False, resumable=False)
    (out / "scores").mkdir(exist_ok=True)
    for g, o in outs.items():
        torch_save(out / "scores" / f"{_safe(g)}.pt",
                   {"group": g, "scores": o.scores, "neighbors": o.neighbors,
                    "eigenvalues": o.extra.get("eigenvalues")})
    rep = {"kind": "score", **meta, **summary,
           "score_distributions": {g: score_summary(o.scores) for g, o in outs.items()},
           "eigenvalues": {g: o.extra["eigenvalues"].tolist() for g, o in outs.items() if "eigenvalues" in o.extra}}
    write_json(out / "report.json", rep)
    made, note = plot_report(rep, out)
    write_text(out / "report.md", score_markdown(rep, made, note))
    return rep


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


__all__ = ["CHECKPOINT", "EPR_BASES", "HEAD_K", "KINDS", "PruneConfig", "PruneResult", "TargetUnreachableError",
           "discover", "head_counts", "min_keep", "prune", "recalibrate_bn", "score_model", "write_scores"]
