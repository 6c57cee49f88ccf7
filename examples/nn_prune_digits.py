"""spectra_gpu scores as ``torch.nn.utils.prune`` masks (no Torch-Pruning needed): an MLP on sklearn's digits.

    python examples/nn_prune_digits.py             # 30 / 50 / 70% of the hidden neurons masked
    python examples/nn_prune_digits.py --small     # CI size: fewer epochs

``channel_scores`` calibrates once and scores every discovered group (here the two hidden layers) with any
registered scorer (spectral, and wanda_sp for comparison); ``prune_channels`` turns the scores into
``prune.ln_structured(..., importance_scores=...)`` masks (plus the bias), which computes the same function as
removing the neurons. For comparison the same masks are drawn from ``prune.ln_structured`` on the weights
(L1 row norm) and from ``prune.random_structured``. A full run (not ``--small``) writes
examples/results/nn_prune_digits.json and its table into examples/README.md.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from spectra_gpu.builtin import zoo
from spectra_gpu.integrations.nn_prune import channel_scores, prune_channels

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _figures  # noqa: E402

NAME = "nn_prune_digits"
AMOUNTS = (0.3, 0.5, 0.7)


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                         nn.Linear(128, 10))


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> None:
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(32):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean())


def mask_baseline(model: nn.Sequential, amount: float, how: str) -> None:
    for m in (model[1], model[3]):
        if how == "l1":
            prune.ln_structured(m, "weight", amount=amount, n=1, dim=0)
        else:
            prune.random_structured(m, "weight", amount=amount, dim=0)
        keep = m.weight_mask.any(dim=1)
        prune.custom_from_mask(m, "bias", keep.to(m.bias.dtype))


def render(results: dict[str, Any]) -> str:
    """The README block of a full run."""
    st, acc = results["setup"], results["methods"]
    lines = [f"`python examples/nn_prune_digits.py` (MLP 64-128-128-10, {st['n_train']} train / {st['n_test']} test "
             f"digits, {st['epochs']} epochs, dense accuracy {st['acc_dense']:.3f}; masks, no fine-tune):", "",
             "| masked | " + " | ".join(acc) + " |", "|---" * (len(acc) + 1) + "|"]
    for amount in AMOUNTS:
        lines.append(f"| {amount:.0%} | " + " | ".join(f"{acc[k][str(amount)]:.3f}" for k in acc) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="CI size: fewer epochs")
    ap.add_argument("--no-publish", action="store_true", help="do not write the results JSON and README block")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    data = zoo.digits()
    model = mlp()
    epochs = 5 if args.small else 20
    train(model, data.x_train, data.y_train, epochs)
    dense = accuracy(model, data.x_test, data.y_test)
    print(f"dense MLP 64-128-128-10 on digits ({len(data.x_train)} train / {len(data.x_test)} test): "
          f"accuracy {dense:.4f}")

    calib = [data.x_train[:512], data.x_train[512:1024]]
    results: dict[str, dict[str, float]] = {"spectral": {}, "wanda_sp": {}, "L1 row norm": {}, "random": {}}
    for amount in AMOUNTS:
        for name in results:
            m = copy.deepcopy(model)
            torch.manual_seed(1)
            if name in ("spectral", "wanda_sp"):
                scores = channel_scores(m, calib, name)  # {"1": first hidden layer, "3": second}
                prune_channels(scores, amount)
            else:
                mask_baseline(m, amount, "l1" if name == "L1 row norm" else "random")
            results[name][str(amount)] = accuracy(m, data.x_test, data.y_test)
    report = {"setup": dict(n_train=len(data.x_train), n_test=len(data.x_test), epochs=epochs, acc_dense=dense),
              "methods": results}
    print(f"\naccuracy with the masks, no fine-tune (dense {dense:.4f}); random = one seed")
    print(f"{'masked':<8}" + "".join(f"{k:>13}" for k in results))
    for amount in AMOUNTS:
        print(f"{amount:<8.0%}" + "".join(f"{results[k][str(amount)]:>13.4f}" for k in results))
    if not args.small and not args.no_publish:
        _figures.publish(NAME, report, render)
        print(f"wrote examples/results/{NAME}.json and its block in examples/README.md")
    return report


if __name__ == "__main__":
    main()
