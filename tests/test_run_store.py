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
    assert run_store.PHASES == ("prune", "compensate", "finetune", "done")


# ---- resume semantics, leaving nothing behind, the resume notice --------------------------------------------
def _tiny_state(**kw):
    return RunState(config={"target": 0.3, "finetune": {"epochs": 2}}, widths_before={"0": 6},
                    kinds_by_group={"0": "neuron"}, min_keep={"0": 1}, params_before=44, params_prunable_before=44,
                    **kw)


def _tiny_round(epr):
    from spectra_gpu.rounds import RoundRecord

    return RoundRecord(round=1, params=40, epr=epr, removed={"0": 1}, removed_units={"0": [2]}, widths={"0": 5},
                       seconds_capture=0.0, seconds_scoring=0.0, lambda_1={}, dead_units={})


def test_resume_where_there_is_no_run_is_refused_and_creates_nothing(tmp_path):
    missing = tmp_path / "a" / "b"
    with pytest.raises(ValueError, match=r"nothing to resume in .*b.*does not exist; run without --resume"):
        run_store.RunStore(missing, resume=True)
    assert not (tmp_path / "a").exists()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=rf"nothing to resume in .*empty.*no {CHECKPOINT} and no report.json; run "
                                         "without --resume to start a new run"):
        run_store.RunStore(tmp_path / "empty", resume=True)
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == ["notes.txt"]


def test_a_refused_directory_that_was_created_is_removed_again(tmp_path, monkeypatch):
    def no_write(self, data):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(run_store.Path, "write_bytes", no_write)
    with pytest.raises(OSError, match="cannot write to"):
        run_store.prepare_run_dir(tmp_path / "x" / "y", resume=False)
    assert not (tmp_path / "x").exists()


def test_score_runs_are_refused_without_suggesting_resume(tmp_path):
    (tmp_path / "report.json").write_text("{}")
    with pytest.raises(ValueError, match="already holds a run; pass resume=True"):
        run_store.prepare_run_dir(tmp_path, resume=False)
    with pytest.raises(ValueError, match="already holds a run; choose another directory") as e:
        run_store.prepare_run_dir(tmp_path, resume=False, resumable=False)
    assert "resume" not in str(e.value)


def test_discard_removes_what_a_new_run_created_and_nothing_else(tmp_path):
    model = torch.nn.Linear(3, 2)
    store = run_store.RunStore(tmp_path / "new" / "run")
    assert store.created == tmp_path / "new"
    store.save_checkpoint(_tiny_state(), model)
    (store.out / ".checkpoint.safetensors.abc.tmp").write_bytes(b"half")
    store.discard()
    assert not (tmp_path / "new").exists()  # the directory and the parent it created
    # a directory the user made: emptied of the run's files, kept
    (tmp_path / "mine").mkdir()
    store = run_store.RunStore(tmp_path / "mine")
    assert store.created is None
    store.save_checkpoint(_tiny_state(), model)
    store.discard()
    assert (tmp_path / "mine").is_dir() and not list((tmp_path / "mine").iterdir())
    # someone else's file in a directory the store created: the file and the directory stay
    store = run_store.RunStore(tmp_path / "shared")
    store.save_checkpoint(_tiny_state(), model)
    (store.out / "theirs.txt").write_text("x")
    store.discard()
    assert sorted(p.name for p in (tmp_path / "shared").iterdir()) == ["theirs.txt"]


def test_discard_never_touches_a_resumed_run(tmp_path):
    model = torch.nn.Linear(3, 2)
    run_store.RunStore(tmp_path).save_checkpoint(_tiny_state(), model)
    store = run_store.RunStore(tmp_path, resume=True)
    store.discard()
    assert store.load_checkpoint() is not None


def test_resume_removes_the_temp_files_a_killed_process_left(tmp_path):
    model = torch.nn.Linear(3, 2)
    run_store.RunStore(tmp_path).save_checkpoint(_tiny_state(), model)
    (tmp_path / ".checkpoint.safetensors.x1y2.tmp").write_bytes(b"half")
    (tmp_path / ".report.json.q.tmp").write_bytes(b"{")
    (tmp_path / ".model.k1ll3d").mkdir()
    (tmp_path / ".model.k1ll3d" / "model.safetensors").write_bytes(b"half")
    (tmp_path / "notes.tmp").write_text("the user's")
    run_store.RunStore(tmp_path, resume=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT, "notes.tmp"]


def test_resume_note_says_what_the_resume_continues_from(tmp_path):
    model = torch.nn.Linear(3, 2)
    run_store.RunStore(tmp_path).save_checkpoint(_tiny_state(), model)
    store = run_store.RunStore(tmp_path, resume=True)
    assert store.resume_note(_tiny_state()) == f"resuming {tmp_path}: 0 pruning rounds done; starting the first round"
    st = _tiny_state(rounds=[_tiny_round(0.0909)])
    assert store.resume_note(st) == (f"resuming {tmp_path}: 1 pruning round done (EPR 0.0909, target 0.3); "
                                     "continuing with round 2")
    st.phase = "compensate"
    assert store.resume_note(st).endswith("; continuing with the compensation")
    st.phase = "finetune"
    assert store.resume_note(st).endswith("; starting the fine-tune")
    st.finetune_state = {"epoch": 1}
    assert store.resume_note(st).endswith("; fine-tune epoch 1/2 done, continuing with epoch 2")
    st.phase = "done"
    assert store.resume_note(st).endswith("; the run finished; writing the outputs that are missing")
