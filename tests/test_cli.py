"""The `spectra` CLI: the demo end to end through the console script, prune/score/report, and bad input ->
one line on stderr and exit code 2, never a traceback."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spectra_gpu.cli import main
from spectra_gpu.report import REQUIRED

SPECTRA = Path(sys.executable).with_name("spectra")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("SPECTRA_GPU_CACHE", str(cache))
    mp.setenv("SPECTRA_GPU_PROGRESS", "0")
    torch.set_num_threads(1)
    yield {**os.environ, "SPECTRA_GPU_CACHE": str(cache), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "SPECTRA_GPU_PROGRESS": "0"}
    mp.undo()


def run(argv, capsys):
    """(exit code, stdout, stderr) of the CLI in-process (argparse errors exit via SystemExit)."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.slow
def test_demo_end_to_end_console_script(env, tmp_path):
    p = subprocess.run([str(SPECTRA), "demo", "--out", str(tmp_path)], env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr
    assert "parameters: 85,002 ->" in p.stdout
    assert "accuracy: before" in p.stdout and "after fine-tune" in p.stdout and "time:" in p.stdout
    assert "Traceback" not in p.stderr
    rep = json.loads((tmp_path / "spectral" / "report.json").read_text())
    assert all(k in rep for k in REQUIRED)
    assert rep["scorer"] == "spectral" and rep["target"] == 0.5 and 0.5 <= rep["epr"] < 0.51
    assert rep["metric_after_finetune"] > 0.9
    for name in ("hybrid_rank", "random"):  # the default comparison, same recipe
        base = json.loads((tmp_path / name / "report.json").read_text())
        assert base["scorer"] == name and base["params_after"] <= base["params_before"] / 2 + 300
        assert f"  {name} " in p.stdout


@pytest.mark.parametrize("argv,match", [
    (["prune", "--model", "resnet-9000", "--out", "{tmp}"], "model: expected a built-in name"),
    (["prune", "--model", "digits-mlp", "--data", "imagenet", "--out", "{tmp}"], "data: expected one of"),
    (["prune", "--model", "digits-mlp", "--scorer", "magic", "--out", "{tmp}"], "scorer: expected one of"),
    (["prune", "--model", "digits-mlp", "--target", "1.5", "--out", "{tmp}"], "target: expected a number in"),
    (["prune", "--model", "digits-mlp", "--target", "0", "--out", "{tmp}"], "target: expected a number in"),
    (["prune", "--model", "digits-mlp", "--target", "half", "--out", "{tmp}"], "target: expected a number in"),
    (["prune", "--model", "digits-mlp", "--out", "{file}/sub"], "out: cannot create"),
    (["prune", "--model", "digits-mlp", "--out", "{file}"], "out: expected a directory"),
    (["prune", "--model", "digits-mlp"], "required: --out"),
    (["score", "--model", "digits-mlp", "--scorer", "magic", "--out", "{tmp}"], "scorer: expected one of"),
    (["report", "{tmp}"], "expected a run directory holding report.json"),
    (["demo", "--target", "2"], "target: expected a number in"),
    (["demo", "--compare", "magic"], "scorer: expected one of"),
    (["fly"], "invalid choice"),
])
def test_bad_input_one_line_exit_2(argv, match, tmp_path, capsys, env):
    f = tmp_path / "a_file"
    f.write_text("x")
    argv = [a.format(tmp=tmp_path / "run", file=f) for a in argv]
    code, out, err = run(argv, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert match in lines[0] and "Traceback" not in err


@pytest.mark.slow
def test_bad_input_through_console_script_is_one_line(env, tmp_path):
    p = subprocess.run([str(SPECTRA), "prune", "--model", "nope", "--out", str(tmp_path)], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr


@pytest.fixture(scope="module")
def pruned(env, tmp_path_factory):
    out = tmp_path_factory.mktemp("prune") / "run"
    code = main(["prune", "--model", "digits-mlp", "--target", "0.3", "--scorer", "wanda_sp", "--out", str(out),
                 "--epochs", "1", "--round-fraction", "0.1", "--one-per-neighbourhood"])
    assert code == 0
    return out


def test_prune_writes_report_plots_and_model(pruned):
    rep = json.loads((pruned / "report.json").read_text())
    assert rep["scorer"] == "wanda_sp" and rep["config"]["one_per_neighbourhood"] is True
    assert rep["config"]["finetune"]["epochs"] == 1 and len(rep["finetune_history"]) == 1
    assert rep["epr"] >= 0.3 and all(r["metric"] is not None for r in rep["rounds"])
    for f in ("report.md", "metric_vs_epr.png", "widths.png", "scores_by_layer.png", "model/model.safetensors"):
        assert (pruned / f).stat().st_size > 0
    assert not (pruned / "model.pt").exists()  # no whole-module pickle: DIR/model reloads as the built-in MLP
    assert not (pruned / "eigenvalues.png").exists()  # a baseline has no spectrum
    assert not (pruned / "checkpoint.safetensors").exists()  # removed once the run succeeded
    md = (pruned / "report.md").read_text()
    assert "accuracy after fine-tune" in md and "| layers.0 | neuron | 256 |" in md


def test_existing_run_needs_resume_and_resume_of_finished_run_is_idempotent(pruned, capsys):
    code, _, err = run(["prune", "--model", "digits-mlp", "--target", "0.3", "--scorer", "wanda_sp", "--out",
                        str(pruned)], capsys)
    assert code == 2 and "already holds a run" in err
    before = json.loads((pruned / "report.json").read_text())
    code, out, _ = run(["prune", "--model", "digits-mlp", "--target", "0.3", "--scorer", "wanda_sp", "--out",
                        str(pruned), "--epochs", "1", "--round-fraction", "0.1", "--one-per-neighbourhood",
                        "--resume"], capsys)
    assert code == 0
    after = json.loads((pruned / "report.json").read_text())
    assert after["params_after"] == before["params_after"] and after["rounds"] == before["rounds"]
    assert after["metric_after_finetune"] == before["metric_after_finetune"]


def test_saved_model_reloads_and_scores(pruned, tmp_path, capsys):
    rep = json.loads((pruned / "report.json").read_text())
    code, out, err = run(["score", "--model", str(pruned / "model"), "--data", "digits", "--scorer", "act_var",
                          "--out", str(tmp_path / "s")], capsys)
    assert code == 0, err
    for g, w in rep["widths_after"].items():
        d = torch.load(tmp_path / "s" / "scores" / f"{g}.pt", weights_only=False)
        assert d["scores"].shape == (w,)
    code, out, _ = run(["report", str(tmp_path / "s")], capsys)
    assert code == 0 and (tmp_path / "s" / "report.md").exists()


def test_report_rebuilds_md_and_plots(pruned, capsys):
    for f in ("report.md", "widths.png"):
        (pruned / f).unlink()
    code, out, _ = run(["report", str(pruned)], capsys)
    assert code == 0 and (pruned / "report.md").exists() and (pruned / "widths.png").exists()


def test_report_without_matplotlib_still_writes_md_with_one_line(pruned, tmp_path, monkeypatch, capsys):
    import shutil

    from spectra_gpu.report import NO_MATPLOTLIB

    d = tmp_path / "copy"
    shutil.copytree(pruned, d)
    for png in d.glob("*.png"):
        png.unlink()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    code, out, err = run(["report", str(d)], capsys)
    assert code == 0, err
    md = (d / "report.md").read_text()
    assert NO_MATPLOTLIB in md and "## Plots" not in md and "accuracy after fine-tune" in md
    assert not list(d.glob("*.png"))


def test_keep_checkpoints_and_version(env, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, _ = run(["prune", "--model", "digits-mlp", "--target", "0.1", "--scorer", "l1", "--out", str(out),
                      "--epochs", "0", "--round-fraction", "0.1", "--keep-checkpoints"], capsys)
    assert code == 0 and (out / "checkpoint.safetensors").stat().st_size > 0
    from spectra_gpu import __version__

    code, stdout, _ = run(["--version"], capsys)
    assert code == 0 and stdout.strip() == f"spectra_gpu {__version__}"


@pytest.mark.slow
def test_python_dash_m_runs_the_cli(env):
    from spectra_gpu import __version__

    p = subprocess.run([sys.executable, "-m", "spectra_gpu", "--version"], env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == f"spectra_gpu {__version__}"
    p = subprocess.run([sys.executable, "-m", "spectra_gpu", "fly"], env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and "invalid choice" in p.stderr
