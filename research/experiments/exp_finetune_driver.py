"""Through the product's driver (``sg.prune``): accuracy vs effective parameter reduction with one recovery
fine-tune, every method on the same built-in task and recipe.

  python research/experiments/exp_finetune_driver.py --task minilm-rt --targets 0.2 0.4 --seeds 0 1 2 \
      --out research/results/finetune_minilm.json
  python research/experiments/exp_finetune_driver.py --smoke --out /tmp/finetune_driver_smoke.json

Each run is ``sg.prune`` on a fresh copy of the task's dense model (``spectra_gpu.builtin.tasks``:
data split, calibration batches, loss, metric and fine-tune recipe are the task's, identical for every
method): rounds of ``--round-fraction`` of each group's width (heads: the driver's uniform schedule in whole
heads), every round re-capturing the signals on the already sliced model and rescoring, the last round
trimmed so the EPR lands on the target, then the task's single recovery fine-tune. Seeds are the driver's
``PruneConfig.seed`` (scorer seeds: random draws, solver starts; dropout of the fine-tune); the pretrained
model and the task's data split are the same for every seed. Records the metric before pruning, after
pruning (before FT) and after FT, the EPR achieved and the scoring seconds (capture + scorer). Methods are
the product's scorers (the driver gives ``spectral`` and ``hybrid_rank`` k = 3 on head groups). Loops
seed > target > method, rewriting the JSON after every run; ``--resume`` keeps the runs already in ``--out``
and skips them. ``--merge`` adds runs made elsewhere with the same schedule and recipe: other JSONs of this
script (two jobs on two cores) or ``report.json`` files of ``spectra prune`` (same driver, same task; a
run with scorer options becomes the method ``scorer[key=value,...]``):

  python research/experiments/exp_finetune_driver.py --task smollm2-text --round-fraction 0.05 --targets 0.2 \
      --seeds 1 --resume --merge runs/*/report.json --out research/results/finetune_smollm2.json

``--merge-only`` writes the merged runs to ``--out`` and runs nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_info, setup_threads, write_json  # noqa: E402

import spectra_gpu as sg  # noqa: E402
from spectra_gpu.builtin.tasks import load_task  # noqa: E402
from spectra_gpu.scorers import SCORERS  # noqa: E402

DEFAULT_METHODS = ["spectral", "hybrid_rank", "wanda_sp", "taylor", "random"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="minilm-rt", help="built-in task (spectra_gpu.builtin.tasks; default minilm-rt)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="PruneConfig seeds")
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    ap.add_argument("--targets", type=float, nargs="+", default=[0.2, 0.4])
    ap.add_argument("--kinds", nargs="+", default=None, help="unit kinds (default: the task's)")
    ap.add_argument("--round-fraction", type=float, default=0.10)
    ap.add_argument("--ft-steps", type=int, default=None, help="cap on fine-tune steps (default: the task's recipe)")
    ap.add_argument("--smoke", action="store_true", help="digits-mlp, one seed, spectral and random, one target")
    ap.add_argument("--resume", action="store_true", help="keep the runs already in --out and skip them")
    ap.add_argument("--merge", type=Path, nargs="+", default=[],
                    help="JSONs of this script or report.json files of `spectra prune` whose runs to add (same "
                         "task, schedule and fine-tune recipe, else an error); runs already present are skipped")
    ap.add_argument("--merge-only", action="store_true", help="write --out with the merged runs, run nothing")
    ap.add_argument("--out", required=True, type=Path)
    a = ap.parse_args(argv)
    setup_threads()
    if a.smoke:
        a.task, a.seeds, a.methods, a.targets = "digits-mlp", a.seeds[:1], ["spectral", "random"], [0.3]
    known = set(SCORERS)
    bad = [m for m in a.methods if m not in known]
    if bad:
        ap.error(f"--methods: unknown {bad}; expected names from {sorted(known)}")
    t = time.perf_counter()
    task = load_task(a.task, seed=0)
    t_task = time.perf_counter() - t
    dense = copy.deepcopy(task.model).eval()
    ft = task.finetune
    if a.ft_steps is not None:
        ft = sg.FinetuneConfig(**{**ft.to_dict(), "steps": a.ft_steps})
    kinds = tuple(a.kinds) if a.kinds else task.kinds
    out: dict[str, Any] = {
        "experiment": "finetune", "setup": a.task, "argv": sys.argv[1:] if argv is None else argv, "smoke": a.smoke,
        "machine": machine_info(), "driver": True, "kinds": list(kinds), "epr_basis": task.epr_basis,
        "round_fraction": a.round_fraction, "finetune": ft.to_dict(), "task_info": task.info,
        "mode": f"driver, rounds of {int(a.round_fraction * 100)}% with rescoring ({'+'.join(kinds)})",
        "ft_epochs": ft.epochs, "seed_note": "1 pretrained model; mean ± std over driver seeds (scorer + fine-tune)",
        "higher_is_better": task.higher_is_better, "seconds_task_setup": t_task, "models": {}, "runs": []}
    if a.resume and a.out.exists():
        _add_runs(out, json.loads(a.out.read_text()), a.out)
    for path in a.merge:
        _add_runs(out, json.loads(path.read_text()), path)
    if a.merge or a.merge_only:
        write_json(a.out, out)
    if a.merge_only:
        return out
    done = {_key(r) for r in out["runs"]}
    other_split = sorted({r["model_seed"] for r in out["runs"] if r.get("task_seed", 0) != 0} & set(a.seeds))
    if other_split:
        ap.error(f"--seeds {other_split}: --out holds runs of these seeds made on the task loaded at that seed "
                 "(spectra prune --seed); this script loads it at seed 0, so its runs would not be comparable")
    for seed in a.seeds:
        for target in a.targets:
            for m in a.methods:
                if (m, seed, target) in done:
                    continue
                cfg = sg.PruneConfig(target=target, scorer=m, kinds=kinds,
                                  round_fraction=a.round_fraction, epr_basis=task.epr_basis, seed=seed,
                                  track_metric=False, recalibrate_bn=task.recalibrate_bn, finetune=ft,
                                  uniform_widths=False)  # the recorded runs chose per-layer widths
                t = time.perf_counter()
                res = sg.prune(copy.deepcopy(dense), task.calib, cfg, loss_fn=task.loss_fn, evaluate=task.evaluate,
                            metric_name=task.metric_name, train_batches=task.train_batches, forward=task.forward,
                            plots=False, save_model=False)
                rep = res.report
                out["models"].setdefault("0", _dense(rep))
                row = _row(rep, m, seed, target, time.perf_counter() - t)
                if not all(math.isfinite(x) for x in (row["before_ft"]["metric"], row["after_ft"]["metric"])):
                    raise RuntimeError(f"{m} seed {seed} target {target}: non-finite metric {row}")
                out["runs"].append(row)
                print(f"[{a.task} seed{seed}] EPR {rep['epr']:.3f} {m:12s} dense {rep['metric_before']:.3f} "
                      f"before FT {row['before_ft']['metric']:.3f} after FT {row['after_ft']['metric']:.3f} "
                      f"({len(rep['rounds'])} rounds, scoring {row['score_seconds']:.0f}s, "
                      f"total {row['seconds_total']:.0f}s)", flush=True)
                write_json(a.out, out)
    write_json(a.out, out)
    return out


def _key(row: dict[str, Any]) -> tuple[str, int, float]:
    return row["method"], row["model_seed"], row["epr_target"]


def _dense(rep: dict[str, Any]) -> dict[str, Any]:
    return {"dense": {"metric": rep["metric_before"]}, "params": rep["params_before"],
            "params_prunable": rep["params_prunable_before"]}


def _row(rep: dict[str, Any], method: str, seed: int, target: float, seconds: float) -> dict[str, Any]:
    """One run of the table from the driver's report."""
    return {"method": method, "scorer": rep["scorer"], "model_seed": seed, "task_seed": 0, "epr_target": target,
            "epr": rep["epr"], "epr_total": rep["epr_total"], "epr_prunable": rep["epr_prunable"],
            "before_ft": {"metric": rep["metric_after_prune"]}, "after_ft": {"metric": rep["metric_after_finetune"]},
            "dense": rep["metric_before"], "score_seconds": rep["seconds_scoring"],
            "seconds_capture": rep["seconds_capture"], "seconds_scorer": rep["seconds_scorer"],
            "seconds_total": seconds, "rounds": len(rep["rounds"]), "widths_after": rep["widths_after"],
            "finetune_loss": [h.get("loss") for h in rep.get("finetune_history", [])]}


