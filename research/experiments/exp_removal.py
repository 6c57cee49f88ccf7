"""Cumulative removal without fine-tune, every method x selection mode x scope, on a built-in task.

  python research/experiments/exp_removal.py --setup mlp --seeds 0 1 2 --out research/results/removal_mlp.json
  python research/experiments/exp_removal.py --setup mlp --smoke --out /tmp/removal_smoke.json

Setups (common.SETUPS): mlp = digits-mlp, cnn = mnist-cnn, minilm = minilm-rt FFN neurons, minilm_heads =
minilm-rt attention heads, smollm2 = smollm2-text FFN neurons. Seeds are the task's seeds (its trained model
and data order). Capture, scoring, selection and removal are the product's (common.run_removal).

Scopes: 'layer1' (the setup's single group) and 'all' (the same fraction of every group). Modes: 'oneshot'
(score once, remove bottom-f), 'iterR' (rounds of R% of the width, rescoring the survivors on the sliced
model each round), 'iterR_nbh' (the same with at most one unit per input-graph kNN neighbourhood per
round), 'iter1head' (heads: one head per layer per round). Random uses 3 draws per trained model. The JSON
is rewritten after every run (partial results survive an interrupted job).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import HEAD_ROUND, METHODS, load_setup, machine_info, run_removal, setup_threads, write_json  # noqa: E402

MODES = {"oneshot": (None, False), "iter2.5": (0.025, False), "iter5": (0.05, False), "iter10": (0.10, False),
         "iter5_nbh": (0.05, True), "iter10_nbh": (0.10, True), "iter2.5_nbh": (0.025, True),
         "iter1head": (HEAD_ROUND, False)}  # minilm_heads only: rounds of one head per layer, rescoring each round
FRACTIONS = [0.25, 0.5, 0.75]
MAIN_MODES = ["oneshot", "iter5", "iter5_nbh"]
EXTRA_MODES = ["iter2.5", "iter10", "iter2.5_nbh", "iter10_nbh"]  # round-size study, on a few methods
ROUND_STUDY = ["spectral", "spectral_full", "hybrid", "wanda_sp"]


def plan(methods: list[str], modes: list[str], scopes: list[str], extra: bool,
         random_draws: int) -> list[tuple[str, str, str, int]]:
    runs = []
    for scope in scopes:
        for method in methods:
            ms = list(modes) + ([m for m in EXTRA_MODES if m not in modes] if extra and method in ROUND_STUDY
                                else [])
            for mode in ms:
                for draw in range(random_draws if method == "random" else 1):
                    runs.append((scope, method, mode, draw))
    return runs


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setup", default="mlp", choices=["mlp", "cnn", "minilm", "minilm_heads", "smollm2"],
                    help="minilm_heads: MiniLM attention heads of all 6 layers (scope 'all', modes oneshot/iter1head)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="trained-model seeds")
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--modes", nargs="+", default=MAIN_MODES, choices=list(MODES))
    ap.add_argument("--scopes", nargs="+", default=["layer1", "all"], choices=["layer1", "all"])
    ap.add_argument("--fractions", type=float, nargs="+", default=FRACTIONS)
    ap.add_argument("--no-round-study", action="store_true", help="skip the 2.5/10%% round-size runs")
    ap.add_argument("--random-draws", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="tiny budget: one seed, 3 methods, one scope")
    ap.add_argument("--out", required=True, type=Path)
    a = ap.parse_args(argv)
    unknown = [m for m in a.methods if m not in METHODS]
    if unknown:
        ap.error(f"--methods: unknown {unknown}; expected names from {sorted(METHODS)}")
    setup_threads()
    heads = a.setup == "minilm_heads"
    if a.smoke and heads:
        a.seeds, a.methods, a.modes, a.random_draws, a.no_round_study = a.seeds[:1], ["spectral", "random"], \
            ["oneshot", "iter1head"], 1, True
        a.scopes, a.fractions = ["all"], [0.25]
    elif a.smoke:
        a.seeds, a.methods, a.modes = a.seeds[:1], ["spectral", "wanda_sp", "random"], ["oneshot", "iter10_nbh"]
        a.scopes, a.random_draws, a.no_round_study = ["layer1"], 1, True
    if heads and (set(a.scopes) != {"all"} or set(a.modes) - {"oneshot", "iter1head"}):
        ap.error("--setup minilm_heads: expected --scopes all and --modes from oneshot, iter1head")
    if not heads and "iter1head" in a.modes:
        ap.error("--modes iter1head: only for --setup minilm_heads")
    out: dict[str, Any] = {"experiment": "removal", "setup": a.setup, "argv": sys.argv[1:] if argv is None
                           else argv, "smoke": a.smoke, "machine": machine_info(), "fractions": a.fractions,
                           "models": {}, "runs": []}
    t_start = time.perf_counter()
    for seed in a.seeds:
        st = load_setup(a.setup, seed)
        out["models"][str(seed)] = st.info
        for scope, method, mode, draw in plan(a.methods, a.modes, a.scopes, not a.no_round_study,
                                              a.random_draws):
            rf, nbh = MODES[mode]
            t = time.perf_counter()
            r = run_removal(st, [st.single] if scope == "layer1" else list(st.names), method, a.fractions,
                            round_frac=rf, one_per_nbh=nbh, seed=draw)
            r.update(scope=scope, mode=mode, model_seed=seed, draw=draw, wall_seconds=time.perf_counter() - t)
            out["runs"].append(r)
            print(f"[{a.setup} seed{seed}] {scope:6s} {method:18s} {mode:10s} "
                  + " ".join(f"{p['metric']:.3f}" for p in r["points"]) + f"  ({r['wall_seconds']:.1f}s)",
                  flush=True)
            write_json(a.out, out)
    out["seconds_total"] = time.perf_counter() - t_start
    write_json(a.out, out)
    return out


if __name__ == "__main__":
    main()
