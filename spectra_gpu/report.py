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


def current_umask() -> int:
    """The process's file-mode creation mask, read without changing it (Linux: /proc/self/status; elsewhere it
    is set and restored at once)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_replace(path: str | os.PathLike[str], write_to: Callable[[Path], None]) -> None:
    """Create ``path`` atomically: ``write_to(tmp)`` writes a temp file in the same directory, which is then
    fsynced and moved over ``path`` (os.replace): readers see the old or the new file, never half of one, and
    a failed write (an exception, a full disk) leaves the old file and no temp file. The file gets the mode a
    plain ``open(path, "w")`` would give it (0o666 less the umask), whatever mode the writer created."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write_to(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
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
    if r.get("epr_statement"):
        lines += ["", r["epr_statement"]]
    if r.get("saved_model"):
        lines += ["", f"Pruned model: `{r['saved_model']['loader']}`"]
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
        lo = r.get("finetune_lora")
        if lo:
            lines += ["", f"LoRA: rank {lo['rank']}, alpha {_fmt(lo['alpha'], 1)}, dropout {_fmt(lo['dropout'], 2)} on "
                      f"{lo['modules']} nn.Linear modules: {_fmt(lo['trainable_params'])} trainable parameters "
                      f"({lo['trainable_params'] / max(lo['params'], 1):.2%} of {_fmt(lo['params'])}), merged into "
                      "the weights after the last step"]
    env = r.get("environment")
    if env:
        git = env.get("git") or {}
        vers = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items() if v)
        resumed = ", resumed from a checkpoint" if env.get("resumed") else ""
        dirty = " (uncommitted changes)" if git.get("dirty") else ""
        dev = env.get("device", "") + (f" ({env['device_name']})" if env.get("device_name") else "")
        host = env.get("cpu") or {}  # reports written before the CPU was recorded have none
        cpu = f"- host: {env.get('platform')}, CPU {host.get('model') or 'unknown'} (torch kernels " \
              f"{host.get('capability', 'unknown')})"
        lines += ["", "## Environment", "", f"- command: `{env.get('command')}`",
                  f"- finished: {env.get('timestamp_utc')} (UTC){resumed}", f"- versions: {vers}",
                  f"- git: {git.get('commit', 'not a git checkout')}{dirty}",
                  f"- device: {dev}, torch CUDA build {env.get('torch_cuda_build') or 'none'}, torch threads "
                  f"{env.get('threads', {}).get('torch')}", cpu]
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


KIND_UNITS = {"neuron": "neurons", "channel": "channels", "ffn": "FFN neurons", "head": "attention heads"}


def _kind_of(report: dict[str, Any], group: str) -> str:
    """A group's unit kind: from ``kinds_by_group`` (prune runs) or ``groups`` (score runs)."""
    kinds = report.get("kinds_by_group") or {}
    if group in kinds:
        return str(kinds[group])
    return str((report.get("groups") or {}).get(group, {}).get("kind", "unit"))


