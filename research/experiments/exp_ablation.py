"""Issue 3, item 3: direct single-unit ablation analysis (algorithm.md section 8.1) on one group.

  python research/experiments/exp_ablation.py --setup mlp --group layer1 --out research/results/ablation_mlp.json
  python research/experiments/exp_ablation.py --setup mlp --smoke --out /tmp/ablation_smoke.json

Ground truth per unit i (zero-ablation on the unpruned model, eval set disjoint from calibration):
dloss_i (signed loss change), |dloss_i|, and KL_i = mean KL(p_dense || p_ablated) of the model's output.
Split-half reliability of each ground truth = Spearman between its values on the even and odd eval samples
(raw, and Spearman-Brown corrected to the full set). For every method: Spearman and Kendall of its
one-shot score with each ground truth, and bottom-q precision |Bot_q(score) ∩ Bot_q(truth)| / |Bot_q| for
q in 10/30/50% (random expectation = q). Score stability = Spearman between the method's scores on the
two halves of the calibration set.
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
from common import METHODS, Ctx, calibrate, machine_info, score_method, write_json  # noqa: E402
from exp_removal import load  # noqa: E402
from spectra_gpu import SignalStats  # noqa: E402
from spectra_gpu.scorers import NEEDS_TAYLOR, ScoreContext  # noqa: E402

QS = (0.1, 0.3, 0.5)


def ground_truth(setup: common.Setup, group: str, units: np.ndarray) -> dict[str, np.ndarray]:
    """Per ablated unit: loss change and output KL on the full eval set and on its even/odd halves."""
    setup.reset()
    base_loss = setup.per_sample_loss()
    base_lp = setup.log_probs() if setup.log_probs is not None else None
    n = len(base_loss)
    halves = {"A": torch.arange(0, n, 2), "B": torch.arange(1, n, 2), "all": torch.arange(n)}
    out: dict[str, list[float]] = {f"{k}_{h}": [] for k in ("dloss", "kl") for h in halves}
    mask = setup.groups[group].mask
    for i in units:
        mask[int(i)] = 0.0
        loss = setup.per_sample_loss() - base_loss
        kl = None
        if base_lp is not None:
            lp = setup.log_probs()
            kl = (base_lp.exp() * (base_lp - lp)).sum(dim=1)
        mask[int(i)] = 1.0
        for h, idx in halves.items():
            out[f"dloss_{h}"].append(float(loss[idx].mean()))
            out[f"kl_{h}"].append(float(kl[idx].mean()) if kl is not None else float("nan"))
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


def _half_ctx(ctx: Ctx, half: int) -> Ctx:
    m = ctx.pre.shape[1]
    sl = slice(0, m // 2) if half == 0 else slice(m // 2, m)
    pre, post = ctx.pre[:, sl], ctx.post[:, sl]
    st = SignalStats(pre.shape[0], mode="exact").update(pre, post)
    return Ctx(ScoreContext(st, ctx.score.in_weight, ctx.score.out_weight, ctx.score.taylor, 0), pre, post)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setup", default="mlp", choices=["mlp", "cnn", "minilm", "smollm2"])
    ap.add_argument("--group", default=None, help="group to ablate (default: the setup's single-layer group)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--units", type=int, default=0, help="ablate a random sample of this many units (0 = all)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", required=True, type=Path)
    a = ap.parse_args(argv)
    common.setup_threads()
    if a.smoke:
        a.methods, a.units = ["spectral", "wanda_sp", "random"], 24
    st = load(a.setup, a.seed, a.smoke)
    group = a.group or st.info.get("single", next(iter(st.groups)))
    if group not in st.groups:
        ap.error(f"--group: expected one of {list(st.groups)}, got {group!r}")
    n = st.groups[group].n
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
    ctx = calibrate(st, [group], taylor=any(METHODS[m][0] in NEEDS_TAYLOR for m in a.methods), seed=a.seed)[group]
    halves = [_half_ctx(ctx, 0), _half_ctx(ctx, 1)]
    truths = {"abs_dloss": np.abs(gt["dloss_all"]), "dloss": gt["dloss_all"], "kl": gt["kl_all"]}
    rows = []
    for m in a.methods:
        t = time.perf_counter()
        s_all = score_method(m, ctx, a.seed).scores.numpy()
        secs = time.perf_counter() - t
        s = s_all[units]
        row: dict[str, Any] = {"method": m, "score_seconds": secs}
        if METHODS[m][0] not in NEEDS_TAYLOR:  # Taylor is accumulated over the whole calibration set
            h0 = score_method(m, halves[0], a.seed).scores.numpy()
            h1 = score_method(m, halves[1], a.seed + (1 if m == "random" else 0)).scores.numpy()
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
           "ablated_units": units.tolist(), "n_eval": len(st.per_sample_loss()), "ground_truth_seconds": t_gt,
           "reliability": reliab, "ground_truth": {k: v.tolist() for k, v in gt.items()}, "methods": rows}
    write_json(a.out, out)
    return out


if __name__ == "__main__":
    main()
