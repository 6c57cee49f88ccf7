"""LoRA recovery (``FinetuneConfig.lora_rank`` / ``--lora-rank``, through peft): only the adapters of the blocks'
nn.Linear layers train, they are merged back so the saved model is a plain Hugging Face model, distillation
works with them, a run killed during the LoRA fine-tune resumes to the uninterrupted report, and a missing
peft is one line.

On a tiny random-weight LlamaForCausalLM (hidden 64, 2 layers, 4 heads, 2 KV heads, vocabulary 128) and
synthetic token batches. Run as a script (``python tests/test_lora.py OUT [--resume]``) it is the child process
of the kill test: one LoRA pruning run into OUT.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import spectra_gpu as sg
from spectra_gpu import cli, faults
from spectra_gpu.builtin.tasks import MLP
from spectra_gpu.finetune import LORA_INSTALL, FinetuneConfig, kd_loss, lora_targets
from spectra_gpu.run_store import CHECKPOINT

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 128
# 2 epochs of 2 batches: the kill at the 3rd optimiser step falls inside epoch 2, after epoch 1's checkpoint
LORA = FinetuneConfig(optimizer="adamw", lr=1e-2, epochs=2, lora_rank=4)


def tiny_llama() -> torch.nn.Module:
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                                   num_hidden_layers=2, vocab_size=VOCAB, max_position_embeddings=64,
                                   initializer_range=0.1)  # 0.02 gives near-uniform logits: nothing to distil
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def batches(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """n batches of 2 x 16 random tokens, the last row padded after 12 tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (2, 16), generator=g)
        mask = torch.ones_like(ids)
        mask[-1, 12:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss


def held_out_loss(model: torch.nn.Module) -> float:
    return float(sum(lm_loss(model, b) for b in batches(2, seed=9)) / 2)


def run(ft: FinetuneConfig = LORA, *, loss_fn: Any = lm_loss, evaluate: Any = held_out_loss,
        **kw: Any) -> sg.PruneResult:
    """A random-scorer pruning run to 20 % EPR, then the fine-tune ``ft`` on 2 batches per epoch."""
    cfg = sg.PruneConfig(target=0.2, scorer="random", round_fraction=0.2, finetune=ft)
    kw.setdefault("train_batches", lambda ep: batches(2, seed=20 + ep))
    return sg.prune(tiny_llama(), batches(2, seed=0), cfg, loss_fn=loss_fn, evaluate=evaluate, metric_name="loss",
                    **kw)


def test_lora_targets_are_the_blocks_linear_layers():
    model = tiny_llama()
    names = lora_targets(model)
    assert len(names) == 2 * 7 and all(n.startswith("model.layers.") for n in names)  # q k v o gate up down
    assert "lm_head" not in names
    assert lora_targets(MLP(8, (6, 5), 3)) == ["layers.0", "layers.1"]  # not the classifier head
    plain = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    assert lora_targets(plain) == ["0"]  # no blocks: all but the last (the head)
    assert lora_targets(torch.nn.Sequential(torch.nn.Linear(4, 2))) == ["0"]  # nothing else: the only one


def test_only_the_adapters_train_and_they_merge_into_a_plain_saved_model(tmp_path):
    seen: dict[str, Any] = {}

    def recording_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "trainable" not in seen and model.training:  # the first fine-tune step
            seen["trainable"] = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
            seen["adapters"] = {n: p.numel() for n, p in model.named_parameters() if ".lora_" in n}
        return lm_loss(model, batch)

    out = tmp_path / "run"
    res = run(FinetuneConfig(optimizer="adamw", lr=1e-2, epochs=1, steps=2, lora_rank=4), loss_fn=recording_loss,
              out_dir=out)
    plain = run(FinetuneConfig(epochs=0))  # the same rounds and compensation, no fine-tune
    rep = res.report
    assert [r["removed_units"] for r in rep["rounds"]] == [r["removed_units"] for r in plain.report["rounds"]]
    # trainable parameters == adapter parameters: A and B of every target module, nothing else
    assert seen["trainable"] == seen["adapters"] and seen["adapters"]
    targets = lora_targets(res.model)
    assert {n.split(".lora_")[0] for n in seen["adapters"]} == set(targets)
    lora = rep["finetune_lora"]
    assert lora["trainable_params"] == sum(seen["adapters"].values())
    assert (lora["rank"], lora["alpha"], lora["modules"]) == (4, 8.0, len(targets))
    assert rep["config"]["finetune"]["lora_rank"] == 4 and rep["finetune_history"][-1]["steps"] == 2
    assert "LoRA: rank 4" in (out / "report.md").read_text()
    # the returned model is plain: same class, same tensors by name and shape; the 2 steps moved exactly the
    # adapted weights
    got, base = res.model.state_dict(), plain.model.state_dict()
    assert type(res.model) is type(plain.model)
    assert {k: tuple(v.shape) for k, v in got.items()} == {k: tuple(v.shape) for k, v in base.items()}
    adapted = {f"{n}.weight" for n in targets}
    for k in got:
        assert torch.equal(got[k], base[k]) is (k not in adapted), k
    # saved: no adapter tensors; plain transformers loads it with the same logits
    saved = load_file(out / "model" / "model.safetensors")
    assert not [k for k in saved if "lora" in k or "base_layer" in k]
    back = transformers.AutoModelForCausalLM.from_pretrained(out / "model").eval()
    assert type(back) is type(res.model)
    with torch.no_grad():
        for b in batches(2, seed=5):
            assert torch.equal(back(**b).logits, res.model(**b).logits)


def test_lora_with_distillation_moves_the_student_toward_the_dense_model():
    dense = tiny_llama()
    train = batches(2, seed=20)  # the same batches every epoch, and the KL measured on them

    def kl_to_dense(model: torch.nn.Module) -> float:
        with torch.no_grad():
            return float(sum(kd_loss(model(**b).logits, dense(**b).logits) for b in train))

    ft = FinetuneConfig(optimizer="adamw", lr=1e-2, epochs=3, loss="kd", temperature=2.0, lora_rank=4,
                        lora_alpha=4.0)
    rep = run(ft, evaluate=kl_to_dense, train_batches=lambda ep: train).report
    hist = rep["finetune_history"]
    assert len(hist) == 3 and all("kd" in h and "task" in h for h in hist)
    assert hist[-1]["kd"] < hist[0]["kd"]
    assert rep["finetune_lora"]["alpha"] == 4.0
    before = rep["metric_after_compensation"] if rep["compensation"] else rep["metric_after_prune"]
    assert rep["metric_after_finetune"] < 0.8 * before


def test_the_cli_flags_map_to_the_config_and_the_saved_model_is_plain(tmp_path, one_thread):
    out = tmp_path / "cli"
    code = cli.main(["prune", "--model", "digits-mlp", "--target", "0.3", "--epochs", "1", "--steps", "3",
                     "--lora-rank", "4", "--lora-alpha", "4", "--out", str(out), "--quiet"])
    assert code == 0
    rep = json.loads((out / "report.json").read_text())
    assert {k: rep["config"]["finetune"][k] for k in ("lora_rank", "lora_alpha", "steps")} == \
        {"lora_rank": 4, "lora_alpha": 4.0, "steps": 3}
    widths = rep["widths_after"]  # the MLP's two hidden layers are adapted, not its head (64 inputs, 10 classes)
    assert rep["finetune_lora"]["modules"] == 2
    assert rep["finetune_lora"]["trainable_params"] == 4 * ((64 + widths["layers.0"]) + sum(widths.values()))
    assert not [k for k in load_file(out / "model" / "model.safetensors") if "lora" in k or "base_layer" in k]


# ---- resume after a kill during the LoRA fine-tune --------------------------------------------------------
def _child(out: Path, *more: str, **env: str) -> subprocess.CompletedProcess[str]:
    e = {k: v for k, v in os.environ.items() if k != faults.ENV}
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **env)
    return subprocess.run([sys.executable, __file__, str(out), *more], cwd=ROOT, env=e, capture_output=True,
                          text=True, timeout=300)


