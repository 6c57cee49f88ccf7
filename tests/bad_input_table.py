"""The bad-input table: what spectra_gpu answers to each kind of bad input, at the CLI and in the Python API.

One place for the cases: ``tests/test_bad_input.py`` runs every one of them (the exit code or the exception
type, the message's key words, no traceback at the CLI), and ``docs/bad-inputs.md`` is generated from them:

    .venv/bin/python -m tests.bad_input_table --write

(``test_bad_input.py`` fails when the page is out of date.)

CLI arguments may hold ``{tmp}`` (a fresh empty directory of the case) and ``{run}`` (``{tmp}/run``: a copy of
a finished digits-mlp run, checkpoint kept, that ``setup`` may damage first).
"""

from __future__ import annotations

import argparse
import errno
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad-inputs.md"
RUN_ARGS = ("--model", "digits-mlp", "--target", "0.2", "--epochs", "0", "--quiet")  # the finished run of {run}
PRUNE = ("prune", "--model", "digits-mlp", "--out", "{tmp}/out", "--quiet")


@dataclass(frozen=True)
class Case:
    """One bad input. given: what the user did (the doc's first column). expect: the CLI exit code, or the
    exception type the API raises. words: key words the one-line message holds (case-insensitive). argv: the
    ``spectra`` arguments (a CLI case); call(tmp): the API call (an API case). setup(tmp): prepares or damages
    files first. subprocess: run the real CLI in a child process (else ``cli.main`` in this one). absent:
    paths under tmp that must not exist afterwards (nothing left behind). unwanted: words the message must
    not hold. run: {tmp}/run holds the finished run (implied by {run} in argv)."""

    id: str
    given: str
    expect: int | type[BaseException]
    words: tuple[str, ...]
    argv: tuple[str, ...] = ()
    call: Callable[[Path], Any] | None = None
    setup: Callable[[Path], None] | None = None
    subprocess: bool = False
    absent: tuple[str, ...] = ()
    unwanted: tuple[str, ...] = ()
    run: bool = False

    @property
    def cli(self) -> bool:
        return self.call is None

    @property
    def needs_run(self) -> bool:
        """Whether {tmp}/run must hold a copy of the finished run first (``run``, or {run} in argv)."""
        return self.run or any("{run}" in a for a in self.argv)


# ---- setups: damaged run directories -------------------------------------------------------------------
def _unfinished(tmp: Path) -> Path:
    """{run} as a killed run leaves it: the checkpoint, no report.json / model yet."""
    run = tmp / "run"
    (run / "report.json").unlink()
    (run / "report.md").unlink()
    import shutil

    shutil.rmtree(run / "model")
    return run


def _truncate_checkpoint(tmp: Path) -> None:
    ck = _unfinished(tmp) / "checkpoint.safetensors"
    ck.write_bytes(ck.read_bytes()[:200])


def _empty_checkpoint(tmp: Path) -> None:
    (_unfinished(tmp) / "checkpoint.safetensors").write_bytes(b"")


def _legacy_checkpoint(tmp: Path) -> None:
    (tmp / "old").mkdir()
    (tmp / "old" / "checkpoint.pt").write_bytes(b"\x80\x04\x95pickled by an earlier version")


def _truncate_report(tmp: Path) -> None:
    rep = tmp / "run" / "report.json"
    rep.write_text(rep.read_text()[:300])
    (tmp / "run" / "checkpoint.safetensors").unlink()


def _report_without_checkpoint(tmp: Path) -> None:
    (tmp / "run" / "checkpoint.safetensors").unlink()


def _empty_dir(tmp: Path) -> None:
    (tmp / "empty").mkdir()


def _a_text_file(tmp: Path) -> None:
    (tmp / "notes.txt").write_text("not a model\n")


def _an_existing_file_as_out(tmp: Path) -> None:
    (tmp / "out").write_text("a file\n")


def _no_report(tmp: Path) -> None:
    (tmp / "run").mkdir()
    (tmp / "run" / "report.md").write_text("# no report.json here\n")


def _truncate_saved_model(tmp: Path) -> None:
    w = tmp / "run" / "model" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:500])


