"""One prepared GPU check: ``bash benchmarks/gpu/run.sh [OUT.json]`` (this script does the work).

Runs, in this order, and writes one JSON:

1. ``env``: ``spectra_gpu.env.report()`` (versions, devices, backends and why not);
2. ``cuda_tests``: the CUDA-marked tests (``pytest tests -m cuda``), counts and the failures' names;
3. ``kernel_benchmarks``: the per-op benchmarks (``pytest benchmarks -m cuda``: each Triton kernel against its
   torch reference on the same inputs), pytest-benchmark's JSON reduced to median seconds per benchmark;
4. ``score``: ``sg.score`` end to end on one synthetic ReLU layer of N = 11008 units and M = 16384 samples, with
   fp32 and with bf16 inputs, beside the floor exact kNN cannot avoid (the two fp32 Gram products Z Z^T and
   A A^T) measured in the same run; seconds, ratio to the floor, peak device memory;
5. ``sequential``: a layer-sequential score (``spectra_gpu.sequential``) of a random 2-layer Llama at Llama-2-7B
   widths on 16k tokens, blocks read lazily from safetensors shards, hidden states on the device.

Without a CUDA device every GPU part is skipped with the reason, and ``score`` and ``sequential`` run small CPU
shapes instead, so CI exercises the script. Synthetic data only; the checkout runs in place (``PYTHONPATH=.``),
nothing is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import spectra_gpu as sg  # noqa: E402

GPU_SHAPE = (11008, 16384)
CPU_SHAPE = (384, 256)


def _cuda() -> bool:
    return torch.cuda.is_available()


def _sync() -> None:
    if _cuda():
        torch.cuda.synchronize()


def _pytest(args: list[str], timeout: float) -> tuple[int, str]:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.pop("TRITON_INTERPRET", None)  # real kernels on the GPU; the CPU interpreter is for CI's tests
    try:
        p = subprocess.run([sys.executable, "-m", "pytest", *args, "-q", "-p", "no:cacheprovider"], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 124, f"timed out after {timeout:.0f} s"
    return p.returncode, (p.stdout + p.stderr)[-4000:]


def _pytest_part(args: list[str], report: str, timeout: float, read: Any) -> dict[str, Any]:
    """Run pytest with ``args`` plus ``report`` (an option naming a file in a temporary folder, e.g.
    "--junitxml={}"); ``read(path)`` turns that file into the part's figures."""
    if not _cuda():
        return {"skipped": "no CUDA device: torch.cuda.is_available() is False"}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "report"
        rc, tail = _pytest([*args, report.format(path)], timeout)
        out: dict[str, Any] = {"returncode": rc}
        if path.exists():
            out.update(read(path))
        if rc not in (0, 5):
            out["output_tail"] = tail
    return out


