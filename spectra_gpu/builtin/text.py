"""Language-model evaluation on running text: documents to fixed-length token sequences that each start
the way the model expects (its tokenizer's BOS where it has one), batches of them, and perplexity.

A model trained with BOS at the start of every sequence reads several times its true perplexity on
sequences cut from a stream without it, so every sequence gets the BOS here, not only the first of a split.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._progress import progress

_DEFAULT = object()


def token_sequences(tokenizer: Any, documents: Sequence[str], seq_len: int, *, bos: Any = _DEFAULT) -> torch.Tensor:
    """[n, seq_len] int64 token sequences of ``documents``: each document tokenised without special tokens,
    the documents joined by the tokenizer's EOS (when it has one) into one stream in the given order, the
    stream cut into consecutive pieces of seq_len - 1 tokens, each prefixed with ``bos`` (default: the
    tokenizer's ``bos_token_id``; None: no prefix, pieces of seq_len). A last piece shorter than that is
    dropped. Deterministic: the same documents give the same sequences."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len: expected an int >= 2, got {seq_len!r}")
    if isinstance(documents, str) or not all(isinstance(d, str) for d in documents):
        raise TypeError("documents: expected a sequence of strings (one per document), got "
                        f"{type(documents).__name__}")
    bos_id = getattr(tokenizer, "bos_token_id", None) if bos is _DEFAULT else bos
    eos_id = getattr(tokenizer, "eos_token_id", None)
    stream: list[int] = []
    ids = tokenizer(list(documents), add_special_tokens=False)["input_ids"] if documents else []
    for i, doc in enumerate(ids):
        if i and eos_id is not None:
            stream.append(int(eos_id))
        stream += [int(t) for t in doc]
    piece = seq_len - 1 if bos_id is not None else seq_len
    n = len(stream) // piece
    body = torch.tensor(stream[:n * piece], dtype=torch.int64).reshape(n, piece)
    if bos_id is None:
        return body
    return torch.cat([torch.full((n, 1), int(bos_id), dtype=torch.int64), body], 1)


def expected_bos(tokenizer: Any) -> int | None:
    """The token a sequence starts with the way the model expects it: the tokenizer's BOS when its own
    encoding of a text puts it first (Llama-style tokenizers), else None (GPT-2-style tokenizers, SmolLM2,
    whose BOS is a chat-turn marker: BOS on every sequence of running text raises its perplexity)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return int(bos) if len(ids) and int(ids[0]) == int(bos) else None


def lm_batches(sequences: torch.Tensor, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Hugging Face batches {input_ids, attention_mask} of ``batch_size`` sequences (the last may be smaller)
    of [n, T] ``sequences``, in order."""
    if not isinstance(sequences, torch.Tensor) or sequences.dim() != 2:
        raise ValueError(f"sequences: expected an [n, T] tensor, got {type(sequences).__name__} "
                         f"{tuple(getattr(sequences, 'shape', ()))}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    return [{"input_ids": s, "attention_mask": torch.ones_like(s)} for s in torch.split(sequences, batch_size)]


def token_nll(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(summed next-token negative log-likelihood [fp64 scalar], predicted tokens) of one batch: every position
    but the first predicts the next token; targets at padding (attention_mask 0) are skipped."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    dev = next((p.device for p in model.parameters()), ids.device)
    out = model(input_ids=ids.to(dev), attention_mask=mask.to(dev))
    logits = out.logits if hasattr(out, "logits") else out
    tgt = ids[:, 1:].to(dev).masked_fill(mask[:, 1:].to(dev) == 0, -100)
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).double(), tgt.flatten(), ignore_index=-100, reduction="sum")
    return nll, int((tgt != -100).sum())


def perplexity(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], *, desc: str = "perplexity") -> float:
    """exp(mean next-token negative log-likelihood) over every predicted token of ``batches`` (the first
    token of a sequence is context only), in eval mode without gradients (the training flag is restored)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for b in progress(list(batches), desc=desc):
                nll, n = token_nll(model, b)
                total += float(nll)
                count += n
    finally:
        model.train(was)
    if count == 0:
        raise ValueError("perplexity: expected batches with at least one predicted token, got none")
    return math.exp(total / count)


__all__ = ["expected_bos", "lm_batches", "perplexity", "token_nll", "token_sequences"]