def _corrupt_spectra_json(tmp: Path) -> None:
    (tmp / "run" / "model" / "spectra.json").write_text('{"version": 2, "format": ')


# ---- API calls --------------------------------------------------------------------------------------------
def _layer(n: int = 20, m: int = 50) -> tuple[Any, Any]:
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, m, generator=g, dtype=torch.float64)
    pre = torch.randn(n, 16, generator=g, dtype=torch.float64) @ x
    return pre, torch.relu(pre)


def _score(**kw: Any) -> Callable[[Path], Any]:
    def call(tmp: Path) -> Any:
        import spectra_gpu as sg

        pre, post = _layer()
        return sg.score(pre, post, **kw)

    return call


def _score_mismatched(tmp: Path) -> Any:
    import spectra_gpu as sg

    pre, post = _layer()
    return sg.score(pre, post[:, :-1])


def _score_nan(tmp: Path) -> Any:
    import spectra_gpu as sg

    pre, post = _layer()
    post[3, 7] = math.nan
    return sg.score(pre, post)


def _mlp() -> tuple[Any, list[Any], Any]:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 24), torch.nn.ReLU(), torch.nn.Linear(24, 3))
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    return model, [(x[:32], y[:32]), (x[32:], y[32:])], lambda m, b: F.cross_entropy(m(b[0]), b[1])


def _prune_with_batches_list(tmp: Path) -> Any:
    import spectra_gpu as sg

    model, calib, loss = _mlp()
    rounds: list[Any] = []
    try:
        return sg.prune(model, calib, sg.PruneConfig(target=0.3, kinds=("neuron",)), loss_fn=loss,
                        train_batches=calib, plots=False, callback=lambda name, info: rounds.append(name))
    finally:
        assert "round_start" not in rounds, "refused only after pruning rounds had run"


def _prune_lora_no_linear(tmp: Path) -> Any:
    import torch

    import spectra_gpu as sg

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
    calib = [torch.randn(4, 1, 8, 8) for _ in range(2)]
    cfg = sg.PruneConfig(target=0.3, finetune=sg.FinetuneConfig(lora_rank=4))
    return sg.prune(model, calib, cfg, loss_fn=lambda m, b: m(b).square().mean(), train_batches=lambda ep: calib,
                    plots=False)


def _prune_lora_without_peft(tmp: Path) -> Any:
    import spectra_gpu as sg

    model, calib, loss = _mlp()
    cfg = sg.PruneConfig(target=0.3, kinds=("neuron",), finetune=sg.FinetuneConfig(lora_rank=4))
    had = sys.modules.get("peft", False)
    sys.modules["peft"] = None  # type: ignore[assignment]  # `import peft` fails as if it were not installed
    try:
        return sg.prune(model, calib, cfg, loss_fn=loss, train_batches=lambda ep: calib, plots=False)
    finally:
        if had is False:
            del sys.modules["peft"]
        else:
            sys.modules["peft"] = had  # type: ignore[assignment]


def _prune_calib_empty(tmp: Path) -> Any:
    import spectra_gpu as sg

    model, _, loss = _mlp()
    return sg.prune(model, [], sg.PruneConfig(target=0.3))


def _prune_not_a_module(tmp: Path) -> Any:
    import spectra_gpu as sg

    _, calib, _ = _mlp()
    return sg.prune({"weights": 1}, calib, sg.PruneConfig(target=0.3))


def _prune_resume_empty(tmp: Path) -> Any:
    import spectra_gpu as sg

    model, calib, _ = _mlp()
    (tmp / "empty").mkdir()
    return sg.prune(model, calib, sg.PruneConfig(target=0.3, kinds=("neuron",)), out_dir=tmp / "empty", resume=True)


def _config(cls: str, **kw: Any) -> Callable[[Path], Any]:
    def call(tmp: Path) -> Any:
        import spectra_gpu as sg

        return getattr(sg, cls)(**kw)

    return call


def _check_batches_list(tmp: Path) -> Any:
    from spectra_gpu.finetune import check_batches_fn

    return check_batches_fn([1, 2, 3])


