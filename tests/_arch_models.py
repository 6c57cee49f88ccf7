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


# ---- one tiny model per transformer family (families.py), random weights, built from the config ---------------
_TINY = dict(num_hidden_layers=2, vocab_size=100, max_position_embeddings=64)


def hf_family(name: str) -> nn.Module:
    """A tiny random-weight Hugging Face model of family/model ``name`` (eager attention, eval mode)."""
    import transformers as tf

    torch.manual_seed(6)
    gqa = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=48, **_TINY)
    builders = {
        "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**gqa, tie_word_embeddings=True)),
        "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**gqa)),
        "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**gqa)),  # q/k/v biases
        "qwen3": lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**gqa)),  # per-head_dim q_norm / k_norm
        "gemma": lambda: tf.GemmaForCausalLM(tf.GemmaConfig(**gqa)),  # GeGLU
        "gemma2": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(**gqa)),
        "gemma3": lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**gqa)),
        "phi3": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**gqa, pad_token_id=0)),  # fused gate_up_proj / qkv_proj
        "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_inner=48, vocab_size=100,
                                                         n_positions=64)),
        "opt": lambda: tf.OPTForCausalLM(tf.OPTConfig(hidden_size=32, num_attention_heads=4, ffn_dim=48,
                                                      word_embed_proj_dim=32, **_TINY)),
        "bert": lambda: tf.BertForMaskedLM(tf.BertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=48,
                                                         **_TINY)),
        "roberta": lambda: tf.RobertaForMaskedLM(tf.RobertaConfig(hidden_size=32, num_attention_heads=4,
                                                                  intermediate_size=48, pad_token_id=1, **_TINY)),
        "distilbert": lambda: tf.DistilBertForMaskedLM(tf.DistilBertConfig(dim=32, n_heads=4, hidden_dim=48, n_layers=2,
                                                                           vocab_size=100, max_position_embeddings=64)),
        "vit": lambda: tf.ViTForImageClassification(tf.ViTConfig(hidden_size=32, num_attention_heads=4,
                                                                 intermediate_size=48, num_hidden_layers=2,
                                                                 image_size=16, patch_size=4, num_labels=3)),
    }
    m = builders[name]()
    m.config._attn_implementation = "eager"
    return m.eval()


def family_batch(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """An input batch for ``hf_family(name)``: pixel values for ViT, else right-padded token ids."""
    if name == "vit":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed))}
    return token_batch(b=3, t=7, vocab=100, pad_last=2, seed=seed)
