"""Direct single-unit ablation analysis (docs/algorithm.md, section 8) on one group of a built-in task.

  python research/experiments/exp_ablation.py --setup mlp --group layers.0 --out research/results/ablation_mlp.json
  python research/experiments/exp_ablation.py --setup mlp --smoke --out /tmp/ablation_smoke.json

Ground truth per unit i (zero-ablation with ``sg.masked`` on the unpruned model, on the task's held-out split,
disjoint from its calibration batches):
dloss_i (signed loss change), |dloss_i|, and KL_i = mean KL(p_dense || p_ablated) of the model's output.
Split-half reliability of each ground truth = Spearman between its values on the even and odd eval samples
(raw, and Spearman-Brown corrected to the full set). For every method: Spearman and Kendall of its
one-shot score with each ground truth, and bottom-q precision |Bot_q(score) ∩ Bot_q(truth)| / |Bot_q| for
q in 10/30/50% (random expectation = q). Score stability = Spearman between the method's scores on the
two halves of the calibration batches (each captured with ``sg.capture``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import kendalltau, spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import METHODS, capture, load_setup, machine_info, needs_taylor, score, setup_threads, write_json  # noqa: E402

import spectra_gpu as sg  # noqa: E402

QS = (0.1, 0.3, 0.5)


def ground_truth(setup: common.Setup, group: str, units: np.ndarray) -> dict[str, np.ndarray]:
    """Per ablated unit: loss change and output KL on the full eval set and on its even/odd halves."""
    model = setup.dense
    g = setup.groups(model, [group])[0]
    base_lp, y = setup.log_probs(model)
    base_loss = -base_lp[torch.arange(len(y)), y]
    n = len(base_loss)
    halves = {"A": torch.arange(0, n, 2), "B": torch.arange(1, n, 2), "all": torch.arange(n)}
    out: dict[str, list[float]] = {f"{k}_{h}": [] for k in ("dloss", "kl") for h in halves}
    for i in units:
        keep = torch.ones(int(g.size), dtype=torch.bool)
        keep[int(i)] = False
        with sg.masked(model, {g: keep}):
            lp, _ = setup.log_probs(model)
        loss = -lp[torch.arange(len(y)), y] - base_loss
        kl = (base_lp.exp() * (base_lp - lp)).sum(dim=1)
        for h, idx in halves.items():
            out[f"dloss_{h}"].append(float(loss[idx].mean()))
            out[f"kl_{h}"].append(float(kl[idx].mean()))
    return {k: np.asarray(v) for k, v in out.items()}


def _rho(a: np.ndarray, b: np.ndarray) -> float:
    ok = np.isfinite(a) & np.isfinite(b)
    return float(spearmanr(a[ok], b[ok])[0]) if ok.sum() > 2 else float("nan")


def bottom_precision(score: np.ndarray, truth: np.ndarray, q: float) -> float:
    k = max(1, int(round(q * len(score))))
    s = np.where(np.isfinite(score), score, -np.inf)
    a = set(np.argsort(s, kind="stable")[:k].tolist())
    b = set(np.argsort(truth, kind="stable")[:k].tolist())
    return len(a & b) / k


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setup", default="mlp", choices=["mlp", "cnn", "minilm"])
    ap.add_argument("--group", default=None, help="group to ablate (default: the setup's single-layer group)")
    ap.add_argument("--seed", type=int, default=0, help="task seed (trained model, data order)")
    ap.add_argument("--units", type=int, default=0, help="ablate a random sample of this many units (0 = all)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", required=True, type=Path)
    a = ap.parse_args(argv)
    setup_threads()
    if a.smoke:
        a.methods, a.units = ["spectral", "wanda_sp", "random"], 24
    unknown = [m for m in a.methods if m not in METHODS]
    if unknown:
        ap.error(f"--methods: unknown {unknown}; expected names from {sorted(METHODS)}")
    t_start = time.perf_counter()
    st = load_setup(a.setup, a.seed)
    group = a.group or st.single
    if group not in st.names:
        ap.error(f"--group: expected one of {st.names}, got {group!r}")
    g = st.groups(st.dense, [group])[0]
    n = int(g.size)
    units = np.arange(n) if not a.units or a.units >= n else \
        np.sort(np.random.default_rng(a.seed).choice(n, a.units, replace=False))
    t = time.perf_counter()
    gt = ground_truth(st, group, units)
    t_gt = time.perf_counter() - t
    reliab = {}
    for key in ("dloss", "kl"):
        for tr, f in (("signed", lambda x: x), ("abs", np.abs)):
            if key == "kl" and tr == "abs":
                continue
            r = _rho(f(gt[f"{key}_A"]), f(gt[f"{key}_B"]))
            reliab[f"{key}_{tr}"] = {"split_half": r, "spearman_brown": 2 * r / (1 + r) if r > -1 else float("nan")}
    stats, tay = capture(st, st.dense, [g], taylor=any(needs_taylor(m) for m in a.methods))
    calib = st.task.calib
    if len(calib) < 2:
        raise ValueError(f"{a.setup}: expected at least 2 calibration batches for the split-half stability, "
                         f"got {len(calib)}")
    halves = [capture(st, st.dense, [g], False, calib[:len(calib) // 2])[0][group],
              capture(st, st.dense, [g], False, calib[len(calib) // 2:])[0][group]]
    truths = {"abs_dloss": np.abs(gt["dloss_all"]), "dloss": gt["dloss_all"], "kl": gt["kl_all"]}
    rows = []
    for m in a.methods:
        t = time.perf_counter()
        s_all = score(m, g, stats[group], tay.get(group), a.seed).scores.numpy()
        secs = time.perf_counter() - t
        s = s_all[units]
        row: dict[str, Any] = {"method": m, "score_seconds": secs}
        if not needs_taylor(m):  # Taylor is accumulated over the whole calibration set
            h0 = score(m, g, halves[0], None, a.seed).scores.numpy()
            h1 = score(m, g, halves[1], None, a.seed + (1 if m == "random" else 0)).scores.numpy()
            row["score_split_half"] = _rho(h0, h1)
        for tn, tv in truths.items():
            if not np.isfinite(tv).any():
                continue
            ok = np.isfinite(s)
            row[f"spearman_{tn}"] = _rho(s, tv)
            row[f"kendall_{tn}"] = float(kendalltau(s[ok], tv[ok])[0])
            for q in QS:
                row[f"bottom{int(q * 100)}_{tn}"] = bottom_precision(s, tv, q)
        rows.append(row)
        print(f"{m:18s} " + " ".join(f"{k}={v:.3f}" for k, v in row.items() if isinstance(v, float)), flush=True)
    out = {"experiment": "ablation", "setup": a.setup, "group": group, "argv": sys.argv[1:] if argv is None
           else argv, "smoke": a.smoke, "machine": machine_info(), "model": st.info, "n_units": int(n),
           "ablated_units": units.tolist(), "n_eval": int(len(st.per_sample_loss(st.dense))),
           "ground_truth_seconds": t_gt,
           "reliability": reliab, "ground_truth": {k: v.tolist() for k, v in gt.items()}, "methods": rows,
           "seconds_total": time.perf_counter() - t_start}
    write_json(a.out, out)
    return out


if __name__ == "__main__":
    main()