def _declare_wrong_name(tmp: Path) -> Any:
    import spectra_gpu as sg

    model, _, _ = _mlp()
    return sg.declare_group(model, "neuron", "layers.0", "2")


def _declare_not_linear(tmp: Path) -> Any:
    import spectra_gpu as sg

    model, _, _ = _mlp()
    return sg.declare_group(model, "neuron", "1", "2")


def _load_pruned(tmp: Path) -> Any:
    import spectra_gpu as sg
    from spectra_gpu.builtin.tasks import MLP

    return sg.load_pruned(tmp / "run" / "model", model=MLP(64, (256, 256), 10))


def _load_report(tmp: Path) -> Any:
    from spectra_gpu.report import load_report

    return load_report(tmp / "run")


def _full_disk(tmp: Path) -> Any:
    from spectra_gpu.report import atomic_replace

    def write(p: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(p))

    return atomic_replace(tmp / "file", write)


EXIT = 2  # a usage error / bad input at the CLI

CASES: tuple[Case, ...] = (
    # -- the CLI: arguments --
    Case("cli-unknown-model", "`--model` neither a built-in name nor a path", EXIT,
         ("model", "built-in", "no-such-model"), argv=("prune", "--model", "no-such-model", "--out", "{tmp}/out")),
    Case("cli-model-not-a-model", "`--model` a file that is no model (a text file)", EXIT, ("model", "notes.txt"),
         argv=("prune", "--model", "{tmp}/notes.txt", "--out", "{tmp}/out"), setup=_a_text_file, absent=("out",)),
    Case("cli-unknown-data", "`--data` not a known data set", EXIT, ("data", "expected one of", "nope"),
         argv=(*PRUNE, "--data", "nope"), absent=("out",)),
    Case("cli-unknown-scorer", "`--scorer` not a registered scorer", EXIT, ("scorer", "nope"),
         argv=(*PRUNE, "--scorer", "nope"), absent=("out",)),
    Case("cli-target-0", "`--target 0`", EXIT, ("target", "(0, 1)", "0"), argv=(*PRUNE, "--target", "0")),
    Case("cli-target-1", "`--target 1`", EXIT, ("target", "(0, 1)", "1"), argv=(*PRUNE, "--target", "1")),
    Case("cli-target-negative", "`--target -0.1`", EXIT, ("target", "(0, 1)", "-0.1"),
         argv=(*PRUNE, "--target", "-0.1")),
    Case("cli-target-word", "`--target abc`", EXIT, ("target", "a number", "abc"), argv=(*PRUNE, "--target", "abc")),
    Case("cli-round-fraction-0", "`--round-fraction 0`", EXIT, ("round-fraction", "(0, 1)"),
         argv=(*PRUNE, "--round-fraction", "0")),
    Case("cli-k-0", "`--k 0`", EXIT, ("k", ">= 1", "0"), argv=(*PRUNE, "--k", "0"), absent=("out",)),
    Case("cli-k-huge", "`--k 100000` (more neighbours than a layer has units)", EXIT, ("k", "100000", "units"),
         argv=(*PRUNE, "--k", "100000"), absent=("out",), unwanted=("out of reach",)),
    Case("cli-num-eigs-word", "`--num-eigs lots`", EXIT, ("num-eigs", "'full'", "lots"),
         argv=(*PRUNE, "--num-eigs", "lots"), absent=("out",), unwanted=("invalid literal",)),
    Case("cli-num-eigs-huge", "`--num-eigs 100000` (more eigenpairs than a layer has units)", EXIT,
         ("num_eigs", "100000", "units"), argv=(*PRUNE, "--num-eigs", "100000"), absent=("out",)),
    Case("cli-steps-0", "`--steps 0`", EXIT, ("steps", ">= 1", "0"), argv=(*PRUNE, "--steps", "0"),
         unwanted=("None or",)),
    Case("cli-epochs-negative", "`--epochs -1`", EXIT, ("epochs", "-1"), argv=(*PRUNE, "--epochs", "-1")),
    Case("cli-lr-word", "`--lr fast`", EXIT, ("lr", "fast"), argv=(*PRUNE, "--lr", "fast")),
    Case("cli-lora-rank-0", "`--lora-rank 0`", EXIT, ("lora-rank", ">= 1", "0"), argv=(*PRUNE, "--lora-rank", "0"),
         absent=("out",)),
    Case("cli-lora-rank-word", "`--lora-rank big`", EXIT, ("lora-rank", "integer", "big"),
         argv=(*PRUNE, "--lora-rank", "big"), absent=("out",)),
    Case("cli-lora-alpha-0", "`--lora-alpha 0`", EXIT, ("lora-alpha", "> 0", "0"),
         argv=(*PRUNE, "--lora-rank", "4", "--lora-alpha", "0"), absent=("out",)),
    Case("cli-lora-alpha-alone", "`--lora-alpha` without `--lora-rank`", EXIT, ("--lora-alpha", "--lora-rank", "8"),
         argv=(*PRUNE, "--lora-alpha", "8"), absent=("out",)),
    Case("cli-kinds-unknown", "`--kinds` not a unit kind", EXIT, ("kinds", "bogus"), argv=(*PRUNE, "--kinds", "bogus")),
    # -- the CLI: run directories --
    Case("cli-out-is-a-file", "`--out` an existing file", EXIT, ("out", "file"), argv=PRUNE,
         setup=_an_existing_file_as_out),
    Case("cli-out-holds-a-run", "`--out` holding a run, without `--resume`", EXIT, ("already holds a run", "--resume"),
         argv=("prune", *RUN_ARGS, "--out", "{run}")),
    Case("cli-score-out-holds-a-run", "`spectra score --out` holding a run", EXIT, ("already holds a run",),
         argv=("score", "--model", "digits-mlp", "--out", "{run}", "--quiet"), unwanted=("--resume",)),
    Case("cli-resume-without-out", "`--resume` without `--out`", EXIT, ("--out",),
         argv=("prune", "--model", "digits-mlp", "--resume")),
    Case("cli-resume-empty-dir", "`--resume` into an empty directory", EXIT,
         ("nothing to resume", "without --resume"), argv=("prune", "--model", "digits-mlp", "--out", "{tmp}/empty",
                                                          "--resume", "--quiet"), setup=_empty_dir),
    Case("cli-resume-missing-dir", "`--resume` into a directory that does not exist", EXIT,
         ("nothing to resume", "without --resume"), argv=(*PRUNE, "--resume"), absent=("out",)),
    Case("cli-resume-other-config", "`--resume` with options that differ from the run's", EXIT,
         ("different configuration",), setup=_report_without_checkpoint,
         argv=("prune", "--model", "digits-mlp", "--target", "0.3", "--epochs", "0", "--out", "{run}", "--resume",
               "--quiet")),
    Case("cli-truncated-checkpoint", "`--resume` on a truncated checkpoint.safetensors", EXIT,
         ("checkpoint.safetensors", "damaged", "delete it", "without --resume"),
         argv=("prune", *RUN_ARGS, "--out", "{run}", "--resume"), setup=_truncate_checkpoint, subprocess=True),
    Case("cli-empty-checkpoint", "`--resume` on an empty checkpoint.safetensors", EXIT,
         ("checkpoint.safetensors", "damaged", "delete it", "without --resume"),
         argv=("prune", *RUN_ARGS, "--out", "{run}", "--resume"), setup=_empty_checkpoint, subprocess=True),
    Case("cli-legacy-checkpoint", "`--out` holding a pickled checkpoint.pt of an earlier version", EXIT,
         ("checkpoint.pt", "pickled", "never loaded"), argv=("prune", *RUN_ARGS, "--out", "{tmp}/old", "--resume"),
         setup=_legacy_checkpoint),
    Case("cli-resume-damaged-report", "`--resume` on a finished run whose report.json is truncated", EXIT,
         ("report.json", "damaged", "not valid JSON"), argv=("prune", *RUN_ARGS, "--out", "{run}", "--resume"),
         setup=_truncate_report),
    Case("cli-report-damaged", "`spectra report DIR` with a truncated report.json", EXIT,
         ("report.json", "damaged", "not valid JSON", "delete it"), argv=("report", "{run}"), setup=_truncate_report,
         subprocess=True),
    Case("cli-report-missing-dir", "`spectra report DIR` on a directory that does not exist", EXIT,
         ("run directory", "does not exist"), argv=("report", "{tmp}/nowhere")),
    Case("cli-report-no-report", "`spectra report DIR` on a directory without report.json", EXIT,
         ("report.json",), argv=("report", "{tmp}/run"), setup=_no_report),
    # -- the Python API --
    Case("api-score-k-equals-n", "`sg.score(pre, post, k=N)`", ValueError, ("k", "N=20", "k=20"), call=_score(k=20)),
    Case("api-score-k-0", "`sg.score(pre, post, k=0)`", ValueError, ("k", ">= 1", "0"), call=_score(k=0)),
    Case("api-score-num-eigs-huge", "`sg.score(pre, post, num_eigs=10000)`", ValueError,
         ("num_eigs", "N=20", "10000"), call=_score(num_eigs=10000)),
    Case("api-score-num-eigs-word", "`sg.score(pre, post, num_eigs='all')`", ValueError, ("num_eigs", "'full'"),
         call=_score(num_eigs="all")),
    Case("api-score-shapes", "`sg.score` with pre and post of different shapes", ValueError, ("same shape",),
         call=_score_mismatched),
    Case("api-score-nan", "`sg.score` with a NaN in the signals", ValueError, ("post", "finite"), call=_score_nan),
    Case("api-prune-batches-list", "`sg.prune(..., train_batches=[...])` (a list, not a callable)", TypeError,
         ("train_batches", "callable", "list"), call=_prune_with_batches_list),
    Case("api-prune-no-calib", "`sg.prune(model, [])`", ValueError, ("calib", "at least one"), call=_prune_calib_empty),
    Case("api-prune-not-a-module", "`sg.prune` given something that is not an nn.Module", TypeError,
         ("model", "nn.Module", "dict"), call=_prune_not_a_module),
    Case("api-prune-resume-empty", "`sg.prune(..., out_dir=empty, resume=True)`", ValueError,
         ("nothing to resume", "without --resume"), call=_prune_resume_empty),
    Case("api-pruneconfig-target", "`PruneConfig(target=1.5)`", ValueError, ("target", "(0, 1)", "1.5"),
         call=_config("PruneConfig", target=1.5)),
    Case("api-pruneconfig-kinds", "`PruneConfig(kinds=('bogus',))`", ValueError, ("kinds", "bogus"),
         call=_config("PruneConfig", kinds=("bogus",))),
    Case("api-pruneconfig-round-fraction", "`PruneConfig(round_fraction=0)`", ValueError, ("round_fraction", "0"),
         call=_config("PruneConfig", round_fraction=0)),
    Case("api-finetuneconfig-epochs", "`FinetuneConfig(epochs=-1)`", ValueError, ("epochs", ">= 0", "-1"),
         call=_config("FinetuneConfig", epochs=-1)),
    Case("api-finetuneconfig-lr-type", "`FinetuneConfig(lr='fast')`", TypeError, ("lr", "number", "str"),
         call=_config("FinetuneConfig", lr="fast")),
    Case("api-finetuneconfig-optimizer", "`FinetuneConfig(optimizer='rmsprop')`", ValueError,
         ("optimizer", "adam", "rmsprop"), call=_config("FinetuneConfig", optimizer="rmsprop")),
    Case("api-finetuneconfig-steps", "`FinetuneConfig(steps=0)`", ValueError, ("steps", ">= 1", "0"),
         call=_config("FinetuneConfig", steps=0)),
    Case("api-finetuneconfig-lora-rank", "`FinetuneConfig(lora_rank=0)`", ValueError, ("lora_rank", ">= 1", "0"),
         call=_config("FinetuneConfig", lora_rank=0)),
    Case("api-finetuneconfig-lora-rank-type", "`FinetuneConfig(lora_rank=2.5)`", TypeError,
         ("lora_rank", "integer", "float"), call=_config("FinetuneConfig", lora_rank=2.5)),
    Case("api-finetuneconfig-lora-alpha-alone", "`FinetuneConfig(lora_alpha=8)` (no `lora_rank`)", ValueError,
         ("lora_alpha", "without lora_rank", "8"), call=_config("FinetuneConfig", lora_alpha=8)),
    Case("api-finetuneconfig-lora-dropout", "`FinetuneConfig(lora_rank=4, lora_dropout=1)`", ValueError,
         ("lora_dropout", "[0, 1)", "1"), call=_config("FinetuneConfig", lora_rank=4, lora_dropout=1)),
    Case("api-prune-lora-no-linear", "`sg.prune` with `lora_rank` on a model without nn.Linear layers", ValueError,
         ("lora_rank", "nn.Linear", "Sequential"), call=_prune_lora_no_linear),
    Case("api-prune-lora-no-peft", "`sg.prune` with `lora_rank` where peft is not installed", ImportError,
         ("lora_rank", "needs peft", "pip install 'spectra_gpu[lora]'"), call=_prune_lora_without_peft),
    Case("api-check-batches-list", "`finetune.check_batches_fn([...])`", TypeError, ("callable", "list", "lambda"),
         call=_check_batches_list),
    Case("api-declare-group-name", "`sg.declare_group` with a module name the model does not have", ValueError,
         ("producer", "layers.0"), call=_declare_wrong_name),
    Case("api-declare-group-type", "`sg.declare_group` with a producer that is not Linear/Conv2d", TypeError,
         ("producer", "nn.Linear", "ReLU"), call=_declare_not_linear),
    Case("api-load-pruned-truncated", "`sg.load_pruned` on a truncated model.safetensors", ValueError,
         ("model.safetensors",), call=_load_pruned, setup=_truncate_saved_model, run=True),
    Case("api-load-pruned-bad-json", "`sg.load_pruned` on a corrupted spectra.json", ValueError,
         ("spectra.json",), call=_load_pruned, setup=_corrupt_spectra_json, run=True),
    Case("api-load-report-damaged", "`report.load_report` on a truncated report.json", ValueError,
         ("report.json", "damaged", "not valid JSON"), call=_load_report, setup=_truncate_report, run=True),
    Case("api-full-disk", "a full disk while a file is replaced (`report.atomic_replace`)", OSError,
         ("No space left",), call=_full_disk),
)


