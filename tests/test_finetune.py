"""The recovery fine-tune (spectra_gpu.finetune): loss="ce" is the plain training loop it always was (same
weights and history as a reference loop written out here; its configuration record unchanged); loss="kd"
lowers the KL to the dense teacher on a tiny pruned Llama, more than cross-entropy training does, mixes the task
loss by kd_alpha, resumes to the same weights, and refuses a missing teacher."""

from __future__ import annotations

import copy
import math

import _arch_models as am
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spectra_gpu import discover_groups
from spectra_gpu.finetune import FinetuneConfig, finetune, kd_loss, teacher_logits
from spectra_gpu.surgery import remove_units


def _lm_loss(model, batch):
    logits = model(**batch).logits
    ids, mask = batch["input_ids"], batch["attention_mask"]
    tgt = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), tgt.flatten(), ignore_index=-100)


def _batches(n: int, seed: int):
    return [am.token_batch(b=4, t=12, seed=seed * 1000 + i) for i in range(n)]


def _student(teacher):
    s = copy.deepcopy(teacher)
    for g in discover_groups(s, "ffn"):
        remove_units(s, g, list(range(0, g.size, 2)))  # half of every FFN layer
    return s


def _kl(student, teacher, batches) -> float:
    with torch.no_grad():
        vals = [float(kd_loss(student(**b).logits, teacher_logits(teacher, b, _lm_loss), 1.0,
                          b["attention_mask"].bool())) for b in batches]
    return sum(vals) / len(vals)


def test_ce_is_the_plain_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Dropout(0.2), nn.ReLU(), nn.Linear(16, 3))
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 5, generator=g), torch.randint(3, (8,), generator=g)) for _ in range(6)]

    def loss_fn(m, b):
        return F.cross_entropy(m(b[0]), b[1])

    cfg = FinetuneConfig(lr=1e-2, epochs=2, grad_clip=0.5)
    hist = finetune(model, lambda ep: data[ep:] + data[:ep], loss_fn, cfg, seed=3)
    # the reference: Adam, cosine over all steps, clipping, dropout seeded per epoch
    opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    total = 12
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    losses = []
    for ep in range(2):
        torch.manual_seed(3 * 1_000_003 + ep)
        ref.train()
        tot = 0.0
        for b in data[ep:] + data[:ep]:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(ref, b)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(ref.parameters()), 0.5)
            opt.step()
            sched.step()
            tot += float(loss.detach())
        losses.append(tot / 6)
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q)
    assert [h["loss"] for h in hist] == pytest.approx(losses, rel=1e-12)
    assert set(hist[0]) == {"epoch", "steps", "loss", "seconds"}
    assert set(cfg.to_dict()) == {"optimizer", "lr", "epochs", "steps", "weight_decay", "momentum", "schedule",
                                  "grad_clip"}
    assert FinetuneConfig(**cfg.to_dict()) == cfg
    kd = FinetuneConfig(loss="kd", temperature=2.0)
    assert kd.to_dict()["loss"] == "kd" and kd.to_dict()["temperature"] == 2.0 and "kd_alpha" not in kd.to_dict()
    assert FinetuneConfig(**kd.to_dict()) == kd


