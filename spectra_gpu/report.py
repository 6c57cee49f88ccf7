"""Run reports: DIR/report.json (the record), DIR/report.md (for people) and PNG plots, all written atomically.

report.json is self-sufficient: ``render(DIR)`` (``spectra report DIR``) rebuilds report.md and every plot from
it alone. Plots: score distributions per layer (from per-group quantiles of the first round), the eigenvalue
spectra (spectral scorer), the metric against the effective parameter reduction over the rounds, and the
width of every group before and after.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

REQUIRED = ("model", "scorer", "target", "epr", "params_before", "params_after", "metric_name", "metric_before",
            "metric_after_prune", "metric_after_finetune", "seconds_scoring", "seconds_total", "rounds")
QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)
PLOTS = {"scores": "scores_by_layer.png", "eigen": "eigenvalues.png", "metric": "metric_vs_epr.png",
         "widths": "widths.png"}


def atomic_replace(path: str | os.PathLike[str], write_to: Callable[[Path], None]) -> None:
    """Create ``path`` atomically: ``write_to(tmp)`` writes a temp file in the same directory, which is then
    fsynced and moved over ``path`` (os.replace): readers see the old or the new file, never half of one, and
    a failed write leaves the old file and no temp file."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write_to(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> None:
    """``atomic_replace`` with a writer that gets the open binary temp file."""
    def to(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            write(f)

    atomic_replace(path, to)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    data = text.encode()

    def write(f: IO[bytes]) -> None:
        f.write(data)

    atomic_write(path, write)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, default=_json_default, allow_nan=True) + "\n")


def torch_save(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"report: cannot serialise {type(o).__name__}")


def score_summary(scores: torch.Tensor, bins: int = 20) -> dict[str, Any]:
    """Compact distribution of one group's scores for report.json: quantiles and a histogram of the finite
    scores, plus the count of -inf (dead) units."""
    s = scores.detach().cpu().double()
    fin = s[torch.isfinite(s)]
    out: dict[str, Any] = {"n": int(s.numel()), "dead": int((s == -math.inf).sum())}
    if fin.numel():
        out["quantiles"] = torch.quantile(fin, torch.tensor(QUANTILES, dtype=torch.float64)).tolist()
        lo, hi = float(fin.min()), float(fin.max())
        hist = torch.histc(fin, bins=bins, min=lo, max=hi if hi > lo else lo + 1.0)
        out["hist"] = {"min": lo, "max": hi if hi > lo else lo + 1.0, "counts": hist.long().tolist()}
    return out


def _check(report: dict[str, Any]) -> None:
    missing = [k for k in REQUIRED if k not in report]
    if missing:
        raise ValueError(f"report: missing required fields {missing}")


def _fmt(v: Any, nd: int = 4) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{nd}f}" if abs(v) < 1e4 else f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def markdown(report: dict[str, Any], plots: dict[str, str], note: str | None = None) -> str:
    """report.md: headline table, rounds, fine-tune history, plots (or ``note`` saying why there are none)."""
    r = report
    lines = [f"# spectra prune: {r['model']} ({r.get('data', '')}), scorer {r['scorer']}", ""]
    lines += ["| quantity | value |", "|---|---|"]
    rows = [("target EPR", r["target"]), ("EPR reached", r["epr"]), ("EPR (prunable modules only)",
                                                                     r.get("epr_prunable")),
            ("parameters before", r["params_before"]), ("parameters after", r["params_after"]),
            (f"{r['metric_name']} before pruning", r["metric_before"]),
            (f"{r['metric_name']} after pruning", r["metric_after_prune"]),
            (f"{r['metric_name']} after fine-tune", r["metric_after_finetune"]),
            ("rounds", len(r["rounds"])), ("seconds scoring", r["seconds_scoring"]),
            ("seconds total", r["seconds_total"])]
    if r.get("flops_before") is not None:
        rows += [("FLOPs per sample before", r["flops_before"]), ("FLOPs per sample after", r.get("flops_after"))]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in rows]
    if r.get("data_info"):
        lines += ["", f"Data: {r['data_info']}"]
    if r.get("config"):
        lines += ["", "Configuration: `" + json.dumps(r["config"], default=_json_default) + "`"]
    if r["rounds"]:
        lines += ["", "## Rounds", "", "| round | units removed | parameters | EPR | "
                  f"{r['metric_name']} | seconds scoring |", "|---|---|---|---|---|---|"]
        for rec in r["rounds"]:
            lines.append(f"| {rec['round']} | {sum(rec['removed'].values())} | {_fmt(rec['params'])} | "
                         f"{_fmt(rec['epr'])} | {_fmt(rec.get('metric'))} | {_fmt(rec['seconds_scoring'], 2)} |")
    if r.get("widths_before"):
        lines += ["", "## Widths", "", "| group | kind | before | after |", "|---|---|---|---|"]
        kinds = r.get("kinds_by_group", {})
        for g, w in r["widths_before"].items():
            lines.append(f"| {g} | {kinds.get(g, '')} | {w} | {r.get('widths_after', {}).get(g, w)} |")
    if r.get("finetune_history"):
        lines += ["", "## Recovery fine-tune", "", "| epoch | steps | mean loss | seconds |", "|---|---|---|---|"]
        lines += [f"| {h['epoch']} | {h['steps']} | {_fmt(h['loss'])} | {_fmt(h['seconds'], 1)} |"
                  for h in r["finetune_history"]]
    lines += _plot_lines(plots, note)
    return "\n".join(lines) + "\n"


