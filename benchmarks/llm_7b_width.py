"""Layer-sequential vs whole-model capture + scoring at Llama-2-7B widths, on CPU.

A ``LlamaConfig`` with Llama-2-7B's widths (hidden 4096, FFN 11008, 32 heads, vocab 32000) and a few randomly
initialised layers (normal(0, 0.02) weights, unit RMSNorm weights: a seeded random model, not Llama-2's
weights) is written as safetensors shards (one per layer) to a temporary folder. Calibration data: random
token ids (uniform over the vocabulary, seeded), ``--tokens`` in sequences of ``--seq-len``. Groups: every
layer's FFN neurons (N = 11008) and attention heads (N = 32), scored with the spectral scorer.

Each path runs in its own subprocess, so its peak RSS (getrusage) is its own:
- ``sequential``: the model built on the meta device, every block read from its shard when processed and
  released after (``spectra_gpu.sequential``), hidden states in CPU memory;
- ``whole``: the model loaded into memory, all groups captured in one pass (``rounds.capture_and_score``).

    OMP_NUM_THREADS=2 python benchmarks/llm_7b_width.py --tokens 16384 \
        --paths whole:2 sequential:2 sequential:4 --out benchmarks/results/llm-7b-width_<date>_<sha>.json

``--mode sketch`` uses sketched statistics for the FFN groups (heads stay exact); the default is exact
(2 x 0.97 GB of fp64 Grams per FFN group).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
WIDTHS = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32,
          "vocab_size": 32000}


def _config(layers: int, seq_len: int, widths: dict[str, int] = WIDTHS) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(**widths, num_hidden_layers=layers, max_position_embeddings=max(4096, seq_len),
                       tie_word_embeddings=False, torch_dtype="float32")


def write_shards(folder: Path, layers: int, seed: int, widths: dict[str, int] = WIDTHS) -> None:
    """The random model's tensors, one safetensors file per layer (+ one for embeddings / norm / head) and
    an index, without ever holding more than one layer."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    with init_empty_weights():
        model = LlamaForCausalLM(_config(layers, 128, widths))
    gen = torch.Generator().manual_seed(seed)
    parts: dict[str, list[tuple[str, torch.Size]]] = {}
    for name, p in model.named_parameters():
        parts.setdefault(_part(name), []).append((name, p.shape))
    for part, names in parts.items():
        save_file({n: torch.ones(shape) if n.endswith("norm.weight") else torch.randn(shape, generator=gen) * 0.02
                   for n, shape in names}, str(folder / f"{part}.safetensors"))
    weight_map = {n: f"{part}.safetensors" for part, names in parts.items() for n, _ in names}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _config(layers, 128, widths).save_pretrained(str(folder))


def _part(name: str) -> str:
    return f"layer{int(name.split('.')[2]):02d}" if name.startswith("model.layers.") else "rest"


