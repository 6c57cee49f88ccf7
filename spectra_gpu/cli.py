"""The ``spectra`` command line."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    import time

    import torch
    from sklearn.datasets import load_digits

    import spectra_gpu as sg

    torch.manual_seed(0)
    t0 = time.perf_counter()
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y))
    tr, te = perm[:1400], perm[1400:]
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        for b in torch.split(tr[torch.randperm(len(tr))], 128):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[b]), y[b]).backward()
            opt.step()
    with torch.no_grad():
        pre = model[0](x[tr]).T  # [256 units, 1400 samples]
        post = torch.relu(pre)

        def acc(mask: torch.Tensor) -> float:
            h = torch.relu(model[0](x[te])) * mask
            return float((model[2](h).argmax(1) == y[te]).float().mean())

    res = sg.score(pre, post)
    order = torch.argsort(res.scores)
    n = pre.shape[0]
    print(f"spectra_gpu {sg.__version__}: scored {n} hidden units of an MLP trained on sklearn digits "
          f"({len(tr)} calibration images) in {res.diagnostics['timings']['total']:.2f} s")
    print(f"  lambda_1 = {res.eigenvalues[0]:.3f}, dead units = {len(res.diagnostics['dead_units'])}, "
          f"solver = {res.diagnostics['solver']['name']}, max residual = {res.diagnostics['residual_max']:.1e}")
    full = torch.ones(n)
    print(f"  test accuracy, all units: {acc(full):.3f}")
    for frac in (0.25, 0.5):
        q = int(frac * n)
        low, high = full.clone(), full.clone()
        low[order[:q]] = 0
        high[order[-q:]] = 0
        rnd = full.clone()
        rnd[torch.randperm(n, generator=torch.Generator().manual_seed(1))[:q]] = 0
        print(f"  remove {int(frac * 100)}% (no fine-tune): lowest-score {acc(low):.3f}  random {acc(rnd):.3f}  "
              f"highest-score {acc(high):.3f}")
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


def _env(args: argparse.Namespace) -> int:
    from .env import report

    print(report())
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="spectra", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("demo", help="score a real layer (MLP on sklearn digits) and show what removal does")
    sub.add_parser("env", help="versions, devices and which backends are available")
    args = p.parse_args(argv)
    return {"demo": _demo, "env": _env}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
