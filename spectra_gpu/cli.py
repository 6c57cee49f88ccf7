"""The ``spectra`` command line (also ``python -m spectra_gpu``): demo, prune, score, report, env.

Each subcommand is one ``_<name>(args) -> exit code`` function and one ``_add_<name>(subparsers)`` parser
builder, listed once in ``COMMANDS``; adding a subcommand is adding one entry there.

Bad input (unknown model/data/scorer, a target outside (0, 1), an unwritable output directory, a missing
optional package, a damaged run directory: whatever spectra_gpu refuses on purpose, and OS errors) prints one
line on stderr and exits with code 2; anything else is an internal error: exit 1, one line saying so, the
traceback in DIR/error.log (``main``). ``spectra <command> --debug`` or SPECTRA_GPU_DEBUG=1 shows the traceback.
"""

from __future__ import annotations

import argparse
import linecache
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NoReturn

EXIT_USAGE = 2
EXIT_INTERNAL = 1


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _number(name: str, ok: Any, what: str) -> Any:
    """An argparse type: a float for which ``ok(value)`` holds, else a one-line error naming ``what`` (e.g.
    "a number in (0, 1)") and what came."""
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: expected {what}, got {s!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"{name}: expected {what}, got {s}")
        return v

    return parse


def _fraction(name: str) -> Any:
    return _number(name, lambda v: 0 < v < 1, "a number in (0, 1)")


def _int_at_least(low: int) -> Any:
    """An argparse type: an int >= ``low``, else a one-line error naming what was expected and what came."""
    what = "a non-negative integer" if low == 0 else f"an integer >= {low}"

    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s}")
        return v

    return parse



def _positive(name: str) -> Any:
    return _number(name, lambda v: v > 0, "a number > 0")


def _unit_interval(name: str) -> Any:
    return _number(name, lambda v: 0 <= v <= 1, "a number in [0, 1]")


def _num_eigs(s: str) -> int | str:
    """An argparse type: an int >= 1 or 'full'."""
    if s == "full":
        return s
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 or 'full', got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 or 'full', got {s}")
    return v


def _rank() -> int:
    """This process's rank under torchrun (0 without it)."""
    from .distributed import world

    return world()[0]


