"""The driver's large-model and LLM-quality wiring: layer-sequential capture chosen by default for Hugging Face
transformer models (same decisions as the whole-model capture), compensation after the last round, distillation
recovery from the dense copy, and the same runs under ``torchrun`` (rank-0-only writes)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spectra_gpu.config import PruneConfig
from spectra_gpu.driver import capture_step_for, discover, prune, score_model
from spectra_gpu.finetune import FinetuneConfig

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"


def tiny_llama() -> torch.nn.Module:
    from test_sequential import tiny_llama as build

    return build(layers=2)


def batches(n: int = 3, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    from test_sequential import token_batches

    return token_batches(101, n=n, seed=seed)


def lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss


def held_out_loss(model: torch.nn.Module) -> float:
    return float(sum(lm_loss(model, b) for b in batches(2, seed=9)) / 2)


def run(cfg: PruneConfig, **kw):
    return prune(tiny_llama(), batches(), cfg, loss_fn=lm_loss, evaluate=held_out_loss, metric_name="loss",
                 train_batches=lambda ep: batches(2, seed=20 + ep), **kw).report


def test_hf_models_capture_layer_sequentially_by_default_with_the_same_decisions():
    model = tiny_llama()
    cfg = PruneConfig(target=0.1, scorer="spectral", scorer_options={"k": 3})
    groups = discover(model, cfg)
    assert capture_step_for(model, groups, cfg)[1] is True
    assert capture_step_for(model, groups, PruneConfig(scorer="taylor"))[1] is False  # gradients: whole model
    plain = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    assert capture_step_for(plain, discover(plain, cfg), cfg)[1] is False
    ft0 = FinetuneConfig(epochs=0)
    for scorer in ("spectral", "wanda_sp"):
        base = dict(target=0.15, scorer=scorer, round_fraction=0.1, scorer_options={"k": 3} if scorer == "spectral"
                    else {}, finetune=ft0, compensate=False)
        seq = run(PruneConfig(**base))
        whole = run(PruneConfig(**base, sequential=False))
        assert seq["sequential"] is True and whole["sequential"] is False
        assert len(seq["rounds"]) >= 2
        assert [r["removed_units"] for r in seq["rounds"]] == [r["removed_units"] for r in whole["rounds"]]
        assert seq["metric_after_prune"] == pytest.approx(whole["metric_after_prune"], abs=1e-6)


def test_sequential_refuses_gradient_scorers_and_bad_stores():
    with pytest.raises(ValueError, match="cannot be captured one block at a time"):
        PruneConfig(scorer="taylor", sequential=True)
    with pytest.raises(ValueError, match="hidden_store: expected one of"):
        PruneConfig(hidden_store="gpu")
    with pytest.raises(TypeError, match="compensate: expected True, False or None"):
        PruneConfig(compensate="yes")  # type: ignore[arg-type]


def test_score_model_sequential_equals_whole_model():
    m = tiny_llama()
    seq, info = score_model(m, batches(), scorer="spectral", options={"k": 3})
    whole, info_w = score_model(m, batches(), scorer="spectral", options={"k": 3}, sequential=False)
    assert info["sequential"] is True and info_w["sequential"] is False and info["ranks"] == 1
    assert list(seq) == list(whole)
    for g in seq:
        fin = torch.isfinite(whole[g].scores)
        assert torch.equal(fin, torch.isfinite(seq[g].scores))
        assert torch.allclose(seq[g].scores[fin], whole[g].scores[fin], atol=1e-8, rtol=0)


def _logit_error(model: torch.nn.Module, dense: torch.nn.Module) -> float:
    with torch.no_grad():
        return float(sum(((model(**b).logits - dense(**b).logits) ** 2).sum() for b in batches()))


def test_compensation_runs_after_the_last_round_and_lowers_the_output_error(tmp_path):
    cfg = dict(target=0.2, scorer="random", round_fraction=0.2, finetune=FinetuneConfig(epochs=0))
    kw = dict(loss_fn=lm_loss, evaluate=held_out_loss, metric_name="loss")
    on = prune(tiny_llama(), batches(), PruneConfig(**cfg), out_dir=tmp_path / "on", **kw)  # default: on for HF
    off = prune(tiny_llama(), batches(), PruneConfig(**cfg, compensate=False), **kw)
    r_on, r_off = on.report, off.report
    assert [r["removed_units"] for r in r_on["rounds"]] == [r["removed_units"] for r in r_off["rounds"]]
    assert r_on["metric_after_prune"] == r_off["metric_after_prune"]  # the rounds update no parameter
    assert r_off["compensation"] == {} and r_off["metric_after_compensation"] is None
    assert set(r_on["compensation"]) == {g for r in r_on["rounds"] for g, us in r["removed_units"].items() if us}
    for g, rec in r_on["compensation"].items():
        assert rec["error_refit"] < rec["error_removed"], g
    dense = tiny_llama()
    assert _logit_error(on.model, dense) < 0.9 * _logit_error(off.model, dense)
    saved = json.loads((tmp_path / "on" / "report.json").read_text())
    assert saved["metric_after_compensation"] == r_on["metric_after_compensation"]


def test_compensation_order_follows_the_capture(tmp_path):
    """A layer-sequential run compensates block by block (``sequential.compensate_blocks`` on the pruned
    model's hidden states), a whole-model run in one pass (``compensate.compensation`` on the dense model):
    the driver's compensated weights equal those functions applied to the same removals."""
    from spectra_gpu.compensate import apply_refits, compensation, dense_removals
    from spectra_gpu.sequential import compensate_blocks

    cfg = dict(target=0.2, scorer="random", round_fraction=0.2, finetune=FinetuneConfig(epochs=0))
    kw = dict(loss_fn=lm_loss, evaluate=held_out_loss, metric_name="loss")
    for sequential in (True, False):
        got = prune(tiny_llama(), batches(), PruneConfig(**cfg, sequential=sequential), **kw)
        plain = prune(tiny_llama(), batches(), PruneConfig(**cfg, sequential=sequential, compensate=False), **kw)
        r = got.report
        assert r["sequential"] is sequential
        dense = tiny_llama()
        removed = dense_removals(r["widths_before"], [x["removed_units"] for x in r["rounds"]])
        dgroups = [g for g in discover(dense, PruneConfig(**cfg)) if g.name in removed]
        groups = discover(plain.model, PruneConfig(**cfg))
        if sequential:
            compensate_blocks(plain.model, dense, groups, dgroups, removed, batches())
        else:
            apply_refits(groups, compensation(dense, dgroups, removed, batches()), removed)
        for (k, a), b in zip(got.model.state_dict().items(), plain.model.state_dict().values(), strict=True):
            assert torch.equal(a, b), (sequential, k)


def test_distillation_recovery_uses_the_dense_model_and_resumes(tmp_path):
    dense = tiny_llama()

    def kl_to_dense(model: torch.nn.Module) -> float:
        from spectra_gpu.finetune import kd_loss

        with torch.no_grad():
            return float(sum(kd_loss(model(**b).logits, dense(**b).logits) for b in batches()))

    ft = FinetuneConfig(optimizer="adamw", lr=1e-3, epochs=2, loss="kd", temperature=2.0, kd_alpha=1.0)
    cfg = PruneConfig(target=0.4, scorer="random", round_fraction=0.2, finetune=ft, compensate=False)

    def go(**kw):
        return prune(tiny_llama(), batches(), cfg, loss_fn=lm_loss, evaluate=kl_to_dense, metric_name="kl",
                     train_batches=lambda ep: batches(3, seed=20 + ep), **kw).report

    rep = go()
    hist = rep["finetune_history"]
    assert len(hist) == 2 and all("kd" in h and "task" in h for h in hist)
    assert rep["metric_after_finetune"] < 0.8 * rep["metric_after_prune"]  # the student moved toward the teacher
    # stopped after the first epoch (its checkpoint written), resumed: the same history and result
    out = tmp_path / "kd"

    class Stop(Exception):
        pass

    def stop_after_first_epoch(event: str, info: dict) -> None:
        if event == "finetune_epoch" and info["epoch"] == 1:
            raise Stop

    with pytest.raises(Stop):
        go(out_dir=out, keep_checkpoints=True, callback=stop_after_first_epoch)
    resumed = go(out_dir=out, resume=True)
    assert resumed["environment"]["resumed"] is True
    for a, b in zip(resumed["finetune_history"], hist, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    assert resumed["metric_after_finetune"] == pytest.approx(rep["metric_after_finetune"], rel=1e-6)


# ---- torchrun ------------------------------------------------------------------------------------------------
def _torchrun_or_skip() -> str:
    if TORCHRUN.exists():
        return str(TORCHRUN)
    exe = shutil.which("torchrun")
    if exe is None:
        pytest.skip("torchrun is not installed")
    return exe


def _cli(args: list[str], *, ranks: int = 1) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SPECTRA_GPU_PROGRESS": "0", "PYTHONPATH": str(ROOT)}
    pre = ([_torchrun_or_skip(), "--standalone", f"--nproc_per_node={ranks}", "-m", "spectra_gpu"] if ranks > 1
           else [sys.executable, "-m", "spectra_gpu"])
    done = subprocess.run([*pre, *args], capture_output=True, text=True, env=env, timeout=1800, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.mark.slow
def test_two_round_prune_under_torchrun_equals_one_process(tmp_path):
    args = ["prune", "--model", "digits-mlp", "--target", "0.1", "--round-fraction", "0.05", "--epochs", "0",
            "--quiet"]
    _cli([*args, "--out", str(tmp_path / "one")])
    _cli([*args, "--out", str(tmp_path / "two")], ranks=2)
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert two["environment"]["ranks"] == 2 and one["environment"]["ranks"] == 1
    assert len(one["rounds"]) >= 2
    assert [r["removed_units"] for r in two["rounds"]] == [r["removed_units"] for r in one["rounds"]]
    assert two["params_after"] == one["params_after"]
    assert two["metric_after_prune"] == pytest.approx(one["metric_after_prune"], abs=1e-12)
    for g, d in one["score_distributions"].items():
        assert two["score_distributions"][g]["quantiles"] == pytest.approx(d["quantiles"], abs=1e-10), g
        assert two["score_distributions"][g]["hist"]["counts"] == d["hist"]["counts"], g


@pytest.mark.slow
def test_sequential_score_under_torchrun_writes_the_same_files(tmp_path):
    """The issue's bar, on SmolLM2's attention heads (every group and the FFNs: same code, 10x the time; run by
    hand, see README's "Large models")."""
    from spectra_gpu.builtin import zoo

    try:
        zoo.load_smollm2(fresh=False)
    except (ImportError, FileNotFoundError) as e:
        pytest.skip(f"SmolLM2 not installed: {e}")
    args = ["score", "--model", "smollm2-text", "--sequential", "--kinds", "head", "--quiet"]
    _cli([*args, "--out", str(tmp_path / "A")])
    _cli([*args, "--out", str(tmp_path / "B")], ranks=2)
    names = sorted(p.name for p in (tmp_path / "A" / "scores").iterdir())
    assert len(names) == 30 and names == sorted(p.name for p in (tmp_path / "B" / "scores").iterdir())
    for n in names:
        a = torch.load(tmp_path / "A" / "scores" / n, weights_only=True)
        b = torch.load(tmp_path / "B" / "scores" / n, weights_only=True)
        fin = torch.isfinite(a["scores"])
        assert torch.equal(fin, torch.isfinite(b["scores"]))
        assert torch.allclose(a["scores"][fin], b["scores"][fin], atol=1e-8, rtol=0), n
        assert torch.equal(a["neighbors"], b["neighbors"]) if a["neighbors"] is not None else b["neighbors"] is None
    rep = json.loads((tmp_path / "B" / "report.json").read_text())
    assert rep["sequential"] is True and rep["ranks"] == 2


# ---- arguments checked before work -----------------------------------------------------------------------------
def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 24), torch.nn.ReLU(), torch.nn.Linear(24, 3))


def _xs(n: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(32, 6, generator=g) for _ in range(n)]


def test_a_tensor_as_calibration_is_refused_and_inplace_false_prunes_a_copy():
    cfg = PruneConfig(target=0.2, scorer="l1", finetune=FinetuneConfig(epochs=0))
    with pytest.raises(TypeError, match="calib: expected a sequence of batches.*got a Tensor"):
        prune(_mlp(), torch.randn(64, 6), cfg)
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = prune(model, _xs(), cfg, inplace=False)
    assert res.model is not model and res.report["params_after"] < res.report["params_before"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    res = prune(model, _xs(), cfg)  # the default: in place
    assert res.model is model and model[0].out_features < 24


def test_a_skipped_fine_tune_warns_and_repairs_are_counted_once():
    with pytest.warns(UserWarning, match="no train_batches: the recovery fine-tune .* is skipped"):
        prune(_mlp(), _xs(), PruneConfig(target=0.2, scorer="l1"))
    # duplicated units make disconnected kNN graphs: the MST repair fires in every round, one summary warning
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(6, 24), torch.nn.ReLU(), torch.nn.Linear(24, 3))
    with torch.no_grad():
        m[0].weight[12:] = m[0].weight[:12]
        m[0].bias[12:] = m[0].bias[:12]
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rep = prune(m, _xs(), PruneConfig(target=0.3, scorer="spectral", scorer_options={"k": 3},
                                          finetune=FinetuneConfig(epochs=0))).report
    from spectra_gpu.errors import NumericalWarning

    numerical = [w for w in caught if issubclass(w.category, NumericalWarning)]
    assert rep["numerical_repairs"] and sum(rep["numerical_repairs"].values()) >= 1
    assert len(numerical) == 1 and "numerical repairs during the run" in str(numerical[0].message)
