"""Build research/README.md (tables) and PNG plots from the committed evidence JSONs, so every
number on the results page comes from a JSON an experiment wrote.

  python research/experiments/make_report.py

The page is report_template.md with each {{table:...}} / {{plot:...}} marker replaced; markers name an
evidence file and a view (see TABLES)."""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import EVIDENCE, ROOT  # noqa: E402

RESULTS = ROOT / "research"
MAIN_ROWS = ["spectral", "spectral_s128", "spectral_full", "spectral_rev", "spectral_sym", "hybrid", "hybrid_full",
             "hybrid_rank", "wanda_sp", "flap", "act_var", "act_mean", "weight_l1", "weight_l2", "taylor", "apoz",
             "random"]


def _load(name: str) -> dict[str, Any] | None:
    """One evidence JSON, or several joined by '+' (same setup and fractions): their runs are pooled, the
    model info is the first file's. Missing files are skipped; None if none exists."""
    parts = [EVIDENCE / n for n in name.split("+")]
    found = [json.loads(p.read_text()) for p in parts if p.exists()]
    if not found:
        return None
    data = found[0]
    for extra in found[1:]:
        if extra.get("fractions") != data.get("fractions"):
            raise ValueError(f"{name}: expected the same fractions in every file")
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


MLP_FILES = "removal_mlp.json+removal_mlp_top_first.json+removal_mlp_hybrid_taylor.json"
HEADLINE = [("MNIST MLP, layer 1", MLP_FILES, "layer1"), ("MNIST MLP, both layers", MLP_FILES, "all"),
            ("MNIST CNN, conv1", "removal_cnn.json", "layer1"), ("MNIST CNN, both convs", "removal_cnn.json", "all"),
            ("MiniLM FFN, layer 3", "removal_minilm_layer.json", "layer1"),
            ("MiniLM FFN, all 6 layers", "removal_minilm.json+removal_minilm_knobs.json", "all"),
            ("MiniLM attention heads, all 6 layers", "removal_minilm_heads.json+removal_minilm_heads_knobs.json",
             "all"),
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
             "| best pure spectral − random |",
             "|---|---|---|---|---|---|---|"]
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

        def best(fam: str) -> tuple[str, float]:
            ks = [k for k in mean if _family(k[0]) == fam]
            if not ks:
                return "", float("nan")
            k = max(ks, key=lambda k: mean[k])
            return f"{k[0]} ({k[1]}) {mean[k]:.3f}", mean[k]

        bs, bsv = best("spectral")
        bh, _ = best("hybrid")
        bb, _ = best("baseline")
        d = mean.get(("spectral", "oneshot"), float("nan"))
        lines.append(f"| {label} ({fr}% removed) | {rnd:.3f} | {d:.3f} | {bs} | {bh} | {bb} | {bsv - rnd:+.3f} |")
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
    methods = sorted({m for m, _ in per}, key=lambda m: (-1 if hib else 1) * np.mean(
        [np.mean(per[(m, t)]["after"]) for t in targets if (m, t) in per]))
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
    os.replace(tmp, path)


PLOT_METHODS = [("spectral", "oneshot"), ("spectral", "iter5_nbh"), ("hybrid_rank", "iter5_nbh"),
                ("wanda_sp", "oneshot"), ("taylor", "iter5"), ("random", "oneshot"), ("random", "iter5_nbh")]

PLOT_METHODS_BY_SETUP = {"minilm_heads": [("spectral", "oneshot"), ("spectral", "iter1head"), ("hybrid_rank", "oneshot"),
                                          ("wanda_sp", "oneshot"), ("taylor", "oneshot"), ("taylor", "iter1head"),
                                          ("random", "oneshot"), ("random", "iter1head")]}


def driver_table(folder: str) -> str:
    """One row per run from the report.json files ``spectra prune`` wrote (copied into evidence/<folder>/)."""
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


def magnitude_table(data: dict[str, Any]) -> str:
    out = ("| FFN layer | max / median ‖a_i‖₂ | spectral percentile of the 5 largest-‖a_i‖₂ units (0 = pruned first) |\n"
           "|---|---|---|\n")
    for lay in data["layers"]:
        ps = ", ".join(f"{p:.2f}" for p in lay["spectral_percentile_of_top"])
        out += f"| {lay['group']} | {lay['max_over_median_l2']:.1f} | {ps} |\n"
    return out + (f"\nMean percentile of those units: {data['mean_percentile_of_top']:.2f} (uniform: 0.50); "
                  f"below 0.05, i.e. removed in the first 5 % round: {data['fraction_of_top_below_0.05']:.0%} "
                  f"(uniform: 5 %); below 0.25: {data['fraction_of_top_below_0.25']:.0%} (uniform: 25 %).\n")


def render(template: str) -> str:
    def table(mt: re.Match) -> str:
        spec = mt.group(1).split(":")
        kind, name = spec[0], spec[1]
        if kind == "driver":
            return driver_table(name)
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
        return f"![{png.stem}](evidence/{png.name})\n"

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