def _scorer_options(args: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    for key in ("k", "num_eigs", "direction", "preprocess"):
        v = getattr(args, key, None)
        if v is not None:
            opts[key] = v
    return opts


def _check_out(out: str | None) -> None:
    """Fail fast (before any model is loaded) on an output directory that cannot be created or written; the
    directory itself is created by the run (``run_store.prepare_run_dir``), which removes it again when the run
    fails before its first round."""
    if out is None:
        return
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise ValueError(f"out: expected a directory, got an existing file {out!r}")
    base = next(d for d in (p, *p.parents) if d.exists())
    if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
        raise OSError(f"out: cannot {'write to' if base == p else 'create'} {out!r} (permission denied)")


def _run_prune(args: argparse.Namespace, *, quiet: bool = False) -> dict[str, Any]:
    from .builtin.tasks import load_task
    from .driver import PruneConfig, prune
    from .finetune import LORA_INSTALL, FinetuneConfig, lora_available
    from .scorers import get_scorer

    get_scorer(args.scorer)
    if args.resume and args.out is None:
        raise ValueError("--resume: expected --out DIR of the run to continue, got none")
    _check_out(args.out)
    if args.lora_alpha is not None and args.lora_rank is None:
        raise ValueError(f"--lora-alpha: expected it with --lora-rank R (LoRA is off without it), got --lora-alpha "
                         f"{args.lora_alpha:g} alone")
    if args.lora_rank is not None and not lora_available():
        raise ImportError(f"--lora-rank needs peft: {LORA_INSTALL}")
    t0 = time.perf_counter()
    task = load_task(args.model, args.data, seed=args.seed)
    ft = task.finetune
    over = {k: v for k, v in (("optimizer", args.optimizer), ("lr", args.lr), ("epochs", args.epochs),
                              ("steps", args.steps), ("loss", args.recovery), ("temperature", args.kd_temperature),
                              ("kd_alpha", args.kd_alpha), ("lora_rank", args.lora_rank),
                              ("lora_alpha", args.lora_alpha)) if v is not None}
    if over:
        ft = FinetuneConfig(**{**ft.to_dict(), **over})
    cfg = PruneConfig(target=args.target, scorer=args.scorer, kinds=tuple(args.kinds or task.kinds),
                      round_fraction=args.round_fraction, allocation=args.allocation,
                      uniform_widths=args.uniform_widths, round_to=args.round_to,
                      one_per_neighbourhood=args.one_per_neighbourhood, epr_basis=args.epr_basis or task.epr_basis,
                      scorer_options=_scorer_options(args), seed=args.seed, track_metric=not args.no_track_metric,
                      recalibrate_bn=task.recalibrate_bn if args.recalibrate_bn is None else args.recalibrate_bn,
                      finetune=ft, sequential=args.sequential, hidden_store=args.hidden_store,
                      compensate=args.compensate,
                      **({} if args.compensate_damping is None else {"compensate_damping": args.compensate_damping}))
    if not quiet and not getattr(args, "quiet", False) and _rank() == 0:
        print(f"{task.model_name} on {task.data_name}: {task.info}", file=sys.stderr)
    res = prune(task.model, task.calib, cfg, out_dir=args.out, resume=args.resume,
                keep_checkpoints=args.keep_checkpoints, loss_fn=task.loss_fn,
                evaluate=task.evaluate, metric_name=task.metric_name, train_batches=task.train_batches,
                forward=task.forward, tokenizer=task.extra.get("tokenizer"),
                meta={"model": task.model_name, "data": task.data_name, "data_info": task.info,
                      "higher_is_better": task.higher_is_better, "flops_input": task.flops_input,
                      "seconds_setup": task.seconds_setup, "command": getattr(args, "command_line", None)})
    rep = res.report
    if not quiet and _rank() == 0:
        _print_summary(rep, time.perf_counter() - t0, args.out)
    return rep


def _print_summary(r: dict[str, Any], seconds: float, out: str | None) -> None:
    def f(v: Any) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    m = r["metric_name"]
    print(f"{r['model']} ({r['data']}), scorer {r['scorer']}: {len(r['rounds'])} rounds")
    print(f"  parameters: {r['params_before']:,} -> {r['params_after']:,}  (EPR {r['epr']:.4f} on the "
          f"{r['epr_basis']} basis, target {r['target']}; total {r['epr_total']:.4f})")
    if r.get("uniform_widths"):
        print(f"  widths: uniform across layers ({r['epr_statement']})")
    comp = (f" | after compensation {f(r['metric_after_compensation'])}" if r.get("compensation") else "")
    print(f"  {m}: before {f(r['metric_before'])} | after pruning {f(r['metric_after_prune'])}{comp} | "
          f"after fine-tune {f(r['metric_after_finetune'])}")
    if r.get("environment", {}).get("resumed"):
        print(f"  time: scoring {r['seconds_scoring']:.1f} s, pruning run {r['seconds_total']:.1f} s over all its "
              f"sessions (resumed); this command {seconds:.1f} s incl. model/data setup")
    else:
        print(f"  time: scoring {r['seconds_scoring']:.1f} s, pruning run {r['seconds_total']:.1f} s, "
              f"all (incl. model/data setup) {seconds:.1f} s")
    if out is not None:
        model_dir = Path(out) / "model"
        if model_dir.is_dir():
            from .io import loader_hint

            print(f"  model: {loader_hint(model_dir)}")
            if not r.get("saved_model", {}).get("standard") and r["model"] in ("digits-mlp", "mnist-cnn", "minilm-rt"):
                print(f"  (or pass it back to spectra: --model {model_dir} rebuilds the built-in architecture)")
        print(f"  report: {Path(out) / 'report.md'}")


def _demo(args: argparse.Namespace) -> int:
    from .scorers import get_scorer

    for name in [args.scorer, *args.compare]:
        get_scorer(name)
    _check_out(args.out)
    base = Path(args.out) if args.out is not None else Path(tempfile.mkdtemp(prefix="spectra-demo-"))
    args.data, args.resume, args.keep_checkpoints, args.kinds = None, False, False, None
    args.optimizer = args.lr = args.epochs = args.steps = None
    args.allocation, args.epr_basis, args.one_per_neighbourhood, args.no_track_metric = "uniform", None, False, False
    args.recalibrate_bn = args.uniform_widths = args.sequential = args.compensate = None
    args.recovery = args.kd_temperature = args.kd_alpha = args.lora_rank = args.lora_alpha = None
    args.round_to, args.hidden_store, args.compensate_damping = 8, "cpu", None
    args.k = args.num_eigs = args.direction = args.preprocess = None
    note = (lambda *a, **k: None) if args.quiet else print
    note(f"spectra demo: train (or load) {args.model}, prune {args.target:.0%} of its parameters with the "
          f"{args.scorer} scorer in {args.round_fraction:.0%} rounds, fine-tune once", file=sys.stderr)
    args.out = str(base / args.scorer)
    main_rep = _run_prune(args)
    rows = [main_rep]
    for name in args.compare:
        note(f"same recipe, scorer {name}:", file=sys.stderr)
        args.scorer, args.out = name, str(base / name)
        rows.append(_run_prune(args, quiet=True))
    if args.compare:
        m = main_rep["metric_name"]
        w = max(len("scorer"), *(len(r["scorer"]) for r in rows))
        print(f"  {'scorer':<{w}} {m + ' after pruning':>22} {m + ' after fine-tune':>24}  (same target, rounds, "
              "calibration and fine-tune)")
        for r in rows:
            print(f"  {r['scorer']:<{w}} {r['metric_after_prune']:>22.4f} {r['metric_after_finetune']:>24.4f}")
    print(f"  reports: {base}/<scorer>/report.md")
    return 0


def _prune(args: argparse.Namespace) -> int:
    _run_prune(args)
    return 0


def _score(args: argparse.Namespace) -> int:
    from .builtin.tasks import load_task
    from .driver import score_model, write_scores
    from .run_store import prepare_run_dir, remove_empty_dirs
    from .scorers import get_scorer

    get_scorer(args.scorer)
    writer = _rank() == 0  # under torchrun only rank 0 writes
    created = None
    if writer:
        _check_out(args.out)
        created = prepare_run_dir(Path(args.out), resume=False, resumable=False)
    try:
        task = load_task(args.model, args.data, seed=args.seed)
        outs, summary = score_model(task.model, task.calib, scorer=args.scorer, kinds=args.kinds or task.kinds,
                                    options=_scorer_options(args), loss_fn=task.loss_fn, forward=task.forward,
                                    seed=args.seed, sequential=args.sequential, hidden_store=args.hidden_store)
    except BaseException:
        remove_empty_dirs(Path(args.out), created)  # a failed score leaves no directory it made
        raise
    if writer:
        write_scores(args.out, outs, summary, {"model": task.model_name, "data": task.data_name,
                                               "scorer": args.scorer, "data_info": task.info})
        print(f"{task.model_name} ({task.data_name}): scored {len(outs)} groups with {args.scorer} in "
              f"{summary['seconds_scoring']:.1f} s -> {Path(args.out) / 'scores'}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import render

    rep = render(args.dir)
    print(f"{Path(args.dir) / 'report.md'} ({rep.get('kind', 'prune')} run of {rep.get('model')}, "
          f"scorer {rep.get('scorer')})")
    return 0


def _env(args: argparse.Namespace) -> int:
    from .env import report

    print(report())
    return 0


def _add_common(p: argparse.ArgumentParser, *, need_out: bool) -> None:
    from .driver import KINDS

    p.add_argument("--model", required=True, help="built-in name (digits-mlp, mnist-cnn, minilm-rt, smollm2-text), "
                   "a Hugging Face folder or a saved torch model")
    p.add_argument("--data", default=None, help="digits, mnist5k, rotten-tomatoes or english-text "
                   "(default: the model's own)")
    p.add_argument("--scorer", default="spectral", help="spectral, hybrid_rank (spectral rank x Wanda-sp rank), "
                   "random, l1, l2, act_mean, act_var, apoz, taylor, wanda_sp, flap, or a registered name")
    p.add_argument("--out", required=need_out, default=None, help="run directory")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=None, help="unit kinds to prune (default: the "
                   "task's)")
    p.add_argument("--seed", type=_int_at_least(0), default=0)
    p.add_argument("--k", type=_int_at_least(1), default=None, help="spectral: neighbours per unit (default 10)")
    p.add_argument("--num-eigs", type=_num_eigs, default=None, help="spectral: eigenpairs s (default 32) or 'full'")
    p.add_argument("--direction", choices=("fwd", "rev", "sym"), default=None)
    p.add_argument("--preprocess", choices=("zscore", "center", "raw"), default=None)
    p.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=None,
                   help="capture and score one transformer block at a time, holding one block's statistics "
                   "(default: on for Hugging Face transformer models with a scorer that needs no gradients)")
    p.add_argument("--hidden-store", choices=("device", "cpu", "disk"), default="cpu",
                   help="layer-sequential: where the calibration hidden states are kept (default cpu; disk: "
                   "memory-mapped files in the temporary folder)")


