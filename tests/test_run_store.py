"""The run directory: checkpoints are safetensors + JSON (nothing unpickled on resume), written atomically,
removed after success unless kept; resume rebuilds the structure from the recorded removals (tied weights
included), a finished run returns its stored report, damaged or legacy checkpoints give one clear error."""

import copy
import json

import pytest
import torch
from safetensors import safe_open

from spectra_gpu import run_store
from spectra_gpu.driver import PruneConfig, prune
from spectra_gpu.finetune import FinetuneConfig
from spectra_gpu.run_store import CHECKPOINT, LEGACY_CHECKPOINT, RunState, _decode, _encode

pytestmark = pytest.mark.usefixtures("one_thread")  # exact comparisons of runs, on one thread


class Crash(RuntimeError):
    pass


def _crash_at(event, at):
    def cb(name, info):
        if name == event and info.get("round", info.get("epoch")) == at:
            raise Crash(name)
    return cb


def _no_unpickling(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("torch.load called during resume")
    monkeypatch.setattr(torch, "load", refuse)


def _mlp_run():
    from test_driver import mlp_setup

    model, kw, calib = mlp_setup()
    cfg = PruneConfig(target=0.3, kinds=("neuron",), round_fraction=0.1, finetune=FinetuneConfig(epochs=2))
    return model, kw, calib, cfg


def test_checkpoint_is_safetensors_with_json_state_and_removed_after_success(tmp_path, monkeypatch):
    model, kw, calib, cfg = _mlp_run()
    with pytest.raises(Crash):
        prune(copy.deepcopy(model), calib, cfg, out_dir=tmp_path, callback=_crash_at("finetune_epoch", 1), **kw)
    ck = tmp_path / CHECKPOINT
    with safe_open(str(ck), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    state = json.loads(meta["state"])
    assert state["phase"] == "finetune" and state["rounds"] and "finetune_state" not in state
    assert "model.0.weight" in keys and any(k.startswith("finetune.") for k in keys)  # Adam moments as tensors
    _no_unpickling(monkeypatch)
    res = prune(copy.deepcopy(model), calib, cfg, out_dir=tmp_path, resume=True, **kw)
    assert not ck.exists() and (tmp_path / "report.json").exists()
    assert not list(tmp_path.glob(".*.tmp"))
    # resume of the finished run: the stored report, the same model (replayed removals + saved weights)
    again = prune(copy.deepcopy(model), calib, cfg, out_dir=tmp_path, resume=True, **kw)
    assert again.report == json.loads((tmp_path / "report.json").read_text())
    assert again.report["params_after"] == res.report["params_after"]
    for a, b in zip(again.model.state_dict().values(), res.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_keep_checkpoints_keeps_the_final_one(tmp_path, monkeypatch):
    model, kw, calib, cfg = _mlp_run()
    res = prune(copy.deepcopy(model), calib, cfg, out_dir=tmp_path, keep_checkpoints=True, **kw)
    ck = tmp_path / CHECKPOINT
    with safe_open(str(ck), framework="pt") as f:
        assert json.loads(f.metadata()["state"])["phase"] == "done"
    assert not (tmp_path / "model.pt").exists()  # no whole-module pickle in a run directory
    import shutil

    shutil.rmtree(tmp_path / "model")
    for f in ("report.md", "widths.png"):  # as if killed while writing the outputs
        (tmp_path / f).unlink()
    _no_unpickling(monkeypatch)
    again = prune(copy.deepcopy(model), calib, cfg, out_dir=tmp_path, resume=True, keep_checkpoints=True, **kw)
    assert all((tmp_path / f).stat().st_size > 0 for f in ("model/model.safetensors", "report.md", "widths.png"))
    assert ck.exists() and json.dumps(again.report, default=str) == json.dumps(res.report, default=str)
    for a, b in zip(again.model.state_dict().values(), res.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_resume_of_a_tied_llama_gives_the_same_report(tmp_path, monkeypatch):
    from test_driver import _strip, _text_batches
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=60, hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=32,
                                         tie_word_embeddings=True)).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    calib = _text_batches()
    cfg = PruneConfig(target=0.2, kinds=("ffn", "head"), round_fraction=0.1, finetune=FinetuneConfig(epochs=0))
    ref = prune(copy.deepcopy(model), calib, cfg, out_dir=tmp_path / "ref")
    with pytest.raises(Crash):
        prune(copy.deepcopy(model), calib, cfg, out_dir=tmp_path / "run", callback=_crash_at("round_end", 2))
    _no_unpickling(monkeypatch)
    res = prune(copy.deepcopy(model), calib, cfg, out_dir=tmp_path / "run", resume=True)
    assert _strip(res.report) == _strip(ref.report)
    assert res.model.lm_head.weight is res.model.model.embed_tokens.weight  # still tied
    for a, b in zip(res.model.state_dict().values(), ref.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_damaged_legacy_and_mismatched_resumes_fail_with_one_clear_error(tmp_path):
    model, kw, calib, cfg = _mlp_run()
    with pytest.raises(Crash):
        prune(copy.deepcopy(model), calib, cfg, out_dir=tmp_path / "a", callback=_crash_at("round_end", 1), **kw)
    ck = tmp_path / "a" / CHECKPOINT
    with pytest.raises(ValueError, match="expected the model as constructed before pruning"):
        bad = copy.deepcopy(model)
        bad[0] = torch.nn.Linear(16, 30)
        bad[2] = torch.nn.Linear(30, 40)
        prune(bad, calib, cfg, out_dir=tmp_path / "a", resume=True, **kw)
    ck.write_bytes(ck.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"checkpoint .* is damaged.*rerun without --resume"):
        prune(copy.deepcopy(model), calib, cfg, out_dir=tmp_path / "a", resume=True, **kw)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / LEGACY_CHECKPOINT).write_bytes(b"\x80\x04pickle")
    for resume in (False, True):
        with pytest.raises(ValueError, match="pickled checkpoint .* never loaded"):
            prune(copy.deepcopy(model), calib, cfg, out_dir=tmp_path / "b", resume=resume, **kw)


def test_finished_run_without_saved_weights_is_refused_rather_than_guessed(tmp_path):
    model, kw, calib, cfg = _mlp_run()
    prune(copy.deepcopy(model), calib, cfg, out_dir=tmp_path, save_model=False, **kw)
    with pytest.raises(ValueError, match="final weights were not saved"):
        prune(copy.deepcopy(model), calib, cfg, out_dir=tmp_path, resume=True, save_model=False, **kw)


def test_tensor_tree_codec_round_trips_an_optimiser_state():
    p = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.Adam([p], lr=0.1, betas=(0.8, 0.9))
    p.grad = torch.ones_like(p)
    opt.step()
    sd = {"epoch": 1, "optimizer": opt.state_dict(), "history": [{"loss": float("inf")}]}
    tensors = {}
    enc = _encode(sd, "t.", tensors)
    back = _decode(json.loads(json.dumps(enc)), tensors)
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.8, 0.9)
    assert set(back["optimizer"]["state"]) == {0}
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], sd["optimizer"]["state"][0]["exp_avg"])
    assert back["history"][0]["loss"] == float("inf")
    with pytest.raises(TypeError, match="cannot store"):
        _encode({"f": object()}, "t.", {})


def test_run_state_rejects_unknown_fields():
    with pytest.raises(ValueError, match="run-state fields"):
        RunState.from_json({"config": {}}, None)
    assert run_store.PHASES == ("prune", "finetune", "done")
