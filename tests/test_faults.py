"""Faults survived: a `spectra prune` killed with SIGKILL at each named phase (``spectra_gpu.faults``), or stopped
with SIGINT, resumes with --resume to the report.json of an uninterrupted run (timings aside); a full disk while
a file is replaced leaves the previous file; files get the user's umask.

The runs are real subprocesses of the CLI on the built-in digits MLP (4 rounds, a 2-epoch fine-tune of 22 steps
per epoch), so a kill is a real SIGKILL with no cleanup code run.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from spectra_gpu import faults
from spectra_gpu.report import atomic_replace, atomic_write, write_text
from spectra_gpu.run_store import CHECKPOINT, RunState, RunStore

ROOT = Path(__file__).resolve().parents[1]
PRUNE = ["-m", "spectra_gpu", "prune", "--model", "digits-mlp", "--target", "0.3", "--epochs", "2", "--quiet"]
# what may differ between an interrupted-and-resumed run and an uninterrupted one: wall-clock times and the
# provenance record (timestamp, command line with its --out and --resume, the resumed flag)
IGNORED_TOP = ("seconds_setup", "seconds_scoring", "seconds_capture", "seconds_scorer", "seconds_total",
               "environment")
IGNORED_ROUND = ("seconds_capture", "seconds_scoring")
IGNORED_EPOCH = ("seconds",)
# (phase, visit): the visit is inside the run, so the run is not over when the kill comes
KILLS = [("capture", 2), ("score", 3), ("round", 2), ("finetune", 30), ("write_model", 1)]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != faults.ENV}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)
    return env


def _prune(out: Path, *more: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *PRUNE, "--out", str(out), *more], cwd=ROOT, env=_env(**env),
                          capture_output=True, text=True, timeout=600)


def comparable(report: dict[str, Any]) -> dict[str, Any]:
    """report.json without the fields that are allowed to differ (IGNORED_*); every other field is kept."""
    rep = {k: v for k, v in report.items() if k not in IGNORED_TOP}
    rep["rounds"] = [{k: v for k, v in r.items() if k not in IGNORED_ROUND} for r in report["rounds"]]
    rep["finetune_history"] = [{k: v for k, v in e.items() if k not in IGNORED_EPOCH}
                               for e in report["finetune_history"]]
    return rep


def _report(out: Path) -> dict[str, Any]:
    return json.loads((out / "report.json").read_text())


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("faults") / "ref"
    done = _prune(out)
    assert done.returncode == 0, done.stderr
    rep = _report(out)
    assert len(rep["rounds"]) >= 3 and len(rep["finetune_history"]) == 2  # the kill points lie inside the run
    assert rep["finetune_history"][-1]["steps"] == 44
    return out, rep


def test_comparable_drops_only_the_listed_timing_fields():
    rep = {"epr": 0.3, "seconds_total": 1.0, "environment": {}, "rounds": [{"round": 1, "seconds_capture": 2.0}],
           "finetune_history": [{"epoch": 1, "loss": 0.5, "seconds": 3.0}]}
    assert comparable(rep) == {"epr": 0.3, "rounds": [{"round": 1}], "finetune_history": [{"epoch": 1, "loss": 0.5}]}
    assert comparable(rep) != comparable({**rep, "epr": 0.31})


@pytest.mark.parametrize("phase,visit", KILLS, ids=[p for p, _ in KILLS])
def test_a_run_killed_at_each_phase_resumes_to_the_uninterrupted_report(phase, visit, reference, tmp_path):
    ref_dir, ref = reference
    out = tmp_path / "run"
    killed = _prune(out, **{faults.ENV: f"{phase}:{visit}"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (out / CHECKPOINT).is_file()
    assert not (out / "report.json").exists()
    assert (out / "model").is_dir() == (phase == "write_model")
    if phase == "write_model":  # as if killed inside save_pruned: the model's temp folder, half written, not renamed
        half = out / ".model.k1ll3d"
        (out / "model").rename(half)
        weights = half / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    resumed = _prune(out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "Traceback" not in resumed.stderr
    assert comparable(_report(out)) == comparable(ref)
    # the report is made (and checkpointed) before the model is written, so after a kill in write_model it is the
    # first process's own report; any earlier kill: the resumed process makes it
    assert _report(out)["environment"]["resumed"] is (phase != "write_model")
    assert not (out / CHECKPOINT).exists()  # removed once the resumed run finished
    assert _leftovers(out) == []  # no temp file or folder of the killed process stays
    got, want = load_file(out / "model" / "model.safetensors"), load_file(ref_dir / "model" / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def _rounds_in_checkpoint(path: Path) -> int:
    try:
        with safe_open(str(path), framework="pt") as f:
            return len(json.loads((f.metadata() or {})["state"])["rounds"])
    except Exception:  # not there yet, or being replaced
        return 0


def test_sigint_after_the_first_round_exits_130_and_resumes_to_the_same_report(reference, tmp_path):
    _, ref = reference
    out = tmp_path / "run"
    # a shell's background job (`pytest ... &`) ignores SIGINT and its children inherit that: give the run the
    # default handler, so it sees the Ctrl-C a user's terminal would send however the tests were started
    proc = subprocess.Popen([sys.executable, *PRUNE, "--out", str(out)], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 300
        while _rounds_in_checkpoint(out / CHECKPOINT) < 1:
            assert proc.poll() is None, "the run ended before its first round's checkpoint was seen"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert (out / CHECKPOINT).is_file()
    assert not [n for n in _leftovers(out) if n.endswith(".tmp")]  # the interrupted write cleaned up after itself
    resumed = _prune(out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert comparable(_report(out)) == comparable(ref)


# ---- a full disk ------------------------------------------------------------------------------------------
def _full_disk_writer(tmp: Path) -> None:
    with open(tmp, "wb") as f:
        f.write(b"half of the new file")
        f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))


def test_a_full_disk_while_replacing_a_file_leaves_the_old_file_and_no_temp_file(tmp_path):
    path = tmp_path / "checkpoint.safetensors"
    write_text(path, "the previous checkpoint")
    with pytest.raises(OSError) as e:
        atomic_replace(path, _full_disk_writer)
    assert e.value.errno == errno.ENOSPC
    assert path.read_text() == "the previous checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_full_disk_while_checkpointing_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    import spectra_gpu.run_store as run_store

    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    state = RunState(config={"target": 0.3}, widths_before={"0": 6}, kinds_by_group={"0": "neuron"},
                     min_keep={"0": 1}, params_before=44, params_prunable_before=44)
    store = RunStore(tmp_path / "run")
    store.save_checkpoint(state, model)
    before = store.checkpoint_path.read_bytes()

    def full(tensors: Any, name: str, metadata: Any) -> None:
        _full_disk_writer(Path(name))

    monkeypatch.setattr(run_store, "save_file", full)
    state.phase = "finetune"
    with pytest.raises(OSError, match="No space left"):
        store.save_checkpoint(state, model)
    assert store.checkpoint_path.read_bytes() == before
    assert [p.name for p in store.out.iterdir()] == [CHECKPOINT]
    ck = RunStore(tmp_path / "run", resume=True).load_checkpoint()
    assert ck is not None and ck.state.phase == "prune"
    assert all(torch.equal(ck.model_state[k], v) for k, v in model.state_dict().items())


# ---- the user's umask -------------------------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_get_the_users_umask(umask, tmp_path):
    old = os.umask(umask)
    try:
        write_text(tmp_path / "a.txt", "x")
        atomic_write(tmp_path / "b.bin", lambda f: f.write(b"y"))
        model = torch.nn.Linear(3, 3)
        store = RunStore(tmp_path / "run")
        store.save_checkpoint(RunState(config={}, widths_before={}, kinds_by_group={}, min_keep={},
                                       params_before=12, params_prunable_before=12), model)
    finally:
        os.umask(old)
    for p in (tmp_path / "a.txt", tmp_path / "b.bin", store.checkpoint_path):
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask, p


def test_current_umask_reads_without_changing_it():
    from spectra_gpu.report import current_umask

    old = os.umask(0o027)
    try:
        assert current_umask() == 0o027
        assert current_umask() == 0o027
    finally:
        os.umask(old)