def _add_prune_opts(p: argparse.ArgumentParser, *, demo: bool) -> None:
    from .compensate import DAMPING

    p.add_argument("--target", type=_fraction("target"), default=0.5,
                   help="effective parameter reduction to reach, in (0, 1)")
    p.add_argument("--round-fraction", type=_fraction("round-fraction"), default=0.05,
                   help="share of each group's width removed per round (default 0.05)")
    if demo:
        return
    p.add_argument("--allocation", choices=("uniform", "global"), default="uniform",
                   help="uniform: the same share of every group per round; global: pooled by within-layer "
                   "percentile, so layers end with different widths (non-uniform)")
    p.add_argument("--uniform-widths", action=argparse.BooleanOptionalAction, default=None,
                   help="every layer keeps the same number of FFN neurons and of query / KV heads, so a pruned "
                   "Hugging Face model saves with a standard config.json (default: on for Hugging Face models "
                   "with --allocation uniform, off for plain models)")
    p.add_argument("--round-to", type=_int_at_least(1), default=8,
                   help="with uniform widths, neuron / FFN widths are multiples of this (default 8)")
    p.add_argument("--one-per-neighbourhood", action="store_true",
                   help="at most one unit per input-graph kNN neighbourhood per round")
    p.add_argument("--epr-basis", choices=("total", "prunable"), default=None,
                   help="EPR denominator: all parameters, or the prunable modules only (default: the task's)")
    p.add_argument("--optimizer", choices=("adam", "adamw", "sgd"), default=None, help="fine-tune optimiser")
    p.add_argument("--lr", type=float, default=None, help="fine-tune learning rate")
    p.add_argument("--epochs", type=_int_at_least(0), default=None, help="fine-tune epochs (0 = none)")
    p.add_argument("--steps", type=_int_at_least(1), default=None, help="cap on fine-tune optimiser steps")
    p.add_argument("--no-track-metric", action="store_true", help="skip the metric after every round")
    p.add_argument("--compensate", action=argparse.BooleanOptionalAction, default=None,
                   help="after the last round refit each pruned group's consumer by damped least squares to the "
                   "dense model's outputs on the calibration data (default: on for Hugging Face transformer models)")
    p.add_argument("--compensate-damping", type=_positive("compensate-damping"), default=None,
                   help=f"compensation ridge as a share of the mean Gram diagonal (default {DAMPING})")
    p.add_argument("--recovery", choices=("ce", "kd"), default=None,
                   help="fine-tune loss: ce (the task loss) or kd (distillation from the dense model; default: the "
                   "task's, ce)")
    p.add_argument("--kd-temperature", type=_positive("kd-temperature"), default=None,
                   help="distillation temperature (default 1)")
    p.add_argument("--kd-alpha", type=_unit_interval("kd-alpha"), default=None,
                   help="weight of the distillation term; 1 - it goes to the task loss (default 1)")
    p.add_argument("--lora-rank", type=_int_at_least(1), default=None, metavar="R",
                   help="fine-tune rank-R LoRA adapters on the nn.Linear layers of the model's blocks instead of "
                   "every weight, merged into the weights at the end, so the saved model stays a plain model "
                   "(needs peft: pip install 'spectra_gpu[lora]'; default: full fine-tune)")
    p.add_argument("--lora-alpha", type=_positive("lora-alpha"), default=None, metavar="A",
                   help="LoRA alpha: the adapters' update is scaled by A / R (default A = 2 R)")
    p.add_argument("--recalibrate-bn", action=argparse.BooleanOptionalAction, default=None,
                   help="re-estimate BatchNorm running statistics on the calibration batches after every round "
                   "(no parameter update; default: the task's, on for mnist-cnn)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep DIR/checkpoint.safetensors after the run succeeds (default: removed)")


