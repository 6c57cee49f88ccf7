"""Is the spectral score blind to the units that carry the largest activations? (SmolLM2 FFN, dense model)

  python research/experiments/exp_magnitude_blind.py --out research/results/magnitude_smollm2.json

Captures every FFN group of the built-in ``smollm2-text`` task on its calibration batches (the driver's
round 0), scores each with ``sg.score`` defaults and reports, per layer, max/median of ||a_i||_2 and the
within-layer spectral percentile rank of the 5 units with the largest ||a_i||_2 (0 = pruned first).
Z-scoring removes magnitude by design: a unit with massive activations can sit at the bottom of the
spectral ranking, and removing it breaks the model.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_info, write_json  # noqa: E402

import spectra_gpu as sg  # noqa: E402
from spectra_gpu.builtin.tasks import load_task  # noqa: E402
from spectra_gpu.selection import percentile_ranks  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--top", type=int, default=5)
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    task = load_task("smollm2-text", None, seed=0)
    groups = sg.discover_groups(task.model, ("ffn",))
    stats = sg.capture(task.model, groups, task.calib, forward=task.forward, progress=False)
    layers = []
    for name, st in stats.items():
        res = sg.score(st)
        mean, std = st.mean_std("post")
        l2 = (st.m * (std * std + mean * mean)).sqrt()
        pr = percentile_ranks(res.scores)
        top = torch.argsort(l2, descending=True)[: args.top]
        layers.append({"group": name, "max_over_median_l2": float(l2[top[0]] / l2.median()),
                       "top_units": top.tolist(), "spectral_percentile_of_top": [float(pr[i]) for i in top],
                       "solver": res.diagnostics["solver"]})
    allp = [p for lay in layers for p in lay["spectral_percentile_of_top"]]
    write_json(args.out, {"experiment": "magnitude_blind", "task": "smollm2-text", "top": args.top,
                          "machine": machine_info(), "seconds": time.perf_counter() - t0, "layers": layers,
                          "mean_percentile_of_top": sum(allp) / len(allp),
                          "fraction_of_top_below_0.05": sum(p < 0.05 for p in allp) / len(allp),
                          "fraction_of_top_below_0.25": sum(p < 0.25 for p in allp) / len(allp)})


if __name__ == "__main__":
    main()
