"""Built-in tasks on the real bundled data: splits, determinism, trained-model quality, metrics, name/path
resolution and its errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from spectra_gpu.builtin import tasks, text
from spectra_gpu.builtin.tasks import MLP, load_task


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("SPECTRA_GPU_CACHE", str(tmp_path_factory.mktemp("cache")))
    torch.set_num_threads(1)
    yield
    mp.undo()


@pytest.fixture(scope="module")
def digits():
    return load_task("digits-mlp")


def test_digits_mlp_trains_and_caches(digits, tmp_path):
    assert digits.evaluate(digits.model) > 0.93
    assert digits.metric_name == "accuracy" and digits.higher_is_better
    assert digits.kinds == ("neuron",)
    files = list(tasks.cache_dir().glob("digits-mlp-s0-v*.pt"))
    assert len(files) == 1
    again = load_task("digits-mlp")  # from the cache: identical weights
    for a, b in zip(digits.model.state_dict().values(), again.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_digits_batches_are_seeded_and_cover_the_training_split(digits):
    e0, e0b, e1 = digits.train_batches(0), digits.train_batches(0), digits.train_batches(1)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(e0, e0b, strict=True))
    assert not torch.equal(e0[0][0], e1[0][0])
    n = sum(len(y) for _, y in e0)
    from spectra_gpu.builtin import zoo

    split = zoo.digits()
    assert n == len(split.y_train)
    # calibration images come from the training split, none from the test split
    calib = torch.cat([x for x, _ in digits.calib]).flatten(1)
    train = split.x_train.flatten(1)
    mu, sd = train.mean(0), train.std(0).clamp_min(0.05)
    torch.testing.assert_close(calib, (train[: len(calib)] - mu) / sd)
    assert torch.equal(torch.cat([y for _, y in digits.calib]), split.y_train[: len(calib)])


def test_classification_loss_and_accuracy_match_manual(digits):
    x, y = digits.calib[0]
    logits = digits.model(x)
    assert torch.allclose(tasks.classification_loss(digits.model, (x, y)), F.cross_entropy(logits, y))
    assert tasks.accuracy(digits.model, [(x, y)]) == pytest.approx(float((logits.argmax(1) == y).float().mean()))


def test_lm_loss_ignores_padding_and_perplexity_is_exp_mean_nll():
    torch.manual_seed(0)

    class TinyLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(11, 11)

        def forward(self, input_ids, attention_mask):
            return self.emb(input_ids)

    m = TinyLM()
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    logp = F.log_softmax(m.emb(ids), -1)
    nll = [-logp[0, 0, 2], -logp[0, 1, 3], -logp[0, 2, 4], -logp[1, 0, 6]]
    ref = torch.stack(nll).mean().detach()
    batch = {"input_ids": ids, "attention_mask": mask}
    assert torch.allclose(tasks.lm_loss(m, batch), ref)
    assert text.perplexity(m, [batch]) == pytest.approx(math.exp(float(ref)), rel=1e-5)


def test_saved_state_dict_of_a_builtin_architecture_runs_on_image_data(digits, tmp_path):
    p = tmp_path / "mlp.pt"
    torch.save(digits.model.state_dict(), p)
    t = load_task(str(p), "digits")
    assert t.evaluate(t.model) == pytest.approx(digits.evaluate(digits.model))
    assert t.model_name == str(p)


def test_a_pickled_module_is_refused_never_unpickled(tmp_path, monkeypatch):
    p = tmp_path / "m.pt"
    torch.save(MLP(64, (8,), 10), p)
    real = torch.load
    calls = []

    def spy(*a, **k):
        calls.append(k.get("weights_only"))
        return real(*a, **k)

    monkeypatch.setattr(torch, "load", spy)
    with pytest.raises(ValueError, match="never unpickles") as e:
        load_task(str(p), "digits")
    assert calls and all(w is True for w in calls)
    assert "\n" not in str(e.value) and "DIR/model" in str(e.value)


def test_pruned_plain_folder_reloads_as_the_builtin_architecture(digits, tmp_path):
    from spectra_gpu import io, surgery, units

    m = MLP(64, (256, 256), 10)
    m.load_state_dict(digits.model.state_dict())
    g = units.discover_groups(m)[0]
    surgery.remove_units(m, g, torch.arange(0, 256, 3))
    io.save_pruned(m, tmp_path / "model")
    t = load_task(str(tmp_path / "model"))
    assert t.data_name == "digits" and isinstance(t.model, MLP)
    assert [lin.out_features for lin in t.model.layers] == [256 - 86, 256]
    assert t.evaluate(t.model) == pytest.approx(digits.evaluate(m))


@pytest.mark.parametrize("model,data,match", [
    ("resnet-9000", None, "built-in name"),
    ("digits-mlp", "imagenet", "data: expected one of"),
    ("digits-mlp", "mnist5k", "works with data 'digits'"),
    ("", None, "model"),
])
def test_bad_names_are_value_errors(model, data, match):
    with pytest.raises(ValueError, match=match):
        load_task(model, data)


def test_saved_model_needs_image_data(tmp_path):
    p = tmp_path / "m.pt"
    torch.save(MLP(64, (8,), 10).state_dict(), p)
    with pytest.raises(ValueError, match="needs --data"):
        load_task(str(p))
    with pytest.raises(ValueError, match="image data"):
        load_task(str(p), "english-text")
    torch.save({"w": torch.zeros(2)}, tmp_path / "sd.pt")
    with pytest.raises(ValueError, match="state_dict"):
        load_task(str(tmp_path / "sd.pt"), "digits")


@pytest.mark.slow
def test_mnist_cnn_task():
    t = load_task("mnist-cnn")
    assert t.kinds == ("channel", "neuron")
    assert t.evaluate(t.model) > 0.9
    assert t.calib[0][0].shape[1:] == (1, 28, 28)


@pytest.mark.slow
def test_minilm_rotten_tomatoes_head_beats_majority():
    t = tasks._text_task("minilm-rt", None, None, 0, 0.0, n_train=256, n_test=200, n_calib=32)
    acc = t.evaluate(t.model)
    assert acc > 0.62  # the majority class (fresh) is 58%
    assert t.epr_basis == "prunable" and t.kinds == ("ffn", "head")
    b = t.calib[0]
    assert set(b) == {"input_ids", "attention_mask", "labels"} and b["input_ids"].shape[1] <= 64
    assert t.forward(t.model, b).shape == (len(b["labels"]), 2)


def test_pruned_minilm_classifier_folder_reloads_with_the_bundled_encoder(tmp_path):
    from spectra_gpu import io, surgery, units

    t = tasks._text_task("minilm-rt", None, None, 0, 0.0, n_train=256, n_test=64, n_calib=32)
    g = [g for g in units.discover_groups(t.model) if g.kind == "ffn"][0]
    surgery.remove_units(t.model, g, torch.arange(0, 1536, 2))
    io.save_pruned(t.model, tmp_path / "model")
    back, tok, natural = tasks._load_path(tmp_path / "model")
    assert natural == "rotten-tomatoes" and tok is not None and isinstance(back, tasks.EncoderClassifier)
    b = t.calib[0]
    torch.testing.assert_close(t.forward(back, b), t.forward(t.model, b), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_smollm2_english_text_task_perplexity_equals_plain_transformers():
    """The task's metric on its held-out sequences equals plain transformers on the same tokens (each sequence
    alone, labels = inputs); SmolLM2's tokenizer adds no BOS to running text, so neither does the task."""
    t = tasks._lm_task("smollm2-text", None, None, 0, 0.0, n_calib=2, n_train=2, eval_every=100)
    ppl = t.evaluate(t.model)
    assert 1.0 < ppl < 500.0
    assert t.calib[0]["input_ids"].shape == (2, 128)
    assert "Hamlet" in t.info and "held-out evaluation" in t.info
    tok = t.extra["tokenizer"]
    assert text.expected_bos(tok) is None
    from spectra_gpu.builtin import zoo

    seqs = text.token_sequences(tok, zoo.english_corpus().evaluation, 128, bos=None)[::100]
    with torch.no_grad():
        losses = [float(t.model(input_ids=s[None], labels=s[None]).loss) for s in seqs]
    assert ppl == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-4)


def test_expected_bos_follows_the_tokenizer_s_own_encoding():
    class Tok:
        bos_token_id = 7

        def __init__(self, adds: bool) -> None:
            self.adds = adds

        def __call__(self, s: str) -> dict[str, list[int]]:
            return {"input_ids": ([7] if self.adds else []) + [ord(c) for c in s]}

    assert text.expected_bos(Tok(True)) == 7
    assert text.expected_bos(Tok(False)) is None
