"""The bad-input table (``tests/bad_input_table.py``): every case answers with its exit code or exception type
and a one-line message holding its key words; no CLI case shows a traceback; docs/bad-inputs.md is the table."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from bad_input_table import CASES, DOC, RUN_ARGS, Case, render

from spectra_gpu import cli

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished digits-mlp run (checkpoint kept), copied as {run} into the cases that damage it."""
    out = tmp_path_factory.mktemp("bad-input") / "run"
    assert cli.main(["prune", *RUN_ARGS, "--out", str(out), "--keep-checkpoints"]) == 0
    assert {"checkpoint.safetensors", "report.json", "model"} <= {p.name for p in out.iterdir()}
    return out


def _argv(case: Case, tmp: Path) -> list[str]:
    return [a.replace("{run}", str(tmp / "run")).replace("{tmp}", str(tmp)) for a in case.argv]


def _run_cli(case: Case, tmp: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    argv = _argv(case, tmp)
    if case.subprocess:
        env = {k: v for k, v in os.environ.items() if k not in ("SPECTRA_GPU_DEBUG", "SPECTRA_KILL_AT")}
        env["OMP_NUM_THREADS"] = "1"
        done = subprocess.run([sys.executable, "-m", "spectra_gpu", *argv], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=600)
        return done.returncode, done.stderr
    capsys.readouterr()
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse
        code = int(e.code or 0)
    return code, capsys.readouterr().err


def _words_in(message: str, case: Case) -> None:
    low = message.lower()
    missing = [w for w in case.words if w.lower() not in low]
    assert not missing, f"{case.id}: {missing} not in {message!r}"
    there = [w for w in case.unwanted if w.lower() in low]
    assert not there, f"{case.id}: {there} should not be in {message!r}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                   request: pytest.FixtureRequest) -> None:
    monkeypatch.delenv("SPECTRA_GPU_DEBUG", raising=False)
    if case.needs_run:
        shutil.copytree(request.getfixturevalue("finished_run"), tmp_path / "run")
    if case.setup is not None:
        case.setup(tmp_path)
    if case.cli:
        code, err = _run_cli(case, tmp_path, capsys)
        assert code == case.expect, f"{case.id}: exit {code}, expected {case.expect}; stderr: {err}"
        assert "Traceback" not in err, err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1, f"{case.id}: expected one line on stderr, got {lines}"
        _words_in(lines[0], case)
    else:
        assert case.call is not None and isinstance(case.expect, type)
        with pytest.raises(case.expect) as e:
            case.call(tmp_path)
        message = str(e.value)
        assert "\n" not in message.strip(), f"{case.id}: expected a one-line message, got {message!r}"
        _words_in(message, case)
    for rel in case.absent:
        assert not (tmp_path / rel).exists(), f"{case.id}: left {rel} behind"


def test_the_table_is_big_enough_and_its_ids_unique():
    assert len(CASES) >= 30
    assert sum(c.cli for c in CASES) >= 15 and sum(not c.cli for c in CASES) >= 15
    assert len({c.id for c in CASES}) == len(CASES)


def test_docs_bad_inputs_md_is_generated_from_the_table():
    assert DOC.read_text() == render(), "docs/bad-inputs.md is stale: run `python -m tests.bad_input_table --write`"
