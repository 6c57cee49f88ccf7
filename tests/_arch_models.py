"""Tiny randomly initialised models of every architecture issue 4 supports (no downloads)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def mlp() -> nn.Module:
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 12), nn.GELU(),
                      nn.Linear(12, 3))
    _randomise_bn(m)
    return m.eval()


class FunctionalMLP(nn.Module):
    """Activations as functions in forward (found on the fx trace, not in the module list)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 10), nn.Linear(10, 9), nn.Linear(9, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.tanh(self.fc2(F.leaky_relu(self.fc1(x), 0.2))))


class CNN(nn.Module):
    """conv -> BN -> ReLU -> maxpool -> conv -> BN -> ReLU -> flatten -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.b1(self.c1(x))), 2)
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc(torch.flatten(x, 1))


def cnn() -> nn.Module:
    torch.manual_seed(2)
    m = CNN()
    _randomise_bn(m)
    return m.eval()


class BasicBlock(nn.Module):
    def __init__(self, cin: int, c: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, c, 3, stride, 1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, c, 1, stride, bias=False), nn.BatchNorm2d(c))
                           if stride != 1 or cin != c else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + idt)


class Bottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, 1, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + x)


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 12, stride=2))
        self.layer2 = nn.Sequential(Bottleneck(12, 6, 12))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet() -> nn.Module:
    torch.manual_seed(3)
    m = TinyResNet()
    _randomise_bn(m)
    return m.eval()


def bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(4)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                     vocab_size=100, max_position_embeddings=32, attn_implementation="eager")
    return BertModel(cfg).eval()


def llama(kv: int = 2) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(5)
    cfg = LlamaConfig(hidden_size=48, num_attention_heads=6, num_key_value_heads=kv, head_dim=8,
                      intermediate_size=40, num_hidden_layers=2, vocab_size=100, max_position_embeddings=64,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def _randomise_bn(m: nn.Module) -> None:
    """Non-trivial BN statistics and affine parameters (negative gammas included), so BN slicing matters."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                n = mod.num_features
                mod.weight.copy_(torch.randn(n, generator=g))
                mod.bias.copy_(torch.randn(n, generator=g))
                mod.running_mean.copy_(torch.randn(n, generator=g))
                mod.running_var.copy_(torch.rand(n, generator=g) + 0.5)


def token_batch(b: int = 3, t: int = 7, vocab: int = 100, pad_last: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """input_ids + attention_mask with the first sequence right-padded by ``pad_last`` tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (b, t), generator=g)
    am = torch.ones(b, t, dtype=torch.long)
    if pad_last:
        am[0, t - pad_last:] = 0
        ids[0, t - pad_last:] = 0
    return {"input_ids": ids, "attention_mask": am}