def _teacher():
    """A tiny Llama whose outputs are far from uniform (initializer_range 0.2), so pruning it matters."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(5)
    cfg = LlamaConfig(hidden_size=48, num_attention_heads=6, num_key_value_heads=2, head_dim=8, intermediate_size=40,
                      num_hidden_layers=2, vocab_size=100, max_position_embeddings=64, tie_word_embeddings=True,
                      initializer_range=0.2)
    return LlamaForCausalLM(cfg).eval()


def test_kd_lowers_the_kl_to_the_teacher_more_than_ce():
    teacher = _teacher()
    train, held = _batches(6, 0), _batches(3, 1)
    base = _student(teacher)
    kl_train0, kl_held0 = _kl(base, teacher, train), _kl(base, teacher, held)
    cfg = dict(optimizer="adam", lr=1e-3, epochs=6, schedule="constant")
    kd_student, ce_student = copy.deepcopy(base), copy.deepcopy(base)
    hist = finetune(kd_student, lambda ep: train, _lm_loss, FinetuneConfig(loss="kd", **cfg), teacher=teacher)
    finetune(ce_student, lambda ep: train, _lm_loss, FinetuneConfig(**cfg))
    kd_train, kd_held = _kl(kd_student, teacher, train), _kl(kd_student, teacher, held)
    ce_train, ce_held = _kl(ce_student, teacher, train), _kl(ce_student, teacher, held)
    print(f"tiny Llama, half of every FFN removed, KL to the teacher: training batches {kl_train0:.4f} -> KD "
          f"{kd_train:.4f} / CE {ce_train:.4f}; held-out {kl_held0:.4f} -> KD {kd_held:.4f} / CE {ce_held:.4f}")
    assert kd_train < 0.5 * kl_train0 and kd_train < ce_train
    assert kd_held < kl_held0 and kd_held < ce_held
    assert hist[-1]["kd"] < hist[0]["kd"] and {"kd", "task"} <= set(hist[0])
    assert all(p.grad is None for p in teacher.parameters())  # the teacher is never trained


def test_kd_alpha_mixes_the_task_loss_and_cached_logits_work():
    teacher = am.llama()
    train = _batches(2, 2)
    student = _student(teacher)
    b = train[0]
    cache = {id(x): teacher_logits(teacher, x, _lm_loss) for x in train}
    t = cache[id(b)]
    s = student(**b).logits
    want = 0.25 * kd_loss(s, t, 2.0, b["attention_mask"].bool()) + 0.75 * _lm_loss(student, b)
    got = []
    cfg = FinetuneConfig(loss="kd", kd_alpha=0.25, temperature=2.0, epochs=1, steps=1, lr=1e-9)
    finetune(copy.deepcopy(student), lambda ep: [b], _lm_loss, cfg, teacher=lambda x: cache[id(x)],
             on_epoch_end=lambda st: got.append(st["history"][-1]["loss"]))
    assert got[0] == pytest.approx(float(want.detach()), rel=1e-5)


def test_kd_resumes_to_the_same_weights():
    teacher = am.llama()
    train = _batches(3, 3)
    cfg = FinetuneConfig(loss="kd", lr=1e-3, epochs=2, temperature=1.5)
    whole = _student(teacher)
    states = []

    def keep(st):
        states.append((copy.deepcopy(st), copy.deepcopy(whole.state_dict())))

    hist = finetune(whole, lambda ep: train[ep:] + train[:ep], _lm_loss, cfg, seed=1, teacher=teacher,
                    on_epoch_end=keep)
    resumed = _student(teacher)
    resumed.load_state_dict(states[0][1])  # the weights checkpointed after epoch 1, and the state handed out
    hist2 = finetune(resumed, lambda ep: train[ep:] + train[:ep], _lm_loss, cfg, seed=1, teacher=teacher,
                     state=states[0][0])
    for p, q in zip(whole.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
    assert [h["loss"] for h in hist2] == [h["loss"] for h in hist]


def test_kd_refuses_bad_input():
    teacher = am.llama()
    with pytest.raises(ValueError, match="teacher"):
        finetune(_student(teacher), lambda ep: _batches(1, 0), _lm_loss, FinetuneConfig(loss="kd"))
    m = _student(teacher)
    with pytest.raises(ValueError, match="separate copy"):
        finetune(m, lambda ep: _batches(1, 0), _lm_loss, FinetuneConfig(loss="kd"), teacher=m)
    for bad in ({"loss": "mse"}, {"temperature": 0.0}, {"kd_alpha": 1.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            FinetuneConfig(**bad)
    with pytest.raises(ValueError, match="shape"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 4))


def test_progress_totals_are_the_steps_each_epoch_runs(monkeypatch):
    import sys

    ft = sys.modules["spectra_gpu.finetune"]  # the package's `finetune` attribute is the function
    totals: list[int] = []

    def recording(it, desc="", total=None, **kw):
        totals.append(total)
        return it

    monkeypatch.setattr(ft, "progress", recording)
    model = nn.Linear(4, 2)
    data = [(torch.randn(3, 4), torch.randint(0, 2, (3,))) for _ in range(4)]

    def loss_fn(m, b):
        return F.cross_entropy(m(b[0]), b[1])

    hist = finetune(model, lambda e: data, loss_fn, FinetuneConfig(epochs=3, steps=6))
    assert totals == [4, 2] and hist[-1]["steps"] == 6


def test_batches_must_be_a_callable_of_the_epoch_and_are_refused_up_front():
    from spectra_gpu.finetune import check_batches_fn

    batches = _batches(2, 0)
    check_batches_fn(lambda epoch: batches)
    for bad, got in ((batches, "list"), (tuple(batches), "tuple"), (torch.zeros(3), "Tensor"), (None, "NoneType"),
                     (nn.Linear(2, 2), "Linear")):
        with pytest.raises(TypeError, match=rf"train_batches: expected a callable epoch -> that epoch's batches .*got "
                                            rf"a {got}") as e:
            check_batches_fn(bad)
        assert ("lambda epoch: train_batches" in str(e.value)) == (got in ("list", "tuple", "Tensor"))
    model = am.llama()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TypeError, match="batches: expected a callable .* got a list"):
        finetune(model, batches, _lm_loss, FinetuneConfig(epochs=1))
    with pytest.raises(TypeError, match="loss_fn: expected a callable"):
        finetune(model, lambda epoch: batches, "ce", FinetuneConfig(epochs=1))
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters(), strict=True))  # nothing trained


@pytest.mark.parametrize("field,value,exc,words", [
    ("optimizer", "rmsprop", ValueError, "expected one of adam, adamw, sgd, got 'rmsprop'"),
    ("schedule", "linear", ValueError, "expected one of cosine, constant, got 'linear'"),
    ("lr", 0, ValueError, "expected a number > 0, got 0"),
    ("lr", "fast", TypeError, "expected a number > 0, got str 'fast'"),
    ("lr", math.nan, ValueError, "expected a number > 0, got nan"),
    ("epochs", -1, ValueError, "expected an integer >= 0, got -1"),
    ("epochs", 2.0, TypeError, "expected an integer >= 0, got float 2.0"),
    ("steps", 0, ValueError, "expected None or an integer >= 1, got 0"),
    ("weight_decay", -0.1, ValueError, "expected a number >= 0, got -0.1"),
    ("weight_decay", "0", TypeError, "expected a number >= 0, got str '0'"),
    ("momentum", 1.0, ValueError, "expected a number in [0, 1), got 1.0"),
    ("grad_clip", 0, ValueError, "expected None or a number > 0, got 0"),
    ("temperature", True, TypeError, "expected a number > 0, got bool True"),
    ("kd_alpha", 1.5, ValueError, "expected a number in [0, 1], got 1.5"),
])
def test_finetune_config_names_the_field_what_it_expected_and_what_came(field, value, exc, words):
    with pytest.raises(exc) as e:
        FinetuneConfig(**{field: value})
    assert str(e.value) == f"FinetuneConfig.{field}: {words}"
