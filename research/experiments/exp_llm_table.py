"""The LLM table: SmolLM2 (smollm2-text, the english-text task) pruned by every criterion through the product's
CLI, ``spectra prune``, with perplexity on the held-out set after pruning, after compensation and after a
recovery fine-tune (cross-entropy or distillation from the dense model; for the best row also cross-entropy
through LoRA adapters).

Each cell is one ``spectra prune`` command (listed by ``--list``); its report.json is copied to
``research/results/llm_table/<cell>.json``, which make_report.py turns into the table on research/README.md.
A cell whose JSON exists is skipped, so an interrupted sweep continues where it stopped. Run directories (with
the saved model, ~0.5 GB each) go to ``--work`` and are removed after their report is copied.

    python research/experiments/exp_llm_table.py --jobs 2            # every cell, two at a time
    python research/experiments/exp_llm_table.py wanda_sp-t20-kd     # one cell
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "research" / "results" / "llm_table"
SPECTRA = str(Path(sys.executable).with_name("spectra"))
RECOVERY_STEPS = 150  # 150 steps x 8 sequences x 128 tokens = 153,600 training tokens
LORA = ["--lora-rank", "8", "--lora-alpha", "16", "--lr", "1e-4"]  # LLM-Pruner's LoRA recipe (rank 8, lr 1e-4)


def _cells() -> dict[str, list[str]]:
    """cell name -> the arguments of ``spectra prune`` after ``--model smollm2-text``."""
    cells: dict[str, list[str]] = {}
    for t in ("0.2", "0.4"):
        tag = f"t{round(float(t) * 100)}"
        for s in ("wanda_sp", "taylor", "flap", "spectral", "hybrid_rank"):
            cells[f"{s}-{tag}"] = ["--scorer", s, "--target", t, "--epochs", "0"]
        for seed in ("0", "1", "2"):
            cells[f"random{seed}-{tag}"] = ["--scorer", "random", "--seed", seed, "--target", t, "--epochs", "0"]
    cells["wanda_sp-t20-nbh"] = ["--scorer", "wanda_sp", "--target", "0.2", "--epochs", "0",
                                 "--one-per-neighbourhood"]
    for name in [c for c in cells if not c.endswith("-nbh")]:  # every row's CE and KD recovery
        args = cells[name]
        at = args.index("--epochs")
        base = args[:at] + args[at + 2:]  # without "--epochs 0"
        for rec in ("ce", "kd"):
            cells[f"{name}-{rec}"] = [*base, "--epochs", "1", "--steps", str(RECOVERY_STEPS), "--recovery", rec]
    cells["wanda_sp-t20-lora"] = [*cells["wanda_sp-t20-ce"], *LORA]  # the best row, CE through LoRA adapters
    return cells


CELLS = _cells()


def command(cell: str, out: Path) -> list[str]:
    return [SPECTRA, "prune", "--model", "smollm2-text", *CELLS[cell], "--no-track-metric", "--quiet",
            "--out", str(out)]


def run(cell: str, work: Path, threads: int) -> str:
    """Run one cell unless its JSON exists or another sweep holds its lock (``<cell>.running`` beside the
    JSONs: several sweeps may share the cells; a sweep that died leaves its locks, delete them)."""
    dest = RESULTS / f"{cell}.json"
    if dest.exists():
        return f"{cell}: done before"
    lock = RESULTS / f"{cell}.running"
    try:
        os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return f"{cell}: running in another sweep"
    try:
        return _run(cell, dest, work, threads)
    finally:
        lock.unlink()


def collect(cell: str, out: Path, dest: Path) -> None:
    """Copy ``out``/report.json into ``dest`` atomically, without the per-unit score distributions and the
    eigenvalues (the table does not read them), then delete ``out``."""
    report = json.loads((out / "report.json").read_text())
    for big in ("score_distributions", "eigenvalues"):
        report.pop(big, None)
    tmp = dest.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(dest)
    shutil.rmtree(out, ignore_errors=True)


def _run(cell: str, dest: Path, work: Path, threads: int) -> str:
    out = work / cell
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    t = time.time()
    log = work / f"{cell}.log"
    with open(log, "w") as fh:
        rc = subprocess.call(command(cell, out), env=env, stdout=fh, stderr=subprocess.STDOUT)
    if rc != 0:
        return f"{cell}: FAILED (exit {rc}), see {log}"
    collect(cell, out, dest)
    return f"{cell}: {time.time() - t:.0f} s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cells", nargs="*", help=f"cells to run (default all): {', '.join(CELLS)}")
    ap.add_argument("--jobs", type=int, default=1, help="cells run at once (each on --threads threads)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=Path("/tmp/spectra-llm-table"))
    ap.add_argument("--list", action="store_true", help="print each cell's command and exit")
    ap.add_argument("--collect", type=Path, metavar="DIR",
                    help="copy the report of a finished run directory DIR of the one cell given, then exit")
    a = ap.parse_args()
    unknown = [c for c in a.cells if c not in CELLS]
    if unknown:
        ap.error(f"unknown cells {unknown}: expected some of {list(CELLS)}")
    cells = a.cells or list(CELLS)
    if a.list:
        for c in cells:
            print(f"{c}: spectra prune " + " ".join(command(c, Path("DIR"))[2:]))
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    if a.collect is not None:
        if len(a.cells) != 1:
            ap.error("--collect: expected exactly one cell")
        collect(a.cells[0], a.collect, RESULTS / f"{a.cells[0]}.json")
        return
    a.work.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(a.jobs) as pool:
        for line in pool.map(lambda c: run(c, a.work, a.threads), cells):
            print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)


if __name__ == "__main__":
    main()
