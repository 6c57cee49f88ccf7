"""Issue 3, item 4: accuracy vs effective parameter reduction (EPR) with one recovery fine-tune.

  python research/experiments/exp_finetune.py --setup mlp --seeds 0 1 2 --out research/results/finetune_mlp.json
  python research/experiments/exp_finetune.py --setup mlp --smoke --out /tmp/finetune_smoke.json

For each trained model (seed), EPR target and method: prune every group by the same uniform fraction, the
smallest that reaches the EPR target on the sliced parameter count (EPR = 1 - P(widths) / P(dense), every
parameter attached to a removed unit counted, computed from the widths, not summed per unit), with the
same schedule for every method (default: rounds of 10% with rescoring and one unit per neighbourhood per
round, no weight update), then one recovery fine-tune identical for every method (Adam 1e-3, the training
recipe, FT_EPOCHS epochs on the 4000 training images, masks held). Reports accuracy before and after the
fine-tune and the scoring wall-clock.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import METHODS, machine_info, run_removal, write_json  # noqa: E402
from exp_removal import MODES, load  # noqa: E402

FT_EPOCHS = 3
TARGETS = [0.3, 0.5, 0.7]
DEFAULT_METHODS = ["hybrid_rank", "spectral", "wanda_sp", "flap", "act_var", "taylor", "weight_l1", "random"]


def fraction_for_epr(setup: common.Setup, target: float) -> tuple[float, float]:
    """Smallest uniform per-group fraction (on a 1/1000 grid) whose sliced parameter count reaches the EPR
    target; returns (fraction, achieved EPR)."""
    if setup.params is None:
        raise ValueError(f"setup {setup.name}: expected a params(widths) function for EPR accounting, got None")
    n0 = {g: u.n for g, u in setup.groups.items()}
    p0 = setup.params(n0)
    for i in range(1, 1000):
        f = i / 1000
        epr = 1 - setup.params({g: n - int(round(f * n)) for g, n in n0.items()}) / p0
        if epr >= target:
            return f, epr
    raise ValueError(f"EPR target {target} not reachable by removing units of {list(n0)}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import models

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setup", default="mlp", choices=["mlp", "cnn"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    ap.add_argument("--mode", default="iter10_nbh", choices=list(MODES))
    ap.add_argument("--targets", type=float, nargs="+", default=TARGETS)
    ap.add_argument("--ft-epochs", type=int, default=FT_EPOCHS)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", required=True, type=Path)
    a = ap.parse_args(argv)
    unknown = [m for m in a.methods if m not in METHODS]
    if unknown:
        ap.error(f"--methods: unknown {unknown}; expected names from {sorted(METHODS)}")
    common.setup_threads()
    if a.smoke:
        a.seeds, a.methods, a.targets, a.ft_epochs = a.seeds[:1], ["spectral", "random"], [0.5], 1
    xtr, ytr, _, _ = models.mnist5k()
    if a.smoke:
        xtr, ytr = xtr[:500], ytr[:500]
    rf, nbh = MODES[a.mode]
    out: dict[str, Any] = {"experiment": "finetune", "setup": a.setup, "argv": sys.argv[1:] if argv is None
                           else argv, "smoke": a.smoke, "machine": machine_info(), "mode": a.mode,
                           "ft_epochs": a.ft_epochs, "models": {}, "runs": []}
    for seed in a.seeds:
        st = load(a.setup, seed, a.smoke)
        out["models"][str(seed)] = st.info
        dense_state = copy.deepcopy(st.model.state_dict())
        for target in a.targets:
            f, epr = fraction_for_epr(st, target)
            for m in a.methods:
                st.model.load_state_dict(dense_state)
                t = time.perf_counter()
                r = run_removal(st, list(st.groups), m, [f], round_frac=rf, one_per_nbh=nbh, seed=seed,
                                keep_masks=True)
                t_prune = time.perf_counter() - t
                before = r["points"][0]
                t = time.perf_counter()
                models.train_classifier(st.model, xtr, ytr, a.ft_epochs, seed=1000 + seed)
                after = st.evaluate()
                row = {"method": m, "model_seed": seed, "epr_target": target, "epr": epr, "fraction": f,
                       "before_ft": before, "after_ft": after, "score_seconds": r["score_seconds"],
                       "prune_seconds": t_prune, "ft_seconds": time.perf_counter() - t, "rounds": r["rounds"]}
                out["runs"].append(row)
                print(f"[{a.setup} seed{seed}] EPR {epr:.3f} {m:14s} before {before['metric']:.3f} after "
                      f"{after['metric']:.3f} (score {r['score_seconds']:.1f}s)", flush=True)
                st.reset()
                write_json(a.out, out)
        st.model.load_state_dict(dense_state)
    write_json(a.out, out)
    return out


if __name__ == "__main__":
    main()
