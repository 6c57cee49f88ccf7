"""The english-text corpus (zoo.english_corpus) and the language-model helpers (builtin.text): a fixed split by
document, disjoint and deterministic, of the documented sizes; every sequence starts with the tokenizer's BOS;
perplexity equals a plain-transformers evaluation of the same tokens."""

from __future__ import annotations

import math

import pytest
import torch

from spectra_gpu.builtin import text, zoo


class CharTokenizer:
    """A stand-in tokenizer: one id per character (ord + 3), BOS 1, EOS 2."""

    bos_token_id, eos_token_id = 1, 2

    def __call__(self, texts, add_special_tokens=True):
        ids = [[ord(c) % 1000 + 3 for c in t] for t in texts]
        if add_special_tokens:
            ids = [[self.bos_token_id, *i] for i in ids]
        return {"input_ids": ids}


@pytest.fixture(scope="module")
def corpus():
    return zoo.english_corpus()


def test_split_is_by_document_disjoint_and_deterministic(corpus):
    again = zoo.english_corpus()
    assert again == corpus
    splits = {"calibration": corpus.calibration, "training": corpus.training, "evaluation": corpus.evaluation}
    sets = {k: set(v) for k, v in splits.items()}
    for k, v in splits.items():
        assert len(sets[k]) == len(v), f"{k}: a document appears twice"
    assert not sets["calibration"] & sets["training"]
    assert not sets["calibration"] & sets["evaluation"]
    assert not sets["training"] & sets["evaluation"]
    assert corpus.documents == {  # the documented counts (zoo.english_corpus)
        "calibration": {"convention-2012": 22, "convention-2016": 7, "debates-2016": 8, "guardian-headlines": 18,
                        "hamlet": 1},
        "training": {"convention-2012": 139, "convention-2016": 43, "debates-2016": 42, "guardian-headlines": 135,
                     "hamlet": 18},
        "evaluation": {"convention-2012": 28, "convention-2016": 7, "debates-2016": 8, "guardian-headlines": 17,
                       "hamlet": 1}}
    chars = {k: sum(len(d) for d in v) for k, v in splits.items()}
    assert chars == {"calibration": 185_265, "training": 1_360_387, "evaluation": 194_834}
    assert any("To be, or not to be" in d for d in corpus.training + corpus.calibration + corpus.evaluation)


def test_every_sequence_starts_with_bos():
    tok = CharTokenizer()
    docs = ["abcdefg", "hij", "klmnopqrstu"]
    seqs = text.token_sequences(tok, docs, 5)
    # stream: a..g EOS h i j EOS k..u = 7 + 1 + 3 + 1 + 11 = 23 tokens -> 5 pieces of 4, each after a BOS
    assert seqs.shape == (5, 5)
    assert bool((seqs[:, 0] == 1).all())
    body = seqs[:, 1:].flatten().tolist()
    stream = tok(docs, add_special_tokens=False)["input_ids"]
    want = stream[0] + [2] + stream[1] + [2] + stream[2]
    assert body == want[:20]
    assert text.token_sequences(tok, docs, 5).equal(seqs)  # deterministic
    plain = text.token_sequences(tok, docs, 5, bos=None)
    assert plain.shape == (4, 5) and plain.flatten().tolist() == want[:20]
    for bad in (1, 2.5, True):
        with pytest.raises(ValueError, match="seq_len"):
            text.token_sequences(tok, docs, bad)
    with pytest.raises(TypeError, match="documents"):
        text.token_sequences(tok, "one string", 5)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=48,
                      num_hidden_layers=2, vocab_size=1003, max_position_embeddings=64, initializer_range=0.1)
    return LlamaForCausalLM(cfg).eval()


def _reference_perplexity(model, seqs: torch.Tensor) -> float:
    """Plain transformers: each sequence alone, labels = inputs (the model shifts them), mean loss."""
    with torch.no_grad():
        losses = [float(model(input_ids=s[None], labels=s[None]).loss) for s in seqs]
    return math.exp(sum(losses) / len(losses))


def test_perplexity_equals_plain_transformers():
    model = _tiny_llama()
    seqs = text.token_sequences(CharTokenizer(), ["the quick brown fox jumps over the lazy dog " * 5,
                                                  "pack my box with five dozen liquor jugs " * 4], 16)
    assert seqs.shape[0] >= 5
    got = text.perplexity(model, text.lm_batches(seqs, 3))
    assert got == pytest.approx(_reference_perplexity(model, seqs), rel=1e-5)
    # padding: targets where attention_mask is 0 are skipped, as labels = -100 in transformers
    b = {"input_ids": seqs[:2].clone(), "attention_mask": torch.ones_like(seqs[:2])}
    b["attention_mask"][0, 10:] = 0
    labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
    with torch.no_grad():
        ref = model(**b, labels=labels).loss
    with torch.no_grad():
        nll, n = text.token_nll(model, b)
    assert n == 9 + 15 and float(nll) / n == pytest.approx(float(ref), rel=1e-5)
    with pytest.raises(ValueError, match="sequences"):
        text.lm_batches(seqs[0], 2)


@pytest.mark.slow
def test_smollm2_split_sizes_bos_and_perplexity(corpus):
    """SmolLM2 tokenizer: training >= 200k tokens, evaluation >= 20k (the documented counts); every 128-token
    sequence starts with BOS; perplexity on 16 evaluation sequences equals plain transformers, and BOS on
    every sequence versus a stream cut without it (the old way) is reported."""
    model, tok = zoo.load_smollm2(fresh=False)
    counts = {}
    for k in ("calibration", "training", "evaluation"):
        docs = getattr(corpus, k)
        ids = tok(docs, add_special_tokens=False)["input_ids"]
        counts[k] = sum(len(i) for i in ids) + len(docs) - 1
    assert counts == {"calibration": 43_577, "training": 319_406, "evaluation": 46_568}
    assert counts["training"] >= 200_000 and counts["evaluation"] >= 20_000
    seqs = text.token_sequences(tok, corpus.evaluation, 128)
    assert seqs.shape == (366, 128) and bool((seqs[:, 0] == tok.bos_token_id).all())
    few = seqs[:16]
    ppl = text.perplexity(model, text.lm_batches(few, 8))
    assert ppl == pytest.approx(_reference_perplexity(model, few), rel=1e-4)
    no_bos = text.token_sequences(tok, corpus.evaluation, 128, bos=None)[:16]
    ppl_no_bos = text.perplexity(model, text.lm_batches(no_bos, 8))
    print(f"SmolLM2 evaluation perplexity, 16 x 128 tokens: BOS on every sequence {ppl:.2f}, no BOS {ppl_no_bos:.2f}")
