"""Build research/README.md (tables) and PNG plots from the committed evidence JSONs, so every
number on the results page comes from a JSON an experiment wrote.

  python research/experiments/make_report.py

The page is report_template.md with each {{table:KIND:FILES[:...]}} / {{plot:KIND:FILE[:SCOPE]}} marker
replaced (kinds: see ``render``); ``experiments`` and ``changes`` list every experiment's command, runtime and
provenance, and the old (OLD_COMMIT) against the new headline figures of every rerun experiment. Needs only
numpy and matplotlib (no product import), and git for the old figures."""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "research"
EVIDENCE = RESULTS / "results"  # the JSONs (and PNGs) the page cites; no product import needed to render
MAIN_ROWS = ["spectral", "spectral_s128", "spectral_full", "spectral_rev", "spectral_sym", "hybrid", "hybrid_full",
             "hybrid_rank", "wanda_sp", "flap", "act_var", "act_mean", "weight_l1", "weight_l2", "taylor", "apoz",
             "random"]


def _load(name: str) -> dict[str, Any] | None:
    """One evidence JSON, or several joined by '+' (same setup and fractions, all made by the same code):
    their runs are pooled, the model info is the first file's. Missing files are skipped; None if none
    exists."""
    parts = [EVIDENCE / n for n in name.split("+")]
    found = [json.loads(p.read_text()) for p in parts if p.exists()]
    if not found:
        return None
    data = found[0]
    for extra in found[1:]:
        if extra.get("fractions") != data.get("fractions"):
            raise ValueError(f"{name}: expected the same fractions in every file")
        if ported(extra) != ported(data):
            raise ValueError(f"{name}: expected files made by the same code, got ported and pre-port runs")
        data["runs"] = data["runs"] + extra["runs"]
    return data


def _fmt(vals: list[float], scale: float = 1.0, digits: int = 3) -> str:
    v = np.asarray(vals, dtype=float) * scale
    if len(v) == 0:
        return ""
    if len(v) == 1:
        return f"{v[0]:,.{digits}f}"
    return f"{v.mean():,.{digits}f} ± {v.std(ddof=1):,.{digits}f}"


