"""Data-parallel calibration + sharded scoring (spectra_gpu.distributed) under ``torchrun --nproc_per_node=2``
(gloo) gives the scores and selections of one process: an MLP and tiny Llama / BERT models (whole-model and
layer-sequential, one round and two), and SmolLM2's FFN groups (marked slow). Also the shift algebra the
reduction relies on, in one process.

This file is also the worker: ``torchrun ... tests/test_distributed.py OUT CASES`` runs the distributed step
and, on rank 0, the one-process step, and writes their differences to OUT as JSON."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from spectra_gpu.config import PruneConfig
from spectra_gpu.distributed import capture_and_score_distributed, init_from_env, reshift, share, subtract, world
from spectra_gpu.rounds import Baseline, apply_removals, capture_and_score, select_removals
from spectra_gpu.selection import select_units
from spectra_gpu.sequential import capture_and_score_sequential
from spectra_gpu.stats import SignalStats
from spectra_gpu.units import discover_groups

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"


# ---- the cases (built identically on every rank) -------------------------------------------------------------
def _mlp_case():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 40), nn.ReLU(), nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 3)).eval()
    g = torch.Generator().manual_seed(1)
    calib = [(torch.randn(16, 12, generator=g), torch.zeros(16, dtype=torch.long)) for _ in range(5)]
    return model, calib, ("neuron",)


def _tokens(vocab: int, n: int, b: int, t: int) -> list[dict[str, torch.Tensor]]:
    from test_sequential import token_batches  # this file's folder is on sys.path under pytest and torchrun

    return token_batches(vocab, n, b, t, seed=2)


def _llama_case():
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=48, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                                   num_hidden_layers=3, vocab_size=101, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval(), _tokens(101, 5, 2, 16), ("ffn", "head")


def _bert_case():
    import transformers

    cfg = transformers.BertConfig(hidden_size=48, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                                  vocab_size=101, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval(), _tokens(101, 3, 2, 16), ("ffn", "head")


def _smollm2_case():
    from spectra_gpu.builtin import zoo

    model, _ = zoo.load_smollm2(fresh=False)
    return model, _tokens(49152, 3, 2, 24), ("ffn",)


CASES = {  # name: (builder, scorers, sequential variants, rounds)
    "mlp": (_mlp_case, ("spectral", "wanda_sp", "random"), (False,), 2),
    "llama": (_llama_case, ("spectral", "flap"), (False, True), 2),
    "bert": (_bert_case, ("spectral",), (False, True), 1),
    "smollm2": (_smollm2_case, ("spectral", "wanda_sp"), (False, True), 1),
}


def _compare(a, b) -> dict[str, float | bool]:
    diff, same = 0.0, True
    for name, oa in a.outputs.items():
        sa, sb = oa.scores, b.outputs[name].scores
        same &= bool(torch.equal(torch.isinf(sa), torch.isinf(sb)))
        fin = torch.isfinite(sa)
        if bool(fin.any()):
            diff = max(diff, float((sa[fin] - sb[fin]).abs().max()))
        q = math.ceil(0.2 * len(sa))
        same &= bool(torch.equal(select_units(sa, q), select_units(sb, q)))
    same &= list(a.outputs) == list(b.outputs)
    return {"max_diff": diff, "same_selection": same}


def _rounds(build, scorer: str, sequential: bool, n_rounds: int, distributed: bool) -> list:
    model, calib, kinds = build()
    cfg = PruneConfig(scorer=scorer, kinds=kinds, round_fraction=0.2, target=0.4)
    groups = discover_groups(model, kinds)
    base = Baseline.of(model, groups, cfg)
    out = []
    for rnd in range(n_rounds):
        if distributed:
            sc = capture_and_score_distributed(model, groups, calib, cfg, round_index=rnd, sequential=sequential)
        elif sequential:
            sc = capture_and_score_sequential(model, groups, calib, cfg, round_index=rnd)
        else:
            sc = capture_and_score(model, groups, calib, cfg, round_index=rnd)
        out.append(sc)
        if rnd + 1 < n_rounds:
            apply_removals(model, groups, select_removals(groups, sc.outputs, cfg, base, rnd))
            groups = discover_groups(model, kinds)
    return out


def worker(out: Path, cases: list[str]) -> None:
    assert init_from_env("gloo"), "expected torchrun with more than one process"
    rank, size = world()
    report: dict[str, dict[str, float | bool]] = {}
    for case in cases:
        build, scorers, variants, n_rounds = CASES[case]
        for scorer in scorers:
            for sequential in variants:
                dist_runs = _rounds(build, scorer, sequential, n_rounds, distributed=True)
                if rank == 0:  # the one-process reference
                    ref = _rounds(build, scorer, sequential, n_rounds, distributed=False)
                    for rnd, (a, b) in enumerate(zip(ref, dist_runs, strict=True)):
                        key = f"{case}/{scorer}/{'sequential' if sequential else 'whole'}/round{rnd + 1}"
                        report[key] = {**_compare(a, b), "world": size}
    if rank == 0:
        out.write_text(json.dumps(report, indent=1))
    torch.distributed.destroy_process_group()


# ---- tests ---------------------------------------------------------------------------------------------------
def _torchrun(tmp_path: Path, cases: list[str]) -> dict[str, dict[str, float | bool]]:
    if not TORCHRUN.exists() and shutil.which("torchrun") is None:
        pytest.skip("torchrun is not installed")
    exe = str(TORCHRUN) if TORCHRUN.exists() else "torchrun"
    out = tmp_path / "report.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SPECTRA_GPU_PROGRESS": "0", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([exe, "--standalone", "--nproc_per_node=2", __file__, str(out), *cases],
                          capture_output=True, text=True, env=env, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text())


def _check(report: dict[str, dict[str, float | bool]], expected: int) -> None:
    assert len(report) == expected, sorted(report)
    for key, r in report.items():
        assert r["world"] == 2
        assert r["same_selection"], key
        assert r["max_diff"] <= 1e-10, (key, r["max_diff"])


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    pytest.importorskip("transformers")
    # mlp: 3 scorers x whole x 2 rounds; llama: 2 scorers x 2 paths x 2 rounds; bert: 2 paths x 1 round
    _check(_torchrun(tmp_path, ["mlp", "llama", "bert"]), 6 + 8 + 2)


@pytest.mark.slow
def test_two_processes_equal_one_smollm2(tmp_path):
    pytest.importorskip("transformers")
    from spectra_gpu.builtin import zoo

    try:
        zoo.load_smollm2(fresh=False)
    except (ImportError, FileNotFoundError) as e:
        pytest.skip(f"SmolLM2 not installed: {e}")
    _check(_torchrun(tmp_path, ["smollm2"]), 4)


def test_share_is_disjoint_and_starts_with_the_shift_batch():
    calib = list(range(7))
    assert share(calib, 0, 3) == [0, 3, 6]
    assert share(calib, 1, 3) == [0, 1, 4]
    assert share(calib, 2, 3) == [0, 2, 5]


def _stats(batches, mode="exact"):
    s = SignalStats(6, mode=mode, precision="fp64")
    for z in batches:
        s.update(z, torch.relu(z))
    return s


def test_subtract_and_reshift_are_exact_in_fp64():
    g = torch.Generator().manual_seed(0)
    bs = [torch.randn(6, 9, generator=g, dtype=torch.float64) * 3 + 5 for _ in range(3)]
    whole = _stats(bs)
    part = _stats(bs[:1])
    rest = _stats(bs)
    subtract(rest, part)  # = batches 1, 2 around batch 0's shift
    only = _stats(bs[1:])  # batches 1, 2 around batch 1's shift
    reshift(only, (rest.pre.shift, rest.post.shift))
    for a, b in ((rest, only),):
        assert a.m == b.m == 18
        for sa, sb in ((a.pre, b.pre), (a.post, b.post)):
            assert torch.allclose(sa.s1, sb.s1, atol=1e-9) and torch.allclose(sa.s2, sb.s2, atol=1e-8)
            assert torch.allclose(sa.gram, sb.gram, atol=1e-8)
    alive = torch.ones(6, dtype=torch.bool)
    # rest + part == whole: the exact Gram of the z-scored signals agrees
    for side in ("pre", "post"):
        full = SignalStats(6, precision="fp64")
        for z in bs[1:]:
            full.update(z, torch.relu(z))
        assert torch.allclose(rest.gram(side, "zscore", alive), full.gram(side, "zscore", alive), atol=1e-9)
    assert whole.m == 27


def test_one_process_is_the_plain_step():
    model, calib, kinds = _mlp_case()
    cfg = PruneConfig(scorer="spectral", kinds=kinds)
    groups = discover_groups(model, kinds)
    a = capture_and_score(model, groups, calib, cfg)
    b = capture_and_score_distributed(model, groups, calib, cfg)
    assert _compare(a, b) == {"max_diff": 0.0, "same_selection": True}


def test_sketch_is_refused_in_reduce():
    s = SignalStats(5, mode="sketch", sketch_dim=4)
    s.update(torch.randn(5, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="sketch statistics cannot be re-expressed"):
        reshift(s, (s.pre.shift + 1, s.post.shift))


if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2:])