def _by_kind(report: dict[str, Any], names: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for g in names:
        out.setdefault(_kind_of(report, g), []).append(g)
    return out


def _panels(plt: Any, n_panels: int, n_max: int, height: float = 3.2) -> tuple[Any, list[Any]]:
    """A figure with one row per panel, wide enough for ``n_max`` x tick labels."""
    fig, axes = plt.subplots(n_panels, 1, figsize=(max(6.0, 0.3 * n_max + 2), height * n_panels), squeeze=False)
    return fig, [ax for row in axes for ax in row]


def wide_range(values: list[float], ratio: float = 100.0) -> bool:
    """True when positive ``values`` span more than ``ratio`` (a log axis reads better), else False."""
    pos = [v for v in values if v > 0 and math.isfinite(v)]
    return len(pos) == len([v for v in values if math.isfinite(v)]) and bool(pos) and max(pos) / min(pos) > ratio


def plot_all(report: dict[str, Any], out_dir: str | os.PathLike[str]) -> dict[str, str]:
    """Write the PNG plots the report has data for; return {kind: file name}. Groups of different unit kinds
    (neurons, channels, FFN neurons, heads) get separate panels, never one shared axis; an axis is
    logarithmic only where its values span more than two decades."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    made: dict[str, str] = {}
    dist = {g: d for g, d in (report.get("score_distributions") or {}).items() if "quantiles" in d}
    if dist:
        kinds = _by_kind(report, list(dist))
        fig, axes = _panels(plt, len(kinds), max(len(v) for v in kinds.values()))
        for ax, (kind, names) in zip(axes, kinds.items(), strict=True):
            q = {g: dist[g]["quantiles"] for g in names}
            ax.bxp([dict(label=g, whislo=q[g][1], q1=q[g][2], med=q[g][3], q3=q[g][4], whishi=q[g][5],
                         fliers=[q[g][0], q[g][6]]) for g in names], showfliers=True)
            if wide_range([v for g in names for v in q[g]]):
                ax.set_yscale("log")
            ax.set_ylabel(f"{report['scorer']} score\n(higher = keep)")
            ax.set_title(f"{KIND_UNITS.get(kind, kind)}: score per unit, by group (first round; box 25-75%, "
                         "whiskers 5-95%, dots min/max)", fontsize=9)
            ax.tick_params(axis="x", rotation=90, labelsize=7)
        fig.tight_layout()
        _save_fig(fig, out_dir / PLOTS["scores"])
        plt.close(fig)
        made["scores"] = PLOTS["scores"]
    eig = {g: v for g, v in (report.get("eigenvalues") or {}).items() if v}
    if eig:
        kinds = _by_kind(report, list(eig))
        fig, axes = _panels(plt, len(kinds), 12)
        cmap = plt.get_cmap("viridis")
        for ax, (kind, names) in zip(axes, kinds.items(), strict=True):
            for i, g in enumerate(names):
                v = eig[g]
                ax.plot(range(1, len(v) + 1), v, color=cmap(i / max(1, len(names) - 1)), lw=1,
                        label=g if len(names) <= 12 else None)
            if wide_range([x for g in names for x in eig[g]]):
                ax.set_yscale("log")
            ax.set_xlabel("eigenpair index (1 = dominant)")
            ax.set_ylabel("generalized eigenvalue\n(dimensionless)")
            ax.set_title(f"{KIND_UNITS.get(kind, kind)}: dominant eigenvalues of (L_pre, L_post) per group, first "
                         f"round" + ("" if len(names) <= 12 else f" ({len(names)} groups, dark = first)"), fontsize=9)
            if len(names) <= 12:
                ax.legend(fontsize=6)
        fig.tight_layout()
        _save_fig(fig, out_dir / PLOTS["eigen"])
        plt.close(fig)
        made["eigen"] = PLOTS["eigen"]
    rounds = report.get("rounds") or []
    pts = [(0.0, report.get("metric_before"))] + [(r["epr"], r.get("metric")) for r in rounds]
    pts = [(x, y) for x, y in pts if y is not None]
    if len(pts) >= 2 or report.get("metric_after_finetune") is not None:
        fig, ax = plt.subplots(figsize=(6, 4))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label="after each round (no parameter updates)")
        if report.get("metric_after_finetune") is not None:
            ax.plot([report["epr"]], [report["metric_after_finetune"]], "r*", ms=12, label="after fine-tune")
        ax.axvline(report["target"], color="gray", ls=":", label=f"target {report['target']}")
        ys = [p[1] for p in pts] + ([report["metric_after_finetune"]] if report.get("metric_after_finetune") else [])
        if wide_range(ys):
            ax.set_yscale("log")
        ax.set_xlabel(f"effective parameter reduction ({report.get('epr_basis', 'total')} basis, fraction)")
        ax.set_ylabel(f"{report['metric_name']} ({'higher' if report.get('higher_is_better', True) else 'lower'} "
                      "is better)")
        ax.set_title(f"{report['model']}: {report['metric_name']} vs reduction ({report['scorer']})", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        _save_fig(fig, out_dir / PLOTS["metric"])
        plt.close(fig)
        made["metric"] = PLOTS["metric"]
    wb, wa = report.get("widths_before") or {}, report.get("widths_after") or {}
    if wb:
        kinds = _by_kind(report, list(wb))
        fig, axes = _panels(plt, len(kinds), max(len(v) for v in kinds.values()))
        for ax, (kind, names) in zip(axes, kinds.items(), strict=True):
            x = list(range(len(names)))
            ax.bar([i - 0.2 for i in x], [wb[g] for g in names], width=0.4, label="before")
            ax.bar([i + 0.2 for i in x], [wa.get(g, wb[g]) for g in names], width=0.4, label="after")
            ax.set_xticks(x)
            ax.set_xticklabels(names, rotation=90, fontsize=7)
            ax.set_ylabel(KIND_UNITS.get(kind, kind))
            ax.set_title(f"{KIND_UNITS.get(kind, kind)} per group, before and after pruning", fontsize=9)
            ax.legend(fontsize=7)
        fig.tight_layout()
        _save_fig(fig, out_dir / PLOTS["widths"])
        plt.close(fig)
        made["widths"] = PLOTS["widths"]
    return made


def epr_statement(target: float, epr: float, basis: str, uniform: bool, round_to: int) -> str:
    """One plain sentence on how the reached EPR relates to the target."""
    head = f"EPR {epr:.4f} on the {basis} basis for a target of {target}"
    if not uniform:
        return (f"{head}: per-layer widths, so the last round stops as soon as the target is reached "
                f"(overshoot below one unit's parameters).")
    side = "above" if epr >= target else "below"
    return (f"{head}: the achievable EPR nearest the target with uniform widths (every layer keeps the same "
            f"number of units of each kind, FFN / neuron widths multiples of {round_to}), {abs(epr - target):.4f} "
            f"{side} it.")


def _git_commit(root: Path) -> dict[str, Any] | None:
    """{commit, dirty} of the git checkout at ``root`` (None when it is not one or git is unavailable)."""
    import subprocess

    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head, "dirty": bool(dirty)}


PROVENANCE_PACKAGES = ("torch", "transformers", "numpy", "safetensors", "scipy", "tqdm", "matplotlib", "triton",
                       "cupy")


def provenance(*, device: str = "cpu", command: str | None = None, resumed: bool = False) -> dict[str, Any]:
    """Where and how a run ran, for report.json: package versions (None: not installed), the git commit of
    the spectra_gpu checkout (None unless installed from one), python, platform, the CPU (``env.cpu``: float
    results at 1 thread can differ between CPUs), torch's CUDA build, the device and its name, threads, a UTC
    timestamp, the command line (``command``, default this process's argv) and whether the run was resumed from a
    checkpoint."""
    import datetime
    import importlib.metadata as md
    import platform
    import shlex
    import sys

    from ._version import __version__
    from .env import cpu

    versions: dict[str, str | None] = {"spectra_gpu": __version__}
    for name in PROVENANCE_PACKAGES:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    device_name: str | None = None
    if device.startswith("cuda") and torch.cuda.is_available():
        device_name = torch.cuda.get_device_name(torch.device(device))
    return {
        "versions": versions, "git": _git_commit(Path(__file__).resolve().parent.parent),
        "python": platform.python_version(), "platform": platform.platform(), "cpu": cpu(),
        "torch_cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "device": device, "device_name": device_name,
        "threads": {"torch": torch.get_num_threads(), "torch_interop": torch.get_num_interop_threads(),
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command if command is not None else shlex.join(sys.argv), "resumed": resumed,
    }


def write_report(out_dir: str | os.PathLike[str], report: dict[str, Any], *, plots: bool = True) -> None:
    """report.json, then the plots, then report.md (which links the plots that exist)."""
    _check(report)
    out_dir = Path(out_dir)
    write_json(out_dir / "report.json", report)
    made, note = plot_report(report, out_dir) if plots else ({}, None)
    write_text(out_dir / "report.md", markdown(report, made, note))


def load_report(out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """DIR/report.json as a dict. A missing directory or file, or a damaged file (not JSON, not UTF-8, not a
    JSON object) raises ValueError in one line naming the file, what is wrong and what to do."""
    d = Path(out_dir)
    if not d.is_dir():
        raise ValueError(f"report: expected a run directory holding report.json, got {str(out_dir)!r}, which "
                         f"{'is not a directory' if d.exists() else 'does not exist'}")
    p = d / "report.json"
    if not p.is_file():
        raise ValueError(f"report: expected a run directory holding report.json, got {str(out_dir)!r}, which has "
                         "none (a run that has not finished has none yet; continue it with --resume)")
    fix = "delete it and rerun the run without --resume, or restore it from a copy"
    try:
        rep = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"report: {p} is damaged (not valid JSON: {e.msg} at line {e.lineno} column {e.colno}; "
                         f"truncated?); {fix}") from None
    except UnicodeDecodeError:
        raise ValueError(f"report: {p} is damaged (not UTF-8 text); {fix}") from None
    if not isinstance(rep, dict):
        raise ValueError(f"report: {p} is damaged (expected a JSON object, got a JSON {type(rep).__name__}); "
                         f"{fix}")
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


__all__ = ["KIND_UNITS", "NO_MATPLOTLIB", "PLOTS", "REQUIRED", "atomic_replace", "atomic_write", "epr_statement",
           "load_report", "markdown", "plot_all", "plot_report", "provenance", "render", "wide_range",
           "score_markdown", "score_summary", "torch_save", "write_json", "write_report", "write_text"]