def removal_cells(runs: list[dict[str, Any]], scope: str) -> dict[tuple[str, str], dict[str, Any]]:
    """(method, mode) -> per-fraction lists over model seeds (random: the per-seed mean of its draws)."""
    per: dict[tuple[str, str], dict[int, list[list[float]]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        if r["scope"] != scope:
            continue
        per[(r["method"], r["mode"])][r["model_seed"]].append([p["metric"] for p in r["points"]])
    out = {}
    for key, seeds in per.items():
        arr = np.array([np.mean(v, axis=0) for v in seeds.values()])  # [seeds, fractions]
        out[key] = {"vals": arr, "seeds": len(seeds)}
    return out


def removal_table(data: dict[str, Any], scope: str, modes: list[str], rows: list[str] | None = None,
                  sort: bool = True) -> str:
    cells = removal_cells(data["runs"], scope)
    fr = data["fractions"]
    metric = "accuracy" if data["setup"] in ("mlp", "cnn", "minilm", "minilm_heads") else "-perplexity"
    rnd = cells.get(("random", "oneshot"))
    head = ("| method | selection | " + " | ".join(f"{int(f * 100)}% removed" for f in fr)
            + " | mean | vs random one-shot | seeds |\n|---|---|" + "---|" * (len(fr) + 3) + "\n")
    body = []
    for (m, mode), c in cells.items():
        if mode not in modes or (rows is not None and m not in rows):
            continue
        v = c["vals"]
        mean = v.mean(axis=1)
        delta = "" if rnd is None or len(rnd["vals"]) != len(v) else f"{(mean - rnd['vals'].mean(axis=1)).mean():+.3f}"
        body.append((float(mean.mean()), f"| {m} | {mode} | " + " | ".join(_fmt(v[:, j]) for j in range(v.shape[1]))
                     + f" | {mean.mean():.3f} | {delta} | {c['seeds']} |"))
    if not body:
        return f"*(scope {scope!r} with selections {modes} not run)*\n"
    if sort:
        body.sort(key=lambda t: -t[0])
    dense = np.mean([m["dense"]["metric"] for m in data["models"].values()])
    return (f"Dense {metric}: {dense:.3f} (mean over {len(data['models'])} trained model(s)).\n\n" + head
            + "\n".join(b for _, b in body) + "\n")


MLP_FILES = "removal_mlp.json"
HEADLINE = [("MLP, layer 1", MLP_FILES, "layer1"), ("MLP, both layers", MLP_FILES, "all"),
            ("MNIST CNN, conv1", "removal_cnn.json", "layer1"), ("MNIST CNN, all layers", "removal_cnn.json", "all"),
            ("MiniLM FFN, layer 3", "removal_minilm_layer.json", "layer1"),
            ("MiniLM FFN, all 6 layers", "removal_minilm.json+removal_minilm_knobs.json", "all"),
            ("MiniLM attention heads, all 6 layers", "removal_minilm_heads.json", "all"),
            ("SmolLM2 FFN, 4 layers", "removal_smollm2.json", "all")]


def _family(m: str) -> str:
    if m == "random":
        return "random"
    if m == "spectral_top_first":
        return "control"
    if m.startswith("hybrid"):
        return "hybrid"
    return "spectral" if m.startswith("spectral") else "baseline"


def headline_table() -> str:
    """Per setup: the metric averaged over removal fractions and seeds for the spec default, the best
    spectral-family entry, the best baseline and random one-shot (no fine-tune)."""
    lines = ["| setup (no fine-tune, mean over fractions) | random one-shot | spectral default one-shot | "
             "best pure spectral variant (selection) | best spectral hybrid (selection) | best baseline (selection) "
             "| best pure spectral − random | made by |",
             "|---|---|---|---|---|---|---|---|"]
    for label, files, scope in HEADLINE:
        data = _load(files)
        if data is None:
            continue
        cells = removal_cells(data["runs"], scope)
        if not cells:
            continue
        mean = {k: float(c["vals"].mean()) for k, c in cells.items()}
        rnd = mean.get(("random", "oneshot"), float("nan"))
        fr = ",".join(f"{int(f * 100)}" for f in data["fractions"])

        def best(fam: str, mean: dict[tuple[str, str], float] = mean) -> tuple[str, float]:
            ks = [k for k in mean if _family(k[0]) == fam]
            if not ks:
                return "", float("nan")
            k = max(ks, key=lambda k: mean[k])
            return f"{k[0]} ({k[1]}) {mean[k]:.3f}", mean[k]

        bs, bsv = best("spectral")
        bh, _ = best("hybrid")
        bb, _ = best("baseline")
        d = mean.get(("spectral", "oneshot"), float("nan"))
        made = (f"rerun, {_setup_of(data)}" if ported(data)
                else f"pre-port code at {data.get('machine', {}).get('git_sha', '?')}")
        lines.append(f"| {label} ({fr}% removed) | {rnd:.3f} | {d:.3f} | {bs} | {bh} | {bb} | {bsv - rnd:+.3f} "
                     f"| {made} |")
    return "\n".join(lines) + "\n"


def ablation_table(data: dict[str, Any]) -> str:
    rel = data["reliability"]
    lines = [f"Setup {data['setup']}, group {data['group']}: {len(data['ablated_units'])} units ablated one at a "
             f"time on {data['n_eval']} eval samples. Ground-truth split-half reliability (Spearman between "
             f"even/odd halves; Spearman-Brown in brackets): |loss change| "
             f"{rel['dloss_abs']['split_half']:.2f} ({rel['dloss_abs']['spearman_brown']:.2f}), signed loss "
             f"change {rel['dloss_signed']['split_half']:.2f} ({rel['dloss_signed']['spearman_brown']:.2f})"
             + (f", output KL {rel['kl_signed']['split_half']:.2f} ({rel['kl_signed']['spearman_brown']:.2f})"
                if 'kl_signed' in rel and np.isfinite(rel['kl_signed']['split_half']) else "") + ".",
             "",
             "| method | Spearman / Kendall vs \\|dloss\\| | bottom-10/30/50% precision (\\|dloss\\|) | "
             "Spearman / Kendall vs KL | bottom-10/30/50% precision (KL) | score split-half | score time (s) |",
             "|---|---|---|---|---|---|---|"]
    rows = sorted(data["methods"], key=lambda r: -np.nan_to_num(r.get("spearman_kl", r["spearman_abs_dloss"])))
    for r in rows:
        kl = (f"{r['spearman_kl']:+.2f} / {r['kendall_kl']:+.2f} | "
              f"{r['bottom10_kl']:.2f} / {r['bottom30_kl']:.2f} / {r['bottom50_kl']:.2f}") if "spearman_kl" in r \
            else " | "
        lines.append(f"| {r['method']} | {r['spearman_abs_dloss']:+.2f} / {r['kendall_abs_dloss']:+.2f} | "
                     f"{r['bottom10_abs_dloss']:.2f} / {r['bottom30_abs_dloss']:.2f} / {r['bottom50_abs_dloss']:.2f} | "
                     f"{kl} | {r.get('score_split_half', float('nan')):.2f} | {r['score_seconds']:.3f} |")
    lines.append("")
    lines.append("Random expectation of bottom-q precision = q (0.10 / 0.30 / 0.50); of every correlation = 0.")
    return "\n".join(lines) + "\n"


def finetune_table(data: dict[str, Any]) -> str:
    per: dict[tuple[str, float], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    eprs: dict[float, list[float]] = defaultdict(list)
    for r in data["runs"]:
        key = (r["method"], r["epr_target"])
        per[key]["before"].append(r["before_ft"]["metric"])
        per[key]["after"].append(r["after_ft"]["metric"])
        per[key]["t"].append(r["score_seconds"])
        eprs[r["epr_target"]].append(r["epr"])
    targets = sorted(eprs)
    hib, drv = data.get("higher_is_better", True), bool(data.get("driver"))
    digits = 3 if hib else 0  # accuracy / perplexity
    methods = sorted({m for m, _ in per}, key=lambda m: ((-1 if hib else 1) * np.mean(
        [np.mean(per[(m, t)]["after"]) for t in targets if (m, t) in per]), m))  # ties: by name, every run alike
    dense = np.array([m["dense"]["metric"] for m in data["models"].values()])
    seeds = sorted({r["model_seed"] for r in data["runs"]})
    who = (f"{data['seed_note']} ({len(seeds)} seed(s): {', '.join(map(str, seeds))})" if "seed_note" in data
           else f"{len(data['models'])} trained models (seeds)")
    lines = [f"Schedule for every method: {data['mode']}; recovery fine-tune {data['ft_epochs']} epochs; "
             f"{who}; dense {'accuracy' if hib else 'perplexity'} {_fmt(list(dense), digits=max(digits, 1))}. "
             "EPR achieved: "
             + ", ".join(f"{np.mean(eprs[t]):.3f}" for t in targets)
             + (f" ({data['epr_basis']} basis; of all parameters: "
                + ", ".join(f"{np.mean([r['epr_total'] for r in data['runs'] if r['epr_target'] == t]):.3f}"
                            for t in targets) + ")" if drv else "") + ".", "",
             "| method | " + " | ".join(f"EPR {int(t * 100)}%: before FT → after FT" for t in targets)
             + (" | scoring time per run (s; capture + scorer, all rounds) | runs per cell |" if drv
                else " | scoring time per model (s) |"),
             "|---|" + "---|" * (len(targets) + 1 + drv)]
    for m in methods:
        cells = []
        for t in targets:
            c = per.get((m, t))
            cells.append(f"{_fmt(c['before'], digits=digits)} → **{_fmt(c['after'], digits=digits)}**" if c else "")
        ts = [x for t in targets for x in per.get((m, t), {}).get("t", [])]
        n = "/".join(str(len(per[(m, t)]["after"])) if (m, t) in per else "0" for t in targets)
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {np.mean(ts):.2f} |" + (f" {n} |" if drv else ""))
    return "\n".join(lines) + "\n"


def plot_removal(data: dict[str, Any], scope: str, path: Path, methods: list[tuple[str, str]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = removal_cells(data["runs"], scope)
    fr = [0.0] + data["fractions"]
    dense = np.mean([m["dense"]["metric"] for m in data["models"].values()])
    fig, ax = plt.subplots(figsize=(6, 4))
    for m, mode in methods:
        c = cells.get((m, mode))
        if c is None:
            continue
        v = c["vals"]
        ax.errorbar(fr, [dense] + list(v.mean(0)), yerr=[0] + list(v.std(0)), label=f"{m} ({mode})", capsize=2,
                    ls="--" if m == "random" else "-")
    ax.set_xlabel("fraction of units removed (no fine-tune)")
    ax.set_ylabel("accuracy" if data["setup"] != "smollm2" else "-perplexity")
    ax.set_title(f"{data['setup']} - {scope}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save_fig(fig, path)
    plt.close(fig)


def plot_finetune(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    eprs: dict[float, list[float]] = defaultdict(list)
    for r in data["runs"]:
        per[r["method"]][r["epr_target"]].append(r["after_ft"]["metric"])
        eprs[r["epr_target"]].append(r["epr"])
    hib = data.get("higher_is_better", True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for m, d in per.items():
        ts = sorted(d)
        ax.errorbar([np.mean(eprs[t]) for t in ts], [np.mean(d[t]) for t in ts], yerr=[np.std(d[t]) for t in ts],
                    label=m, capsize=2, ls="--" if m == "random" else "-", marker="o", ms=3)
    if not hib:
        ax.set_yscale("log")
    ax.set_xlabel("effective parameter reduction")
    ax.set_ylabel(f"{'accuracy' if hib else 'perplexity (log scale)'} after one recovery fine-tune")
    ax.set_title(data["setup"])
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save_fig(fig, path)
    plt.close(fig)


def _save_fig(fig: Any, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=110)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


PLOT_METHODS = [("spectral", "oneshot"), ("spectral", "iter5_nbh"), ("hybrid_rank", "iter5_nbh"),
                ("wanda_sp", "oneshot"), ("taylor", "iter5"), ("random", "oneshot"), ("random", "iter5_nbh")]

PLOT_METHODS_BY_SETUP = {
    "minilm_heads": [("spectral", "oneshot"), ("spectral", "iter1head"), ("spectral_s2", "oneshot"),
                     ("hybrid_rank", "oneshot"), ("wanda_sp", "oneshot"), ("taylor", "oneshot"),
                     ("taylor", "iter1head"), ("random", "oneshot"), ("random", "iter1head")],
    "cnn": [("spectral", "oneshot"), ("spectral", "iter10_nbh"), ("hybrid_rank", "iter10_nbh"),
            ("wanda_sp", "oneshot"), ("wanda_sp", "iter10_nbh"), ("taylor", "iter10_nbh"), ("random", "oneshot"),
            ("random", "iter10_nbh")]}


def driver_table(folder: str) -> str:
    """One row per run from the report.json files ``spectra prune`` wrote (copied into results/<folder>/)."""
    runs = [json.loads(p.read_text()) for p in sorted((EVIDENCE / folder).glob("*.json"))]
    if not runs:
        return f"*(not run yet: {folder})*\n"
    sign = -1.0 if runs[0]["higher_is_better"] else 1.0
    runs.sort(key=lambda r: (round(r["epr"], 2), sign * r["metric_after_prune"]))  # by target, then best first
    m = runs[0]["metric_name"]
    out = (f"| scorer | options | {m} dense | {m} after pruning (no fine-tune) | EPR | rounds | "
           f"scoring time (s) |\n|---|---|---|---|---|---|---|\n")
    for r in runs:
        opts = ", ".join(f"{k}={v}" for k, v in r["config"]["scorer_options"].items()) or "defaults"
        out += (f"| {r['scorer']} | {opts} | {r['metric_before']:.1f} | {r['metric_after_prune']:,.1f} | "
                f"{r['epr']:.4f} | {len(r['rounds'])} | {r['seconds_scoring']:.0f} |\n")
    return out


SAME_PRUNING_RTOL = 1e-3  # cells of one row whose figures differ more pruned other units (see llm_table)


def llm_table(folder: str) -> str:
    """The LLM table from the report.json files exp_llm_table.py copied into results/<folder>/: one row per
    criterion and target, perplexity after pruning, after compensation and (where that cell ran) after the CE
    and the KD recovery fine-tune, and through LoRA adapters (CE). A recovery cell runs the same pruning and
    compensation as its row's cell (the rounds update no parameter), so a row whose own cell did not run takes
    those two figures from it; where several ran, their after-compensation figures are listed below the table
    (a reproduction check). Cells whose after-pruning or after-compensation figure differs from the row's by
    more than SAME_PRUNING_RTOL selected other units (another machine's float rounding can flip a near tie and
    the rounds cascade from it): they get a line of their own, so every recovery figure stands beside the
    pruned model it started from."""
    runs = {p.stem: json.loads(p.read_text()) for p in sorted((EVIDENCE / folder).glob("*.json"))}
    if not runs:
        return f"*(not run yet: {folder})*\n"
    dense = next(iter(runs.values()))["metric_before"]

    def ppl(x: float | None) -> str:
        return "-" if x is None else f"{x:,.1f}"

    def same_pruning(a: dict[str, Any], b: dict[str, Any]) -> bool:
        return all(math.isclose(a[k], b[k], rel_tol=SAME_PRUNING_RTOL)
                   for k in ("metric_after_prune", "metric_after_compensation"))

    rows: dict[str, list[str]] = {}
    for cell in runs:
        rows.setdefault(cell.removesuffix("-ce").removesuffix("-kd").removesuffix("-lora"), []).append(cell)
    out = (f"Dense perplexity {dense:.2f}. \"-\": not run (compute, see below). Minutes: each cell's "
           "`seconds_total` (recovery rows: CE / KD / LoRA cell), 1 thread each, 2-5 runs sharing the 2 cores. "
           "A line named after a recovery cell: that cell pruned other units than its row (see below).\n\n"
           "| row | criterion | EPR total / prunable | rounds | after pruning | after compensation "
           "| after CE recovery | after KD recovery | after LoRA recovery (CE) | minutes |\n"
           "|---|---|---|---|---|---|---|---|---|---|\n")
    repeats = []
    for name, cells in sorted(rows.items(), key=lambda kv: (runs[kv[1][0]]["config"]["target"], kv[0])):
        lines: list[list[str]] = []  # cells that pruned alike, the row's own cell (or its first) leading
        for c in sorted(cells):  # the row's cell sorts before its -ce / -kd / -lora cells
            home = next((ln for ln in lines if same_pruning(runs[ln[0]], runs[c])), None)
            if home is None:
                lines.append([c])
            else:
                home.append(c)
        for k, same in enumerate(lines):
            r = runs[same[0]]
            crit = r["scorer"] + (f" (seed {r['config']['seed']})" if r["scorer"] == "random" else "")
            crit += ", one per neighbourhood" if r["config"]["one_per_neighbourhood"] else ""
            rec = {loss: runs[f"{name}-{loss}"] if f"{name}-{loss}" in same else None for loss in ("ce", "kd", "lora")}
            minutes = " / ".join(f"{runs[c]['seconds_total'] / 60:.0f}" for c in same)
            out += (f"| `{name if k == 0 else same[0]}` | {crit} | {r['epr']:.3f} / {r['epr_prunable']:.3f} | "
                    f"{len(r['rounds'])} | {ppl(r['metric_after_prune'])} | "
                    f"{ppl(r.get('metric_after_compensation'))} | "
                    f"{ppl(rec['ce'] and rec['ce']['metric_after_finetune'])} | "
                    f"{ppl(rec['kd'] and rec['kd']['metric_after_finetune'])} | "
                    f"{ppl(rec['lora'] and rec['lora']['metric_after_finetune'])} | {minutes} |\n")
        if len(cells) > 1:
            repeats.append(f"`{name}`: " + ", ".join(
                f"{runs[c]['metric_after_compensation']!r} (`{c}`)" for c in sorted(cells)))
    if repeats:
        out += "\nAfter-compensation perplexity of the cells that share a row's pruning: " + "; ".join(repeats) + ".\n"
    return out + llm_provenance(runs)


def _host(env: dict[str, Any]) -> str:
    """The machine a report ran on, as report.json records it: the platform string (its kernel build tells the
    sessions' machines apart) and, from reports that record it, the CPU and torch's kernel ISA."""
    cpu = env.get("cpu")
    return env["platform"] + (f", {cpu['model']} ({cpu['capability']})" if cpu else ", CPU not recorded")


def llm_provenance(runs: dict[str, dict[str, Any]]) -> str:
    """Where each cell ran (commit and machine, from its report's ``environment``) and which cells the runner
    defines that have no JSON yet."""
    from exp_llm_table import CELLS  # the runner's cell list; beside this file, no product import

    where: dict[tuple[str, str], list[str]] = defaultdict(list)
    for cell, r in runs.items():
        env = r["environment"]
        commit = env["git"]["commit"][:7] + (" (uncommitted changes)" if env["git"]["dirty"] else "")
        where[(commit, _host(env))].append(cell)
    out = "\nWhere each cell ran (commit, then machine; 1 thread per cell):\n\n"
    for (commit, host), cells in sorted(where.items(), key=lambda kv: min(runs[c]["environment"]["timestamp_utc"]
                                                                          for c in kv[1])):
        out += f"- {commit} on {host}: " + ", ".join(f"`{c}`" for c in sorted(cells)) + "\n"
    missing = [c for c in CELLS if c not in runs]
    out += "\nCells defined but not run yet (`exp_llm_table.py CELL` runs one): "
    return out + (", ".join(f"`{c}`" for c in missing) if missing else "none") + ".\n"


def magnitude_table(data: dict[str, Any]) -> str:
    out = ("| FFN layer | max / median ‖a_i‖₂ | spectral percentile of the 5 largest-‖a_i‖₂ units "
           "(0 = pruned first) |\n|---|---|---|\n")
    for lay in data["layers"]:
        ps = ", ".join(f"{p:.2f}" for p in lay["spectral_percentile_of_top"])
        out += f"| {lay['group']} | {lay['max_over_median_l2']:.1f} | {ps} |\n"
    return out + (f"\nMean percentile of those units: {data['mean_percentile_of_top']:.2f} (uniform: 0.50); "
                  f"below 0.05, i.e. removed in the first 5 % round: {data['fraction_of_top_below_0.05']:.0%} "
                  f"(uniform: 5 %); below 0.25: {data['fraction_of_top_below_0.25']:.0%} (uniform: 25 %).\n")


# ---------------------------------------------------------------------------------------------- provenance
OLD_COMMIT = "0bf8f88"  # the last commit whose evidence came from the pre-port experiment code
# step -> (evidence files, what it shows); the command is `bash research/experiments/run_all.sh STEP`
EXPERIMENTS: list[tuple[str, str, str]] = [
    ("removal_mlp", "removal_mlp.json", "MLP neurons: cumulative removal without fine-tune, every method (with "
     "the top-first sanity gate and the spectral x Taylor rank) x one-shot / iterative / one per neighbourhood, "
     "layer 1 and both layers, round sizes"),
    ("ablation_mlp", "ablation_mlp.json", "single-unit ablation truth vs every score, MLP layer 1"),
    ("ablation_mlp_layer2", "ablation_mlp_layer2.json", "the same, MLP layer 2"),
    ("finetune_mlp", "finetune_mlp.json", "accuracy vs EPR after one recovery fine-tune (sg.prune), MLP"),
    ("removal_cnn", "removal_cnn.json", "CNN channels + fc neurons (mnist-cnn): cumulative removal, no fine-tune"),
    ("finetune_cnn", "finetune_cnn.json", "accuracy vs EPR after one recovery fine-tune (sg.prune), CNN"),
    ("removal_minilm", "removal_minilm.json", "MiniLM FFN neurons, all 6 layers: cumulative removal, no fine-tune"),
    ("removal_minilm_knobs", "removal_minilm_knobs.json", "the same, s = 2 and s = 8 eigenpairs"),
    ("removal_minilm_layer", "removal_minilm_layer.json", "MiniLM FFN layer 3 only"),
    ("removal_minilm_heads", "removal_minilm_heads.json", "MiniLM attention heads: removal without fine-tune"),
    ("removal_minilm_heads_knobs", "removal_minilm_heads_knobs.json", "the same, spectral knob variants"),
    ("removal_minilm_heads_replication", "removal_minilm_heads_replication.json",
     "heads on 4,000 other held-out snippets (replication of s = 2)"),
    ("ablation_minilm", "ablation_minilm.json", "single-unit ablation, MiniLM FFN layer 3 (192 neurons)"),
    ("finetune_minilm", "finetune_minilm.json", "MiniLM FFN + heads, accuracy vs EPR after fine-tune (sg.prune)"),
    ("finetune_minilm_heads", "finetune_minilm_heads.json", "MiniLM heads only, s = 2 vs baselines, fine-tuned"),
    ("removal_smollm2", "removal_smollm2.json", "SmolLM2 FFN neurons (4 layers): removal without fine-tune"),
    ("finetune_smollm2", "finetune_smollm2.json", "SmolLM2 FFN + heads, perplexity vs EPR after fine-tune"),
    ("magnitude_smollm2", "magnitude_smollm2.json", "is the spectral score blind to massive activations?"),
]
NOT_IN_RUN_ALL = {"removal_minilm_heads_replication", "finetune_minilm_heads", "finetune_smollm2",
                  "magnitude_smollm2"}


def _seconds(data: dict[str, Any]) -> float:
    """Compute time an evidence JSON records (its own total, else the sum over its runs)."""
    if "seconds_total" in data:
        return float(data["seconds_total"])
    if "seconds" in data:
        return float(data["seconds"])
    tot = float(data.get("ground_truth_seconds") or 0.0)
    tot += sum(float(r.get("score_seconds", 0.0)) for r in data.get("methods", []))
    for r in data.get("runs", []):
        tot += float(r.get("wall_seconds", r.get("seconds_total", r.get("prune_seconds", 0.0)
                                                              + r.get("ft_seconds", 0.0))))
    return tot


def _minutes(sec: float) -> str:
    return f"{sec / 60:.1f} min" if sec >= 60 else f"{sec:.0f} s"


def ported(data: dict[str, Any]) -> bool:
    """Whether the JSON was written by the ported experiment code (capture, masking, data all the product's)."""
    return str(data.get("machine", {}).get("code", "")).startswith("product API")


OLD_PARTS = {"removal_mlp.json": ["removal_mlp_top_first.json", "removal_mlp_hybrid_taylor.json"]}  # then apart


def _old(file: str) -> dict[str, Any] | None:
    """The evidence JSON as it was at OLD_COMMIT (git history; runs of OLD_PARTS pooled in), or None."""
    import subprocess

    def show(name: str) -> dict[str, Any] | None:
        try:
            txt = subprocess.run(["git", "show", f"{OLD_COMMIT}:research/results/{name}"], capture_output=True,
                                 text=True, cwd=ROOT, check=True).stdout
            return json.loads(txt)  # type: ignore[no-any-return]
        except (OSError, subprocess.CalledProcessError, json.JSONDecodeError):
            return None

    data = show(file)
    for part in OLD_PARTS.get(file, []) if data is not None else []:
        extra = show(part)
        if extra is not None:
            data["runs"] = data["runs"] + extra["runs"]  # type: ignore[index]
    return data


def headline(data: dict[str, Any], target: float | None = None) -> str:
    """One line of the experiment's headline figures (what the 'what changed' lines compare); fine-tune
    experiments at EPR ``target`` (default: their largest)."""
    exp = data.get("experiment")
    if exp == "removal":
        scopes = {r["scope"] for r in data["runs"]}
        scope = "all" if "all" in scopes else sorted(scopes)[0]
        cells = removal_cells(data["runs"], scope)
        mean = {k: float(c["vals"].mean()) for k, c in cells.items()}
        fr = "/".join(f"{int(f * 100)}" for f in data["fractions"])
        parts = [f"{m} {mo} {mean[(m, mo)]:.3f}" for m, mo in (("spectral", "oneshot"), ("random", "oneshot"))
                 if (m, mo) in mean]
        for m in ("spectral_top_first", "hybrid_taylor_rank", "spectral_s2"):
            best = [k for k in mean if k[0] == m]
            if best:  # one-shot where it ran (as the default's figure), else its best selection
                k = (m, "oneshot") if (m, "oneshot") in mean else max(best, key=lambda k: mean[k])
                parts.append(f"{m} {k[1]} {mean[k]:.3f}")
        base = [k for k in mean if _family(k[0]) == "baseline"]
        if base:
            k = max(base, key=lambda k: mean[k])
            parts.append(f"best baseline {k[0]} ({k[1]}) {mean[k]:.3f}")
        return f"scope {scope}, mean over {fr}% removed: " + ", ".join(parts)
    if exp == "ablation":
        rows = {r["method"]: r for r in data["methods"]}
        key = "spearman_kl" if "spearman_kl" in next(iter(rows.values())) else "spearman_abs_dloss"
        base = [r for m, r in rows.items() if _family(m) == "baseline" and np.isfinite(r.get(key, np.nan))]
        best = max(base, key=lambda r: r[key]) if base else None
        out = f"Spearman with {key[9:]}: spectral {rows['spectral'][key]:+.2f}" if "spectral" in rows else ""
        return out + (f", best baseline {best['method']} {best[key]:+.2f}" if best else "")
    if exp == "finetune":
        t = target if target is not None else max(r["epr_target"] for r in data["runs"])
        per: dict[str, list[float]] = defaultdict(list)
        for r in data["runs"]:
            if r["epr_target"] == t:
                per[r["method"]].append(r["after_ft"]["metric"])
        hib = data.get("higher_is_better", True)
        ranked = sorted(per, key=lambda m: (-1 if hib else 1) * np.mean(per[m]))
        d = 3 if hib else 0
        parts = [f"{m} {np.mean(per[m]):,.{d}f}" for m in ("spectral", "random") if m in per]
        best = f"best {ranked[0]} {np.mean(per[ranked[0]]):,.{d}f}"
        return f"after FT at EPR {int(t * 100)}%: " + ", ".join(parts + [best])
    if exp == "magnitude_blind":
        return f"mean spectral percentile of the largest-activation units {data['mean_percentile_of_top']:.2f}"
    return ""


def _setup_of(data: dict[str, Any]) -> str:
    info = next(iter(data.get("models", {}).values()), None) or data.get("model") or {}
    if isinstance(info, dict) and "task" in info:
        return f"task {info['task']}"
    if data.get("driver"):
        return f"task {data['setup']}"
    return f"setup {data.get('setup', data.get('task', '?'))}"


def experiments_table() -> str:
    """Per experiment: what it shows, the command, the compute it took, and where its numbers come from."""
    lines = ["| experiment | what it shows | command | runtime here (1 thread) | provenance |", "|---|---|---|---|---|"]
    for step, file, what in EXPERIMENTS:
        data = _load(file)
        if data is None:
            continue
        cmd = f"`bash research/experiments/run_all.sh {step}`" if step not in NOT_IN_RUN_ALL else "see its section"
        sha = data.get("machine", {}).get("git_sha", "?")
        if ported(data):
            prov = f"**rerun at {sha} through the product API** ({_setup_of(data)})"
        elif data.get("driver") or data.get("experiment") == "magnitude_blind":
            prov = f"not rerun: made at {sha} through the product (`sg.prune` / `sg.capture`), before the port"
        else:
            prov = (f"not rerun: made at {sha} by the pre-port code (`research/experiments/*.py` at {OLD_COMMIT}: "
                    "own capture, masking and data)")
        lines.append(f"| `{step}` | {what} | {cmd} | {_minutes(_seconds(data))} | {prov} |")
    return "\n".join(lines) + "\n"


def changes_list() -> str:
    """For every rerun experiment: old (OLD_COMMIT) vs new headline figures, both from the JSONs."""
    out = []
    for step, file, _ in EXPERIMENTS:
        data = _load(file)
        if data is None or not ported(data):
            continue
        old = _old(file)
        if old is None:
            out.append(f"- `{step}` (new): {headline(data)}.")
            continue
        t = None
        if data.get("experiment") == "finetune":  # compare at the largest EPR target both ran
            both = {r["epr_target"] for r in data["runs"]} & {r["epr_target"] for r in old["runs"]}
            t = max(both) if both else None
        out.append(f"- `{step}`: {_setup_of(old)} → {_setup_of(data)}. Old ({OLD_COMMIT}): {headline(old, t)}. "
                   f"New: {headline(data, t)}.")
    return ("\n".join(out) if out else "*(no experiment rerun yet)*") + "\n"


def render(template: str) -> str:
    def table(mt: re.Match) -> str:
        spec = mt.group(1).split(":")
        kind, name = spec[0], spec[1]
        if kind == "driver":
            return driver_table(name)
        if kind == "llm":
            return llm_table(name)
        if kind == "experiments":
            return experiments_table()
        if kind == "changes":
            return changes_list()
        data = _load(name) if kind != "headline" else {}
        if data is None:
            return f"*(not run yet: {name})*\n"
        if kind == "headline":
            return headline_table()
        if kind == "removal":
            scope, modes = spec[2], spec[3].split(",")
            rows = spec[4].split(",") if len(spec) > 4 else None
            return removal_table(data, scope, modes, rows)
        if kind == "ablation":
            return ablation_table(data)
        if kind == "finetune":
            return finetune_table(data)
        if kind == "magnitude":
            return magnitude_table(data)
        raise ValueError(f"unknown table kind {kind!r}")

    def plot(mt: re.Match) -> str:
        spec = mt.group(1).split(":")
        kind, name = spec[0], spec[1]
        data = _load(name)
        if data is None:
            return ""
        png = EVIDENCE / (Path(name.split("+")[0]).stem + (f"_{spec[2]}" if len(spec) > 2 else "") + ".png")
        if kind == "removal":
            modes = {mo for _, mo in PLOT_METHODS}
            have = {(r["method"], r["mode"]) for r in data["runs"]}
            meths = [pm for pm in PLOT_METHODS_BY_SETUP.get(data["setup"], PLOT_METHODS) if pm in have] \
                or sorted(have)[:8]
            assert modes
            plot_removal(data, spec[2], png, meths)
        else:
            plot_finetune(data, png)
        return f"![{png.stem}](results/{png.name})\n"

    out = re.sub(r"\{\{table:([^}]+)\}\}", table, template)
    return re.sub(r"\{\{plot:([^}]+)\}\}", plot, out)


def main() -> None:
    tpl = (Path(__file__).resolve().parent / "report_template.md").read_text()
    text = render(tpl)
    fd, tmp = tempfile.mkstemp(dir=RESULTS, suffix=".md")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, RESULTS / "README.md")
    print(f"wrote {RESULTS / 'README.md'}")


if __name__ == "__main__":
    main()