def test_a_run_killed_during_the_lora_finetune_resumes_to_the_uninterrupted_report(tmp_path, one_thread):
    from test_faults import comparable

    ref, out = tmp_path / "ref", tmp_path / "run"
    run(out_dir=ref)  # uninterrupted, in this process (on one thread, as the children)
    killed = _child(out, **{faults.ENV: "finetune:3"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    # the checkpoint of epoch 1: the model under its plain names, the adapters in the fine-tune state
    with safe_open(str(out / CHECKPOINT), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert not [k for k in keys if k.startswith("model.") and ("lora_" in k or "base_layer" in k)]
    ft = json.loads(meta["finetune"])
    assert ft["epoch"] == 1 and ft["adapters"] and all(".lora_" in k for k in ft["adapters"])
    resumed = _child(out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    got, want = json.loads((out / "report.json").read_text()), json.loads((ref / "report.json").read_text())
    assert got["environment"]["resumed"] is True
    assert comparable(got) == comparable(want)
    a, b = load_file(out / "model" / "model.safetensors"), load_file(ref / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)


# ---- peft missing ---------------------------------------------------------------------------------------
def test_without_peft_the_cli_says_so_in_one_line_and_the_api_raises_importerror(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now fails as if it were not installed
    code = cli.main(["prune", "--model", "digits-mlp", "--out", str(tmp_path / "out"), "--lora-rank", "4", "--quiet"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2
    assert err == [f"spectra prune: error: --lora-rank needs peft: {LORA_INSTALL}"]
    assert not (tmp_path / "out").exists()
    events: list[str] = []
    with pytest.raises(ImportError, match=r"needs peft.*pip install 'spectra_gpu\[lora\]'"):
        run(callback=lambda event, info: events.append(event))
    assert events == []  # refused before the first round
    full = run(FinetuneConfig(epochs=1, steps=1), out_dir=tmp_path / "full")  # no LoRA: no peft needed
    assert full.report["finetune_lora"] is None and full.report["finetune_history"][-1]["steps"] == 1


if __name__ == "__main__":  # the child process of the kill test: one LoRA run into argv[1]
    torch.set_num_threads(1)
    run(out_dir=sys.argv[1], resume="--resume" in sys.argv[2:])
