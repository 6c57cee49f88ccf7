"""The package installs beside any torch from its declared minimum up and runs on its hard dependencies alone.

- setup.py: a torch floor and no upper pin, safetensors and scikit-learn hard, the py.typed marker shipped.
- pip's resolver (dry run, no index) beside an installed torch 2.4.0 keeps it; beside one below the floor it
  wants another (so the check can fail).
- slow: a fresh venv holding only the hard dependencies (no matplotlib, no transformers) runs ``spectra demo``
  and ``spectra prune ... --out`` to the end.
"""

from __future__ import annotations

import json
import os
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import setuptools

ROOT = Path(__file__).resolve().parents[1]


def _setup_kwargs(monkeypatch: pytest.MonkeyPatch) -> dict:
    got: dict = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: got.update(kw))
    monkeypatch.chdir(ROOT)
    runpy.run_path(str(ROOT / "setup.py"))
    return got


def _name(req: str) -> str:
    return re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].lower().replace("_", "-")


def test_setup_takes_any_torch_from_the_floor_and_ships_py_typed(monkeypatch):
    kw = _setup_kwargs(monkeypatch)
    reqs = {_name(r): r for r in kw["install_requires"]}
    torch_req = reqs["torch"].replace(" ", "")
    assert re.fullmatch(r"torch>=\d+\.\d+(\.\d+)?", torch_req), torch_req  # a floor, no upper pin, no ==
    assert "torch==" not in (ROOT / "setup.py").read_text()
    assert {"safetensors", "scikit-learn", "numpy", "scipy", "tqdm"} <= set(reqs)
    assert "matplotlib" not in reqs  # optional: report.md is written without plots
    assert "py.typed" in kw["package_data"]["spectra_gpu"] and (ROOT / "spectra_gpu" / "py.typed").is_file()
    assert {"cupy-cuda12", "cupy-cuda13"} <= set(kw["extras_require"])
    assert not any("cupy" in d for d in kw["extras_require"]["all"])  # the CUDA major is the user's choice
    floor = tuple(int(x) for x in torch_req.split(">=")[1].split(".")[:2])
    import torch

    assert tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= floor


@pytest.fixture(scope="module")
def wheel_dir(tmp_path_factory) -> Path:
    """A wheel of the package built from a copy of the sources (the working tree gets no build/ folder)."""
    src = tmp_path_factory.mktemp("src")
    for f in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / f, src / f)
    shutil.copytree(ROOT / "spectra_gpu", src / "spectra_gpu", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("wheels")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-index",
                           "--no-build-isolation", "-w", str(out), str(src)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list(out.glob("spectra_gpu-*.whl"))) == 1
    return out


def _fake_dist(site: Path, name: str, version: str) -> None:
    """An installed-distribution record (dist-info) without any code: all pip's resolver looks at."""
    d = site / f"{name.replace('-', '_')}-{version}.dist-info"
    d.mkdir(parents=True)
    (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (d / "INSTALLER").write_text("pip\n")
    (d / "RECORD").write_text("")


def _env_with(tmp: Path, torch_version: str) -> Path:
    """A throwaway venv (no pip) whose only 'installed' packages are fake dist-infos of torch and the other
    hard dependencies; returns its python."""
    venv = tmp / f"torch-{torch_version}"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    for name, version in (("torch", torch_version), ("numpy", "1.26.4"), ("scipy", "1.11.4"), ("tqdm", "4.66.0"),
                          ("safetensors", "0.4.3"), ("scikit-learn", "1.4.2")):
        _fake_dist(site, name, version)
    return py


def _dry_run(py: Path, wheel_dir: Path, tmp: Path) -> tuple[subprocess.CompletedProcess, list[str]]:
    report = tmp / f"report-{py.parent.parent.name}.json"
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--dry-run", "--no-index",
                           "--no-build-isolation", "--find-links", str(wheel_dir), "--report", str(report),
                           "spectra_gpu"], capture_output=True, text=True, timeout=600)
    names = [_name(i["metadata"]["name"]) for i in json.loads(report.read_text())["install"]] \
        if proc.returncode == 0 else []
    return proc, names


def test_pip_keeps_an_installed_torch_from_the_floor_up(tmp_path, wheel_dir):
    proc, names = _dry_run(_env_with(tmp_path, "2.4.0"), wheel_dir, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert names == ["spectra-gpu"], names  # torch 2.4.0 (and every other dependency) stays as installed


def test_pip_replaces_a_torch_below_the_floor(tmp_path, wheel_dir):
    proc, names = _dry_run(_env_with(tmp_path, "1.13.1"), wheel_dir, tmp_path)
    # a local torch wheel reachable through the machine's pip configuration is planned as a replacement;
    # without one the resolver fails naming torch
    assert "torch" in names or (proc.returncode != 0 and "torch" in proc.stderr), (names, proc.stderr[-2000:])


@pytest.mark.slow
def test_bare_install_runs_demo_and_prune_to_the_end(tmp_path, wheel_dir):
    venv = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py, bindir = venv / "bin" / "python", venv / "bin"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg",
               PATH=f"{bindir}{os.pathsep}{env.get('PATH', '')}")
    wheel = next(wheel_dir.glob("spectra_gpu-*.whl"))
    # the CPU torch the suite runs on (from the local wheel cache when configured), then the package's own deps
    inst = subprocess.run([str(py), "-m", "pip", "install", "-q", "torch==2.13.0", str(wheel)], env=env,
                          capture_output=True, text=True, timeout=1200)
    assert inst.returncode == 0, inst.stderr[-3000:]
    absent = subprocess.run([str(py), "-c", "import importlib.util as u; print([m for m in ('matplotlib', "
                             "'transformers', 'pytest', 'torch_pruning') if u.find_spec(m)])"],
                            env=env, capture_output=True, text=True, check=True)
    assert absent.stdout.strip() == "[]"  # honestly bare: no extras leaked in

    def spectra(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(bindir / "spectra"), *args], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=1800)

    demo = spectra("demo", "--out", str(tmp_path / "demo"))
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-3000:]
    run = spectra("prune", "--model", "digits-mlp", "--target", "0.3", "--epochs", "0", "--out",
                  str(tmp_path / "run"))
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "report.md").is_file() and (tmp_path / "run" / "report.json").is_file()
    said = [ln for ln in (run.stdout + run.stderr).splitlines() if "matplotlib" in ln]
    assert len(said) <= 1, said  # plots missing: at most one clear line
    version = spectra("--version")
    assert version.returncode == 0 and "spectra_gpu" in version.stdout