def _plot_lines(plots: dict[str, str], note: str | None) -> list[str]:
    if plots:
        return ["", "## Plots", ""] + [f"![{k}]({v})" for k, v in plots.items()]
    return ["", note] if note else []


NO_MATPLOTLIB = ("Plots: not drawn, matplotlib is not installed (`pip install matplotlib`, then `spectra report "
                 "DIR` draws them from report.json).")


def plot_report(report: dict[str, Any], out_dir: str | os.PathLike[str]) -> tuple[dict[str, str], str | None]:
    """``plot_all`` if matplotlib is installed: ({kind: file name}, None); else ({}, a one-line note for
    report.md)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return {}, NO_MATPLOTLIB
    return plot_all(report, out_dir), None


def _save_fig(fig: Any, path: Path) -> None:
    def w(f: IO[bytes]) -> None:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")

    atomic_write(path, w)


def plot_all(report: dict[str, Any], out_dir: str | os.PathLike[str]) -> dict[str, str]:
    """Write the PNG plots the report has data for; return {kind: file name}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    made: dict[str, str] = {}
    dist = report.get("score_distributions") or {}
    boxes = [dict(label=g, whislo=d["quantiles"][1], q1=d["quantiles"][2], med=d["quantiles"][3],
                  q3=d["quantiles"][4], whishi=d["quantiles"][5], fliers=[d["quantiles"][0], d["quantiles"][6]])
             for g, d in dist.items() if "quantiles" in d]
    if boxes:
        fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(boxes) + 2), 4))
        ax.bxp(boxes, showfliers=True)
        ax.set_ylabel(f"{report['scorer']} score (higher = keep)")
        ax.set_title("score distribution per group, first round (whiskers 5-95%, dots min/max)")
        ax.tick_params(axis="x", rotation=90, labelsize=7)
        _save_fig(fig, out_dir / PLOTS["scores"])
        plt.close(fig)
        made["scores"] = PLOTS["scores"]
    eig = {g: v for g, v in (report.get("eigenvalues") or {}).items() if v}
    if eig:
        fig, ax = plt.subplots(figsize=(6, 4))
        cmap = plt.get_cmap("viridis")
        for i, (g, v) in enumerate(eig.items()):
            ax.plot(range(1, len(v) + 1), v, color=cmap(i / max(1, len(eig) - 1)), lw=1,
                    label=g if len(eig) <= 12 else None)
        ax.set_yscale("log")
        ax.set_xlabel("eigenpair index")
        ax.set_ylabel("generalized eigenvalue")
        ax.set_title("dominant eigenvalues of (L_pre, L_post) per group, first round")
        if len(eig) <= 12:
            ax.legend(fontsize=6)
        _save_fig(fig, out_dir / PLOTS["eigen"])
        plt.close(fig)
        made["eigen"] = PLOTS["eigen"]
    rounds = report.get("rounds") or []
    pts = [(0.0, report.get("metric_before"))] + [(r["epr"], r.get("metric")) for r in rounds]
    pts = [(x, y) for x, y in pts if y is not None]
    if len(pts) >= 2 or report.get("metric_after_finetune") is not None:
        fig, ax = plt.subplots(figsize=(6, 4))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label="pruning (no parameter updates)")
        if report.get("metric_after_finetune") is not None:
            ax.plot([report["epr"]], [report["metric_after_finetune"]], "r*", ms=12, label="after fine-tune")
        ax.axvline(report["target"], color="gray", ls=":", label="target")
        ax.set_xlabel("effective parameter reduction")
        ax.set_ylabel(report["metric_name"])
        ax.set_title(f"{report['model']}: {report['metric_name']} vs reduction ({report['scorer']})")
        ax.legend(fontsize=8)
        _save_fig(fig, out_dir / PLOTS["metric"])
        plt.close(fig)
        made["metric"] = PLOTS["metric"]
    wb, wa = report.get("widths_before") or {}, report.get("widths_after") or {}
    if wb:
        names = list(wb)
        x = torch.arange(len(names)).tolist()
        fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names) + 2), 4))
        ax.bar([i - 0.2 for i in x], [wb[g] for g in names], width=0.4, label="before")
        ax.bar([i + 0.2 for i in x], [wa.get(g, wb[g]) for g in names], width=0.4, label="after")
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=90, fontsize=7)
        ax.set_ylabel("units")
        ax.set_title("width per group")
        ax.legend()
        _save_fig(fig, out_dir / PLOTS["widths"])
        plt.close(fig)
        made["widths"] = PLOTS["widths"]
    return made


