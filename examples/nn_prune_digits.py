"""Spectral scores as ``torch.nn.utils.prune`` masks (no Torch-Pruning needed): an MLP on sklearn's digits.

    python examples/nn_prune_digits.py             # 30 / 50 / 70% of the hidden neurons masked
    python examples/nn_prune_digits.py --small     # CI size: fewer epochs

``spectral_channel_scores`` calibrates once and scores every layer followed by an activation;
``prune_channels`` turns the scores into ``prune.ln_structured(..., importance_scores=...)`` masks (plus the
bias), which computes the same function as removing the neurons. For comparison the same masks are drawn
from ``prune.ln_structured`` on the weights (L1 row norm) and from ``prune.random_structured``.
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from spectra_gpu.builtin import zoo
from spectra_gpu.integrations.nn_prune import prune_channels, spectral_channel_scores


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


def main(argv: list[str] | None = None) -> dict[str, dict[float, float]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="CI size: fewer epochs")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    data = zoo.digits()
    model = mlp()
    train(model, data.x_train, data.y_train, 5 if args.small else 20)
    dense = accuracy(model, data.x_test, data.y_test)
    print(f"dense MLP 64-128-128-10 on digits ({len(data.x_train)} train / {len(data.x_test)} test): "
          f"accuracy {dense:.4f}")

    calib = [data.x_train[:512], data.x_train[512:1024]]
    results: dict[str, dict[float, float]] = {"spectral": {}, "l1": {}, "random": {}}
    for amount in (0.3, 0.5, 0.7):
        for name in results:
            m = copy.deepcopy(model)
            torch.manual_seed(1)
            if name == "spectral":
                scores = spectral_channel_scores(m, calib)  # {"1": fc1 scores, "3": fc2 scores}
                prune_channels(scores, amount)
            else:
                mask_baseline(m, amount, name)
            results[name][amount] = accuracy(m, data.x_test, data.y_test)
    print("scored layers:", ", ".join(f"{k} ({len(s.scores)} units, {s.result.diagnostics['n_alive']} alive)"
                                      for k, s in scores.items()))
    print(f"\naccuracy with the masks, no fine-tune (dense {dense:.4f}); random = one seed")
    print(f"{'masked':<8}" + "".join(f"{k:>10}" for k in results))
    for amount in (0.3, 0.5, 0.7):
        print(f"{amount:<8.0%}" + "".join(f"{results[k][amount]:>10.4f}" for k in results))
    return results


if __name__ == "__main__":
    main()