def _junit_counts(path: Path) -> dict[str, Any]:
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    assert suite is not None
    out: dict[str, Any] = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    out["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                     if c.find("failure") is not None or c.find("error") is not None]
    return out


def _benchmark_medians(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    return {"median_seconds": {b["fullname"]: b["stats"]["median"] for b in data.get("benchmarks", [])}}


def cuda_tests(timeout: float) -> dict[str, Any]:
    return _pytest_part(["tests", "-m", "cuda"], "--junitxml={}", timeout, _junit_counts)


def kernel_benchmarks(timeout: float) -> dict[str, Any]:
    return _pytest_part(["benchmarks", "-m", "cuda"], "--benchmark-json={}", timeout, _benchmark_medians)


def _timed(fn: Any, repeats: int) -> float:
    fn()  # warm-up: kernels compiled, allocator primed
    _sync()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync()
        best = min(best, time.perf_counter() - t)
    return best


def _relu_layer(n: int, m: int, device: str, d: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(d, m, generator=g, device=device)
    w = torch.randn(n, d, generator=g, device=device) / d**0.5
    pre = w @ x + 0.3 * torch.randn(n, 1, generator=g, device=device)
    return pre, torch.relu(pre)


def score_end_to_end(repeats: int) -> dict[str, Any]:
    device = "cuda" if _cuda() else "cpu"
    n, m = GPU_SHAPE if _cuda() else CPU_SHAPE
    if not _cuda():
        repeats = 1
    out: dict[str, Any] = {"device": device, "n": n, "m": m, "repeats": repeats}
    if not _cuda():
        out["note"] = f"no CUDA device: the CPU smoke shape {CPU_SHAPE} runs instead of {GPU_SHAPE}"
    pre, post = _relu_layer(n, m, device)
    floor = _timed(lambda: (pre @ pre.T, post @ post.T), repeats)
    out["seconds_gram_floor_fp32"] = floor
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        z, a = pre.to(dtype), post.to(dtype)
        if _cuda():
            torch.cuda.reset_peak_memory_stats()
        res: dict[str, Any] = {}
        secs = _timed(lambda z=z, a=a, res=res: res.update(r=sg.score(z, a)), repeats)
        r = res["r"]
        out[name] = {"seconds": secs, "ratio_to_gram_floor": secs / floor,
                     "solver": str(r.diagnostics.get("solver", {}).get("name", r.diagnostics.get("solver"))),
                     "lambda_1": float(r.eigenvalues[0]), "alive": int(r.alive.sum()),
                     "peak_device_gib": torch.cuda.max_memory_allocated() / 2**30 if _cuda() else None}
    return out


TINY_WIDTHS = {"hidden_size": 64, "intermediate_size": 176, "num_attention_heads": 4, "num_key_value_heads": 4,
               "vocab_size": 512}


def sequential_7b(tokens: int = 16384, seq_len: int = 1024, layers: int = 2) -> dict[str, Any]:
    """``spectra_gpu.sequential`` on a random Llama at Llama-2-7B widths (``benchmarks/llm_7b_width.py``'s
    model, shards written to a temporary folder, blocks read lazily), spectral scorer, hidden states on the
    device. Without CUDA the same code runs on a tiny Llama (hidden 64) on CPU, as a smoke test."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import llm_7b_width as bench

    from spectra_gpu.config import PruneConfig
    from spectra_gpu.sequential import capture_and_score_sequential, load_empty, peak_memory
    from spectra_gpu.units import discover_groups

    device = torch.device("cuda" if _cuda() else "cpu")
    widths = bench.WIDTHS if _cuda() else TINY_WIDTHS
    if not _cuda():
        tokens, seq_len = 256, 64
    out: dict[str, Any] = {"device": str(device), "layers": layers, "tokens": tokens, "seq_len": seq_len,
                           "widths": widths}
    if not _cuda():
        out["note"] = "no CUDA device: a tiny Llama (hidden 64) on CPU runs the same code instead of 7B widths"
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        bench.write_shards(Path(d), layers, 0, widths)
        out["seconds_write_shards"] = time.perf_counter() - t
        model = load_empty(d)
        groups = discover_groups(model, ("ffn", "head"))
        calib = bench._calib(tokens, seq_len, 0, widths["vocab_size"])
        cfg = PruneConfig(scorer="spectral", kinds=("ffn", "head"))
        if _cuda():
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        res = capture_and_score_sequential(model, groups, calib, cfg, weights=d, device=device,
                                           hidden_store="device")
        _sync()
        out.update(seconds_total=time.perf_counter() - t, seconds_capture=res.seconds_capture,
                   seconds_scorer=res.seconds_scorer, blocks=res.blocks, **peak_memory(device))
        out["lambda_1"] = {g: float(o.extra["eigenvalues"][0]) for g, o in res.outputs.items()
                           if o.extra.get("eigenvalues") is not None and len(o.extra["eigenvalues"])}
    return out


def _write(out: Path, result: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="the JSON to write")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--test-timeout", type=float, default=180.0, help="seconds for the CUDA tests")
    ap.add_argument("--bench-timeout", type=float, default=150.0, help="seconds for the kernel benchmarks")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "host": platform.node(), "python": platform.python_version(),
        "torch": torch.__version__, "cuda": torch.cuda.get_device_name() if _cuda() else None,
        "git_sha": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                  text=True).stdout.strip() or None,
    }
    from spectra_gpu.env import report

    result["env"] = report().splitlines()
    for key, fn in (("cuda_tests", lambda: cuda_tests(args.test_timeout)),
                    ("kernel_benchmarks", lambda: kernel_benchmarks(args.bench_timeout)),
                    ("score", lambda: score_end_to_end(args.repeats)), ("sequential", sequential_7b)):
        t = time.perf_counter()
        try:
            result[key] = fn()
        except Exception as e:  # one broken part must not lose the others' figures
            result[key] = {"error": f"{type(e).__name__}: {e}"}
        result[key]["seconds_part"] = time.perf_counter() - t
        print(f"[gpu check] {key}: {json.dumps(result[key], default=str)[:400]}", flush=True)
        result["seconds_total"] = time.perf_counter() - t0
        _write(Path(args.out), result)  # after every part: a run stopped by run.sh's timeout keeps its figures
    print(f"[gpu check] wrote {args.out}")
    failed = any("error" in result[k] for k in ("cuda_tests", "kernel_benchmarks", "score", "sequential"))
    failed |= result["cuda_tests"].get("returncode", 0) not in (0, 5)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