def write_report(out_dir: str | os.PathLike[str], report: dict[str, Any], *, plots: bool = True) -> None:
    """report.json, then the plots, then report.md (which links the plots that exist)."""
    _check(report)
    out_dir = Path(out_dir)
    write_json(out_dir / "report.json", report)
    made, note = plot_report(report, out_dir) if plots else ({}, None)
    write_text(out_dir / "report.md", markdown(report, made, note))


def load_report(out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(out_dir) / "report.json"
    if not p.is_file():
        raise ValueError(f"report: expected a run directory holding report.json, got {str(out_dir)!r}")
    try:
        rep = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"report: {p} is not valid JSON ({e})") from None
    if not isinstance(rep, dict):
        raise ValueError(f"report: expected a JSON object in {p}, got {type(rep).__name__}")
    return rep


def render(out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Rebuild report.md and the plots of a finished run from its report.json; return the report."""
    rep = load_report(out_dir)
    if rep.get("kind") != "score":
        _check(rep)
    made, note = plot_report(rep, out_dir)
    md = score_markdown(rep, made, note) if rep.get("kind") == "score" else markdown(rep, made, note)
    write_text(Path(out_dir) / "report.md", md)
    return rep


def score_markdown(report: dict[str, Any], plots: dict[str, str], note: str | None = None) -> str:
    """report.md of a scores-only run (``spectra score``)."""
    lines = [f"# spectra score: {report['model']} ({report.get('data', '')}), scorer {report['scorer']}", "",
             f"Scored {len(report['groups'])} groups in {report['seconds_scoring']:.2f} s "
             f"(calibration capture {report.get('seconds_capture', 0.0):.2f} s). Per-group scores: "
             "`scores/<group>.pt` ({scores, neighbors, eigenvalues}).", "",
             "| group | kind | units | dead | lambda_1 | seconds |", "|---|---|---|---|---|---|"]
    for g, info in report["groups"].items():
        lines.append(f"| {g} | {info['kind']} | {info['n']} | {info['dead']} | {_fmt(info.get('lambda_1'))} | "
                     f"{_fmt(info['seconds'], 3)} |")
    lines += _plot_lines(plots, note)
    return "\n".join(lines) + "\n"


__all__ = ["NO_MATPLOTLIB", "PLOTS", "REQUIRED", "atomic_replace", "atomic_write", "load_report", "markdown",
           "plot_all", "plot_report", "render",
           "score_markdown", "score_summary", "torch_save", "write_json", "write_report", "write_text"]