def _add_output_opts(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--progress", action="store_true", help="progress bars on stderr even when it is not a terminal")
    g.add_argument("--quiet", action="store_true", help="no progress bars and no notes on stderr (errors still)")


def _add_demo(sub: Any) -> None:
    d = sub.add_parser("demo", help="train (or load) a small real model, prune 50%% of its parameters with the "
                       "spectral scorer, fine-tune, print before/after")
    d.add_argument("--model", choices=("digits-mlp", "mnist-cnn"), default="digits-mlp")
    d.add_argument("--scorer", default="spectral")
    d.add_argument("--out", default=None, help="directory for the runs, one subdirectory per scorer (default: a "
                   "new temporary directory)")
    d.add_argument("--compare", nargs="*", default=["hybrid_rank", "random"], metavar="SCORER",
                   help="other scorers run with the same recipe for comparison (default: hybrid_rank random; "
                   "none: --compare with no names)")
    d.add_argument("--seed", type=_int_at_least(0), default=0)
    _add_prune_opts(d, demo=True)
    _add_output_opts(d)


def _add_prune(sub: Any) -> None:
    pr = sub.add_parser("prune", help="prune a model to a target effective parameter reduction, fine-tune, report")
    _add_common(pr, need_out=True)
    _add_prune_opts(pr, demo=False)
    _add_output_opts(pr)


def _add_score(sub: Any) -> None:
    sc = sub.add_parser("score", help="score every group once and save the scores per group")
    _add_common(sc, need_out=True)
    _add_output_opts(sc)


def _add_report(sub: Any) -> None:
    rp = sub.add_parser("report", help="rebuild report.md and the plots of a run directory from its report.json")
    rp.add_argument("dir")


def _add_env(sub: Any) -> None:
    sub.add_parser("env", help="versions, devices and which backends are available")


def _add_export(sub: Any) -> None:
    from .export import add_export_parser

    add_export_parser(sub)


def _export(args: argparse.Namespace) -> int:
    from .export import run_export

    return run_export(args)


# name -> (parser builder, command); the order is the order of ``spectra --help``
COMMANDS: dict[str, tuple[Any, Any]] = {
    "demo": (_add_demo, _demo), "prune": (_add_prune, _prune), "score": (_add_score, _score),
    "report": (_add_report, _report), "export": (_add_export, _export), "env": (_add_env, _env),
}


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__

    p = _Parser(prog="spectra", description="Spectral structural-importance pruning of neurons, channels and "
                "attention heads.")
    p.add_argument("--version", action="version", version=f"spectra_gpu {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    for add, _ in COMMANDS.values():
        add(sub)
    for cmd in sub.choices.values():
        cmd.add_argument("--debug", action="store_true", help="show the traceback of an error on stderr")
    return p


def deliberate(e: BaseException) -> bool:
    """Whether ``e`` was raised on purpose by spectra_gpu (a ``raise`` statement in the package: bad input
    named as such), as opposed to an error inside a dependency or a failing expression of the package (a bug,
    or a model it does not handle)."""
    tb = e.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    if str(tb.tb_frame.f_globals.get("__name__", "")).split(".")[0] != "spectra_gpu":
        return False
    return linecache.getline(tb.tb_frame.f_code.co_filename, tb.tb_lineno).lstrip().startswith("raise")


def _error_log(out: str | None, cmd: str) -> Path:
    """Where an internal error's traceback goes: DIR/error.log when the command has a writable run directory,
    else a new file in the temporary folder."""
    if out is not None and Path(out).is_dir() and os.access(out, os.W_OK):
        return Path(out) / "error.log"
    fd, name = tempfile.mkstemp(prefix=f"spectra-{cmd}-", suffix=".log")
    os.close(fd)
    return Path(name)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    """Run one command; exit codes: 0 done, 2 bad input (one line naming what was expected and what came), 1
    internal error (one line saying so; the traceback in DIR/error.log, on stderr with --debug or
    SPECTRA_GPU_DEBUG=1), 130 interrupted (the last checkpoint stays: --resume continues)."""
    import shlex
    import traceback

    from ._progress import forced

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["spectra", *argv])
    debug = bool(getattr(args, "debug", False)) or os.environ.get("SPECTRA_GPU_DEBUG") == "1"
    bars = True if getattr(args, "progress", False) else False if getattr(args, "quiet", False) else None
    out = getattr(args, "out", None)
    parallel = False
    try:
        if args.cmd in ("prune", "score"):
            from .distributed import init_from_env

            parallel = init_from_env()
        with forced(bars):
            return int(COMMANDS[args.cmd][1](args))
    except KeyboardInterrupt:
        where = f"; `--resume` continues from the last checkpoint in {out}" if args.cmd == "prune" and out else ""
        print(f"spectra {args.cmd}: interrupted{where}", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            traceback.print_exc()
        usage = isinstance(e, OSError) or (isinstance(e, (ValueError, TypeError, ImportError)) and deliberate(e))
        if usage:
            print(f"spectra {args.cmd}: error: {_one_line(e)}", file=sys.stderr)
            return EXIT_USAGE
        log = _error_log(out, args.cmd)
        log.write_text(f"{args.command_line}\n\n{traceback.format_exc()}")
        print(f"spectra {args.cmd}: internal error: {type(e).__name__}: {_one_line(e)[:300]} -- a bug in spectra_gpu "
              f"or a model it does not handle; the traceback is in {log} (please include it in a report; "
              "--debug shows it here)", file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        if parallel:
            import torch.distributed as dist

            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