def _calib(tokens: int, seq_len: int, seed: int, vocab: int = WIDTHS["vocab_size"]) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed + 1)
    out = []
    for _ in range(max(1, tokens // seq_len)):
        ids = torch.randint(0, vocab, (1, seq_len), generator=gen)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def run_path(path: str, layers: int, folder: Path, tokens: int, seq_len: int, mode: str, seed: int) -> dict[str, Any]:
    """One path in this process; returns its timings and peak memory."""
    from accelerate import init_empty_weights
    from transformers import LlamaForCausalLM

    from spectra_gpu.config import PruneConfig
    from spectra_gpu.rounds import capture_and_score
    from spectra_gpu.sequential import ShardedWeights, capture_and_score_sequential, peak_memory
    from spectra_gpu.units import discover_groups

    t0 = time.perf_counter()
    load_start = os.getloadavg()[0]
    with init_empty_weights():
        model = LlamaForCausalLM(_config(layers, seq_len)).eval()
    weights = ShardedWeights(folder)
    calib = _calib(tokens, seq_len, seed)
    groups = discover_groups(model, ("ffn", "head"))
    cfg = PruneConfig(scorer="spectral", kinds=("ffn", "head"), seed=seed)
    rec: dict[str, Any] = {"path": path, "layers": layers, "tokens": len(calib) * seq_len, "seq_len": seq_len,
                           "ffn_stats_mode": mode, "groups": [g.name for g in groups]}
    if path == "sequential":
        res = capture_and_score_sequential(model, groups, calib, cfg, weights=weights, hidden_store="cpu",
                                           mode=mode if mode != "exact" else None)
        rec["blocks"] = res.blocks
        rec["hidden_bytes"] = res.hidden_bytes
    else:
        t = time.perf_counter()
        weights.load(model, "", torch.device("cpu"))
        rec["seconds_load"] = time.perf_counter() - t
        if mode != "exact":
            raise SystemExit("the whole-model path captures in the mode the scorer asks for (exact)")
        res = capture_and_score(model, groups, calib, cfg)
    rec.update(seconds_capture=res.seconds_capture, seconds_scorer=res.seconds_scorer,
               seconds_per_group=res.seconds_per_group, seconds_total=time.perf_counter() - t0,
               **peak_memory(torch.device("cpu")), load_average_1min={"start": load_start, "end": os.getloadavg()[0]})
    rec["lambda_1"] = {g: float(o.extra["eigenvalues"][0]) for g, o in res.outputs.items()
                       if o.extra.get("eigenvalues") is not None}
    return rec


def _meta() -> dict[str, Any]:
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    status = ["git", "status", "--porcelain", "--untracked-files=no", "--", "spectra_gpu", "benchmarks"]
    changed = subprocess.run(status, capture_output=True, text=True, cwd=ROOT).stdout.split("\n")
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        cpu = ""
    return {"date": datetime.date.today().isoformat(), "git_sha": sha.strip(),
            "uncommitted": sorted(ln[3:] for ln in changed if ln.strip()), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "cpu_model": cpu or platform.machine(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "model": {**WIDTHS, "init": "normal(0, 0.02)"},
            "calibration": "random token ids, uniform over the vocabulary (seeded)"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--paths", nargs="+", default=["whole:2", "sequential:2", "sequential:4"],
                    help="PATH:LAYERS, PATH in whole | sequential")
    ap.add_argument("--mode", choices=("exact", "sketch"), default="exact")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--shards", type=Path, default=None, help="folder holding (or receiving) the random shards")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one path, print its JSON
    a = ap.parse_args(argv)
    if a.one is not None:
        path, layers = a.one.split(":")
        print(json.dumps(run_path(path, int(layers), a.shards, a.tokens, a.seq_len, a.mode, a.seed)))
        return 0
    layers_max = max(int(p.split(":")[1]) for p in a.paths)
    with tempfile.TemporaryDirectory(prefix="llm7b-") as tmp:
        folder = a.shards or Path(tmp)
        if not (folder / "model.safetensors.index.json").is_file():
            t = time.perf_counter()
            write_shards(folder, layers_max, a.seed)
            print(f"wrote {layers_max} random layers to {folder} in {time.perf_counter() - t:.0f} s", flush=True)
        results = []
        for p in a.paths:
            print(f"{p}: started {datetime.datetime.now():%H:%M:%S}", flush=True)
            cmd = [sys.executable, __file__, "--one", p, "--shards", str(folder), "--tokens", str(a.tokens),
                   "--seq-len", str(a.seq_len), "--mode", a.mode, "--seed", str(a.seed)]
            env = {**os.environ, "PYTHONPATH": str(ROOT), "SPECTRA_GPU_PROGRESS": "0"}
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                raise SystemExit(f"{p} failed:\n{done.stderr[-4000:]}")
            rec = json.loads(done.stdout.strip().splitlines()[-1])
            results.append(rec)
            print(f"{p}: total {rec['seconds_total']:.0f} s, capture {rec['seconds_capture']:.0f} s, scoring "
                  f"{rec['seconds_scorer']:.0f} s, peak RSS {rec['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
            _write(a.out, {**_meta(), "ffn_stats_mode": a.mode, "results": results})  # after every path
    return 0


def _write(out: Path | None, doc: dict[str, Any]) -> None:
    if out is None:
        print(json.dumps(doc, indent=1))
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, out)


if __name__ == "__main__":
    sys.exit(main())