def _recipe(d: Any) -> Any:
    """A fine-tune recipe dict in the product's canonical form (``FinetuneConfig.to_dict``: fields at their
    defaults written the same way by every writer); unchanged if it is not a valid recipe."""
    try:
        return sg.FinetuneConfig(**d).to_dict()
    except (TypeError, ValueError):
        return d


def _add_runs(out: dict[str, Any], other: dict[str, Any], path: Path) -> None:
    """Add ``other``'s runs (a JSON of this script or a driver report.json) to ``out`` after checking that they
    were made on the same task with the same schedule and fine-tune recipe; runs already in ``out`` are kept."""
    if "config" in other and "metric_after_finetune" in other:  # a report.json of `spectra prune`
        c = other["config"]
        mine = {"task": out["setup"], "kinds": out["kinds"], "round_fraction": out["round_fraction"],
                "epr_basis": out["epr_basis"], "finetune": _recipe(out["finetune"])}
        theirs = {"task": other["model"], "kinds": c["kinds"], "round_fraction": c["round_fraction"],
                  "epr_basis": c["epr_basis"], "finetune": _recipe(c["finetune"])}
        extra = {k: c[k] for k in ("allocation", "one_per_neighbourhood") if k in c}
        if extra and extra != {"allocation": "uniform", "one_per_neighbourhood": False}:
            raise ValueError(f"{path}: expected the default allocation and selection, got {extra}")
        opts = c.get("scorer_options") or {}  # e.g. spectral with num_eigs=2 -> method "spectral[num_eigs=2]"
        method = other["scorer"] + ("[" + ",".join(f"{k}={v}" for k, v in sorted(opts.items())) + "]" if opts else "")
        # `spectra prune --seed S` loads the task at seed S too (its data split, batch order), this script at 0
        runs = [{**_row(other, method, c["seed"], c["target"], other["seconds_total"]), "task_seed": c["seed"]}]
        models = {"0": _dense(other)}
    elif "runs" in other and "setup" in other:
        mine = {k: out[k] for k in ("setup", "kinds", "round_fraction", "epr_basis", "finetune")}
        theirs = {k: other.get(k) for k in mine}
        mine["finetune"], theirs["finetune"] = _recipe(mine["finetune"]), _recipe(theirs["finetune"])
        runs, models = other["runs"], other.get("models", {})
    else:
        raise ValueError(f"{path}: expected a JSON of this script or a report.json of `spectra prune`, "
                         f"got keys {sorted(other)[:8]}")
    if mine != theirs:
        diff = {k: (mine[k], theirs[k]) for k in mine if mine[k] != theirs[k]}
        raise ValueError(f"{path}: made with a different setup (this run, that file): {diff}")
    for k, v in models.items():
        out["models"].setdefault(k, v)
    task_seed = {r["model_seed"]: r.get("task_seed", 0) for r in out["runs"]}
    clash = [r for r in runs if task_seed.get(r["model_seed"], r.get("task_seed", 0)) != r.get("task_seed", 0)]
    if clash:
        raise ValueError(f"{path}: runs of seed {clash[0]['model_seed']} were made on the task loaded at seed "
                         f"{clash[0].get('task_seed', 0)}, the others of that seed at "
                         f"{task_seed[clash[0]['model_seed']]}: a different data split, not comparable")
    done = {_key(r) for r in out["runs"]}
    new = [r for r in runs if _key(r) not in done]
    out["runs"] += new
    src = {"path": str(path), "runs": [list(_key(r)) for r in new]}
    src.update({k: other[k] for k in ("argv", "machine", "merged_from") if k in other})
    out.setdefault("merged_from", []).append(src)


if __name__ == "__main__":
    main()