def _expected(case: Case) -> str:
    return f"exit {case.expect}" if isinstance(case.expect, int) else f"`{case.expect.__name__}`"


def _command(case: Case) -> str:
    args = " ".join(a.replace("{run}", "RUN").replace("{tmp}/", "") for a in case.argv)
    return f"`spectra {args}`"


def render() -> str:
    """docs/bad-inputs.md from ``CASES``."""
    lines = ["# Bad inputs and what spectra_gpu answers", "",
             "Generated from `tests/bad_input_table.py` (`python -m tests.bad_input_table --write`); "
             "`tests/test_bad_input.py` checks every row. At the CLI every one is a single line on stderr, "
             "`spectra <command>: error: ...`, with no traceback (`--debug` shows one); RUN is the directory "
             "of a pruning run. In the API the exception's message is that same line.", "",
             "## Command line", "", "| input | command | answer | the message names |", "|---|---|---|---|"]
    for c in CASES:
        if c.cli:
            lines.append(f"| {c.given} | {_command(c)} | {_expected(c)} | {', '.join(f'`{w}`' for w in c.words)} |")
    lines += ["", "## Python API", "", "| input | raises | the message names |", "|---|---|---|"]
    for c in CASES:
        if not c.cli:
            lines.append(f"| {c.given} | {_expected(c)} | {', '.join(f'`{w}`' for w in c.words)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bad_input_table", description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help=f"write {DOC.relative_to(DOC.parents[1])}")
    args = ap.parse_args(argv)
    if args.write:
        DOC.write_text(render())
        print(f"wrote {DOC}")
    else:
        sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
